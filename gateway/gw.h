/* gw — what every part of the gateway shares: its options, the loop, the
 * bridge from gRPC threads, the channels to the four services, the tables
 * of its modules and the counters /api/health reports. One per process,
 * created by main.c and handed to every module (libwebsockets callbacks
 * find it as the context's user data); there is no global. */
#ifndef GW_GW_H
#define GW_GW_H

#include "auth.h"
#include "bridge.h"
#include "cli.h"
#include "conf.h"
#include "defroute.h"
#include "lim.h"
#include "metrics.h"
#include "otlp.h"

#include <stdatomic.h>
#include <stdint.h>

/* Seconds a pinged connection gets to answer before it is hung up. */
#define GW_PING_GRACE_SECS 10

/* The longest --ws-ping-secs: libwebsockets keeps the ping and hang-up
 * times (this plus the grace) in 16 bits. */
#define GW_PING_SECS_MAX (UINT16_MAX - GW_PING_GRACE_SECS)

#define GW_OPTS(X, S)                                                                              \
    X(S, listen, STR, "listen", "LISTEN_ADDR", "",                                                 \
      "HOST:PORT for HTTP and WebSocket; when empty, HOST (default 0.0.0.0) and PORT (default "    \
      "8000) from the environment, as in the seed")                                                \
    X(S, router, STR, "router", "ROUTER_ADDR", "127.0.0.1:50051",                                  \
      "router-svc: HOST:PORT, replicas IP:PORT,IP:PORT,... or dns:///NAME:PORT")                   \
    X(S, llm, STR, "llm", "LLM_ADDR", "127.0.0.1:50052", "llm-svc: the same forms")                \
    X(S, store, STR, "store", "STORE_ADDR", "127.0.0.1:50053", "store-svc: the same forms")        \
    X(S, summary, STR, "summary", "SUMMARY_ADDR", "127.0.0.1:50054",                               \
      "summary-svc: the same forms")                                                               \
    X(S, web_root, STR, "web-root", "WEB_ROOT", "",                                                \
      "folder of the web page served at /app/; empty: gateway/web of the source tree, or the "     \
      "installed copy")                                                                            \
    X(S, log_level, STR, "log-level", "LOG_LEVEL", "info", "debug, info, warn or error")           \
    X(S, max_connections, INT, "max-connections", "MAX_CONNECTIONS", "10000",                      \
      "WebSocket connections at once; more are closed with 1013 (try again later)")                \
    X(S, max_frame_bytes, INT, "max-frame-bytes", "MAX_FRAME_BYTES", "65536",                      \
      "largest WebSocket message a client may send; larger closes with 1009")                      \
    X(S, max_user_message_bytes, INT, "max-user-message-bytes", "MAX_USER_MESSAGE_BYTES", "16384", \
      "longest user message in bytes; longer gets an error frame (message_too_long)")              \
    X(S, max_queued_messages, INT, "max-queued-messages", "MAX_QUEUED_MESSAGES", "4",              \
      "messages queued while an answer streams; more get an error frame (queue_full)")             \
    X(S, max_out_bytes, INT, "max-out-buffer-bytes", "MAX_OUT_BUFFER_BYTES", "262144",             \
      "bytes waiting for a slow client before reading the answer stream pauses")                   \
    X(S, event_batch, INT_IN(1, CONF_NO_MAX), "event-batch", "EVENT_BATCH", "256",                 \
      "events per AppendEvents call to store-svc")                                                 \
    X(S, event_flush_ms, INT, "event-flush-ms", "EVENT_FLUSH_MS", "100",                           \
      "longest an event waits before its batch is sent")                                           \
    X(S, event_buffer, INT, "event-buffer", "EVENT_BUFFER", "100000",                              \
      "events per session waiting for store-svc (while it is down); beyond it events are "         \
      "dropped, counted and logged")                                                               \
    X(S, event_buffer_total_bytes, INT, "event-buffer-total-bytes", "EVENT_BUFFER_TOTAL_BYTES",    \
      "268435456",                                                                                 \
      "bytes of events (their text plus about 56 bytes each) waiting for store-svc in all "        \
      "sessions together; at it new messages are refused with an error frame (store_backlog) "     \
      "until half of it is stored, while answers under way go on (their events are kept); 0: no "  \
      "limit")                                                                                     \
    X(S, store_before_send, BOOL, "store-before-send", "STORE_BEFORE_SEND", "false",               \
      "show a client nothing store-svc has not stored: each frame waits until the events before "  \
      "it are stored (a gateway killed loses nothing it showed; costs a store round trip before "  \
      "the first token and slows every answer to the store's pace; while store-svc is down "       \
      "answers stall)")                                                                            \
    X(S, event_retry_ms, INT, "event-retry-ms", "EVENT_RETRY_MS", "600000",                        \
      "how long the events of a disconnected session are retried while store-svc is down "         \
      "before they are dropped (counted and logged)")                                              \
    X(S, session_lease_secs, INT, "session-lease-seconds", "SESSION_LEASE_SECONDS", "60",          \
      "how long store-svc keeps a session of this gateway open without word from it (renewed "     \
      "every third of it); a gateway that dies leaves its sessions to be ended and summarized "    \
      "this long after (0: never; they stay open until their client comes back)")                  \
    X(S, end_grace_ms, INT, "end-grace-ms", "END_GRACE_MS", "0",                                   \
      "after a disconnect, how long a session waits for a reconnect before it is ended and "       \
      "summarized")                                                                                \
    X(S, route_timeout_ms, INT, "route-timeout-ms", "ROUTE_TIMEOUT_MS", "3000",                    \
      "deadline of Router.Route; past it (or when Route fails) the turn is answered with the "     \
      "default route (--default-route-config, --default-route-strategy)")                          \
    X(S, chat_timeout_ms, INT, "chat-timeout-ms", "CHAT_TIMEOUT_MS", "300000",                     \
      "deadline of one whole answer (Llm.Chat)")                                                   \
    X(S, store_timeout_ms, INT, "store-timeout-ms", "STORE_TIMEOUT_MS", "10000",                   \
      "deadline of each store-svc call")                                                           \
    X(S, open_timeout_ms, INT, "open-timeout-ms", "OPEN_TIMEOUT_MS", "3000",                       \
      "how long a new connection waits for store-svc to confirm whose session it is; past it "     \
      "the connection is closed with 1013 (store_unavailable), never given the session on its "    \
      "word")                                                                                      \
    X(S, history_messages, INT, "history-messages", "HISTORY_MESSAGES", "50",                      \
      "messages of history sent to the model with each turn")                                      \
    X(S, resume_events, INT, "resume-events", "RESUME_EVENTS", "10000",                            \
      "events of a resumed session read back from store-svc to rebuild its history: the newest "   \
      "ones, from the first user message among them (older ones stay in the store: GET "           \
      "/api/sessions/{id}/events pages them); 0: all")                                             \
    X(S, ping_secs, INT_IN(0, GW_PING_SECS_MAX), "ws-ping-secs", "WS_PING_SECS", "30",             \
      "idle seconds before a WebSocket ping; a connection that does not answer is closed")         \
    X(S, allowed_origins, STR, "allowed-origins", "ALLOWED_ORIGINS", "",                           \
      "comma list of origins (scheme://host[:port], or null for pages opened from a file) "        \
      "whose pages may call the gateway besides its own; a handshake or request from another "     \
      "Origin gets 403, answers carry CORS headers for these only (never *)")                      \
    X(S, trusted_proxies, STR, "trusted-proxies", "TRUSTED_PROXIES", "",                           \
      "comma list of addresses or CIDR ranges of proxies in front of the gateway (an ingress); "   \
      "for them the client address is taken from X-Forwarded-For (per-address limits)")            \
    X(S, max_header_bytes, INT, "max-header-bytes", "MAX_HEADER_BYTES", "16384",                   \
      "request headers (URI included) a request may carry; more get 431; past twice this the "     \
      "connection is closed unanswered")
