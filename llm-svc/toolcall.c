#include "toolcall.h"

#include "mem.h"

#include <json-c/json.h>
#include <stdio.h>
#include <string.h>

static const char *toolcall_strerror(int err);

/* Ids and names are short in every API; a longer one is a broken stream. */
#define TOOLCALL_MAX_ID 256

struct toolcall_set {
    size_t max_calls, max_args;
    toolcall *calls;
    size_t n;
    size_t *args_cap;
};

toolcall_set *toolcall_set_create(size_t max_calls, size_t max_args)
{
    toolcall_set *s = mem_calloc(1, sizeof *s);
    s->max_calls = max_calls ? max_calls : 1;
    s->max_args = max_args;
    s->calls = mem_calloc(s->max_calls, sizeof *s->calls);
    s->args_cap = mem_calloc(s->max_calls, sizeof *s->args_cap);
    return s;
}

void toolcall_set_clear(toolcall_set *s)
{
    for (size_t i = 0; i < s->n; i++) {
        mem_free(s->calls[i].id);
        mem_free(s->calls[i].name);
        mem_free(s->calls[i].args);
        memset(&s->calls[i], 0, sizeof s->calls[i]);
        s->args_cap[i] = 0;
    }
    s->n = 0;
}

void toolcall_set_destroy(toolcall_set **sp)
{
    if (sp == NULL || *sp == NULL)
        return;
    toolcall_set_clear(*sp);
    mem_free((*sp)->calls);
    mem_free((*sp)->args_cap);
    mem_free(*sp);
    *sp = NULL;
}

size_t toolcall_set_count(const toolcall_set *s)
{
    return s->n;
}

const toolcall *toolcall_set_get(const toolcall_set *s, size_t i)
{
    return i < s->n ? &s->calls[i] : NULL;
}

int toolcall_set_apply(toolcall_set *s, int index, const char *id, const char *name,
                       const char *args, size_t args_len)
{
    if ((id && strlen(id) > TOOLCALL_MAX_ID) || (name && strlen(name) > TOOLCALL_MAX_ID))
        return TOOLCALL_ETOOBIG;
    /* The latest call with this index, unless a new id says it is another. */
    toolcall *c = NULL;
    size_t ci = 0;
    for (size_t i = s->n; i-- > 0;) {
        if (s->calls[i].index == index) {
            c = &s->calls[i];
            ci = i;
            break;
        }
    }
    if (c != NULL && id != NULL && id[0] != '\0' && c->id[0] != '\0' && strcmp(c->id, id) != 0)
        c = NULL;
    if (c == NULL) {
        if (s->n == s->max_calls)
            return TOOLCALL_ETOOMANY;
        ci = s->n++;
        c = &s->calls[ci];
        c->index = index;
        c->id = mem_strdup("");
        c->name = mem_strdup("");
        c->args = mem_calloc(1, 1);
        s->args_cap[ci] = 1;
    }
    if (id != NULL && id[0] != '\0' && c->id[0] == '\0') {
        mem_free(c->id);
        c->id = mem_strdup(id);
    }
    /* Some servers repeat the name in every delta: only the first counts. */
    if (name != NULL && name[0] != '\0' && c->name[0] == '\0') {
        mem_free(c->name);
        c->name = mem_strdup(name);
    }
    if (args != NULL && args_len > 0) {
        if (c->args_len + args_len > s->max_args)
            return TOOLCALL_ETOOBIG;
        size_t need = c->args_len + args_len + 1;
        if (need > s->args_cap[ci]) {
            size_t n = s->args_cap[ci] * 2;
            while (n < need)
                n *= 2;
            if (n > s->max_args + 1)
                n = s->max_args + 1;
            c->args = mem_realloc(c->args, n);
            s->args_cap[ci] = n;
        }
        memcpy(c->args + c->args_len, args, args_len);
        c->args_len += args_len;
        c->args[c->args_len] = '\0';
    }
    return 0;
}

void toolcall_chunk_clear(toolcall_chunk *c)
{
    mem_free(c->content);
    mem_free(c->finish_reason);
    mem_free(c->model);
    memset(c, 0, sizeof *c);
}

