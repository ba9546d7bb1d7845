/* turn — what Chat and Complete share: one gRPC call answered by requests
 * to the model endpoints (endpoints.h) over the upstream loop (upstream.h).
 * The split follows curl's protocol handlers: this core owns the call (its
 * binding, cancellation, the one finish), the reference count, the request
 * body and the bounds on what a caller asks, the upstream request in
 * flight, the choice of endpoint, and the counts of calls and requests
 * (TURN_METRICS); a method (chat.c, complete.c) embeds a turn first in its own state and
 * gives a turn_method saying what the upstream's bytes mean and what a
 * finished request leads to.
 *
 * Fallbacks. Each request goes to the first endpoint whose circuit admits
 * it. When it fails for the endpoint's sake (endpoints_report) and nothing
 * of it reached the caller yet (the method sets t->shown when it sends
 * something of the request on), the core rewinds the method's request
 * state and sends the same body to the next endpoint that admits it; the
 * method's on_done sees only the request that counted. Once something was
 * shown, a failure is final: nothing is said twice.
 *
 * Threads. A turn is reached from the call's gRPC thread (the request, room
 * to write, cancellation), the upstream loop thread (body bytes, the end of
 * a request) and, for Chat, the threads tools answer on.
 *
 * Locks.
 * - t->mu guards the fields marked "under mu" here and the method's own
 *   mutable state. It is held across srv_call_send/finish and
 *   upstream_start/cancel/resume (they only queue work and never call back
 *   on the calling thread) and the endpoints' admission and reports (their
 *   breaker and health locks take nothing of ours); it is never held across
 *   tools_call nor while the core calls an on_* hook: those take it
 *   themselves (rewind alone runs under it).
 * - env->calls_mu guards the call's data pointer (srv_call_data): a gRPC
 *   callback reads it and takes a reference under it, and turn_finish
 *   clears it under it before the call's reference goes, so a callback
 *   racing with a finish on another thread never reaches a freed turn.
 *   When both are held, t->mu is taken first; nothing is taken inside it.
 * - Fields marked "fixed" are set before the turn is shared and only read
 *   afterwards, from any thread, without a lock.
 *
 * References: the call's (dropped by turn_finish), the starter's (from
 * turn_init until the method drops it after its first request started),
 * one per upstream request in flight (until its on_done returned) and one
 * per running tool. The last one frees the turn: method->free, then the
 * core's part. */
#ifndef CONVO_TURN_H
#define CONVO_TURN_H

#include "conf.h"
#include "endpoints.h"
#include "metrics.h"
#include "models.h"
#include "rpc.h"
#include "srv.h"
#include "upstream.h"

#include "convo/v1/llm.pb-c.h"

#include <json-c/json.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define TURN_OPTS(X, S)                                                                            \
    X(S, max_answer_bytes, INT, "max-answer-bytes", "LLM_MAX_ANSWER_BYTES", "4194304",             \
      "one non-streamed upstream answer (Complete), and a round's text kept for the next")         \
    X(S, max_history_messages, INT, "max-history-messages", "LLM_MAX_HISTORY_MESSAGES", "500",     \
      "messages of history a Chat or Complete request may carry (the gateway sends "               \
      "--history-messages, 50 by default)")                                                        \
    X(S, max_history_bytes, INT, "max-history-bytes", "LLM_MAX_HISTORY_BYTES", "1048576",          \
      "bytes of history a request may carry: contents, tool names, ids and arguments")             \
    X(S, max_system_prompt_bytes, INT, "max-system-prompt-bytes", "LLM_MAX_SYSTEM_PROMPT_BYTES",   \
      "65536", "the system prompt of a request")                                                   \
    X(S, max_output_tokens, INT, "max-output-tokens", "LLM_MAX_OUTPUT_TOKENS", "16384",            \
      "the largest params.max_tokens a caller may ask for (0 there: the upstream's default)")
CONF_DECLARE(turn_opts, TURN_OPTS)

