/* Tests of runtime/route.c: the rules, their order, word matching. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "mem.h"
#include "route.h"

#include <stdio.h>
#include <string.h>

static route_config *cfg;

static int setup(void **state)
{
    cfg = route_config_new();
    return 0;
}

static int teardown(void **state)
{
    route_config_free(&cfg);
    return 0;
}

/* Runs the rules on a copy of `msg` in a buffer of exactly its length, so
 * AddressSanitizer catches any read past the end (route takes a length, not
 * a NUL-terminated string). */
static route_decision decide_len(const char *msg, size_t len, long long users, long long tools)
{
    char *copy = mem_alloc(len);
    memcpy(copy, msg, len);
    route_input in = {copy, len, users, tools};
    route_decision d;
    memset(&d, 0xAB, sizeof d); /* route_decide must set everything it reports */
    route_decide(cfg, &in, &d);
    mem_free(copy);
    return d;
}

static route_decision decide(const char *msg, long long users, long long tools)
{
    return decide_len(msg, strlen(msg), users, tools);
}

static void test_default_is_fast_concise(void **state)
{
    route_decision d = decide("hello there", 1, 0);
    assert_int_equal(d.strategy, ROUTE_FAST_CONCISE);
    assert_int_equal(d.verbosity, ROUTE_CONCISE);
    assert_int_equal(d.n_reasons, 1);
    assert_non_null(strstr(d.reasons[0], "no rule matched"));
    assert_ptr_equal(d.conf, &cfg->strategies[ROUTE_FAST_CONCISE]);
}

static void test_summarization_boundary(void **state)
{
    route_decision d = decide("tell me more", 10, 0);
    assert_int_equal(d.strategy, ROUTE_FAST_CONCISE);

    d = decide("tell me more", 11, 0);
    assert_int_equal(d.strategy, ROUTE_SUMMARIZATION_AWARE);
    assert_int_equal(d.verbosity, ROUTE_BALANCED);
    assert_int_equal(d.n_reasons, 1);
    assert_string_equal(d.reasons[0], "11 user messages so far, more than 10: a long session");
}

static void test_tool_heavy_boundary(void **state)
{
    route_decision d = decide("and then?", 1, 2);
    assert_int_equal(d.strategy, ROUTE_FAST_CONCISE);

    d = decide("and then?", 1, 3);
    assert_int_equal(d.strategy, ROUTE_TOOL_HEAVY);
    assert_int_equal(d.verbosity, ROUTE_CONCISE);
    assert_int_equal(d.n_reasons, 1);
    assert_string_equal(d.reasons[0], "3 tool calls so far, more than 2: a tool-driven session");
}

static void test_each_analytical_keyword(void **state)
{
    static const char *const words[] = {"analyze", "explain", "why", "how", "compare", "evaluate"};
    for (size_t i = 0; i < sizeof words / sizeof words[0]; i++) {
        char msg[64], want[128];
        snprintf(msg, sizeof msg, "please %s this", words[i]);
        route_decision d = decide(msg, 1, 0);
        assert_int_equal(d.strategy, ROUTE_ANALYTICAL);
        assert_int_equal(d.verbosity, ROUTE_DETAILED);
        assert_int_equal(d.n_reasons, 1);
        snprintf(want, sizeof want, "the last user message contains the analytical word '%s'",
                 words[i]);
        assert_string_equal(d.reasons[0], want);
    }
}

static void test_later_rules_override_earlier(void **state)
{
    /* Long session + analytical word: analytical, both reasons in order. */
    route_decision d = decide("why is that?", 11, 0);
    assert_int_equal(d.strategy, ROUTE_ANALYTICAL);
    assert_int_equal(d.verbosity, ROUTE_DETAILED);
    assert_int_equal(d.n_reasons, 2);
    assert_non_null(strstr(d.reasons[0], "11 user messages"));
    assert_non_null(strstr(d.reasons[1], "'why'"));

    /* Analytical word + many tool calls: tool-heavy wins. */
    d = decide("explain the result", 1, 3);
    assert_int_equal(d.strategy, ROUTE_TOOL_HEAVY);
    assert_int_equal(d.verbosity, ROUTE_CONCISE);
    assert_int_equal(d.n_reasons, 2);
    assert_non_null(strstr(d.reasons[0], "'explain'"));
    assert_non_null(strstr(d.reasons[1], "3 tool calls"));

    /* All three. */
    d = decide("How come?", 12, 5);
    assert_int_equal(d.strategy, ROUTE_TOOL_HEAVY);
    assert_int_equal(d.n_reasons, 3);
    assert_non_null(strstr(d.reasons[0], "12 user messages"));
    assert_non_null(strstr(d.reasons[1], "'how'"));
    assert_non_null(strstr(d.reasons[2], "5 tool calls"));

    /* Long session + tool calls, no keyword. */
    d = decide("ok", 11, 3);
    assert_int_equal(d.strategy, ROUTE_TOOL_HEAVY);
    assert_int_equal(d.n_reasons, 2);
}

