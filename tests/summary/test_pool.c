/* pool: jobs run on the workers, the queue bound is hard, and destroying
 * the pool runs what was queued. */
#include "pool.h"

#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

static atomic_int ran;
static pthread_mutex_t gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cv = PTHREAD_COND_INITIALIZER;
static int gate_open;

static void count_job(void *arg)
{
    atomic_fetch_add(&ran, 1);
}

/* Blocks until the gate opens: keeps the workers busy. */
static void gated_job(void *arg)
{
    pthread_mutex_lock(&gate_mu);
    while (!gate_open)
        pthread_cond_wait(&gate_cv, &gate_mu);
    pthread_mutex_unlock(&gate_mu);
    atomic_fetch_add(&ran, 1);
}

static void open_gate(void)
{
    pthread_mutex_lock(&gate_mu);
    gate_open = 1;
    pthread_cond_broadcast(&gate_cv);
    pthread_mutex_unlock(&gate_mu);
}

static void test_runs_everything(void **state)
{
    atomic_store(&ran, 0);
    pool *p = pool_create(3, 1000);
    for (int i = 0; i < 500; i++)
        assert_int_equal(pool_submit(p, count_job, NULL), 0);
    pool_destroy(&p);
    assert_null(p);
    assert_int_equal(atomic_load(&ran), 500);
}

static void test_bounded_queue(void **state)
{
    atomic_store(&ran, 0);
    gate_open = 0;
    pool *p = pool_create(2, 3);
    assert_int_equal(pool_submit(p, gated_job, NULL), 0);
    assert_int_equal(pool_submit(p, gated_job, NULL), 0);
    /* Wait until both workers hold a job. */
    for (int i = 0; i < 1000 && pool_running(p) < 2; i++)
        usleep(1000);
    assert_int_equal(pool_running(p), 2);
    for (int i = 0; i < 3; i++)
        assert_int_equal(pool_submit(p, gated_job, NULL), 0);
    assert_int_equal(pool_queued(p), 3);
    assert_int_equal(pool_submit(p, gated_job, NULL), POOL_EFULL);
    assert_string_equal(pool_strerror(POOL_EFULL), "the job queue is full");
    open_gate();
    /* Queued jobs still run on destroy. */
    pool_destroy(&p);
    assert_int_equal(atomic_load(&ran), 5);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_runs_everything),
        cmocka_unit_test(test_bounded_queue),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
