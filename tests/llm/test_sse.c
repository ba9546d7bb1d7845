/* Tests of llm-svc/sse.c: recorded OpenAI-format streams fed whole, byte by
 * byte and split in two at every byte position must give the same events;
 * the caps break a stream instead of growing; the chunks then assemble into
 * the same tool calls (toolcall.c) whatever the split. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "mem.h"
#include "sse.h"
#include "toolcall.h"

#include <stdio.h>
#include <string.h>

/* Tokens, comments (keep-alives), an "event:" field and the usage chunk. */
static const char STREAM_TOKENS[] =
    ": keep-alive\n"
    "\n"
    "data: {\"id\":\"c1\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":"
    "\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n"
    "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\n\n"
    ": another comment\n"
    "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" "
    "wor\\u00e9ld\"}}]}\n\n"
    "event: message\n"
    "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n"
    "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,"
    "\"total_tokens\":11}}\n\n"
    "data: [DONE]\n\n";

/* One tool call whose arguments come in many pieces; only the first delta
 * has the id and the name. CRLF line endings throughout. */
static const char STREAM_TOOL_CRLF[] =
    "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"index\":0,\"id\":"
    "\"call_A\",\"type\":\"function\",\"function\":{\"name\":\"fetch_internal_knowledge\","
    "\"arguments\":\"\"}}]}}]}\r\n\r\n"
    "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":"
    "\"{\\\"to\"}}]}}]}\r\n\r\n"
    "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":"
    "\"pic\\\": \\\"as\"}}]}}]}\r\n\r\n"
    ":ping\r\n"
    "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":"
    "\"ync io\\\"}\"}}]}}]}\r\n\r\n"
    "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\r\n\r\n"
    "data: [DONE]\r\n\r\n";

/* Two parallel calls interleaved by index; CR-only endings; a data field
 * split over two lines (joined with \n, which JSON allows as whitespace). */
static const char STREAM_PARALLEL_CR[] =
    "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"function\":"
    "{\"name\":\"fetch_internal_knowledge\",\"arguments\":\"\"}}]}}]}\r\r"
    "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":1,\"id\":\"call_2\",\"function\":"
    "{\"name\":\"lookup_contextual_data\",\"arguments\":\"{\\\"sess\"}}]}}]}\r\r"
    "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":"
    "\"{\\\"topic\\\":\"}}]}}]}\r\r"
    "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":1,\"function\":{\"arguments\":"
    "\"ion_id\\\":\\\"s1\\\"}\"}}]}}]}\r\r"
    "data: {\"choices\":[{\"delta\":{\"tool_calls\":\r"
    "data: [{\"index\":0,\"function\":{\"arguments\":\"\\\"grpc\\\"}\"}}]}}]}\r\r"
    "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\r\r"
    "data: [DONE]\r\r";

#define MAX_EVENTS 32

typedef struct collected {
    char *data[MAX_EVENTS];
    char *event[MAX_EVENTS];
    size_t n;
} collected;

static int on_event(void *arg, const char *event, const char *data, size_t len)
{
    collected *c = arg;
    assert_true(c->n < MAX_EVENTS);
    assert_int_equal(strlen(data), len);
    c->data[c->n] = mem_strndup(data, len);
    c->event[c->n] = mem_strdup(event);
    c->n++;
    return 0;
}

static void collected_free(collected *c)
{
    for (size_t i = 0; i < c->n; i++) {
        mem_free(c->data[i]);
        mem_free(c->event[i]);
    }
    c->n = 0;
}

/* Feeds `s` in pieces cut at the positions in cuts[] (ascending), each piece
 * in a buffer of exactly its size so ASan sees any overread. */
static void feed_cuts(const char *s, size_t len, const size_t *cuts, size_t ncuts, collected *out)
{
    sse_parser *p = sse_parser_create(4096, 16384, on_event, out);
    size_t at = 0;
    for (size_t i = 0; i <= ncuts; i++) {
        size_t end = i < ncuts ? cuts[i] : len;
        char *piece = mem_alloc(end - at + 1);
        memcpy(piece, s + at, end - at);
        assert_int_equal(sse_feed(p, piece, end - at), 0);
        mem_free(piece);
        at = end;
    }
    assert_true(sse_idle(p));
    sse_parser_destroy(&p);
    assert_null(p);
}

