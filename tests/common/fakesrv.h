/* fakesrv — an in-process gRPC server for C unit tests that stand in for a
 * peer service (store-svc, llm-svc, summary-svc) or run a real one: made on
 * a free loopback port, its methods added by the test, run on a thread of
 * its own, then stopped and joined. Header-only (tests of several folders
 * include it by path); failures are cmocka assertions. */
#ifndef CONVO_TESTS_FAKESRV_H
#define CONVO_TESTS_FAKESRV_H

#include "srv.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <cmocka.h>

typedef struct fakesrv {
    srv *s;
    pthread_t run;
    char target[64]; /* 127.0.0.1:PORT, once running */
} fakesrv;

/* The server, not yet started: the test adds its methods to f->s. */
static inline void fakesrv_create(fakesrv *f, const char *name)
{
    srv_opts o = {.threads = 2,
                  .shutdown_grace_ms = 2000,
                  .drain_delay_ms = 0,
                  .max_message_bytes = 4 << 20,
                  .max_queued_writes = 256,
                  .max_calls = 100};
    f->s = srv_create(name, "127.0.0.1:0", &o);
    assert_non_null(f->s);
}

/* Adds n methods (their handlers get no method data). */
static inline void fakesrv_add(fakesrv *f, const srv_method *ms, size_t n)
{
    for (size_t i = 0; i < n; i++)
        assert_int_equal(srv_add_method(f->s, &ms[i], NULL), 0);
}

static inline void *fakesrv__main(void *arg)
{
    srv_run(arg);
    return NULL;
}

/* Starts serving on its own thread; f->target is where to call it. */
static inline void fakesrv_run(fakesrv *f)
{
    assert_int_equal(srv_start(f->s), 0);
    assert_int_equal(pthread_create(&f->run, NULL, fakesrv__main, f->s), 0);
    snprintf(f->target, sizeof f->target, "127.0.0.1:%d", srv_port(f->s));
}

/* Stops, joins the thread and frees the server. */
static inline void fakesrv_stop(fakesrv *f)
{
    srv_stop(f->s);
    pthread_join(f->run, NULL);
    srv_destroy(&f->s);
}

#endif
