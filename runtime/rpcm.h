/* rpcm — the metrics of every gRPC call, server side (srv.c) and client
 * side (cli.c); internal to the runtime. Per method (grpc_service,
 * grpc_method labels, from the path): calls handled by status code, their
 * duration, calls in flight and streamed messages.
 *
 * Every function takes NULL (metrics off) and then does nothing, without
 * reading the clock. */
#ifndef CONVO_RPCM_H
#define CONVO_RPCM_H

#include "metrics.h"
#include "rpc.h"

#include <stdint.h>

typedef struct rpcm rpcm;
typedef struct rpcm_method rpcm_method;

/* The server's or the client's families in m (NULL when m is NULL). */
rpcm *rpcm_create_server(metrics *m);
rpcm *rpcm_create_client(metrics *m);
/* Frees r and its per-method state (the series stay in the registry). */
void rpcm_destroy(rpcm **r);

/* The state of method `path` ("/pkg.Service/Method"), made on first use
 * under a lock: look it up once per method (server) or per call (client). */
rpcm_method *rpcm_method_get(rpcm *r, const char *path);

/* A call started: one more in flight. Returns its start time for rpcm_end. */
uint64_t rpcm_start(rpcm_method *pm);
/* The call ended with `code`: counted, its duration observed, one fewer in
 * flight. */
void rpcm_end(rpcm_method *pm, uint64_t t0, rpc_code code);
/* A call counted by rpcm_start never went out (nothing else is counted). */
void rpcm_forget(rpcm_method *pm);
/* One streamed message sent / received. */
void rpcm_sent(rpcm_method *pm);
void rpcm_received(rpcm_method *pm);

#endif
