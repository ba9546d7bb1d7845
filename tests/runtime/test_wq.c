/* wq and workers: order, the full and closed contract, the refusals
 * counted, draining for an event loop, and worker threads that run what was
 * queued before they stop. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <unistd.h>

#include "workers.h"
#include "wq.h"

/* A job that appends its number to a log. */
typedef struct order_log {
    int seen[4096];
    int n;
} order_log;

static order_log order;

static void record(void *arg)
{
    order.seen[order.n++] = (int)(intptr_t)arg;
}

static void fifo_bounded_and_counted(void **state)
{
    order.n = 0;
    wq *q = wq_create(3, NULL, NULL);
    for (int i = 0; i < 3; i++)
        assert_int_equal(wq_push(q, record, (void *)(intptr_t)i), 0);
    assert_int_equal(wq_push(q, record, (void *)(intptr_t)99), WQ_EFULL);
    assert_int_equal(wq_push(q, record, (void *)(intptr_t)99), WQ_EFULL);
    assert_int_equal(wq_refused(q), 2);
    assert_int_equal(wq_len(q), 3);
    wq_fn fn;
    void *arg;
    assert_int_equal(wq_pop(q, &fn, &arg), 0);
    fn(arg);
    /* Room again, and the order kept across the ring's wrap. */
    assert_int_equal(wq_push(q, record, (void *)(intptr_t)3), 0);
    while (wq_len(q) > 0) {
        assert_int_equal(wq_pop(q, &fn, &arg), 0);
        fn(arg);
    }
    assert_int_equal(order.n, 4);
    for (int i = 0; i < 4; i++)
        assert_int_equal(order.seen[i], i);
    assert_string_equal(wq_strerror(WQ_EFULL), "the queue is full");
    wq_destroy(&q);
    assert_null(q);
}

static void closed_refuses_but_hands_out_what_waits(void **state)
{
    order.n = 0;
    wq *q = wq_create(WQ_UNBOUNDED, NULL, NULL);
    /* Beyond the first ring: it grows, nothing is refused. */
    for (int i = 0; i < 1000; i++)
        assert_int_equal(wq_push(q, record, (void *)(intptr_t)i), 0);
    wq_close(q);
    wq_close(q);
    assert_int_equal(wq_push(q, record, NULL), WQ_ECLOSED);
    assert_int_equal(wq_refused(q), 0);
    wq_fn fn;
    void *arg;
    while (wq_pop(q, &fn, &arg) == 0)
        fn(arg);
    assert_int_equal(order.n, 1000);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(order.seen[i], i);
    assert_int_equal(wq_pop(q, &fn, &arg), WQ_ECLOSED);
    wq_destroy(&q);
}

/* An event loop's view: woken once per batch, drains what is there. */
static atomic_int wakes;
static wq *loop_q;

static void on_wake(void *arg)
{
    assert_ptr_equal(arg, &wakes);
    atomic_fetch_add(&wakes, 1);
}

static void push_from_a_job(void *arg)
{
    record(arg);
    assert_int_equal(wq_push(loop_q, record, (void *)(intptr_t)100), 0);
}

static void drain_runs_a_batch_and_wakes_per_batch(void **state)
{
    order.n = 0;
    atomic_store(&wakes, 0);
    loop_q = wq_create(WQ_UNBOUNDED, on_wake, &wakes);
    assert_int_equal(wq_drain(loop_q), 0);
    for (int i = 0; i < 5; i++)
        assert_int_equal(wq_push(loop_q, record, (void *)(intptr_t)i), 0);
    assert_int_equal(atomic_load(&wakes), 1);
    assert_int_equal(wq_push(loop_q, push_from_a_job, (void *)(intptr_t)5), 0);
    assert_int_equal(wq_drain(loop_q), 6);
    /* The job queued while the batch ran waits for the next drain, and
     * woke the loop for it. */
    assert_int_equal(order.n, 6);
    assert_int_equal(atomic_load(&wakes), 2);
    assert_int_equal(wq_len(loop_q), 1);
    assert_int_equal(wq_drain(loop_q), 1);
    assert_int_equal(order.seen[6], 100);
    /* Dropped, never run, when the queue is freed. */
    assert_int_equal(wq_push(loop_q, record, (void *)(intptr_t)7), 0);
    wq_destroy(&loop_q);
    assert_int_equal(order.n, 7);
}

/* Many producers, one waiting consumer: nothing lost, each producer's jobs
 * in its own order. */
