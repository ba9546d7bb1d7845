/* limits: each refusal comes at its bound and not before, keys are kept
 * apart, what was refused is counted, the table stays within --limit-keys
 * (forgetting the least recently used bucket, refusing new connection
 * counts), and idle entries are forgotten. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdio.h>

#include "lim.h"

static lim_opts opts(void)
{
    lim_opts o = {
        .conn_per_ip = 3,
        .conn_per_user = 2,
        .open_sessions_per_user = 3,
        .sessions_per_hour = 2,
        .messages_per_minute = 60, /* one a second */
        .rate_burst = 5,
        .tokens_per_minute = 1000,
        .rest_per_second = 10,
        .max_keys = 1000,
    };
    return o;
}

static void connections_are_refused_at_the_bound_and_given_back(void **state)
{
    lim_opts o = opts();
    lim *l = lim_create(&o);
    for (int i = 0; i < 3; i++)
        assert_int_equal(lim_hold(l, LIM_CONN_IP, "10.0.0.1", 0), 0);
    assert_int_equal(lim_hold(l, LIM_CONN_IP, "10.0.0.1", 0), LIM_EREFUSED);
    assert_int_equal(lim_hold(l, LIM_CONN_IP, "10.0.0.2", 0), 0); /* another address */
    assert_int_equal(lim_refused(l, LIM_CONN_IP), 1);
    lim_release(l, LIM_CONN_IP, "10.0.0.1", 0);
    assert_int_equal(lim_hold(l, LIM_CONN_IP, "10.0.0.1", 0), 0);
    assert_int_equal(lim_hold(l, LIM_CONN_IP, "10.0.0.1", 0), LIM_EREFUSED);
    /* Per user, a limit of its own. */
    assert_int_equal(lim_hold(l, LIM_CONN_USER, "alice", 0), 0);
    assert_int_equal(lim_hold(l, LIM_CONN_USER, "alice", 0), 0);
    assert_int_equal(lim_hold(l, LIM_CONN_USER, "alice", 0), LIM_EREFUSED);
    /* A count that drops to zero leaves the table. */
    lim_release(l, LIM_CONN_USER, "alice", 0);
    lim_release(l, LIM_CONN_USER, "alice", 0);
    assert_int_equal(lim_keys(l, LIM_CONN_USER), 0);
    lim_destroy(&l);
    assert_null(l);
}

static void sessions_in_memory_are_counted_per_user(void **state)
{
    lim_opts o = opts();
    lim *l = lim_create(&o);
    for (int i = 0; i < 3; i++)
        assert_int_equal(lim_hold(l, LIM_OPEN_SESSIONS, "alice", 0), 0);
    assert_int_equal(lim_hold(l, LIM_OPEN_SESSIONS, "alice", 0), LIM_EREFUSED);
    assert_int_equal(lim_hold(l, LIM_OPEN_SESSIONS, "bob", 0), 0);
    /* Apart from connections: alice holds none and still may not. */
    assert_int_equal(lim_hold(l, LIM_CONN_USER, "alice", 0), 0);
    assert_int_equal(lim_refused(l, LIM_OPEN_SESSIONS), 1);
    assert_int_equal(lim_refused(l, LIM_CONN_USER), 0);
    lim_release(l, LIM_OPEN_SESSIONS, "alice", 0);
    assert_int_equal(lim_hold(l, LIM_OPEN_SESSIONS, "alice", 0), 0);
    assert_string_equal(lim_code(LIM_OPEN_SESSIONS), "too_many_sessions_user");
    assert_string_equal(lim_name(LIM_OPEN_SESSIONS), "sessions_per_user");
    lim_destroy(&l);
}

static void a_rate_allows_its_burst_then_paces(void **state)
{
    lim_opts o = opts();
    lim *l = lim_create(&o);
    for (int i = 0; i < 5; i++)
        assert_int_equal(lim_take(l, LIM_MESSAGES, "bob", 1000), 0);
    assert_int_equal(lim_take(l, LIM_MESSAGES, "bob", 1000), LIM_EREFUSED);
    assert_int_equal(lim_take(l, LIM_MESSAGES, "carol", 1000), 0);
    /* One a second comes back: not before the second is over. */
    assert_int_equal(lim_take(l, LIM_MESSAGES, "bob", 1999), LIM_EREFUSED);
    assert_int_equal(lim_take(l, LIM_MESSAGES, "bob", 2000), 0);
    assert_int_equal(lim_take(l, LIM_MESSAGES, "bob", 2000), LIM_EREFUSED);
    assert_int_equal(lim_refused(l, LIM_MESSAGES), 3);
    lim_destroy(&l);
}

static void a_session_given_back_was_not_new(void **state)
{
    lim_opts o = opts();
    lim *l = lim_create(&o);
    assert_int_equal(lim_take(l, LIM_SESSIONS, "dave", 0), 0);
    assert_int_equal(lim_take(l, LIM_SESSIONS, "dave", 0), 0);
    assert_int_equal(lim_take(l, LIM_SESSIONS, "dave", 0), LIM_EREFUSED);
    lim_give(l, LIM_SESSIONS, "dave", 0);
    assert_int_equal(lim_take(l, LIM_SESSIONS, "dave", 0), 0);
    /* Two an hour: the next one half an hour later. */
    assert_int_equal(lim_take(l, LIM_SESSIONS, "dave", 1799999), LIM_EREFUSED);
    assert_int_equal(lim_take(l, LIM_SESSIONS, "dave", 1800000), 0);
    lim_destroy(&l);
}

