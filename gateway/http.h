/* http — the gateway's REST endpoints and its web page.
 *
 *   GET /                             API information (JSON)
 *   GET /api/health                   the gateway and each service's gRPC health
 *   GET /api/sessions/{id}            a session's metadata and counts
 *   GET /api/sessions/{id}/summary    its summary, or pending / failed status
 *   GET /app/...                      the web page (files of --web-root)
 *
 * Answers that need a service are asynchronous: the request waits (the loop
 * goes on) until the gRPC answers are back. gRPC errors map to HTTP statuses
 * with rpc_code_http_status(); bodies are JSON with an "error" on failure. */
#ifndef GW_HTTP_H
#define GW_HTTP_H

#include "gw.h"

struct lws;

/* LWS_CALLBACK_HTTP. The request rides on the connection's opaque user
 * data (libwebsockets gives HTTP connections no per-session data). */
int http_on_request(gw *g, struct lws *wsi, const char *uri);
/* LWS_CALLBACK_HTTP_WRITEABLE. */
int http_on_writeable(struct lws *wsi);
/* LWS_CALLBACK_CLOSED_HTTP: forgets the connection; a request still
 * waiting for gRPC answers is freed when they arrive. */
void http_on_closed(struct lws *wsi);

#endif