#define PRODUCERS     4
#define PER_PRODUCER  5000
#define PRODUCER_STEP 100000

static atomic_int next_of[PRODUCERS];
static atomic_int out_of_order;

static void check_order(void *arg)
{
    int v = (int)(intptr_t)arg;
    int p = v / PRODUCER_STEP;
    if (atomic_fetch_add(&next_of[p], 1) != v % PRODUCER_STEP)
        atomic_fetch_add(&out_of_order, 1);
}

static void *produce(void *arg)
{
    wq *q = loop_q;
    int p = (int)(intptr_t)arg;
    for (int i = 0; i < PER_PRODUCER;) {
        int rc = wq_push(q, check_order, (void *)(intptr_t)(p * PRODUCER_STEP + i));
        if (rc == WQ_EFULL)
            sched_yield();
        else
            i++;
    }
    return NULL;
}

static void many_producers_one_consumer(void **state)
{
    loop_q = wq_create(64, NULL, NULL);
    atomic_store(&out_of_order, 0);
    pthread_t t[PRODUCERS];
    for (int p = 0; p < PRODUCERS; p++) {
        atomic_store(&next_of[p], 0);
        assert_int_equal(pthread_create(&t[p], NULL, produce, (void *)(intptr_t)p), 0);
    }
    wq_fn fn;
    void *arg;
    for (int n = 0; n < PRODUCERS * PER_PRODUCER; n++) {
        assert_int_equal(wq_pop(loop_q, &fn, &arg), 0);
        fn(arg);
    }
    for (int p = 0; p < PRODUCERS; p++) {
        pthread_join(t[p], NULL);
        assert_int_equal(atomic_load(&next_of[p]), PER_PRODUCER);
    }
    assert_int_equal(atomic_load(&out_of_order), 0);
    assert_int_equal(wq_len(loop_q), 0);
    wq_destroy(&loop_q);
}

/* ---- workers --------------------------------------------------------------- */

static atomic_int ran;
static pthread_mutex_t gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cv = PTHREAD_COND_INITIALIZER;
static int gate_open;

static void count_job(void *arg)
{
    atomic_fetch_add(&ran, 1);
}

/* Blocks until the gate opens: keeps a worker busy. */
static void gated_job(void *arg)
{
    pthread_mutex_lock(&gate_mu);
    while (!gate_open)
        pthread_cond_wait(&gate_cv, &gate_mu);
    pthread_mutex_unlock(&gate_mu);
    atomic_fetch_add(&ran, 1);
}

static void workers_run_everything(void **state)
{
    atomic_store(&ran, 0);
    workers *w = workers_create(3, 1000);
    for (int i = 0; i < 500; i++)
        assert_int_equal(workers_submit(w, count_job, NULL), 0);
    workers_destroy(&w);
    assert_null(w);
    assert_int_equal(atomic_load(&ran), 500);
}

static void workers_queue_is_bounded_and_runs_on_destroy(void **state)
{
    atomic_store(&ran, 0);
    gate_open = 0;
    workers *w = workers_create(2, 3);
    assert_int_equal(workers_submit(w, gated_job, NULL), 0);
    assert_int_equal(workers_submit(w, gated_job, NULL), 0);
    /* Wait until both threads hold a job. */
    for (int i = 0; i < 5000 && workers_queued(w) > 0; i++)
        usleep(1000);
    assert_int_equal(workers_queued(w), 0);
    assert_int_equal(workers_busy(w), 2);
    for (int i = 0; i < 3; i++)
        assert_int_equal(workers_submit(w, gated_job, NULL), 0);
    assert_int_equal(workers_queued(w), 3);
    assert_int_equal(workers_busy(w), 5);
    assert_int_equal(workers_submit(w, gated_job, NULL), WQ_EFULL);
    assert_int_equal(workers_busy(w), 5);
    pthread_mutex_lock(&gate_mu);
    gate_open = 1;
    pthread_cond_broadcast(&gate_cv);
    pthread_mutex_unlock(&gate_mu);
    /* Queued jobs still run on destroy. */
    workers_destroy(&w);
    assert_int_equal(atomic_load(&ran), 5);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(fifo_bounded_and_counted),
        cmocka_unit_test(closed_refuses_but_hands_out_what_waits),
        cmocka_unit_test(drain_runs_a_batch_and_wakes_per_batch),
        cmocka_unit_test(many_producers_one_consumer),
        cmocka_unit_test(workers_run_everything),
        cmocka_unit_test(workers_queue_is_bounded_and_runs_on_destroy),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
