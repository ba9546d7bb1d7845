#include "answer.h"

#include "mem.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* A growable string for composing replies; capped (1 MiB holds the
 * largest [[words:N]] answer, N = 100,000). A reply cut at the cap ends with
 * finish_reason "length", as a real model's does at its token limit. */
#define SB_CAP (1024 * 1024)
typedef struct sb {
    char *s;
    size_t len, cap;
    int truncated;
} sb;

static void sb_addf(sb *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_addf(sb *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *piece = NULL;
    if (vasprintf(&piece, fmt, ap) < 0)
        piece = NULL;
    va_end(ap);
    if (piece == NULL)
        return;
    size_t n = strlen(piece);
    if (b->len + n + 1 > SB_CAP) {
        n = b->len + 1 < SB_CAP ? SB_CAP - b->len - 1 : 0;
        b->truncated = 1;
    }
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->s = mem_realloc(b->s, b->cap);
    }
    memcpy(b->s + b->len, piece, n);
    b->len += n;
    b->s[b->len] = '\0';
    free(piece); /* from vasprintf, not mem_* */
}

static const char *msg_str(json_object *m, const char *key)
{
    json_object *v = NULL;
    if (!json_object_object_get_ex(m, key, &v) || !json_object_is_type(v, json_type_string))
        return "";
    return json_object_get_string(v);
}

answer_fault answer_fault_parse(const char *name)
{
    static const struct {
        const char *name;
        answer_fault f;
    } t[] = {{"429", FAULT_429},
             {"500", FAULT_500},
             {"401", FAULT_401},
             {"404", FAULT_404},
             {"slow", FAULT_SLOW},
             {"drop", FAULT_DROP},
             {"malformed", FAULT_MALFORMED}};
    for (size_t i = 0; name != NULL && i < sizeof t / sizeof t[0]; i++)
        if (strcmp(name, t[i].name) == 0)
            return t[i].f;
    return FAULT_NONE;
}

size_t answer_tokens(const char *text, size_t *starts, size_t max)
{
    size_t n = 0, i = 0, len = strlen(text);
    while (i < len && n < max) {
        if (starts != NULL)
            starts[n] = i;
        n++;
        while (i < len && text[i] == ' ')
            i++;
        while (i < len && text[i] != ' ')
            i++;
    }
    return n;
}

static const char *const STOPWORDS[] = {
    "the",       "and",     "that",         "this",  "with",          "what",
    "from",      "have",    "your",         "about", "would",         "could",
    "should",    "there",   "their",        "which", "when",          "where",
    "will",      "into",    "does",         "some",  "they",          "them",
    "then",      "than",    "also",         "just",  "like",          "more",
    "been",      "were",    "here",         "tell",  "explain",       "please",
    "summarize", "summary", "conversation", "user",  "assistant",     "message",
    "messages",  "look",    "lookup",       "these", "those",         "want",
    "know",      "how",     "why",          "can",   "you",           "are",
    "for",       "not",     "but",          "its",   "it's",          "i'm",
    "any",       "offline", "model",        "said",  "deterministic", "stand-in",
    NULL};

static int is_stopword(const char *w)
{
    for (size_t i = 0; STOPWORDS[i] != NULL; i++)
        if (strcmp(w, STOPWORDS[i]) == 0)
            return 1;
    return 0;
}

/* Word counts over a text, in first-appearance order. */
#define MAX_WORDS 512
typedef struct wordfreq {
    char word[32];
    int count, first;
} wordfreq;

static size_t count_words(const char *text, wordfreq *w, size_t n, int *order)
{
    char cur[32];
    size_t cl = 0;
    for (const char *p = text;; p++) {
        if (*p != '\0' && (isalnum((unsigned char)*p) || *p == '-' || *p == '_')) {
            if (cl < sizeof cur - 1)
                cur[cl++] = (char)tolower((unsigned char)*p);
            continue;
        }
        if (cl >= 4) {
            cur[cl] = '\0';
            if (!is_stopword(cur)) {
                size_t i = 0;
                while (i < n && strcmp(w[i].word, cur) != 0)
                    i++;
                if (i < n) {
                    w[i].count++;
                } else if (n < MAX_WORDS) {
                    memcpy(w[n].word, cur, cl + 1);
                    w[n].count = 1;
                    w[n].first = (*order)++;
                    n++;
                }
            }
        }
        cl = 0;
        if (*p == '\0')
            break;
    }
    return n;
}

static int by_count(const void *a, const void *b)
{
    const wordfreq *x = a, *y = b;
    if (x->count != y->count)
        return y->count - x->count;
    return x->first - y->first;
}

