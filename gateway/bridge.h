/* bridge — hands work from gRPC client threads to the gateway's one
 * libwebsockets loop thread.
 *
 * All gateway state (connections, sessions, turns, event logs) is touched
 * only on the loop thread, so none of it needs locks: a gRPC callback copies
 * what it got into a job and posts it here; the loop runs the jobs, in
 * posting order, when libwebsockets reports LWS_CALLBACK_EVENT_WAIT_CANCELLED.
 * The jobs wait in a runtime wq (unbounded: see bridge_post) that wakes the
 * loop when it stops being empty. */
#ifndef GW_BRIDGE_H
#define GW_BRIDGE_H

#include <stddef.h>

struct lws_context;
typedef struct bridge bridge;
typedef void (*bridge_fn)(void *arg);

bridge *bridge_create(void);
/* The loop to wake; set once the context exists. */
void bridge_set_context(bridge *b, struct lws_context *ctx);
/* Queues fn(arg) for the loop thread and wakes it. Thread-safe. Jobs are
 * bounded by their producers (each stream pauses while its client is
 * behind), so this never refuses. */
void bridge_post(bridge *b, bridge_fn fn, void *arg);
/* Runs every job queued so far. Loop thread only. */
void bridge_drain(bridge *b);
/* Frees the bridge; jobs still queued are dropped (call after the gRPC
 * client is destroyed, so nothing posts any more). Clears *b. */
void bridge_destroy(bridge **b);

#endif
