/* kb — the knowledge base behind fetch_internal_knowledge: the Markdown
 * and text files of one folder, cut into passages at their headings and
 * ranked against a query with BM25 (k1 = 1.2, b = 0.75) over words.
 * Loaded once at start; read-only afterwards, so any thread may search. */
#ifndef CONVO_KB_H
#define CONVO_KB_H

#include <stddef.h>

typedef struct kb kb;

/* One ranked passage; the strings belong to the kb. */
typedef struct kb_hit {
    const char *source;  /* the file name, e.g. "grpc.md" */
    const char *section; /* the heading above the passage */
    const char *text;    /* the passage */
    double score;        /* BM25, > 0 */
} kb_hit;

/* Loads every *.md and *.txt file of `dir` (at most 64 KiB each, 256 files).
 * Returns 0, or -1 with a reason in `err`. */
int kb_load(const char *dir, kb **out, char *err, size_t errsize);
void kb_destroy(kb **k);
size_t kb_passages(const kb *k);
/* The best passages for `query`, best first, at most `max`; only passages
 * sharing a word with the query score. Returns how many were written. */
size_t kb_search(const kb *k, const char *query, kb_hit *hits, size_t max);

#endif
