/* rpc: status names, HTTP mapping, UTF-8 validation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <string.h>

#include "rpc.h"

static void code_names_and_http(void **state)
{
    assert_string_equal(rpc_code_name(RPC_OK), "OK");
    assert_string_equal(rpc_code_name(RPC_INVALID_ARGUMENT), "INVALID_ARGUMENT");
    assert_string_equal(rpc_code_name(RPC_UNAUTHENTICATED), "UNAUTHENTICATED");
    assert_string_equal(rpc_code_name((rpc_code)99), "UNKNOWN");
    assert_int_equal(rpc_code_http_status(RPC_NOT_FOUND), 404);
    assert_int_equal(rpc_code_http_status(RPC_UNAVAILABLE), 503);
    assert_int_equal(rpc_code_http_status(RPC_PERMISSION_DENIED), 403);
    assert_int_equal(rpc_code_http_status((rpc_code)99), 500);
    assert_string_equal(rpc_strerror(RPC_EFULL), "the call's write queue is full");
}

static int valid(const char *s)
{
    return rpc_utf8_valid(s, strlen(s));
}

static void utf8(void **state)
{
    assert_true(valid(""));
    assert_true(valid("plain ascii"));
    assert_true(valid("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80")); /* é € 😀 */
    assert_false(valid("\xc3"));                                     /* truncated */
    assert_false(valid("\xe2\x82"));                                 /* truncated */
    assert_false(valid("\xc0\xaf"));                                 /* overlong '/' */
    assert_false(valid("\xe0\x80\xaf"));                             /* overlong */
    assert_false(valid("\xed\xa0\x80"));                             /* surrogate */
    assert_false(valid("\xf4\x90\x80\x80"));                         /* > U+10FFFF */
    assert_false(valid("\xff"));
    assert_false(valid("ok\x80"));
    assert_true(rpc_utf8_valid("a\0b", 3)); /* NUL is valid UTF-8 */
}

/* The nanoseconds always stay below a second, whatever the clock's own
 * nanoseconds were (pthread_cond_timedwait refuses anything else). */
static void deadline_carries_into_seconds(void **state)
{
    (void)state;
    const int64_t waits_us[] = {0, 1, 999999, 1000000, 1500000, 2999999, 86400000000LL};
    for (size_t i = 0; i < sizeof waits_us / sizeof waits_us[0]; i++) {
        struct timespec before, after;
        clock_gettime(CLOCK_MONOTONIC, &before);
        struct timespec d = rpc_deadline(CLOCK_MONOTONIC, waits_us[i]);
        clock_gettime(CLOCK_MONOTONIC, &after);
        assert_true(d.tv_nsec >= 0 && d.tv_nsec < 1000000000L);
        int64_t d_us = (int64_t)d.tv_sec * 1000000 + d.tv_nsec / 1000;
        assert_true(d_us >= (int64_t)before.tv_sec * 1000000 + before.tv_nsec / 1000 + waits_us[i]);
        assert_true(d_us <= (int64_t)after.tv_sec * 1000000 + after.tv_nsec / 1000 + waits_us[i]);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(code_names_and_http),
        cmocka_unit_test(utf8),
        cmocka_unit_test(deadline_carries_into_seconds),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
