/* endpoints — the model endpoints llm-svc may ask, in order: the primary
 * (--openai-base-url, --openai-model, --openai-api-key) and then each
 * --fallback entry, every one behind its own circuit breaker (breaker.h).
 *
 * A request goes to the first endpoint whose circuit admits it. A request
 * that fails for the endpoint's sake (no connection, 5xx, 429 or 408 after
 * the retries, a timeout, a dropped connection) counts against its circuit
 * and may go on to the next endpoint (turn.c decides: only while nothing of
 * it reached the caller); any other answer counts for it. Each circuit is
 * published as a gRPC health service "upstream/NAME" (SERVING while closed,
 * NOT_SERVING while open or half-open) and every transition is logged.
 *
 * Built at start-up (a bad entry is refused there, with the reason), then
 * read-only but for the breakers: any thread may use it. */
#ifndef CONVO_ENDPOINTS_H
#define CONVO_ENDPOINTS_H

#include "breaker.h"
#include "conf.h"
#include "health.h"
#include "metrics.h"
#include "upstream.h"

#include <stddef.h>

#define ENDPOINTS_OPTS(X, S)                                                                       \
    X(S, base_url, STR, "openai-base-url", "OPENAI_BASE_URL", "https://api.openai.com/v1",         \
      "the primary OpenAI-compatible endpoint (the offline model: http://127.0.0.1:8089/v1)")      \
    X(S, api_key, SECRET, "openai-api-key", "OPENAI_API_KEY", "",                                  \
      "sent to the primary as a Bearer token; \"\" sends none")                                    \
    X(S, model, STR, "openai-model", "OPENAI_MODEL", "gpt-4o-mini",                                \
      "the model when the request's params name none")                                             \
    X(S, fallbacks, LIST, "fallback", "LLM_FALLBACKS", "",                                         \
      "an endpoint tried after the ones before it failed, in order: "                              \
      "url=BASE_URL[,model=MODEL][,key-env=VAR|key-file=PATH][,name=NAME]; repeat the flag, or "   \
      "put ';' between entries. No model: the request's. The key is read from the environment "    \
      "variable or the file, never given here")                                                    \
    X(S, breaker_failures, INT_IN(1, CONF_NO_MAX), "breaker-failures", "LLM_BREAKER_FAILURES",     \
      "5",                                                                                         \
      "failed requests in a row that open an endpoint's circuit: it is skipped until a probe "     \
      "succeeds")                                                                                  \
    X(S, breaker_cooldown_ms, INT_IN(1, CONF_NO_MAX), "breaker-cooldown-ms",                       \
      "LLM_BREAKER_COOLDOWN_MS", "1000",                                                           \
      "the shortest an open circuit skips its endpoint before one request probes it; each wait "   \
      "is drawn between this and 3 times the one before (about doubling), back to this once a "    \
      "probe succeeds. Short, so that a blip of a second or two costs about that rather than a "   \
      "fixed long wait; the growth spares an endpoint that stays down")                            \
    X(S, breaker_cooldown_max_ms, INT_IN(1, CONF_NO_MAX), "breaker-cooldown-max-ms",               \
      "LLM_BREAKER_COOLDOWN_MAX_MS", "30000",                                                      \
      "the cap on that growing wait: a dead endpoint is still probed this often. At or below "     \
      "--breaker-cooldown-ms every wait is --breaker-cooldown-ms (a fixed cool-down)")
CONF_DECLARE(endpoints_opts, ENDPOINTS_OPTS)

/* One endpoint; its strings belong to the list. */
typedef struct endpoint {
    const char *name;    /* "primary", or the entry's name (default fallbackN) */
    const char *url;     /* the base URL + "/chat/completions" */
    const char *api_key; /* "" sends none */
} endpoint;

typedef struct endpoints endpoints;

/* Builds the list from the options. Counts each endpoint's requests, skips
 * and circuit state in m (NULL: nothing). Returns 0, or -1 with a reason
 * naming the bad entry and field in `err` (never a key). */
int endpoints_create(const endpoints_opts *o, metrics *m, endpoints **out, char *err,
                     size_t errsize);
/* Frees the list (after the last request ended); clears *e. */
void endpoints_destroy(endpoints **e);

size_t endpoints_count(const endpoints *e);
const endpoint *endpoints_get(const endpoints *e, size_t i);
/* --openai-model. */
const char *endpoints_default_model(const endpoints *e);
/* The model endpoint `i` is asked for when the request wants `wanted`:
 * the entry's own model, else `wanted`. */
const char *endpoints_model(const endpoints *e, size_t i, const char *wanted);

/* Publishes every circuit's state in `h` (the server's health, before
 * srv_start), and from then on each change; NULL stops it (before
 * srv_destroy). */
void endpoints_publish(endpoints *e, health *h);

/* Whether endpoint `i`'s circuit lets a request go now: 1 with *ticket
 * filled (report the request's end with it), else 0. */
int endpoints_admit(endpoints *e, size_t i, breaker_ticket *ticket);
/* An admitted request ended. Returns 1 when it failed for the endpoint's
 * sake (a fallback may take over), else 0. */
int endpoints_report(endpoints *e, size_t i, const breaker_ticket *ticket,
                     const upstream_done_info *info);
/* An admitted request that never started. */
void endpoints_release(endpoints *e, size_t i, const breaker_ticket *ticket);
/* Why no endpoint admitted a request, for the caller. */
void endpoints_refusal(endpoints *e, char *out, size_t outsize);

#endif
