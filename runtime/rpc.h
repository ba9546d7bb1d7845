/* rpc — status codes shared by the gRPC server (srv) and client (cli).
 *
 * rpc_code carries the standard gRPC status values, so a code crosses the
 * wire unchanged in either direction. Runtime functions themselves return
 * int: 0 on success or a negative RPC_E* constant (rpc_strerror()). */
#ifndef CONVO_RPC_H
#define CONVO_RPC_H

#include <protobuf-c/protobuf-c.h>
#include <stddef.h>
#include <stdint.h>

typedef enum rpc_code {
    RPC_OK = 0,
    RPC_CANCELLED = 1,
    RPC_UNKNOWN = 2,
    RPC_INVALID_ARGUMENT = 3,
    RPC_DEADLINE_EXCEEDED = 4,
    RPC_NOT_FOUND = 5,
    RPC_ALREADY_EXISTS = 6,
    RPC_PERMISSION_DENIED = 7,
    RPC_RESOURCE_EXHAUSTED = 8,
    RPC_FAILED_PRECONDITION = 9,
    RPC_ABORTED = 10,
    RPC_OUT_OF_RANGE = 11,
    RPC_UNIMPLEMENTED = 12,
    RPC_INTERNAL = 13,
    RPC_UNAVAILABLE = 14,
    RPC_DATA_LOSS = 15,
    RPC_UNAUTHENTICATED = 16,
} rpc_code;

/* Which side of a method streams. */
typedef enum rpc_kind {
    RPC_UNARY,         /* one request, one response */
    RPC_SERVER_STREAM, /* one request, a stream of responses */
    RPC_CLIENT_STREAM, /* a stream of requests, one response */
    RPC_BIDI_STREAM,   /* both (no method of ours; srv and cli refuse it) */
} rpc_kind;

/* A gRPC method. Every method of proto/ has one, generated at build time
 * from the .proto files (convo_methods.h: convo__v1__store__append_events__method
 * and so on); servers register them and clients call them, so no path is
 * written by hand and a request cannot go out with another method's
 * message. */
typedef struct rpc_method {
    const char *path; /* "/convo.v1.Store/AppendEvents" */
    rpc_kind kind;
    const ProtobufCMessageDescriptor *request;
    const ProtobufCMessageDescriptor *response;
} rpc_method;

/* "OK", "INVALID_ARGUMENT", ...; "UNKNOWN" for values out of range. */
const char *rpc_code_name(rpc_code code);
/* The HTTP status a REST front end answers for a code (404 for NOT_FOUND,
 * 503 for UNAVAILABLE, ...). */
int rpc_code_http_status(rpc_code code);

/* Errors returned by runtime functions. */
#define RPC_EFULL     (-1) /* the call's write queue is at its bound; wait for on_writable */
#define RPC_EDONE     (-2) /* the call is finished or cancelled; nothing more can be sent */
#define RPC_EENCODE   (-3) /* the message could not be serialized */
#define RPC_ECALL     (-4) /* the gRPC core refused to start the operation */
#define RPC_EBIND     (-5) /* the listen address could not be bound */
#define RPC_EARG      (-6) /* a bad argument (unknown method kind, empty path, ...) */
#define RPC_ESHUTDOWN (-7) /* the server or client is shutting down */

const char *rpc_strerror(int err);

/* Milliseconds on a monotonic clock, for deadlines and timing. */
int64_t rpc_now_ms(void);

/* Whether s[0..len) is valid UTF-8 (no overlongs, no surrogates). proto3
 * requires string fields to be; protobuf-c does not check, so handlers do. */
int rpc_utf8_valid(const char *s, size_t len);

#endif