#define TURN_METRICS(X, S)                                                                         \
    X(S, turns, COUNTER_VEC, "convo_llm_turns_total", "kind,outcome", NULL,                        \
      "Chat and Complete calls ended, by kind (chat, complete) and outcome (done, error, "         \
      "cancelled)")                                                                                \
    X(S, requests, COUNTER_VEC, "convo_llm_upstream_requests_total", "outcome,category", NULL,     \
      "model requests ended, by outcome (ok, http_error, connect_error, timeout, dropped, "        \
      "stopped, cancelled) and the error category the caller was told (none when it succeeded)")   \
    X(S, tokens, COUNTER_VEC, "convo_llm_usage_tokens_total", "kind", NULL,                        \
      "tokens the model reported using, by kind (prompt, completion)")
METRICS_DECLARE(turn_metrics, TURN_METRICS)

/* How a call ended, for convo_llm_turns_total. */
typedef enum turn_outcome {
    TURN_OUTCOME_UNSET, /* told by the gRPC code it finishes with */
    TURN_OUTCOME_DONE,
    TURN_OUTCOME_ERROR,
    TURN_OUTCOME_CANCELLED,
    TURN_OUTCOMES
} turn_outcome;

/* What every turn of one method reads: set up before serving, then only
 * read (calls_mu aside). The method's data given to srv_add_method is its
 * turn_env, or a struct that begins with one (the call's callbacks find
 * calls_mu there). */
typedef struct turn_env {
    upstream *up;         /* borrowed */
    endpoints *eps;       /* borrowed */
    const models *models; /* borrowed: what params.model may name */
    const turn_opts *o;   /* borrowed */
    pthread_mutex_t calls_mu;
    /* The method's series (NULL with metrics off). */
    turn_metrics mx;
    metrics_counter *turns[TURN_OUTCOMES]; /* by outcome, for this method's kind */
    metrics_counter *prompt_tokens, *completion_tokens;
} turn_env;

/* Fills `e` over an upstream loop, endpoints, the allowed models and
 * options that outlive it, for the method `kind` ("chat": its label in
 * the metrics). Counts its calls, requests and tokens in mx (NULL:
 * nothing); the methods' envs share the families. */
void turn_env_init(turn_env *e, const char *kind, const turn_opts *o, upstream *up, endpoints *eps,
                   const models *m, metrics *mx);
void turn_env_destroy(turn_env *e);

typedef struct turn turn;

/* A method's part. The on_* hooks are called without t->mu and take it
 * themselves; they must check turn_live: the call may have ended
 * meanwhile. */
typedef struct turn_method {
    const char *name; /* "Chat", for logs */
    int stream;       /* whether requests ask for an event stream */
    /* Upstream body bytes (loop thread); returns as upstream_cbs.on_data. */
    int (*on_data)(turn *t, const char *buf, size_t len);
    /* The request ended (loop thread); t->req is already NULL. */
    void (*on_done)(turn *t, const upstream_done_info *info);
    /* Room to write again (the call's thread); NULL for unary methods. */
    void (*on_writable)(turn *t);
    /* Forgets what the failed request left (parsers, partial text) before
     * the same request goes to a fallback (loop thread, t->mu held). */
    void (*rewind)(turn *t);
    /* Frees the method's state, when the last reference goes (no lock). */
    void (*free)(turn *t);
} turn_method;

struct turn {
    const turn_method *m;                  /* fixed */
    turn_env *env;                         /* fixed */
    char *session_id, *request_id, *model; /* fixed */
    int64_t deadline_ms;                   /* fixed; rpc_now_ms() clock, 0: none */
    pthread_mutex_t mu;
    atomic_int refs;
    /* Under mu from here on. */
    srv_call *call;        /* NULL once finished */
    json_object *body;     /* the request body; "messages" grow round by round */
    json_object *messages; /* the body's "messages" array */
    upstream_req *req;     /* the request in flight, or NULL */
    int cancelled;         /* the caller went away */
    size_t ep;             /* the endpoint of the request in flight or last made */
    breaker_ticket ticket; /* its circuit's admission */
    int shown;             /* something of that request reached the caller */
    /* A failure the method found in that request's answer (bad data, a
     * cap) and stopped it for: told instead of the request's own end, and
     * counted with its category. Cleared when a request starts. */
    Convo__V1__ErrorCategory bad_cat;
    char *bad_msg;
    turn_outcome outcome; /* set by the method when it tells the end itself */
    /* The parent of the upstream requests' spans: the method's own span
     * (a Chat round's), or NULL for the call's server span. */
    const trace_span *trace_parent;
};

