#include "summarizer.h"

#include "mem.h"

#include <json-c/json.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Written where a line is cut between two chunks; room for it is kept free
 * in every item, so the cut chunk still fits the budget. */
#define CUT_MARK       " [continued in the next part]"
#define CUT_RESERVE    (sizeof CUT_MARK + 1)
#define LABEL_SIZE     96
#define TOOL_NAME_SHOW 48

/* One level of chunking: level 0 holds the transcript, level n > 0 the
 * partial summaries of level n - 1. Each has the chunk being filled and the
 * line (item) being written, both within the budget. */
typedef struct level {
    char *chunk;
    size_t clen;
    unsigned cfirst, clast; /* transcript parts covered by the chunk's items */
    unsigned citems;        /* items in the chunk */
    size_t clabel;          /* the first item's "label: " length */
    char *item;
    size_t ilen;
    int open;               /* an item is being written */
    char label[LABEL_SIZE]; /* the open item's label, for its continuation */
    unsigned ifirst, ilast; /* parts covered by the open item */
    unsigned flushed;       /* chunks sent to the model from this level */
} level;

struct summ {
    size_t budget;
    summ_model_fn model;
    void *arg;
    level lv[SUMM_MAX_LEVELS];
    int reply_open; /* level 0's open item is an assistant reply still receiving tokens */
    int err;        /* sticky: the first error */
    char *error;
    char *result; /* the summary, once the last call answered */
    int finished;
    summ_stats st;
};

const char *summ_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
    case SUMM_EEMPTY:
        return "the session has no conversation to summarize";
    case SUMM_ELLM:
        return "a model call failed";
    case SUMM_EDEPTH:
        return "the partial summaries did not get shorter";
    default:
        return "unknown error";
    }
}

/* ---- prompts -------------------------------------------------------------- */

#define TRANSCRIPT_FORMAT                                                                          \
    "The transcript is in the user message. Its lines start with \"User:\" (what the user "        \
    "wrote), \"Assistant:\" (the assistant's reply), \"Tool call NAME:\" (a tool the assistant "   \
    "called, with its arguments) or \"Tool result NAME:\" (what the tool returned); a label "      \
    "marked \"(continued)\" carries on a line cut at the end of the previous part. "

#define FOUR_PARTS                                                                                 \
    "Write the summary in four parts, each on its own line starting with its heading:\n"           \
    "Overview: what the session was about, in two or three sentences.\n"                           \
    "Key topics: the subjects the user raised and the main facts the assistant gave.\n"            \
    "Notable intent shifts or patterns: how the user's goals or questions changed, repeated "      \
    "questions, reliance on tools.\n"                                                              \
    "Insights or conclusions: what was established or decided, and what was left open.\n"          \
    "Use only what is given; do not invent details."

static char *prompt_for(summ_step step, unsigned first, unsigned last, uint32_t words)
{
    switch (step) {
    case SUMM_STEP_WHOLE:
        return mem_strdup("You summarize a conversation between a user and an AI assistant that "
                          "has ended. " TRANSCRIPT_FORMAT FOUR_PARTS);
    case SUMM_STEP_PART:
        return mem_asprintf(
            "You summarize part %u of a long conversation between a user and an AI assistant. "
            "The conversation is too long for one request, so it was cut into parts; your "
            "summary will be combined with the summaries of the other parts. " TRANSCRIPT_FORMAT
            "Write a concise summary of this part, at most %u words: the user's topics and "
            "questions, changes in what the user wanted, the facts and tool results the "
            "assistant relied on, and any conclusions. Use only what is in the transcript.",
            first, words);
    case SUMM_STEP_MERGE:
        return mem_asprintf(
            "You combine the summaries of consecutive parts (parts %u to %u) of a long "
            "conversation between a user and an AI assistant into one concise summary of those "
            "parts, at most %u words. They are in the user message, in order. Keep the user's "
            "topics and questions, changes in what the user wanted, the facts the assistant gave "
            "and any conclusions. Use only what they say.",
            first, last, words);
    case SUMM_STEP_FINAL:
        return mem_asprintf("You summarize a long conversation between a user and an AI "
                            "assistant that has ended. It was summarized in %u parts; the "
                            "summaries of its parts, in order, are in the user message. "
                            "Summarize the whole conversation from them. " FOUR_PARTS,
                            last);
    }
    return mem_strdup("");
}

/* ---- errors --------------------------------------------------------------- */

