/* store — the convo.v1.Store service: the gRPC glue between srv and the
 * database pool.
 *
 * Each handler runs on a completion-queue thread and never blocks: it
 * checks the request against the contract (INVALID_ARGUMENT naming the
 * field; nothing is written), copies what the job needs and submits it to
 * the pool (RESOURCE_EXHAUSTED when the queue is full). A pool worker runs
 * the SQL and finishes the call from its own thread.
 *
 * ListEvents streams page by page: a worker reads one page (keyset on seq)
 * and sends it; when the call's write queue is full the rest of the page
 * waits for on_writable, which sends it from the completion-queue thread
 * and queues the next page's job. At most one page per stream is held in
 * memory, and no thread ever waits for a slow reader. Over all streams at
 * most list_pages_max pages are held: a stream that would read one more
 * waits, holding no worker, until another stream's page is sent or dropped
 * (first come, first served). */
#ifndef CONVO_STORE_H
#define CONVO_STORE_H

#include "pool.h"
#include "srv.h"

#include "convo/v1/store.pb-c.h"

#include <stddef.h>

#define STORE_SERVICE      (convo__v1__store__descriptor.name)
#define STORE_MAX_ID_BYTES 128 /* session_id, user_id, worker_id (common.proto) */
/* 9999-12-31T23:59:59.999999Z: the largest time accepted in a request. */
#define STORE_MAX_TIME_US 253402300799999999LL

typedef struct store_limits {
    long long max_batch_events;  /* events per AppendEvents */
    long long max_content_bytes; /* an event's content, a summary or an error text */
    long long list_page_size;    /* events per database page of ListEvents */
    long long list_pages_max;    /* ListEvents pages held at once, all streams */
    long long max_message_bytes; /* the largest response (list responses stop short of it) */
} store_limits;

typedef struct store store;

/* Registers every Store method on `s` (before srv_start). `p` and `s` must
 * outlive the store. Counts appended events and batch sizes in m (NULL:
 * nothing). Returns NULL when a method cannot be registered. */
store *store_create(srv *s, pool *p, const store_limits *lim, metrics *m);
/* Frees the store once the server has stopped (no call in flight) and the
 * pool is destroyed; clears *st. */
void store_destroy(store **st);

#endif
