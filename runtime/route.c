#include "route.h"

#include "mem.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unicase.h>
#include <unictype.h>
#include <unistr.h>
#include <uniwbrk.h>

/* The built-in defaults. They must equal router-svc/router.conf, which
 * writes them out for operators to tune; tests/runtime/test_rconf.c checks
 * that they do, so change both together. */
static const char default_base_prompt[] =
    "You are a helpful assistant in a real-time chat. Your reply is streamed to the user as you\n"
    "write it, so start with the answer itself rather than a preamble.\n"
    "You have two tools:\n"
    "- fetch_internal_knowledge looks a topic up in the internal knowledge base. Use it for\n"
    "questions about internal products, processes, policies or terms instead of answering from\n"
    "memory.\n"
    "- lookup_contextual_data looks up data about this user and this session. Use it when the\n"
    "answer depends on who the user is or on what happened earlier in the session and that is\n"
    "not in the conversation you see.\n"
    "Call a tool only when it helps to answer, and never make up a tool's result. If a tool\n"
    "fails or finds nothing, say so and answer as well as you can without it.\n"
    "If you do not know something, say so rather than guess. Answer in the language the user\n"
    "writes in.";

static const char *const default_keywords[] = {"analyze", "explain", "why",
                                               "how",     "compare", "evaluate"};

static const struct {
    const char *instructions;
    route_verbosity verbosity;
    double temperature;
    uint32_t max_tokens;
} default_strategies[ROUTE_N_STRATEGIES] = {
    [ROUTE_FAST_CONCISE] =
        {"Strategy: fast and concise.\n"
         "Answer in one to three sentences, or a short list when the user asks for several\n"
         "items. Give the direct answer first; leave out background, caveats and restating the\n"
         "question unless they change the answer.",
         ROUTE_CONCISE, 0.3, 400},
    [ROUTE_ANALYTICAL] =
        {"Strategy: analytical.\n"
         "The user wants reasoning, not just a result. Work through the question step by step:\n"
         "1. If the question is ambiguous, say in one sentence how you read it.\n"
         "2. Lay out the facts that matter; fetch them with the tools when they are internal or\n"
         "about this session.\n"
         "3. Reason from the facts to a conclusion, showing each step. When comparing or\n"
         "evaluating, name the criteria and weigh each option against them.\n"
         "4. End with a short conclusion or recommendation, and state any assumption or\n"
         "uncertainty that could change it.\n"
         "Use headings or lists where they make the structure easier to follow.",
         ROUTE_DETAILED, 0.2, 1500},
    [ROUTE_SUMMARIZATION_AWARE] =
        {"Strategy: long conversation.\n"
         "This session has gone on for many turns. Stay consistent with what was said and\n"
         "decided earlier: do not contradict an earlier answer without saying why, and refer\n"
         "back to earlier points instead of repeating them.\n"
         "When it helps the user keep track, start with a one-sentence recap of where the\n"
         "discussion stands.\n"
         "If earlier context you need is not in the conversation you see, use\n"
         "lookup_contextual_data instead of guessing.",
         ROUTE_BALANCED, 0.5, 800},
    [ROUTE_TOOL_HEAVY] =
        {"Strategy: tool-driven.\n"
         "This session relies on looked-up data. Whenever the answer depends on facts that\n"
         "fetch_internal_knowledge or lookup_contextual_data can provide, call them instead of\n"
         "answering from memory, and make each call specific.\n"
         "Base the answer on the tool results: say which facts came from them and add no\n"
         "details they did not return. If results conflict or are missing, say so plainly.\n"
         "Keep the answer short and factual.",
         ROUTE_CONCISE, 0.2, 600},
};

static const char *const strategy_names[ROUTE_N_STRATEGIES] = {
    [ROUTE_FAST_CONCISE] = "fast_concise",
    [ROUTE_ANALYTICAL] = "analytical",
    [ROUTE_SUMMARIZATION_AWARE] = "summarization_aware",
    [ROUTE_TOOL_HEAVY] = "tool_heavy",
};

