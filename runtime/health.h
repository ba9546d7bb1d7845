/* health — grpc.health.v1.Health (Check and Watch), served by every srv.
 *
 * The server ("" service) and each registered service name have a status;
 * srv registers the services of the methods it serves. Changes reach every
 * open Watch stream at once. */
#ifndef CONVO_HEALTH_H
#define CONVO_HEALTH_H

#include "srv.h"

typedef enum health_status {
    HEALTH_UNKNOWN = 0,
    HEALTH_SERVING = 1,
    HEALTH_NOT_SERVING = 2,
} health_status;

/* Sets the status of `service` ("" for the whole server) of server `s`.
 * Thread-safe. A service store-svc, say, is NOT_SERVING while its database
 * is unreachable. Ignored once the server is shutting down (it stays
 * NOT_SERVING). */
void health_set(srv *s, const char *service, health_status status);
/* Sets every known service, "" included. Thread-safe. */
void health_set_all(srv *s, health_status status);
/* The current status of `service`; HEALTH_UNKNOWN when never set. */
health_status health_get(srv *s, const char *service);
/* Whether srv `server`'s own status ("") is SERVING: /healthz's answer
 * (a scrape_health_fn). Thread-safe. */
int health_serving(void *server);

#endif
