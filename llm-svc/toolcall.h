/* toolcall — OpenAI chat-completion chunks: their parsing (json-c) and the
 * assembly of streamed tool calls from their deltas.
 *
 * A streamed tool call arrives in pieces keyed by `index`: usually only the
 * first delta of an index carries `id` and `function.name`, the later ones
 * only `index` and a fragment of `function.arguments`; several calls of one
 * answer (parallel calls) interleave by index. Each call's arguments are
 * kept apart and capped, so two calls never merge into one invalid JSON
 * text and no stream can grow a buffer without end. */
#ifndef CONVO_TOOLCALL_H
#define CONVO_TOOLCALL_H

#include <stddef.h>
#include <stdint.h>

#define TOOLCALL_EJSON    (-1) /* the chunk is not JSON */
#define TOOLCALL_EFORMAT  (-2) /* JSON, but not a chat-completion chunk */
#define TOOLCALL_ETOOBIG  (-3) /* a call's arguments or name are over the cap */
#define TOOLCALL_ETOOMANY (-4) /* more parallel calls than the cap */

/* One assembled call; the strings belong to the set. */
typedef struct toolcall {
    int index;  /* the upstream's index */
    char *id;   /* "" until a delta carried one */
    char *name; /* "" until a delta carried one */
    char *args; /* the concatenated argument fragments, NUL-terminated */
    size_t args_len;
} toolcall;

typedef struct toolcall_set toolcall_set;

/* A set for at most `max_calls` calls of at most `max_args` argument bytes. */
toolcall_set *toolcall_set_create(size_t max_calls, size_t max_args);
void toolcall_set_destroy(toolcall_set **s);
/* Forgets every call (a new model round). */
void toolcall_set_clear(toolcall_set *s);
/* Applies one delta. `id`, `name` and `args` may be NULL (absent). A delta
 * for an index whose call already has a different id starts a new call
 * (some servers number every call 0). Returns 0, TOOLCALL_ETOOBIG or
 * TOOLCALL_ETOOMANY. */
int toolcall_set_apply(toolcall_set *s, int index, const char *id, const char *name,
                       const char *args, size_t args_len);
size_t toolcall_set_count(const toolcall_set *s);
/* The i-th call in order of first appearance. */
const toolcall *toolcall_set_get(const toolcall_set *s, size_t i);

/* What one chunk said besides its tool-call deltas. */
typedef struct toolcall_chunk {
    char *content;       /* choices[0].delta.content (or message.content), or NULL; mem_free */
    char *finish_reason; /* or NULL; mem_free */
    char *model;         /* or NULL; mem_free */
    int has_usage;
    uint32_t prompt_tokens, completion_tokens, total_tokens;
} toolcall_chunk;

/* Parses one streamed chunk (the data of one SSE event) and applies its
 * tool-call deltas to `calls` (may be NULL to ignore them). A chunk with no
 * choices (the usage chunk) is fine. Fills *out (free it with
 * toolcall_chunk_clear even on error). Returns 0 or a TOOLCALL_E* error;
 * `err` (when not NULL) gets a reason. */
int toolcall_chunk_parse(const char *json, size_t len, toolcall_set *calls, toolcall_chunk *out,
                         char *err, size_t errsize);
/* Parses a whole non-streamed response (choices[0].message). */
int toolcall_response_parse(const char *json, size_t len, toolcall_chunk *out, char *err,
                            size_t errsize);
void toolcall_chunk_clear(toolcall_chunk *c);

#endif
