#include "kb.h"

#include "mem.h"

#include <ctype.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KB_MAX_FILE    (64 * 1024)
#define KB_MAX_FILES   256
#define KB_MAX_PASSAGE 2000
#define KB_WORD_MAX    32
#define KB_K1          1.2
#define KB_B           0.75

typedef struct term {
    char word[KB_WORD_MAX];
    int df; /* passages containing it */
} term;

typedef struct posting {
    int term, tf;
} posting;

typedef struct passage {
    char *source, *section, *text;
    posting *post;
    size_t npost;
    int len; /* words */
} passage;

struct kb {
    passage *p;
    size_t np, pcap;
    term *terms;
    size_t nterms, tcap;
    double avg_len;
};

static const char *const STOP[] = {
    "a",    "an",   "the",  "and",  "or",    "of",   "to",   "in",    "on",   "for",  "is",
    "are",  "be",   "by",   "it",   "its",   "as",   "at",   "with",  "that", "this", "what",
    "how",  "why",  "do",   "does", "can",   "from", "into", "about", "me",   "tell", "explain",
    "look", "up",   "you",  "your", "i",     "we",   "they", "their", "not",  "but",  "so",
    "if",   "then", "than", "when", "which", "who",  "was",  "were",  "has",  "have", NULL};

static int stopword(const char *w)
{
    for (size_t i = 0; STOP[i] != NULL; i++)
        if (strcmp(w, STOP[i]) == 0)
            return 1;
    return 0;
}

/* Next word of s at *pos into w (lowercase, a crude plural fold), or 0. */
static int next_word(const char *s, size_t *pos, char *w)
{
    for (;;) {
        size_t i = *pos;
        while (s[i] && !isalnum((unsigned char)s[i]))
            i++;
        if (!s[i])
            return 0;
        size_t n = 0;
        while (s[i] && (isalnum((unsigned char)s[i]) || s[i] == '_')) {
            if (n < KB_WORD_MAX - 1)
                w[n++] = (char)tolower((unsigned char)s[i]);
            i++;
        }
        w[n] = '\0';
        *pos = i;
        /* "websockets" finds "websocket", "indexes" finds "index". */
        if (n > 4 && w[n - 1] == 's' && w[n - 2] != 's') {
            w[--n] = '\0';
            if (n > 4 && w[n - 1] == 'e' && w[n - 2] == 'x')
                w[--n] = '\0';
        }
        if (n >= 2 && !stopword(w))
            return 1;
    }
}

static int term_find(const kb *k, const char *w)
{
    for (size_t i = 0; i < k->nterms; i++)
        if (strcmp(k->terms[i].word, w) == 0)
            return (int)i;
    return -1;
}

static void add_passage(kb *k, const char *source, const char *section, const char *text,
                        size_t len)
{
    while (len > 0 && isspace((unsigned char)text[len - 1]))
        len--;
    while (len > 0 && isspace((unsigned char)*text)) {
        text++;
        len--;
    }
    if (len == 0)
        return;
    if (len > KB_MAX_PASSAGE)
        len = KB_MAX_PASSAGE;
    if (k->np == k->pcap) {
        k->pcap = k->pcap ? k->pcap * 2 : 32;
        k->p = mem_realloc(k->p, k->pcap * sizeof *k->p);
    }
    passage *p = &k->p[k->np++];
    memset(p, 0, sizeof *p);
    p->source = mem_strdup(source);
    p->section = mem_strdup(section);
    p->text = mem_strndup(text, len);
    /* The heading counts as words of the passage too. */
    char *all = mem_asprintf("%s %s", section, p->text);
    char w[KB_WORD_MAX];
    size_t pos = 0, cap = 0;
    while (next_word(all, &pos, w)) {
        p->len++;
        int t = term_find(k, w);
        if (t < 0) {
            if (k->nterms == k->tcap) {
                k->tcap = k->tcap ? k->tcap * 2 : 256;
                k->terms = mem_realloc(k->terms, k->tcap * sizeof *k->terms);
            }
            t = (int)k->nterms++;
            memcpy(k->terms[t].word, w, sizeof w);
            k->terms[t].df = 0;
        }
        size_t j = 0;
        while (j < p->npost && p->post[j].term != t)
            j++;
        if (j == p->npost) {
            if (p->npost == cap) {
                cap = cap ? cap * 2 : 32;
                p->post = mem_realloc(p->post, cap * sizeof *p->post);
            }
            p->post[p->npost++] = (posting){t, 0};
            k->terms[t].df++;
        }
        p->post[j].tf++;
    }
    mem_free(all);
}

