/* backoff: the ceilings, each jitter's bounds and spread, resets, and the
 * per-thread generator. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <pthread.h>
#include <stdint.h>

#include "backoff.h"

/* Draws per statistical check: a bound missed in that many draws is a bug,
 * not bad luck (each check below fails by chance with p < 1e-9). */
#define DRAWS 2000

static void ceilings_double_to_the_cap(void **state)
{
    const int64_t want[] = {100, 200, 400, 800, 1600, 3200, 5000, 5000};
    for (int a = 1; a <= 8; a++)
        assert_int_equal(backoff_ceiling(100, 5000, a), want[a - 1]);
    /* No overflow, however many failures. */
    assert_int_equal(backoff_ceiling(1, INT64_MAX, 63), INT64_MAX / 2 + 1);
    assert_int_equal(backoff_ceiling(1, INT64_MAX, 1000000), INT64_MAX);
    assert_int_equal(backoff_ceiling(INT64_MAX / 3, INT64_MAX, 5), INT64_MAX);
    /* A cap below the base wins; zero stays zero. */
    assert_int_equal(backoff_ceiling(250, 0, 3), 0);
    assert_int_equal(backoff_ceiling(0, 0, 7), 0);
}

static void no_jitter_is_the_ceiling_and_reset_starts_over(void **state)
{
    backoff b;
    backoff_init(&b, 100, 1000, BACKOFF_NONE);
    const int64_t want[] = {100, 200, 400, 800, 1000, 1000};
    for (int i = 0; i < 6; i++)
        assert_int_equal(backoff_next(&b), want[i]);
    assert_int_equal(b.attempts, 6);
    backoff_reset(&b);
    assert_int_equal(b.attempts, 0);
    assert_int_equal(backoff_next(&b), 100);
}

static void full_jitter_spans_zero_to_the_ceiling(void **state)
{
    backoff_seed(42);
    for (int attempt = 1; attempt <= 8; attempt++) {
        int64_t ceiling = backoff_ceiling(100, 5000, attempt);
        int64_t lo = INT64_MAX, hi = -1;
        for (int i = 0; i < DRAWS; i++) {
            backoff b;
            backoff_init(&b, 100, 5000, BACKOFF_FULL);
            int64_t w = 0;
            for (int k = 0; k < attempt; k++)
                w = backoff_next(&b);
            assert_in_range(w, 0, ceiling);
            lo = w < lo ? w : lo;
            hi = w > hi ? w : hi;
        }
        /* Spread over the whole range: within 1% of both ends. */
        assert_true(lo <= ceiling / 100);
        assert_true(hi >= ceiling - ceiling / 100);
    }
}

static void decorrelated_jitter_stays_between_base_and_three_times_the_last(void **state)
{
    backoff_seed(7);
    backoff b;
    backoff_init(&b, 100, 5000, BACKOFF_DECORRELATED);
    int64_t prev = 100, at_cap = 0, low = 0;
    for (int i = 0; i < DRAWS; i++) {
        int64_t w = backoff_next(&b);
        int64_t hi = prev * BACKOFF_SPREAD < 5000 ? prev * BACKOFF_SPREAD : 5000;
        assert_in_range(w, 100, hi);
        at_cap += w >= 4000;
        low += w < 200;
        prev = w;
    }
    /* It reaches up towards the cap and still comes down near the base. */
    assert_true(at_cap > 0);
    assert_true(low > 0);
    backoff_reset(&b);
    assert_in_range(backoff_next(&b), 100, 100 * BACKOFF_SPREAD);
}

static void bad_bounds_are_raised(void **state)
{
    backoff b;
    backoff_init(&b, 0, -5, BACKOFF_DECORRELATED);
    assert_int_equal(b.base_ms, 1);
    assert_int_equal(b.cap_ms, 1);
    for (int i = 0; i < 10; i++)
        assert_int_equal(backoff_next(&b), 1);
}

static void rand_between_is_inclusive(void **state)
{
    backoff_seed(3);
    int seen[4] = {0};
    for (int i = 0; i < DRAWS; i++) {
        int64_t v = backoff_rand_between(5, 8);
        assert_in_range(v, 5, 8);
        seen[v - 5] = 1;
    }
    assert_true(seen[0] && seen[1] && seen[2] && seen[3]);
    assert_int_equal(backoff_rand_between(9, 9), 9);
    assert_int_equal(backoff_rand_between(9, 2), 9);
}

static void *first_draws(void *arg)
{
    int64_t *out = arg;
    for (int i = 0; i < 4; i++)
        out[i] = backoff_rand_between(0, INT64_MAX - 1);
    return NULL;
}

static void seeds_repeat_and_threads_differ(void **state)
{
    int64_t a[4], b[4];
    backoff_seed(99);
    first_draws(a);
    backoff_seed(99);
    first_draws(b);
    assert_memory_equal(a, b, sizeof a);
    /* Two threads never seeded: each its own sequence. */
    pthread_t t1, t2;
    assert_int_equal(pthread_create(&t1, NULL, first_draws, a), 0);
    assert_int_equal(pthread_create(&t2, NULL, first_draws, b), 0);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    assert_memory_not_equal(a, b, sizeof a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(ceilings_double_to_the_cap),
        cmocka_unit_test(no_jitter_is_the_ceiling_and_reset_starts_over),
        cmocka_unit_test(full_jitter_spans_zero_to_the_ceiling),
        cmocka_unit_test(decorrelated_jitter_stays_between_base_and_three_times_the_last),
        cmocka_unit_test(bad_bounds_are_raised),
        cmocka_unit_test(rand_between_is_inclusive),
        cmocka_unit_test(seeds_repeat_and_threads_differ),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