static void assert_same(const collected *a, const collected *b)
{
    assert_int_equal(a->n, b->n);
    for (size_t i = 0; i < a->n; i++) {
        assert_string_equal(a->data[i], b->data[i]);
        assert_string_equal(a->event[i], b->event[i]);
    }
}

/* Whole, byte by byte, every single cut and every pair of cuts near the
 * line endings give the same events as the whole stream. */
static void check_all_splits(const char *s, collected *whole)
{
    size_t len = strlen(s);
    feed_cuts(s, len, NULL, 0, whole);
    for (size_t cut = 0; cut <= len; cut++) {
        collected c = {0};
        feed_cuts(s, len, &cut, 1, &c);
        assert_same(whole, &c);
        collected_free(&c);
    }
    size_t *all = mem_alloc(len * sizeof *all);
    for (size_t i = 0; i < len; i++)
        all[i] = i;
    collected c = {0};
    feed_cuts(s, len, all, len, &c);
    assert_same(whole, &c);
    collected_free(&c);
    mem_free(all);
}

static void test_tokens_every_split(void **state)
{
    collected w = {0};
    check_all_splits(STREAM_TOKENS, &w);
    assert_int_equal(w.n, 6);
    assert_string_equal(w.event[3], "message");
    assert_string_equal(w.event[4], "");
    assert_true(sse_is_done(w.data[5], strlen(w.data[5])));
    /* The chunks mean what they say. */
    toolcall_chunk ch;
    assert_int_equal(toolcall_chunk_parse(w.data[1], strlen(w.data[1]), NULL, &ch, NULL, 0), 0);
    assert_string_equal(ch.content, "Hello");
    toolcall_chunk_clear(&ch);
    assert_int_equal(toolcall_chunk_parse(w.data[2], strlen(w.data[2]), NULL, &ch, NULL, 0), 0);
    assert_string_equal(ch.content, " wor\xc3\xa9ld");
    toolcall_chunk_clear(&ch);
    assert_int_equal(toolcall_chunk_parse(w.data[3], strlen(w.data[3]), NULL, &ch, NULL, 0), 0);
    assert_null(ch.content);
    assert_string_equal(ch.finish_reason, "stop");
    toolcall_chunk_clear(&ch);
    assert_int_equal(toolcall_chunk_parse(w.data[4], strlen(w.data[4]), NULL, &ch, NULL, 0), 0);
    assert_true(ch.has_usage);
    assert_int_equal(ch.prompt_tokens, 9);
    assert_int_equal(ch.completion_tokens, 2);
    assert_int_equal(ch.total_tokens, 11);
    toolcall_chunk_clear(&ch);
    collected_free(&w);
}

/* Assembles every event's tool-call deltas (except [DONE]). */
static toolcall_set *assemble(const collected *c)
{
    toolcall_set *set = toolcall_set_create(8, 1024);
    for (size_t i = 0; i < c->n; i++) {
        if (sse_is_done(c->data[i], strlen(c->data[i])))
            continue;
        toolcall_chunk ch;
        char err[200];
        int rc = toolcall_chunk_parse(c->data[i], strlen(c->data[i]), set, &ch, err, sizeof err);
        if (rc != 0)
            fail_msg("chunk %zu: %s", i, err);
        toolcall_chunk_clear(&ch);
    }
    return set;
}

static void test_tool_call_crlf_every_split(void **state)
{
    collected w = {0};
    check_all_splits(STREAM_TOOL_CRLF, &w);
    assert_int_equal(w.n, 6);
    toolcall_set *set = assemble(&w);
    assert_int_equal(toolcall_set_count(set), 1);
    const toolcall *c = toolcall_set_get(set, 0);
    assert_string_equal(c->id, "call_A");
    assert_string_equal(c->name, "fetch_internal_knowledge");
    assert_string_equal(c->args, "{\"topic\": \"async io\"}");
    toolcall_set_destroy(&set);
    collected_free(&w);
}

