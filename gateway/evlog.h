/* evlog — a session's event log on its way to store-svc.
 *
 * Events are numbered (seq) and sent in order in batches (--event-batch
 * events, or whatever waited --event-flush-ms), one AppendEvents call in
 * flight per session. A failed batch is retried as it was, same seqs, so the
 * store's idempotency (session, seq) makes retries safe. While store-svc is
 * down, events wait in a bounded buffer (--event-buffer per session); past
 * it they are dropped, counted and logged. Over every session, the bytes
 * waiting are bounded by --event-buffer-total-bytes: at it the gateway
 * takes no new message (evlog_full) until half of them are stored, so what
 * a user was shown is not dropped to make room. The evlog also owns the session's
 * OpenSession (retried until the store answers) and, once the session is
 * closed and every event is stored, EndSession and Summarize.
 *
 * Writes are fenced (store.proto's writer_epoch): OpenSession makes this
 * gateway the session's writer and every AppendEvents and EndSession names
 * that epoch. When the client resumed on another gateway since, store-svc
 * refuses them; the evlog then stops writing the session for good, drops
 * what waits (counted: taken_over), never ends it in the store, and says so
 * once (evlog_on_taken_over).
 * Loop thread only. */
#ifndef GW_EVLOG_H
#define GW_EVLOG_H

#include "convo/v1/store.pb-c.h"
#include "gw.h"
#include "trace.h"

#include <stddef.h>
#include <stdint.h>

typedef struct evlog evlog;

/* The first answer to OpenSession: code RPC_OK with the response, or the
 * error (RPC_UNAVAILABLE when the store could not be reached in time; the
 * evlog keeps trying in the background). */
typedef void (*evlog_open_fn)(void *arg, rpc_code code, const char *message,
                              const Convo__V1__OpenSessionResponse *resp);
/* The session is ended in the store (or given up on): the evlog may be
 * destroyed. */
typedef void (*evlog_closed_fn)(void *arg);

/* Starts OpenSession at once; on_open fires once. */
evlog *evlog_create(gw *g, const char *session_id, const char *user_id, evlog_open_fn on_open,
                    void *arg);
/* Queues an event (content copied) of the work traced by `trace` (its ids
 * are kept; NULL: none). The AppendEvents call that stores a batch is a
 * child of its first event's span and links to the other spans of the
 * batch (a batch can hold the end of one turn and the start of the next). */
void evlog_add(evlog *ev, Convo__V1__EventType type, const char *content, size_t len,
               const trace_span *trace);
/* Ends the session after the last event is stored: EndSession, then
 * Summarize (fire and forget), then on_closed. */
void evlog_close(evlog *ev, evlog_closed_fn on_closed);
/* Gives the session up before it was ever stored (its owner could not be
 * confirmed): what waits is discarded, nothing more is sent (an
 * OpenSession in flight is let finish), later events are ignored, and
 * on_open does not fire any more. */
void evlog_abandon(evlog *ev);
/* Takes a closing session back (a reconnect within the grace period or
 * before the events were flushed): it is not ended. */
void evlog_reopen(evlog *ev);
/* A new connection took the session (the newest connection wins, on any
 * gateway): OpenSession again as a new writer before the next events, so
 * that a gateway the client used meanwhile is fenced off, not this one. */
void evlog_claim(evlog *ev);
/* fn(arg) (evlog_create's arg) fires once, on the loop, when store-svc
 * refused this gateway's writes because another writer opened the session
 * since: nothing more is stored. */
typedef void (*evlog_taken_fn)(void *arg);
void evlog_on_taken_over(evlog *ev, evlog_taken_fn fn);
/* Frees an evlog with no call in flight (after on_closed, or never
 * opened); clears *ev. */
void evlog_destroy(evlog **ev);
/* Events added since creation (each evlog_add counts, kept or not), and
 * how many of the first ones are settled: each stored by store-svc, or
 * dropped (never to be stored). */
uint64_t evlog_added(const evlog *ev);
uint64_t evlog_settled(const evlog *ev);
/* fn(arg, settled) fires on the loop whenever more events are settled
 * (never during evlog_destroy). */
typedef void (*evlog_settled_fn)(void *arg, uint64_t settled);
void evlog_on_settled(evlog *ev, evlog_settled_fn fn, void *arg);
/* Whether the events waiting in every session reached
 * --event-buffer-total-bytes and have not drained to half of it since: new
 * messages are refused meanwhile (the reaching and the draining are each
 * logged once). */
int evlog_full(const gw *g);
/* Makes the dropped-events series of every reason, at 0 (once, at start:
 * an alert on their increase sees the first drop). */
void evlog_metrics_init(gw *g);

#endif