/* The most frequent content word of a text, or "" (into out[32]). */
static void top_word(const char *text, char *out)
{
    wordfreq *w = mem_calloc(MAX_WORDS, sizeof *w);
    int order = 0;
    size_t n = count_words(text, w, 0, &order);
    qsort(w, n, sizeof *w, by_count);
    snprintf(out, 32, "%s", n ? w[0].word : "");
    mem_free(w);
}

/* A structured summary of every non-system message of the request. */
static char *summarize(json_object *msgs, size_t nmsgs)
{
    sb b = {0};
    wordfreq *w = mem_calloc(MAX_WORDS, sizeof *w);
    size_t nw = 0, users = 0, assistants = 0, tools = 0, questions = 0;
    int order = 0;
    char shifts[8][32];
    size_t nshift = 0;
    for (size_t i = 0; i < nmsgs; i++) {
        json_object *m = json_object_array_get_idx(msgs, i);
        const char *role = msg_str(m, "role"), *content = msg_str(m, "content");
        if (strcmp(role, "system") == 0)
            continue;
        users += strcmp(role, "user") == 0;
        assistants += strcmp(role, "assistant") == 0;
        tools += strcmp(role, "tool") == 0;
        for (const char *q = content; (q = strchr(q, '?')) != NULL; q++)
            questions++;
        nw = count_words(content, w, nw, &order);
        if (strcmp(role, "user") == 0 && nshift < 8) {
            char t[32];
            top_word(content, t);
            if (t[0] != '\0' && (nshift == 0 || strcmp(shifts[nshift - 1], t) != 0))
                memcpy(shifts[nshift++], t, sizeof t);
        }
    }
    qsort(w, nw, sizeof *w, by_count);
    sb_addf(&b, "Overview: a conversation of %zu user and %zu assistant messages", users,
            assistants);
    if (tools)
        sb_addf(&b, " with %zu tool results", tools);
    sb_addf(&b, ".\nKey topics:");
    for (size_t i = 0; i < nw && i < 5; i++)
        sb_addf(&b, "%s %s", i ? "," : "", w[i].word);
    if (nw == 0)
        sb_addf(&b, " none stood out");
    sb_addf(&b, ".\nNotable intent shifts or patterns: ");
    if (nshift > 1) {
        sb_addf(&b, "the user started with %s", shifts[0]);
        for (size_t i = 1; i < nshift; i++)
            sb_addf(&b, ", then moved to %s", shifts[i]);
    } else {
        sb_addf(&b, "the user stayed on %s", nshift ? shifts[0] : "one subject");
    }
    sb_addf(&b, "; %zu question%s asked.\nInsights or conclusions: the main interest was %s",
            questions, questions == 1 ? " was" : "s were", nw ? w[0].word : "not clear");
    if (nw > 1)
        sb_addf(&b, ", together with %s", w[1].word);
    sb_addf(&b, ".");
    mem_free(w);
    return b.s;
}

/* Everything after the trigger phrase, trimmed of punctuation, as the
 * topic; NULL when the message does not ask a question of that kind. */
static char *knowledge_topic(const char *u)
{
    static const char *const triggers[] = {"what is ", "what are ",      "look up ", "lookup ",
                                           "explain ", "tell me about ", NULL};
    char *low = mem_strdup(u);
    for (char *p = low; *p; p++)
        *p = (char)tolower((unsigned char)*p);
    char *topic = NULL;
    for (size_t i = 0; triggers[i] != NULL && topic == NULL; i++) {
        char *at = strstr(low, triggers[i]);
        if (at == NULL)
            continue;
        const char *t = u + (at - low) + strlen(triggers[i]);
        size_t n = strlen(t);
        while (n > 0 && strchr("?.! \n", t[n - 1]))
            n--;
        if (n > 0)
            topic = mem_strndup(t, n);
    }
    mem_free(low);
    return topic;
}

static void add_call(answer *a, int round, const char *name, const char *args)
{
    if (a->ncalls == ANSWER_MAX_CALLS)
        return;
    answer_call *c = &a->calls[a->ncalls];
    c->id = mem_asprintf("call_r%d_%zu", round, a->ncalls);
    c->name = mem_strdup(name);
    c->args = mem_strdup(args);
    a->ncalls++;
}

/* [[toolR:NAME ARGS]] directives for this round; R is a number (1 when
 * left out) or "*" (every round). */
