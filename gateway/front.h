/* front — the gateway's one libwebsockets protocol: what arrives on a
 * connection goes to http.c (plain HTTP: REST, health, the web page) or
 * ws.c (WebSocket), and the wake-up a gRPC thread sends through
 * lws_cancel_service drains the bridge. The lws context's user pointer is
 * the process's gw. Loop thread only. */
#ifndef CONVO_GW_FRONT_H
#define CONVO_GW_FRONT_H

#include <libwebsockets.h>

/* The protocol's callback (struct lws_protocols.callback). */
int front_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
                   size_t len);

#endif
