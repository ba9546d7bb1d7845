/* Tests of llm-svc/toolcall.c: assembly of streamed tool calls from deltas
 * (id and name only in the first delta, parallel calls by index, caps) and
 * the parsing of chunks that are not what they should be. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "mem.h"
#include "toolcall.h"

#include <json-c/json.h>
#include <string.h>

static void test_first_delta_has_id(void **state)
{
    toolcall_set *s = toolcall_set_create(4, 64);
    assert_int_equal(toolcall_set_apply(s, 0, "call_1", "f", "{\"a\"", 4), 0);
    assert_int_equal(toolcall_set_apply(s, 0, NULL, NULL, ":", 1), 0);
    assert_int_equal(toolcall_set_apply(s, 0, "", NULL, "1}", 2), 0);
    assert_int_equal(toolcall_set_count(s), 1);
    assert_string_equal(toolcall_set_get(s, 0)->args, "{\"a\":1}");
    assert_string_equal(toolcall_set_get(s, 0)->id, "call_1");
    toolcall_set_destroy(&s);
    assert_null(s);
}

/* Interleaved parallel calls stay apart and each is valid JSON. */
static void test_parallel_interleaved(void **state)
{
    toolcall_set *s = toolcall_set_create(4, 64);
    const char *frag0[] = {"{\"to", "pic\":", "\"x\"}"};
    const char *frag1[] = {"{\"session", "_id\":\"", "s\"}"};
    assert_int_equal(toolcall_set_apply(s, 0, "c0", "k", NULL, 0), 0);
    assert_int_equal(toolcall_set_apply(s, 1, "c1", "l", NULL, 0), 0);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(toolcall_set_apply(s, 1, NULL, NULL, frag1[i], strlen(frag1[i])), 0);
        assert_int_equal(toolcall_set_apply(s, 0, NULL, NULL, frag0[i], strlen(frag0[i])), 0);
    }
    assert_int_equal(toolcall_set_count(s), 2);
    for (size_t i = 0; i < 2; i++) {
        json_object *o = json_tokener_parse(toolcall_set_get(s, i)->args);
        assert_non_null(o);
        json_object_put(o);
    }
    assert_string_equal(toolcall_set_get(s, 1)->args, "{\"session_id\":\"s\"}");
    toolcall_set_destroy(&s);
}

/* A server that numbers every call 0 but gives each its own id. */
static void test_same_index_new_id(void **state)
{
    toolcall_set *s = toolcall_set_create(4, 64);
    assert_int_equal(toolcall_set_apply(s, 0, "a", "f", "{}", 2), 0);
    assert_int_equal(toolcall_set_apply(s, 0, "b", "g", "{\"x\":", 5), 0);
    assert_int_equal(toolcall_set_apply(s, 0, NULL, NULL, "2}", 2), 0);
    assert_int_equal(toolcall_set_count(s), 2);
    assert_string_equal(toolcall_set_get(s, 0)->args, "{}");
    assert_string_equal(toolcall_set_get(s, 1)->name, "g");
    assert_string_equal(toolcall_set_get(s, 1)->args, "{\"x\":2}");
    toolcall_set_destroy(&s);
}

static void test_caps(void **state)
{
    toolcall_set *s = toolcall_set_create(2, 8);
    assert_int_equal(toolcall_set_apply(s, 0, "a", "f", "12345678", 8), 0);
    assert_int_equal(toolcall_set_apply(s, 0, NULL, NULL, "9", 1), TOOLCALL_ETOOBIG);
    assert_int_equal(toolcall_set_apply(s, 1, "b", "f", NULL, 0), 0);
    assert_int_equal(toolcall_set_apply(s, 2, "c", "f", NULL, 0), TOOLCALL_ETOOMANY);
    char longid[300];
    memset(longid, 'i', sizeof longid - 1);
    longid[sizeof longid - 1] = '\0';
    assert_int_equal(toolcall_set_apply(s, 1, longid, NULL, NULL, 0), TOOLCALL_ETOOBIG);
    toolcall_set_clear(s);
    assert_int_equal(toolcall_set_count(s), 0);
    toolcall_set_destroy(&s);
}

static int parse(const char *json, toolcall_set *s)
{
    toolcall_chunk c;
    int rc = toolcall_chunk_parse(json, strlen(json), s, &c, NULL, 0);
    toolcall_chunk_clear(&c);
    return rc;
}

static void test_bad_chunks(void **state)
{
    toolcall_set *s = toolcall_set_create(2, 64);
    assert_int_equal(parse("{\"choices\":[{\"delta\":{\"content\":\"x\"}}", s), TOOLCALL_EJSON);
    assert_int_equal(parse("{\"choices\":[]} trailing", s), TOOLCALL_EJSON);
    assert_int_equal(parse("[1,2]", s), TOOLCALL_EFORMAT);
    assert_int_equal(parse("{\"foo\":1}", s), TOOLCALL_EFORMAT);
    assert_int_equal(parse("{\"choices\":{}}", s), TOOLCALL_EFORMAT);
    assert_int_equal(parse("{\"choices\":[{\"delta\":{\"content\":5}}]}", s), TOOLCALL_EFORMAT);
    assert_int_equal(parse("{\"error\":{\"message\":\"overloaded\"}}", s), TOOLCALL_EFORMAT);
    assert_int_equal(parse("{\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":-1}]}}]}", s),
                     TOOLCALL_EFORMAT);
    assert_int_equal(parse("{\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":"
                           "{\"arguments\":7}}]}}]}",
                           s),
                     TOOLCALL_EFORMAT);
    /* Content null is fine (tool-call chunks carry it). */
    assert_int_equal(
        parse("{\"choices\":[{\"delta\":{\"content\":null},\"finish_reason\":null}]}", s), 0);
    assert_int_equal(toolcall_set_count(s), 0);
    toolcall_set_destroy(&s);
}

static void test_response(void **state)
{
    const char *r =
        "{\"model\":\"m1\",\"choices\":[{\"message\":{\"role\":\"assistant\",\"content\":"
        "\"Hi\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":3,"
        "\"completion_tokens\":1,\"total_tokens\":4}}";
    toolcall_chunk c;
    assert_int_equal(toolcall_response_parse(r, strlen(r), &c, NULL, 0), 0);
    assert_string_equal(c.content, "Hi");
    assert_string_equal(c.model, "m1");
    assert_string_equal(c.finish_reason, "stop");
    assert_int_equal(c.total_tokens, 4);
    toolcall_chunk_clear(&c);
    assert_int_equal(toolcall_response_parse("{\"choices\":[]}", 14, &c, NULL, 0),
                     TOOLCALL_EFORMAT);
    toolcall_chunk_clear(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_first_delta_has_id), cmocka_unit_test(test_parallel_interleaved),
        cmocka_unit_test(test_same_index_new_id),  cmocka_unit_test(test_caps),
        cmocka_unit_test(test_bad_chunks),         cmocka_unit_test(test_response),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
