#include "route.h"

#include "mem.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* The built-in defaults. They must equal router-svc/router.conf, which
 * writes them out for operators to tune; tests/router/test_rconf.c checks
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

/* ---- UTF-8 and words ---- */

#define CP_INVALID 0x110000u /* beyond Unicode: what a malformed byte decodes to */

/* Decodes the code point at s[*i] and moves *i past it. A malformed
 * sequence yields CP_INVALID and moves one byte, so scanning never stalls
 * and never reads past `len`. */
static uint32_t utf8_next(const unsigned char *s, size_t len, size_t *i)
{
    unsigned c = s[*i];
    size_t n;
    uint32_t cp, min;
    if (c < 0x80) {
        (*i)++;
        return c;
    }
    if (c >= 0xC2 && c <= 0xDF) {
        n = 1, cp = c & 0x1F, min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 2, cp = c & 0x0F, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 3, cp = c & 0x07, min = 0x10000;
    } else {
        (*i)++;
        return CP_INVALID;
    }
    if (len - *i <= n) {
        (*i)++;
        return CP_INVALID;
    }
    for (size_t k = 1; k <= n; k++) {
        unsigned b = s[*i + k];
        if ((b & 0xC0) != 0x80) {
            (*i)++;
            return CP_INVALID;
        }
        cp = cp << 6 | (b & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
        (*i)++;
        return CP_INVALID;
    }
    *i += n + 1;
    return cp;
}

/* Non-ASCII code points that separate words: spaces, punctuation and
 * symbols, by block where a whole block is such (General Punctuation, CJK
 * Symbols and Punctuation, emoji...) and one by one in scripts whose
 * punctuation sits among letters. Not the full Unicode property tables, on
 * purpose: a table this size covers the punctuation real messages put next
 * to a keyword, and everything else non-ASCII counts as a letter, which can
 * only make a match less likely, never a false one. Sorted; no overlaps. */
static const struct {
    uint32_t lo, hi;
} separators[] = {
    {0x0080, 0x00BF},   /* C1 controls, NBSP, Latin-1 punctuation (¡ ¿ « » ·) */
    {0x00D7, 0x00D7},   /* × */
    {0x00F7, 0x00F7},   /* ÷ */
    {0x037E, 0x037E},   /* Greek question mark */
    {0x0387, 0x0387},   /* Greek ano teleia */
    {0x055A, 0x055F},   /* Armenian punctuation */
    {0x0589, 0x058A},   /* Armenian full stop, hyphen */
    {0x05BE, 0x05BE},   /* Hebrew maqaf */
    {0x05C0, 0x05C0},   /* Hebrew paseq */
    {0x05C3, 0x05C3},   /* Hebrew sof pasuq */
    {0x05C6, 0x05C6},   /* Hebrew nun hafukha */
    {0x05F3, 0x05F4},   /* Hebrew geresh, gershayim */
    {0x0606, 0x060F},   /* Arabic signs, comma, date separator */
    {0x061B, 0x061F},   /* Arabic semicolon ... question mark */
    {0x066A, 0x066D},   /* Arabic percent ... five-pointed star */
    {0x06D4, 0x06D4},   /* Arabic full stop */
    {0x0964, 0x0965},   /* Devanagari danda, double danda */
    {0x0970, 0x0970},   /* Devanagari abbreviation sign */
    {0x0E3F, 0x0E3F},   /* Thai baht */
    {0x0E4F, 0x0E4F},   /* Thai fongman */
    {0x0E5A, 0x0E5B},   /* Thai angkhankhu, khomut */
    {0x0F04, 0x0F12},   /* Tibetan marks */
    {0x104A, 0x104F},   /* Myanmar punctuation */
    {0x10FB, 0x10FB},   /* Georgian paragraph separator */
    {0x1360, 0x1368},   /* Ethiopic punctuation */
    {0x1400, 0x1400},   /* Canadian syllabics hyphen */
    {0x166E, 0x166E},   /* Canadian syllabics full stop */
    {0x1680, 0x1680},   /* Ogham space */
    {0x169B, 0x169C},   /* Ogham feather marks */
    {0x16EB, 0x16ED},   /* Runic punctuation */
    {0x17D4, 0x17D6},   /* Khmer punctuation */
    {0x17D8, 0x17DA},   /* Khmer punctuation */
    {0x1800, 0x180A},   /* Mongolian punctuation */
    {0x180E, 0x180E},   /* Mongolian vowel separator */
    {0x2000, 0x206F},   /* General Punctuation: spaces, dashes, quotes, zero-width */
    {0x20A0, 0x20CF},   /* currency symbols */
    {0x2190, 0x2BFF},   /* arrows, math, technical, box drawing, shapes, dingbats */
    {0x2CF9, 0x2CFF},   /* Coptic punctuation */
    {0x2E00, 0x2E7F},   /* Supplemental Punctuation */
    {0x3000, 0x303F},   /* CJK Symbols and Punctuation (ideographic space, 、。「」) */
    {0x30A0, 0x30A0},   /* Katakana-Hiragana double hyphen */
    {0x30FB, 0x30FB},   /* Katakana middle dot */
    {0xFD3E, 0xFD3F},   /* ornate parentheses */
    {0xFE00, 0xFE1F},   /* variation selectors, vertical forms */
    {0xFE30, 0xFE6F},   /* CJK compatibility and small form variants */
    {0xFEFF, 0xFEFF},   /* zero-width no-break space (BOM) */
    {0xFF00, 0xFF0F},   /* fullwidth ！＂＃ ... ／ */
    {0xFF1A, 0xFF20},   /* fullwidth ：；＜＝＞？＠ */
    {0xFF3B, 0xFF40},   /* fullwidth ［＼］＾＿｀ */
    {0xFF5B, 0xFF65},   /* fullwidth ｛｜｝～ and halfwidth CJK punctuation */
    {0xFFE0, 0xFFEE},   /* fullwidth and halfwidth symbols */
    {0xFFF0, 0xFFFF},   /* specials (U+FFFD) */
    {0x1F000, 0x1FBFF}, /* game symbols, enclosed supplements, emoji, pictographs */
    {0xE0000, 0xE007F}, /* tags */
    {0xE0100, 0xE01EF}, /* variation selectors supplement */
};

int route_is_word_char(uint32_t cp)
{
    if (cp < 0x80)
        return (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || (cp >= '0' && cp <= '9') ||
               cp == '_';
    if (cp > 0x10FFFF)
        return 0;
    size_t lo = 0, hi = sizeof separators / sizeof separators[0];
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < separators[mid].lo)
            hi = mid;
        else if (cp > separators[mid].hi)
            lo = mid + 1;
        else
            return 0;
    }
    return 1;
}

