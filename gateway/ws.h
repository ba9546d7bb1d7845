/* ws — WebSocket connections at /ws/session/{session_id}?user_id={user_id}.
 *
 * A connection reassembles client messages (bounded by --max-frame-bytes),
 * hands complete text messages to its session, and writes the session's
 * frames in order from a queue. Bytes waiting in the queue are charged to
 * the session so its answer stream pauses while the client is slow.
 * Close codes: 1003 binary frame, 1007 invalid UTF-8 (libwebsockets), 1009
 * frame too big, 1013 too many connections, 4400 bad session id, 4403 the
 * session belongs to another user, 4409 taken over by a newer connection. */
#ifndef GW_WS_H
#define GW_WS_H

#include <libwebsockets.h>
#include <stddef.h>

typedef struct conn conn;

#define WS_CLOSE_UNSUPPORTED 1003
#define WS_CLOSE_TOO_BIG     1009
#define WS_CLOSE_TRY_LATER   1013
#define WS_CLOSE_BAD_SESSION 4400
#define WS_CLOSE_FORBIDDEN   4403
#define WS_CLOSE_TAKEN_OVER  4409

/* Queues a frame (ownership of `frame`, from mem_alloc, passes to the
 * connection). `charge` is the byte count the session counted for it and
 * gets back once written or dropped. */
void conn_send(conn *c, char *frame, size_t len, long charge);
/* Sends an error frame, then closes with `code`. The connection forgets
 * its session at once (the caller handles the session's side) and drops
 * frames queued after this. */
void conn_close(conn *c, int code, const char *error_code, const char *reason);

/* The libwebsockets protocol callback serving both HTTP (http.c) and
 * WebSocket. */
int ws_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
                size_t len);
/* Bytes of per-connection state libwebsockets allocates. */
size_t ws_session_data_size(void);

#endif
