/* service — convo.v1.Summary: the Summarize and GetSummary handlers and
 * the machinery behind them.
 *
 * Handlers never block: Summarize files the session in a map of sessions in
 * progress (a second request for the same session joins the first instead
 * of starting another model call) and queues a job for the worker pool;
 * wait=false is answered PENDING at once, wait=true when the job ends, or
 * PENDING just before the caller's deadline. GetSummary is one asynchronous
 * GetSession. A ticker thread answers waiters whose deadline nears and
 * re-checks sessions another replica is summarizing; the sweep (sweep.h)
 * finds the sessions nobody asked for.
 *
 * Across replicas the store's lease (ClaimSummary) is what keeps a session
 * from being summarized twice; this process's worker id is unique per run
 * (host, pid and random bits). */
#ifndef SUMMARY_SERVICE_H
#define SUMMARY_SERVICE_H

#include "cli.h"
#include "conf.h"
#include "metrics.h"
#include "otlp.h"
#include "srv.h"
#include "summarizer.h"

#define SERVICE_OPTS(X, S)                                                                         \
    X(S, store, STR, "store", "STORE_ADDR", "127.0.0.1:50053",                                     \
      "store-svc: HOST:PORT, replicas IP:PORT,IP:PORT,... or dns:///NAME:PORT")                    \
    X(S, llm, STR, "llm", "LLM_ADDR", "127.0.0.1:50052",                                           \
      "llm-svc: HOST:PORT, replicas IP:PORT,IP:PORT,... or dns:///NAME:PORT")                      \
    X(S, workers, INT_IN(1, 256), "workers", "SUMMARY_WORKERS", "2",                               \
      "summaries made at once (worker threads; each blocks on its session's calls)")               \
    X(S, queue_size, INT_IN(1, 1000000), "queue-size", "SUMMARY_QUEUE_SIZE", "64",                 \
      "sessions waiting for a worker; beyond it Summarize(wait) fails RESOURCE_EXHAUSTED and "     \
      "Summarize(no wait) is left to the sweep")                                                   \
    X(S, sweep_interval_ms, INT, "sweep-interval-ms", "SUMMARY_SWEEP_INTERVAL_MS", "30000",        \
      "how often ended sessions without a summary are looked for (0: never)")                      \
    X(S, sweep_delay_ms, INT, "sweep-delay-ms", "SUMMARY_SWEEP_DELAY_MS", "10000",                 \
      "the sweep leaves a session alone this long after it ended (the gateway's Summarize "        \
      "goes first)")                                                                               \
    X(S, sweep_batch, INT_IN(1, 10000), "sweep-batch", "SUMMARY_SWEEP_BATCH", "100",               \
      "pending sessions listed per sweep (at most --workers are taken at once)")                   \
    X(S, lease_seconds, INT_IN(5, 86400), "lease-seconds", "SUMMARY_LEASE_SECONDS", "300",         \
      "how long a claim on a session lasts; a summary not done by then is given up (saved "        \
      "pending) so that another replica may take over")                                            \
    X(S, max_attempts, INT_IN(1, 1000), "max-attempts", "SUMMARY_MAX_ATTEMPTS", "5",               \
      "attempts per session; the last failure marks the summary failed with its reason")           \
    X(S, retry_backoff_ms, INT, "retry-backoff-ms", "SUMMARY_RETRY_BACKOFF_MS", "30000",           \
      "the wait before a failed session's second attempt; doubled for each further one")           \
    X(S, retry_backoff_max_ms, INT_IN(0, 86400000), "retry-backoff-max-ms",                        \
      "SUMMARY_RETRY_BACKOFF_MAX_MS", "1800000", "the longest wait between two attempts")          \
    X(S, context_budget_bytes, INT_IN(SUMM_MIN_BUDGET, 64LL << 20), "context-budget-bytes",        \
      "SUMMARY_CONTEXT_BUDGET_BYTES", "65536",                                                     \
      "the most conversation text sent in one model call; a longer conversation is summarized "    \
      "in chunks whose summaries are then combined")                                               \
    X(S, model, STR, "model", "SUMMARY_MODEL", "",                                                 \
      "the model asked for summaries; \"\" is llm-svc's default (OPENAI_MODEL)")                   \
    X(S, store_timeout_ms, INT_IN(100, 3600000), "store-timeout-ms", "STORE_TIMEOUT_MS", "10000",  \
      "deadline of one store-svc call")                                                            \
    X(S, llm_timeout_ms, INT_IN(100, 3600000), "llm-timeout-ms", "LLM_TIMEOUT_MS", "120000",       \
      "deadline of one model call (Complete)")                                                     \
    X(S, page_events, INT_IN(1, 1000000), "page-events", "SUMMARY_PAGE_EVENTS", "1000",            \
      "events read per ListEvents call")
CONF_DECLARE(service_opts, SERVICE_OPTS)

typedef struct service service;

/* Checks what the options' ranges cannot say (--sweep-interval-ms is 0 or
 * at least 100); returns 0, or -1 with a message in err. */
int service_check_opts(const service_opts *o, char *err, size_t errsize);

/* A service using client `c` for its peers (channels made here, spread
 * over every address of a peer with `round_robin`). Starts the worker
 * pool; nothing is served until service_register + srv_start. `o`'s
 * strings must outlive the service. Counts its work in m (NULL: nothing)
 * and records a span per summary job into exp (NULL: ids only): a child
 * of the Summarize call that filed the session, a new trace for one the
 * sweep found. NULL when a peer address is not valid (cli_channel_create),
 * with the reason in err. */
service *service_create(const service_opts *o, cli *c, int round_robin, metrics *m, otlp *exp,
                        char *err, size_t errsize);
/* Registers Summarize and GetSummary on `s` (before srv_start). Returns 0
 * or an RPC_E* error. */
int service_register(service *sv, srv *s);
/* Starts the ticker and the sweep (after srv_start). */
void service_start(service *sv);
/* Stops the sweep, cancels the jobs running (their leases are released,
 * pending), lets the queued ones end at once, and answers what still waits
 * UNAVAILABLE. Call after srv_run returned, before srv_destroy. */
void service_stop(service *sv);
/* Frees a stopped service; clears *sv. */
void service_destroy(service **sv);

#endif
