/* db: the pieces of store-svc's database layer that need no server — the
 * event type names, batch encoding bounds, and a connection that cannot be
 * made (refused port) failing cleanly without showing its password. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "db.h"
#include "mem.h"

#include <string.h>

/* A port nothing listens on (the privileged tcpmux port). */
#define REFUSED_URL "postgresql://convo:s3cretpw@127.0.0.1:1/convo"

static void event_type_names(void **state)
{
    (void)state;
    assert_string_equal(db_event_type_name(DB_EVENT_USER_MESSAGE), "user_message");
    assert_string_equal(db_event_type_name(DB_EVENT_AI_TOKEN), "ai_token");
    assert_string_equal(db_event_type_name(DB_EVENT_TOOL_CALL), "tool_call");
    assert_string_equal(db_event_type_name(DB_EVENT_TOOL_RESULT), "tool_result");
    assert_string_equal(db_event_type_name(DB_EVENT_SYSTEM_EVENT), "system_event");
    assert_null(db_event_type_name(0));
    assert_null(db_event_type_name(DB_EVENT_MAX + 1));
    assert_null(db_event_type_name(-1));
}

static void batch_bytes_follow_content(void **state)
{
    (void)state;
    db_batch *b = db_batch_create(1, 8);
    size_t empty = db_batch_bytes(b);
    assert_true(empty > 0);
    db_batch_add(b, 1, DB_EVENT_USER_MESSAGE, "hi", 2, 0);
    size_t small = db_batch_bytes(b);
    assert_true(small >= empty);
    /* Content past what was reserved grows the batch, and the bound the
     * job queue sees grows with it. */
    size_t big_len = 64 * 1024;
    char *big = mem_alloc(big_len);
    memset(big, 'x', big_len);
    for (int64_t seq = 2; seq <= 4; seq++)
        db_batch_add(b, seq, DB_EVENT_AI_TOKEN, big, big_len, 1700000000000000LL);
    assert_true(db_batch_bytes(b) >= small + 3 * big_len);
    mem_free(big);
    db_batch_destroy(&b);
    assert_null(b);
    db_batch_destroy(&b); /* a cleared handle is a no-op */
}

static void refused_connection_is_unavailable(void **state)
{
    (void)state;
    db_settings s = {.url = REFUSED_URL, .connect_timeout_s = 2, .application_name = "test"};
    db_conn *c = db_conn_create(&s);
    assert_string_equal(db_conn_error(c), "");
    assert_int_equal(db_conn_ok(c), 0);
    assert_int_equal(db_conn_alive(c), 0);
    assert_null(db_conn_pg(c));

    assert_int_equal(db_conn_connect(c), DB_EUNAVAIL);
    const char *err = db_conn_error(c);
    assert_true(strlen(err) > 0);
    assert_null(strstr(err, "s3cretpw"));
    assert_null(strchr(err, '\n')); /* one log line */
    assert_int_equal(db_conn_ok(c), 0);
    assert_null(db_conn_pg(c));
    assert_string_equal(db_conn_where(c), "");
    /* The handle stays usable: a second try fails the same way. */
    assert_int_equal(db_conn_connect(c), DB_EUNAVAIL);
    db_conn_destroy(&c);
    assert_null(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(event_type_names),
        cmocka_unit_test(batch_bytes_follow_content),
        cmocka_unit_test(refused_connection_is_unavailable),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
