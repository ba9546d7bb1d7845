#include "router.h"

#include "check.h"

#include "log.h"
#include "routemsg.h"
#include "rpc.h"

#include <stdio.h>
#include <string.h>

/* protobuf-c gives unset strings as "", but a message built by hand may
 * hold NULL. */
static const char *str_or_empty(const char *s)
{
    return s != NULL ? s : "";
}

static int check_count(const char *field, int64_t n, char *err, size_t errsize)
{
    if (n < 0) {
        snprintf(err, errsize, "%s must be >= 0, got %lld", field, (long long)n);
        return -1;
    }
    return 0;
}

int router_check_request(const route_config *cfg, const Convo__V1__RouteRequest *req, char *err,
                         size_t errsize)
{
    const char *msg = str_or_empty(req->last_user_message);
    if (check_text("session_id", str_or_empty(req->session_id), ROUTER_MAX_ID_BYTES, err,
                   errsize) != 0 ||
        check_text("user_id", str_or_empty(req->user_id), ROUTER_MAX_ID_BYTES, err, errsize) != 0)
        return -1;
    if (msg[0] == '\0') {
        snprintf(err, errsize, "last_user_message is required");
        return -1;
    }
    if (check_text("last_user_message", msg, cfg->max_message_bytes, err, errsize) != 0 ||
        check_count("user_message_count", req->user_message_count, err, errsize) != 0 ||
        check_count("tool_call_count", req->tool_call_count, err, errsize) != 0 ||
        check_count("assistant_message_count", req->assistant_message_count, err, errsize) != 0)
        return -1;
    return 0;
}

static void log_decision(const Convo__V1__RouteRequest *req, const route_decision *d)
{
    char why[ROUTE_MAX_REASONS * (ROUTE_REASON_SIZE + 2)];
    size_t at = 0;
    why[0] = '\0';
    for (size_t i = 0; i < d->n_reasons && at < sizeof why; i++)
        at += (size_t)snprintf(why + at, sizeof why - at, "%s%s", i ? "; " : "", d->reasons[i]);
    const log_field fields[] = {
        {"session_id", str_or_empty(req->session_id)},
        {"user_id", str_or_empty(req->user_id)},
        {"strategy", route_strategy_name(d->strategy)},
        {NULL, NULL},
    };
    log_fields(LOG_DEBUG, fields, "route: %s, %s (%s)", route_strategy_name(d->strategy),
               route_verbosity_name(d->verbosity), why);
}

/* Unary and pure: the whole answer is computed and sent on the call's
 * thread, with nothing allocated. */
static void on_route(srv_call *call, const ProtobufCMessage *msg)
{
    const router_ctx *ctx = srv_call_method_data(call);
    const route_config *cfg = ctx->cfg;
    const Convo__V1__RouteRequest *req = (const Convo__V1__RouteRequest *)msg;
    char err[256];
    if (router_check_request(cfg, req, err, sizeof err) != 0) {
        log_info("Route refused: %s", err);
        srv_call_finish(call, RPC_INVALID_ARGUMENT, err, NULL);
        return;
    }

    const char *text = str_or_empty(req->last_user_message);
    route_input in = {
        .message = text,
        .message_len = strlen(text),
        .user_message_count = req->user_message_count,
        .tool_call_count = req->tool_call_count,
    };
    route_decision d;
    route_decide(cfg, &in, &d);
    log_decision(req, &d);
    metrics_counter_inc(ctx->routes[d.strategy]);

    routemsg reply;
    routemsg_fill(&reply, &d);
    srv_call_finish(call, RPC_OK, NULL, &reply.resp.base);
}

void router_ctx_init(router_ctx *ctx, const route_config *cfg, metrics *m)
{
    router_metrics rm;
    metrics_register(m, METRICS_SECTION(router_metrics, &rm));
    ctx->cfg = cfg;
    for (int i = 0; i < ROUTE_N_STRATEGIES; i++)
        ctx->routes[i] =
            metrics_counter_of(rm.routes, (const char *[]){route_strategy_name((route_strategy)i)});
}

int router_register(srv *s, const router_ctx *ctx)
{
    static const srv_method route = {
        .method = &convo__v1__router__route__method,
        .on_call = on_route,
        /* The gateway each turn; `admin` (an operator) tries a rule. */
        .callers = "gateway admin",
    };
    return srv_add_method(s, &route, (void *)ctx);
}
