#include "complete.h"

#include "mem.h"
#include "toolcall.h"
#include "turn.h"

#include <string.h>

/* One Complete call. */
typedef struct complete {
    turn t;           /* first: a completion is a turn */
    turn_text answer; /* under t.mu */
} complete;

static complete *complete_of(turn *t)
{
    return (complete *)t;
}

static void complete_free(turn *t)
{
    complete *c = complete_of(t);
    turn_text_clear(&c->answer);
}

static int complete_on_data(turn *t, const char *buf, size_t len)
{
    complete *c = complete_of(t);
    pthread_mutex_lock(&t->mu);
    int rc = 0;
    if (!turn_live(t)) {
        rc = -1;
    } else if (turn_text_append(&c->answer, buf, len, (size_t)t->env->o->max_answer_bytes) != 0) {
        turn_set_bad(t, CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_BAD_UPSTREAM_DATA,
                     "the answer is over --max-answer-bytes");
        rc = -1;
    }
    pthread_mutex_unlock(&t->mu);
    return rc;
}

/* Parses the gathered answer and finishes the call with it (t->mu held). */
static void respond(complete *c)
{
    toolcall_chunk k;
    char err[256];
    if (toolcall_response_parse(c->answer.s ? c->answer.s : "", c->answer.len, &k, err,
                                sizeof err) != 0) {
        turn_finish(&c->t, RPC_UNAVAILABLE, err, NULL);
        toolcall_chunk_clear(&k);
        return;
    }
    Convo__V1__CompleteResponse r = CONVO__V1__COMPLETE_RESPONSE__INIT;
    Convo__V1__Usage u = CONVO__V1__USAGE__INIT;
    r.content = k.content;
    r.finish_reason = k.finish_reason ? k.finish_reason : "";
    r.model = k.model ? k.model : (char *)turn_model_asked(&c->t);
    r.upstream = (char *)turn_upstream(&c->t);
    if (k.has_usage) {
        u.prompt_tokens = k.prompt_tokens;
        u.completion_tokens = k.completion_tokens;
        u.total_tokens = k.total_tokens;
        r.usage = &u;
        turn_count_usage(&c->t, k.prompt_tokens, k.completion_tokens);
    }
    if (!rpc_utf8_valid(r.content, strlen(r.content)))
        turn_finish(&c->t, RPC_UNAVAILABLE, "the upstream answer is not UTF-8", NULL);
    else
        turn_finish(&c->t, RPC_OK, NULL, &r.base);
    toolcall_chunk_clear(&k);
}

static void complete_on_done(turn *t, const upstream_done_info *info)
{
    complete *c = complete_of(t);
    pthread_mutex_lock(&t->mu);
    if (info->result == UPSTREAM_CANCELLED || !turn_live(t)) {
        /* the caller went away: nothing to answer */
    } else if (t->bad_msg != NULL) {
        turn_finish(t, RPC_UNAVAILABLE, t->bad_msg, NULL);
    } else if (info->result != UPSTREAM_OK) {
        turn_failure f;
        turn_failure_of(info, &f);
        turn_finish(t, f.code, f.message, NULL);
    } else {
        respond(c);
    }
    pthread_mutex_unlock(&t->mu);
}

static void complete_rewind(turn *t)
{
    complete *c = complete_of(t);
    turn_text_clear(&c->answer);
}

static const turn_method complete_method = {
    .name = "Complete",
    .stream = 0,
    .on_data = complete_on_data,
    .on_done = complete_on_done,
    .on_writable = NULL,
    .rewind = complete_rewind,
    .free = complete_free,
};

void complete_on_call(srv_call *call, const ProtobufCMessage *msg)
{
    turn_env *env = srv_call_method_data(call);
    const Convo__V1__CompleteRequest *req = (const Convo__V1__CompleteRequest *)msg;
    char err[256];
    if (req->n_messages == 0) {
        srv_call_finish(call, RPC_INVALID_ARGUMENT, "at least one message is required", NULL);
        return;
    }
    if (turn_check_utf8(req->system_prompt, "system_prompt", err, sizeof err) != 0 ||
        turn_check_bounds(env, req->system_prompt, req->messages, req->n_messages, "messages",
                          req->params, err, sizeof err) != 0) {
        srv_call_finish(call, RPC_INVALID_ARGUMENT, err, NULL);
        return;
    }
    complete *c = mem_calloc(1, sizeof *c);
    turn *t = &c->t;
    turn_init(t, &complete_method, env, call, req->session_id, req->params);
    if (req->system_prompt && req->system_prompt[0])
        turn_add_message(t, "system", req->system_prompt);
    if (turn_add_history(t, req->messages, req->n_messages, err, sizeof err) != 0) {
        turn_refuse(t, RPC_INVALID_ARGUMENT, err);
        return;
    }
    json_object_object_add(t->body, "stream", json_object_new_boolean(0));
    turn_bind(t);
    pthread_mutex_lock(&t->mu);
    turn_failure f;
    if (turn_request(t, &f) != 0)
        turn_finish(t, f.code, f.message, NULL);
    pthread_mutex_unlock(&t->mu);
    turn_unref(t); /* the starter's */
}
