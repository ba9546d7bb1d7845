/* srv — a gRPC server over the gRPC C core's completion queues.
 *
 * Methods are registered with their rpc_method (convo_methods.h: the path
 * "/convo.v1.Router/Route", the kind and the protobuf-c descriptors of the
 * request and response, generated from the .proto files). Each completion-queue thread
 * owns its own queue, so all callbacks of one call run on one thread, one at
 * a time. Callbacks must not block: a handler that needs slow work (a
 * database, another service) hands the call to its own machinery and
 * finishes it later from any thread.
 *
 * Life of a call: the method's on_call fires once; the handler then sends
 * messages (streaming) and finishes the call exactly once with
 * srv_call_finish(), even after a cancellation. The runtime frees the call
 * when it is finished, its status is sent and the client is gone. A handler
 * that keeps the call beyond finish must not touch it afterwards.
 *
 * A module that follows the server's life (health.h, which serves
 * grpc.health.v1.Health on it) attaches through srv_hooks: the server
 * knows nothing of it. */
#ifndef CONVO_SRV_H
#define CONVO_SRV_H

#include "conf.h"
#include "metrics.h"
#include "rpc.h"
#include "tls.h"
#include "trace.h"

#include <protobuf-c/protobuf-c.h>
#include <stddef.h>
#include <stdint.h>

/* The server's options; every service binary parses them. */
#define SRV_OPTS(X, S)                                                                             \
    X(S, threads, INT_IN(1, CONF_NO_MAX), "grpc-threads", "GRPC_THREADS", "1",                     \
      "completion-queue threads of the gRPC server (a client's are --client-threads); one hands "  \
      "no call from thread to thread (the lowest latency); raise it when it keeps a core busy")    \
    X(S, shutdown_grace_ms, INT, "shutdown-grace-ms", "SHUTDOWN_GRACE_MS", "10000",                \
      "on SIGTERM/SIGINT, how long in-flight calls may run before they are cancelled")             \
    X(S, drain_delay_ms, INT, "drain-delay-ms", "DRAIN_DELAY_MS", "0",                             \
      "on SIGTERM/SIGINT, how long health reports NOT_SERVING while calls are still taken, so "    \
      "load balancers stop routing here first")                                                    \
    X(S, max_message_bytes, INT, "max-message-bytes", "GRPC_MAX_MESSAGE_BYTES", "4194304",         \
      "largest gRPC message received or sent")                                                     \
    X(S, max_queued_writes, INT_IN(1, CONF_NO_MAX), "max-queued-writes", "GRPC_MAX_QUEUED_WRITES", \
      "256",                                                                                       \
      "streamed messages queued per call behind the one being written; beyond it senders wait")    \
    X(S, max_calls, INT, "max-calls", "GRPC_MAX_CALLS", "10000",                                   \
      "calls handled at once; more are refused with RESOURCE_EXHAUSTED")                           \
    X(S, max_connection_age_ms, INT, "max-connection-age-ms", "GRPC_MAX_CONNECTION_AGE_MS",        \
      "300000",                                                                                    \
      "close client connections after this long (calls in flight finish first), so clients "       \
      "re-resolve and spread over new replicas; 0: never")                                         \
    X(S, health_listen, STR, "health-listen", "HEALTH_LISTEN", "",                                 \
      "HOST:PORT answering grpc.health.v1 without TLS, for probes that cannot present a "          \
      "certificate (Kubernetes' gRPC probes); under mutual TLS nothing else is answered there; "   \
      "\"\": none")
CONF_DECLARE(srv_opts, SRV_OPTS)

typedef struct srv srv;
typedef struct srv_call srv_call;

typedef struct srv_method {
    /* The method (convo_methods.h): its path, kind and messages. Unary,
     * server-streaming and client-streaming methods are served. */
    const rpc_method *method;
    /* The call arrived. For unary and server-streaming methods `req` is the
     * decoded request (a request that does not decode is refused with
     * INVALID_ARGUMENT before this); for client streaming it is NULL. `req`
     * is freed when on_call returns: copy what you keep. */
    void (*on_call)(srv_call *call, const ProtobufCMessage *req);
    /* Client streaming only: the next request message (freed on return). */
    void (*on_message)(srv_call *call, const ProtobufCMessage *msg);
    /* Client streaming only: the client sent its last message. */
    void (*on_end)(srv_call *call);
    /* Who may call it when the server runs mutual TLS (srv_use_tls): caller
     * names (tls.h) separated by spaces, "gateway admin", or "*" for any
     * caller with a certificate of the CA. Required: a method without it is
     * refused at registration, so none is open by omission. Others get
     * PERMISSION_DENIED, counted and logged with their name. */
    const char *callers;
    /* Answered without a client certificate too: on the --health-listen
     * port under mutual TLS (health checks). Any other method answers a
     * caller without a certificate UNAUTHENTICATED. */
    int without_certificate;
    /* Traced only under a caller's traceparent: a probe (a health check)
     * every few seconds would otherwise be a trace of its own each time. */
    int trace_only_with_parent;
} srv_method;

/* What a module attached to a server hears of its life (health.h). Any
 * hook may be NULL; each runs on the thread of the call that causes it. */
typedef struct srv_hooks {
    /* srv_add_method registered a method of `service` ("convo.v1.Router"
     * for "/convo.v1.Router/Route"); once per method. */
    void (*on_service)(void *arg, const char *service);
    /* srv_start bound its ports and serves. */
    void (*on_start)(void *arg);
    /* Shutdown began (a signal, srv_stop, srv_destroy): before the drain
     * delay, while calls are still taken. */
    void (*on_draining)(void *arg);
    /* The drain delay is over: no new calls will be taken; streams that
     * would never end by themselves must be finished now. */
    void (*on_stopping)(void *arg);
    /* srv_destroy: the server and its calls are gone; arg may be freed. */
    void (*on_destroy)(void *arg);
} srv_hooks;