static void test_parallel_cr_every_split(void **state)
{
    collected w = {0};
    check_all_splits(STREAM_PARALLEL_CR, &w);
    assert_int_equal(w.n, 7);
    assert_non_null(strstr(w.data[4], "\"tool_calls\":\n[{"));
    toolcall_set *set = assemble(&w);
    assert_int_equal(toolcall_set_count(set), 2);
    assert_string_equal(toolcall_set_get(set, 0)->id, "call_1");
    assert_string_equal(toolcall_set_get(set, 0)->args, "{\"topic\":\"grpc\"}");
    assert_string_equal(toolcall_set_get(set, 1)->id, "call_2");
    assert_string_equal(toolcall_set_get(set, 1)->name, "lookup_contextual_data");
    assert_string_equal(toolcall_set_get(set, 1)->args, "{\"session_id\":\"s1\"}");
    toolcall_set_destroy(&set);
    collected_free(&w);
}

static void test_multiline_and_fields(void **state)
{
    static const char s[] = "data:a\ndata: b\n\ndata\n\nid: 7\nretry: 5\nfoo: bar\n\n"
                            "data:  two spaces\n\n: only a comment\n\n";
    collected w = {0};
    check_all_splits(s, &w);
    assert_int_equal(w.n, 3);
    assert_string_equal(w.data[0], "a\nb");
    assert_string_equal(w.data[1], ""); /* "data" with no colon is an empty data line */
    assert_string_equal(w.data[2], " two spaces");
    collected_free(&w);
}

static void test_line_cap(void **state)
{
    collected c = {0};
    sse_parser *p = sse_parser_create(16, 1024, on_event, &c);
    assert_int_equal(sse_feed(p, "data: 0123456789", 16), 0);
    assert_int_equal(sse_feed(p, "x", 1), SSE_ETOOBIG);
    assert_int_equal(sse_feed(p, "\n\n", 2), SSE_EDONE);
    assert_int_equal(c.n, 0);
    sse_parser_destroy(&p);
    /* A comment line counts too: a server cannot grow us with keep-alives. */
    p = sse_parser_create(16, 1024, on_event, &c);
    assert_int_equal(sse_feed(p, ":aaaaaaaaaaaaaaaaaaaaaaa", 24), SSE_ETOOBIG);
    sse_parser_destroy(&p);
}

static void test_event_cap(void **state)
{
    collected c = {0};
    sse_parser *p = sse_parser_create(64, 10, on_event, &c);
    /* Joined, "123456\n1234" would be 11 bytes, one over. */
    assert_int_equal(sse_feed(p, "data: 123456\n", 13), 0);
    assert_int_equal(sse_feed(p, "data: 1234\n", 11), SSE_ETOOBIG);
    sse_parser_destroy(&p);
    p = sse_parser_create(64, 10, on_event, &c);
    assert_int_equal(sse_feed(p, "data: 1234\ndata: 1234\n\n", 23), 0);
    assert_int_equal(c.n, 1);
    assert_string_equal(c.data[0], "1234\n1234");
    sse_parser_destroy(&p);
    collected_free(&c);
}

static int stop_cb(void *arg, const char *event, const char *data, size_t len)
{
    (*(int *)arg)++;
    return 1;
}

static void test_stop_and_cut_short(void **state)
{
    int n = 0;
    sse_parser *p = sse_parser_create(64, 64, stop_cb, &n);
    assert_int_equal(sse_feed(p, "data: a\n\ndata: b\n\n", 18), SSE_ESTOP);
    assert_int_equal(n, 1);
    sse_parser_destroy(&p);
    collected c = {0};
    p = sse_parser_create(64, 64, on_event, &c);
    assert_int_equal(sse_feed(p, "data: a\n\ndata: partial", 22), 0);
    assert_false(sse_idle(p)); /* the stream was cut mid-event */
    sse_parser_destroy(&p);
    collected_free(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tokens_every_split),
        cmocka_unit_test(test_tool_call_crlf_every_split),
        cmocka_unit_test(test_parallel_cr_every_split),
        cmocka_unit_test(test_multiline_and_fields),
        cmocka_unit_test(test_line_cap),
        cmocka_unit_test(test_event_cap),
        cmocka_unit_test(test_stop_and_cut_short),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
