/* breaker: the circuit's states driven by a clock the test holds, and its
 * cool-down's growth, cap and reset (the jitter seeded, so every run draws
 * the same waits). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "backoff.h"
#include "breaker.h"

#define FAILURES     3
#define COOLDOWN     1000
#define COOLDOWN_MAX 16000
/* Breakers driven side by side to see the spread of the jittered waits. */
#define TRIALS 200
/* Openings followed: enough for the waits to reach the cap. */
#define OPENINGS 8
#define SEED     42

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

/* Drives a breaker opened at *now to its probe and returns the probe's
 * ticket, *now then the moment it was admitted: refused until the wait
 * the opening drew, admitted then. */
static breaker_ticket probe_when_due(breaker *b, int64_t *now)
{
    breaker_ticket t;
    int64_t wait = breaker_wait_ms(b, *now);
    assert_in_range(wait, 1, COOLDOWN_MAX);
    assert_int_equal(admit(b, *now + wait - 1, &t), 0);
    *now += wait;
    assert_int_equal(admit(b, *now, &t), 1);
    assert_true(t.probe);
    return t;
}

/* The cool-down of each of OPENINGS openings in a row (the first after
 * FAILURES failures, each next after a failed probe) into waits[]. */
static void open_again_and_again(breaker *b, int64_t *now, int64_t waits[OPENINGS])
{
    fail_n(b, *now, FAILURES);
    for (int k = 0; k < OPENINGS; k++) {
        assert_int_equal(breaker_get(b), BREAKER_OPEN);
        waits[k] = breaker_wait_ms(b, *now);
        if (k + 1 < OPENINGS) {
            breaker_ticket probe = probe_when_due(b, now);
            assert_int_equal(breaker_report(b, &probe, BREAKER_FAILURE, *now), 1);
        }
    }
}

static void opens_after_failures_in_a_row(void **state)
{
    breaker *b = breaker_create(FAILURES, COOLDOWN, COOLDOWN_MAX);
    breaker_ticket t;
    fail_n(b, 0, FAILURES - 1);
    assert_int_equal(admit(b, 0, &t), 1);
    breaker_report(b, &t, BREAKER_SUCCESS, 0); /* the count starts again */
    fail_n(b, 0, FAILURES - 1);
    assert_int_equal(breaker_get(b), BREAKER_CLOSED);
    assert_int_equal(admit(b, 0, &t), 1);
    assert_int_equal(breaker_report(b, &t, BREAKER_FAILURE, 10), 1);
    assert_int_equal(breaker_get(b), BREAKER_OPEN);
    /* The first cool-down: at least the base, at most BACKOFF_SPREAD times it. */
    int64_t wait = breaker_wait_ms(b, 10);
    assert_in_range(wait, COOLDOWN, BACKOFF_SPREAD * COOLDOWN);
    assert_int_equal(admit(b, 10 + wait - 1, &t), 0);
    assert_int_equal(breaker_wait_ms(b, 10 + wait - 1), 1);
    assert_int_equal(breaker_wait_ms(b, 10 + wait), 0);
    breaker_destroy(&b);
    assert_null(b);
}

static void one_probe_after_the_cooldown(void **state)
{
    breaker *b = breaker_create(FAILURES, COOLDOWN, COOLDOWN_MAX);
    fail_n(b, 0, FAILURES);
    breaker_ticket probe, other;
    int moved = 0;
    int64_t due = breaker_wait_ms(b, 0);
    assert_int_equal(breaker_admit(b, due, &probe, &moved), 1);
    assert_int_equal(moved, 1);
    assert_int_equal(breaker_get(b), BREAKER_HALF_OPEN);
    assert_true(probe.probe);
    assert_int_equal(admit(b, due, &other), 0); /* the probe is out */
    /* A probe that learnt nothing lets the next request probe. */
    assert_int_equal(breaker_report(b, &probe, BREAKER_NEUTRAL, due), 0);
    assert_int_equal(admit(b, due, &probe), 1);
    assert_int_equal(breaker_report(b, &probe, BREAKER_SUCCESS, due), 1);
    assert_int_equal(breaker_get(b), BREAKER_CLOSED);
    assert_int_equal(admit(b, due, &other), 1);
    assert_false(other.probe);
    breaker_destroy(&b);
}

static void a_failed_probe_opens_it_again(void **state)
{
    breaker *b = breaker_create(FAILURES, COOLDOWN, COOLDOWN_MAX);
    fail_n(b, 0, FAILURES);
    int64_t now = 0;
    breaker_ticket probe = probe_when_due(b, &now);
    assert_int_equal(breaker_report(b, &probe, BREAKER_FAILURE, 5000), 1);
    assert_int_equal(breaker_get(b), BREAKER_OPEN);
    /* Open from the failure's report, for a wait of its own. */
    now = 5000;
    probe = probe_when_due(b, &now);
    assert_int_equal(breaker_get(b), BREAKER_HALF_OPEN);
    breaker_destroy(&b);
}

