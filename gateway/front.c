#include "front.h"

#include "bridge.h"
#include "gw.h"
#include "http.h"
#include "ws.h"

#include <stdint.h>
#include <string.h>

/* Bytes libwebsockets reads and writes at once per service thread. */
#define FRONT_LWS_SERV_BUF 32768

/* libwebsockets' header buffer, in --max-header-bytes: requests over the
 * limit but within the buffer are answered 431; past it libwebsockets
 * closes the connection unanswered. */
#define FRONT_HEADER_BUFFER_FACTOR 2

/* The protocol's callback (struct lws_protocols.callback). */
static int front_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
                          size_t len)
{
    gw *g = lws_context_user(lws_get_context(wsi));
    switch (reason) {
    case LWS_CALLBACK_EVENT_WAIT_CANCELLED:
        bridge_drain(g->bridge);
        return 0;
    case LWS_CALLBACK_HTTP:
        return http_on_request(g, wsi, (const char *)in);
    case LWS_CALLBACK_HTTP_BODY:
        return http_on_body(wsi, in, len);
    case LWS_CALLBACK_HTTP_BODY_COMPLETION:
        return http_on_body_done(wsi);
    case LWS_CALLBACK_HTTP_WRITEABLE:
        return http_on_writeable(wsi);
    case LWS_CALLBACK_HTTP_FILE_COMPLETION:
        return lws_http_transaction_completed(wsi) ? -1 : 0;
    case LWS_CALLBACK_CLOSED_HTTP:
        http_on_closed(wsi);
        return 0;
    default:
        return ws_callback(wsi, reason, user, in, len);
    }
}

int front_listen(gw *g, const char *iface, int port)
{
    /* One process, one context: the array lives as long as it does. */
    static struct lws_protocols protocols[] = {
        {"convo", front_callback, 0, 0, 0, NULL, 0},
        {NULL, NULL, 0, 0, 0, NULL, 0},
    };
    protocols[0].per_session_data_size = ws_session_data_size();
    /* Copied by lws_create_context. */
    lws_retry_bo_t retry = {
        .secs_since_valid_ping = (uint16_t)g->opts.ping_secs,
        .secs_since_valid_hangup = (uint16_t)(g->opts.ping_secs + GW_PING_GRACE_SECS),
    };
    struct lws_context_creation_info info;
    memset(&info, 0, sizeof info);
    info.port = port;
    info.iface = iface;
    info.protocols = protocols;
    info.options =
        LWS_SERVER_OPTION_VALIDATE_UTF8 | LWS_SERVER_OPTION_DISABLE_IPV6 | LWS_SERVER_OPTION_LIBEV;
    if (g->opts.ping_secs > 0)
        info.retry_and_idle_policy = &retry;
    info.pt_serv_buf_size = FRONT_LWS_SERV_BUF;
    info.max_http_header_data2 = (unsigned)(g->opts.max_header_bytes * FRONT_HEADER_BUFFER_FACTOR);
    info.user = g;
    void *foreign[] = {g->loop};
    info.foreign_loops = foreign;
    g->ctx = lws_create_context(&info);
    if (g->ctx == NULL)
        return -1;
    bridge_set_context(g->bridge, g->ctx);
    return 0;
}

int front_port(const gw *g)
{
    return lws_get_vhost_listen_port(lws_get_vhost_by_name(g->ctx, "default"));
}