static void test_negative_counts_fire_nothing(void **state)
{
    route_decision d = decide("hi", -5, -1);
    assert_int_equal(d.strategy, ROUTE_FAST_CONCISE);
}

struct word_case {
    const char *msg;
    int match;
};

static void check_words(const struct word_case *cases, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        route_decision d = decide(cases[i].msg, 1, 0);
        int got = d.strategy == ROUTE_ANALYTICAL;
        if (got != cases[i].match)
            fail_msg("\"%s\": expected %s", cases[i].msg, cases[i].match ? "a match" : "none");
    }
}

static void test_whole_words_ascii(void **state)
{
    static const struct word_case cases[] = {
        {"how", 1},
        {"HOW", 1},
        {"WhY", 1},
        {"How are you", 1},
        {"how's it going", 1},
        {"Explain:", 1},
        {"evaluate.", 1},
        {"(compare)", 1},
        {"re-explain it", 1},
        {"so... why", 1},
        {"howdy", 0},
        {"somehow", 0},
        {"explained", 0},
        {"comparison", 0},
        {"whyever", 0},
        {"analyse", 0}, /* British spelling: not a keyword unless configured */
        {"how_to", 0},  /* '_' is a word character */
        {"how2", 0},
        {"2how", 0},
        {"", 0},
        {"   ", 0},
    };
    check_words(cases, sizeof cases / sizeof cases[0]);
}

static void test_whole_words_non_ascii(void **state)
{
    static const struct word_case cases[] = {
        {"¿Por qué? why", 1},
        {"¿Why?", 1},
        {"¡Explain!", 1},
        {"«why»", 1},
        {"\xE2\x80\x9CWhy\xE2\x80\x9D", 1},  /* “Why” */
        {"why\xE2\x80\xA6", 1},              /* why… */
        {"how\xE2\x80\x99s that", 1},        /* how’s */
        {"why\xEF\xBC\x9F", 1},              /* why？ (fullwidth) */
        {"\xE3\x80\x8Cwhy\xE3\x80\x8D", 1},  /* 「why」 */
        {"\xE5\x88\x86\xE6\x9E\x90 why", 1}, /* 分析 why */
        {"why\xF0\x9F\xA4\x94", 1},          /* why🤔 */
        {"\xC2\xA0why\xC2\xA0", 1},          /* NBSP around */
        {"why\xE2\x80\x8B", 1},              /* zero-width space */
        {"\xE2\x80\x94how\xE2\x80\x94", 1},  /* —how— */
        {"\xC3\xA9why", 0},                  /* éwhy */
        {"why\xC3\xA9", 0},                  /* whyé */
        {"why\xCC\x81", 0},                  /* whý with a combining accent */
        {"\xE5\x88\x86why", 1},              /* 分why: each CJK character is a word */
        {"\xE8\xAF\xB7"
         "explain",
         1},                                                     /* 请explain */
        {"WHY\xCC\x81", 0},                                      /* WHÝ with a combining accent */
        {"how\xE2\x80\x99", 1},                                  /* how’ */
        {"\xEF\xBD\x97\xEF\xBD\x88\xEF\xBD\x99", 0},             /* ｗｈｙ (fullwidth letters) */
        {"\xD0\xBF\xD0\xBE\xD1\x87\xD0\xB5\xD0\xBC\xD1\x83", 0}, /* почему */
    };
    check_words(cases, sizeof cases / sizeof cases[0]);
}

