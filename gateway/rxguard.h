/* rxguard — refuses unmasked client frames (RFC 6455 5.1: "a server MUST
 * close the connection upon receiving a frame that is not masked").
 *
 * libwebsockets 4.1 (Debian 12) accepts them and tells its user nothing of
 * the mask bit (4.3 closes with 1002 itself). So the gateway reads the
 * frame headers of each WebSocket's incoming bytes itself, before
 * libwebsockets does: a libev watcher of higher priority on the same socket
 * looks at the waiting bytes without taking them (MSG_PEEK) and follows
 * the stream frame by frame; the kernel's count of bytes received minus
 * those still waiting says where libwebsockets has read up to. It starts
 * right after the handshake (a client waits for the server's answer before
 * it sends a frame, RFC 6455 4.1). Only headers are looked at; a payload is
 * skipped by its length. Plain TCP only (under TLS the bytes are
 * ciphertext: rxguard_start says no). Loop thread only. */
#ifndef GW_RXGUARD_H
#define GW_RXGUARD_H

#include <stddef.h>

struct ev_loop;
typedef struct rxguard rxguard;

/* Called once, from the loop, when an unmasked frame is waiting; the
 * guard has stopped. */
typedef void (*rxguard_fn)(void *arg);

/* Watches socket fd from now on; frames are skipped by length, up to
 * max_frame bytes looked past at once. Returns NULL when the socket's
 * counts cannot be read (not TCP). */
rxguard *rxguard_start(struct ev_loop *loop, int fd, size_t max_frame, rxguard_fn on_unmasked,
                       void *arg);
/* Stops watching (before the socket is closed) and frees; clears *g. */
void rxguard_stop(rxguard **g);

#endif
