/* router-svc — serves convo.v1.Router: the strategy, system prompt and
 * generation parameters of each conversation turn. */
#include "conf.h"
#include "health.h"
#include "log.h"
#include "mem.h"
#include "otlp.h"
#include "rconf.h"
#include "route.h"
#include "router.h"
#include "scrape.h"
#include "srv.h"
#include "tls.h"

#include <stdio.h>

#define ROUTER_OPTS(X, S)                                                                          \
    X(S, listen, STR, "listen", "LISTEN_ADDR", "0.0.0.0:50051", "HOST:PORT to serve gRPC on")      \
    X(S, config, STR, "config", "ROUTER_CONFIG", "",                                               \
      "rules, prompts and generation parameters (router.conf); \"\" uses the built-in "            \
      "defaults, which are the shipped router.conf")                                               \
    X(S, log_level, STR, "log-level", "LOG_LEVEL", "info", "debug, info, warn or error")
CONF_DECLARE(router_opts, ROUTER_OPTS)

int main(int argc, char **argv)
{
    router_opts opts = {0};
    srv_opts sopts = {0};
    tls_opts topts = {0};
    scrape_opts mopts = {0};
    otlp_opts oopts = {0};
    const conf_section secs[] = {
        CONF_SECTION(router_opts, &opts), CONF_SECTION(srv_opts, &sopts),
        CONF_SECTION(tls_opts, &topts),   CONF_SECTION(scrape_opts, &mopts),
        CONF_SECTION(otlp_opts, &oopts),
    };
    const size_t nsecs = sizeof secs / sizeof secs[0];
    route_config *cfg = NULL;
    srv *server = NULL;
    tls *mtls = NULL;
    metrics *m = NULL;
    otlp *exp = NULL;
    scrape *sc = NULL;
    router_ctx ctx;
    health *hl = NULL;
    char maddr[300];
    char *err = NULL;
    char tls_err[512];
    int status = 2;

    srv_block_signals();
    int rc = conf_parse(argc, argv, "router-svc",
                        "picks the strategy, system prompt and generation parameters of each turn",
                        secs, nsecs);
    if (rc != 0) {
        status = rc > 0 ? 0 : 2;
        goto out;
    }
    if (log_setup("router-svc", opts.log_level) != 0 ||
        scrape_setup(&mopts, "router-svc", opts.listen, maddr, sizeof maddr, &m) != 0 ||
        otlp_setup(&oopts, "router-svc", m, &exp) != 0)
        goto out;
    if (tls_create(&topts, &mtls, tls_err, sizeof tls_err) != 0) {
        log_error("%s", tls_err);
        goto out;
    }

    if (opts.config[0] == '\0') {
        cfg = route_config_new();
        log_info("using the built-in rules (no --config)");
    } else if (rconf_load(opts.config, &cfg, &err) != 0) {
        log_error("bad config: %s", err);
        goto out;
    } else {
        log_info("loaded %s: %zu analytical keywords, summarization after %lld user messages, "
                 "tool-heavy after %lld tool calls",
                 opts.config, cfg->n_keywords, cfg->summarization_min_user_messages,
                 cfg->tool_heavy_min_tool_calls);
    }

    status = 1;
    server = srv_create("router-svc", opts.listen, &sopts);
    hl = health_attach(server);
    srv_use_tls(server, mtls);
    srv_set_metrics(server, m);
    srv_set_tracer(server, exp);
    router_ctx_init(&ctx, cfg, m);
    if (router_register(server, &ctx) != 0) {
        log_error("cannot register %s", convo__v1__router__route__method.path);
        goto out;
    }
    if (m != NULL && (sc = scrape_start(maddr, m, health_serving, hl)) == NULL)
        goto out; /* scrape_start logged the address */
    if (srv_start(server) != 0)
        goto out; /* srv_start logged the address */
    srv_run(server);
    status = 0;

out:
    scrape_stop(&sc);
    if (server != NULL)
        srv_destroy(&server);
    tls_destroy(&mtls);
    otlp_destroy(&exp);
    metrics_destroy(&m);
    route_config_free(&cfg);
    mem_free(err);
    conf_free(secs, nsecs);
    return status;
}
