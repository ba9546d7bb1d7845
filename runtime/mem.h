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

#endif
