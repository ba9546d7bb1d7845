/* summarizer: the conversation rebuilt from events, chunking within the
 * budget (never a silent cut), the tree of partial summaries, failures and
 * bounded memory. The model is a fake that records what it was asked. */
#include "mem.h"
#include "rpc.h"
#include "summarizer.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#define USER   CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE
#define TOKEN  CONVO__V1__EVENT_TYPE__EVENT_TYPE_AI_TOKEN
#define CALL   CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_CALL
#define RESULT CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_RESULT
#define SYSTEM CONVO__V1__EVENT_TYPE__EVENT_TYPE_SYSTEM_EVENT

#define MAX_CALLS 4096

typedef struct call {
    summ_step step;
    char *prompt, *text;
    unsigned first, last;
    uint32_t max_tokens;
} call;

typedef struct fake {
    call calls[MAX_CALLS];
    int n;
    int record;      /* keep the texts */
    int fail_at;     /* 1-based call that fails; 0: none */
    size_t out_size; /* partial answers this long (0: short) */
} fake;

static int fake_model(void *arg, const summ_request *rq, char **out, char **err)
{
    fake *f = arg;
    assert_true(f->n < MAX_CALLS);
    call *c = &f->calls[f->n++];
    c->step = rq->step;
    c->first = rq->first_part;
    c->last = rq->last_part;
    c->max_tokens = rq->max_tokens;
    assert_int_equal(strlen(rq->text), rq->text_len);
    if (f->record) {
        c->prompt = strdup(rq->system_prompt);
        c->text = strdup(rq->text);
    }
    if (f->fail_at == f->n) {
        *err = mem_strdup("llm-svc Complete failed (UNAVAILABLE: connection refused)");
        return -1;
    }
    if (rq->step == SUMM_STEP_WHOLE || rq->step == SUMM_STEP_FINAL) {
        *out = mem_asprintf("SUMMARY after %d calls", f->n);
    } else if (f->out_size > 0) {
        char *s = mem_alloc(f->out_size + 1);
        memset(s, 'p', f->out_size);
        s[f->out_size] = '\0';
        *out = s;
    } else {
        *out = mem_asprintf("partial %d (parts %u-%u)", f->n, rq->first_part, rq->last_part);
    }
    return 0;
}

static fake *fake_new(int record)
{
    fake *f = calloc(1, sizeof *f);
    f->record = record;
    return f;
}

static void fake_free(fake *f)
{
    for (int i = 0; i < f->n; i++) {
        free(f->calls[i].prompt);
        free(f->calls[i].text);
    }
    free(f);
}

static void add(summ *s, Convo__V1__EventType t, const char *text)
{
    assert_int_equal(summ_add(s, t, text, strlen(text)), 0);
}

static void test_whole_conversation(void **state)
{
    fake *f = fake_new(1);
    summ *s = summ_new(65536, fake_model, f);
    add(s, SYSTEM, "{\"event\":\"connected\"}");
    add(s, USER, "What is pgvector?");
    add(s, SYSTEM, "{\"event\":\"route\",\"strategy\":\"TOOL_HEAVY\"}");
    add(s, CALL,
        "{\"id\":\"call_1\",\"tool\":\"fetch_internal_knowledge\",\"arguments\":{\"topic\":"
        "\"pgvector\"}}");
    add(s, RESULT,
        "{\"id\":\"call_1\",\"tool\":\"fetch_internal_knowledge\",\"result\":{\"passages\":"
        "[\"pgvector adds vector similarity search to PostgreSQL\"]}}");
    add(s, TOKEN, "pgvector ");
    add(s, TOKEN, "is an ");
    add(s, SYSTEM, "{\"event\":\"heartbeat\"}"); /* inside a reply: does not split it */
    add(s, TOKEN, "extension.");
    add(s, USER, "Thanks, and HNSW?");
    add(s, TOKEN, "HNSW is a graph index.");
    char *summary = NULL;
    assert_int_equal(summ_finish(s, &summary), 0);
    assert_string_equal(summary, "SUMMARY after 1 calls");
    assert_int_equal(f->n, 1);
    assert_int_equal(f->calls[0].step, SUMM_STEP_WHOLE);
    assert_string_equal(
        f->calls[0].text,
        "User: What is pgvector?\n"
        "Tool call fetch_internal_knowledge: {\"topic\":\"pgvector\"}\n"
        "Tool result fetch_internal_knowledge: {\"passages\":[\"pgvector adds vector similarity "
        "search to PostgreSQL\"]}\n"
        "Assistant: pgvector is an extension.\n"
        "User: Thanks, and HNSW?\n"
        "Assistant: HNSW is a graph index.\n");
    /* The seed's four parts are asked for, and the prompt triggers the
     * offline model's summary mode. */
    const char *p = f->calls[0].prompt;
    assert_non_null(strstr(p, "Overview:"));
    assert_non_null(strstr(p, "Key topics:"));
    assert_non_null(strstr(p, "Notable intent shifts or patterns:"));
    assert_non_null(strstr(p, "Insights or conclusions:"));
    assert_non_null(strstr(p, "summar"));
    assert_int_equal(f->calls[0].max_tokens, SUMM_FINAL_MAX_TOKENS);
    const summ_stats *st = summ_get_stats(s);
    assert_int_equal(st->events, 11);
    assert_int_equal(st->skipped, 3);
    assert_int_equal(st->messages, 2);
    assert_int_equal(st->replies, 2);
    assert_int_equal(st->tool_calls, 1);
    assert_int_equal(st->tool_results, 1);
    assert_int_equal(st->chunks, 1);
    assert_int_equal(st->calls, 1);
    assert_int_equal(st->levels, 0);
    mem_free(summary);
    summ_free(&s);
    assert_null(s);
    fake_free(f);
}

