/* check: the id rule and text limits every service applies. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <string.h>

#include "check.h"

static void ids(void **state)
{
    char err[200];
    assert_int_equal(check_id("session_id", "abc-DEF_1.2", err, sizeof err), 0);
    assert_int_equal(check_id("session_id", "", err, sizeof err), -1);
    assert_string_equal(err, "session_id is empty");
    assert_int_equal(check_id("user_id", NULL, err, sizeof err), -1);
    assert_string_equal(err, "user_id is empty");
    assert_int_equal(check_id("session_id", "a b", err, sizeof err), -1);
    assert_non_null(strstr(err, "offset 1 (0x20)"));
    assert_int_equal(check_id("session_id", "caf\xc3\xa9", err, sizeof err), -1);
    char longid[CHECK_ID_MAX + 2];
    memset(longid, 'a', sizeof longid);
    longid[CHECK_ID_MAX] = '\0';
    assert_int_equal(check_id("session_id", longid, err, sizeof err), 0);
    longid[CHECK_ID_MAX] = 'a';
    longid[CHECK_ID_MAX + 1] = '\0';
    assert_int_equal(check_id("session_id", longid, err, sizeof err), -1);
    assert_non_null(strstr(err, "over the limit of 128"));
    assert_true(check_id_char('_') && !check_id_char('/') && !check_id_char('%'));
}

static void texts(void **state)
{
    char err[200];
    assert_int_equal(check_text("message", "h\xc3\xa9llo", 10, err, sizeof err), 0);
    assert_int_equal(check_text("message", NULL, 10, err, sizeof err), 0);
    assert_int_equal(check_text("message", "12345678901", 10, err, sizeof err), -1);
    assert_string_equal(err, "message is 11 bytes, over the limit of 10");
    assert_int_equal(check_text("message", "bad \xff", 10, err, sizeof err), -1);
    assert_string_equal(err, "message is not valid UTF-8");
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(ids), cmocka_unit_test(texts)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
