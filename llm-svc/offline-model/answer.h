/* answer — what the offline model says: a pure function from a chat
 * completion request to a reply (text or tool calls), so the HTTP part and
 * the "model" can be read and tested apart.
 *
 * This is NOT a language model. It is a deterministic stand-in, written so
 * that llm-svc and the services above it can be run and tested offline:
 * it echoes, calls tools on cue, answers from tool results and writes a
 * structured summary out of the words of a conversation. */
#ifndef CONVO_ANSWER_H
#define CONVO_ANSWER_H

#include <json-c/json.h>
#include <stddef.h>

#define ANSWER_MAX_CALLS 8

typedef enum answer_fault {
    FAULT_NONE,
    FAULT_429,
    FAULT_500,
    FAULT_401,
    FAULT_404,
    FAULT_SLOW,      /* the first byte comes late */
    FAULT_DROP,      /* the connection is dropped mid-stream */
    FAULT_MALFORMED, /* a chunk that is not JSON, mid-stream */
} answer_fault;

typedef struct answer_call {
    char *id, *name, *args; /* mem_* strings */
} answer_call;

typedef struct answer {
    char *text; /* the reply when ncalls == 0 (mem_*) */
    answer_call calls[ANSWER_MAX_CALLS];
    size_t ncalls;
    const char *finish_reason;
    unsigned prompt_tokens;
    /* From the request: [[delay:MS]] (-1: none given), [[fault:KIND]]. */
    int delay_ms;
    answer_fault fault;
    int fault_times; /* [[fault:KIND*N]]: only the first N requests alike (0: all) */
    char *fault_key; /* what makes two requests "alike" (the last user message) */
} answer;

/* Decides the reply to a parsed request body. Returns 0, or -1 with `err`
 * set for a request that is not a chat completion. */
int answer_make(json_object *req, answer *out, char *err, size_t errsize);
void answer_clear(answer *a);
/* Parses a fault name ("429", "500", "401", "404", "slow", "drop",
 * "malformed"); FAULT_NONE for anything else. */
answer_fault answer_fault_parse(const char *name);
/* Splits text into the model's tokens: words with their leading space.
 * Fills starts[] (when not NULL) with at most `max` offsets; returns the count. */
size_t answer_tokens(const char *text, size_t *starts, size_t max);

#endif
