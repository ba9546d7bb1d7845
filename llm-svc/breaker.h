/* breaker — a circuit breaker for one upstream.
 *
 * Closed: requests pass; `failures` failed requests in a row open it (a
 * success in between starts the count again). Open: requests are refused
 * for a cool-down, then the circuit is half-open: exactly one request
 * passes as a probe and the others are still refused. The probe's success
 * closes the circuit, its failure opens it again, a probe that proves
 * nothing (cancelled) lets the next request probe.
 *
 * The cool-down grows with the failed probes, as Envoy's outlier ejection
 * does: a blip costs about `cooldown_ms`, a dead upstream is probed ever
 * more rarely. Each is drawn by backoff.h with decorrelated jitter: never
 * below `cooldown_ms` (an open circuit always sheds load that long), at
 * most three times the one before (about double on average) and at most
 * `cooldown_max_ms`; closing starts it again from `cooldown_ms`. The jitter
 * keeps replicas that opened together from probing together; a cap equal
 * to the base gives a fixed cool-down.
 *
 * Outcomes are reported with the ticket admission gave, so a request
 * admitted before the circuit opened cannot close or re-open it later.
 * Thread-safe (one mutex; nothing is called under it). Times are
 * rpc_now_ms() values passed in, so tests drive the clock. */
#ifndef CONVO_BREAKER_H
#define CONVO_BREAKER_H

#include <stdint.h>

typedef enum breaker_state {
    BREAKER_CLOSED,
    BREAKER_OPEN,
    BREAKER_HALF_OPEN,
} breaker_state;

typedef enum breaker_outcome {
    BREAKER_SUCCESS, /* the upstream answered */
    BREAKER_FAILURE, /* unreachable, overloaded or broken */
    BREAKER_NEUTRAL, /* proves nothing either way (cancelled by us) */
    BREAKER_OUTCOMES
} breaker_outcome;

/* What admission gave one request; report its outcome with it. */
typedef struct breaker_ticket {
    unsigned epoch; /* the circuit's transitions so far, when admitted */
    int probe;      /* the half-open circuit's one probe */
} breaker_ticket;

typedef struct breaker breaker;

/* A closed breaker opening after `failures` (>= 1; less is taken as 1)
 * failures in a row, cooling down as above (cooldown_ms >= 1 and
 * cooldown_max_ms >= cooldown_ms, each raised to that when not). */
breaker *breaker_create(int failures, int64_t cooldown_ms, int64_t cooldown_max_ms);
/* Frees it and clears *b; NULL is fine. */
void breaker_destroy(breaker **b);

/* Whether a request may go at `now`: 1 with *ticket filled, or 0 (refused:
 * open, or half-open with its probe out). *moved is set when this call
 * changed the state (open -> half-open), else left alone. */
int breaker_admit(breaker *b, int64_t now, breaker_ticket *ticket, int *moved);
/* An admitted request ended with `o`. Returns 1 when this changed the
 * state (closed -> open, half-open -> closed or open), else 0. */
int breaker_report(breaker *b, const breaker_ticket *ticket, breaker_outcome o, int64_t now);

breaker_state breaker_get(breaker *b);
/* Milliseconds until an open circuit lets a probe through; 0 when not open
 * or already due. */
int64_t breaker_wait_ms(breaker *b, int64_t now);
const char *breaker_state_name(breaker_state s);

#endif
