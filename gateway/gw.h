/* gw — what every part of the gateway shares: its options, the loop, the
 * bridge from gRPC threads, the channels to the four services, the tables
 * of its modules and the counters /api/health reports. One per process,
 * created by main.c and handed to every module (libwebsockets callbacks
 * find it as the context's user data); there is no global. */
#ifndef GW_GW_H
#define GW_GW_H

#include "bridge.h"
#include "cli.h"
#include "conf.h"

#include <stdatomic.h>

#define GW_OPTS(X, S)                                                                              \
    X(S, listen, STR, "listen", "LISTEN_ADDR", "",                                                 \
      "HOST:PORT for HTTP and WebSocket; when empty, HOST (default 0.0.0.0) and PORT (default "    \
      "8000) from the environment, as in the seed")                                                \
    X(S, router, STR, "router", "ROUTER_ADDR", "127.0.0.1:50051", "router-svc address")            \
    X(S, llm, STR, "llm", "LLM_ADDR", "127.0.0.1:50052", "llm-svc address")                        \
    X(S, store, STR, "store", "STORE_ADDR", "127.0.0.1:50053", "store-svc address")                \
    X(S, summary, STR, "summary", "SUMMARY_ADDR", "127.0.0.1:50054", "summary-svc address")        \
    X(S, web_root, STR, "web-root", "WEB_ROOT", "",                                                \
      "folder of the web page served at /app/; empty: gateway/web of the source tree, or the "     \
      "installed copy")                                                                            \
    X(S, log_level, STR, "log-level", "LOG_LEVEL", "info", "debug, info, warn or error")           \
    X(S, grpc_threads, INT, "grpc-threads", "GRPC_THREADS", "1",                                   \
      "gRPC client completion-queue threads")                                                      \
    X(S, max_connections, INT, "max-connections", "MAX_CONNECTIONS", "10000",                      \
      "WebSocket connections at once; more are closed with 1013 (try again later)")                \
    X(S, max_frame_bytes, INT, "max-frame-bytes", "MAX_FRAME_BYTES", "65536",                      \
      "largest WebSocket message a client may send; larger closes with 1009")                      \
    X(S, max_message_bytes, INT, "max-message-bytes", "MAX_MESSAGE_BYTES", "16384",                \
      "longest user message; longer gets an error frame")                                          \
    X(S, max_queued_messages, INT, "max-queued-messages", "MAX_QUEUED_MESSAGES", "4",              \
      "messages queued while an answer streams; more get an error frame (queue_full)")             \
    X(S, rate_per_minute, INT, "rate-limit", "RATE_LIMIT_PER_MINUTE", "120",                       \
      "messages a connection may send per minute (bursts of up to 20); more get an error frame "   \
      "(rate_limited)")                                                                            \
    X(S, max_out_bytes, INT, "max-out-buffer-bytes", "MAX_OUT_BUFFER_BYTES", "262144",             \
      "bytes waiting for a slow client before reading the answer stream pauses")                   \
    X(S, event_batch, INT, "event-batch", "EVENT_BATCH", "256",                                    \
      "events per AppendEvents call to store-svc")                                                 \
    X(S, event_flush_ms, INT, "event-flush-ms", "EVENT_FLUSH_MS", "100",                           \
      "longest an event waits before its batch is sent")                                           \
    X(S, event_buffer, INT, "event-buffer", "EVENT_BUFFER", "100000",                              \
      "events per session waiting for store-svc (while it is down); beyond it events are "         \
      "dropped, counted and logged")                                                               \
    X(S, event_retry_ms, INT, "event-retry-ms", "EVENT_RETRY_MS", "600000",                        \
      "how long the events of a disconnected session are retried while store-svc is down "         \
      "before they are dropped (counted and logged)")                                              \
    X(S, end_grace_ms, INT, "end-grace-ms", "END_GRACE_MS", "0",                                   \
      "after a disconnect, how long a session waits for a reconnect before it is ended and "       \
      "summarized")                                                                                \
    X(S, route_timeout_ms, INT, "route-timeout-ms", "ROUTE_TIMEOUT_MS", "3000",                    \
      "deadline of Router.Route")                                                                  \
    X(S, chat_timeout_ms, INT, "chat-timeout-ms", "CHAT_TIMEOUT_MS", "300000",                     \
      "deadline of one whole answer (Llm.Chat)")                                                   \
    X(S, store_timeout_ms, INT, "store-timeout-ms", "STORE_TIMEOUT_MS", "10000",                   \
      "deadline of each store-svc call")                                                           \
    X(S, history_messages, INT, "history-messages", "HISTORY_MESSAGES", "50",                      \
      "messages of history sent to the model with each turn")                                      \
    X(S, ping_secs, INT, "ws-ping-secs", "WS_PING_SECS", "30",                                     \
      "idle seconds before a WebSocket ping; a connection that does not answer is closed")
CONF_DECLARE(gw_opts, GW_OPTS)

struct lws_context;
struct sess_table;
struct ws_server;

typedef struct gw_counters {
    atomic_long connections;     /* open WebSocket connections */
    atomic_long turns;           /* turns started */
    atomic_long turn_errors;     /* turns that ended with an error frame */
    atomic_long events_logged;   /* events stored by store-svc */
    atomic_long events_dropped;  /* events dropped past --event-buffer or refused */
    atomic_long events_buffered; /* events waiting for store-svc now */
    atomic_long refused;         /* connections refused (limit, bad id, owner) */
} gw_counters;

typedef struct gw {
    gw_opts opts;
    cli_conf client_opts;
    struct lws_context *ctx;
    bridge *bridge;
    cli *client;
    cli_channel *router;
    cli_channel *llm;
    cli_channel *store;
    cli_channel *summary;
    struct ws_server *ws;        /* WebSocket connections (ws.h) */
    struct sess_table *sessions; /* sessions in memory (session.h) */
    gw_counters counters;
    int stopping;
} gw;

#endif
