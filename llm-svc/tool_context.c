/* lookup_contextual_data(session_id): the caller's context from store-svc —
 * this session's counts (GetSession) and the user's previous sessions with
 * their summaries (ListUserSessions), asked for at once.
 *
 * Bound to the Chat call: a session id that is not the call's own is
 * refused before the store is asked, and a session the store says belongs
 * to someone else is refused too, so one user's data never reaches
 * another's conversation through a model that was talked into asking. */
#include "cli.h"
#include "log.h"
#include "mem.h"
#include "names.h"
#include "tools.h"

#include "convo_methods.h"

#include <pthread.h>
#include <string.h>

#define CONTEXT_PREVIOUS 5

typedef struct ctx_state {
    cli_channel *store;
    long long timeout_ms;
} ctx_state;

/* One lookup: two store calls; the second to finish answers. */
typedef struct lookup {
    pthread_mutex_t mu;
    int pending;
    char *session_id, *user_id;
    tool_done_fn done;
    void *arg;
    rpc_code get_code, list_code;
    char *get_msg, *list_msg;
    Convo__V1__GetSessionResponse *get;
    Convo__V1__ListUserSessionsResponse *list;
} lookup;

static void answer(lookup *l)
{
    char *result = NULL;
    int is_error = 0;
    if (l->get_code != RPC_OK && l->get_code != RPC_NOT_FOUND) {
        result = tools_error_json("the session store is unavailable (%s: %s)",
                                  rpc_code_name(l->get_code), l->get_msg ? l->get_msg : "");
        is_error = 1;
        goto out;
    }
    const Convo__V1__Session *s = l->get ? l->get->session : NULL;
    if (s != NULL && s->user_id != NULL && strcmp(s->user_id, l->user_id) != 0) {
        result = tools_error_json("session %s does not belong to the caller", l->session_id);
        is_error = 1;
        goto out;
    }
    json_object *o = json_object_new_object();
    json_object *cur = json_object_new_object();
    json_object_object_add(cur, "session_id", json_object_new_string(l->session_id));
    if (s != NULL) {
        json_object_object_add(cur, "user_message_count",
                               json_object_new_int64(s->user_message_count));
        json_object_object_add(cur, "tool_call_count", json_object_new_int64(s->tool_call_count));
        json_object_object_add(cur, "event_count", json_object_new_int64(s->event_count));
        json_object_object_add(cur, "start_time_us", json_object_new_int64(s->start_time_us));
    } else {
        json_object_object_add(cur, "note",
                               json_object_new_string("the store has no record of it yet"));
    }
    json_object_object_add(o, "current_session", cur);
    json_object *prev = json_object_new_array();
    if (l->list_code == RPC_OK && l->list != NULL) {
        for (size_t i = 0; i < l->list->n_sessions; i++) {
            const Convo__V1__Session *p = l->list->sessions[i];
            json_object *e = json_object_new_object();
            json_object_object_add(e, "session_id", json_object_new_string(p->session_id));
            json_object_object_add(e, "start_time_us", json_object_new_int64(p->start_time_us));
            json_object_object_add(e, "duration_seconds", json_object_new_int(p->duration_seconds));
            json_object_object_add(e, "summary_status",
                                   json_object_new_string(names_summary_status(p->summary_status)));
            json_object_object_add(e, "summary", json_object_new_string(p->final_summary));
            json_object_array_add(prev, e);
        }
    } else {
        json_object_object_add(o, "previous_sessions_error",
                               json_object_new_string(rpc_code_name(l->list_code)));
    }
    json_object_object_add(o, "previous_sessions", prev);
    result = mem_strdup(
        json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
    json_object_put(o);
out:
    l->done(l->arg, is_error, result);
    if (l->get)
        protobuf_c_message_free_unpacked(&l->get->base, NULL);
    if (l->list)
        protobuf_c_message_free_unpacked(&l->list->base, NULL);
    mem_free(l->get_msg);
    mem_free(l->list_msg);
    mem_free(l->session_id);
    mem_free(l->user_id);
    pthread_mutex_destroy(&l->mu);
    mem_free(l);
}

static void one_done(lookup *l)
{
    pthread_mutex_lock(&l->mu);
    int last = --l->pending == 0;
    pthread_mutex_unlock(&l->mu);
    if (last)
        answer(l);
}

static void on_get(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    lookup *l = arg;
    l->get_code = code;
    l->get_msg = message ? mem_strdup(message) : NULL;
    l->get = (Convo__V1__GetSessionResponse *)resp;
    one_done(l);
}

static void on_list(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp)
{
    lookup *l = arg;
    l->list_code = code;
    l->list_msg = message ? mem_strdup(message) : NULL;
    l->list = (Convo__V1__ListUserSessionsResponse *)resp;
    one_done(l);
}

static void run(void *state, const tool_ctx *ctx, json_object *args, tool_done_fn done, void *arg)
{
    ctx_state *st = state;
    const char *sid = json_object_get_string(json_object_object_get(args, "session_id"));
    if (ctx->session_id == NULL || ctx->session_id[0] == '\0' ||
        strcmp(sid, ctx->session_id) != 0) {
        log_warn("lookup_contextual_data refused: session '%.64s' is not the caller's", sid);
        done(arg, 1,
             tools_error_json("access denied: lookup_contextual_data only reads the current "
                              "session of the caller, not '%.64s'",
                              sid));
        return;
    }
    lookup *l = mem_calloc(1, sizeof *l);
    pthread_mutex_init(&l->mu, NULL);
    l->pending = 3; /* two calls and this function */
    l->session_id = mem_strdup(sid);
    l->user_id = mem_strdup(ctx->user_id ? ctx->user_id : "");
    l->done = done;
    l->arg = arg;
    cli_opts o = {
        .timeout_ms = st->timeout_ms, .request_id = ctx->request_id, .trace_parent = ctx->span};
    Convo__V1__GetSessionRequest g = CONVO__V1__GET_SESSION_REQUEST__INIT;
    g.session_id = l->session_id;
    if (cli_unary(st->store, &convo__v1__store__get_session__method, &g.base, &o, on_get, l,
                  NULL) != 0)
        on_get(l, RPC_UNAVAILABLE, "cannot start the call", NULL);
    Convo__V1__ListUserSessionsRequest q = CONVO__V1__LIST_USER_SESSIONS_REQUEST__INIT;
    q.user_id = l->user_id;
    q.limit = CONTEXT_PREVIOUS;
    q.exclude_session_id = l->session_id;
    if (cli_unary(st->store, &convo__v1__store__list_user_sessions__method, &q.base, &o, on_list, l,
                  NULL) != 0)
        on_list(l, RPC_UNAVAILABLE, "cannot start the call", NULL);
    one_done(l);
}

int tool_context_register(tools *t, cli_channel *store, long long timeout_ms)
{
    /* Lives as long as the process (the registry does not free tool state). */
    static ctx_state st;
    st.store = store;
    st.timeout_ms = timeout_ms;
    const tool_def def = {
        .name = "lookup_contextual_data",
        .description = "Look up context about the current conversation session: its message "
                       "and tool counts, and the user's previous sessions with their summaries. "
                       "Only the current session_id is allowed.",
        .schema = "{\"type\":\"object\",\"properties\":{\"session_id\":{\"type\":\"string\","
                  "\"minLength\":1,\"maxLength\":128,\"description\":\"the current session "
                  "id\"}},\"required\":[\"session_id\"],\"additionalProperties\":false}",
        .run = run,
        .state = &st,
    };
    return tools_add(t, &def);
}
