/* chat — the Chat method: one user turn streamed from the model, the tools
 * it asks for run round after round (turn.h is the shared core).
 *
 * A round is one streamed model request: tokens go out as they arrive
 * (held, capped, while the call's write queue is full, with the upstream
 * paused meanwhile); tool calls are assembled from their deltas and, when
 * the round ends, announced, run all at once and their results announced
 * and sent back to the model in the next round. The turn ends with one
 * DoneEvent or ErrorEvent.
 *
 * Threads and locks: as turn.h says. Everything in the chat's own state is
 * under t->mu; tools are started without it (a tool may answer on the
 * starting thread) and their answers take it. */
#ifndef CONVO_CHAT_H
#define CONVO_CHAT_H

#include "conf.h"
#include "metrics.h"
#include "srv.h"
#include "tools.h"
#include "turn.h"

#define CHAT_OPTS(X, S)                                                                            \
    X(S, max_rounds, INT_IN(1, CONF_NO_MAX), "max-rounds", "LLM_MAX_ROUNDS", "5",                  \
      "model rounds of one Chat turn; tool calls beyond it end the turn (max_rounds)")             \
    X(S, max_tool_calls, INT, "max-tool-calls", "LLM_MAX_TOOL_CALLS", "16",                        \
      "parallel tool calls accepted in one model round")                                           \
    X(S, max_tool_args_bytes, INT, "max-tool-args-bytes", "LLM_MAX_TOOL_ARGS_BYTES", "65536",      \
      "the arguments of one tool call, assembled")                                                 \
    X(S, max_sse_line_bytes, INT, "max-sse-line-bytes", "LLM_MAX_SSE_LINE_BYTES", "1048576",       \
      "one line of the upstream's event stream")                                                   \
    X(S, max_message_bytes, INT, "max-chat-message-bytes", "LLM_MAX_CHAT_MESSAGE_BYTES", "65536",  \
      "the user message of a Chat request")                                                        \
    X(S, max_pending_events, INT, "max-pending-events", "LLM_MAX_PENDING_EVENTS", "4096",          \
      "events of one call held while its gRPC write queue is full (the upstream is paused)")
CONF_DECLARE(chat_opts, CHAT_OPTS)

#define CHAT_METRICS(X, S)                                                                         \
    X(S, tool_calls, COUNTER_VEC, "convo_llm_tool_calls_total", "tool,outcome", NULL,              \
      "tool calls run, by tool (a registered name; unknown for any other) and outcome (ok, "       \
      "error)")                                                                                    \
    X(S, tool_seconds, HISTOGRAM_VEC, "convo_llm_tool_seconds", "tool", &metrics_buckets_seconds,  \
      "time from a tool call's start to its result")
METRICS_DECLARE(chat_metrics, CHAT_METRICS)

/* A tool's series (NULL members with metrics off). */
typedef struct chat_tool_series {
    const char *name;
    metrics_counter *ok, *error;
    metrics_histogram *seconds;
} chat_tool_series;

/* The Chat method's service-wide state: the method data of Chat (its env
 * first, as turn.h asks). Set up before serving; only read afterwards. */
typedef struct chat_svc {
    turn_env env;
    const chat_opts *o; /* borrowed */
    tools *tools;       /* borrowed */
    chat_metrics mx;
    chat_tool_series *tool_mx; /* one per registered tool, then "unknown" */
    size_t ntool_mx;
} chat_svc;

/* Sets up `svc` over options, an upstream loop, endpoints, the allowed
 * models and a tools registry (all borrowed; the tools are all registered
 * already). Counts turns, requests, tokens and tool calls in mx (NULL:
 * nothing). */
void chat_svc_init(chat_svc *svc, const turn_opts *to, const chat_opts *o, upstream *up,
                   endpoints *eps, const models *m, tools *t, metrics *mx);
/* After the server stopped. */
void chat_svc_destroy(chat_svc *svc);

/* The srv on_call of /convo.v1.Llm/Chat (method data: a chat_svc). */
void chat_on_call(srv_call *call, const ProtobufCMessage *msg);

#endif
