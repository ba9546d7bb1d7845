/* conf: defaults, environment, flags and their errors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conf.h"

#define OPTS(X, S)                                                                                 \
    X(S, listen, STR, "listen", "TEST_LISTEN", "0.0.0.0:1", "address")                             \
    X(S, limit, INT, "limit", "TEST_LIMIT", "10", "a limit")                                       \
    X(S, verbose, BOOL, "verbose", NULL, "false", "say more")                                      \
    X(S, key, SECRET, "key", "TEST_KEY", "", "a credential")                                       \
    X(S, peers, LIST, "peer", "TEST_PEERS", "", "repeatable")                                      \
    X(S, workers, INT_IN(1, 8), "workers", "TEST_WORKERS", "2", "worker threads")                  \
    X(S, offset, INT_IN(-5, 5), "offset", NULL, "0", "may be negative")                            \
    X(S, floor, INT_IN(3, CONF_NO_MAX), "floor", NULL, "3", "three or more")
CONF_DECLARE(test_opts, OPTS)

/* A table whose own default is out of its range: a bug in the program. */
#define BAD_DEFAULT(X, S) X(S, n, INT_IN(1, 4), "n", NULL, "0", "one to four")
CONF_DECLARE(bad_default_opts, BAD_DEFAULT)

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

/* A file holding exactly `len` bytes of `content`; its path (static). */
static const char *write_file(const char *content, size_t len)
{
    static char path[] = "/tmp/convo-test-conf-XXXXXX";
    strcpy(path + strlen(path) - 6, "XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, content, len), (ssize_t)len);
    close(fd);
    return path;
}

/* Runs parse with fd `which` (1 or 2) sent to a file; returns parse's result
 * and what was written there in out. */
static int parse_capturing(test_opts *o, int argc, char **argv, int which, char *out,
                           size_t outsize)
{
    char path[] = "/tmp/convo-test-conf-out-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    fflush(stdout);
    fflush(stderr);
    int saved = dup(which);
    dup2(fd, which);
    int rc = parse(o, argc, argv);
    fflush(stdout);
    fflush(stderr);
    dup2(saved, which);
    close(saved);
    ssize_t n = pread(fd, out, outsize - 1, 0);
    out[n > 0 ? n : 0] = '\0';
    close(fd);
    unlink(path);
    return rc;
}

static void ranges_are_checked_once_with_one_message(void **state)
{
    test_opts o = {0};
    char err[4096];
    char *ends[] = {"test", "--workers", "1", "--offset=-5", "--floor", "9000000000", NULL};
    assert_int_equal(parse(&o, 6, ends), 0);
    assert_int_equal(o.workers, 1);
    assert_int_equal(o.offset, -5);
    assert_int_equal(o.floor, 9000000000LL);
    release(&o);
    char *top[] = {"test", "--workers=8", "--offset", "5", NULL};
    assert_int_equal(parse(&o, 4, top), 0);
    assert_int_equal(o.workers, 8);
    assert_int_equal(o.offset, 5);
    release(&o);

    char *zero[] = {"test", "--workers", "0", NULL};
    assert_int_equal(parse_capturing(&o, 3, zero, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "test: --workers: '0' is not an integer from 1 to 8"));
    release(&o);
    char *over[] = {"test", "--workers=9", NULL};
    assert_int_equal(parse_capturing(&o, 2, over, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "--workers: '9' is not an integer from 1 to 8"));
    release(&o);
    char *text[] = {"test", "--workers=two", NULL};
    assert_int_equal(parse_capturing(&o, 2, text, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "--workers: 'two' is not an integer from 1 to 8"));
    release(&o);
    char *low[] = {"test", "--offset=-6", NULL};
    assert_int_equal(parse_capturing(&o, 2, low, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "--offset: '-6' is not an integer from -5 to 5"));
    release(&o);
    char *floor[] = {"test", "--floor", "2", NULL};
    assert_int_equal(parse_capturing(&o, 3, floor, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "--floor: '2' is not an integer of at least 3"));
    release(&o);
    char *huge[] = {"test", "--floor", "99999999999999999999", NULL};
    assert_int_equal(parse_capturing(&o, 3, huge, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "is not an integer of at least 3"));
    release(&o);
    /* The environment is held to the same range, named as its variable. */
    setenv("TEST_WORKERS", "100", 1);
    char *none[] = {"test", NULL};
    assert_int_equal(parse_capturing(&o, 1, none, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "TEST_WORKERS: --workers: '100' is not an integer from 1 to 8"));
    release(&o);
    unsetenv("TEST_WORKERS");
    /* A default outside its own range stops the program at once. */
    bad_default_opts b = {0};
    conf_section sec = CONF_SECTION(bad_default_opts, &b);
    assert_int_equal(conf_parse(1, none, "test", "a test", &sec, 1), -1);
    conf_free(&sec, 1);
}

static void help_shows_the_ranges(void **state)
{
    test_opts o = {0};
    char out[8192];
    char *argv[] = {"test", "--help", NULL};
    assert_int_equal(parse_capturing(&o, 2, argv, 1, out, sizeof out), 1);
    assert_non_null(strstr(out, "worker threads [1 to 8]"));
    assert_non_null(strstr(out, "may be negative [-5 to 5]"));
    assert_non_null(strstr(out, "three or more [at least 3]"));
    assert_null(strstr(out, "a limit ["));
    release(&o);
}

static void secret_from_env_or_file(void **state)
{
    setenv("TEST_KEY", "from-env", 1);
    test_opts o = {0};
    char *argv[] = {"test", NULL};
    assert_int_equal(parse(&o, 1, argv), 0);
    assert_string_equal(o.key, "from-env");
    release(&o);
    unsetenv("TEST_KEY");

    /* The Kubernetes convention: NAME_FILE names a file; one trailing
     * newline (as `echo` or a mounted Secret leaves it) is not part of it. */
    const char *path = write_file("s3cret value\n", 13);
    setenv("TEST_KEY_FILE", path, 1);
    assert_int_equal(parse(&o, 1, argv), 0);
    assert_string_equal(o.key, "s3cret value");
    release(&o);
    unlink(path);
    path = write_file("line\r\n\n", 7);
    setenv("TEST_KEY_FILE", path, 1);
    assert_int_equal(parse(&o, 1, argv), 0);
    assert_string_equal(o.key, "line\r\n"); /* only the last newline goes */
    release(&o);
    unlink(path);
    path = write_file("crlf\r\n", 6);
    setenv("TEST_KEY_FILE", path, 1);
    assert_int_equal(parse(&o, 1, argv), 0);
    assert_string_equal(o.key, "crlf");
    release(&o);
    unlink(path);
    unsetenv("TEST_KEY_FILE");
}

static void secret_file_errors_are_refused(void **state)
{
    test_opts o = {0};
    char *argv[] = {"test", NULL};
    char err[4096];
    /* Both the variable and the file: which one was meant is unknown. */
    const char *path = write_file("a", 1);
    setenv("TEST_KEY", "b", 1);
    setenv("TEST_KEY_FILE", path, 1);
    assert_int_equal(parse_capturing(&o, 1, argv, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "TEST_KEY and TEST_KEY_FILE are both set"));
    release(&o);
    unsetenv("TEST_KEY");
    unlink(path);
    /* A file that is not there, too big, or not text: refused, content never shown. */
    setenv("TEST_KEY_FILE", "/nonexistent/convo-secret", 1);
    assert_int_equal(parse_capturing(&o, 1, argv, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "TEST_KEY_FILE: /nonexistent/convo-secret"));
    release(&o);
    size_t big = CONF_SECRET_FILE_MAX + 1;
    char *data = malloc(big);
    memset(data, 'k', big);
    path = write_file(data, big);
    setenv("TEST_KEY_FILE", path, 1);
    assert_int_equal(parse_capturing(&o, 1, argv, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "is over"));
    assert_null(strstr(err, "kkkk"));
    release(&o);
    unlink(path);
    path = write_file(data, big - 1); /* the largest accepted */
    setenv("TEST_KEY_FILE", path, 1);
    assert_int_equal(parse(&o, 1, argv), 0);
    assert_int_equal(strlen(o.key), big - 1);
    release(&o);
    unlink(path);
    free(data);
    path = write_file("ab\0cd", 5);
    setenv("TEST_KEY_FILE", path, 1);
    assert_int_equal(parse_capturing(&o, 1, argv, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "NUL"));
    release(&o);
    unlink(path);
    unsetenv("TEST_KEY_FILE");
}

static void secret_as_flag_warns(void **state)
{
    test_opts o = {0};
    char err[4096];
    char *argv[] = {"test", "--key", "on-the-command-line", NULL};
    assert_int_equal(parse_capturing(&o, 3, argv, 2, err, sizeof err), 0);
    assert_string_equal(o.key, "on-the-command-line");
    assert_non_null(strstr(err, "--key was given on the command line"));
    assert_non_null(strstr(err, "TEST_KEY_FILE"));
    assert_null(strstr(err, "on-the-command-line")); /* the warning never repeats it */
    release(&o);
    /* Other flags do not warn. */
    char *plain[] = {"test", "--listen", "h:1", NULL};
    assert_int_equal(parse_capturing(&o, 3, plain, 2, err, sizeof err), 0);
    assert_string_equal(err, "");
    release(&o);
}

static void help_names_the_file_variable(void **state)
{
    test_opts o = {0};
    char out[8192];
    char *argv[] = {"test", "--help", NULL};
    assert_int_equal(parse_capturing(&o, 2, argv, 1, out, sizeof out), 1);
    assert_non_null(strstr(out, "--key SECRET  (env TEST_KEY)"));
    assert_non_null(strstr(out, "TEST_KEY_FILE"));
    release(&o);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(defaults_apply),
        cmocka_unit_test(env_overrides_default_and_flag_overrides_env),
        cmocka_unit_test(separate_value_and_bool_value),
        cmocka_unit_test(bad_values_are_refused),
        cmocka_unit_test(ranges_are_checked_once_with_one_message),
        cmocka_unit_test(help_shows_the_ranges),
        cmocka_unit_test(a_list_flag_repeats_and_replaces_the_environment),
        cmocka_unit_test(help_and_version_stop_the_program),
        cmocka_unit_test(secret_from_env_or_file),
        cmocka_unit_test(secret_file_errors_are_refused),
        cmocka_unit_test(secret_as_flag_warns),
        cmocka_unit_test(help_names_the_file_variable),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
