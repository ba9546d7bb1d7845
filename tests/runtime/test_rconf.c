/* Tests of runtime/rconf.c: the router.conf parser and its errors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "mem.h"
#include "rconf.h"
#include "route.h"
#include "rpc.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef ROUTER_CONF_PATH
#error "ROUTER_CONF_PATH (the shipped router-svc/router.conf) must be defined"
#endif

static route_config *parse_ok(const char *text)
{
    route_config *cfg = NULL;
    char *err = NULL;
    if (rconf_parse("test.conf", text, strlen(text), &cfg, &err) != 0)
        fail_msg("unexpected error: %s", err);
    assert_null(err);
    assert_non_null(cfg);
    return cfg;
}

/* Parses `text`, expects an error, and checks it starts with
 * "test.conf:LINE: " and contains `what`. */
static void parse_bad(const char *text, int line, const char *what)
{
    route_config *cfg = (route_config *)1;
    char *err = NULL;
    assert_int_equal(rconf_parse("test.conf", text, strlen(text), &cfg, &err), -1);
    assert_null(cfg);
    assert_non_null(err);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "test.conf:%d: ", line);
    if (strncmp(err, prefix, strlen(prefix)) != 0 || strstr(err, what) == NULL)
        fail_msg("for:\n%s\nexpected \"%s...%s\", got \"%s\"", text, prefix, what, err);
    mem_free(err);
}

/* Every field of two configs, with the field's name when one differs. */
static void assert_config_equal(const route_config *a, const route_config *b)
{
    assert_int_equal(a->summarization_min_user_messages, b->summarization_min_user_messages);
    assert_int_equal(a->tool_heavy_min_tool_calls, b->tool_heavy_min_tool_calls);
    assert_int_equal(a->max_message_bytes, b->max_message_bytes);
    assert_int_equal(a->n_keywords, b->n_keywords);
    for (size_t i = 0; i < a->n_keywords; i++)
        assert_string_equal(a->keywords[i], b->keywords[i]);
    assert_string_equal(a->base_prompt, b->base_prompt);
    for (int s = 0; s < ROUTE_N_STRATEGIES; s++) {
        const route_strategy_conf *x = &a->strategies[s], *y = &b->strategies[s];
        assert_string_equal(x->instructions, y->instructions);
        assert_int_equal(x->verbosity, y->verbosity);
        assert_string_equal(x->model, y->model);
        assert_true(x->temperature == y->temperature);
        assert_int_equal(x->max_tokens, y->max_tokens);
        assert_int_equal(x->tools_enabled, y->tools_enabled);
        assert_string_equal(x->system_prompt, y->system_prompt);
    }
}

static void test_shipped_file_equals_defaults(void **state)
{
    route_config *file = NULL, *def = route_config_new();
    char *err = NULL;
    if (rconf_load(ROUTER_CONF_PATH, &file, &err) != 0)
        fail_msg("%s", err);
    assert_config_equal(file, def);
    route_config_free(&file);
    route_config_free(&def);
}

static void test_empty_file_is_defaults(void **state)
{
    route_config *a = parse_ok(""), *b = route_config_new();
    assert_config_equal(a, b);
    route_config_free(&a);
    route_config_free(&a); /* freeing twice through the cleared pointer is harmless */
    a = parse_ok("# only comments\n\n   \n; and this\n");
    assert_config_equal(a, b);
    route_config_free(&a);
    route_config_free(&b);
}