static void tokens_are_charged_after_the_answer(void **state)
{
    lim_opts o = opts();
    lim *l = lim_create(&o);
    assert_int_equal(lim_check(l, LIM_TOKENS, "erin", 0), 0);
    lim_charge(l, LIM_TOKENS, "erin", 999, 0);
    assert_int_equal(lim_check(l, LIM_TOKENS, "erin", 0), 0); /* one left */
    lim_charge(l, LIM_TOKENS, "erin", 301, 0);                /* 300 in debt */
    assert_int_equal(lim_check(l, LIM_TOKENS, "erin", 0), LIM_EREFUSED);
    assert_int_equal(lim_check(l, LIM_TOKENS, "frank", 0), 0);
    /* 1000 a minute: the debt is paid after 18 s. */
    assert_int_equal(lim_check(l, LIM_TOKENS, "erin", 18000), LIM_EREFUSED);
    assert_int_equal(lim_check(l, LIM_TOKENS, "erin", 18001), 0);
    /* A debt never exceeds one bucket. */
    lim_charge(l, LIM_TOKENS, "frank", 1e9, 0);
    assert_int_equal(lim_check(l, LIM_TOKENS, "frank", 59999), LIM_EREFUSED);
    assert_int_equal(lim_check(l, LIM_TOKENS, "frank", 60001), 0);
    assert_int_equal(lim_refused(l, LIM_TOKENS), 3);
    lim_destroy(&l);
}

static void a_limit_of_zero_is_off(void **state)
{
    lim_opts o = opts();
    o.conn_per_ip = 0;
    o.messages_per_minute = 0;
    o.tokens_per_minute = 0;
    lim *l = lim_create(&o);
    for (int i = 0; i < 10000; i++) {
        assert_int_equal(lim_hold(l, LIM_CONN_IP, "10.0.0.1", 0), 0);
        assert_int_equal(lim_take(l, LIM_MESSAGES, "bob", 0), 0);
    }
    lim_charge(l, LIM_TOKENS, "bob", 1e9, 0);
    assert_int_equal(lim_check(l, LIM_TOKENS, "bob", 0), 0);
    assert_int_equal(lim_keys(l, LIM_CONN_IP) + lim_keys(l, LIM_MESSAGES), 0);
    lim_destroy(&l);
}

static void the_table_stays_within_its_keys(void **state)
{
    lim_opts o = opts();
    o.max_keys = 4;
    lim *l = lim_create(&o);
    char key[32];
    /* Buckets: the least recently used is forgotten for a new key. */
    for (int i = 0; i < 5; i++)
        assert_int_equal(lim_take(l, LIM_MESSAGES, "old", 0), 0);
    assert_int_equal(lim_take(l, LIM_MESSAGES, "old", 0), LIM_EREFUSED);
    for (int i = 0; i < 4; i++) {
        snprintf(key, sizeof key, "user%d", i);
        assert_int_equal(lim_take(l, LIM_MESSAGES, key, 0), 0);
    }
    assert_int_equal(lim_keys(l, LIM_MESSAGES), 4);
    assert_int_equal(lim_evicted(l, LIM_MESSAGES), 1);
    assert_int_equal(lim_take(l, LIM_MESSAGES, "old", 0), 0); /* forgotten: afresh */
    /* Counts: four addresses holding connections fill it; a fifth is
     * refused, not forgotten. */
    for (int i = 0; i < 4; i++) {
        snprintf(key, sizeof key, "10.0.0.%d", i);
        assert_int_equal(lim_hold(l, LIM_CONN_IP, key, 0), 0);
    }
    assert_int_equal(lim_hold(l, LIM_CONN_IP, "10.0.0.9", 0), LIM_EFULL);
    assert_int_equal(lim_hold(l, LIM_CONN_IP, "10.0.0.1", 0), 0); /* known keys go on */
    lim_release(l, LIM_CONN_IP, "10.0.0.3", 0);
    assert_int_equal(lim_hold(l, LIM_CONN_IP, "10.0.0.9", 0), 0);
    lim_destroy(&l);
}

static void idle_entries_are_forgotten(void **state)
{
    lim_opts o = opts();
    lim *l = lim_create(&o);
    for (int i = 0; i < 10; i++) {
        char key[32];
        snprintf(key, sizeof key, "10.1.0.%d", i);
        assert_int_equal(lim_take(l, LIM_REST, key, 0), 0);
    }
    assert_int_equal(lim_keys(l, LIM_REST), 10);
    /* 10 a second: a tenth of a second later every bucket is full again,
     * and each call forgets a few of them. */
    for (int i = 0; i < 10; i++)
        assert_int_equal(lim_take(l, LIM_REST, "10.2.0.1", 100 + i), 0);
    assert_int_equal(lim_keys(l, LIM_REST), 1);
    lim_destroy(&l);
}

static void codes(void **state)
{
    assert_string_equal(lim_code(LIM_CONN_IP), "too_many_connections_ip");
    assert_string_equal(lim_code(LIM_TOKENS), "token_limit");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(connections_are_refused_at_the_bound_and_given_back),
        cmocka_unit_test(sessions_in_memory_are_counted_per_user),
        cmocka_unit_test(a_rate_allows_its_burst_then_paces),
        cmocka_unit_test(a_session_given_back_was_not_new),
        cmocka_unit_test(tokens_are_charged_after_the_answer),
        cmocka_unit_test(a_limit_of_zero_is_off),
        cmocka_unit_test(the_table_stays_within_its_keys),
        cmocka_unit_test(idle_entries_are_forgotten),
        cmocka_unit_test(codes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