static void directive_calls(const char *u, int round, answer *a)
{
    for (const char *p = u; (p = strstr(p, "[[tool")) != NULL;) {
        p += 6;
        int r = 1, every = 0;
        if (*p == '*') {
            every = 1;
            p++;
        } else if (isdigit((unsigned char)*p)) {
            r = atoi(p);
            while (isdigit((unsigned char)*p))
                p++;
        }
        if (*p != ':')
            continue;
        p++;
        const char *sp = strchr(p, ' '), *end = strstr(p, "]]");
        if (sp == NULL || end == NULL || sp > end)
            continue;
        if (every || r == round) {
            char *name = mem_strndup(p, (size_t)(sp - p));
            char *args = mem_strndup(sp + 1, (size_t)(end - sp - 1));
            add_call(a, round, name, args);
            mem_free(name);
            mem_free(args);
        }
        p = end;
    }
}

/* The user's text without [[...]] directives. */
static char *strip_directives(const char *u)
{
    sb b = {0};
    sb_addf(&b, "%s", "");
    for (const char *p = u; *p;) {
        const char *d = strstr(p, "[[");
        const char *e = d ? strstr(d, "]]") : NULL;
        if (d == NULL || e == NULL) {
            sb_addf(&b, "%s", p);
            break;
        }
        sb_addf(&b, "%.*s", (int)(d - p), p);
        p = e + 2;
    }
    /* trim */
    size_t n = b.len;
    while (n > 0 && isspace((unsigned char)b.s[n - 1]))
        b.s[--n] = '\0';
    size_t s = 0;
    while (b.s[s] && isspace((unsigned char)b.s[s]))
        s++;
    memmove(b.s, b.s + s, n - s + 1);
    return b.s;
}

static void answer_from_tools(json_object *msgs, size_t from, size_t nmsgs, sb *b)
{
    sb_addf(b, "Here is what the tools returned.");
    for (size_t i = from; i < nmsgs; i++) {
        json_object *m = json_object_array_get_idx(msgs, i);
        if (strcmp(msg_str(m, "role"), "tool") != 0)
            continue;
        const char *name = msg_str(m, "name");
        json_object *r = json_tokener_parse(msg_str(m, "content")), *v = NULL;
        if (r != NULL && json_object_object_get_ex(r, "error", &v)) {
            sb_addf(b, " The tool %s failed: %s.", name[0] ? name : "call",
                    json_object_get_string(v));
        } else if (r != NULL && json_object_object_get_ex(r, "results", &v) &&
                   json_object_is_type(v, json_type_array)) {
            json_object *topic = NULL;
            json_object_object_get_ex(r, "topic", &topic);
            if (json_object_array_length(v) == 0)
                sb_addf(b, " The knowledge base has nothing on %s.",
                        topic ? json_object_get_string(topic) : "that");
            for (size_t k = 0; k < json_object_array_length(v) && k < 2; k++) {
                json_object *res = json_object_array_get_idx(v, k), *src = NULL, *txt = NULL;
                json_object_object_get_ex(res, "source", &src);
                json_object_object_get_ex(res, "text", &txt);
                const char *t = txt ? json_object_get_string(txt) : "";
                sb_addf(b, " From %s: %.240s%s", src ? json_object_get_string(src) : "?", t,
                        strlen(t) > 240 ? "..." : "");
            }
        } else {
            sb_addf(b, " %s returned %.300s", name[0] ? name : "A tool",
                    r ? json_object_to_json_string(r) : msg_str(m, "content"));
        }
        json_object_put(r);
    }
}

/* Honours max_tokens (or max_completion_tokens) as a real model does: the
 * reply stops there with finish_reason "length". */
static void cap_tokens(json_object *req, answer *a)
{
    json_object *v = NULL;
    if (!json_object_object_get_ex(req, "max_completion_tokens", &v) &&
        !json_object_object_get_ex(req, "max_tokens", &v))
        return;
    int64_t max = json_object_get_int64(v);
    if (max <= 0 || a->text == NULL || answer_tokens(a->text, NULL, (size_t)-1) <= (size_t)max)
        return;
    size_t *starts = mem_alloc(((size_t)max + 1) * sizeof *starts);
    answer_tokens(a->text, starts, (size_t)max + 1);
    a->text[starts[max]] = '\0';
    a->finish_reason = "length";
    mem_free(starts);
}

