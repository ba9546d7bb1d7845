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

/* The first step of start-up: turns o->listen into an address, given the
 * process's own "HOST:PORT" (auto keeps a port 0 as 0: any free port), and
 * makes the process's registry in *m, or leaves *m NULL when metrics are
 * off. Returns 0, or -1 after printing what is wrong on stderr (not
 * HOST:PORT, auto past port 65535): a usage error. */
int scrape_setup(const scrape_opts *o, const char *program, const char *listen, char *addr,
                 size_t addrsize, metrics **m);

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