static void test_malformed_utf8_is_safe(void **state)
{
    /* Requests are checked for UTF-8 before route sees them; still, a bad
     * byte must neither be read past nor glue words together. */
    static const struct word_case cases[] = {
        {"\xFFwhy\xFF", 1},
        {"\xC3why", 1},             /* a lead byte without its continuation */
        {"why\xE2\x80", 1},         /* truncated at the end */
        {"\xED\xA0\x80why", 1},     /* an encoded surrogate */
        {"\xC0\xAFwhy", 1},         /* an overlong '/' */
        {"\xF4\x90\x80\x80why", 1}, /* beyond U+10FFFF */
        {"wh\xFFy", 0},
        {"\xE2", 0},
        {"\xF0\x9F\xA4", 0},
    };
    check_words(cases, sizeof cases / sizeof cases[0]);
}

static void test_length_is_respected(void **state)
{
    route_decision d = decide_len("hello why", 5, 1, 0);
    assert_int_equal(d.strategy, ROUTE_FAST_CONCISE);
    d = decide_len("hello why", 9, 1, 0);
    assert_int_equal(d.strategy, ROUTE_ANALYTICAL);
    /* A keyword cut by the length is not a word. */
    d = decide_len("whyever", 3, 1, 0);
    assert_int_equal(d.strategy, ROUTE_ANALYTICAL);
}

static void test_word_chars(void **state)
{
    assert_true(route_is_word_char('a'));
    assert_true(route_is_word_char('Z'));
    assert_true(route_is_word_char('7'));
    assert_true(route_is_word_char('_'));
    assert_false(route_is_word_char(' '));
    assert_false(route_is_word_char('\''));
    assert_false(route_is_word_char('?'));
    assert_false(route_is_word_char('-'));
    assert_true(route_is_word_char(0xE9));     /* é */
    assert_true(route_is_word_char(0x0301));   /* combining acute */
    assert_true(route_is_word_char(0x4E2D));   /* 中 */
    assert_true(route_is_word_char(0x0439));   /* й */
    assert_false(route_is_word_char(0xA0));    /* NBSP */
    assert_false(route_is_word_char(0xBF));    /* ¿ */
    assert_false(route_is_word_char(0xD7));    /* × */
    assert_false(route_is_word_char(0x2019));  /* ’ */
    assert_false(route_is_word_char(0x3002));  /* 。 */
    assert_false(route_is_word_char(0xFF1F));  /* ？ */
    assert_false(route_is_word_char(0x1F914)); /* 🤔 */
    assert_false(route_is_word_char(0x061F));  /* Arabic question mark */
    assert_false(route_is_word_char(0x110000));
}

static void test_verbosity_by_strategy(void **state)
{
    assert_int_equal(cfg->strategies[ROUTE_FAST_CONCISE].verbosity, ROUTE_CONCISE);
    assert_int_equal(cfg->strategies[ROUTE_ANALYTICAL].verbosity, ROUTE_DETAILED);
    assert_int_equal(cfg->strategies[ROUTE_SUMMARIZATION_AWARE].verbosity, ROUTE_BALANCED);
    assert_int_equal(cfg->strategies[ROUTE_TOOL_HEAVY].verbosity, ROUTE_CONCISE);
}

static void test_prompts_are_base_plus_instructions(void **state)
{
    assert_non_null(strstr(cfg->base_prompt, "fetch_internal_knowledge"));
    assert_non_null(strstr(cfg->base_prompt, "lookup_contextual_data"));
    assert_non_null(strstr(cfg->base_prompt, "real-time chat"));
    for (int s = 0; s < ROUTE_N_STRATEGIES; s++) {
        const route_strategy_conf *sc = &cfg->strategies[s];
        size_t blen = strlen(cfg->base_prompt), ilen = strlen(sc->instructions);
        assert_true(ilen > 0);
        assert_int_equal(strlen(sc->system_prompt), blen + 2 + ilen);
        assert_memory_equal(sc->system_prompt, cfg->base_prompt, blen);
        assert_memory_equal(sc->system_prompt + blen, "\n\n", 2);
        assert_string_equal(sc->system_prompt + blen + 2, sc->instructions);
        /* Each strategy's instructions differ from the others'. */
        for (int t = 0; t < s; t++)
            assert_string_not_equal(sc->instructions, cfg->strategies[t].instructions);
    }
    route_decision d = decide("why?", 1, 0);
    assert_string_equal(d.conf->system_prompt, cfg->strategies[ROUTE_ANALYTICAL].system_prompt);
    assert_non_null(strstr(d.conf->system_prompt, "step by step"));
}

