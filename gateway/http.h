/* http — the gateway's REST endpoints and its web page.
 *
 *   GET  /                                  API information (JSON)
 *   GET  /healthz                           the process is alive
 *   GET  /readyz                            router-, llm- and store-svc serve (else 503)
 *   GET  /api/health                        the gateway's counters and each service's health
 *   POST /api/dev/token                     --auth dev only: a token for {"user_id": ...}
 *   GET  /api/sessions                      the caller's sessions, newest first, paged
 *   GET  /api/sessions/{id}                 a session's metadata and counts
 *   GET  /api/sessions/{id}/summary         its summary, or pending / failed status
 *   GET  /api/sessions/{id}/events          its events, paged by seq
 *   GET  /app/...                           the web page (files of --web-root)
 *
 * Every request is checked by caller.h first (framing, Origin); REST
 * requests (/api/...) are counted per client address (--rest-rate-per-ip, 429), and
 * those about sessions need the caller's token (401) and answer only the
 * session's owner: another user's session is 404, exactly as one that does
 * not exist. Answers that need a service are asynchronous: the request
 * waits (the loop goes on) until the gRPC answers are back. Errors are
 * {"error": text, "code": code, "request_id": id}; what a service said goes
 * to the log under that request id, never to the client. */
#ifndef GW_HTTP_H
#define GW_HTTP_H

#include "gw.h"

#include <stddef.h>

struct lws;

/* LWS_CALLBACK_HTTP. The request rides on the connection's opaque user
 * data (libwebsockets gives HTTP connections no per-session data). */
int http_on_request(gw *g, struct lws *wsi, const char *uri);
/* LWS_CALLBACK_HTTP_BODY and LWS_CALLBACK_HTTP_BODY_COMPLETION (POST). */
int http_on_body(struct lws *wsi, const void *in, size_t len);
int http_on_body_done(struct lws *wsi);
/* LWS_CALLBACK_HTTP_WRITEABLE. */
int http_on_writeable(struct lws *wsi);
/* LWS_CALLBACK_CLOSED_HTTP: forgets the connection; a request still
 * waiting for gRPC answers is freed when they arrive. */
void http_on_closed(struct lws *wsi);

#endif