int answer_make(json_object *req, answer *a, char *err, size_t errsize)
{
    memset(a, 0, sizeof *a);
    a->delay_ms = -1;
    a->finish_reason = "stop";
    json_object *msgs = NULL, *tools = NULL;
    if (!json_object_is_type(req, json_type_object) ||
        !json_object_object_get_ex(req, "messages", &msgs) ||
        !json_object_is_type(msgs, json_type_array) || json_object_array_length(msgs) == 0) {
        snprintf(err, errsize, "'messages' must be a non-empty array");
        return -1;
    }
    int tools_offered = json_object_object_get_ex(req, "tools", &tools) &&
                        json_object_is_type(tools, json_type_array) &&
                        json_object_array_length(tools) > 0;
    size_t n = json_object_array_length(msgs), last_user = n;
    const char *system = "";
    for (size_t i = 0; i < n; i++) {
        json_object *m = json_object_array_get_idx(msgs, i);
        if (!json_object_is_type(m, json_type_object)) {
            snprintf(err, errsize, "messages[%zu] is not an object", i);
            return -1;
        }
        const char *role = msg_str(m, "role"), *content = msg_str(m, "content");
        a->prompt_tokens += (unsigned)answer_tokens(content, NULL, (size_t)-1);
        if (strcmp(role, "user") == 0)
            last_user = i;
        if (strcmp(role, "system") == 0)
            system = content;
    }
    const char *u =
        last_user < n ? msg_str(json_object_array_get_idx(msgs, last_user), "content") : "";
    /* Rounds already made for this user message: assistant tool calls. */
    int round = 1;
    size_t ntool_msgs = 0;
    for (size_t i = last_user < n ? last_user + 1 : n; i < n; i++) {
        json_object *m = json_object_array_get_idx(msgs, i);
        if (strcmp(msg_str(m, "role"), "assistant") == 0 &&
            json_object_object_get_ex(m, "tool_calls", NULL))
            round++;
        ntool_msgs += strcmp(msg_str(m, "role"), "tool") == 0;
    }
    const char *d = strstr(u, "[[delay:");
    if (d != NULL)
        a->delay_ms = atoi(d + 8);
    d = strstr(u, "[[fault:");
    if (d != NULL) {
        char kind[16] = "";
        sscanf(d + 8, "%15[a-z0-9]", kind);
        a->fault = answer_fault_parse(kind);
        const char *star = strchr(d, '*'), *end = strstr(d, "]]");
        if (star != NULL && end != NULL && star < end)
            a->fault_times = atoi(star + 1);
        a->fault_key = mem_strdup(u);
    }

    if (tools_offered) {
        directive_calls(u, round, a);
        if (a->ncalls == 0 && round == 1) {
            char *topic = knowledge_topic(u);
            if (topic != NULL) {
                /* "explain X and Y": two independent questions, asked in
                 * parallel. */
                char *and = strstr(topic, " and ");
                char *parts[2] = {topic, NULL};
                if (and != NULL) {
                    *and = '\0';
                    parts[1] = and+5;
                }
                for (int i = 0; i < 2 && parts[i] != NULL; i++) {
                    json_object *args = json_object_new_object();
                    json_object_object_add(args, "topic", json_object_new_string(parts[i]));
                    add_call(a, round, "fetch_internal_knowledge",
                             json_object_to_json_string_ext(args, JSON_C_TO_STRING_PLAIN));
                    json_object_put(args);
                }
                mem_free(topic);
            }
        }
    }
    if (a->ncalls > 0) {
        a->finish_reason = "tool_calls";
        return 0;
    }

    sb b = {0};
    const char *words = strstr(u, "[[words:");
    if (words != NULL) {
        /* Exactly N tokens, for tests and benchmarks that count them. */
        int nwords = atoi(words + 8);
        for (int i = 0; i < nwords && i < 100000; i++)
            sb_addf(&b, "%sw%d", i ? " " : "", i + 1);
        if (b.s == NULL)
            sb_addf(&b, "%s", "");
    } else if (ntool_msgs > 0) {
        answer_from_tools(msgs, last_user + 1, n, &b);
    } else if (strstr(u, "summar") != NULL || strstr(u, "Summar") != NULL ||
               strstr(system, "summar") != NULL || strstr(system, "Summar") != NULL) {
        b.s = summarize(msgs, n);
    } else {
        char *said = strip_directives(u);
        sb_addf(&b, "This is the offline model, a deterministic stand-in. You said: %s", said);
        mem_free(said);
    }
    a->text = b.s;
    if (b.truncated)
        a->finish_reason = "length";
    cap_tokens(req, a);
    return 0;
}

void answer_clear(answer *a)
{
    mem_free(a->text);
    for (size_t i = 0; i < a->ncalls; i++) {
        mem_free(a->calls[i].id);
        mem_free(a->calls[i].name);
        mem_free(a->calls[i].args);
    }
    mem_free(a->fault_key);
    memset(a, 0, sizeof *a);
}
