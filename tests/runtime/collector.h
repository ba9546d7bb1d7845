/* A stream consumer for the runtime tests: checks that items arrive in
 * order 1, 2, 3, ... and lets the test wait for the end. */
#ifndef CONVO_TEST_COLLECTOR_H
#define CONVO_TEST_COLLECTOR_H

#include "cli.h"
#include "testsvc.pb-c.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

typedef struct collector {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int64_t received;
    int64_t out_of_order;
    int pause_every; /* pause after every n items (0: never) */
    int paused;
    int done;
    rpc_code code;
    char message[256];
} collector;

static inline void collector_init(collector *c)
{
    memset(c, 0, sizeof *c);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
}

static inline int collector_on_msg(void *arg, const ProtobufCMessage *msg)
{
    collector *c = arg;
    const Convo__Test__Item *item = (const Convo__Test__Item *)msg;
    pthread_mutex_lock(&c->mu);
    c->received++;
    if (item->seq != c->received)
        c->out_of_order++;
    int pause = c->pause_every > 0 && c->received % c->pause_every == 0;
    if (pause)
        c->paused = 1;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return pause;
}

static inline void collector_on_done(void *arg, rpc_code code, const char *message,
                                     ProtobufCMessage *resp)
{
    collector *c = arg;
    pthread_mutex_lock(&c->mu);
    c->code = code;
    snprintf(c->message, sizeof c->message, "%s", message ? message : "");
    c->done = 1;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
}

/* Waits until `pred` holds or ms pass; returns whether it held. */
#define collector_wait(c, pred, ms)                                                                \
    ({                                                                                             \
        struct timespec until_;                                                                    \
        clock_gettime(CLOCK_REALTIME, &until_);                                                    \
        until_.tv_sec += (ms) / 1000;                                                              \
        until_.tv_nsec += ((ms) % 1000) * 1000000L;                                                \
        if (until_.tv_nsec >= 1000000000L) {                                                       \
            until_.tv_sec++;                                                                       \
            until_.tv_nsec -= 1000000000L;                                                         \
        }                                                                                          \
        pthread_mutex_lock(&(c)->mu);                                                              \
        while (!(pred) && pthread_cond_timedwait(&(c)->cv, &(c)->mu, &until_) == 0)                \
            ;                                                                                      \
        int ok_ = (pred);                                                                          \
        pthread_mutex_unlock(&(c)->mu);                                                            \
        ok_;                                                                                       \
    })

#endif
