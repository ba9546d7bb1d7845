/* scrape — the HTTP listener Prometheus scrapes: GET /metrics (the
 * registry's exposition, text format 0.0.4) and GET /healthz, served by
 * libmicrohttpd on a thread of its own, so a scrape never runs on a thread
 * that serves calls or relays tokens. */
#ifndef CONVO_SCRAPE_H
#define CONVO_SCRAPE_H

#include "conf.h"
#include "metrics.h"

#include <stddef.h>

/* Every binary parses it (one meaning everywhere). */
#define SCRAPE_OPTS(X, S)                                                                          \
    X(S, listen, STR, "metrics-listen", "METRICS_LISTEN", "auto",                                  \
      "HOST:PORT serving /metrics (Prometheus) and /healthz; auto: the host of the service's "     \
      "own address and its port + 1000; off: no listener and nothing recorded")
CONF_DECLARE(scrape_opts, SCRAPE_OPTS)

/* Turns a --metrics-listen value into an address, given the process's own
 * "HOST:PORT": returns 0 with `addr` filled, 1 for "off" (or ""), or -1
 * with the reason in `err` (not HOST:PORT, or auto past port 65535). Auto
 * keeps a port 0 as 0 (any free port). */
int scrape_resolve(const char *value, const char *listen, char *addr, size_t addrsize, char *err,
                   size_t errsize);

/* Whether /healthz answers 200 (else 503); runs on the listener's thread. */
typedef int (*scrape_health_fn)(void *arg);

typedef struct scrape scrape;

/* Listens on `addr` ("HOST:PORT"; port 0 picks one) and serves `m` until
 * scrape_stop. Returns NULL after logging why (the address is in use or
 * invalid): a start-up error. m and arg must outlive the listener. */
scrape *scrape_start(const char *addr, metrics *m, scrape_health_fn healthy, void *arg);
/* The port bound. */
int scrape_port(const scrape *s);
/* Stops the thread (a scrape in progress finishes first) and frees; clears
 * *s. Call before freeing anything its render hooks read. */
void scrape_stop(scrape **s);

#endif