static void test_valid_file(void **state)
{
    route_config *c = parse_ok("[rules]\n"
                               "summarization_min_user_messages = 20\n"
                               "tool_heavy_min_tool_calls=5\n"
                               "analytical_keywords = pourquoi,  warum ,why\n"
                               "max_message_bytes = 1000\n"
                               "[prompt]\n"
                               "base = Be nice.\n"
                               "[ strategy.analytical ]\n"
                               "instructions = Think.\n"
                               "verbosity = balanced\n"
                               "model = gpt-4o-mini\n"
                               "temperature = 1.25\n"
                               "max_tokens = 0\n"
                               "tools = off\n"
                               "[strategy.tool_heavy]\n"
                               "tools = No\n"
                               "model = meta-llama/Llama-3:8b\n"
                               "temperature = 2\n");
    route_config *def = route_config_new();
    assert_int_equal(c->summarization_min_user_messages, 20);
    assert_int_equal(c->tool_heavy_min_tool_calls, 5);
    assert_int_equal(c->max_message_bytes, 1000);
    assert_int_equal(c->n_keywords, 3);
    assert_string_equal(c->keywords[0], "pourquoi");
    assert_string_equal(c->keywords[1], "warum");
    assert_string_equal(c->keywords[2], "why");
    assert_string_equal(c->base_prompt, "Be nice.");

    const route_strategy_conf *a = &c->strategies[ROUTE_ANALYTICAL];
    assert_string_equal(a->instructions, "Think.");
    assert_string_equal(a->system_prompt, "Be nice.\n\nThink.");
    assert_int_equal(a->verbosity, ROUTE_BALANCED);
    assert_string_equal(a->model, "gpt-4o-mini");
    assert_true(fabs(a->temperature - 1.25) < 1e-12);
    assert_int_equal(a->max_tokens, 0);
    assert_false(a->tools_enabled);

    const route_strategy_conf *t = &c->strategies[ROUTE_TOOL_HEAVY];
    assert_false(t->tools_enabled);
    assert_string_equal(t->model, "meta-llama/Llama-3:8b");
    assert_true(t->temperature == 2.0);
    /* Keys not in the file keep their defaults; prompts use the new base. */
    assert_string_equal(t->instructions, def->strategies[ROUTE_TOOL_HEAVY].instructions);
    assert_int_equal(t->max_tokens, def->strategies[ROUTE_TOOL_HEAVY].max_tokens);
    assert_int_equal(strncmp(t->system_prompt, "Be nice.\n\n", 10), 0);
    assert_string_equal(c->strategies[ROUTE_FAST_CONCISE].instructions,
                        def->strategies[ROUTE_FAST_CONCISE].instructions);
    route_config_free(&c);
    route_config_free(&def);
}

static void test_continuation_lines(void **state)
{
    route_config *c = parse_ok("[prompt]\n"
                               "base =\n"
                               "    First line.\n"
                               "\tSecond line, tab-indented.   \n"
                               "# a comment inside the value is skipped\n"
                               "\n"
                               "    New paragraph.\n"
                               "\n"
                               "\n"
                               "[strategy.fast_concise]\n"
                               "instructions = Short.\n"
                               "  Really short.\n"
                               "model =\n"
                               "[rules]\n"
                               "analytical_keywords = why,\n"
                               "    how\n"
                               "    explain\n");
    assert_string_equal(c->base_prompt,
                        "First line.\nSecond line, tab-indented.\n\nNew paragraph.");
    assert_string_equal(c->strategies[ROUTE_FAST_CONCISE].instructions, "Short.\nReally short.");
    assert_string_equal(c->strategies[ROUTE_FAST_CONCISE].model, "");
    assert_int_equal(c->n_keywords, 3);
    assert_string_equal(c->keywords[2], "explain");
    route_config_free(&c);
}

static void test_crlf_and_bom(void **state)
{
    route_config *c = parse_ok("\xEF\xBB\xBF[strategy.analytical]\r\n"
                               "instructions = a\r\n"
                               "   b\r\n"
                               "max_tokens = 10\r\n");
    assert_string_equal(c->strategies[ROUTE_ANALYTICAL].instructions, "a\nb");
    assert_int_equal(c->strategies[ROUTE_ANALYTICAL].max_tokens, 10);
    route_config_free(&c);
    /* Line numbers are not shifted by either. */
    parse_bad("\xEF\xBB\xBF[rules]\r\n\r\nbogus = 1\r\n", 3, "unknown key 'bogus' in [rules]");
}

static void test_error_unknown_key(void **state)
{
    route_config *c = NULL;
    char *err = NULL;
    const char *text = "[strategy.analytical]\n"
                       "temperature = 0.3\n"
                       "\n"
                       "temprature = 0.3\n";
    assert_int_equal(rconf_parse("router.conf", text, strlen(text), &c, &err), -1);
    assert_string_equal(err, "router.conf:4: unknown key 'temprature' in [strategy.analytical]");
    mem_free(err);
    /* A key of another section is unknown here. */
    parse_bad("[rules]\ntemperature = 1\n", 2, "unknown key 'temperature' in [rules]");
    parse_bad("[prompt]\nBase = x\n", 2, "unknown key 'Base' in [prompt]");
}