CONF_DECLARE(gw_opts, GW_OPTS)

/* The gateway's metrics (/metrics on --metrics-listen). Label values are
 * fixed words, never an id. Modules with limits of their own count their
 * refusals in rate_limited under a `limit` word of theirs. */
#define GW_METRICS(X, S)                                                                           \
    X(S, connections, GAUGE, "convo_gateway_connections", "", NULL, "WebSocket connections open")  \
    X(S, opened, COUNTER, "convo_gateway_connections_opened_total", "", NULL,                      \
      "WebSocket connections accepted (those refused at once included)")                           \
    X(S, refused, COUNTER_VEC, "convo_gateway_connections_refused_total", "reason", NULL,          \
      "WebSocket connections refused, by reason (the error code of the close: "                    \
      "too_many_connections, invalid_session_id, invalid_user_id, forbidden, ...)")                \
    X(S, sessions, GAUGE, "convo_gateway_sessions", "", NULL,                                      \
      "sessions in memory (connected, or storing their last events)")                              \
    X(S, turns, COUNTER_VEC, "convo_gateway_turns_total", "strategy,outcome", NULL,                \
      "turns ended, by the strategy they were answered with (router-svc's, or the default "        \
      "route's; none when no answer was started) and outcome (done, error, cancelled)")            \
    X(S, turns_degraded, COUNTER_VEC, "convo_gateway_turns_degraded_total", "reason", NULL,        \
      "turns answered with the default route because router-svc did not route them: "              \
      "unavailable, timeout (--route-timeout-ms), error (another status), outage (not asked: "     \
      "router-svc is down and another turn probes it)")                                            \
    X(S, turn_errors, COUNTER_VEC, "convo_gateway_turn_errors_total", "code", NULL,                \
      "turns that ended with an error frame, by its code (llm_unavailable, router_unavailable, "   \
      "rate_limited, upstream_timeout, ...)")                                                      \
    X(S, first_token, HISTOGRAM_VEC, "convo_gateway_first_token_seconds", "strategy",              \
      &metrics_buckets_seconds,                                                                    \
      "time from the start of a turn (its message taken) to its first token sent to the client")   \
    X(S, turn_seconds, HISTOGRAM_VEC, "convo_gateway_turn_seconds", "strategy",                    \
      &metrics_buckets_seconds, "time from the start of a turn to its end")                        \
    X(S, tokens, COUNTER, "convo_gateway_tokens_relayed_total", "", NULL,                          \
      "answer tokens relayed to clients")                                                          \
    X(S, frames_queued, GAUGE, "convo_gateway_frames_queued", "", NULL,                            \
      "frames waiting to be written to clients")                                                   \
    X(S, pauses, COUNTER, "convo_gateway_backpressure_pauses_total", "", NULL,                     \
      "answer streams paused because the client had --max-out-buffer-bytes waiting")               \
    X(S, events_buffered, GAUGE, "convo_gateway_events_buffered", "", NULL,                        \
      "events waiting to be stored by store-svc")                                                  \
    X(S, events_buffered_bytes, GAUGE, "convo_gateway_events_buffered_bytes", "", NULL,            \
      "bytes those events hold, as --event-buffer-total-bytes counts them")                        \
    X(S, events_stored, COUNTER, "convo_gateway_events_stored_total", "", NULL,                    \
      "events store-svc acknowledged as written")                                                  \
    X(S, events_dropped, COUNTER_VEC, "convo_gateway_events_dropped_total", "reason", NULL,        \
      "events that will never be stored, by reason (buffer_full, refused, store_unreachable, "     \
      "shutdown, taken_over, conflict)")                                                           \
    X(S, sessions_taken_over, COUNTER, "convo_gateway_sessions_taken_over_total", "", NULL,        \
      "sessions this gateway stopped writing because their client resumed them on another "        \
      "gateway (store-svc refused its writer epoch); their connection is closed with 4409")        \
    X(S, store_batch_seconds, HISTOGRAM, "convo_gateway_store_batch_seconds", "",                  \
      &metrics_buckets_seconds, "time of one AppendEvents call, from sent to answered")            \
    X(S, store_batch_events, HISTOGRAM, "convo_gateway_store_batch_events", "",                    \
      &metrics_buckets_count, "events per AppendEvents call")                                      \
    X(S, rate_limited, COUNTER_VEC, "convo_gateway_rate_limited_total", "limit", NULL,             \
      "frames, connections, sessions or requests refused by a limit, by limit "                    \
      "(messages_per_minute, connections_per_ip, tokens_per_minute, queued_messages, ...)")
