/* log: level names and the --log-level set-up every binary uses. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "log.h"

static void levels(void **state)
{
    assert_int_equal(log_level_parse("debug"), LOG_DEBUG);
    assert_int_equal(log_level_parse("error"), LOG_ERROR);
    assert_int_equal(log_level_parse("INFO"), -1);
    assert_int_equal(log_level_parse(""), -1);
}

static void setup_refuses_unknown_levels(void **state)
{
    assert_int_equal(log_setup("test", "loud"), -1);
    assert_int_equal(log_setup("test", "warn"), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(levels),
                                       cmocka_unit_test(setup_refuses_unknown_levels)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