static void stale_tickets_change_nothing(void **state)
{
    breaker *b = breaker_create(FAILURES, COOLDOWN, COOLDOWN_MAX);
    breaker_ticket early;
    assert_int_equal(admit(b, 0, &early), 1); /* a slow request, admitted while closed */
    fail_n(b, 0, FAILURES);
    /* Its late success neither closes the open circuit ... */
    assert_int_equal(breaker_report(b, &early, BREAKER_SUCCESS, 1), 0);
    assert_int_equal(breaker_get(b), BREAKER_OPEN);
    int64_t now = 1;
    breaker_ticket probe = probe_when_due(b, &now);
    /* ... nor settles the probe of the half-open one. */
    assert_int_equal(breaker_report(b, &early, BREAKER_FAILURE, now), 0);
    assert_int_equal(breaker_get(b), BREAKER_HALF_OPEN);
    assert_int_equal(breaker_report(b, &probe, BREAKER_SUCCESS, now), 1);
    /* Closed again, a ticket of the first closed spell still counts for nothing. */
    fail_n(b, now, FAILURES - 1);
    assert_int_equal(breaker_report(b, &early, BREAKER_FAILURE, now), 0);
    assert_int_equal(breaker_get(b), BREAKER_CLOSED);
    breaker_destroy(&b);
}

static void failed_probes_grow_the_cooldown_up_to_the_cap(void **state)
{
    backoff_seed(SEED);
    int64_t sum[OPENINGS] = {0}, longest = 0;
    for (int trial = 0; trial < TRIALS; trial++) {
        breaker *b = breaker_create(FAILURES, COOLDOWN, COOLDOWN_MAX);
        int64_t now = 0, waits[OPENINGS];
        open_again_and_again(b, &now, waits);
        for (int k = 0; k < OPENINGS; k++) {
            /* Never below the base, never past BACKOFF_SPREAD times the one before
             * (the base before the first) nor the cap. */
            int64_t prev = k > 0 ? waits[k - 1] : COOLDOWN;
            int64_t hi =
                BACKOFF_SPREAD * prev < COOLDOWN_MAX ? BACKOFF_SPREAD * prev : COOLDOWN_MAX;
            assert_in_range(waits[k], COOLDOWN, hi);
            sum[k] += waits[k];
        }
        if (waits[OPENINGS - 1] > longest)
            longest = waits[OPENINGS - 1];
        breaker_destroy(&b);
    }
    /* Each failed probe made the next wait longer on average (a fixed
     * cool-down keeps it flat): means of about 2, 3.4, 5.3 s, then held
     * by the cap, which the last openings come close to. */
    assert_true(sum[0] > TRIALS * (COOLDOWN + COOLDOWN / 2));
    for (int k = 1; k < 3; k++)
        assert_true(sum[k] * 10 > sum[k - 1] * 14);
    assert_true(longest > COOLDOWN_MAX * 3 / 4);
}

static void a_successful_probe_starts_the_cooldown_again(void **state)
{
    backoff_seed(SEED);
    int grown = 0;
    for (int trial = 0; trial < TRIALS; trial++) {
        breaker *b = breaker_create(FAILURES, COOLDOWN, COOLDOWN_MAX);
        int64_t now = 0, waits[OPENINGS];
        open_again_and_again(b, &now, waits);
        grown += waits[OPENINGS - 1] > BACKOFF_SPREAD * COOLDOWN;
        breaker_ticket probe = probe_when_due(b, &now);
        assert_int_equal(breaker_report(b, &probe, BREAKER_SUCCESS, now), 1);
        assert_int_equal(breaker_get(b), BREAKER_CLOSED);
        /* Opened again later: from the base, not from where it stopped. */
        fail_n(b, now, FAILURES);
        assert_in_range(breaker_wait_ms(b, now), COOLDOWN, BACKOFF_SPREAD * COOLDOWN);
        breaker_destroy(&b);
    }
    assert_true(grown > TRIALS / 2); /* it had grown past that before */
}

static void a_cap_at_or_below_the_base_is_a_fixed_cooldown(void **state)
{
    /* The flags allow it (an operator who set only the base): every wait is
     * the base, neither shorter nor growing. */
    const int64_t caps[] = {COOLDOWN, COOLDOWN / 2};
    for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
        breaker *b = breaker_create(1, COOLDOWN, caps[c]);
        int64_t now = 0;
        fail_n(b, now, 1);
        for (int k = 0; k < OPENINGS; k++) {
            assert_int_equal(breaker_wait_ms(b, now), COOLDOWN);
            breaker_ticket probe = probe_when_due(b, &now);
            assert_int_equal(breaker_report(b, &probe, BREAKER_FAILURE, now), 1);
        }
        breaker_destroy(&b);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(opens_after_failures_in_a_row),
        cmocka_unit_test(one_probe_after_the_cooldown),
        cmocka_unit_test(a_failed_probe_opens_it_again),
        cmocka_unit_test(stale_tickets_change_nothing),
        cmocka_unit_test(failed_probes_grow_the_cooldown_up_to_the_cap),
        cmocka_unit_test(a_successful_probe_starts_the_cooldown_again),
        cmocka_unit_test(a_cap_at_or_below_the_base_is_a_fixed_cooldown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
