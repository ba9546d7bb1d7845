/* The load generator's checks and figures (tests/gateway/loadgen/plan.c and
 * stats.c): an answer is accepted only token by token in order, and the
 * percentiles and steady window are what the README says they are. */
#include "plan.h"
#include "stats.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

static int feed(const plan *p, plan_answer *a, const char *const *tokens)
{
    int rc = 0;
    for (size_t i = 0; tokens[i] != NULL; i++)
        rc |= plan_token(p, a, tokens[i], strlen(tokens[i]));
    return rc;
}

static void test_answer_in_order_is_complete(void **state)
{
    plan p = {0};
    plan_init(&p, 3, 20, 1);
    assert_string_equal(p.message, "[[words:3]] [[delay:20]]");
    assert_string_equal(p.expected, "w1 w2 w3");
    plan_answer a = {0};
    const char *const ok[] = {"w1", " w2", "", " w3", NULL};
    assert_int_equal(feed(&p, &a, ok), 0);
    assert_true(plan_complete(&p, &a));
    plan_free(&p);
}

static void test_lost_repeated_reordered_or_extra_tokens_are_caught(void **state)
{
    plan p = {0};
    plan_init(&p, 3, 0, 1);
    const char *const lost[] = {"w1", " w3", NULL};
    const char *const repeated[] = {"w1", " w2", " w2", " w3", NULL};
    const char *const reordered[] = {"w1", " w3", " w2", NULL};
    const char *const extra[] = {"w1", " w2", " w3", " w4", NULL};
    const char *const short_answer[] = {"w1", " w2", NULL};
    const char *const *bad[] = {lost, repeated, reordered, extra};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        plan_answer a = {0};
        assert_int_equal(feed(&p, &a, bad[i]), -1);
        assert_false(plan_complete(&p, &a));
    }
    plan_answer a = {0};
    assert_int_equal(feed(&p, &a, short_answer), 0);
    assert_false(plan_complete(&p, &a));
    /* Once wrong, a later right token does not make it right again. */
    plan_answer b = {0};
    plan_token(&p, &b, "w2", 2);
    plan_token(&p, &b, "w1 w2 w3", 8);
    assert_false(plan_complete(&p, &b));
    plan_free(&p);
}

static void test_starts_and_pauses(void **state)
{
    plan p = {0};
    plan_init(&p, 1, 0, 7);
    p.sessions = 4;
    p.stagger_ms = 1000;
    assert_true(plan_start_ms(&p, 0) == 0);
    assert_true(plan_start_ms(&p, 2) == 500);
    assert_true(plan_think_ms(&p) == 0);
    p.think_ms = 200;
    double lo = 1e9, hi = 0;
    for (int i = 0; i < 10000; i++) {
        double t = plan_think_ms(&p);
        lo = fmin(lo, t);
        hi = fmax(hi, t);
    }
    assert_true(lo >= 100 && lo < 110);
    assert_true(hi <= 300 && hi > 290);
    plan_free(&p);
}

static void test_percentile_as_the_node_generator_takes_it(void **state)
{
    const double v[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    assert_true(stats_percentile(v, 10, 50) == 6);
    assert_true(stats_percentile(v, 10, 99) == 10);
    assert_true(stats_percentile(v, 10, 0) == 1);
    assert_true(stats_percentile(v, 1, 99) == 1);
    assert_true(isnan(stats_percentile(v, 0, 50)));
}

static void test_steady_window_counts_what_happened_inside_it(void **state)
{
    stats *s = stats_create(1000);
    /* Session A measured 1000..1100, session B 1050..1150: all active
     * from 1050 to 1100. */
    stats_span(s, 1000, 1100);
    stats_span(s, 1050, 1150);
    stats_first_token(s, 1020, 1025); /* started before the window */
    stats_first_token(s, 1055, 1058); /* inside */
    stats_first_token(s, 1090, 1097); /* inside */
    stats_first_token(s, 1120, 1121); /* after */
    const double at[] = {1010, 1060, 1070, 1080, 1099, 1130};
    for (size_t i = 0; i < sizeof at / sizeof at[0]; i++)
        stats_token(s, at[i]);
    stats_error(s, "error frame: timeout");
    stats_error(s, "error frame: timeout");
    stats_error(s, "closed before the last answer (close code 1001)");

    stats_summary sum;
    stats_summarize(s, 2, 2.0, &sum);
    assert_int_equal(sum.tokens, 6);
    assert_true(sum.all.tokens_per_s == 3.0);
    assert_int_equal(sum.all.answers, 4);
    assert_true(sum.all.p50_ms == 5);
    assert_int_equal(sum.errors, 3);
    assert_int_equal(sum.nkinds, 2);
    assert_true(sum.has_steady);
    assert_true(fabs(sum.steady.seconds - 0.05) < 1e-9);
    assert_int_equal(sum.steady.answers, 2);
    assert_true(sum.steady.p50_ms == 7);
    assert_true(fabs(sum.steady.tokens_per_s - 4 / 0.05) < 1e-6);

    /* A session that never finished: no steady window. */
    stats_summarize(s, 3, 2.0, &sum);
    assert_false(sum.has_steady);
    stats_destroy(&s);
    assert_null(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_answer_in_order_is_complete),
        cmocka_unit_test(test_lost_repeated_reordered_or_extra_tokens_are_caught),
        cmocka_unit_test(test_starts_and_pauses),
        cmocka_unit_test(test_percentile_as_the_node_generator_takes_it),
        cmocka_unit_test(test_steady_window_counts_what_happened_inside_it),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
