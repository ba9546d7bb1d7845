#include "plan.h"

#include "mem.h"

#include <stdio.h>
#include <string.h>

/* "w" + up to 10 digits + a space. */
#define WORD_MAX 12

void plan_init(plan *p, int words, int delay_ms, unsigned seed)
{
    p->words = words;
    p->delay_ms = delay_ms;
    p->message = mem_asprintf("[[words:%d]] [[delay:%d]]", words, delay_ms);
    p->expected = mem_alloc((size_t)words * WORD_MAX + 1);
    size_t len = 0;
    for (int i = 1; i <= words; i++)
        len += (size_t)sprintf(p->expected + len, i == 1 ? "w%d" : " w%d", i);
    p->expected[len] = '\0';
    p->expected_len = len;
    p->rng = seed != 0 ? seed : 1;
}

void plan_free(plan *p)
{
    mem_free(p->message);
    mem_free(p->expected);
    p->message = p->expected = NULL;
}

double plan_start_ms(const plan *p, int i)
{
    return p->sessions > 0 ? p->stagger_ms * i / p->sessions : 0;
}

double plan_think_ms(plan *p)
{
    if (p->think_ms <= 0)
        return 0;
    /* xorshift32: enough to keep sessions out of step, and repeatable. */
    unsigned x = p->rng;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    p->rng = x;
    return p->think_ms * (0.5 + (double)x / 4294967296.0);
}

int plan_token(const plan *p, plan_answer *a, const char *content, size_t len)
{
    if (a->bad || len > p->expected_len - a->pos ||
        memcmp(p->expected + a->pos, content, len) != 0) {
        a->bad = 1;
        return -1;
    }
    a->pos += len;
    return 0;
}

int plan_complete(const plan *p, const plan_answer *a)
{
    return !a->bad && a->pos == p->expected_len;
}
