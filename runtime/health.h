/* health — grpc.health.v1.Health (Check and Watch) on a srv.
 *
 * health_attach adds the two methods to a server and follows its life
 * through srv_hooks: it learns each service the server registers, marks
 * them SERVING when the server starts (unless the program set a status
 * before), NOT_SERVING for good when shutdown begins, and ends every Watch
 * stream before the server stops taking calls. The server ("" service) and
 * each service name have a status; a change reaches every Watch stream of
 * that name at once. The dependency runs one way: health uses srv.h, srv
 * knows nothing of health. */
#ifndef CONVO_HEALTH_H
#define CONVO_HEALTH_H

#include "srv.h"

typedef enum health_status {
    HEALTH_UNKNOWN = 0,
    HEALTH_SERVING = 1,
    HEALTH_NOT_SERVING = 2,
} health_status;

typedef struct health health;

/* Serves grpc.health.v1.Health on `s`, to any caller of the CA and without
 * a certificate on the --health-listen port. Call right after srv_create,
 * before the program's own methods (their services are learnt as they are
 * registered). The health belongs to the server: freed by srv_destroy.
 * NULL when the server already has hooks attached (logged). */
health *health_attach(srv *s);
/* Sets the status of `service` ("" for the whole server). Thread-safe. A
 * service store-svc, say, is NOT_SERVING while its database is
 * unreachable. Ignored once the server is shutting down (it stays
 * NOT_SERVING). */
void health_set(health *h, const char *service, health_status status);
/* Whether the server's own status ("") is SERVING: /healthz's answer (a
 * scrape_health_fn; arg is the health). Thread-safe. */
int health_serving(void *h);

#endif