/* Sets up `t` (calloc'd by the method, which then fills its own part) for
 * `call`: the body with temperature and max_tokens, the model wanted
 * (params' or --openai-model). Two references: the call's and the
 * starter's. */
void turn_init(turn *t, const turn_method *m, turn_env *env, srv_call *call, const char *session_id,
               const Convo__V1__GenerationParams *p);
/* Before turn_bind: finishes the call with `code` and `msg` and frees the
 * turn (both references). */
void turn_refuse(turn *t, rpc_code code, const char *msg);
/* Attaches the turn to its call: cancellation, and room to write for
 * streamed methods. On the call's thread, before the first request. */
void turn_bind(turn *t);

void turn_ref(turn *t);
/* Drops a reference; the last one frees the turn. Never with t->mu held
 * (it may be the last). */
void turn_unref(turn *t);

/* Records why the method stopped the request in flight; the first reason
 * stays (t->mu held). */
void turn_set_bad(turn *t, Convo__V1__ErrorCategory cat, const char *msg);
/* Counts the tokens a request's usage reported. Any thread. */
void turn_count_usage(const turn *t, uint32_t prompt, uint32_t completion);

/* Whether the call is still there to answer (t->mu held). */
int turn_live(const turn *t);
/* Finishes the call once (t->mu held); later calls do nothing. Drops the
 * call's reference, never the last: the caller holds one. Counts the call
 * by t->outcome, or when unset by `code`. */
void turn_finish(turn *t, rpc_code code, const char *msg, const ProtobufCMessage *resp);
/* How a failed request is told: ErrorEvent category and retryable for
 * Chat, the gRPC code for Complete, and a message for both. */
typedef struct turn_failure {
    Convo__V1__ErrorCategory category;
    int retryable;
    rpc_code code;
    char message[512];
} turn_failure;

/* Starts an upstream request with the body as it stands, at the first
 * endpoint that admits it (t->mu held). Returns 0 (the method's on_data
 * and on_done follow), or -1 with *f filled (no hook then): every circuit
 * open, too many requests in flight, or shutting down. */
int turn_request(turn *t, turn_failure *f);
/* The endpoint's name and the model it was asked for, of the request in
 * flight or last made (t->mu held). */
const char *turn_upstream(const turn *t);
const char *turn_model_asked(const turn *t);

/* Request building. */
int turn_check_utf8(const char *s, const char *what, char *err, size_t errsize);
/* What a caller may ask, checked before a turn is made (so before anything
 * goes upstream): the system prompt's size, the `n` messages of history
 * (called `what` in the message) by count and bytes, and params' model
 * (allowed: env->models), max_tokens and temperature. Returns 0, or -1
 * with a reason naming the bound's flag in `err` (INVALID_ARGUMENT). */
int turn_check_bounds(const turn_env *env, const char *system_prompt, Convo__V1__Message **hist,
                      size_t n, const char *what, const Convo__V1__GenerationParams *p, char *err,
                      size_t errsize);
void turn_add_message(turn *t, const char *role, const char *content);
/* Appends history messages; -1 with a reason in `err` when one is not
 * UTF-8 (the body is then half built: refuse the turn). */
int turn_add_history(turn *t, Convo__V1__Message **hist, size_t n, char *err, size_t errsize);

/* The failure an ended request tells. */
void turn_failure_of(const upstream_done_info *info, turn_failure *f);

/* A text that grows by doubling up to a cap (an answer arrives a token at
 * a time). */
typedef struct turn_text {
    char *s; /* NUL-terminated; NULL while empty */
    size_t len, cap;
} turn_text;
/* Returns 0, or -1 (nothing appended) when `max` bytes would be passed. */
int turn_text_append(turn_text *b, const char *s, size_t n, size_t max);
void turn_text_clear(turn_text *b);

#endif
