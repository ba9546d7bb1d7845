/* Tests of llm-svc/kb.c (BM25 ranking) over the shipped knowledge folder
 * and a folder made here, and of the tools registry's argument checks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "kb.h"
#include "mem.h"
#include "tools.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void test_shipped_docs_rank(void **state)
{
    kb *k = NULL;
    char err[256];
    assert_int_equal(kb_load(KNOWLEDGE_DIR, &k, err, sizeof err), 0);
    assert_true(kb_passages(k) >= 20);
    kb_hit h[3];
    struct {
        const char *q, *source;
    } cases[] = {{"websockets", "websockets.md"},
                 {"grpc deadlines", "grpc.md"},
                 {"postgresql indexes", "postgresql.md"},
                 {"python GIL threads", "python.md"},
                 {"asyncio event loop", "async-programming.md"},
                 {"tool calling deltas", "llms.md"}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t n = kb_search(k, cases[i].q, h, 3);
        assert_true(n >= 1);
        if (strcmp(h[0].source, cases[i].source) != 0)
            fail_msg("'%s' ranked %s first, not %s", cases[i].q, h[0].source, cases[i].source);
        for (size_t j = 1; j < n; j++)
            assert_true(h[j - 1].score >= h[j].score);
    }
    assert_int_equal(kb_search(k, "zzqx qqqv", h, 3), 0);
    assert_int_equal(kb_search(k, "the of and", h, 3), 0); /* stopwords only */
    kb_destroy(&k);
    assert_null(k);
}

/* Rare words outweigh common ones; a passage that repeats a word beats one
 * that mentions it once (saturating); longer passages are damped. */
static void test_bm25_order(void **state)
{
    char dir[] = "/tmp/kbtestXXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[256];
    snprintf(path, sizeof path, "%s/a.md", dir);
    FILE *f = fopen(path, "w");
    fputs("# one\napple banana common\n# two\napple apple apple common\n"
          "# three\ncommon common cherry\n# four\ncherry common filler filler filler filler "
          "filler filler filler filler filler filler\n",
          f);
    fclose(f);
    kb *k = NULL;
    char err[256];
    assert_int_equal(kb_load(dir, &k, err, sizeof err), 0);
    kb_hit h[4];
    assert_int_equal(kb_search(k, "apple", h, 4), 2);
    assert_string_equal(h[0].section, "two");
    assert_int_equal(kb_search(k, "cherry", h, 4), 2);
    assert_string_equal(h[0].section, "three"); /* shorter passage wins */
    assert_int_equal(kb_search(k, "banana common", h, 4), 4);
    assert_string_equal(h[0].section, "one"); /* the rare word decides */
    assert_int_equal(kb_search(k, "banana common", h, 1), 1);
    kb_destroy(&k);
    unlink(path);
    rmdir(dir);
    assert_int_equal(kb_load("/nonexistent-kb", &k, err, sizeof err), -1);
}

static int calls;
static char *last;
static int last_err;

static void done(void *arg, int is_error, char *result)
{
    calls++;
    mem_free(last);
    last = result;
    last_err = is_error;
}

static void test_tools_validation(void **state)
{
    kb *k = NULL;
    char err[256];
    assert_int_equal(kb_load(KNOWLEDGE_DIR, &k, err, sizeof err), 0);
    tools *t = tools_create();
    assert_int_equal(tool_knowledge_register(t, k), 0);
    tool_ctx ctx = {"s", "u", "r"};
    struct {
        const char *name, *args, *want;
        int is_error;
    } cases[] = {
        {"fetch_internal_knowledge", "{\"topic\":\"grpc\"}", "grpc.md", 0},
        {"fetch_internal_knowledge", "{\"topic\":\"zzqx\"}", "nothing found", 0},
        {"fetch_internal_knowledge", "{}", "missing required argument 'topic'", 1},
        {"fetch_internal_knowledge", "", "missing required argument", 1},
        {"fetch_internal_knowledge", "{\"topic\":\"\"}", "shorter than 1", 1},
        {"fetch_internal_knowledge", "{\"topic\":1}", "type string", 1},
        {"fetch_internal_knowledge", "{\"topic\":\"x\",\"y\":1}", "unknown argument 'y'", 1},
        {"fetch_internal_knowledge", "{\"topic\":\"x\"} {}", "not valid JSON", 1},
        {"fetch_internal_knowledge", "[1]", "must be a JSON object", 1},
        {"nope", "{}", "unknown tool 'nope'", 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        calls = 0;
        tools_call(t, &ctx, cases[i].name, cases[i].args, done, NULL);
        assert_int_equal(calls, 1);
        if (strstr(last, cases[i].want) == NULL)
            fail_msg("case %zu: %s", i, last);
        assert_int_equal(last_err, cases[i].is_error);
    }
    mem_free(last);
    last = NULL;
    /* What a request body carries: the array as the model reads it. */
    json_object *body = json_object_new_object();
    json_object_object_add(body, "tools", tools_openai_json(t));
    json_object *seen =
        json_tokener_parse(json_object_to_json_string_ext(body, JSON_C_TO_STRING_PLAIN));
    json_object *arr = NULL, *fn = NULL, *name = NULL, *params = NULL;
    assert_true(json_object_object_get_ex(seen, "tools", &arr));
    assert_int_equal(json_object_array_length(arr), 1);
    assert_true(json_object_object_get_ex(json_object_array_get_idx(arr, 0), "function", &fn));
    assert_true(json_object_object_get_ex(fn, "name", &name));
    assert_string_equal(json_object_get_string(name), "fetch_internal_knowledge");
    assert_true(json_object_object_get_ex(fn, "parameters", &params));
    assert_true(json_object_is_type(params, json_type_object));
    json_object_put(seen);
    json_object_put(body);
    tools_destroy(&t);
    kb_destroy(&k);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shipped_docs_rank),
        cmocka_unit_test(test_bm25_order),
        cmocka_unit_test(test_tools_validation),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
