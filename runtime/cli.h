/* cli — an asynchronous gRPC client over the gRPC C core.
 *
 * A cli owns completion-queue thread(s); every callback runs on one of them
 * and must not block. One process can have thousands of calls in flight
 * without a thread each. A channel per target connects lazily and
 * reconnects by itself (the gRPC core's behaviour); calls on a channel that
 * cannot connect fail with UNAVAILABLE once their deadline allows no wait.
 *
 * Callback contract: if a start function returns an error, no callback
 * fires. Otherwise the done callback fires exactly once, last. A call
 * started from inside one of this client's callbacks has its callbacks run
 * on the same thread, so none of them runs before the starting callback
 * returns: what that callback hands on (to another thread's queue, say)
 * is ahead of anything the new call produces. */
#ifndef CONVO_CLI_H
#define CONVO_CLI_H

#include "conf.h"
#include "metrics.h"
#include "rpc.h"
#include "tls.h"
#include "trace.h"

#include <protobuf-c/protobuf-c.h>
#include <stdint.h>

/* The most completion-queue threads a client may have. */
#define CLI_THREADS_MAX 64

/* The client's options; every binary that calls other services parses
 * them (conf checks the range of `threads`), creates its client with
 * `threads` and passes round_robin to cli_channel_create. (--grpc-threads is
 * the server's threads, srv.h: one meaning per flag name.) */
#define CLI_OPTS(X, S)                                                                             \
    X(S, threads, INT_IN(1, CLI_THREADS_MAX), "client-threads", "GRPC_CLIENT_THREADS", "1",        \
      "completion-queue threads of the gRPC client (calls to other services); one runs every "     \
      "callback of every call in order on one thread")                                             \
    X(S, round_robin, BOOL, "grpc-round-robin", "GRPC_ROUND_ROBIN", "false",                       \
      "spread calls over every address of a peer: each IP of a list (IP:PORT,IP:PORT) or of a "    \
      "name (dns:///NAME:PORT, Kubernetes headless Services); without it the first address "       \
      "that answers takes every call and the others stand by")
CONF_DECLARE(cli_conf, CLI_OPTS)

typedef struct cli cli;
typedef struct cli_channel cli_channel;
typedef struct cli_call cli_call;

/* Per-call options; a zeroed struct is valid (no deadline, no metadata).
 * Every call has a client span (cli_set_tracer records it), sent on as
 * traceparent and tracestate metadata: a child of trace_parent, or when
 * that is NULL of the calling thread's current span (trace.h), else the
 * first span of a new trace; a grpc.health.v1 call without either is not
 * traced. */
typedef struct cli_opts {
    int64_t timeout_ms;             /* 0: no deadline */
    const char *request_id;         /* sent as x-request-id; NULL: none */
    int wait_for_ready;             /* wait for the channel to connect instead of failing fast */
    const char *const *meta;        /* extra metadata: key, value, key, value, ..., NULL */
    const trace_span *trace_parent; /* read while the call starts */
    const trace_ctx *trace_links;   /* spans the call's span links to (a batch of others' work) */
    size_t n_trace_links;
} cli_opts;

/* The call ended. `resp` is the decoded unary response (NULL unless code is
 * RPC_OK, always NULL for streams) and now belongs to the callback: free it
 * with protobuf_c_message_free_unpacked(resp, NULL). `message` is the
 * server's (or the core's) reason, valid during the callback. */
typedef void (*cli_done_fn)(void *arg, rpc_code code, const char *message, ProtobufCMessage *resp);
/* A streamed message, freed when the callback returns. Return 0 to keep
 * reading, 1 to pause reading until cli_call_resume() (backpressure). */
typedef int (*cli_msg_fn)(void *arg, const ProtobufCMessage *msg);

/* Creates a client with `threads` completion-queue threads (>= 1). */
cli *cli_create(int threads, int64_t max_message_bytes);
/* Cancels every call still in flight, waits for their done callbacks, stops
 * the threads and frees the client and its channels; clears *c. Must not be
 * called from a callback. */
void cli_destroy(cli **c);

