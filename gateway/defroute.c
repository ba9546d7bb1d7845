#include "defroute.h"

#include "log.h"
#include "mem.h"
#include "rconf.h"
#include "route.h"
#include "routemsg.h"

#include <stdio.h>

#define MS_PER_S 1000.0

/* The one reason line of the default route's decision (stored with the
 * turn's route event, as router-svc's reasons are). */
#define DEFAULT_REASON "router-svc could not route this turn: the gateway's default route"

struct defroute {
    route_config *cfg;
    route_decision decision; /* msg points into it and into cfg */
    routemsg msg;
    /* The outage (loop thread). */
    int down;
    int probing;           /* the probe's Route is in flight */
    int64_t down_since_ms; /* when the outage began */
    long outage_turns;     /* turns degraded in this outage */
    long degraded;         /* turns degraded since start */
};

int defroute_create(const defroute_opts *o, defroute **out, char *err, size_t errsize)
{
    route_config *cfg = NULL;
    char *why = NULL;
    *out = NULL;
    if (o->config[0] == '\0') {
        cfg = route_config_new();
    } else if (rconf_load(o->config, &cfg, &why) != 0) {
        snprintf(err, errsize, "--default-route-config: %s", why);
        mem_free(why);
        return -1;
    }
    int s = route_strategy_parse(o->strategy);
    if (s < 0) {
        snprintf(err, errsize,
                 "--default-route-strategy '%s' is not a strategy: fast_concise, analytical, "
                 "summarization_aware or tool_heavy",
                 o->strategy);
        route_config_free(&cfg);
        return -1;
    }
    defroute *d = mem_calloc(1, sizeof *d);
    d->cfg = cfg;
    route_fixed(cfg, (route_strategy)s, DEFAULT_REASON, &d->decision);
    routemsg_fill(&d->msg, &d->decision);
    *out = d;
    return 0;
}

void defroute_destroy(defroute **dp)
{
    defroute *d = *dp;
    if (d == NULL)
        return;
    *dp = NULL;
    route_config_free(&d->cfg);
    mem_free(d);
}

const Convo__V1__RouteResponse *defroute_response(const defroute *d)
{
    return &d->msg.resp;
}

const char *defroute_reason(rpc_code code)
{
    switch (code) {
    case RPC_OK:
    case RPC_CANCELLED:
        return NULL;
    case RPC_UNAVAILABLE:
        return DEFROUTE_UNAVAILABLE;
    case RPC_DEADLINE_EXCEEDED:
        return DEFROUTE_TIMEOUT;
    default:
        return DEFROUTE_ERROR;
    }
}

int defroute_ask(defroute *d, int *probe)
{
    *probe = 0;
    if (!d->down)
        return 1;
    if (d->probing)
        return 0;
    d->probing = 1;
    *probe = 1;
    return 1;
}

void defroute_result(defroute *d, int probe, rpc_code code, const char *message, int64_t now_ms)
{
    if (probe)
        d->probing = 0;
    if (code == RPC_CANCELLED)
        return; /* the gateway's own cancel says nothing of router-svc */
    if (code == RPC_OK) {
        if (d->down)
            log_info("router-svc routes turns again after %.1f s; %ld turns were answered with "
                     "the default route meanwhile",
                     (double)(now_ms - d->down_since_ms) / MS_PER_S, d->outage_turns);
        d->down = 0;
        return;
    }
    if (d->down)
        return;
    d->down = 1;
    d->down_since_ms = now_ms;
    d->outage_turns = 0;
    log_warn("Router.Route failed (%s: %s): turns are answered with the default route (strategy "
             "%s) until router-svc answers again",
             rpc_code_name(code), message, d->msg.resp.strategy_name);
}

void defroute_count(defroute *d)
{
    d->outage_turns++;
    d->degraded++;
}

int defroute_down(const defroute *d)
{
    return d->down;
}

long defroute_degraded(const defroute *d)
{
    return d->degraded;
}
