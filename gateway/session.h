/* session — one conversation: its connection, history, turns and event log.
 *
 * A session lives in memory while a connection is attached, while a turn or
 * a store call is in flight, and until its events are stored and it is
 * ended in store-svc. Reconnecting to a live session id (same user) takes
 * it over: the old connection is closed with 4409 and an answer being
 * streamed goes on to the new one. A session not in memory is opened in
 * store-svc and its history rebuilt from the stored events, so a client can
 * resume on any gateway replica.
 *
 * Turns run one at a time, in order: a message that arrives while an answer
 * streams is queued (up to --max-queued-messages; the client gets a
 * "queued" frame) and started when the answer ends. Loop thread only. */
#ifndef GW_SESSION_H
#define GW_SESSION_H

#include "gw.h"
#include "ws.h"

#include <stddef.h>

/* The sessions in memory, by id; owned by gw (gw.sessions). */
typedef struct sess_table sess_table;

sess_table *sess_table_create(gw *g);
/* A ws_open_fn (arg: the table): attaches connection `c` to session `id`
 * of `user_id`, creating or loading the session, or closes the connection
 * when the session is another user's (in memory). */
void sess_open(void *table, conn *c, const char *id, const char *user_id);
/* Sessions in memory. */
size_t sess_count(const sess_table *t);
/* Detaches every connection and closes every session (shutdown). */
void sess_close_all(sess_table *t);

#endif