static const char *const verbosity_names[ROUTE_N_VERBOSITIES] = {
    [ROUTE_CONCISE] = "concise",
    [ROUTE_BALANCED] = "balanced",
    [ROUTE_DETAILED] = "detailed",
};

const char *route_strategy_name(route_strategy s)
{
    return (unsigned)s < ROUTE_N_STRATEGIES ? strategy_names[s] : "unknown";
}

const char *route_verbosity_name(route_verbosity v)
{
    return (unsigned)v < ROUTE_N_VERBOSITIES ? verbosity_names[v] : "unknown";
}

int route_strategy_parse(const char *name)
{
    for (int i = 0; i < ROUTE_N_STRATEGIES; i++)
        if (strcmp(name, strategy_names[i]) == 0)
            return i;
    return -1;
}

int route_verbosity_parse(const char *name)
{
    for (int i = 0; i < ROUTE_N_VERBOSITIES; i++)
        if (strcmp(name, verbosity_names[i]) == 0)
            return i;
    return -1;
}

/* ---- words ---- */

/* A segment between two of Unicode's word boundaries (UAX #29,
 * libunistring's u8_wordbreaks) is a word when its first code point is a
 * letter, a mark, a digit or a connector ('_'); the others are runs of
 * spaces, punctuation and symbols. */
int route_is_word_char(uint32_t cp)
{
    if (cp > 0x10FFFF)
        return 0;
    return uc_is_general_category(
        cp, uc_general_category_or(uc_general_category_or(UC_LETTER, UC_MARK),
                                   uc_general_category_or(UC_NUMBER, UC_CONNECTOR_PUNCTUATION)));
}

/* Whether the code point at s[i] is an apostrophe (U+0027 or U+2019); its
 * byte length in *n. UAX #29 keeps "how's" one word; for keywords the part
 * before the apostrophe counts as a word of its own, as readers take it. */
static int apostrophe_at(const uint8_t *s, size_t len, size_t i, size_t *n)
{
    if (s[i] == '\'') {
        *n = 1;
        return 1;
    }
    if (len - i >= 3 && s[i] == 0xE2 && s[i + 1] == 0x80 && s[i + 2] == 0x99) {
        *n = 3;
        return 1;
    }
    return 0;
}

static const char *match_word(const route_config *cfg, const uint8_t *w, size_t len)
{
    for (size_t k = 0; k < cfg->n_keywords; k++)
        if (strlen(cfg->keywords[k]) == len && memcmp(cfg->keywords[k], w, len) == 0)
            return cfg->keywords[k];
    return NULL;
}

/* The keyword equal to a word of the segment s[0..len), split at
 * apostrophes, or NULL. */
static const char *match_segment(const route_config *cfg, const uint8_t *s, size_t len)
{
    ucs4_t cp;
    u8_mbtouc(&cp, s, len);
    if (!route_is_word_char(cp))
        return NULL;
    size_t start = 0, n;
    for (size_t i = 0; i < len; i++) {
        if (!apostrophe_at(s, len, i, &n))
            continue;
        const char *kw = match_word(cfg, s + start, i - start);
        if (kw != NULL)
            return kw;
        start = i + n;
        i += n - 1;
    }
    return match_word(cfg, s + start, len - start);
}

/* Bytes of folded text handled without allocating (most messages). */
#define FOLD_STACK_BYTES 2048

/* The first keyword that is a word of the message (in message order), or
 * NULL. The message is case-folded (full Unicode folding: "Почему" is
 * "почему", "STRASSE" is "strasse" is "straße") and split at UAX #29 word
 * boundaries; keywords are stored folded. */