static void test_tool_content_not_json(void **state)
{
    fake *f = fake_new(1);
    summ *s = summ_new(0, fake_model, f); /* raised to the minimum */
    add(s, CALL, "not json at all");
    add(s, RESULT, "{\"id\":\"c\",\"tool\":\"lookup_contextual_data\",\"result\":\"plain text\"}");
    add(s, CALL, "{\"id\":\"c\",\"arguments\":{}}"); /* no tool name */
    add(s, RESULT, "[1,2]");
    char *summary = NULL;
    assert_int_equal(summ_finish(s, &summary), 0);
    assert_string_equal(f->calls[0].text, "Tool call: not json at all\n"
                                          "Tool result lookup_contextual_data: plain text\n"
                                          "Tool call: {\"id\":\"c\",\"arguments\":{}}\n"
                                          "Tool result: [1,2]\n");
    mem_free(summary);
    summ_free(&s);
    fake_free(f);
}

static void test_empty_sessions(void **state)
{
    fake *f = fake_new(0);
    summ *s = summ_new(4096, fake_model, f);
    char *summary = (char *)"x";
    assert_int_equal(summ_finish(s, &summary), SUMM_EEMPTY);
    assert_null(summary);
    summ_free(&s);

    s = summ_new(4096, fake_model, f);
    add(s, SYSTEM, "{\"event\":\"connected\"}");
    add(s, (Convo__V1__EventType)42, "an unknown type is skipped");
    assert_int_equal(summ_finish(s, &summary), SUMM_EEMPTY);
    assert_int_equal(summ_get_stats(s)->skipped, 2);
    summ_free(&s);
    assert_int_equal(f->n, 0);
    assert_non_null(strstr(SUMM_EMPTY_TEXT, "Overview:"));
    fake_free(f);
}

/* Whether every line of the material of the PART calls, once labels and
 * markers are accounted for, is each message exactly once and in order. */
static void test_chunks_cover_everything(void **state)
{
    fake *f = fake_new(1);
    const size_t budget = 1024;
    summ *s = summ_new(budget, fake_model, f);
    char msg[128];
    for (int i = 0; i < 200; i++) {
        snprintf(msg, sizeof msg, "message %03d about topic-%03d", i, i);
        add(s, USER, msg);
        snprintf(msg, sizeof msg, "reply %03d", i);
        add(s, TOKEN, msg);
    }
    char *summary = NULL;
    assert_int_equal(summ_finish(s, &summary), 0);
    assert_true(f->n > 2);
    assert_int_equal(f->calls[f->n - 1].step, SUMM_STEP_FINAL);
    size_t total = 0;
    unsigned parts = 0;
    for (int i = 0; i < f->n; i++) {
        assert_true(strlen(f->calls[i].text) <= budget);
        assert_int_not_equal(f->calls[i].step, SUMM_STEP_WHOLE);
        if (f->calls[i].step == SUMM_STEP_PART) {
            parts++;
            /* Numbered in order. */
            assert_int_equal(f->calls[i].first, parts);
            total += strlen(f->calls[i].text) + 1;
        }
    }
    assert_int_equal(parts, summ_get_stats(s)->chunks);
    char *all = calloc(1, total + 1);
    for (int i = 0; i < f->n; i++)
        if (f->calls[i].step == SUMM_STEP_PART)
            strcat(all, f->calls[i].text);
    /* Short lines are never cut: each one sits whole in one chunk. */
    assert_null(strstr(all, "[continued"));
    const char *at = all;
    for (int i = 0; i < 200; i++) {
        char line[160];
        snprintf(line, sizeof line, "User: message %03d about topic-%03d\nAssistant: reply %03d\n",
                 i, i, i);
        const char *hit = strstr(at, line);
        if (hit == NULL) {
            /* The pair may straddle two chunks: check the halves. */
            snprintf(line, sizeof line, "User: message %03d about topic-%03d\n", i, i);
            hit = strstr(at, line);
            assert_non_null(hit);
            at = hit + strlen(line);
            snprintf(line, sizeof line, "Assistant: reply %03d\n", i);
            hit = strstr(at, line);
        }
        assert_non_null(hit);
        at = hit + strlen(line);
    }
    /* The final call sees every part's summary, in order. */
    const char *fin = f->calls[f->n - 1].text;
    assert_non_null(strstr(fin, "Summary of part 1:"));
    char last[64];
    snprintf(last, sizeof last, "Summary of part %u:", parts);
    assert_non_null(strstr(fin, last));
    free(all);
    mem_free(summary);
    summ_free(&s);
    fake_free(f);
}

