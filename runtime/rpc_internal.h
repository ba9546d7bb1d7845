/* Internals shared by rpc.c, srv.c, cli.c and tls.c; not part of any API. */
#ifndef CONVO_RPC_INTERNAL_H
#define CONVO_RPC_INTERNAL_H

#include "rpc.h"
#include "srv.h"
#include "tls.h"

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <protobuf-c/protobuf-c.h>

/* Every completion-queue tag is one of these, embedded in the object the
 * operation belongs to; the thread that pops it calls fn. */
typedef struct rpc__tag {
    void (*fn)(struct rpc__tag *tag, int ok);
} rpc__tag;

#define rpc__container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

/* Channel arguments for a server or a channel, built one by one. */
typedef struct rpc__args {
    grpc_arg a[12];
    size_t n;
} rpc__args;
/* Starts a list with what servers and channels share: the message size
 * limit both ways. */
void rpc__args_init(rpc__args *args, int64_t max_message_bytes);
void rpc__args_int(rpc__args *args, const char *key, int value);
void rpc__args_str(rpc__args *args, const char *key, const char *value);
/* The list as the core takes it (valid while args lives). */
grpc_channel_args rpc__args_get(rpc__args *args);

/* Serializes msg into a new byte buffer (caller destroys); NULL on failure. */
grpc_byte_buffer *rpc__encode(const ProtobufCMessage *msg);
/* Decodes a byte buffer; NULL when it is not a valid `desc` message. The
 * result is freed with protobuf_c_message_free_unpacked(msg, NULL). With
 * nul_field, a string field holding a NUL byte is refused too: NULL, and
 * nul_field gets its path ("events.content"); otherwise nul_field is left
 * empty. protobuf-c would silently cut the string at the NUL. */
ProtobufCMessage *rpc__decode(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc,
                              char *nul_field, size_t nul_size);
/* Pops completion-queue events until the queue is shut down. */
void rpc__cq_loop(grpc_completion_queue *cq);
/* Makes the gRPC core's init/shutdown reference counting explicit. */
void rpc__grpc_ref(void);
void rpc__grpc_unref(void);

/* tls.c, for srv.c and cli.c: credentials of a server or channel,
 * insecure ones when t is NULL (plaintext); the caller owns them. */
grpc_server_credentials *tls__server_credentials(tls *t);
grpc_channel_credentials *tls__channel_credentials(tls *t);
/* The caller name of a server call's peer certificate (tls_name_of_dns of
 * its first DNS name) into out (TLS_NAME_MAX + 1 bytes); "" when none.
 * Returns whether the peer showed a certificate the TLS handshake verified
 * (0 for a plaintext connection). */
int tls__caller(grpc_call *call, char *out);

#endif