static void test_default_params(void **state)
{
    for (int s = 0; s < ROUTE_N_STRATEGIES; s++) {
        const route_strategy_conf *sc = &cfg->strategies[s];
        assert_string_equal(sc->model, "");
        assert_true(sc->temperature >= 0 && sc->temperature <= 2);
        assert_true(sc->max_tokens > 0);
        assert_true(sc->tools_enabled);
    }
    /* Analytical answers get the most room. */
    for (int s = 0; s < ROUTE_N_STRATEGIES; s++)
        assert_true(cfg->strategies[ROUTE_ANALYTICAL].max_tokens >= cfg->strategies[s].max_tokens);
}

static void test_prepare_with_empty_parts(void **state)
{
    route_config *c = route_config_new();
    mem_free(c->strategies[ROUTE_ANALYTICAL].instructions);
    c->strategies[ROUTE_ANALYTICAL].instructions = mem_strdup("");
    route_config_prepare(c);
    assert_string_equal(c->strategies[ROUTE_ANALYTICAL].system_prompt, c->base_prompt);

    mem_free(c->base_prompt);
    c->base_prompt = mem_strdup("");
    route_config_prepare(c);
    assert_string_equal(c->strategies[ROUTE_TOOL_HEAVY].system_prompt,
                        c->strategies[ROUTE_TOOL_HEAVY].instructions);
    route_config_free(&c);
    assert_null(c);
}

static void test_custom_keywords(void **state)
{
    route_config *saved = cfg;
    cfg = route_config_new();
    char err[256];

    assert_int_equal(route_config_set_keywords(
                         cfg,
                         " pourquoi ,warum,\n\xD0\xBF\xD0\xBE\xD1\x87\xD0\xB5\xD0\xBC\xD1\x83, ,",
                         err, sizeof err),
                     0);
    assert_int_equal(cfg->n_keywords, 3);
    assert_string_equal(cfg->keywords[0], "pourquoi");
    assert_string_equal(cfg->keywords[1], "warum");
    assert_int_equal(decide("Pourquoi ?", 1, 0).strategy, ROUTE_ANALYTICAL);
    assert_int_equal(decide("WARUM", 1, 0).strategy, ROUTE_ANALYTICAL);
    assert_int_equal(decide("\xD0\xBF\xD0\xBE\xD1\x87\xD0\xB5\xD0\xBC\xD1\x83?", 1, 0).strategy,
                     ROUTE_ANALYTICAL);
    assert_int_equal(decide("why", 1, 0).strategy, ROUTE_FAST_CONCISE);
    /* Case folding beyond ASCII: Cyrillic capitals, and full folding
     * (ß is "ss") for messages and keywords alike. */
    assert_int_equal(
        decide("\xD0\x9F\xD0\xBE\xD1\x87\xD0\xB5\xD0\xBC\xD1\x83 \xD0\xBD\xD0\xB5\xD0\xB1\xD0\xBE?",
               1, 0)
            .strategy,
        ROUTE_ANALYTICAL); /* Почему небо? */
    assert_int_equal(decide("\xD0\x9F\xD0\x9E\xD0\xA7\xD0\x95\xD0\x9C\xD0\xA3", 1, 0).strategy,
                     ROUTE_ANALYTICAL); /* ПОЧЕМУ */
    assert_int_equal(route_config_set_keywords(cfg,
                                               "Stra\xC3\x9F"
                                               "e, \xCE\xA3\xCE\x99\xCE\x93\xCE\x9C\xCE\x91",
                                               err, sizeof err),
                     0); /* Straße, ΣΙΓΜΑ: stored folded */
    assert_string_equal(cfg->keywords[0], "strasse");
    assert_int_equal(decide("STRASSE!", 1, 0).strategy, ROUTE_ANALYTICAL);
    assert_int_equal(decide("die stra\xC3\x9F"
                            "e",
                            1, 0)
                         .strategy,
                     ROUTE_ANALYTICAL);
    assert_int_equal(decide("\xCF\x83\xCE\xB9\xCE\xB3\xCE\xBC\xCE\xB1", 1, 0).strategy,
                     ROUTE_ANALYTICAL); /* σιγμα */
    assert_int_equal(decide("strassen", 1, 0).strategy, ROUTE_FAST_CONCISE);
    /* A word that spans past 2 KiB of folded text (the allocating path). */
    char big[4096 + 16];
    memset(big, 'x', 4096);
    memcpy(big + 4096, " STRASSE", 9);
    assert_int_equal(decide(big, 1, 0).strategy, ROUTE_ANALYTICAL);
    big[4096] = 'y';
    assert_int_equal(decide(big, 1, 0).strategy, ROUTE_FAST_CONCISE);

    /* A bad item leaves the list as it was. */
    assert_int_equal(route_config_set_keywords(cfg, "why, look up", err, sizeof err), -1);
    assert_non_null(strstr(err, "'look up' is not a single word"));
    assert_int_equal(cfg->n_keywords, 2);
    assert_int_equal(route_config_set_keywords(cfg, "why?", err, sizeof err), -1);
    assert_int_equal(route_config_set_keywords(cfg, "how's", err, sizeof err), -1);
    assert_int_equal(route_config_set_keywords(cfg, "_x", err, sizeof err), 0);
    assert_int_equal(route_config_set_keywords(cfg, "\xE4\xB8\xBA\xE4\xBB\x80", err, sizeof err),
                     -1);
    assert_non_null(strstr(err, "not a single word")); /* 为什: two CJK words */
    assert_int_equal(route_config_set_keywords(cfg, "a\xFF", err, sizeof err), -1);
    char long_kw[ROUTE_KEYWORD_MAX + 2];
    memset(long_kw, 'a', sizeof long_kw - 1);
    long_kw[sizeof long_kw - 1] = '\0';
    assert_int_equal(route_config_set_keywords(cfg, long_kw, err, sizeof err), -1);
    assert_non_null(strstr(err, "longer than"));
    long_kw[ROUTE_KEYWORD_MAX] = '\0';
    assert_int_equal(route_config_set_keywords(cfg, long_kw, err, sizeof err), 0);

    /* An empty list turns the rule off. */
    assert_int_equal(route_config_set_keywords(cfg, "", err, sizeof err), 0);
    assert_int_equal(cfg->n_keywords, 0);
    assert_int_equal(decide("why how explain", 1, 0).strategy, ROUTE_FAST_CONCISE);

    route_config_free(&cfg);
    cfg = saved;
}

