#include "history.h"

#include "mem.h"

#include <json-c/json.h>
#include <string.h>

struct hist {
    Convo__V1__Message **msgs;
    size_t n, cap;
    size_t max_messages;
    size_t max_answer_bytes;
    Convo__V1__Message *open; /* the assistant message tokens go to */
    size_t open_len;
    size_t open_cap;
    hist_counts counts;
};

hist *hist_create(size_t max_messages, size_t max_answer_bytes)
{
    hist *h = mem_calloc(1, sizeof *h);
    h->max_messages = max_messages > 0 ? max_messages : 1;
    h->max_answer_bytes = max_answer_bytes;
    return h;
}

static void msg_free(Convo__V1__Message *m)
{
    for (size_t i = 0; i < m->n_tool_calls; i++) {
        mem_free(m->tool_calls[i]->id);
        mem_free(m->tool_calls[i]->name);
        mem_free(m->tool_calls[i]->arguments_json);
        mem_free(m->tool_calls[i]);
    }
    mem_free(m->tool_calls);
    mem_free(m->content);
    mem_free(m->tool_call_id);
    mem_free(m->name);
    mem_free(m);
}

void hist_destroy(hist **hp)
{
    hist *h = *hp;
    if (h == NULL)
        return;
    *hp = NULL;
    for (size_t i = 0; i < h->n; i++)
        msg_free(h->msgs[i]);
    mem_free(h->msgs);
    mem_free(h);
}

/* Drops the oldest turns beyond the bound; a kept history starts with a
 * user message. */
static void trim(hist *h)
{
    if (h->n <= h->max_messages)
        return;
    size_t cut = h->n - h->max_messages;
    while (cut < h->n && h->msgs[cut]->role != CONVO__V1__ROLE__ROLE_USER)
        cut++;
    for (size_t i = 0; i < cut; i++) {
        if (h->msgs[i] == h->open)
            h->open = NULL;
        msg_free(h->msgs[i]);
    }
    memmove(h->msgs, h->msgs + cut, (h->n - cut) * sizeof *h->msgs);
    h->n -= cut;
}

static Convo__V1__Message *push(hist *h, Convo__V1__Role role, const char *content, size_t len)
{
    Convo__V1__Message *m = mem_calloc(1, sizeof *m);
    convo__v1__message__init(m);
    m->role = role;
    m->content = mem_strndup(content, len);
    m->tool_call_id = mem_strdup("");
    m->name = mem_strdup("");
    if (h->n == h->cap) {
        h->cap = h->cap ? 2 * h->cap : 16;
        h->msgs = mem_realloc(h->msgs, h->cap * sizeof *h->msgs);
    }
    h->msgs[h->n++] = m;
    return m;
}

static Convo__V1__Message *open_assistant(hist *h)
{
    if (h->open == NULL) {
        h->open = push(h, CONVO__V1__ROLE__ROLE_ASSISTANT, "", 0);
        h->open_len = 0;
        h->open_cap = 1;
        h->counts.assistant_messages++;
    }
    return h->open;
}

static void append_token(hist *h, const char *text, size_t len)
{
    Convo__V1__Message *m = open_assistant(h);
    if (h->open_len + len > h->max_answer_bytes)
        len = h->open_len < h->max_answer_bytes ? h->max_answer_bytes - h->open_len : 0;
    if (len == 0)
        return;
    if (h->open_len + len + 1 > h->open_cap) {
        while (h->open_len + len + 1 > h->open_cap)
            h->open_cap *= 2;
        m->content = mem_realloc(m->content, h->open_cap);
    }
    memcpy(m->content + h->open_len, text, len);
    h->open_len += len;
    m->content[h->open_len] = '\0';
}

/* The string member `key` of a parsed event, or NULL. */
static const char *member(json_object *o, const char *key)
{
    json_object *v;
    if (!json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_string))
        return NULL;
    return json_object_get_string(v);
}

/* The member as JSON text (objects stay objects); "{}" when absent. */
static const char *member_json(json_object *o, const char *key)
{
    json_object *v;
    if (!json_object_object_get_ex(o, key, &v) || v == NULL)
        return "{}";
    return json_object_to_json_string_ext(v,
                                          JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
}

static int apply_tool_call(hist *h, json_object *o)
{
    const char *id = member(o, "id");
    const char *tool = member(o, "tool");
    if (id == NULL || tool == NULL)
        return -1;
    Convo__V1__Message *m = open_assistant(h);
    Convo__V1__ToolCall *tc = mem_calloc(1, sizeof *tc);
    convo__v1__tool_call__init(tc);
    tc->id = mem_strdup(id);
    tc->name = mem_strdup(tool);
    tc->arguments_json = mem_strdup(member_json(o, "arguments"));
    m->tool_calls = mem_realloc(m->tool_calls, (m->n_tool_calls + 1) * sizeof *m->tool_calls);
    m->tool_calls[m->n_tool_calls++] = tc;
    h->counts.tool_calls++;
    return 0;
}

static int apply_tool_result(hist *h, json_object *o)
{
    const char *id = member(o, "id");
    const char *tool = member(o, "tool");
    if (id == NULL || tool == NULL)
        return -1;
    const char *result = member_json(o, "result");
    h->open = NULL;
    Convo__V1__Message *m = push(h, CONVO__V1__ROLE__ROLE_TOOL, result, strlen(result));
    mem_free(m->tool_call_id);
    mem_free(m->name);
    m->tool_call_id = mem_strdup(id);
    m->name = mem_strdup(tool);
    return 0;
}

int hist_apply(hist *h, Convo__V1__EventType type, const char *content, size_t len)
{
    int rc = 0;
    json_object *o = NULL;
    switch (type) {
    case CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE:
        h->open = NULL;
        push(h, CONVO__V1__ROLE__ROLE_USER, content, len);
        h->counts.user_messages++;
        break;
    case CONVO__V1__EVENT_TYPE__EVENT_TYPE_AI_TOKEN:
        append_token(h, content, len);
        break;
    case CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_CALL:
    case CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_RESULT:
        o = json_tokener_parse(content);
        if (o == NULL || !json_object_is_type(o, json_type_object)) {
            rc = -1;
            break;
        }
        rc = type == CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_CALL ? apply_tool_call(h, o)
                                                                 : apply_tool_result(h, o);
        break;
    case CONVO__V1__EVENT_TYPE__EVENT_TYPE_SYSTEM_EVENT:
        /* Routing decisions, errors, connects: not part of what the model
         * sees; a system event ends the open answer (a turn boundary). */
        h->open = NULL;
        break;
    default:
        rc = -1;
    }
    json_object_put(o);
    trim(h);
    return rc;
}

void hist_end_turn(hist *h)
{
    h->open = NULL;
}

size_t hist_view(hist *h, Convo__V1__Message ***msgs)
{
    *msgs = h->msgs;
    return h->n;
}

hist_counts hist_get_counts(const hist *h)
{
    return h->counts;
}

void hist_set_counts(hist *h, int64_t user_messages, int64_t tool_calls)
{
    h->counts.user_messages = user_messages;
    h->counts.tool_calls = tool_calls;
}
