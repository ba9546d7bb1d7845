/* bcall — blocking gRPC calls for worker threads, cancellable as a group.
 *
 * cli callbacks run on cli threads and must not block; a summary job is
 * sequential (claim, read, call the model, save) and reads best as plain
 * blocking code on its own worker thread. bcall wraps cli's asynchronous
 * calls into waits, and adds what cli_unary_sync lacks: a scope whose
 * cancellation (on shutdown, from any thread) ends the call in flight at
 * once and fails the ones after it with RPC_CANCELLED. Never call these on a
 * cli or srv thread. */
#ifndef SUMMARY_BCALL_H
#define SUMMARY_BCALL_H

#include "cli.h"
#include "rpc.h"

#include <protobuf-c/protobuf-c.h>
#include <stddef.h>
#include <stdint.h>

typedef struct bcall_scope bcall_scope;
typedef struct bcall_stream bcall_stream;

bcall_scope *bcall_scope_new(void);
/* Cancels the call in flight, if any, and every later one. Thread-safe. */
void bcall_scope_cancel(bcall_scope *sc);
int bcall_scope_cancelled(bcall_scope *sc);
/* Frees a scope with no call in flight; clears *sc. */
void bcall_scope_free(bcall_scope **sc);

/* A unary call, waited for; `sc` may be NULL for a call that must go
 * through even during a shutdown (releasing a lease). Returns the status; on RPC_OK *resp is the
 * response (free with protobuf_c_message_free_unpacked). *message, when not
 * NULL, gets the status message (mem_free) or NULL. `timeout_ms` <= 0 means
 * no deadline. */
rpc_code bcall_unary(bcall_scope *sc, cli_channel *ch, const rpc_method *method,
                     const ProtobufCMessage *req, int64_t timeout_ms, ProtobufCMessage **resp,
                     char **message);

/* Starts a server-streaming call read with bcall_stream_next. Messages are
 * held (serialized) until read, at most about `max_msgs` of them or
 * `max_bytes`; past that the stream is paused until the reader catches up,
 * so a slow reader holds the sender back instead of filling memory. Returns
 * 0 with *out, or an rpc_code (RPC_CANCELLED in a cancelled scope, RPC_INTERNAL
 * when the call cannot start). */
rpc_code bcall_stream_open(bcall_scope *sc, cli_channel *ch, const rpc_method *method,
                           const ProtobufCMessage *req, int64_t timeout_ms, size_t max_msgs,
                           size_t max_bytes, bcall_stream **out);
/* Waits for the next message. Returns 1 with *msg (caller frees with
 * protobuf_c_message_free_unpacked), 0 when the stream ended with OK, or
 * -1 with *code and *message (mem_free; may be NULL) when it failed. */
int bcall_stream_next(bcall_stream *st, ProtobufCMessage **msg, rpc_code *code, char **message);
/* Cancels the stream if it is still running, waits for its end and frees
 * it; clears *st. */
void bcall_stream_close(bcall_stream **st);

#endif
