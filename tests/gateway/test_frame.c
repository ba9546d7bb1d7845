/* frame: client frames (seed-compatible), their errors, and server frames. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <json-c/json.h>
#include <string.h>

#include "frame.h"
#include "mem.h"

static frame_in parse(const char *s)
{
    frame_in f;
    frame_parse(s, strlen(s), 100, &f);
    return f;
}

static void message_object(void **state)
{
    frame_in f = parse("{\"message\": \"Hello \\u00e9\"}");
    assert_int_equal(f.kind, FRAME_MESSAGE);
    assert_string_equal(f.text, "Hello \xc3\xa9");
    frame_in_clear(&f);
    f = parse("  {\"type\":\"message\",\"message\":\"x\"}  ");
    assert_int_equal(f.kind, FRAME_MESSAGE);
    assert_string_equal(f.text, "x");
    frame_in_clear(&f);
}

static void plain_text_is_the_message(void **state)
{
    frame_in f = parse("what is python?");
    assert_int_equal(f.kind, FRAME_MESSAGE);
    assert_string_equal(f.text, "what is python?");
    frame_in_clear(&f);
    f = parse("[1,2]"); /* not an object: plain text, as the seed does */
    assert_int_equal(f.kind, FRAME_MESSAGE);
    frame_in_clear(&f);
}

static void cancel(void **state)
{
    frame_in f = parse("{\"type\":\"cancel\"}");
    assert_int_equal(f.kind, FRAME_CANCEL);
}

static void assert_invalid(const char *text, size_t len, const char *code)
{
    frame_in f;
    frame_parse(text, len, 100, &f);
    assert_int_equal(f.kind, FRAME_INVALID);
    assert_string_equal(f.code, code);
    assert_true(strlen(f.error) > 10);
    assert_null(f.text);
}

static void errors(void **state)
{
    assert_invalid("{bad", 4, "invalid_json");
    assert_invalid("{\"message\":\"x\"} trailing", 24, "invalid_json");
    assert_invalid("{\"msg\":\"x\"}", 11, "missing_message");
    assert_invalid("{\"message\":42}", 14, "missing_message");
    assert_invalid("{\"message\":\"   \"}", 17, "empty_message");
    assert_invalid("   ", 3, "empty_message");
    assert_invalid("", 0, "empty_message");
    assert_invalid("{\"type\":\"dance\"}", 16, "unknown_type");
    assert_invalid("{\"type\":7}", 10, "invalid_type");
    assert_invalid("caf\xc3", 4, "invalid_utf8");
    assert_invalid("a\0b", 3, "invalid_text");
    /* Escaped, the NUL reaches the message: refused whole, not cut there
     * (cut, "\u0000x" became an empty message that slipped past the empty
     * check). */
    const char *escaped[] = {"{\"message\":\"\\u0000x\"}", "{\"message\":\"ab\\u0000\"}"};
    for (size_t i = 0; i < 2; i++)
        assert_invalid(escaped[i], strlen(escaped[i]), "invalid_text");
    char big[200];
    memset(big, 'a', sizeof big);
    assert_invalid(big, sizeof big, "message_too_long");
    char json[220] = "{\"message\":\"";
    memset(json + 12, 'b', 150);
    strcpy(json + 162, "\"}");
    assert_invalid(json, strlen(json), "message_too_long");
}

/* Arguments are evaluated in any order: the frame is built first. */
#define DECODE(call) (frame_text = (call), decode(frame_text, len))
static char *frame_text;

static json_object *decode(char *text, size_t len)
{
    assert_int_equal(strlen(text), len);
    json_object *o = json_tokener_parse(text);
    assert_non_null(o);
    mem_free(text);
    return o;
}

static const char *str(json_object *o, const char *key)
{
    json_object *v;
    assert_true(json_object_object_get_ex(o, key, &v));
    return json_object_get_string(v);
}

