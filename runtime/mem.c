#include "mem.h"

#include <malloc.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static atomic_size_t used;

static void *checked(void *p, size_t size)
{
    if (p == NULL && size != 0) {
        fprintf(stderr,
                "{\"level\":\"fatal\",\"message\":\"out of memory allocating %zu bytes; "
                "raise the memory limit or lower the configured bounds\"}\n",
                size);
        abort();
    }
    if (p != NULL)
        atomic_fetch_add(&used, malloc_usable_size(p));
    return p;
}

void *mem_alloc(size_t size)
{
    return checked(malloc(size ? size : 1), size ? size : 1);
}

void *mem_calloc(size_t n, size_t size)
{
    if (n == 0 || size == 0)
        n = size = 1;
    return checked(calloc(n, size), n * size);
}

void *mem_realloc(void *p, size_t size)
{
    if (p == NULL)
        return mem_alloc(size);
    if (size == 0)
        size = 1;
    size_t old = malloc_usable_size(p);
    void *q = realloc(p, size);
    if (q == NULL)
        return checked(NULL, size);
    atomic_fetch_sub(&used, old);
    return checked(q, size);
}

char *mem_strdup(const char *s)
{
    return mem_strndup(s, strlen(s));
}

char *mem_strndup(const char *s, size_t n)
{
    size_t len = strnlen(s, n);
    char *d = mem_alloc(len + 1);
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

char *mem_asprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    char *s = mem_alloc((size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return s;
}

void mem_free(void *p)
{
    if (p == NULL)
        return;
    atomic_fetch_sub(&used, malloc_usable_size(p));
    free(p);
}

size_t mem_used(void)
{
    return atomic_load(&used);
}

static atomic_llong last_trim_ms;

static long long monotonic_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void mem_trim_idle(void)
{
    long long now = monotonic_ms(), last = atomic_load(&last_trim_ms);
    if (now - last < MEM_TRIM_EVERY_MS ||
        !atomic_compare_exchange_strong(&last_trim_ms, &last, now))
        return; /* another thread trims, or did a moment ago */
    if (mallinfo2().fordblks >= MEM_TRIM_MIN_FREE)
        malloc_trim(0);
}