/* A string member, or NULL when absent or JSON null; a member of another
 * type is a format error (-1). */
static int get_str(json_object *o, const char *key, const char **out)
{
    json_object *v = NULL;
    *out = NULL;
    if (o == NULL || !json_object_object_get_ex(o, key, &v) || v == NULL)
        return 0;
    if (!json_object_is_type(v, json_type_string))
        return -1;
    *out = json_object_get_string(v);
    return 0;
}

static uint32_t get_u32(json_object *o, const char *key)
{
    json_object *v = NULL;
    if (!json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_int))
        return 0;
    int64_t n = json_object_get_int64(v);
    return n < 0 ? 0 : n > UINT32_MAX ? UINT32_MAX : (uint32_t)n;
}

#define FAIL(code, ...)                                                                            \
    do {                                                                                           \
        if (err != NULL)                                                                           \
            snprintf(err, errsize, __VA_ARGS__);                                                   \
        rc = (code);                                                                               \
        goto out;                                                                                  \
    } while (0)

static json_object *parse_json(const char *json, size_t len)
{
    json_tokener *tok = json_tokener_new();
    json_object *o = json_tokener_parse_ex(tok, json, (int)len);
    /* Trailing bytes after the object, or an incomplete one, are an error. */
    if (o != NULL && json_tokener_get_error(tok) == json_tokener_success &&
        (size_t)json_tokener_get_parse_end(tok) < len) {
        for (size_t i = json_tokener_get_parse_end(tok); i < len; i++) {
            if (json[i] != ' ' && json[i] != '\t' && json[i] != '\n' && json[i] != '\r') {
                json_object_put(o);
                o = NULL;
                break;
            }
        }
    } else if (o == NULL || json_tokener_get_error(tok) != json_tokener_success) {
        json_object_put(o);
        o = NULL;
    }
    json_tokener_free(tok);
    return o;
}

static int parse_common(json_object *root, toolcall_chunk *out, json_object **choice0, char *err,
                        size_t errsize)
{
    int rc = 0;
    const char *s = NULL;
    json_object *choices = NULL, *usage = NULL;
    *choice0 = NULL;
    if (!json_object_is_type(root, json_type_object))
        FAIL(TOOLCALL_EFORMAT, "the chunk is not a JSON object");
    if (json_object_object_get_ex(root, "error", NULL))
        FAIL(TOOLCALL_EFORMAT, "the upstream sent an error object: %.200s",
             json_object_to_json_string(root));
    if (get_str(root, "model", &s) == 0 && s != NULL)
        out->model = mem_strdup(s);
    if (json_object_object_get_ex(root, "usage", &usage) &&
        json_object_is_type(usage, json_type_object)) {
        out->has_usage = 1;
        out->prompt_tokens = get_u32(usage, "prompt_tokens");
        out->completion_tokens = get_u32(usage, "completion_tokens");
        out->total_tokens = get_u32(usage, "total_tokens");
    }
    if (json_object_object_get_ex(root, "choices", &choices) && choices != NULL) {
        if (!json_object_is_type(choices, json_type_array))
            FAIL(TOOLCALL_EFORMAT, "choices is not an array");
        if (json_object_array_length(choices) > 0) {
            json_object *c = json_object_array_get_idx(choices, 0);
            if (!json_object_is_type(c, json_type_object))
                FAIL(TOOLCALL_EFORMAT, "choices[0] is not an object");
            if (get_str(c, "finish_reason", &s) != 0)
                FAIL(TOOLCALL_EFORMAT, "finish_reason is not a string");
            if (s != NULL)
                out->finish_reason = mem_strdup(s);
            *choice0 = c;
        }
    } else if (!out->has_usage) {
        FAIL(TOOLCALL_EFORMAT, "neither choices nor usage in the chunk");
    }
out:
    return rc;
}