static void test_custom_thresholds(void **state)
{
    route_config *saved = cfg;
    cfg = route_config_new();
    cfg->summarization_min_user_messages = 0;
    cfg->tool_heavy_min_tool_calls = 0;
    assert_int_equal(decide("hi", 0, 0).strategy, ROUTE_FAST_CONCISE);
    assert_int_equal(decide("hi", 1, 0).strategy, ROUTE_SUMMARIZATION_AWARE);
    assert_int_equal(decide("hi", 0, 1).strategy, ROUTE_TOOL_HEAVY);
    route_config_free(&cfg);
    cfg = saved;
}

static void test_names(void **state)
{
    for (int s = 0; s < ROUTE_N_STRATEGIES; s++)
        assert_int_equal(route_strategy_parse(route_strategy_name(s)), s);
    for (int v = 0; v < ROUTE_N_VERBOSITIES; v++)
        assert_int_equal(route_verbosity_parse(route_verbosity_name(v)), v);
    assert_string_equal(route_strategy_name(ROUTE_SUMMARIZATION_AWARE), "summarization_aware");
    assert_int_equal(route_strategy_parse("Analytical"), -1);
    assert_int_equal(route_verbosity_parse("verbose"), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_default_is_fast_concise),
        cmocka_unit_test(test_summarization_boundary),
        cmocka_unit_test(test_tool_heavy_boundary),
        cmocka_unit_test(test_each_analytical_keyword),
        cmocka_unit_test(test_later_rules_override_earlier),
        cmocka_unit_test(test_negative_counts_fire_nothing),
        cmocka_unit_test(test_whole_words_ascii),
        cmocka_unit_test(test_whole_words_non_ascii),
        cmocka_unit_test(test_malformed_utf8_is_safe),
        cmocka_unit_test(test_length_is_respected),
        cmocka_unit_test(test_word_chars),
        cmocka_unit_test(test_verbosity_by_strategy),
        cmocka_unit_test(test_prompts_are_base_plus_instructions),
        cmocka_unit_test(test_default_params),
        cmocka_unit_test(test_prepare_with_empty_parts),
        cmocka_unit_test(test_custom_keywords),
        cmocka_unit_test(test_custom_thresholds),
        cmocka_unit_test(test_names),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