/* Creates a server that will listen on `listen` ("HOST:PORT"; port 0 picks
 * a free one). `name` is used in logs. `opts` is in the ranges of its
 * table (conf_parse checks them). Nothing is bound until srv_start. */
srv *srv_create(const char *name, const char *listen, const srv_opts *opts);
/* Registers a method before srv_start; `data` is given back by
 * srv_call_method_data(). Returns 0 or RPC_EARG (logged: no method, a
 * bidirectional one, a missing handler, a bad `callers` list). */
int srv_add_method(srv *s, const srv_method *m, void *data);
/* Attaches `hooks` (one set per server) with `arg`, before any method the
 * module must hear of is registered; both live until on_destroy. Returns
 * 0, or RPC_EARG when a set is attached already or the server started. */
int srv_set_hooks(srv *s, const srv_hooks *hooks, void *arg);
/* Serves mutual TLS with t's certificates instead of plaintext, and lets
 * each method be called by its `callers` only; a call without a client
 * certificate (only the --health-listen port takes one) reaches the
 * methods marked without_certificate only (UNAUTHENTICATED otherwise).
 * Before srv_start; t (may be NULL: plaintext) must outlive the server. */
void srv_use_tls(srv *s, tls *t);
/* Binds (the listen address, and --health-listen when set), starts the
 * completion-queue threads, then calls on_start. Returns 0 or RPC_EBIND
 * (logged with the address). */
int srv_start(srv *s);
/* Counts every call into m (convo_grpc_server_*: by method and status
 * code, durations, calls in flight, streamed messages). Call before
 * srv_start; m (NULL: nothing counted) must outlive the server. */
void srv_set_metrics(srv *s, metrics *m);
/* Records a server span per call into e (see srv_call_span). Call before
 * srv_start; e (NULL: spans keep their ids, nothing is recorded) must
 * outlive the server. */
void srv_set_tracer(srv *s, otlp *e);
/* The port actually bound (useful with port 0); 0 before srv_start. */
int srv_port(const srv *s);
/* Blocks until SIGTERM or SIGINT arrives (or srv_stop is called), then shuts
 * down gracefully: on_draining (health goes NOT_SERVING), after
 * drain_delay_ms on_stopping and no new calls are taken, in-flight calls
 * get shutdown_grace_ms to finish, the rest are cancelled. Call from the
 * main thread after srv_start; the signals are blocked in every thread the
 * runtime starts. */
void srv_run(srv *s);
/* Makes srv_run return (through the same graceful shutdown). Thread-safe. */
void srv_stop(srv *s);
/* Frees a server whose srv_run has returned (or that was never started),
 * then calls on_destroy; clears *s. */
void srv_destroy(srv **s);
/* Blocks SIGTERM/SIGINT/SIGPIPE in the calling thread (and so in threads it
 * creates afterwards). Call first thing in main(), before any thread. */
void srv_block_signals(void);

/* Sends one message of a server stream (serialized before this returns).
 * Thread-safe. The first send also sends the response headers. Returns 0, RPC_EFULL when
 * max_queued_writes messages already wait (nothing queued: wait for on_writable), RPC_EDONE when
 * the call is finished or cancelled, RPC_EARG when msg is not the method's response type, or
 * RPC_EENCODE. */
int srv_call_send(srv_call *call, const ProtobufCMessage *msg);
/* Called on the call's thread when a sender that got RPC_EFULL may send
 * again (the queue drained to half). */
void srv_call_on_writable(srv_call *call, void (*fn)(srv_call *call));
/* Called once on the call's thread when the client cancels, the deadline
 * passes or the server shuts down before the handler finished. The handler
 * still finishes the call (its status is then not sent). */
void srv_call_on_cancel(srv_call *call, void (*fn)(srv_call *call));
/* Ends the call: `resp` is the unary/client-streaming response (NULL on
 * error or for streams), sent after any queued stream messages, then the
 * status (INTERNAL, logged, when resp is not the method's response type). `resp` is serialized
 * before this returns and `message` (a human-readable reason; may be NULL) is copied, so both may
 * live on the caller's stack. Thread-safe; exactly once per call. */
void srv_call_finish(srv_call *call, rpc_code code, const char *message,
                     const ProtobufCMessage *resp);
/* printf-style message, for errors. */
void srv_call_finishf(srv_call *call, rpc_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Whether the client went away or the deadline passed. Thread-safe. */
int srv_call_cancelled(srv_call *call);
/* Milliseconds until the call's deadline; INT64_MAX when it has none. */
int64_t srv_call_remaining_ms(srv_call *call);
/* The x-request-id the client sent, or one made up for the call. Valid for
 * the life of the call. */
const char *srv_call_request_id(srv_call *call);
/* The call's server span: a child of the traceparent metadata the client
 * sent (a new trace without one; a health check without one has none),
 * current on the thread during every callback of the call, ended when the
 * call is finished. A handler that works on another thread sets it current
 * there (trace_set_current) or starts children of it. Valid for the life
 * of the call. */
const trace_span *srv_call_span(srv_call *call);
/* The handler's per-call pointer (NULL until set). */
void *srv_call_data(srv_call *call);
void srv_call_set_data(srv_call *call, void *data);
/* The `data` given to srv_add_method. */
void *srv_call_method_data(srv_call *call);

#endif