static int fail(summ *s, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail(summ *s, int err, const char *fmt, ...)
{
    if (s->err != 0)
        return s->err;
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    s->err = err;
    s->error = mem_strdup(buf);
    return err;
}

/* ---- levels and items ----------------------------------------------------- */

static level *level_get(summ *s, int n)
{
    level *l = &s->lv[n];
    if (l->chunk == NULL) {
        /* +1 for the NUL that makes a chunk a C string for the model call. */
        l->chunk = mem_alloc(s->budget + 1);
        l->item = mem_alloc(s->budget + 1);
        if ((unsigned)n > s->st.levels)
            s->st.levels = (unsigned)n;
    }
    return l;
}

/* The largest k <= room that does not split a UTF-8 character of p[0..n). */
static size_t utf8_floor(const char *p, size_t n, size_t room)
{
    if (room >= n)
        return n;
    size_t k = room;
    while (k > 0 && ((unsigned char)p[k] & 0xC0) == 0x80)
        k--;
    return k;
}

static void append(char *dst, size_t *len, const char *src, size_t n)
{
    memcpy(dst + *len, src, n);
    *len += n;
    dst[*len] = '\0';
}

static int push_summary(summ *s, int n, const char *text, unsigned first, unsigned last);

/* Sends level n's chunk to the model. `last` says no more material comes
 * to this level; the answer goes one level up, or is the summary when this
 * is the last call. */
static int chunk_flush(summ *s, int n, int last)
{
    level *l = &s->lv[n];
    if (l->clen == 0 || s->err != 0)
        return s->err;
    /* The top: nothing was sent from here before and nothing is above. */
    int top = last && l->flushed == 0 && (n + 1 >= SUMM_MAX_LEVELS || s->lv[n + 1].chunk == NULL);
    summ_request rq = {.text = l->chunk, .text_len = l->clen};
    /* Partial summaries are kept to a third of the budget (1 token ~ 4
     * bytes) so that each combining level at least halves their number. */
    uint32_t part_tokens = (uint32_t)(s->budget / 12);
    if (part_tokens < 128)
        part_tokens = 128;
    if (part_tokens > 4096)
        part_tokens = 4096;
    if (n == 0) {
        /* Transcript chunks are numbered as they are sent. */
        rq.first_part = rq.last_part = l->flushed + 1;
        rq.step = top ? SUMM_STEP_WHOLE : SUMM_STEP_PART;
    } else {
        rq.first_part = l->cfirst;
        rq.last_part = l->clast;
        rq.step = top ? SUMM_STEP_FINAL : SUMM_STEP_MERGE;
    }
    int final = rq.step == SUMM_STEP_WHOLE || rq.step == SUMM_STEP_FINAL;
    rq.max_tokens = final ? SUMM_FINAL_MAX_TOKENS : part_tokens;
    char *prompt = prompt_for(rq.step, rq.first_part, rq.last_part, part_tokens * 3 / 4);
    rq.system_prompt = prompt;

    char *out = NULL, *err = NULL;
    s->st.calls++;
    int rc = s->model(s->arg, &rq, &out, &err);
    mem_free(prompt);
    if (rc != 0) {
        rc = fail(s, SUMM_ELLM, "%s", err != NULL && err[0] ? err : "the model call failed");
        goto out;
    }
    if (out == NULL)
        out = mem_strdup("");
    l->flushed++;
    unsigned first = rq.first_part, lastp = rq.last_part;
    l->clen = 0;
    l->chunk[0] = '\0';
    l->cfirst = l->clast = l->citems = 0;
    if (final) {
        s->result = out;
        out = NULL;
        rc = 0;
    } else {
        rc = push_summary(s, n + 1, out, first, lastp);
    }
out:
    mem_free(out);
    mem_free(err);
    return rc;
}

/* Starts an item (a line) on level n; `part` is the first transcript part
 * it covers (levels above 0 only). */
static void item_begin(summ *s, int n, const char *label, unsigned part)
{
    level *l = level_get(s, n);
    snprintf(l->label, sizeof l->label, "%s", label);
    l->ilen = 0;
    l->item[0] = '\0';
    append(l->item, &l->ilen, label, strlen(label));
    append(l->item, &l->ilen, ": ", 2);
    l->open = 1;
    l->ifirst = l->ilast = part;
}

/* Adds the open item to the chunk, first sending the chunk if it would
 * not fit. */
static int item_end(summ *s, int n)
{
    level *l = &s->lv[n];
    if (!l->open)
        return s->err;
    l->open = 0;
    if (l->clen + l->ilen + 1 > s->budget) {
        int rc = chunk_flush(s, n, 0);
        if (rc != 0)
            return rc;
    }
    if (l->clen == 0) {
        l->cfirst = l->ifirst;
        l->clabel = strlen(l->label) + 2;
    }
    l->clast = l->ilast;
    l->citems++;
    append(l->chunk, &l->clen, l->item, l->ilen);
    append(l->chunk, &l->clen, "\n", 1);
    s->st.bytes += n == 0 ? l->ilen + 1 : 0;
    return 0;
}

/* The open item does not fit a chunk of its own: it becomes a chunk of its
 * own, marked as cut, and goes on under its label marked "(continued)". */
static int item_spill(summ *s, int n)
{
    level *l = &s->lv[n];
    int rc = chunk_flush(s, n, 0);
    if (rc != 0)
        return rc;
    l->cfirst = l->ifirst;
    l->clast = l->ilast;
    l->citems = 1;
    append(l->chunk, &l->clen, l->item, l->ilen);
    append(l->chunk, &l->clen, CUT_MARK "\n", sizeof CUT_MARK);
    s->st.bytes += n == 0 ? l->ilen + sizeof CUT_MARK : 0;
    rc = chunk_flush(s, n, 0);
    if (rc != 0)
        return rc;
    l->ilen = 0;
    l->item[0] = '\0';
    append(l->item, &l->ilen, l->label, strlen(l->label));
    append(l->item, &l->ilen, " (continued): ", 14);
    return 0;
}

/* Writes text into the open item, spilling as often as needed. */
static int item_put(summ *s, int n, const char *p, size_t len)
{
    level *l = &s->lv[n];
    while (len > 0) {
        if (s->err != 0)
            return s->err;
        size_t room = s->budget - CUT_RESERVE - l->ilen;
        size_t k = utf8_floor(p, len, room);
        append(l->item, &l->ilen, p, k);
        p += k;
        len -= k;
        if (len > 0) {
            int rc = item_spill(s, n);
            if (rc != 0)
                return rc;
        }
    }
    return s->err;
}

/* A partial summary goes up to level n as one item. It is kept to a third
 * of the budget, with a note when shortened, so that the tree converges. */
static int push_summary(summ *s, int n, const char *text, unsigned first, unsigned last)
{
    if (n >= SUMM_MAX_LEVELS)
        return fail(s, SUMM_EDEPTH, "partial summaries still too long after %d combining levels",
                    SUMM_MAX_LEVELS - 1);
    char label[LABEL_SIZE];
    if (first == last)
        snprintf(label, sizeof label, "Summary of part %u", first);
    else
        snprintf(label, sizeof label, "Summary of parts %u to %u", first, last);
    size_t len = strlen(text), keep = s->budget / 3;
    item_begin(s, n, label, first);
    s->lv[n].ilast = last;
    int rc;
    if (len <= keep) {
        rc = item_put(s, n, text, len);
    } else {
        char note[128];
        keep = utf8_floor(text, len, keep);
        snprintf(note, sizeof note, " [this partial summary was %zu bytes, shortened to %zu]", len,
                 keep);
        rc = item_put(s, n, text, keep);
        if (rc == 0)
            rc = item_put(s, n, note, strlen(note));
    }
    if (rc == 0)
        rc = item_end(s, n);
    return rc;
}

/* ---- events --------------------------------------------------------------- */

static const char *json_str(json_object *o, const char *key)
{
    json_object *v;
    if (o == NULL || !json_object_object_get_ex(o, key, &v) ||
        !json_object_is_type(v, json_type_string))
        return NULL;
    return json_object_get_string(v);
}

/* A tool_call ({"id","tool","arguments"}) or tool_result ({"id","tool",
 * "result"}) line: the tool's name in the label, the arguments or result as
 * compact JSON. Content that is not such JSON is written as it is. */
static int add_tool(summ *s, const char *what, const char *field, const char *content, size_t len)
{
    json_object *o = NULL;
    if (len > 0) {
        json_tokener *tok = json_tokener_new();
        o = json_tokener_parse_ex(tok, content, (int)len);
        if (json_tokener_get_error(tok) != json_tokener_success ||
            !json_object_is_type(o, json_type_object)) {
            json_object_put(o);
            o = NULL;
        }
        json_tokener_free(tok);
    }

    char label[LABEL_SIZE];
    const char *name = json_str(o, "tool");
    json_object *val = NULL;
    if (o != NULL)
        json_object_object_get_ex(o, field, &val);
    int rc;
    if (name != NULL && val != NULL) {
        /* A name from the model could be anything: shown bounded, and
         * marked when shortened. */
        size_t nl = strlen(name);
        if (nl > TOOL_NAME_SHOW)
            snprintf(label, sizeof label, "%s %.*s...", what, TOOL_NAME_SHOW, name);
        else
            snprintf(label, sizeof label, "%s %s", what, name);
        const char *js = json_object_is_type(val, json_type_string)
                             ? json_object_get_string(val)
                             : json_object_to_json_string_ext(
                                   val, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE);
        item_begin(s, 0, label, 0);
        rc = item_put(s, 0, js, strlen(js));
    } else {
        item_begin(s, 0, what, 0);
        rc = item_put(s, 0, content, len);
    }
    if (rc == 0)
        rc = item_end(s, 0);
    json_object_put(o);
    return rc;
}

summ *summ_new(size_t budget, summ_model_fn model, void *arg)
{
    summ *s = mem_calloc(1, sizeof *s);
    s->budget = budget < SUMM_MIN_BUDGET ? SUMM_MIN_BUDGET : budget;
    s->model = model;
    s->arg = arg;
    level_get(s, 0);
    return s;
}

int summ_add(summ *s, Convo__V1__EventType type, const char *content, size_t len)
{
    if (s->err != 0)
        return s->err;
    s->st.events++;
    if (content == NULL)
        len = 0;
    /* Tokens of one reply arrive as a run of ai_token events, possibly with
     * system events in between (they are not the conversation); any other
     * event ends the reply. */
    if (type == CONVO__V1__EVENT_TYPE__EVENT_TYPE_AI_TOKEN) {
        if (!s->reply_open) {
            item_begin(s, 0, "Assistant", 0);
            s->reply_open = 1;
            s->st.replies++;
        }
        return item_put(s, 0, content, len);
    }
    if (type != CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE &&
        type != CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_CALL &&
        type != CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_RESULT) {
        s->st.skipped++;
        return 0;
    }
    if (s->reply_open) {
        s->reply_open = 0;
        int rc = item_end(s, 0);
        if (rc != 0)
            return rc;
    }
    switch (type) {
    case CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE: {
        s->st.messages++;
        item_begin(s, 0, "User", 0);
        int rc = item_put(s, 0, content, len);
        return rc != 0 ? rc : item_end(s, 0);
    }
    case CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_CALL:
        s->st.tool_calls++;
        return add_tool(s, "Tool call", "arguments", content, len);
    default:
        s->st.tool_results++;
        return add_tool(s, "Tool result", "result", content, len);
    }
}

int summ_finish(summ *s, char **summary)
{
    *summary = NULL;
    if (s->finished)
        return s->err != 0 ? s->err : fail(s, SUMM_ELLM, "summ_finish called twice");
    s->finished = 1;
    if (s->err != 0)
        return s->err;
    if (s->reply_open) {
        s->reply_open = 0;
        int rc = item_end(s, 0);
        if (rc != 0)
            return rc;
    }
    if (s->st.messages + s->st.replies + s->st.tool_calls + s->st.tool_results == 0)
        return SUMM_EEMPTY;
    s->st.chunks = s->lv[0].flushed + (s->lv[0].clen > 0);
    /* Bottom up: each level's last chunk goes one level up, until the
     * top, whose call writes the summary. */
    for (int n = 0; n < SUMM_MAX_LEVELS && s->lv[n].chunk != NULL && s->result == NULL; n++) {
        int rc = item_end(s, n);
        if (rc != 0)
            return rc;
        level *l = &s->lv[n];
        if (n > 0 && l->citems == 1 && n + 1 < SUMM_MAX_LEVELS && s->lv[n + 1].chunk != NULL) {
            /* A lone partial summary needs no combining: it goes up as it
             * is (partials never exceed a chunk, so it is whole here). */
            char *text = mem_strndup(l->chunk + l->clabel, l->clen - l->clabel - 1);
            unsigned first = l->cfirst, last = l->clast;
            l->clen = 0;
            l->citems = 0;
            rc = push_summary(s, n + 1, text, first, last);
            mem_free(text);
        } else {
            rc = chunk_flush(s, n, 1);
        }
        if (rc != 0)
            return rc;
    }
    if (s->result == NULL)
        return fail(s, SUMM_ELLM, "no summary was produced");
    *summary = s->result;
    s->result = NULL;
    return 0;
}

const char *summ_error(const summ *s)
{
    return s->error != NULL ? s->error : "";
}

const summ_stats *summ_get_stats(const summ *s)
{
    return &s->st;
}

void summ_free(summ **sp)
{
    summ *s = *sp;
    if (s == NULL)
        return;
    for (int n = 0; n < SUMM_MAX_LEVELS; n++) {
        mem_free(s->lv[n].chunk);
        mem_free(s->lv[n].item);
    }
    mem_free(s->error);
    mem_free(s->result);
    mem_free(s);
    *sp = NULL;
}
