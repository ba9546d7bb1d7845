/* plan — what the load generator asks and what it must get back.
 *
 * Every turn sends the same message, "[[words:W]] [[delay:D]]", which the
 * offline model answers with exactly W tokens "w1 w2 ... wW" (its counting
 * rule), D ms apart. A plan_answer follows one answer token by token: each
 * token must continue the expected text exactly where the last one ended,
 * so a lost, repeated or reordered token is caught where it happens.
 *
 * The plan is built once and only read afterwards (one thread). */
#ifndef CONVO_LOADGEN_PLAN_H
#define CONVO_LOADGEN_PLAN_H

#include <stddef.h>

typedef struct plan {
    int sessions;
    int turns;
    int warmup;           /* first turns of a session left out of the figures */
    int words;            /* tokens per answer */
    int delay_ms;         /* the model's pause between tokens */
    double stagger_ms;    /* session i starts at stagger_ms * i / sessions */
    double think_ms;      /* pause before the next message: 0.5x to 1.5x of it */
    double timeout_ms;    /* a session that takes longer fails */
    int history_messages; /* the direct path carries at most this many earlier messages */
    size_t max_frame_bytes;
    char *message;  /* what every turn sends */
    char *expected; /* the whole answer */
    size_t expected_len;
    unsigned rng; /* think-time state */
} plan;

/* Fills p (the strings are owned: plan_free). seed picks the think times. */
void plan_init(plan *p, int words, int delay_ms, unsigned seed);
void plan_free(plan *p);

/* When session i starts, in ms after the run's start. */
double plan_start_ms(const plan *p, int i);
/* A pause before a session's next message, drawn evenly from 0.5x to 1.5x
 * think_ms (so sessions do not fall into step); 0 when think_ms is 0. */
double plan_think_ms(plan *p);

/* One answer being received. */
typedef struct plan_answer {
    size_t pos; /* expected bytes matched so far */
    int bad;    /* a token did not continue the expected text */
} plan_answer;

/* Checks the next token of an answer. Returns 0 when it continues the
 * expected text, -1 (and marks the answer bad for good) otherwise. */
int plan_token(const plan *p, plan_answer *a, const char *content, size_t len);
/* Whether the answer is complete and every token was right. */
int plan_complete(const plan *p, const plan_answer *a);

#endif
