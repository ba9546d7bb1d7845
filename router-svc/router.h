/* router — the convo.v1.Router service: the Route RPC between the wire and
 * the rules of route.h. Split from main() so tests can check requests,
 * build responses and serve the method in-process. */
#ifndef CONVO_ROUTER_H
#define CONVO_ROUTER_H

#include "route.h"
#include "srv.h"

#include "convo/v1/router.pb-c.h"

#include <stddef.h>

#define ROUTER_METHOD_ROUTE "/convo.v1.Router/Route"
#define ROUTER_MAX_ID_BYTES 128 /* session_id, user_id */

/* Checks a decoded RouteRequest against the contract (router.proto) and
 * cfg->max_message_bytes. Returns 0 when it is good, or -1 with a message
 * naming the field in err (for INVALID_ARGUMENT). */
int router_check_request(const route_config *cfg, const Convo__V1__RouteRequest *req, char *err,
                         size_t errsize);

/* A RouteResponse and the storage it points to, without allocation. Valid
 * while the decision (and so the config) it was filled from is. */
typedef struct router_reply {
    Convo__V1__RouteResponse resp;
    Convo__V1__GenerationParams params;
    char *reasons[ROUTE_MAX_REASONS];
} router_reply;

void router_reply_fill(router_reply *r, const route_decision *d);

/* Registers Route on `s` (before srv_start). `cfg` is shared by every call
 * and must outlive the server. Returns 0 or an RPC_E* error. */
int router_register(srv *s, const route_config *cfg);

#endif