/* Cuts a file into passages at "#" headings. */
static void add_file(kb *k, const char *name, const char *text)
{
    char section[160];
    snprintf(section, sizeof section, "%s", name);
    const char *start = text;
    const char *line = text;
    while (*line) {
        const char *eol = strchr(line, '\n');
        size_t n = eol ? (size_t)(eol - line) : strlen(line);
        if (line[0] == '#') {
            add_passage(k, name, section, start, (size_t)(line - start));
            const char *h = line;
            while (*h == '#' || *h == ' ')
                h++;
            snprintf(section, sizeof section, "%.*s", (int)(n - (size_t)(h - line)), h);
            start = line + n;
        }
        line += n + (eol ? 1 : 0);
    }
    add_passage(k, name, section, start, (size_t)(line - start));
}

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int kb_load(const char *dir, kb **out, char *err, size_t errsize)
{
    int rc = -1;
    kb *k = mem_calloc(1, sizeof *k);
    char *names[KB_MAX_FILES];
    size_t nnames = 0;
    DIR *d = opendir(dir);
    if (d == NULL) {
        snprintf(err, errsize, "cannot open the knowledge folder %s", dir);
        goto out;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL && nnames < KB_MAX_FILES) {
        size_t n = strlen(e->d_name);
        if ((n > 3 && strcmp(e->d_name + n - 3, ".md") == 0) ||
            (n > 4 && strcmp(e->d_name + n - 4, ".txt") == 0))
            names[nnames++] = mem_strdup(e->d_name);
    }
    closedir(d);
    /* Sorted, so passage order (and ties) never depends on the file system. */
    qsort(names, nnames, sizeof *names, by_name);
    for (size_t i = 0; i < nnames; i++) {
        char *path = mem_asprintf("%s/%s", dir, names[i]);
        FILE *f = fopen(path, "rb");
        mem_free(path);
        if (f == NULL)
            continue;
        char *buf = mem_alloc(KB_MAX_FILE + 1);
        size_t n = fread(buf, 1, KB_MAX_FILE, f);
        fclose(f);
        buf[n] = '\0';
        add_file(k, names[i], buf);
        mem_free(buf);
    }
    if (k->np == 0) {
        snprintf(err, errsize, "no .md or .txt passages in %s", dir);
        goto out;
    }
    double total = 0;
    for (size_t i = 0; i < k->np; i++)
        total += k->p[i].len;
    k->avg_len = total / (double)k->np;
    *out = k;
    k = NULL;
    rc = 0;
out:
    for (size_t i = 0; i < nnames; i++)
        mem_free(names[i]);
    kb_destroy(&k);
    return rc;
}

void kb_destroy(kb **kp)
{
    if (kp == NULL || *kp == NULL)
        return;
    kb *k = *kp;
    for (size_t i = 0; i < k->np; i++) {
        mem_free(k->p[i].source);
        mem_free(k->p[i].section);
        mem_free(k->p[i].text);
        mem_free(k->p[i].post);
    }
    mem_free(k->p);
    mem_free(k->terms);
    mem_free(k);
    *kp = NULL;
}

size_t kb_passages(const kb *k)
{
    return k->np;
}

size_t kb_search(const kb *k, const char *query, kb_hit *hits, size_t max)
{
    int qt[64];
    size_t nq = 0, pos = 0, nhits = 0;
    char w[KB_WORD_MAX];
    while (nq < 64 && next_word(query, &pos, w)) {
        int t = term_find(k, w);
        int dup = 0;
        for (size_t i = 0; i < nq; i++)
            dup |= qt[i] == t;
        if (t >= 0 && !dup)
            qt[nq++] = t;
    }
    for (size_t i = 0; i < k->np && nq > 0; i++) {
        const passage *p = &k->p[i];
        double s = 0;
        for (size_t q = 0; q < nq; q++) {
            for (size_t j = 0; j < p->npost; j++) {
                if (p->post[j].term != qt[q])
                    continue;
                double df = k->terms[qt[q]].df, n = (double)k->np, tf = p->post[j].tf;
                double idf = log(1.0 + (n - df + 0.5) / (df + 0.5));
                s +=
                    idf * tf * (KB_K1 + 1) / (tf + KB_K1 * (1 - KB_B + KB_B * p->len / k->avg_len));
            }
        }
        if (s <= 0)
            continue;
        /* Insertion into the top `max`, best first; ties keep load order. */
        size_t at = nhits < max ? nhits : max;
        while (at > 0 && hits[at - 1].score < s)
            at--;
        if (at >= max)
            continue;
        size_t last = nhits < max ? nhits : max - 1;
        memmove(&hits[at + 1], &hits[at], (last - at) * sizeof *hits);
        hits[at] = (kb_hit){p->source, p->section, p->text, s};
        if (nhits < max)
            nhits++;
    }
    return nhits;
}
