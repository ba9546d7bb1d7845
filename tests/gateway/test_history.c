/* history: events → the model's messages; the same events rebuilt give the
 * same history; trimming keeps tool results with their calls. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <string.h>

#include "history.h"

#define USER   CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE
#define TOKEN  CONVO__V1__EVENT_TYPE__EVENT_TYPE_AI_TOKEN
#define CALL   CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_CALL
#define RESULT CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_RESULT
#define SYSTEM CONVO__V1__EVENT_TYPE__EVENT_TYPE_SYSTEM_EVENT

static int apply(hist *h, Convo__V1__EventType t, const char *s)
{
    return hist_apply(h, t, s, strlen(s));
}

static void turn_with_tool(hist *h)
{
    assert_int_equal(apply(h, USER, "What is Python?"), 0);
    assert_int_equal(apply(h, SYSTEM, "{\"event\":\"route\"}"), 0);
    assert_int_equal(apply(h, TOKEN, "Let me look."), 0);
    assert_int_equal(apply(h, CALL,
                           "{\"id\":\"c1\",\"tool\":\"fetch_internal_knowledge\","
                           "\"arguments\":{\"topic\":\"python\"}}"),
                     0);
    assert_int_equal(apply(h, RESULT,
                           "{\"id\":\"c1\",\"tool\":\"fetch_internal_knowledge\","
                           "\"result\":{\"passages\":[]}}"),
                     0);
    assert_int_equal(apply(h, TOKEN, "Python is "), 0);
    assert_int_equal(apply(h, TOKEN, "a language."), 0);
    hist_end_turn(h);
}

static void events_become_messages(void **state)
{
    hist *h = hist_create(50, 1 << 20);
    turn_with_tool(h);
    Convo__V1__Message **m;
    size_t n = hist_view(h, &m);
    assert_int_equal(n, 4);
    assert_int_equal(m[0]->role, CONVO__V1__ROLE__ROLE_USER);
    assert_string_equal(m[0]->content, "What is Python?");
    assert_int_equal(m[1]->role, CONVO__V1__ROLE__ROLE_ASSISTANT);
    assert_string_equal(m[1]->content, "Let me look.");
    assert_int_equal(m[1]->n_tool_calls, 1);
    assert_string_equal(m[1]->tool_calls[0]->id, "c1");
    assert_string_equal(m[1]->tool_calls[0]->arguments_json, "{\"topic\":\"python\"}");
    assert_int_equal(m[2]->role, CONVO__V1__ROLE__ROLE_TOOL);
    assert_string_equal(m[2]->tool_call_id, "c1");
    assert_string_equal(m[2]->content, "{\"passages\":[]}");
    assert_int_equal(m[3]->role, CONVO__V1__ROLE__ROLE_ASSISTANT);
    assert_string_equal(m[3]->content, "Python is a language.");
    hist_counts c = hist_get_counts(h);
    assert_int_equal(c.user_messages, 1);
    assert_int_equal(c.tool_calls, 1);
    assert_int_equal(c.assistant_messages, 2);
    hist_destroy(&h);
    assert_null(h);
}

static void malformed_tool_events_are_refused(void **state)
{
    hist *h = hist_create(50, 1 << 20);
    assert_int_equal(apply(h, CALL, "not json"), -1);
    assert_int_equal(apply(h, CALL, "{\"tool\":\"x\"}"), -1);
    assert_int_equal(apply(h, RESULT, "[1]"), -1);
    assert_int_equal(hist_apply(h, (Convo__V1__EventType)99, "x", 1), -1);
    Convo__V1__Message **m;
    assert_int_equal(hist_view(h, &m), 0);
    hist_destroy(&h);
}

static void trimming_starts_at_a_user_message(void **state)
{
    hist *h = hist_create(5, 1 << 20);
    for (int i = 0; i < 10; i++)
        turn_with_tool(h); /* 4 messages a turn */
    Convo__V1__Message **m;
    size_t n = hist_view(h, &m);
    assert_true(n <= 5);
    assert_true(n > 0);
    assert_int_equal(m[0]->role, CONVO__V1__ROLE__ROLE_USER);
    assert_int_equal(hist_get_counts(h).user_messages, 10);
    hist_destroy(&h);
}

static void a_resume_keeps_the_whole_sessions_counts(void **state)
{
    hist *h = hist_create(50, 1 << 20);
    /* The newest events of a session whose store counted 40 user messages
     * and 7 tool calls in all; events after the resume add to them. */
    turn_with_tool(h);
    hist_set_counts(h, 40, 7);
    hist_counts c = hist_get_counts(h);
    assert_int_equal(c.user_messages, 40);
    assert_int_equal(c.tool_calls, 7);
    turn_with_tool(h);
    c = hist_get_counts(h);
    assert_int_equal(c.user_messages, 41);
    assert_int_equal(c.tool_calls, 8);
    hist_destroy(&h);
}

static void answer_text_is_capped(void **state)
{
    hist *h = hist_create(10, 8);
    apply(h, USER, "hi");
    apply(h, TOKEN, "12345");
    apply(h, TOKEN, "67890");
    Convo__V1__Message **m;
    size_t n = hist_view(h, &m);
    assert_int_equal(n, 2);
    assert_string_equal(m[1]->content, "12345678");
    hist_destroy(&h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(events_become_messages),
        cmocka_unit_test(malformed_tool_events_are_refused),
        cmocka_unit_test(trimming_starts_at_a_user_message),
        cmocka_unit_test(a_resume_keeps_the_whole_sessions_counts),
        cmocka_unit_test(answer_text_is_capped),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
