/* ws — WebSocket connections at /ws/session/{session_id}.
 *
 * The handshake is checked before the upgrade (caller.h: framing, Origin,
 * the token and user; refusals are HTTP answers), then, once upgraded, the
 * session and user ids and the connection limits (global, per address, per
 * user: lim.h); unmasked client frames close the connection (rxguard.h).
 *
 * The transport: a connection reassembles client messages (bounded by
 * --max-frame-bytes) and writes frames in order from a queue. It knows
 * nothing of sessions: a checked new connection is handed to the open
 * function given to ws_server_create, which attaches a peer (a session) to
 * it with conn_attach; from then on the connection calls the peer through
 * the conn_peer_ops it was given. Bytes waiting in the queue are charged
 * to the peer so its answer stream can pause while the client is slow.
 * Loop thread only. Close codes: 1001 the server is going away, 1002 an
 * unmasked frame, 1003 binary frame, 1007 invalid UTF-8 (libwebsockets),
 * 1008 the client does not read, 1009 frame too big, 1011 internal, 1013
 * try again later (a limit, the store), 4400 bad session or user id, 4403
 * the session belongs to another user, 4409 taken over by a newer
 * connection. */
#ifndef GW_WS_H
#define GW_WS_H

#include "gw.h"
#include "trace.h"

#include <libwebsockets.h>
#include <stddef.h>

typedef struct conn conn;
typedef struct ws_server ws_server;

#define WS_CLOSE_GOING_AWAY  1001
#define WS_CLOSE_PROTOCOL    1002
#define WS_CLOSE_UNSUPPORTED 1003
#define WS_CLOSE_POLICY      1008
#define WS_CLOSE_TOO_BIG     1009
#define WS_CLOSE_INTERNAL    1011
#define WS_CLOSE_TRY_LATER   1013
#define WS_CLOSE_BAD_SESSION 4400
#define WS_CLOSE_FORBIDDEN   4403
#define WS_CLOSE_TAKEN_OVER  4409

/* What a connection calls on the peer attached to it. */
typedef struct conn_peer_ops {
    /* A complete text message from the client. */
    void (*on_text)(void *peer, const char *data, size_t len);
    /* `charge` bytes of frames left the queue (written or dropped). */
    void (*on_sent)(void *peer, long charge);
    /* The connection is gone or closing (by either side); the connection
     * has already forgotten the peer. */
    void (*on_gone)(void *peer, conn *c);
} conn_peer_ops;

/* A new connection for session `session_id` of `user_id` (both checked).
 * Attaches a peer with conn_attach, or closes the connection. */
typedef void (*ws_open_fn)(void *arg, conn *c, const char *session_id, const char *user_id);

/* The WebSocket side of the gateway; new connections go to open(arg, ...). */
ws_server *ws_server_create(gw *g, ws_open_fn open, void *arg);
void ws_server_destroy(ws_server **ws);

/* Attaches `peer` to the connection: its messages and write progress go
 * to ops. A connection has at most one peer. */
void conn_attach(conn *c, const conn_peer_ops *ops, void *peer);
/* Queues a frame (ownership of `frame`, from mem_alloc, passes to the
 * connection). `charge` is the byte count the peer counted for it and
 * gets back through on_sent once written or dropped. */
void conn_send(conn *c, char *frame, size_t len, long charge);
/* Sends an error frame, then closes with `code`. The connection forgets
 * its peer at once without calling on_gone (the caller handles the peer's
 * side) and drops frames queued after this. The frames queued before go
 * first; the close waits for a write the socket took only in part (at most
 * a few seconds), so the client gets the code, not 1006. */
void conn_close(conn *c, int code, const char *error_code, const char *reason);

/* The trace context the connection's handshake carried (traceparent and
 * tracestate), the parent of the turns run over it; NULL when it carried
 * none (each turn is then a trace of its own). Valid while c is. */
const trace_span *conn_trace_parent(const conn *c);

/* libwebsockets callback reasons of WebSocket connections (the protocol
 * callback in main.c routes them here). */
int ws_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
                size_t len);
/* Bytes of per-connection state libwebsockets allocates. */
size_t ws_session_data_size(void);

#endif
