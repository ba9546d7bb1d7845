/* gateway — WebSocket sessions relayed over gRPC, REST, and the web page.
 *
 * One libwebsockets event loop (this thread) owns every connection and
 * session; gRPC client threads hand their results to it through the
 * bridge. No thread per session or stream. */
#include "gw.h"
#include "log.h"
#include "mem.h"
#include "proc.h"
#include "session.h"
#include "srv.h"
#include "ws.h"

#include <libwebsockets.h>
#include <pthread.h>
#include <signal.h>
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

gw *gw_main;

static atomic_int stop_signal;

static void *signal_thread(void *arg)
{
    gw *g = arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    int sig = 0;
    sigwait(&set, &sig);
    atomic_store(&stop_signal, sig);
    lws_cancel_service(g->ctx);
    return NULL;
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

static void on_shutdown_tick(lws_sorted_usec_list_t *sul)
{
    /* Only wakes the loop so it can check the shutdown deadline. */
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

int main(int argc, char **argv)
{
    int rc = 1;
    srv_block_signals();
    proc_raise_fd_limit();

    static gw g;
    gw_main = &g;
    conf_section secs[] = {CONF_SECTION(gw_opts, &g.opts), CONF_SECTION(cli_conf, &g.client_opts)};
    int prc = conf_parse(argc, argv, "gateway",
                         "WebSocket sessions relayed over gRPC to the convo services, REST and "
                         "the web page",
                         secs, 2);
    if (prc != 0)
        return prc > 0 ? 0 : 2;
    if (log_setup("gateway", g.opts.log_level) != 0) {
        rc = 2;
        goto out;
    }
    lws_set_log_level(LLL_ERR | LLL_WARN, lws_log);

    char host[300];
    int port;
    if (listen_address(&g.opts, host, sizeof host, &port) != 0) {
        log_error("the listen address must be HOST:PORT (--listen, LISTEN_ADDR, or HOST and PORT)");
        goto out;
    }
    if (g.opts.web_root[0] == '\0') {
        const char *root =
            dir_exists(GW_WEB_ROOT_SOURCE) ? GW_WEB_ROOT_SOURCE : GW_WEB_ROOT_INSTALLED;
        mem_free(g.opts.web_root);
        g.opts.web_root = mem_strdup(root);
    }
    if (!dir_exists(g.opts.web_root))
        log_warn("the web page folder '%s' does not exist; /app/ will answer 404 (set --web-root)",
                 g.opts.web_root);

    g.bridge = bridge_create();
    g.client = cli_create((int)g.opts.grpc_threads, 4 << 20);
    g.router = cli_channel_create(g.client, g.opts.router, g.client_opts.round_robin);
    g.llm = cli_channel_create(g.client, g.opts.llm, g.client_opts.round_robin);
    g.store = cli_channel_create(g.client, g.opts.store, g.client_opts.round_robin);
    g.summary = cli_channel_create(g.client, g.opts.summary, g.client_opts.round_robin);

    static struct lws_protocols protocols[] = {
        {"convo", ws_callback, 0, 0, 0, NULL, 0},
        {NULL, NULL, 0, 0, 0, NULL, 0},
    };
    protocols[0].per_session_data_size = ws_session_data_size();
    lws_retry_bo_t retry = {
        .secs_since_valid_ping = (uint16_t)g.opts.ping_secs,
        .secs_since_valid_hangup = (uint16_t)(g.opts.ping_secs + 10),
    };
    struct lws_context_creation_info info;
    memset(&info, 0, sizeof info);
    info.port = port;
    info.iface = strcmp(host, "0.0.0.0") == 0 || host[0] == '\0' ? NULL : host;
    info.protocols = protocols;
    info.options = LWS_SERVER_OPTION_VALIDATE_UTF8 | LWS_SERVER_OPTION_DISABLE_IPV6;
    if (g.opts.ping_secs > 0)
        info.retry_and_idle_policy = &retry;
    info.pt_serv_buf_size = 32768;
    g.ctx = lws_create_context(&info);
    if (g.ctx == NULL) {
        log_error("cannot listen on %s:%d: the address is in use or invalid; pick another with "
                  "--listen HOST:PORT",
                  host, port);
        goto out;
    }
    bridge_set_context(g.bridge, g.ctx);
    pthread_t sigthr;
    pthread_create(&sigthr, NULL, signal_thread, &g);
    pthread_detach(sigthr);
    log_info("gateway %s serving HTTP and WebSocket on %s:%d (router %s, llm %s, store %s, "
             "summary %s; web page /app/ from %s)",
             conf_version(), host, port, g.opts.router, g.opts.llm, g.opts.store, g.opts.summary,
             g.opts.web_root);

    while (atomic_load(&stop_signal) == 0)
        lws_service(g.ctx, 0);

    /* Shutdown: close every connection, then give sessions a bounded time
     * to store their last events and end. */
    log_info("gateway: shutting down (%s); %zu sessions to close",
             atomic_load(&stop_signal) == SIGTERM ? "SIGTERM" : "SIGINT", sess_count());
    g.stopping = 1;
    sess_close_all(&g);
    int64_t deadline = rpc_now_ms() + SHUTDOWN_FLUSH_MS;
    lws_sorted_usec_list_t tick;
    memset(&tick, 0, sizeof tick);
    while (sess_count() > 0 && rpc_now_ms() < deadline) {
        lws_sul_schedule(g.ctx, 0, &tick, on_shutdown_tick, 100 * LWS_US_PER_MS);
        lws_service(g.ctx, 0);
    }
    lws_sul_cancel(&tick);
    if (sess_count() > 0)
        log_warn("gateway: %zu sessions could not store their last events in time", sess_count());
    rc = 0;
out:
    if (g.client != NULL)
        cli_destroy(&g.client);
    if (g.ctx != NULL)
        lws_context_destroy(g.ctx);
    bridge_destroy(&g.bridge);
    conf_free(secs, 2);
    return rc;
}
