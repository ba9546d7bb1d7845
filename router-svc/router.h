/* router — the convo.v1.Router service: the Route RPC between the wire and
 * the rules of route.h. Split from main() so tests can check requests,
 * and serve the method in-process (the response is runtime/routemsg.h). */
#ifndef CONVO_ROUTER_H
#define CONVO_ROUTER_H

#include "metrics.h"
#include "route.h"
#include "srv.h"

#include "convo_methods.h"

#include <stddef.h>

#define ROUTER_MAX_ID_BYTES 128 /* session_id, user_id */

/* Checks a decoded RouteRequest against the contract (router.proto) and
 * cfg->max_message_bytes. Returns 0 when it is good, or -1 with a message
 * naming the field in err (for INVALID_ARGUMENT). */
int router_check_request(const route_config *cfg, const Convo__V1__RouteRequest *req, char *err,
                         size_t errsize);

#define ROUTER_METRICS(X, S)                                                                       \
    X(S, routes, COUNTER_VEC, "convo_router_routes_total", "strategy", NULL,                       \
      "turns routed, by the strategy chosen")
METRICS_DECLARE(router_metrics, ROUTER_METRICS)

/* What every Route call reads: the rules and the counter of each strategy. */
typedef struct router_ctx {
    const route_config *cfg;
    metrics_counter *routes[ROUTE_N_STRATEGIES];
} router_ctx;

/* Fills ctx with cfg and its counters in m (NULL: nothing counted). Every
 * strategy's series exists from the start, at 0. */
void router_ctx_init(router_ctx *ctx, const route_config *cfg, metrics *m);

/* Registers Route on `s` (before srv_start). `ctx` is shared by every call
 * and must outlive the server. Returns 0 or an RPC_E* error. */
int router_register(srv *s, const router_ctx *ctx);

#endif