static void test_error_unknown_section(void **state)
{
    parse_bad("[rules]\n\n[strategy.analytic]\n", 3, "unknown section [strategy.analytic]");
    parse_bad("[Rules]\n", 1, "unknown section [Rules]");
    parse_bad("[strategy.]\n", 1, "unknown section [strategy.]");
    parse_bad("[rules\n", 1, "bad section header '[rules'");
    parse_bad("[rules] # comment\n", 1, "bad section header");
}

static void test_error_bad_number(void **state)
{
    parse_bad("[rules]\nsummarization_min_user_messages = ten\n", 2, "bad number 'ten'");
    parse_bad("[rules]\ntool_heavy_min_tool_calls = -1\n", 2, "bad number '-1'");
    parse_bad("[rules]\nmax_message_bytes = 1e3\n", 2, "bad number '1e3'");
    parse_bad("[rules]\nmax_message_bytes =\n", 2, "bad number ''");
    parse_bad("[strategy.tool_heavy]\nmax_tokens = 12 # tokens\n", 2, "bad number '12 # tokens'");
    parse_bad("[strategy.tool_heavy]\ntemperature = warm\n", 2, "bad number 'warm'");
    parse_bad("[strategy.tool_heavy]\ntemperature = nan\n", 2, "bad number 'nan'");
    parse_bad("[strategy.tool_heavy]\ntemperature = inf\n", 2, "bad number 'inf'");
    parse_bad("[strategy.tool_heavy]\ntemperature = 0x1p0\n", 2, "bad number '0x1p0'");
    parse_bad("[strategy.tool_heavy]\ntemperature = 0,7\n", 2, "bad number '0,7'");
    parse_bad("[strategy.tool_heavy]\ntemperature = 1.\n2\n", 3, "missing '='");
}

static void test_error_out_of_range(void **state)
{
    parse_bad("[strategy.analytical]\ntemperature = 2.5\n", 2,
              "temperature = 2.5 is out of range in [strategy.analytical]: 0 to 2");
    parse_bad("[strategy.analytical]\ntemperature = -0.1\n", 2, "out of range");
    parse_bad("[strategy.analytical]\nmax_tokens = 1000001\n", 2, "0 to 1000000");
    parse_bad("[strategy.analytical]\nmax_tokens = 99999999999999999999999\n", 2, "out of range");
    parse_bad("[rules]\nmax_message_bytes = 0\n", 2, "1 to 16777216");
    parse_bad("[rules]\nsummarization_min_user_messages = 1000001\n", 2, "out of range");

    route_config *c = parse_ok("[strategy.analytical]\ntemperature = 0\nmax_tokens = 1000000\n"
                               "[rules]\nmax_message_bytes = 16777216\n");
    route_config_free(&c);
}

static void test_error_missing_equals(void **state)
{
    parse_bad("[strategy.analytical]\ntools true\n", 2, "missing '=' in 'tools true'");
    parse_bad("[rules]\n= 3\n", 2, "missing key before '='");
}

static void test_error_structure(void **state)
{
    parse_bad("# header\nmax_tokens = 3\n", 2, "key 'max_tokens' is outside any section");
    parse_bad("[strategy.analytical]\ntemperature = 0.3\n[rules]\n[strategy.analytical]\n"
              "temperature = 0.4\n",
              5, "'temperature' is set twice in [strategy.analytical] (first at line 2)");
    /* An indented key is read as a continuation; say so. */
    parse_bad("[strategy.analytical]\ntemperature = 0.3\n  max_tokens = 5\n", 3,
              "indented line continues 'temperature' (line 2), which takes a one-line value");
    parse_bad("[rules]\n   why\n", 2, "indented line with no 'key =' above it");
    parse_bad("  [rules]\n", 1, "indented line with no 'key =' above it");
}

static void test_error_bad_values(void **state)
{
    parse_bad(
        "[strategy.fast_concise]\nverbosity = terse\n", 2,
        "unknown verbosity 'terse' in [strategy.fast_concise]: concise, balanced or detailed");
    parse_bad("[strategy.fast_concise]\ntools = maybe\n", 2, "bad value 'maybe' for tools");
    parse_bad("[strategy.fast_concise]\nmodel = \"\"\n", 2, "has a space or a quote");
    parse_bad("[strategy.fast_concise]\nmodel = gpt 4\n", 2, "has a space or a quote");
    /* The keyword list's error names the key's line, even for a later line. */
    parse_bad("[rules]\nanalytical_keywords = why,\n    look up\n", 2,
              "analytical_keywords in [rules]: keyword 'look up' is not a single word");
    parse_bad("[rules]\nanalytical_keywords = why?\n", 2, "'why?' is not a single word");
}