/* Channels created after this use mutual TLS with t's certificates: the
 * server's certificate must be signed by the CA and name the target's
 * host (for a list of replicas, the service: see cli_channel_create);
 * ours is shown to it. NULL (the default): plaintext. t must outlive
 * the client. */
void cli_use_tls(cli *c, tls *t);
/* Counts every call into m (convo_grpc_client_*: by method and status
 * code, durations, calls in flight, streamed messages received). Call
 * before the first call; m (NULL: nothing counted) must outlive the client. */
void cli_set_metrics(cli *c, metrics *m);

/* Records every call's client span into e. Call before the first call; e
 * (NULL: spans keep their ids, nothing is recorded) must outlive the
 * client. */
void cli_set_tracer(cli *c, otlp *e);

/* A channel to a peer `addr`, written as a peer flag takes it:
 *   HOST:PORT                 one address; a name is resolved by DNS;
 *   IP:PORT,IP:PORT,...       replicas at fixed addresses (all IPv4, or all
 *                             IPv6 as [IP]:PORT; no names, no repeats);
 *   a gRPC target URI         dns:///NAME:PORT (every address of a name),
 *                             ipv4:..., ipv6:..., unix:PATH, as the core
 *                             takes them.
 * `service` is the name the peer is known by (its certificate's DNS name,
 * "store-svc"): a list's calls carry it as their authority, and under
 * mutual TLS every replica's certificate must name it, as no one address
 * of the list names them all (and a replica cannot pass for another
 * service). Any other form is checked against the host it names. Needed
 * for a list; NULL is fine for the other forms.
 * `round_robin` spreads calls over every address (a replica that refuses
 * connections is skipped until it is back); otherwise the first that
 * answers takes them all. `retry` (NULL-terminated, or NULL) lists the
 * methods (&convo__v1__router__route__method) safe to send again: a call of one
 * that fails UNAVAILABLE before any response message arrived is retried
 * (by the core, on the next replica; a stream never once a message was
 * received). Owned by the client; freed with it. Returns NULL when addr
 * is none of the above, a list comes without `service`, or a method path
 * is malformed, with the reason in err. */
cli_channel *cli_channel_create(cli *c, const char *addr, const char *service, int round_robin,
                                const rpc_method *const *retry, char *err, size_t errsize);
/* The address the channel was created with, as given. */
const char *cli_channel_target(const cli_channel *ch);

/* Starts a call of a unary method (convo_methods.h; the response is decoded
 * as its response type). `out`, when not NULL, receives a handle the caller
 * must give back with cli_call_release() (it stays valid until then); with
 * NULL the call runs to its end on its own. Returns 0, RPC_EARG (logged:
 * not a unary method, or req is not its request type), RPC_EENCODE,
 * RPC_ECALL or RPC_ESHUTDOWN. */
int cli_unary(cli_channel *ch, const rpc_method *method, const ProtobufCMessage *req,
              const cli_opts *opts, cli_done_fn done, void *arg, cli_call **out);

/* Starts a call of a server-streaming method: on_msg per message, then
 * done. Errors as cli_unary's. */
int cli_stream(cli_channel *ch, const rpc_method *method, const ProtobufCMessage *req,
               const cli_opts *opts, cli_msg_fn on_msg, cli_done_fn done, void *arg,
               cli_call **out);

/* Cancels the call; done still fires, with RPC_CANCELLED unless it had
 * already ended. Thread-safe; harmless after the end. */
void cli_call_cancel(cli_call *call);
/* Resumes reading a stream paused by an on_msg that returned 1. Thread-safe;
 * a resume that arrives while on_msg is still running cancels the pause it
 * is about to ask for. */
void cli_call_resume(cli_call *call);
/* Gives back a handle from `out`; clears *call. */
void cli_call_release(cli_call **call);

/* A blocking unary call, for programs and tests that are not event driven;
 * never call it on a cli thread. Returns the status code; *resp gets the
 * response on RPC_OK (caller frees), *message (when not NULL) a copy of the
 * status message to free with mem_free. */
rpc_code cli_unary_sync(cli_channel *ch, const rpc_method *method, const ProtobufCMessage *req,
                        const cli_opts *opts, ProtobufCMessage **resp, char **message);

#endif
