/* llm-svc — serves convo.v1.Llm: talks to an OpenAI-compatible model
 * (OPENAI_BASE_URL; the offline model for offline runs and tests) and runs
 * the tools, round after round. */
#include "cli.h"
#include "convo_methods.h"
#include "conf.h"
#include "endpoints.h"
#include "health.h"
#include "kb.h"
#include "llm.h"
#include "log.h"
#include "mem.h"
#include "models.h"
#include "otlp.h"
#include "proc.h"
#include "scrape.h"
#include "srv.h"
#include "tls.h"
#include "tools.h"
#include "upstream.h"

#include <stdio.h>
#include <unistd.h>

/* The source tree's knowledge folder, for a binary run from the build tree. */
#ifndef LLM_KNOWLEDGE_SOURCE
#define LLM_KNOWLEDGE_SOURCE ""
#endif

#define MAIN_OPTS(X, S)                                                                            \
    X(S, listen, STR, "listen", "LISTEN_ADDR", "0.0.0.0:50052", "HOST:PORT to serve gRPC on")      \
    X(S, store, STR, "store", "STORE_ADDR", "127.0.0.1:50053",                                     \
      "store-svc, for lookup_contextual_data: HOST:PORT, replicas IP:PORT,IP:PORT,... or "         \
      "dns:///NAME:PORT")                                                                          \
    X(S, knowledge_dir, STR, "knowledge-dir", "KNOWLEDGE_DIR", "",                                 \
      "the folder of Markdown/text documents fetch_internal_knowledge searches; empty: the "       \
      "shipped one (PREFIX/share/convo/knowledge beside the installed binary)")                    \
    X(S, tool_timeout_ms, INT, "tool-timeout-ms", "LLM_TOOL_TIMEOUT_MS", "5000",                   \
      "deadline of a tool's calls to other services")                                              \
    X(S, log_level, STR, "log-level", "LOG_LEVEL", "info", "debug, info, warn or error")
CONF_DECLARE(main_opts, MAIN_OPTS)

/* The endpoints in the order they are tried (never their keys). */
static void log_endpoints(const endpoints *eps)
{
    for (size_t i = 0; i < endpoints_count(eps); i++) {
        const endpoint *ep = endpoints_get(eps, i);
        const char *model = endpoints_model(eps, i, NULL);
        log_info("upstream %zu: %s %s, model %s%s", i + 1, ep->name, ep->url,
                 model ? model : (i == 0 ? endpoints_default_model(eps) : "the request's"),
                 ep->api_key[0] ? "" : " (no API key)");
    }
}

