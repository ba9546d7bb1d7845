/* defroute — the route a turn takes when router-svc cannot route it, and
 * the state of router-svc's outage.
 *
 * Routing is a policy, not a dependency of answering: when Router.Route
 * fails or passes --route-timeout-ms, the turn is answered with the
 * default route — one strategy of a router.conf (--default-route-config,
 * else the built-in rules, which are the shipped router.conf) chosen by
 * --default-route-strategy: its system prompt and generation parameters.
 * The file is read once at start-up with router-svc's own parser (rconf.h).
 *
 * An outage starts at the first failed Route and ends at the first one
 * that answers; each end is logged once. During an outage one turn at a
 * time still asks router-svc (the probe, whose answer ends the outage);
 * the others take the default route at once instead of each waiting for
 * --route-timeout-ms. The route is read-only after creation (any thread);
 * the outage state belongs to the gateway's loop. */
#ifndef GW_DEFROUTE_H
#define GW_DEFROUTE_H

#include "conf.h"
#include "rpc.h"

#include "convo/v1/router.pb-c.h"

#include <stddef.h>
#include <stdint.h>

#define DEFROUTE_OPTS(X, S)                                                                        \
    X(S, config, STR, "default-route-config", "DEFAULT_ROUTE_CONFIG", "",                          \
      "a router.conf whose [prompt] and [strategy.NAME] make the route a turn takes when "         \
      "router-svc fails or passes --route-timeout-ms; \"\" uses the built-in rules (the shipped "  \
      "router.conf)")                                                                              \
    X(S, strategy, STR, "default-route-strategy", "DEFAULT_ROUTE_STRATEGY", "fast_concise",        \
      "the strategy of that route: fast_concise, analytical, summarization_aware or tool_heavy")
CONF_DECLARE(defroute_opts, DEFROUTE_OPTS)

typedef struct defroute defroute;

/* Why a turn took the default route: the `reason` of the stored event and
 * of convo_gateway_turns_degraded_total. */
#define DEFROUTE_UNAVAILABLE "unavailable" /* Route failed: router-svc unreachable */
#define DEFROUTE_TIMEOUT     "timeout"     /* Route passed --route-timeout-ms */
#define DEFROUTE_ERROR       "error"       /* Route answered another error status */
#define DEFROUTE_OUTAGE      "outage"      /* not asked: an outage is on, another turn probes */

/* Reads the file (when set) and picks the strategy. Returns 0 with *out,
 * or -1 with a message naming the file and line, or the strategy, in err. */
int defroute_create(const defroute_opts *o, defroute **out, char *err, size_t errsize);
void defroute_destroy(defroute **d);

/* The default route as router-svc would answer it. Read-only, valid while
 * d lives; safe from any thread. */
const Convo__V1__RouteResponse *defroute_response(const defroute *d);
/* The reason word (DEFROUTE_*) of a Route that ended with `code`; NULL for
 * RPC_OK and RPC_CANCELLED (the gateway cancelled it: no answer is due).
 * Pure; any thread. */
const char *defroute_reason(rpc_code code);

/* Loop thread. Whether a new turn asks router-svc (1) or takes the default
 * route at once (0: an outage is on and another turn's Route probes it).
 * *probe is set when this turn's Route is the outage's probe. */
int defroute_ask(defroute *d, int *probe);
/* A turn's Route ended with `code` (probe: it was the probe). The first
 * failure starts an outage (logged with `message`), an answer ends it
 * (logged with its length and the turns it degraded). */
void defroute_result(defroute *d, int probe, rpc_code code, const char *message, int64_t now_ms);
/* Counts a turn answered with the default route (for the outage's log). */
void defroute_count(defroute *d);
/* Whether an outage is on, and the turns degraded since start. */
int defroute_down(const defroute *d);
long defroute_degraded(const defroute *d);

#endif
