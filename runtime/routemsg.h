/* routemsg — a route decision (route.h) as the wire's RouteResponse
 * (proto/convo/v1/router.proto): what router-svc answers, and what the
 * gateway uses when it answers a turn without router-svc. */
#ifndef CONVO_ROUTEMSG_H
#define CONVO_ROUTEMSG_H

#include "route.h"

#include "convo/v1/router.pb-c.h"

/* A RouteResponse and the storage it points to, without allocation. */
typedef struct routemsg {
    Convo__V1__RouteResponse resp;
    Convo__V1__GenerationParams params;
    char *reasons[ROUTE_MAX_REASONS];
} routemsg;

/* Fills r from d. r points into d and into the config d was made from:
 * valid while both are, and never written through (packing only reads). */
void routemsg_fill(routemsg *r, const route_decision *d);

#endif