/* A reply longer than a chunk is cut at character boundaries, marked on
 * both sides, and comes back whole when the pieces are joined. */
static void test_long_reply_is_cut_visibly(void **state)
{
    fake *f = fake_new(1);
    const size_t budget = 1024;
    summ *s = summ_new(budget, fake_model, f);
    add(s, USER, "Tell me a long story");
    /* 2-, 3- and 4-byte characters, so cuts fall inside them unless
     * careful. */
    const char *tokens[] = {"é", "€uro ", "𝄞", "ab", "ü "};
    size_t expect_len = 0;
    char *expect = calloc(1, 64 * 1024);
    for (int i = 0; i < 2000; i++) {
        const char *t = tokens[i % 5];
        add(s, TOKEN, t);
        strcat(expect + expect_len, t);
        expect_len += strlen(t);
    }
    add(s, USER, "The end");
    char *summary = NULL;
    assert_int_equal(summ_finish(s, &summary), 0);
    char *joined = calloc(1, 64 * 1024);
    int cuts = 0;
    for (int i = 0; i < f->n; i++) {
        if (f->calls[i].step != SUMM_STEP_PART)
            continue;
        const char *t = f->calls[i].text;
        assert_true(strlen(t) <= budget);
        assert_true(rpc_utf8_valid(t, strlen(t)));
        const char *start = strstr(t, "Assistant: ");
        const char *cont = strstr(t, "Assistant (continued): ");
        const char *body = cont != NULL    ? cont + strlen("Assistant (continued): ")
                           : start != NULL ? start + strlen("Assistant: ")
                                           : NULL;
        if (body == NULL)
            continue;
        const char *end = strstr(body, " [continued in the next part]\n");
        if (end != NULL)
            cuts++;
        else
            end = strchr(body, '\n');
        strncat(joined, body, (size_t)(end - body));
    }
    assert_true(cuts >= 5);
    assert_string_equal(joined, expect);
    free(joined);
    free(expect);
    mem_free(summary);
    summ_free(&s);
    fake_free(f);
}

/* Many parts: their summaries overflow a chunk themselves and are
 * combined level by level until one call writes the summary. */
static void test_merge_tree(void **state)
{
    fake *f = fake_new(1);
    f->out_size = 300; /* partial summaries of 300 bytes: 3 fit a chunk */
    const size_t budget = 1024;
    summ *s = summ_new(budget, fake_model, f);
    char msg[600];
    memset(msg, 'm', sizeof msg - 1);
    msg[sizeof msg - 1] = '\0';
    for (int i = 0; i < 100; i++)
        add(s, USER, msg);
    char *summary = NULL;
    assert_int_equal(summ_finish(s, &summary), 0);
    int parts = 0, merges = 0, finals = 0;
    for (int i = 0; i < f->n; i++) {
        assert_true(strlen(f->calls[i].text) <= budget);
        parts += f->calls[i].step == SUMM_STEP_PART;
        merges += f->calls[i].step == SUMM_STEP_MERGE;
        finals += f->calls[i].step == SUMM_STEP_FINAL;
        if (f->calls[i].step == SUMM_STEP_MERGE) {
            assert_true(f->calls[i].first < f->calls[i].last);
            assert_non_null(strstr(f->calls[i].prompt, "combine"));
        }
        if (f->calls[i].step != SUMM_STEP_FINAL)
            assert_true(f->calls[i].max_tokens <= budget / 12 || f->calls[i].max_tokens == 128);
    }
    assert_int_equal(parts, 100);
    assert_true(merges >= 30);
    assert_int_equal(finals, 1);
    assert_int_equal(f->calls[f->n - 1].step, SUMM_STEP_FINAL);
    assert_true(summ_get_stats(s)->levels >= 2);
    /* The final call covers all 100 parts. */
    assert_int_equal(f->calls[f->n - 1].last, 100);
    mem_free(summary);
    summ_free(&s);
    fake_free(f);
}

