/* front — the gateway's one libwebsockets protocol and the context that
 * serves it: what arrives on a connection goes to http.c (plain HTTP: REST,
 * health, the web page) or ws.c (WebSocket), and the wake-up a gRPC thread
 * sends through lws_cancel_service drains the bridge. The lws context's
 * user pointer is the process's gw. Loop thread only. */
#ifndef CONVO_GW_FRONT_H
#define CONVO_GW_FRONT_H

#include <libwebsockets.h>

#include "gw.h"

/* Listens on iface:port (iface NULL: every address; port 0: a free one)
 * on g->loop (libev), with g->opts' header bound and pings, and hands the
 * context to g->bridge. g->ws and g->bridge must exist. Returns 0 with
 * g->ctx set, or -1 when libwebsockets cannot listen there (the address is
 * taken or invalid, or its libev plugin is missing). g's owner destroys
 * g->ctx (lws_context_destroy) before g->ws and g->bridge. */
int front_listen(gw *g, const char *iface, int port);

/* The port g->ctx listens on (what port 0 became). */
int front_port(const gw *g);

#endif
