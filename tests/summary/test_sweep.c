/* sweep: when a session's next attempt is due (the backoff that the sweep
 * applies from the store's own data: end time and attempt count). */
#include "sweep.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

static void test_due_schedule(void **state)
{
    sweep_cfg cfg = {.delay_ms = 10000, .backoff_ms = 30000, .backoff_max_ms = 100000};
    const int64_t end = 1000000000000LL;
    /* First attempt: the delay after the end. */
    assert_int_equal(sweep_due_us(&cfg, end, 0), end + 10000LL * 1000);
    /* Then waits of 30, 60, 100 (capped), 100 s... */
    assert_int_equal(sweep_due_us(&cfg, end, 1), end + 40000LL * 1000);
    assert_int_equal(sweep_due_us(&cfg, end, 2), end + 100000LL * 1000);
    assert_int_equal(sweep_due_us(&cfg, end, 3), end + 200000LL * 1000);
    assert_int_equal(sweep_due_us(&cfg, end, 4), end + 300000LL * 1000);
}

static void test_due_never_overflows(void **state)
{
    sweep_cfg cfg = {.delay_ms = 0, .backoff_ms = 1000, .backoff_max_ms = 3600000};
    int64_t prev = 0;
    for (int32_t a = 0; a < 1000; a++) {
        int64_t due = sweep_due_us(&cfg, 0, a);
        assert_true(due >= prev);
        prev = due;
    }
    assert_int_equal(sweep_due_us(&cfg, 0, 1000) - sweep_due_us(&cfg, 0, 999), 3600000LL * 1000);
}

static void test_zero_backoff(void **state)
{
    sweep_cfg cfg = {.delay_ms = 500, .backoff_ms = 0, .backoff_max_ms = 0};
    assert_int_equal(sweep_due_us(&cfg, 7, 5), 7 + 500 * 1000);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_due_schedule),
        cmocka_unit_test(test_due_never_overflows),
        cmocka_unit_test(test_zero_backoff),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
