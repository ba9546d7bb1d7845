/* caller — who is calling, checked once per WebSocket handshake and per
 * REST request, before anything else happens.
 *
 *   - the request itself: a Transfer-Encoding (the gateway takes no
 *     streamed bodies) is 501, a body on anything but POST is 400, and the
 *     connection closes, so the bytes after them are never read as a
 *     request; headers over --max-header-bytes are 431;
 *   - its Origin, when it carries one: the gateway's own (the Host it was
 *     asked for) or one of --allowed-origins, else 403;
 *   - its user: with --auth jwt or dev the bearer token (Authorization:
 *     Bearer, else ?access_token=) verified by auth.h, else 401; a user_id
 *     argument naming someone else is 403. With --auth none the user_id
 *     argument is trusted, as the seed did;
 *   - its address: the peer, or with --trusted-proxies the nearest address
 *     in X-Forwarded-For that is not a trusted proxy.
 * Tokens never reach a log line: caller_log_target gives the request
 * target with access_token's value hidden. Loop thread only. */
#ifndef GW_CALLER_H
#define GW_CALLER_H

#include "auth.h"
#include "gw.h"
#include "trace.h"

#include <stddef.h>

struct lws;

typedef struct caller_rules caller_rules;

/* Longest client address kept (an IPv6 address as text). */
#define CALLER_IP_MAX 64
/* A request id: 16 hex digits. */
#define CALLER_ID_LEN 16

typedef struct caller {
    char ip[CALLER_IP_MAX];
    /* The token's sub (verified), or with --auth none the user_id argument
     * as given ("" when there is none: callers decide the default). */
    char user[AUTH_USER_MAX + 1];
    int verified; /* user comes from a verified token */
    /* The user_id argument: 1 a valid id, 0 absent, -1 not a valid id
     * (the caller refuses it with invalid_user_id). */
    int user_arg;
    /* The Origin when it is allowed (for CORS), else "". */
    char origin[256];
    char request_id[CALLER_ID_LEN + 1];
    /* The W3C trace context the request carried (traceparent,
     * tracestate): the parent of the gateway's span for it. A traceparent
     * that does not parse is ignored with its tracestate (empty ctx: a
     * new trace); a tracestate that is too long or malformed alone. */
    trace_ctx trace_parent;
    char trace_state[TRACE_STATE_MAX + 1];
} caller;

/* Why a request is refused: the HTTP status and the answer's code and
 * short text (static strings). */
typedef struct caller_refusal {
    int status;
    const char *code;
    const char *message;
    /* The connection must close after the answer: what follows on it
     * (a body, bytes after an unknown Transfer-Encoding) is not read as a
     * request. */
    int close;
} caller_refusal;

/* Parses --allowed-origins and --trusted-proxies. Returns NULL with the
 * reason in err when one is malformed or names "*". */
caller_rules *caller_rules_create(const gw_opts *o, char *err, size_t errlen);
void caller_rules_destroy(caller_rules **r);

/* Fills c's address, request id and trace context and checks the request's framing and
 * Origin. Returns 0, or -1 with why (501, 400, 431 or 403). */
int caller_check(gw *g, struct lws *wsi, caller *c, caller_refusal *why);
/* Identifies the user as above into c (and c->user_arg). Returns 0, or -1
 * with why (401: no or a bad token, the code auth_strerror's; 403: a valid
 * user_id names someone else). */
int caller_identify(gw *g, struct lws *wsi, caller *c, caller_refusal *why);

/* Adds the headers every answer to c carries: CORS for an allowed Origin
 * (that origin, never *), X-Request-Id, Cache-Control: no-store. Returns
 * 0 or -1 (no room in the header buffer). */
int caller_add_headers(struct lws *wsi, const caller *c, unsigned char **p, unsigned char *end);
/* The JSON body of an error answer: {"error": message, "code": code,
 * "request_id": id}. From mem, its length in *len. */
char *caller_error_json(const char *code, const char *message, const char *request_id, size_t *len);
/* Writes why as the whole answer: its status, the headers above,
 * WWW-Authenticate: Bearer on 401, Retry-After on 429, Connection: close
 * when why->close, and the JSON body. upgrade: the request is a WebSocket
 * handshake (LWS_CALLBACK_HTTP_CONFIRM_UPGRADE). Returns 0, or -1 when the
 * write failed. */
int caller_answer(struct lws *wsi, const caller *c, const caller_refusal *why, int upgrade);

/* A URL argument `name` (without '='), decoded. Returns 1 (copied into
 * buf), 0 when absent, -1 when present but longer than cap - 1 bytes. */
int caller_arg(struct lws *wsi, const char *name, char *buf, size_t cap);
/* The request's path and arguments for a log line, access_token hidden. */
void caller_log_target(struct lws *wsi, char *buf, size_t cap);

#endif
