/* gwsrv — the gateway's front end served in-process for the C tests of
 * ws.c and http.c: the real modules (caller, auth, limits, ws, http,
 * session) behind a real libwebsockets context on a libev loop, as main.c
 * sets them up, listening on a free loopback port. The test thread runs
 * the loop while a client thread (a raw WebSocket client here, or libcurl)
 * talks to it over the socket. Header-only; failures in the test thread
 * are cmocka assertions, a client thread only records what it saw. */
#ifndef CONVO_TESTS_GWSRV_H
#define CONVO_TESTS_GWSRV_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "auth.h"
#include "bridge.h"
#include "caller.h"
#include "defroute.h"
#include "front.h"
#include "gw.h"
#include "http.h"
#include "lim.h"
#include "mem.h"
#include "session.h"
#include "ws.h"

#include <arpa/inet.h>
#include <ev.h>
#include <libwebsockets.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define GWSRV_ARGS_MAX  32
#define GWSRV_WAIT_S    10.0  /* the longest a client may take */
#define GWSRV_TICK_S    0.002 /* how often the loop looks whether it is done */
#define GWSRV_IO_SECS   5     /* a client's socket timeouts */
#define GWSRV_DEAD_ADDR "127.0.0.1:1"

typedef struct gwsrv {
    gw g;
    conf_section secs[4];
    int port;
    ev_timer tick;
    double deadline;
    atomic_int client_done;
    pthread_t client;
    void (*client_fn)(void *arg);
    void *client_arg;
} gwsrv;

/* Starts the gateway's front end with the defaults plus `args` (flags as
 * on the command line, NULL-terminated), its gRPC channels to `target`
 * (NULL: an address nothing listens on) over `client`, and new WebSocket
 * connections handed to open(arg) (NULL: to sessions, as main.c does). */
static void gwsrv_start(gwsrv *s, struct ev_loop *loop, cli *client, const char *target,
                        const char *const *args, ws_open_fn open, void *arg)
{
    memset(s, 0, sizeof *s);
    gw *g = &s->g;
    char *argv[GWSRV_ARGS_MAX] = {"gwsrv"};
    int argc = 1;
    for (; args != NULL && args[argc - 1] != NULL; argc++) {
        assert_true(argc < GWSRV_ARGS_MAX - 1);
        argv[argc] = (char *)args[argc - 1];
    }
    s->secs[0] = CONF_SECTION(gw_opts, &g->opts);
    s->secs[1] = CONF_SECTION(lim_opts, &g->lim_opts);
    s->secs[2] = CONF_SECTION(auth_opts, &g->auth_opts);
    s->secs[3] = CONF_SECTION(defroute_opts, &g->defroute_opts);
    assert_int_equal(conf_parse(argc, argv, "gwsrv", "", s->secs, 4), 0);
    char err[512];
    assert_int_equal(auth_new(&g->auth_opts, &g->auth, err, sizeof err), 0);
    g->callers = caller_rules_create(&g->opts, err, sizeof err);
    assert_non_null(g->callers);
    g->limits = lim_create(&g->lim_opts);
    assert_int_equal(defroute_create(&g->defroute_opts, &g->defroute, err, sizeof err), 0);
    g->loop = loop;
    g->bridge = bridge_create();
    g->client = client;
    const char *addr = target != NULL ? target : GWSRV_DEAD_ADDR;
    g->router = cli_channel_create(client, addr, NULL, 0, NULL, err, sizeof err);
    g->llm = cli_channel_create(client, addr, NULL, 0, NULL, err, sizeof err);
    g->store = cli_channel_create(client, addr, NULL, 0, NULL, err, sizeof err);
    g->summary = cli_channel_create(client, addr, NULL, 0, NULL, err, sizeof err);
    assert_non_null(g->router);
    g->sessions = sess_table_create(g);
    g->ws = ws_server_create(g, open != NULL ? open : sess_open, open != NULL ? arg : g->sessions);

    assert_int_equal(front_listen(g, "127.0.0.1", 0), 0);
    s->port = front_port(g);
    assert_true(s->port > 0);
}

/* Stops and frees what gwsrv_start made (not the loop and the client). */
static void gwsrv_stop(gwsrv *s)
{
    gw *g = &s->g;
    lws_context_destroy(g->ctx);
    ws_server_destroy(&g->ws);
    bridge_drain(g->bridge);
    bridge_destroy(&g->bridge);
    mem_free(g->sessions);
    lim_destroy(&g->limits);
    defroute_destroy(&g->defroute);
    caller_rules_destroy(&g->callers);
    auth_destroy(&g->auth);
    conf_free(s->secs, 4);
}

static void *gwsrv__client_main(void *arg)
{
    gwsrv *s = arg;
    s->client_fn(s->client_arg);
    atomic_store(&s->client_done, 1);
    return NULL;
}

static void gwsrv__on_tick(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    gwsrv *s = w->data;
    if (atomic_load(&s->client_done) || ev_now(loop) > s->deadline)
        ev_break(loop, EVBREAK_ALL);
}

/* Runs fn(arg) on a client thread while the loop serves, until it
 * returns; the loop then serves `linger_ms` more (what the client's
 * last bytes caused: a close, charges given back). Returns 0, or -1 when
 * the client did not finish within GWSRV_WAIT_S. */
static int gwsrv_run_client(gwsrv *s, void (*fn)(void *arg), void *arg, int linger_ms)
{
    struct ev_loop *loop = s->g.loop;
    s->client_fn = fn;
    s->client_arg = arg;
    atomic_store(&s->client_done, 0);
    assert_int_equal(pthread_create(&s->client, NULL, gwsrv__client_main, s), 0);
    ev_now_update(loop);
    s->deadline = ev_now(loop) + GWSRV_WAIT_S;
    ev_timer_init(&s->tick, gwsrv__on_tick, GWSRV_TICK_S, GWSRV_TICK_S);
    s->tick.data = s;
    ev_timer_start(loop, &s->tick);
    ev_run(loop, 0);
    int rc = atomic_load(&s->client_done) ? 0 : -1;
    pthread_join(s->client, NULL);
    if (linger_ms > 0) {
        ev_now_update(loop);
        s->deadline = ev_now(loop) + linger_ms / 1000.0;
        ev_run(loop, 0);
    }
    ev_timer_stop(loop, &s->tick);
    return rc;
}

#endif