static void test_error_quotes_are_short_utf8(void **state)
{
    /* 39 letters, then é across the 40-byte cut: the quote stops before it. */
    char text[256], want[128];
    char a39[40];
    memset(a39, 'a', 39);
    a39[39] = '\0';
    snprintf(text, sizeof text, "[strategy.fast_concise]\nverbosity = %s\xC3\xA9zzzzzz\n", a39);
    snprintf(want, sizeof want, "unknown verbosity '%s...'", a39);
    parse_bad(text, 2, want);

    route_config *c = NULL;
    char *err = NULL;
    snprintf(text, sizeof text, "[%s\xC3\xA9zzzzzz]\n", a39);
    assert_int_equal(rconf_parse("test.conf", text, strlen(text), &c, &err), -1);
    assert_true(rpc_utf8_valid(err, strlen(err)));
    snprintf(want, sizeof want, "test.conf:1: unknown section [%s...]", a39);
    assert_int_equal(strncmp(err, want, strlen(want)), 0);
    mem_free(err);
}

static void test_error_encoding(void **state)
{
    parse_bad("[prompt]\nbase = caf\xE9\n", 2, "not valid UTF-8");
    static const char nul[] = "[prompt]\nbase = a\0b\n";
    route_config *c = NULL;
    char *err = NULL;
    assert_int_equal(rconf_parse("test.conf", nul, sizeof nul - 1, &c, &err), -1);
    assert_string_equal(err, "test.conf:2: NUL byte in the line: is this a text file?");
    mem_free(err);
}

static void test_error_at_end_of_file(void **state)
{
    /* The last value is checked even without a final newline. */
    parse_bad("[rules]\n\ntool_heavy_min_tool_calls = x", 3, "bad number 'x'");
    /* And a value cut by the error line itself keeps its own line. */
    parse_bad("[strategy.analytical]\nmax_tokens = many\n[rules]\n", 2, "bad number 'many'");
}

static char *write_temp(const char *text, size_t len)
{
    char *path = mem_strdup("/tmp/test_rconf_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, len), (ssize_t)len);
    close(fd);
    return path;
}

static void test_load(void **state)
{
    route_config *c = NULL;
    char *err = NULL;

    assert_int_equal(rconf_load("/nonexistent/router.conf", &c, &err), -1);
    assert_null(c);
    assert_string_equal(err, "/nonexistent/router.conf: cannot read: No such file or directory");
    mem_free(err);

    assert_int_equal(rconf_load("/tmp", &c, &err), -1);
    assert_non_null(strstr(err, "/tmp: cannot read"));
    mem_free(err);

    const char text[] = "[rules]\nmax_message_bytes = 77\n\n[bogus]\n";
    char *path = write_temp(text, sizeof text - 1);
    assert_int_equal(rconf_load(path, &c, &err), -1);
    char want[128];
    snprintf(want, sizeof want, "%s:4: unknown section [bogus]", path);
    assert_int_equal(strncmp(err, want, strlen(want)), 0);
    mem_free(err);
    unlink(path);
    mem_free(path);

    size_t big = RCONF_MAX_FILE_BYTES + 1;
    char *huge = mem_alloc(big);
    memset(huge, '#', big);
    path = write_temp(huge, big);
    assert_int_equal(rconf_load(path, &c, &err), -1);
    assert_non_null(strstr(err, "larger than"));
    mem_free(err);
    unlink(path);
    mem_free(path);
    mem_free(huge);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shipped_file_equals_defaults),
        cmocka_unit_test(test_empty_file_is_defaults),
        cmocka_unit_test(test_valid_file),
        cmocka_unit_test(test_continuation_lines),
        cmocka_unit_test(test_crlf_and_bom),
        cmocka_unit_test(test_error_unknown_key),
        cmocka_unit_test(test_error_unknown_section),
        cmocka_unit_test(test_error_bad_number),
        cmocka_unit_test(test_error_out_of_range),
        cmocka_unit_test(test_error_missing_equals),
        cmocka_unit_test(test_error_structure),
        cmocka_unit_test(test_error_bad_values),
        cmocka_unit_test(test_error_quotes_are_short_utf8),
        cmocka_unit_test(test_error_encoding),
        cmocka_unit_test(test_error_at_end_of_file),
        cmocka_unit_test(test_load),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