METRICS_DECLARE(gw_metrics, GW_METRICS)

struct ev_loop;
struct lws_context;
struct caller_rules;
struct sess_table;
struct ws_server;
typedef struct keep keep;

typedef struct gw_counters {
    atomic_long connections;           /* open WebSocket connections */
    atomic_long turns;                 /* turns started */
    atomic_long turn_errors;           /* turns that ended with an error frame */
    atomic_long events_logged;         /* events stored by store-svc */
    atomic_long events_dropped;        /* events dropped past --event-buffer or refused */
    atomic_long events_buffered;       /* events waiting for store-svc now */
    atomic_long events_buffered_bytes; /* and their bytes (--event-buffer-total-bytes) */
    atomic_long refused;               /* connections refused (limit, bad id, owner) */
    atomic_long unauthorized;          /* handshakes and requests refused with 401 or 403 */
} gw_counters;

typedef struct gw {
    gw_opts opts;
    cli_conf client_opts;
    auth_opts auth_opts;
    lim_opts lim_opts;
    defroute_opts defroute_opts;
    auth *auth;                   /* who is calling (auth.h) */
    lim *limits;                  /* what each address and user may use (lim.h) */
    defroute *defroute;           /* the route when router-svc cannot (defroute.h) */
    struct caller_rules *callers; /* origins and proxies (caller.h) */
    struct lws_context *ctx;
    /* The loop (libev's, lent to libwebsockets). The gateway's own timers
     * are libev timers: libwebsockets 4.1's timer list on libev re-arms its
     * one libev timer only when that expires, so an earlier deadline added
     * meanwhile fires late. */
    struct ev_loop *loop;
    bridge *bridge;
    cli *client;
    cli_channel *router;
    cli_channel *llm;
    cli_channel *store;
    cli_channel *summary;
    struct ws_server *ws;        /* WebSocket connections (ws.h) */
    struct sess_table *sessions; /* sessions in memory (session.h) */
    keep *keep;                  /* keeps them open in store-svc (keep.h); NULL: no lease */
    gw_counters counters;
    /* --event-buffer-total-bytes reached: no new message is taken (evlog.h;
     * loop thread). */
    int events_full;
    metrics *metrics; /* NULL: metrics off (--metrics-listen off) */
    gw_metrics mx;    /* every member NULL when off */
    otlp *tracer;     /* NULL: spans keep their ids, nothing is recorded (trace.h) */
    atomic_int stopping;
} gw;

/* Counts one refused connection, by its close's error code. */
static inline void gw_count_refused(gw *g, const char *reason)
{
    atomic_fetch_add(&g->counters.refused, 1);
    metrics_counter_inc(metrics_counter_of(g->mx.refused, (const char *[]){reason}));
}

/* Counts one message or connection refused by limit `limit`. */
static inline void gw_count_limited(gw *g, const char *limit)
{
    metrics_counter_inc(metrics_counter_of(g->mx.rate_limited, (const char *[]){limit}));
}

#endif