int main(int argc, char **argv)
{
    main_opts mo = {0};
    endpoints_opts eo = {0};
    turn_opts to = {0};
    chat_opts co = {0};
    upstream_opts uo = {0};
    srv_opts so = {0};
    cli_conf cc = {0};
    models_opts mdo = {0};
    tls_opts tlo = {0};
    scrape_opts sco = {0};
    otlp_opts oo = {0};
    const conf_section secs[] = {
        CONF_SECTION(cli_conf, &cc),       CONF_SECTION(main_opts, &mo),
        CONF_SECTION(endpoints_opts, &eo), CONF_SECTION(models_opts, &mdo),
        CONF_SECTION(turn_opts, &to),      CONF_SECTION(chat_opts, &co),
        CONF_SECTION(upstream_opts, &uo),  CONF_SECTION(srv_opts, &so),
        CONF_SECTION(tls_opts, &tlo),      CONF_SECTION(scrape_opts, &sco),
        CONF_SECTION(otlp_opts, &oo),
    };
    const size_t nsecs = sizeof secs / sizeof secs[0];
    kb *k = NULL;
    tools *t = NULL;
    cli *c = NULL;
    upstream *u = NULL;
    endpoints *eps = NULL;
    models *mods = NULL;
    llm *l = NULL;
    srv *server = NULL;
    health *hl = NULL;
    tls *mtls = NULL;
    metrics *m = NULL;
    otlp *exp = NULL;
    scrape *sc = NULL;
    char maddr[300];
    char err[512];
    int status = 2;

    srv_block_signals();
    int rc = conf_parse(argc, argv, "llm-svc",
                        "streams answers from an OpenAI-compatible model and runs its tools", secs,
                        nsecs);
    if (rc != 0) {
        status = rc > 0 ? 0 : 2;
        goto out;
    }
    if (log_setup("llm-svc", mo.log_level) != 0 ||
        scrape_setup(&sco, "llm-svc", mo.listen, maddr, sizeof maddr, &m) != 0 ||
        otlp_setup(&oo, "llm-svc", m, &exp) != 0)
        goto out;
    if (endpoints_create(&eo, m, &eps, err, sizeof err) != 0) {
        fprintf(stderr, "llm-svc: %s\n", err);
        goto out;
    }
    if (tls_create(&tlo, &mtls, err, sizeof err) != 0 ||
        models_create(eo.model, mdo.allowed_models, mdo.router_config, &mods, err, sizeof err) !=
            0) {
        log_error("%s", err);
        goto out;
    }
    /* Every upstream stream holds a socket. */
    proc_raise_fd_limit();
    status = 1;
    if (mo.knowledge_dir[0] == '\0') {
        char *dir = proc_data_dir("knowledge", LLM_KNOWLEDGE_SOURCE);
        if (dir == NULL) {
            log_error("no knowledge folder beside the binary (../share/convo/knowledge): set "
                      "--knowledge-dir");
            goto out;
        }
        mem_free(mo.knowledge_dir);
        mo.knowledge_dir = dir;
    }
    if (kb_load(mo.knowledge_dir, &k, err, sizeof err) != 0) {
        log_error("knowledge base: %s", err);
        goto out;
    }
    c = cli_create((int)cc.threads, so.max_message_bytes);
    cli_use_tls(c, mtls);
    cli_set_metrics(c, m);
    cli_set_tracer(c, exp);
    /* The tool's reads are sent again to another replica when one fails
     * them UNAVAILABLE (cli.h). */
    static const rpc_method *const store_retry[] = {&convo__v1__store__get_session__method,
                                                    &convo__v1__store__list_user_sessions__method,
                                                    NULL};
    cli_channel *store =
        cli_channel_create(c, mo.store, "store-svc", cc.round_robin, store_retry, err, sizeof err);
    if (store == NULL) {
        log_error("--store: %s", err);
        status = 2;
        goto out;
    }
    t = tools_create();
    if (tool_knowledge_register(t, k) != 0 ||
        tool_context_register(t, store, mo.tool_timeout_ms) != 0) {
        log_error("cannot register the tools");
        goto out;
    }
    u = upstream_create(&uo, m);
    if (u == NULL) {
        log_error("cannot start the upstream loop (libcurl)");
        goto out;
    }
    l = llm_create(&to, &co, u, eps, mods, t, m);
    server = srv_create("llm-svc", mo.listen, &so);
    hl = health_attach(server);
    srv_use_tls(server, mtls);
    srv_set_metrics(server, m);
    srv_set_tracer(server, exp);
    if (llm_register(server, l) != 0)
        goto out;
    endpoints_publish(eps, hl);
    if (m != NULL && (sc = scrape_start(maddr, m, health_serving, hl)) == NULL)
        goto out;
    if (srv_start(server) != 0)
        goto out;
    log_endpoints(eps);
    log_info("callers may ask for the models: %s; %zu knowledge passages from %s, store %s",
             models_list(mods), kb_passages(k), mo.knowledge_dir, mo.store);
    srv_run(server);
    status = 0;
out:
    scrape_stop(&sc);
    if (eps != NULL)
        endpoints_publish(eps, NULL);
    if (server != NULL)
        srv_destroy(&server);
    /* The server is gone, so nothing starts new upstream requests. */
    upstream_destroy(&u);
    if (c != NULL)
        cli_destroy(&c);
    tls_destroy(&mtls);
    llm_destroy(&l);
    models_destroy(&mods);
    endpoints_destroy(&eps);
    tools_destroy(&t);
    kb_destroy(&k);
    otlp_destroy(&exp);
    metrics_destroy(&m);
    conf_free(secs, nsecs);
    return status;
}