static const char *find_keyword(const route_config *cfg, const char *msg, size_t len)
{
    if (cfg->n_keywords == 0 || len == 0)
        return NULL;
    uint8_t fold_buf[FOLD_STACK_BYTES];
    char brk_buf[FOLD_STACK_BYTES];
    size_t flen = sizeof fold_buf;
    uint8_t *f = u8_casefold((const uint8_t *)msg, len, NULL, NULL, fold_buf, &flen);
    if (f == NULL) /* out of memory: no rule 2, never a crash */
        return NULL;
    char *brk = flen <= sizeof brk_buf ? brk_buf : mem_alloc(flen);
    u8_wordbreaks(f, flen, brk);
    const char *kw = NULL;
    for (size_t start = 0, i = 1; kw == NULL && start < flen; i++) {
        if (i < flen && !brk[i])
            continue;
        kw = match_segment(cfg, f + start, i - start);
        start = i;
    }
    if (brk != brk_buf)
        mem_free(brk);
    if (f != fold_buf)
        free(f); /* libunistring's own allocation */
    return kw;
}

/* A keyword folded as messages are, from mem_alloc; NULL when out of memory. */
static char *fold_keyword(const char *kw, size_t len)
{
    size_t flen = 0;
    uint8_t *f = u8_casefold((const uint8_t *)kw, len, NULL, NULL, NULL, &flen);
    if (f == NULL)
        return NULL;
    char *out = mem_strndup((const char *)f, flen);
    free(f);
    return out;
}

/* ---- config ---- */

static void free_keywords(char **kw, size_t n)
{
    for (size_t i = 0; i < n; i++)
        mem_free(kw[i]);
    mem_free(kw);
}

route_config *route_config_new(void)
{
    route_config *cfg = mem_calloc(1, sizeof *cfg);
    cfg->summarization_min_user_messages = 10;
    cfg->tool_heavy_min_tool_calls = 2;
    cfg->max_message_bytes = 65536;
    cfg->n_keywords = sizeof default_keywords / sizeof default_keywords[0];
    cfg->keywords = mem_calloc(cfg->n_keywords, sizeof *cfg->keywords);
    for (size_t i = 0; i < cfg->n_keywords; i++)
        cfg->keywords[i] = mem_strdup(default_keywords[i]);
    cfg->base_prompt = mem_strdup(default_base_prompt);
    for (int s = 0; s < ROUTE_N_STRATEGIES; s++) {
        route_strategy_conf *sc = &cfg->strategies[s];
        sc->instructions = mem_strdup(default_strategies[s].instructions);
        sc->verbosity = default_strategies[s].verbosity;
        sc->model = mem_strdup("");
        sc->temperature = default_strategies[s].temperature;
        sc->max_tokens = default_strategies[s].max_tokens;
        sc->tools_enabled = 1;
    }
    route_config_prepare(cfg);
    return cfg;
}

