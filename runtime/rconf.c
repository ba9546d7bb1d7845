#include "rconf.h"

#include "mem.h"
#include "rpc.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* How a key's value is read and where it is stored. */
typedef enum key_kind {
    K_COUNT,       /* long long */
    K_BYTES,       /* size_t */
    K_TOKENS,      /* uint32_t */
    K_TEMPERATURE, /* double */
    K_TEXT,        /* char *, may span lines */
    K_KEYWORDS,    /* the keyword list, may span lines */
    K_MODEL,       /* char *, one word or empty */
    K_VERBOSITY,   /* route_verbosity */
    K_BOOL,        /* int */
} key_kind;

typedef struct key_def {
    const char *name;
    key_kind kind;
    size_t offset; /* in route_config or route_strategy_conf, by section */
    double min, max;
} key_def;

#define MAX_KEYS 8
/* Bytes of a value quoted in an error message, before "...". */
#define QUOTE_MAX  40
#define QUOTE_SIZE (QUOTE_MAX + 4)

static const key_def rules_keys[] = {
    {"summarization_min_user_messages", K_COUNT,
     offsetof(route_config, summarization_min_user_messages), 0, 1e6},
    {"analytical_keywords", K_KEYWORDS, 0, 0, 0},
    {"tool_heavy_min_tool_calls", K_COUNT, offsetof(route_config, tool_heavy_min_tool_calls), 0,
     1e6},
    {"max_message_bytes", K_BYTES, offsetof(route_config, max_message_bytes), 1, 16777216},
};

static const key_def prompt_keys[] = {
    {"base", K_TEXT, offsetof(route_config, base_prompt), 0, 0},
};

static const key_def strategy_keys[] = {
    {"instructions", K_TEXT, offsetof(route_strategy_conf, instructions), 0, 0},
    {"verbosity", K_VERBOSITY, offsetof(route_strategy_conf, verbosity), 0, 0},
    {"model", K_MODEL, offsetof(route_strategy_conf, model), 0, 0},
    {"temperature", K_TEMPERATURE, offsetof(route_strategy_conf, temperature), 0, 2},
    {"max_tokens", K_TOKENS, offsetof(route_strategy_conf, max_tokens), 0, 1e6},
    {"tools", K_BOOL, offsetof(route_strategy_conf, tools_enabled), 0, 0},
};

_Static_assert(sizeof strategy_keys / sizeof strategy_keys[0] <= MAX_KEYS, "raise MAX_KEYS");
_Static_assert(sizeof rules_keys / sizeof rules_keys[0] <= MAX_KEYS, "raise MAX_KEYS");

/* Section slots: [rules], [prompt], then one [strategy.NAME] per strategy. */
enum { SEC_RULES, SEC_PROMPT, SEC_STRATEGY0, N_SECTIONS = SEC_STRATEGY0 + ROUTE_N_STRATEGIES };

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

typedef struct parser {
    const char *name;
    route_config *cfg;
    int sec; /* the current section slot; -1 before the first header */
    char sec_name[QUOTE_SIZE];
    const key_def *key; /* the key whose value is being read; NULL when none */
    int key_line;
    char *value; /* the value read so far (owned) */
    size_t value_len, value_cap;
    int blank_run;                  /* blank lines since the last line of the value */
    int seen[N_SECTIONS][MAX_KEYS]; /* line where each key was set, 0 if not */
    char *err;
} parser;