static void server_frames(void **state)
{
    size_t len;
    json_object *o = DECODE(frame_token("tok \"q\" /", 3, &len));
    assert_string_equal(str(o, "type"), "token");
    assert_string_equal(str(o, "content"), "tok \"q\" /");
    assert_string_equal(str(o, "turn_id"), "3");
    json_object_put(o);

    o = DECODE(
        frame_tool_call("fetch_internal_knowledge", "call_1", "{\"topic\":\"python\"}", 1, &len));
    json_object *args;
    assert_true(json_object_object_get_ex(o, "arguments", &args));
    assert_true(json_object_is_type(args, json_type_object));
    assert_string_equal(str(args, "topic"), "python");
    assert_string_equal(str(o, "tool"), "fetch_internal_knowledge");
    json_object_put(o);

    o = DECODE(frame_tool_call("t", "c", "not json", 1, &len));
    assert_string_equal(str(o, "arguments"), "not json");
    json_object_put(o);

    o = DECODE(frame_tool_result("t", "c", "{\"error\":\"boom\"}", 1, 2, &len));
    json_object *res;
    assert_true(json_object_object_get_ex(o, "result", &res));
    assert_string_equal(str(res, "error"), "boom");
    assert_string_equal(str(o, "is_error"), "true");
    json_object_put(o);

    o = DECODE(frame_done(4, "cancelled", NULL, NULL, NULL, 0, &len));
    assert_string_equal(str(o, "type"), "done");
    assert_string_equal(str(o, "status"), "cancelled");
    assert_false(json_object_object_get_ex(o, "usage", NULL));
    assert_false(json_object_object_get_ex(o, "upstream", NULL));
    assert_false(json_object_object_get_ex(o, "degraded", NULL));
    json_object_put(o);

    frame_usage u = {.prompt_tokens = 120, .completion_tokens = 30, .total_tokens = 150};
    o = DECODE(frame_done(5, "completed", "stop", &u, "eu", 1, &len));
    json_object *usage;
    assert_true(json_object_object_get_ex(o, "usage", &usage));
    assert_string_equal(str(usage, "prompt_tokens"), "120");
    assert_string_equal(str(usage, "completion_tokens"), "30");
    assert_string_equal(str(usage, "total_tokens"), "150");
    assert_string_equal(str(o, "finish_reason"), "stop");
    assert_string_equal(str(o, "upstream"), "eu");
    json_object *degraded;
    assert_true(json_object_object_get_ex(o, "degraded", &degraded));
    assert_true(json_object_is_type(degraded, json_type_boolean) &&
                json_object_get_boolean(degraded));
    json_object_put(o);

    o = DECODE(frame_error("queue_full", "wait", 0, NULL, &len));
    assert_string_equal(str(o, "content"), "wait");
    assert_string_equal(str(o, "code"), "queue_full");
    assert_false(json_object_object_get_ex(o, "turn_id", NULL));
    assert_false(json_object_object_get_ex(o, "request_id", NULL));
    json_object_put(o);

    o = DECODE(frame_error("llm_unavailable", "failed", 2, "s1/2", &len));
    assert_string_equal(str(o, "request_id"), "s1/2");
    assert_string_equal(str(o, "turn_id"), "2");
    json_object_put(o);

    o = DECODE(frame_session("s1", "u1", 1, 1, 7, &len));
    assert_string_equal(str(o, "message_count"), "7");
    assert_string_equal(str(o, "resumed"), "true");
    json_object_put(o);
}

/* frame_token writes its JSON by hand: it must be exactly what json-c
 * writes, for every byte a token can hold. */
static void token_frames_equal_json_c(void **state)
{
    char all[256];
    for (int i = 1; i < 128; i++)
        all[i - 1] = (char)i;
    strcpy(all + 127, "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80 / \\ \"");
    const char *cases[] = {"", "w1", "tok \"q\" /", "a\nb\tc\rd\x01\x1f", all};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        for (uint64_t turn = 0; turn < 2; turn++) {
            json_object *o = json_object_new_object();
            json_object_object_add(o, "type", json_object_new_string("token"));
            if (turn != 0)
                json_object_object_add(o, "turn_id", json_object_new_int64((int64_t)turn));
            json_object_object_add(o, "content", json_object_new_string(cases[i]));
            const char *want = json_object_to_json_string_ext(
                o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
            size_t len;
            char *got = frame_token(cases[i], turn, &len);
            assert_string_equal(got, want);
            assert_int_equal(len, strlen(want));
            mem_free(got);
            json_object_put(o);
        }
    }
}

static void ws_headers(void **state)
{
    unsigned char h[FRAME_WS_HEADER_MAX];
    assert_int_equal(frame_ws_header(h, 0), 2);
    assert_int_equal(h[0], 0x81);
    assert_int_equal(h[1], 0);
    assert_int_equal(frame_ws_header(h, 125), 2);
    assert_int_equal(h[1], 125);
    /* 126 needs the 16-bit length, big-endian. */
    assert_int_equal(frame_ws_header(h, 126), 4);
    assert_int_equal(h[1], 126);
    assert_int_equal(h[2], 0);
    assert_int_equal(h[3], 126);
    assert_int_equal(frame_ws_header(h, 0xffff), 4);
    assert_int_equal(h[2], 0xff);
    assert_int_equal(h[3], 0xff);
    /* 65536 and up: the 64-bit length. */
    assert_int_equal(frame_ws_header(h, 0x10000), 10);
    assert_int_equal(h[1], 127);
    const unsigned char want[8] = {0, 0, 0, 0, 0, 1, 0, 0};
    assert_memory_equal(h + 2, want, 8);
    assert_int_equal(frame_ws_header(h, 0x0102030405060708ULL), 10);
    const unsigned char big[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    assert_memory_equal(h + 2, big, 8);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(message_object),
        cmocka_unit_test(plain_text_is_the_message),
        cmocka_unit_test(cancel),
        cmocka_unit_test(errors),
        cmocka_unit_test(server_frames),
        cmocka_unit_test(ws_headers),
        cmocka_unit_test(token_frames_equal_json_c),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
