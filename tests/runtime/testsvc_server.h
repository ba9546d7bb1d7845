/* testsvc — the convo.test.Test service (testsvc.proto) on the runtime's
 * server, for the runtime's tests, its benchmark and the cross-language
 * tests. */
#ifndef CONVO_TESTSVC_SERVER_H
#define CONVO_TESTSVC_SERVER_H

#include "health.h"
#include "srv.h"

#include <pthread.h>
#include "testsvc_methods.h"

/* Registers every Test method on `s` and starts the Drip ticker thread. */
void testsvc_register(srv *s);
/* Stops the ticker; finishes any Drip call still running. */
void testsvc_shutdown(void);
/* Hang and Drip calls whose handler saw a cancellation. */
int testsvc_cancels(void);
/* Waits up to `ms` for testsvc_cancels() to reach `n`; returns whether it did. */
int testsvc_wait_cancels(int n, int ms);

/* A Test server (with health) on 127.0.0.1 and a free port, srv_run on
 * its own thread. */
typedef struct testsvc_server {
    srv *s;
    health *health; /* the server's */
    pthread_t run;
    char target[64];
} testsvc_server;

/* Options suitable for tests (2 threads, 2 s grace). */
srv_opts testsvc_default_opts(void);
/* Returns 0, or -1 when the server could not start. */
int testsvc_server_start(testsvc_server *t, const srv_opts *opts);
/* The same with mutual TLS (mtls NULL: plaintext); mtls outlives the server. */
int testsvc_server_start_tls(testsvc_server *t, const srv_opts *opts, tls *mtls);
/* srv_stop, wait for srv_run, testsvc_shutdown, srv_destroy. */
void testsvc_server_stop(testsvc_server *t);

#endif