static void test_long_partial_is_shortened_visibly(void **state)
{
    fake *f = fake_new(1);
    f->out_size = 2000;
    summ *s = summ_new(1024, fake_model, f);
    char msg[700];
    memset(msg, 'x', sizeof msg - 1);
    msg[sizeof msg - 1] = '\0';
    for (int i = 0; i < 3; i++)
        add(s, USER, msg);
    char *summary = NULL;
    assert_int_equal(summ_finish(s, &summary), 0);
    const char *fin = f->calls[f->n - 1].text;
    assert_int_equal(f->calls[f->n - 1].step, SUMM_STEP_FINAL);
    assert_non_null(strstr(fin, "[this partial summary was 2000 bytes, shortened to 341]"));
    mem_free(summary);
    summ_free(&s);
    fake_free(f);
}

static void test_model_failure_stops(void **state)
{
    fake *f = fake_new(0);
    f->fail_at = 2;
    summ *s = summ_new(1024, fake_model, f);
    char msg[400];
    memset(msg, 'y', sizeof msg - 1);
    msg[sizeof msg - 1] = '\0';
    int rc = 0, i;
    for (i = 0; i < 100 && rc == 0; i++)
        rc = summ_add(s, USER, msg, strlen(msg));
    assert_int_equal(rc, SUMM_ELLM);
    assert_int_equal(f->n, 2);
    assert_non_null(strstr(summ_error(s), "UNAVAILABLE"));
    /* Sticky: nothing more is sent. */
    assert_int_equal(summ_add(s, USER, "more", 4), SUMM_ELLM);
    char *summary = NULL;
    assert_int_equal(summ_finish(s, &summary), SUMM_ELLM);
    assert_null(summary);
    assert_int_equal(f->n, 2);
    assert_string_equal(summ_strerror(SUMM_ELLM), "a model call failed");
    summ_free(&s);
    fake_free(f);

    /* The one call of a short session failing. */
    f = fake_new(0);
    f->fail_at = 1;
    s = summ_new(4096, fake_model, f);
    add(s, USER, "hello");
    assert_int_equal(summ_finish(s, &summary), SUMM_ELLM);
    assert_string_equal(summ_error(s), "llm-svc Complete failed (UNAVAILABLE: connection refused)");
    summ_free(&s);
    fake_free(f);
}

/* 20,000 events (a session the e2e test also runs) in little memory: what
 * the summarizer holds stays within a few budgets. */
static void test_memory_bounded(void **state)
{
    fake *f = fake_new(0);
    const size_t budget = 8192;
    size_t base = mem_used(), peak = 0;
    summ *s = summ_new(budget, fake_model, f);
    char text[200];
    for (int i = 0; i < 20000; i++) {
        if (i % 10 == 0) {
            snprintf(text, sizeof text, "user message %d asking about databases and indexes", i);
            add(s, USER, text);
        } else {
            snprintf(text, sizeof text, "token%d ", i);
            add(s, TOKEN, text);
        }
        size_t used = mem_used() - base;
        if (used > peak)
            peak = used;
    }
    char *summary = NULL;
    assert_int_equal(summ_finish(s, &summary), 0);
    assert_true(summ_get_stats(s)->chunks > 10);
    assert_true(peak < 6 * budget + 4096);
    mem_free(summary);
    summ_free(&s);
    assert_int_equal(mem_used(), base);
    fake_free(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_whole_conversation),
        cmocka_unit_test(test_tool_content_not_json),
        cmocka_unit_test(test_empty_sessions),
        cmocka_unit_test(test_chunks_cover_everything),
        cmocka_unit_test(test_long_reply_is_cut_visibly),
        cmocka_unit_test(test_merge_tree),
        cmocka_unit_test(test_long_partial_is_shortened_visibly),
        cmocka_unit_test(test_model_failure_stops),
        cmocka_unit_test(test_memory_bounded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
