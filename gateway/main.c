/* gateway — WebSocket sessions relayed over gRPC, REST, and the web page.
 *
 * One event loop (this thread) owns every connection and session; gRPC
 * client threads hand their results to it through the bridge. No thread
 * per session or stream. The loop is libev's, lent to libwebsockets: its
 * own poll() loop scans every connection on each wake-up, and a wake-up per
 * token is the gateway's commonest event, so with thousands of sessions
 * epoll is the difference. */
#include "auth.h"
#include "caller.h"
#include "convo_methods.h"
#include "evlog.h"
#include "front.h"
#include "gw.h"
#include "keep.h"
#include "lim.h"
#include "log.h"
#include "mem.h"
#include "otlp.h"
#include "proc.h"
#include "scrape.h"
#include "session.h"
#include "srv.h"
#include "tls.h"
#include "ws.h"

#include <arpa/inet.h>
#include <ev.h>
#include <libwebsockets.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifndef GW_WEB_ROOT_SOURCE
#define GW_WEB_ROOT_SOURCE ""
#endif
#ifndef GW_WEB_ROOT_INSTALLED
#define GW_WEB_ROOT_INSTALLED ""
#endif

/* How long sessions get to store their last events at shutdown. */
#define SHUTDOWN_FLUSH_MS 10000

/* How often the shutdown checks whether every session has ended. */
#define SHUTDOWN_TICK_S 0.1

/* The largest gRPC message the gateway sends or receives: the services'
 * default --max-message-bytes (GRPC_MAX_MESSAGE_BYTES, runtime/srv.h). */
#define GW_GRPC_MAX_MESSAGE_BYTES (4 << 20)

/* The process around the gateway: its loop and how it stops. */
typedef struct runner {
    gw *g;
    struct ev_loop *loop;
    ev_async stop_watcher;
    atomic_int stop_signal;
    int64_t shutdown_deadline;
} runner;

/* Signals are blocked in every thread (the gRPC core's too); this one
 * waits for them and wakes the loop, which is the only safe way in. */
static void *signal_thread(void *arg)
{
    runner *r = arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    int sig = 0;
    sigwait(&set, &sig);
    atomic_store(&r->stop_signal, sig);
    ev_async_send(r->loop, &r->stop_watcher);
    return NULL;
}

static void on_stop(struct ev_loop *l, ev_async *w, int revents)
{
    (void)w;
    (void)revents;
    ev_break(l, EVBREAK_ALL);
}

static void on_shutdown_tick(struct ev_loop *l, ev_timer *w, int revents)
{
    (void)revents;
    runner *r = w->data;
    if (sess_count(r->g->sessions) == 0 || rpc_now_ms() >= r->shutdown_deadline)
        ev_break(l, EVBREAK_ALL);
}

/* /healthz on the metrics listener: 503 once the gateway is stopping. */
static int healthy(void *arg)
{
    gw *g = arg;
    return !atomic_load(&g->stopping);
}

/* Before each scrape: the gauges /api/health's counters already keep. */
static void sync_gauges(void *arg)
{
    gw *g = arg;
    metrics_gauge_set(g->mx.connections, atomic_load(&g->counters.connections));
    metrics_gauge_set(g->mx.events_buffered, atomic_load(&g->counters.events_buffered));
    metrics_gauge_set(g->mx.events_buffered_bytes, atomic_load(&g->counters.events_buffered_bytes));
}

static void lws_log(int level, const char *line)
{
    char msg[512];
    snprintf(msg, sizeof msg, "%s", line);
    size_t n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    const log_field f[] = {{"origin", "libwebsockets"}, {NULL, NULL}};
    log_fields(level & LLL_ERR ? LOG_ERROR : LOG_WARN, f, "%s", msg);
}

