/* summary-svc — serves convo.v1.Summary: durable post-session summaries
 * made from store-svc's event log by llm-svc's Complete. */
#include "cli.h"
#include "conf.h"
#include "health.h"
#include "log.h"
#include "mem.h"
#include "otlp.h"
#include "scrape.h"
#include "service.h"
#include "srv.h"
#include "tls.h"

#include <stdio.h>

#define SUMMARY_OPTS(X, S)                                                                         \
    X(S, listen, STR, "listen", "LISTEN_ADDR", "0.0.0.0:50054", "HOST:PORT to serve gRPC on")      \
    X(S, log_level, STR, "log-level", "LOG_LEVEL", "info", "debug, info, warn or error")
CONF_DECLARE(summary_opts, SUMMARY_OPTS)

int main(int argc, char **argv)
{
    summary_opts opts = {0};
    service_opts svopts = {0};
    srv_opts sopts = {0};
    cli_conf copts = {0};
    tls_opts topts = {0};
    scrape_opts mopts = {0};
    otlp_opts oopts = {0};
    const conf_section secs[] = {
        CONF_SECTION(summary_opts, &opts), CONF_SECTION(service_opts, &svopts),
        CONF_SECTION(cli_conf, &copts),    CONF_SECTION(srv_opts, &sopts),
        CONF_SECTION(tls_opts, &topts),    CONF_SECTION(scrape_opts, &mopts),
        CONF_SECTION(otlp_opts, &oopts),
    };
    const size_t nsecs = sizeof secs / sizeof secs[0];
    srv *server = NULL;
    health *hl = NULL;
    cli *client = NULL;
    service *sv = NULL;
    tls *mtls = NULL;
    char err[512];
    metrics *m = NULL;
    otlp *exp = NULL;
    scrape *sc = NULL;
    char maddr[300];
    int status = 2;

    srv_block_signals();
    int rc = conf_parse(argc, argv, "summary-svc",
                        "summarizes ended sessions from store-svc's event log with llm-svc, "
                        "durably (a sweep retries what failed)",
                        secs, nsecs);
    if (rc != 0) {
        status = rc > 0 ? 0 : 2;
        goto out;
    }
    if (log_setup("summary-svc", opts.log_level) != 0 ||
        scrape_setup(&mopts, "summary-svc", opts.listen, maddr, sizeof maddr, &m) != 0 ||
        otlp_setup(&oopts, "summary-svc", m, &exp) != 0)
        goto out;
    if (service_check_opts(&svopts, err, sizeof err) != 0) {
        fprintf(stderr, "summary-svc: %s\n", err);
        goto out;
    }
    if (tls_create(&topts, &mtls, err, sizeof err) != 0) {
        log_error("%s", err);
        goto out;
    }

    status = 1;
    client = cli_create((int)copts.threads, sopts.max_message_bytes);
    cli_use_tls(client, mtls);
    cli_set_metrics(client, m);
    cli_set_tracer(client, exp);
    sv = service_create(&svopts, client, copts.round_robin, m, exp, err, sizeof err);
    if (sv == NULL) {
        log_error("%s", err);
        status = 2;
        goto out;
    }
    server = srv_create("summary-svc", opts.listen, &sopts);
    hl = health_attach(server);
    srv_use_tls(server, mtls);
    srv_set_metrics(server, m);
    srv_set_tracer(server, exp);
    if (service_register(sv, server) != 0) {
        log_error("cannot register the Summary methods");
        goto out;
    }
    if (m != NULL && (sc = scrape_start(maddr, m, health_serving, hl)) == NULL)
        goto out;
    if (srv_start(server) != 0)
        goto out; /* srv_start logged the address */
    log_info("serving on port %d; store-svc %s, llm-svc %s", srv_port(server), svopts.store,
             svopts.llm);
    service_start(sv);
    srv_run(server);
    status = 0;

out:
    scrape_stop(&sc);
    /* Jobs first (they finish the calls waiting on them), then the server
     * those calls belong to, then the client the jobs used. */
    if (sv != NULL)
        service_stop(sv);
    if (server != NULL)
        srv_destroy(&server);
    service_destroy(&sv);
    if (client != NULL)
        cli_destroy(&client);
    tls_destroy(&mtls);
    otlp_destroy(&exp);
    metrics_destroy(&m);
    conf_free(secs, nsecs);
    return status;
}
