/* conf: defaults, environment, flags and their errors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdlib.h>

#include "conf.h"

#define OPTS(X, S)                                                                                 \
    X(S, listen, STR, "listen", "TEST_LISTEN", "0.0.0.0:1", "address")                             \
    X(S, limit, INT, "limit", "TEST_LIMIT", "10", "a limit")                                       \
    X(S, verbose, BOOL, "verbose", NULL, "false", "say more")                                      \
    X(S, peers, LIST, "peer", "TEST_PEERS", "", "repeatable")
CONF_DECLARE(test_opts, OPTS)

static int parse(test_opts *o, int argc, char **argv)
{
    conf_section sec = CONF_SECTION(test_opts, o);
    return conf_parse(argc, argv, "test", "a test", &sec, 1);
}

static void release(test_opts *o)
{
    conf_section sec = CONF_SECTION(test_opts, o);
    conf_free(&sec, 1);
}

static void defaults_apply(void **state)
{
    unsetenv("TEST_LISTEN");
    unsetenv("TEST_LIMIT");
    test_opts o = {0};
    char *argv[] = {"test", NULL};
    assert_int_equal(parse(&o, 1, argv), 0);
    assert_string_equal(o.listen, "0.0.0.0:1");
    assert_int_equal(o.limit, 10);
    assert_int_equal(o.verbose, 0);
    release(&o);
}

static void env_overrides_default_and_flag_overrides_env(void **state)
{
    setenv("TEST_LISTEN", "127.0.0.1:2", 1);
    setenv("TEST_LIMIT", "20", 1);
    test_opts o = {0};
    char *argv[] = {"test", "--limit=30", "--verbose", NULL};
    assert_int_equal(parse(&o, 3, argv), 0);
    assert_string_equal(o.listen, "127.0.0.1:2");
    assert_int_equal(o.limit, 30);
    assert_int_equal(o.verbose, 1);
    release(&o);
    unsetenv("TEST_LISTEN");
    unsetenv("TEST_LIMIT");
}

static void separate_value_and_bool_value(void **state)
{
    test_opts o = {0};
    char *argv[] = {"test", "--listen", "h:3", "--verbose", "no", NULL};
    assert_int_equal(parse(&o, 5, argv), 0);
    assert_string_equal(o.listen, "h:3");
    assert_int_equal(o.verbose, 0);
    release(&o);
}

static void bad_values_are_refused(void **state)
{
    char *bad_int[] = {"test", "--limit", "ten", NULL};
    char *negative[] = {"test", "--limit=-1", NULL};
    char *unknown[] = {"test", "--nope", NULL};
    char *missing[] = {"test", "--listen", NULL};
    char *stray[] = {"test", "stray", NULL};
    char *bad_bool[] = {"test", "--verbose=maybe", NULL};
    char **cases[] = {bad_int, negative, unknown, missing, stray, bad_bool};
    int counts[] = {3, 2, 2, 2, 2, 2};
    for (size_t i = 0; i < 6; i++) {
        test_opts o = {0};
        assert_int_equal(parse(&o, counts[i], cases[i]), -1);
        release(&o);
    }
    setenv("TEST_LIMIT", "x", 1);
    test_opts o = {0};
    char *argv[] = {"test", NULL};
    assert_int_equal(parse(&o, 1, argv), -1);
    release(&o);
    unsetenv("TEST_LIMIT");
}

static void a_list_flag_repeats_and_replaces_the_environment(void **state)
{
    setenv("TEST_PEERS", "env1;env2", 1);
    test_opts o = {0};
    char *none[] = {"test", NULL};
    assert_int_equal(parse(&o, 1, none), 0);
    assert_string_equal(o.peers, "env1;env2");
    release(&o);
    char *argv[] = {"test", "--peer", "a", "--limit", "3", "--peer=b;c", "--peer", "d", NULL};
    assert_int_equal(parse(&o, 8, argv), 0);
    assert_string_equal(o.peers, "a;b;c;d");
    release(&o);
    unsetenv("TEST_PEERS");
}

static void help_and_version_stop_the_program(void **state)
{
    test_opts o = {0};
    char *help[] = {"test", "--help", NULL};
    assert_int_equal(parse(&o, 2, help), 1);
    release(&o);
    char *version[] = {"test", "--version", NULL};
    assert_int_equal(parse(&o, 2, version), 1);
    release(&o);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(defaults_apply),
        cmocka_unit_test(env_overrides_default_and_flag_overrides_env),
        cmocka_unit_test(separate_value_and_bool_value),
        cmocka_unit_test(bad_values_are_refused),
        cmocka_unit_test(a_list_flag_repeats_and_replaces_the_environment),
        cmocka_unit_test(help_and_version_stop_the_program),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
