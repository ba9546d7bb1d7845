/* mem — the one allocation wrapper every binary uses.
 *
 * Out of memory aborts the process with a message (a service that cannot
 * allocate cannot serve; the orchestrator restarts it), so callers carry no
 * NULL checks. Live bytes are counted for metrics. Memory from these
 * functions is released with mem_free(), never free(). */
#ifndef CONVO_MEM_H
#define CONVO_MEM_H

#include <stddef.h>

void *mem_alloc(size_t size);
void *mem_calloc(size_t n, size_t size);
void *mem_realloc(void *p, size_t size);
char *mem_strdup(const char *s);
char *mem_strndup(const char *s, size_t n);
/* printf into a new string. */
char *mem_asprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void mem_free(void *p);
/* Bytes currently allocated through this module, process-wide. */
size_t mem_used(void);

/* Memory freed after a burst is kept by the C library for reuse: a
 * store-svc that served 200 resumed sessions at once stayed at 72-118 MB
 * when it needed 25. Call this where a thread goes idle: at most once per
 * MEM_TRIM_EVERY_MS process-wide, and only when the library holds more than
 * MEM_TRIM_MIN_FREE bytes unused, it gives free pages back to the system
 * (malloc_trim). Any thread; takes the allocator's locks briefly. */
#define MEM_TRIM_EVERY_MS 1000
#define MEM_TRIM_MIN_FREE (8u << 20)
void mem_trim_idle(void);

#endif
