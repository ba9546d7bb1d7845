/* tools — the registry of tools the model may call. Adding a tool is a
 * small local change: a file with its tool_def and a register function,
 * and one line in main.c.
 *
 * tools_call validates the arguments against the tool's JSON schema (the
 * subset tools use: an object with typed properties, required names,
 * string length bounds, no additional properties) before the tool runs.
 * Unknown tools, bad JSON and schema violations become error results, as do
 * the tools' own failures: nothing a model sends can crash the service. */
#ifndef CONVO_TOOLS_H
#define CONVO_TOOLS_H

#include "trace.h"

#include <json-c/json.h>
#include <stddef.h>

/* Who is asking: the Chat call a tool runs for. Tools that read user data
 * are bound to it. */
typedef struct tool_ctx {
    const char *session_id;
    const char *user_id;
    const char *request_id;
    const trace_span *span; /* the tool call's: its calls to other services are children */
} tool_ctx;

/* A tool finished. `result_json` is a JSON text (mem_*, now the callee's);
 * on failure it is {"error": "..."} and is_error is 1. May be called before
 * tools_call returns or later from another thread. */
typedef void (*tool_done_fn)(void *arg, int is_error, char *result_json);

typedef struct tool_def {
    const char *name;
    const char *description;
    const char *schema; /* JSON Schema of the arguments object */
    /* Runs with arguments that passed the schema; must call done once.
     * `ctx` strings are valid only during the call: copy what is kept. */
    void (*run)(void *state, const tool_ctx *ctx, json_object *args, tool_done_fn done, void *arg);
    void *state;
} tool_def;

typedef struct tools tools;

tools *tools_create(void);
void tools_destroy(tools **t);
/* Adds a tool (the def is copied; its strings must outlive the registry).
 * Returns 0, or -1 when its schema is not a JSON object. */
int tools_add(tools *t, const tool_def *def);
size_t tools_count(const tools *t);
const tool_def *tools_get(const tools *t, size_t i);
/* The "tools" array of an OpenAI chat request; the caller owns the ref. */
json_object *tools_openai_json(const tools *t);
/* Runs `name` with `args_json`; `done` fires exactly once (see above). */
void tools_call(tools *t, const tool_ctx *ctx, const char *name, const char *args_json,
                tool_done_fn done, void *arg);
/* {"error": "<printf>"} as a new mem_* string. */
char *tools_error_json(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The tools of this service, one file each. */
typedef struct kb kb;
typedef struct cli_channel cli_channel;
int tool_knowledge_register(tools *t, const kb *k);
int tool_context_register(tools *t, cli_channel *store, long long timeout_ms);

#endif
