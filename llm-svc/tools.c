#include "tools.h"

#include "mem.h"

#include <json-c/printbuf.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define TOOLS_MAX 32

/* The schema is parsed once and only read afterwards (validate), from
 * any thread. */
typedef struct entry {
    tool_def def;
    json_object *schema;
} entry;

struct tools {
    entry e[TOOLS_MAX];
    size_t n;
    /* The "tools" array of a chat request as JSON text, rebuilt by
     * tools_add (before serving) and only read afterwards. */
    char *openai;
};

tools *tools_create(void)
{
    return mem_calloc(1, sizeof(tools));
}

void tools_destroy(tools **tp)
{
    if (tp == NULL || *tp == NULL)
        return;
    for (size_t i = 0; i < (*tp)->n; i++)
        json_object_put((*tp)->e[i].schema);
    mem_free((*tp)->openai);
    mem_free(*tp);
    *tp = NULL;
}

/* The OpenAI "tools" array for the tools registered so far. */
static char *openai_text(const tools *t)
{
    json_object *arr = json_object_new_array();
    for (size_t i = 0; i < t->n; i++) {
        json_object *tool = json_object_new_object(), *fn = json_object_new_object();
        json_object_object_add(fn, "name", json_object_new_string(t->e[i].def.name));
        json_object_object_add(fn, "description", json_object_new_string(t->e[i].def.description));
        json_object_object_add(fn, "parameters", json_object_get(t->e[i].schema));
        json_object_object_add(tool, "type", json_object_new_string("function"));
        json_object_object_add(tool, "function", fn);
        json_object_array_add(arr, tool);
    }
    char *text = mem_strdup(json_object_to_json_string_ext(
        arr, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
    json_object_put(arr);
    return text;
}

int tools_add(tools *t, const tool_def *def)
{
    json_object *schema = json_tokener_parse(def->schema);
    if (t->n == TOOLS_MAX || schema == NULL || !json_object_is_type(schema, json_type_object)) {
        json_object_put(schema);
        return -1;
    }
    t->e[t->n].def = *def;
    t->e[t->n].schema = schema;
    t->n++;
    mem_free(t->openai);
    t->openai = openai_text(t);
    return 0;
}

size_t tools_count(const tools *t)
{
    return t->n;
}

const tool_def *tools_get(const tools *t, size_t i)
{
    return i < t->n ? &t->e[i].def : NULL;
}

/* Prints the array built by tools_add where a request's placeholder stands. */
static int print_prebuilt(json_object *jso, struct printbuf *pb, int level, int flags)
{
    (void)level;
    (void)flags;
    const char *text = json_object_get_userdata(jso);
    return printbuf_memappend(pb, text, (int)strlen(text));
}

json_object *tools_openai_json(const tools *t)
{
    /* A placeholder of its own for each request, printing text built once:
     * nothing is shared between requests (json-c's reference counts are
     * not atomic, and bodies are built and freed on different threads), and
     * the array is not rebuilt for every request. */
    json_object *o = json_object_new_array();
    json_object_set_serializer(o, print_prebuilt, t->openai != NULL ? t->openai : "[]", NULL);
    return o;
}

char *tools_error_json(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    json_object *o = json_object_new_object();
    json_object_object_add(o, "error", json_object_new_string(msg));
    char *s = mem_strdup(
        json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
    json_object_put(o);
    return s;
}

static int type_ok(json_object *v, const char *type)
{
    if (strcmp(type, "string") == 0)
        return json_object_is_type(v, json_type_string);
    if (strcmp(type, "integer") == 0)
        return json_object_is_type(v, json_type_int);
    if (strcmp(type, "number") == 0)
        return json_object_is_type(v, json_type_int) || json_object_is_type(v, json_type_double);
    if (strcmp(type, "boolean") == 0)
        return json_object_is_type(v, json_type_boolean);
    if (strcmp(type, "object") == 0)
        return json_object_is_type(v, json_type_object);
    if (strcmp(type, "array") == 0)
        return json_object_is_type(v, json_type_array);
    return 1;
}

/* The schema subset the tools use. 0 when `args` fits, else -1 and why. */
static int validate(json_object *schema, json_object *args, char *why, size_t whysize)
{
    json_object *props = NULL, *req = NULL, *addl = NULL;
    if (!json_object_is_type(args, json_type_object)) {
        snprintf(why, whysize, "the arguments must be a JSON object");
        return -1;
    }
    json_object_object_get_ex(schema, "properties", &props);
    if (json_object_object_get_ex(schema, "required", &req) &&
        json_object_is_type(req, json_type_array)) {
        for (size_t i = 0; i < json_object_array_length(req); i++) {
            const char *name = json_object_get_string(json_object_array_get_idx(req, i));
            if (!json_object_object_get_ex(args, name, NULL)) {
                snprintf(why, whysize, "missing required argument '%s'", name);
                return -1;
            }
        }
    }
    int closed = json_object_object_get_ex(schema, "additionalProperties", &addl) &&
                 json_object_is_type(addl, json_type_boolean) && !json_object_get_boolean(addl);
    json_object_object_foreach(args, key, val)
    {
        json_object *ps = NULL, *type = NULL, *bound = NULL;
        if (props == NULL || !json_object_object_get_ex(props, key, &ps)) {
            if (closed) {
                snprintf(why, whysize, "unknown argument '%.64s'", key);
                return -1;
            }
            continue;
        }
        if (json_object_object_get_ex(ps, "type", &type) &&
            !type_ok(val, json_object_get_string(type))) {
            snprintf(why, whysize, "argument '%s' must be of type %s", key,
                     json_object_get_string(type));
            return -1;
        }
        if (json_object_is_type(val, json_type_string)) {
            int len = json_object_get_string_len(val);
            if (json_object_object_get_ex(ps, "minLength", &bound) &&
                len < json_object_get_int(bound)) {
                snprintf(why, whysize, "argument '%s' is shorter than %d characters", key,
                         json_object_get_int(bound));
                return -1;
            }
            if (json_object_object_get_ex(ps, "maxLength", &bound) &&
                len > json_object_get_int(bound)) {
                snprintf(why, whysize, "argument '%s' is longer than %d characters", key,
                         json_object_get_int(bound));
                return -1;
            }
        }
    }
    return 0;
}

void tools_call(tools *t, const tool_ctx *ctx, const char *name, const char *args_json,
                tool_done_fn done, void *arg)
{
    entry *e = NULL;
    for (size_t i = 0; i < t->n && e == NULL; i++)
        if (strcmp(t->e[i].def.name, name) == 0)
            e = &t->e[i];
    if (e == NULL) {
        done(arg, 1, tools_error_json("unknown tool '%.64s'", name));
        return;
    }
    /* Models send "" for a call without arguments. */
    const char *text = args_json[0] != '\0' ? args_json : "{}";
    json_tokener *tok = json_tokener_new();
    json_object *args = json_tokener_parse_ex(tok, text, (int)strlen(text));
    int bad = json_tokener_get_error(tok) != json_tokener_success ||
              (size_t)json_tokener_get_parse_end(tok) != strlen(text);
    json_tokener_free(tok);
    if (args == NULL || bad) {
        json_object_put(args);
        done(arg, 1, tools_error_json("the arguments of %s are not valid JSON", name));
        return;
    }
    char why[256];
    if (validate(e->schema, args, why, sizeof why) != 0) {
        json_object_put(args);
        done(arg, 1, tools_error_json("%s: %s", name, why));
        return;
    }
    e->def.run(e->def.state, ctx, args, done, arg);
    json_object_put(args);
}