void route_config_free(route_config **cfgp)
{
    route_config *cfg = *cfgp;
    if (cfg == NULL)
        return;
    free_keywords(cfg->keywords, cfg->n_keywords);
    mem_free(cfg->base_prompt);
    for (int s = 0; s < ROUTE_N_STRATEGIES; s++) {
        mem_free(cfg->strategies[s].instructions);
        mem_free(cfg->strategies[s].model);
        mem_free(cfg->strategies[s].system_prompt);
    }
    mem_free(cfg);
    *cfgp = NULL;
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* Checks one keyword: a single word, not too long. */
static int check_keyword(const char *kw, size_t len, char *err, size_t errsize)
{
    if (len > ROUTE_KEYWORD_MAX) {
        int cut = 20; /* at a character boundary: the message may reach a JSON log */
        while (cut > 0 && ((unsigned char)kw[cut] & 0xC0) == 0x80)
            cut--;
        snprintf(err, errsize, "keyword '%.*s...' is longer than %d bytes", cut, kw,
                 ROUTE_KEYWORD_MAX);
        return -1;
    }
    /* One segment between word boundaries, a word, with no apostrophe. */
    const uint8_t *s = (const uint8_t *)kw;
    char brk[ROUTE_KEYWORD_MAX];
    u8_wordbreaks(s, len, brk);
    ucs4_t cp;
    u8_mbtouc(&cp, s, len);
    size_t n;
    int single = u8_check(s, len) == NULL && route_is_word_char(cp);
    for (size_t i = 0; single && i < len; i++)
        single = !(i > 0 && brk[i]) && !apostrophe_at(s, len, i, &n);
    if (!single) {
        snprintf(err, errsize,
                 "keyword '%.*s' is not a single word (keywords are separated by commas; "
                 "a word is letters, marks, digits and '_')",
                 (int)len, kw);
        return -1;
    }
    return 0;
}

int route_config_set_keywords(route_config *cfg, const char *csv, char *err, size_t errsize)
{
    /* Items are split on commas and on newlines, so a long list can go on
     * continuation lines without a trailing comma. */
    size_t cap = 1;
    for (const char *p = csv; *p; p++)
        cap += *p == ',' || *p == '\n';
    char **kw = mem_calloc(cap, sizeof *kw);
    size_t n = 0;
    const char *p = csv;
    for (;;) {
        size_t len = strcspn(p, ",\n");
        const char *b = p, *e = p + len;
        while (b < e && is_space(*b))
            b++;
        while (e > b && is_space(e[-1]))
            e--;
        if (e > b) {
            if (check_keyword(b, (size_t)(e - b), err, errsize) != 0) {
                free_keywords(kw, n);
                return -1;
            }
            kw[n] = fold_keyword(b, (size_t)(e - b));
            if (kw[n] == NULL) {
                snprintf(err, errsize, "out of memory folding keyword '%.*s'", (int)(e - b), b);
                free_keywords(kw, n);
                return -1;
            }
            n++;
        }
        if (p[len] == '\0')
            break;
        p += len + 1;
    }
    free_keywords(cfg->keywords, cfg->n_keywords);
    cfg->keywords = kw;
    cfg->n_keywords = n;
    return 0;
}

void route_config_prepare(route_config *cfg)
{
    for (int s = 0; s < ROUTE_N_STRATEGIES; s++) {
        route_strategy_conf *sc = &cfg->strategies[s];
        mem_free(sc->system_prompt);
        if (sc->instructions[0] == '\0')
            sc->system_prompt = mem_strdup(cfg->base_prompt);
        else if (cfg->base_prompt[0] == '\0')
            sc->system_prompt = mem_strdup(sc->instructions);
        else
            sc->system_prompt = mem_asprintf("%s\n\n%s", cfg->base_prompt, sc->instructions);
    }
}

/* ---- the rules ---- */

static void add_reason(route_decision *d, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void add_reason(route_decision *d, const char *fmt, ...)
{
    if (d->n_reasons >= ROUTE_MAX_REASONS)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->reasons[d->n_reasons++], ROUTE_REASON_SIZE, fmt, ap);
    va_end(ap);
}

void route_decide(const route_config *cfg, const route_input *in, route_decision *out)
{
    route_strategy s = ROUTE_FAST_CONCISE;
    out->n_reasons = 0;

    /* Thresholds are >= 0, so a negative count never fires a rule. */
    if (in->user_message_count > cfg->summarization_min_user_messages) {
        s = ROUTE_SUMMARIZATION_AWARE;
        add_reason(out, "%lld user messages so far, more than %lld: a long session",
                   in->user_message_count, cfg->summarization_min_user_messages);
    }
    const char *kw = find_keyword(cfg, in->message, in->message_len);
    if (kw != NULL) {
        s = ROUTE_ANALYTICAL;
        add_reason(out, "the last user message contains the analytical word '%s'", kw);
    }
    if (in->tool_call_count > cfg->tool_heavy_min_tool_calls) {
        s = ROUTE_TOOL_HEAVY;
        add_reason(out, "%lld tool calls so far, more than %lld: a tool-driven session",
                   in->tool_call_count, cfg->tool_heavy_min_tool_calls);
    }
    if (out->n_reasons == 0)
        add_reason(out, "no rule matched: a short, direct answer");

    out->strategy = s;
    out->conf = &cfg->strategies[s];
    out->verbosity = out->conf->verbosity;
}

void route_fixed(const route_config *cfg, route_strategy s, const char *reason, route_decision *out)
{
    out->n_reasons = 0;
    add_reason(out, "%s", reason);
    out->strategy = s;
    out->conf = &cfg->strategies[s];
    out->verbosity = out->conf->verbosity;
}
