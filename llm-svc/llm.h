/* llm — the convo.v1.Llm service: Chat (the streamed tool loop), Complete
 * and ListTools, over the upstream loop (upstream.h) and the tools
 * registry (tools.h).
 *
 * A Chat turn is a small state machine driven from three sides: the
 * upstream loop thread (body bytes, end of a request), the call's gRPC
 * thread (room to write again, cancellation) and the tools (results, maybe
 * from the gRPC client's threads). One mutex per turn orders them; nothing
 * blocks. */
#ifndef CONVO_LLM_H
#define CONVO_LLM_H

#include "conf.h"
#include "metrics.h"
#include "models.h"
#include "srv.h"
#include "tools.h"
#include "upstream.h"

#define LLM_OPTS(X, S)                                                                             \
    X(S, base_url, STR, "openai-base-url", "OPENAI_BASE_URL", "https://api.openai.com/v1",         \
      "the OpenAI-compatible endpoint (the offline model: http://127.0.0.1:8089/v1)")              \
    X(S, api_key, SECRET, "openai-api-key", "OPENAI_API_KEY", "",                                  \
      "sent as a Bearer token; \"\" sends none")                                                   \
    X(S, model, STR, "openai-model", "OPENAI_MODEL", "gpt-4o-mini",                                \
      "the model when the request's params name none")                                             \
    X(S, max_rounds, INT, "max-rounds", "LLM_MAX_ROUNDS", "5",                                     \
      "model rounds of one Chat turn; tool calls beyond it end the turn (max_rounds)")             \
    X(S, max_tool_calls, INT, "max-tool-calls", "LLM_MAX_TOOL_CALLS", "16",                        \
      "parallel tool calls accepted in one model round")                                           \
    X(S, max_tool_args_bytes, INT, "max-tool-args-bytes", "LLM_MAX_TOOL_ARGS_BYTES", "65536",      \
      "the arguments of one tool call, assembled")                                                 \
    X(S, max_sse_line_bytes, INT, "max-sse-line-bytes", "LLM_MAX_SSE_LINE_BYTES", "1048576",       \
      "one line of the upstream's event stream")                                                   \
    X(S, max_answer_bytes, INT, "max-answer-bytes", "LLM_MAX_ANSWER_BYTES", "4194304",             \
      "one non-streamed upstream answer (Complete), and a round's text kept for the next")         \
    X(S, max_message_bytes, INT, "max-chat-message-bytes", "LLM_MAX_CHAT_MESSAGE_BYTES", "65536",  \
      "the user message of a Chat request")                                                        \
    X(S, max_history_messages, INT, "max-history-messages", "LLM_MAX_HISTORY_MESSAGES", "500",     \
      "messages of history a Chat or Complete request may carry (the gateway sends "               \
      "--history-messages, 50 by default)")                                                        \
    X(S, max_history_bytes, INT, "max-history-bytes", "LLM_MAX_HISTORY_BYTES", "1048576",          \
      "bytes of history a request may carry: contents, tool names, ids and arguments")             \
    X(S, max_system_prompt_bytes, INT, "max-system-prompt-bytes", "LLM_MAX_SYSTEM_PROMPT_BYTES",   \
      "65536", "the system prompt of a request")                                                   \
    X(S, max_output_tokens, INT, "max-output-tokens", "LLM_MAX_OUTPUT_TOKENS", "16384",            \
      "the largest params.max_tokens a caller may ask for (0 there: the upstream's default)")      \
    X(S, allowed_models, STR, "allowed-models", "LLM_ALLOWED_MODELS", "",                          \
      "models a caller may name in params.model besides --openai-model and those named in "        \
      "--router-config, comma-separated; any other is refused")                                    \
    X(S, router_config, STR, "router-config", "ROUTER_CONFIG", "",                                 \
      "router-svc's router.conf: the models its strategies name are allowed")                      \
    X(S, max_pending_events, INT, "max-pending-events", "LLM_MAX_PENDING_EVENTS", "4096",          \
      "events of one call held while its gRPC write queue is full (the upstream is paused)")       \
    X(S, tool_timeout_ms, INT, "tool-timeout-ms", "LLM_TOOL_TIMEOUT_MS", "5000",                   \
      "deadline of a tool's calls to other services")
CONF_DECLARE(llm_opts, LLM_OPTS)

typedef struct llm llm;

/* The service over an upstream loop, a tools registry and the allowed
 * models (all borrowed; they must outlive it; the tools are all registered
 * already). Counts its turns, model requests, tokens and tool calls in mx
 * (NULL: nothing). */
llm *llm_create(const llm_opts *o, upstream *u, tools *t, const models *m, metrics *mx);
/* Registers Chat, Complete and ListTools on `s`. Returns 0 or RPC_EARG. */
int llm_register(srv *s, llm *l);
/* After the server stopped. Clears *l. */
void llm_destroy(llm **l);

#endif