static int fail(parser *p, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail(parser *p, int line, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    p->err = mem_asprintf("%s:%d: %s", p->name, line, msg);
    return -1;
}

/* s[0..len) shortened for an error message: cut at a character boundary,
 * so the message (which ends up in a JSON log line) stays valid UTF-8. */
static const char *quote(char out[QUOTE_SIZE], const char *s, size_t len)
{
    size_t n = len;
    if (n > QUOTE_MAX) {
        n = QUOTE_MAX;
        while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
            n--;
    }
    memcpy(out, s, n);
    strcpy(out + n, n < len ? "..." : "");
    return out;
}

static void value_append(parser *p, const char *s, size_t n)
{
    if (p->value_len + n + 1 > p->value_cap) {
        p->value_cap = (p->value_len + n + 1) * 2;
        p->value = mem_realloc(p->value, p->value_cap);
    }
    memcpy(p->value + p->value_len, s, n);
    p->value_len += n;
    p->value[p->value_len] = '\0';
}

static void section_keys(int sec, const key_def **keys, size_t *n, void **base, route_config *cfg)
{
    if (sec == SEC_RULES) {
        *keys = rules_keys, *n = N_OF(rules_keys), *base = cfg;
    } else if (sec == SEC_PROMPT) {
        *keys = prompt_keys, *n = N_OF(prompt_keys), *base = cfg;
    } else {
        *keys = strategy_keys, *n = N_OF(strategy_keys);
        *base = &cfg->strategies[sec - SEC_STRATEGY0];
    }
}

static int find_section(const char *name)
{
    if (strcmp(name, "rules") == 0)
        return SEC_RULES;
    if (strcmp(name, "prompt") == 0)
        return SEC_PROMPT;
    if (strncmp(name, "strategy.", 9) == 0) {
        int s = route_strategy_parse(name + 9);
        if (s >= 0)
            return SEC_STRATEGY0 + s;
    }
    return -1;
}

/* A whole number made of digits only; -1 if `v` is not one, -2 if it
 * overflows. */
static int parse_whole(const char *v, long long *out)
{
    if (v[0] == '\0' || strspn(v, "0123456789") != strlen(v))
        return -1;
    errno = 0;
    long long n = strtoll(v, NULL, 10);
    if (errno == ERANGE)
        return -2;
    *out = n;
    return 0;
}

static int parse_bool(const char *v, int *out)
{
    static const char *const yes[] = {"true", "yes", "on", "1"};
    static const char *const no[] = {"false", "no", "off", "0"};
    for (size_t i = 0; i < N_OF(yes); i++) {
        if (strcasecmp(v, yes[i]) == 0) {
            *out = 1;
            return 0;
        }
        if (strcasecmp(v, no[i]) == 0) {
            *out = 0;
            return 0;
        }
    }
    return -1;
}

/* Stores the value read for p->key; called once the value is complete (at
 * the next key, section or the end of the file). */
static int commit_value(parser *p)
{
    const key_def *k = p->key;
    const char *v = p->value != NULL ? p->value : "";
    char shown[QUOTE_SIZE];
    quote(shown, v, strlen(v));
    const char *sec = p->sec_name;
    int line = p->key_line;
    const key_def *keys;
    size_t n;
    void *base;
    section_keys(p->sec, &keys, &n, &base, p->cfg);
    char *field = (char *)base + k->offset;
    p->key = NULL;

    switch (k->kind) {
    case K_COUNT:
    case K_BYTES:
    case K_TOKENS: {
        long long num = 0;
        int rc = parse_whole(v, &num);
        if (rc == -1)
            return fail(p, line, "bad number '%s' for %s in [%s]: a whole number is expected",
                        shown, k->name, sec);
        if (rc == -2 || num < k->min || num > k->max)
            return fail(p, line, "%s = %s is out of range in [%s]: %.15g to %.15g", k->name, shown,
                        sec, k->min, k->max);
        if (k->kind == K_COUNT)
            *(long long *)field = num;
        else if (k->kind == K_BYTES)
            *(size_t *)field = (size_t)num;
        else
            *(uint32_t *)field = (uint32_t)num;
        return 0;
    }
    case K_TEMPERATURE: {
        /* Only plain decimals: strtod alone would also take "inf", "nan"
         * and hex floats. */
        char *end = NULL;
        double d = 0;
        if (v[0] != '\0' && strspn(v, "0123456789.+-eE") == strlen(v))
            d = strtod(v, &end);
        if (end == NULL || end == v || *end != '\0' || !isfinite(d))
            return fail(p, line, "bad number '%s' for %s in [%s]: a decimal like 0.7 is expected",
                        shown, k->name, sec);
        if (d < k->min || d > k->max)
            return fail(p, line, "%s = %s is out of range in [%s]: %.15g to %.15g", k->name, shown,
                        sec, k->min, k->max);
        *(double *)field = d;
        return 0;
    }
    case K_TEXT:
        mem_free(*(char **)field);
        *(char **)field = mem_strdup(v);
        return 0;
    case K_MODEL:
        if (strpbrk(v, " \t\"'") != NULL)
            return fail(p, line,
                        "model '%s' in [%s] has a space or a quote; values are taken "
                        "literally, and 'model =' with nothing after it means llm-svc's default",
                        shown, sec);
        mem_free(*(char **)field);
        *(char **)field = mem_strdup(v);
        return 0;
    case K_KEYWORDS: {
        char why[256];
        if (route_config_set_keywords(p->cfg, v, why, sizeof why) != 0)
            return fail(p, line, "%s in [%s]: %s", k->name, sec, why);
        return 0;
    }
    case K_VERBOSITY: {
        int verb = route_verbosity_parse(v);
        if (verb < 0)
            return fail(p, line, "unknown verbosity '%s' in [%s]: concise, balanced or detailed",
                        shown, sec);
        *(route_verbosity *)field = (route_verbosity)verb;
        return 0;
    }
    case K_BOOL:
        if (parse_bool(v, (int *)field) != 0)
            return fail(p, line, "bad value '%s' for %s in [%s]: true or false is expected", shown,
                        k->name, sec);
        return 0;
    }
    return fail(p, line, "internal error: key kind %d", (int)k->kind);
}

static int is_blank(char c)
{
    return c == ' ' || c == '\t';
}

/* A "[name]" line; `s` has no surrounding blanks. */
static int parse_header(parser *p, int line, const char *s, size_t len)
{
    char shown[QUOTE_SIZE];
    if (len < 2 || s[len - 1] != ']')
        return fail(p, line, "bad section header '%s': expected [name]", quote(shown, s, len));
    const char *b = s + 1, *e = s + len - 1;
    while (b < e && is_blank(*b))
        b++;
    while (e > b && is_blank(e[-1]))
        e--;
    /* Real names are short, so a name cut by quote() is unknown too. */
    quote(p->sec_name, b, (size_t)(e - b));
    p->sec = find_section(p->sec_name);
    if (p->sec < 0)
        return fail(p, line,
                    "unknown section [%s]: sections are [rules], [prompt] and "
                    "[strategy.NAME] for NAME fast_concise, analytical, summarization_aware "
                    "or tool_heavy",
                    p->sec_name);
    return 0;
}

/* A "key = value" line; `s` has no surrounding blanks. */
static int parse_key(parser *p, int line, const char *s, size_t len)
{
    char shown[QUOTE_SIZE];
    const char *eq = memchr(s, '=', len);
    if (eq == NULL)
        return fail(p, line, "missing '=' in '%s': expected key = value", quote(shown, s, len));
    const char *ke = eq;
    while (ke > s && is_blank(ke[-1]))
        ke--;
    if (ke == s)
        return fail(p, line, "missing key before '='");
    size_t klen = (size_t)(ke - s);
    quote(shown, s, klen);
    if (p->sec < 0)
        return fail(p, line,
                    "key '%s' is outside any section: put it under [rules], [prompt] "
                    "or [strategy.NAME]",
                    shown);

    const key_def *keys;
    size_t n;
    void *base;
    section_keys(p->sec, &keys, &n, &base, p->cfg);
    size_t i = 0;
    while (i < n && !(strlen(keys[i].name) == klen && memcmp(keys[i].name, s, klen) == 0))
        i++;
    if (i == n)
        return fail(p, line, "unknown key '%s' in [%s]", shown, p->sec_name);
    if (p->seen[p->sec][i] != 0)
        return fail(p, line, "'%s' is set twice in [%s] (first at line %d)", keys[i].name,
                    p->sec_name, p->seen[p->sec][i]);
    p->seen[p->sec][i] = line;

    const char *vb = eq + 1, *ve = s + len;
    while (vb < ve && is_blank(*vb))
        vb++;
    p->key = &keys[i];
    p->key_line = line;
    p->value_len = 0;
    p->blank_run = 0;
    value_append(p, vb, (size_t)(ve - vb));
    return 0;
}

/* An indented line: the next line of the value being read. */
static int parse_continuation(parser *p, int line, const char *s, size_t len)
{
    if (p->key == NULL)
        return fail(p, line,
                    "indented line with no 'key =' above it to continue (keys start "
                    "at the beginning of a line)");
    if (p->key->kind != K_TEXT && p->key->kind != K_KEYWORDS)
        return fail(p, line,
                    "indented line continues '%s' (line %d), which takes a one-line value; "
                    "keys start at the beginning of a line",
                    p->key->name, p->key_line);
    /* A value that starts on the line below its key has no leading newline;
     * blank lines inside the value are kept, as paragraph breaks. */
    if (p->value_len > 0)
        for (int i = 0; i <= p->blank_run; i++)
            value_append(p, "\n", 1);
    p->blank_run = 0;
    value_append(p, s, len);
    return 0;
}

static int parse_line(parser *p, int line, const char *s, size_t len)
{
    if (memchr(s, '\0', len) != NULL)
        return fail(p, line, "NUL byte in the line: is this a text file?");
    if (!rpc_utf8_valid(s, len))
        return fail(p, line, "the line is not valid UTF-8");

    size_t indent = 0;
    while (indent < len && is_blank(s[indent]))
        indent++;
    while (len > indent && (is_blank(s[len - 1]) || s[len - 1] == '\r'))
        len--;
    if (len == indent) {
        p->blank_run++;
        return 0;
    }
    const char *t = s + indent;
    size_t tlen = len - indent;
    if (t[0] == '#' || t[0] == ';')
        return 0; /* comments do not end a value, nor count as its blank lines */
    if (indent > 0)
        return parse_continuation(p, line, t, tlen);

    if (p->key != NULL && commit_value(p) != 0)
        return -1;
    if (t[0] == '[')
        return parse_header(p, line, t, tlen);
    return parse_key(p, line, t, tlen);
}

int rconf_parse(const char *name, const char *text, size_t len, route_config **out, char **err)
{
    parser *p = mem_calloc(1, sizeof *p);
    p->name = name;
    p->cfg = route_config_new();
    p->sec = -1;
    int rc = -1;

    /* Editors on some systems start UTF-8 files with a byte-order mark. */
    if (len >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0)
        text += 3, len -= 3;

    int line = 0;
    for (size_t at = 0; at < len;) {
        const char *nl = memchr(text + at, '\n', len - at);
        size_t end = nl != NULL ? (size_t)(nl - text) : len;
        if (parse_line(p, ++line, text + at, end - at) != 0)
            goto out;
        at = end + 1;
    }
    if (p->key != NULL && commit_value(p) != 0)
        goto out;
    route_config_prepare(p->cfg);
    rc = 0;

out:
    if (rc == 0) {
        *out = p->cfg;
        *err = NULL;
    } else {
        route_config_free(&p->cfg);
        *out = NULL;
        *err = p->err;
    }
    mem_free(p->value);
    mem_free(p);
    return rc;
}

int rconf_load(const char *path, route_config **out, char **err)
{
    FILE *f = NULL;
    char *buf = NULL;
    int rc = -1;
    *out = NULL;

    f = fopen(path, "rb");
    if (f == NULL) {
        *err = mem_asprintf("%s: cannot read: %s", path, strerror(errno));
        goto out;
    }
    buf = mem_alloc(RCONF_MAX_FILE_BYTES + 1);
    size_t n = fread(buf, 1, RCONF_MAX_FILE_BYTES + 1, f);
    if (ferror(f)) {
        *err = mem_asprintf("%s: cannot read: %s", path, strerror(errno));
        goto out;
    }
    if (n > RCONF_MAX_FILE_BYTES) {
        *err = mem_asprintf("%s: larger than %d bytes; is it the right file?", path,
                            RCONF_MAX_FILE_BYTES);
        goto out;
    }
    rc = rconf_parse(path, buf, n, out, err);

out:
    if (f != NULL)
        fclose(f);
    mem_free(buf);
    return rc;
}
