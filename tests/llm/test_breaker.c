/* breaker: the circuit's states driven by a clock the test holds. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "breaker.h"

#define FAILURES 3
#define COOLDOWN 1000

static int admit(breaker *b, int64_t now, breaker_ticket *t)
{
    int moved = 0;
    return breaker_admit(b, now, t, &moved);
}

/* Fails `n` requests admitted at `now`. */
static void fail_n(breaker *b, int64_t now, int n)
{
    for (int i = 0; i < n; i++) {
        breaker_ticket t;
        assert_int_equal(admit(b, now, &t), 1);
        breaker_report(b, &t, BREAKER_FAILURE, now);
    }
}

static void opens_after_failures_in_a_row(void **state)
{
    breaker *b = breaker_create(FAILURES, COOLDOWN);
    breaker_ticket t;
    fail_n(b, 0, FAILURES - 1);
    assert_int_equal(admit(b, 0, &t), 1);
    breaker_report(b, &t, BREAKER_SUCCESS, 0); /* the count starts again */
    fail_n(b, 0, FAILURES - 1);
    assert_int_equal(breaker_get(b), BREAKER_CLOSED);
    assert_int_equal(admit(b, 0, &t), 1);
    assert_int_equal(breaker_report(b, &t, BREAKER_FAILURE, 10), 1);
    assert_int_equal(breaker_get(b), BREAKER_OPEN);
    assert_int_equal(admit(b, 10 + COOLDOWN - 1, &t), 0);
    assert_int_equal(breaker_wait_ms(b, 10 + COOLDOWN - 1), 1);
    breaker_destroy(&b);
    assert_null(b);
}

static void one_probe_after_the_cooldown(void **state)
{
    breaker *b = breaker_create(FAILURES, COOLDOWN);
    fail_n(b, 0, FAILURES);
    breaker_ticket probe, other;
    int moved = 0;
    assert_int_equal(breaker_admit(b, COOLDOWN, &probe, &moved), 1);
    assert_int_equal(moved, 1);
    assert_int_equal(breaker_get(b), BREAKER_HALF_OPEN);
    assert_true(probe.probe);
    assert_int_equal(admit(b, COOLDOWN, &other), 0); /* the probe is out */
    /* A probe that learnt nothing lets the next request probe. */
    assert_int_equal(breaker_report(b, &probe, BREAKER_NEUTRAL, COOLDOWN), 0);
    assert_int_equal(admit(b, COOLDOWN, &probe), 1);
    assert_int_equal(breaker_report(b, &probe, BREAKER_SUCCESS, COOLDOWN), 1);
    assert_int_equal(breaker_get(b), BREAKER_CLOSED);
    assert_int_equal(admit(b, COOLDOWN, &other), 1);
    assert_false(other.probe);
    breaker_destroy(&b);
}

static void a_failed_probe_opens_it_again(void **state)
{
    breaker *b = breaker_create(FAILURES, COOLDOWN);
    fail_n(b, 0, FAILURES);
    breaker_ticket probe;
    assert_int_equal(admit(b, COOLDOWN, &probe), 1);
    assert_int_equal(breaker_report(b, &probe, BREAKER_FAILURE, 5000), 1);
    assert_int_equal(breaker_get(b), BREAKER_OPEN);
    assert_int_equal(admit(b, 5000 + COOLDOWN - 1, &probe), 0);
    assert_int_equal(admit(b, 5000 + COOLDOWN, &probe), 1);
    breaker_destroy(&b);
}

static void stale_tickets_change_nothing(void **state)
{
    breaker *b = breaker_create(FAILURES, COOLDOWN);
    breaker_ticket early;
    assert_int_equal(admit(b, 0, &early), 1); /* a slow request, admitted while closed */
    fail_n(b, 0, FAILURES);
    /* Its late success neither closes the open circuit ... */
    assert_int_equal(breaker_report(b, &early, BREAKER_SUCCESS, 1), 0);
    assert_int_equal(breaker_get(b), BREAKER_OPEN);
    breaker_ticket probe;
    assert_int_equal(admit(b, COOLDOWN, &probe), 1);
    /* ... nor settles the probe of the half-open one. */
    assert_int_equal(breaker_report(b, &early, BREAKER_FAILURE, COOLDOWN), 0);
    assert_int_equal(breaker_get(b), BREAKER_HALF_OPEN);
    assert_int_equal(breaker_report(b, &probe, BREAKER_SUCCESS, COOLDOWN), 1);
    /* Closed again, a ticket of the first closed spell still counts for nothing. */
    fail_n(b, COOLDOWN, FAILURES - 1);
    assert_int_equal(breaker_report(b, &early, BREAKER_FAILURE, COOLDOWN), 0);
    assert_int_equal(breaker_get(b), BREAKER_CLOSED);
    breaker_destroy(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(opens_after_failures_in_a_row),
        cmocka_unit_test(one_probe_after_the_cooldown),
        cmocka_unit_test(a_failed_probe_opens_it_again),
        cmocka_unit_test(stale_tickets_change_nothing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