static int dir_exists(const char *path)
{
    struct stat st;
    return path[0] != '\0' && stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* --listen, else HOST and PORT as in the seed. Returns 0 or -1. */
static int listen_address(const gw_opts *o, char *host, size_t hostlen, int *port)
{
    char addr[300];
    if (o->listen[0] != '\0') {
        snprintf(addr, sizeof addr, "%s", o->listen);
    } else {
        const char *h = getenv("HOST");
        const char *p = getenv("PORT");
        snprintf(addr, sizeof addr, "%s:%s", h && h[0] ? h : "0.0.0.0", p && p[0] ? p : "8000");
    }
    char *colon = strrchr(addr, ':');
    if (colon == NULL)
        return -1;
    *colon = '\0';
    char *end;
    long v = strtol(colon + 1, &end, 10);
    if (*end != '\0' || v < 0 || v > 65535)
        return -1;
    snprintf(host, hostlen, "%s", addr);
    *port = (int)v;
    return 0;
}

/* The ranges of the gateway's own options that 0 and up does not cover.
 * Returns 0, or -1 with the reason in err. */
/* Whether host (a listen address) only takes connections from this
 * machine. */
static int loopback(const char *host)
{
    unsigned char a[16];
    if (strcmp(host, "localhost") == 0)
        return 1;
    if (inet_pton(AF_INET, host, a) == 1)
        return a[0] == 127;
    return inet_pton(AF_INET6, host, a) == 1 && memcmp(a, in6addr_loopback.s6_addr, 16) == 0;
}

/* Who may call: auth (refusing --auth dev on a public address unless
 * allowed), the origins and proxies, the limits. Returns 0 or -1 (logged). */
static int setup_callers(gw *g, const char *host)
{
    char err[512];
    if (auth_new(&g->auth_opts, &g->auth, err, sizeof err) != 0) {
        log_error("%s", err);
        return -1;
    }
    auth_mode mode = auth_get_mode(g->auth);
    if (mode == AUTH_MODE_DEV && !loopback(host) && !g->auth_opts.dev_allow_remote) {
        log_error("--auth dev lets anyone sign in as anyone: it listens on a loopback address "
                  "only (--listen 127.0.0.1:PORT), or pass --dev-allow-remote");
        return -1;
    }
    if (mode == AUTH_MODE_NONE)
        log_warn("--auth none: every caller is trusted to be the user_id it names, as in the "
                 "seed; anyone can read and continue anyone's sessions. Use --auth jwt (or dev "
                 "locally)");
    else if (mode == AUTH_MODE_DEV)
        log_warn("--auth dev: the gateway signs its own tokens (POST /api/dev/token) for any user "
                 "name; for local use only");
    g->callers = caller_rules_create(&g->opts, err, sizeof err);
    if (g->callers == NULL) {
        log_error("%s", err);
        return -1;
    }
    g->limits = lim_create(&g->lim_opts);
    return 0;
}

/* The calls sent again when a replica fails them UNAVAILABLE before any
 * answer (cli.h): the ones that change nothing, and Chat before its first
 * event (nothing was shown or stored; what the dead replica asked the model
 * is asked again). The event log's calls retry by themselves (evlog.c). */
static const rpc_method *const router_retry[] = {&convo__v1__router__route__method, NULL};
static const rpc_method *const llm_retry[] = {&convo__v1__llm__chat__method, NULL};
static const rpc_method *const store_retry[] = {
    &convo__v1__store__get_session__method, &convo__v1__store__list_events__method,
    &convo__v1__store__list_user_sessions__method, &convo__v1__store__keep_sessions_alive__method,
    NULL};
static const rpc_method *const summary_retry[] = {&convo__v1__summary__summarize__method,
                                                  &convo__v1__summary__get_summary__method, NULL};

/* The channels to the four services; -1 (logged) when an address is not
 * valid. */
static int open_channels(gw *g)
{
    struct {
        cli_channel **ch;
        const char *flag;
        const char *addr;
        const char *service; /* the name its certificates carry (cli.h) */
        const rpc_method *const *retry;
    } peers[] = {{&g->router, "router", g->opts.router, "router-svc", router_retry},
                 {&g->llm, "llm", g->opts.llm, "llm-svc", llm_retry},
                 {&g->store, "store", g->opts.store, "store-svc", store_retry},
                 {&g->summary, "summary", g->opts.summary, "summary-svc", summary_retry}};
    char err[400];
    for (size_t i = 0; i < sizeof peers / sizeof peers[0]; i++) {
        *peers[i].ch =
            cli_channel_create(g->client, peers[i].addr, peers[i].service,
                               g->client_opts.round_robin, peers[i].retry, err, sizeof err);
        if (*peers[i].ch == NULL) {
            log_error("--%s: %s", peers[i].flag, err);
            return -1;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    int rc = 1;
    srv_block_signals();
    proc_raise_fd_limit();

    static gw g;
    static runner run = {.g = &g};
    static tls_opts topts;
    tls *mtls = NULL;
    char err[512];
    scrape_opts mopts = {0};
    static otlp_opts oopts;
    scrape *sc = NULL;
    conf_section secs[] = {CONF_SECTION(gw_opts, &g.opts),
                           CONF_SECTION(cli_conf, &g.client_opts),
                           CONF_SECTION(auth_opts, &g.auth_opts),
                           CONF_SECTION(lim_opts, &g.lim_opts),
                           CONF_SECTION(defroute_opts, &g.defroute_opts),
                           CONF_SECTION(tls_opts, &topts),
                           CONF_SECTION(scrape_opts, &mopts),
                           CONF_SECTION(otlp_opts, &oopts)};
    const size_t nsecs = sizeof secs / sizeof secs[0];
    int prc = conf_parse(argc, argv, "gateway",
                         "WebSocket sessions relayed over gRPC to the convo services, REST and "
                         "the web page",
                         secs, nsecs);
    if (prc != 0) {
        conf_free(secs, nsecs);
        return prc > 0 ? 0 : 2;
    }
    if (log_setup("gateway", g.opts.log_level) != 0) {
        rc = 2;
        goto out;
    }
    lws_set_log_level(LLL_ERR | LLL_WARN, lws_log);
    if (tls_create(&topts, &mtls, err, sizeof err) != 0) {
        log_error("%s", err);
        rc = 2;
        goto out;
    }

    char host[300], self[320], maddr[320];
    int port;
    if (listen_address(&g.opts, host, sizeof host, &port) != 0) {
        log_error("the listen address must be HOST:PORT (--listen, LISTEN_ADDR, or HOST and PORT)");
        goto out;
    }
    snprintf(self, sizeof self, "%s:%d", host, port);
    if (scrape_setup(&mopts, "gateway", self, maddr, sizeof maddr, &g.metrics) != 0 ||
        otlp_setup(&oopts, "gateway", g.metrics, &g.tracer) != 0) {
        rc = 2;
        goto out;
    }
    metrics_register(g.metrics, METRICS_SECTION(gw_metrics, &g.mx));
    metrics_on_render(g.metrics, sync_gauges, &g);
    evlog_metrics_init(&g);
    if (g.opts.web_root[0] == '\0') {
        const char *root =
            dir_exists(GW_WEB_ROOT_SOURCE) ? GW_WEB_ROOT_SOURCE : GW_WEB_ROOT_INSTALLED;
        mem_free(g.opts.web_root);
        g.opts.web_root = mem_strdup(root);
    }
    if (!dir_exists(g.opts.web_root))
        log_warn("the web page folder '%s' does not exist; /app/ will answer 404 (set --web-root)",
                 g.opts.web_root);
    if (setup_callers(&g, host) != 0) {
        rc = 2;
        goto out;
    }
    char route_err[512];
    if (defroute_create(&g.defroute_opts, &g.defroute, route_err, sizeof route_err) != 0) {
        log_error("%s", route_err);
        rc = 2;
        goto out;
    }

    g.bridge = bridge_create();
    g.client = cli_create((int)g.client_opts.threads, GW_GRPC_MAX_MESSAGE_BYTES);
    cli_use_tls(g.client, mtls);
    cli_set_metrics(g.client, g.metrics);
    cli_set_tracer(g.client, g.tracer);
    if (open_channels(&g) != 0) {
        rc = 2;
        goto out;
    }

    g.sessions = sess_table_create(&g);
    g.ws = ws_server_create(&g, sess_open, g.sessions);

    run.loop = ev_loop_new(EVFLAG_AUTO);
    g.loop = run.loop;
    if (run.loop == NULL) {
        log_error("cannot create the event loop (libev): out of memory or descriptors");
        goto out;
    }
    const char *iface = strcmp(host, "0.0.0.0") == 0 || host[0] == '\0' ? NULL : host;
    if (front_listen(&g, iface, port) != 0) {
        log_error("cannot listen on %s:%d: the address is in use or invalid (pick another with "
                  "--listen HOST:PORT), or libwebsockets' libev plugin is missing (install the "
                  "Debian package libwebsockets-evlib-ev)",
                  host, port);
        goto out;
    }
    if (keep_create(&g, &g.keep, err, sizeof err) != 0) {
        log_error("%s", err);
        rc = 2;
        goto out;
    }
    if (g.metrics != NULL && (sc = scrape_start(maddr, g.metrics, healthy, &g)) == NULL)
        goto out; /* scrape_start logged the address */
    ev_async_init(&run.stop_watcher, on_stop);
    ev_async_start(run.loop, &run.stop_watcher);
    pthread_t sigthr;
    pthread_create(&sigthr, NULL, signal_thread, &run);
    pthread_detach(sigthr);
    log_info("gateway %s serving HTTP and WebSocket on %s:%d (router %s, llm %s, store %s, "
             "summary %s; web page /app/ from %s)",
             conf_version(), host, port, g.opts.router, g.opts.llm, g.opts.store, g.opts.summary,
             g.opts.web_root);

    ev_run(run.loop, 0);

    /* Shutdown: close every connection, then give sessions a bounded time
     * to store their last events and end. */
    log_info("gateway: shutting down (%s); %zu sessions to close",
             atomic_load(&run.stop_signal) == SIGTERM ? "SIGTERM" : "SIGINT",
             sess_count(g.sessions));
    g.stopping = 1;
    sess_close_all(g.sessions);
    run.shutdown_deadline = rpc_now_ms() + SHUTDOWN_FLUSH_MS;
    ev_timer tick;
    ev_timer_init(&tick, on_shutdown_tick, 0., SHUTDOWN_TICK_S);
    tick.data = &run;
    ev_timer_start(run.loop, &tick);
    ev_run(run.loop, 0);
    ev_timer_stop(run.loop, &tick);
    if (sess_count(g.sessions) > 0)
        log_warn("gateway: %zu sessions could not store their last events in time",
                 sess_count(g.sessions));
    rc = 0;
out:
    scrape_stop(&sc);
    if (g.client != NULL)
        cli_destroy(&g.client);
    keep_destroy(&g.keep);
    if (g.ctx != NULL)
        lws_context_destroy(g.ctx);
    if (run.loop != NULL) {
        ev_async_stop(run.loop, &run.stop_watcher);
        ev_loop_destroy(run.loop);
    }
    ws_server_destroy(&g.ws);
    bridge_destroy(&g.bridge);
    lim_destroy(&g.limits);
    defroute_destroy(&g.defroute);
    caller_rules_destroy(&g.callers);
    auth_destroy(&g.auth);
    tls_destroy(&mtls);
    /* Last: closing the connections above ended their spans. */
    otlp_destroy(&g.tracer);
    metrics_destroy(&g.metrics);
    conf_free(secs, nsecs);
    return rc;
}
