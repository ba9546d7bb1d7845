/* summarizer — a session's conversation rebuilt from its event log and
 * summarized by a language model, in chunks when it is long.
 *
 * Events are fed one at a time in seq order and never all held: user
 * messages, the assistant's replies reassembled from their ai_token events,
 * tool calls and tool results become the lines of a transcript; system
 * events are left out (routing decisions, connects and errors are not the
 * conversation). The transcript is cut into chunks of at most `budget`
 * bytes: between lines when a line fits in a chunk of its own, else inside
 * the line at a UTF-8 character boundary, marked on both sides of the cut,
 * so nothing is dropped or cut silently.
 *
 * A conversation that fits in one chunk takes one model call
 * (SUMM_STEP_WHOLE). A longer one: each chunk gets a partial summary as soon
 * as it fills (SUMM_STEP_PART); the partial summaries are collected the same
 * way, combined when they overflow a chunk themselves (SUMM_STEP_MERGE, a
 * tree of any depth), and one last call (SUMM_STEP_FINAL) writes the summary
 * of the whole. Memory stays within a few budgets per level, whatever the
 * length of the session.
 *
 * Not thread-safe: one summ per job, used by one thread. The model is called
 * through a callback (a blocking gRPC call in the service, a fake in the
 * tests). */
#ifndef SUMMARY_SUMMARIZER_H
#define SUMMARY_SUMMARIZER_H

#include "convo/v1/store.pb-c.h"

#include <stddef.h>
#include <stdint.h>

/* The smallest budget accepted: a chunk must hold a few labelled lines. */
#define SUMM_MIN_BUDGET 1024
/* Combining levels above the transcript; partial summaries are kept to a
 * third of the budget, so each level at least halves the count: 24 levels
 * is far beyond any session the store accepts. */
#define SUMM_MAX_LEVELS 24
/* Upper bound asked of the model for the final summary. */
#define SUMM_FINAL_MAX_TOKENS 1500

/* What is saved as the summary of a session with no conversation at all
 * (no message, reply or tool call): no model call is made for it. */
#define SUMM_EMPTY_TEXT                                                                            \
    "Overview: the session ended without any conversation (no user message, assistant reply "      \
    "or tool call was recorded).\nKey topics: none.\nNotable intent shifts or patterns: none.\n"   \
    "Insights or conclusions: none."

/* Errors (0 is success). */
#define SUMM_EEMPTY (-1) /* nothing to summarize: save SUMM_EMPTY_TEXT */
#define SUMM_ELLM   (-2) /* a model call failed; summ_error() says why */
#define SUMM_EDEPTH (-3) /* partial summaries did not shrink (a misbehaving model) */

const char *summ_strerror(int err);

typedef enum summ_step {
    SUMM_STEP_WHOLE, /* the whole conversation in one call: the summary */
    SUMM_STEP_PART,  /* one chunk of a long conversation: a partial summary */
    SUMM_STEP_MERGE, /* partial summaries of consecutive parts, combined */
    SUMM_STEP_FINAL, /* the summaries of every part: the summary */
} summ_step;

/* One model call. The strings are valid during the callback only. */
typedef struct summ_request {
    summ_step step;
    const char *system_prompt; /* the instructions */
    const char *text;          /* the material (NUL-terminated), at most the budget */
    size_t text_len;
    unsigned first_part, last_part; /* the transcript chunks (1-based) the material covers */
    uint32_t max_tokens;            /* the bound to ask of the model */
} summ_request;

/* Calls the model. Returns 0 with *out set to the answer (mem_ allocated,
 * taken over by the summarizer), or nonzero with *err set to the reason
 * (mem_ allocated, or NULL). */
typedef int (*summ_model_fn)(void *arg, const summ_request *req, char **out, char **err);

typedef struct summ_stats {
    uint64_t events;       /* fed to summ_add */
    uint64_t skipped;      /* system events and unknown types */
    uint64_t messages;     /* user messages */
    uint64_t replies;      /* assistant replies (runs of ai_token events) */
    uint64_t tool_calls;   /* tool_call events */
    uint64_t tool_results; /* tool_result events */
    uint64_t bytes;        /* transcript bytes written */
    unsigned chunks;       /* transcript chunks */
    unsigned calls;        /* model calls made */
    unsigned levels;       /* combining levels used (0: one call) */
} summ_stats;

typedef struct summ summ;

/* A summarizer whose chunks hold at most `budget` bytes of material (raised
 * to SUMM_MIN_BUDGET). `model` is called from summ_add and summ_finish on
 * the caller's thread. */
summ *summ_new(size_t budget, summ_model_fn model, void *arg);

/* Feeds the next event (content need not be NUL-terminated). May call the
 * model when a chunk fills. Returns 0, or the error that stopped the
 * summarizer (then every later call returns it too). */
int summ_add(summ *s, Convo__V1__EventType type, const char *content, size_t len);

/* Ends the transcript and makes the remaining model calls. Returns 0 with
 * *summary (mem_ allocated, the caller's), SUMM_EEMPTY when there was no
 * conversation (no call made), or an error. Call once. */
int summ_finish(summ *s, char **summary);

/* Why the summarizer stopped; "" when it did not. */
const char *summ_error(const summ *s);
const summ_stats *summ_get_stats(const summ *s);

/* Frees the summarizer; clears *s. */
void summ_free(summ **s);

#endif
