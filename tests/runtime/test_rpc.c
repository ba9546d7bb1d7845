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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(code_names_and_http),
        cmocka_unit_test(utf8),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