int toolcall_chunk_parse(const char *json, size_t len, toolcall_set *calls, toolcall_chunk *out,
                         char *err, size_t errsize)
{
    int rc = 0;
    const char *s = NULL;
    json_object *choice = NULL, *delta = NULL, *tcs = NULL;
    memset(out, 0, sizeof *out);
    json_object *root = parse_json(json, len);
    if (root == NULL)
        FAIL(TOOLCALL_EJSON, "the chunk is not valid JSON: %.80s", json);
    rc = parse_common(root, out, &choice, err, errsize);
    if (rc != 0 || choice == NULL)
        goto out;
    if (!json_object_object_get_ex(choice, "delta", &delta) || delta == NULL)
        goto out; /* a finish-only chunk */
    if (!json_object_is_type(delta, json_type_object))
        FAIL(TOOLCALL_EFORMAT, "delta is not an object");
    if (get_str(delta, "content", &s) != 0)
        FAIL(TOOLCALL_EFORMAT, "delta.content is not a string");
    if (s != NULL && s[0] != '\0')
        out->content = mem_strdup(s);
    if (!json_object_object_get_ex(delta, "tool_calls", &tcs) || tcs == NULL)
        goto out;
    if (!json_object_is_type(tcs, json_type_array))
        FAIL(TOOLCALL_EFORMAT, "delta.tool_calls is not an array");
    for (size_t i = 0; i < json_object_array_length(tcs); i++) {
        json_object *tc = json_object_array_get_idx(tcs, i), *idx = NULL, *fn = NULL;
        const char *id = NULL, *name = NULL, *args = NULL;
        if (!json_object_is_type(tc, json_type_object))
            FAIL(TOOLCALL_EFORMAT, "a tool_calls entry is not an object");
        /* index is required by the format; a server that leaves it out
         * sends one call per entry position. */
        int index = (int)i;
        if (json_object_object_get_ex(tc, "index", &idx)) {
            if (!json_object_is_type(idx, json_type_int) || json_object_get_int(idx) < 0)
                FAIL(TOOLCALL_EFORMAT, "tool_calls[].index is not a non-negative integer");
            index = json_object_get_int(idx);
        }
        if (get_str(tc, "id", &id) != 0)
            FAIL(TOOLCALL_EFORMAT, "tool_calls[].id is not a string");
        if (json_object_object_get_ex(tc, "function", &fn) && fn != NULL) {
            if (!json_object_is_type(fn, json_type_object))
                FAIL(TOOLCALL_EFORMAT, "tool_calls[].function is not an object");
            if (get_str(fn, "name", &name) != 0 || get_str(fn, "arguments", &args) != 0)
                FAIL(TOOLCALL_EFORMAT, "tool_calls[].function fields are not strings");
        }
        if (calls == NULL)
            continue;
        rc = toolcall_set_apply(
            calls, index, id, name, args,
            args ? (size_t)json_object_get_string_len(json_object_object_get(fn, "arguments")) : 0);
        if (rc != 0)
            FAIL(rc, "%s", toolcall_strerror(rc));
    }
out:
    json_object_put(root);
    return rc;
}

int toolcall_response_parse(const char *json, size_t len, toolcall_chunk *out, char *err,
                            size_t errsize)
{
    int rc = 0;
    const char *s = NULL;
    json_object *choice = NULL, *msg = NULL;
    memset(out, 0, sizeof *out);
    json_object *root = parse_json(json, len);
    if (root == NULL)
        FAIL(TOOLCALL_EJSON, "the response is not valid JSON: %.80s", json);
    rc = parse_common(root, out, &choice, err, errsize);
    if (rc != 0)
        goto out;
    if (choice == NULL || !json_object_object_get_ex(choice, "message", &msg) ||
        !json_object_is_type(msg, json_type_object))
        FAIL(TOOLCALL_EFORMAT, "the response has no choices[0].message");
    if (get_str(msg, "content", &s) != 0)
        FAIL(TOOLCALL_EFORMAT, "message.content is not a string");
    out->content = mem_strdup(s ? s : "");
out:
    json_object_put(root);
    return rc;
}

static const char *toolcall_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
    case TOOLCALL_EJSON:
        return "not valid JSON";
    case TOOLCALL_EFORMAT:
        return "not an OpenAI chat-completion chunk";
    case TOOLCALL_ETOOBIG:
        return "tool-call arguments or name over the size cap";
    case TOOLCALL_ETOOMANY:
        return "more parallel tool calls than the cap";
    default:
        return "unknown error";
    }
}