static unsigned char ascii_lower(unsigned char c)
{
    return c >= 'A' && c <= 'Z' ? (unsigned char)(c - 'A' + 'a') : c;
}

static int word_equals(const unsigned char *w, size_t wlen, const char *kw)
{
    size_t klen = strlen(kw);
    if (klen != wlen)
        return 0;
    for (size_t i = 0; i < wlen; i++)
        if (ascii_lower(w[i]) != ascii_lower((unsigned char)kw[i]))
            return 0;
    return 1;
}

/* The first keyword that is a word of the message (in message order), or
 * NULL. One pass over the message; each word is compared with each keyword
 * only when their lengths are equal. */
static const char *find_keyword(const route_config *cfg, const char *msg, size_t len)
{
    const unsigned char *s = (const unsigned char *)msg;
    size_t i = 0;
    while (i < len) {
        size_t start = i;
        if (!route_is_word_char(utf8_next(s, len, &i)))
            continue;
        size_t end = i;
        while (i < len) {
            size_t at = i;
            if (!route_is_word_char(utf8_next(s, len, &i))) {
                i = at; /* the separator is skipped by the outer loop */
                break;
            }
            end = i;
        }
        for (size_t k = 0; k < cfg->n_keywords; k++)
            if (word_equals(s + start, end - start, cfg->keywords[k]))
                return cfg->keywords[k];
    }
    return NULL;
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
    const unsigned char *s = (const unsigned char *)kw;
    for (size_t i = 0; i < len;) {
        if (!route_is_word_char(utf8_next(s, len, &i))) {
            snprintf(err, errsize,
                     "keyword '%.*s' is not a single word (keywords are separated by commas; "
                     "a word is letters, digits and '_')",
                     (int)len, kw);
            return -1;
        }
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
            kw[n++] = mem_strndup(b, (size_t)(e - b));
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
