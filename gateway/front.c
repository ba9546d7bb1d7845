#include "front.h"

#include "bridge.h"
#include "gw.h"
#include "http.h"
#include "ws.h"

int front_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
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
