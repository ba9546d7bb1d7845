#include "sweep.h"

#include "backoff.h"
#include "bcall.h"
#include "log.h"
#include "mem.h"

#include "convo_methods.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

struct sweep {
    sweep_cfg cfg;
    cli_channel *store;
    sweep_hooks hooks;
    bcall_scope *sc;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stop;
    int llm_skips; /* rounds skipped in a row, to log once */
};

static int64_t wall_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t sweep_due_us(const sweep_cfg *cfg, int64_t end_time_us, int32_t attempts)
{
    /* No jitter: every replica computes the same time from the store's
     * data. */
    int64_t due = end_time_us + cfg->delay_ms * 1000;
    for (int32_t i = 1; i <= attempts; i++)
        due += backoff_ceiling(cfg->backoff_ms, cfg->backoff_max_ms, i) * 1000;
    return due;
}

/* The sweep's period is stretched by up to 1/this of itself, at random. */
#define INTERVAL_JITTER_DIVISOR 10

/* How long the lease taken only to record FAILED lasts: one save. */
#define GIVE_UP_LEASE_S 60

/* Takes the lease that only records that the attempts ran out (no attempt
 * counted); 1 when this worker holds it now. */
static int claim_give_up(sweep *sw, const Convo__V1__Session *s)
{
    Convo__V1__ClaimSummaryRequest req = CONVO__V1__CLAIM_SUMMARY_REQUEST__INIT;
    req.session_id = s->session_id;
    req.worker_id = (char *)sw->cfg.worker_id;
    req.lease_seconds = GIVE_UP_LEASE_S;
    req.max_attempts = sw->cfg.max_attempts;
    req.give_up = 1;
    ProtobufCMessage *resp = NULL;
    char *msg = NULL;
    rpc_code code = bcall_unary(sw->sc, sw->store, &convo__v1__store__claim_summary__method,
                                &req.base, sw->cfg.store_timeout_ms, &resp, &msg);
    int claimed = code == RPC_OK && ((Convo__V1__ClaimSummaryResponse *)resp)->claimed;
    if (code != RPC_OK)
        log_fields(LOG_WARN, (const log_field[]){{"session_id", s->session_id}, {NULL, NULL}},
                   "could not take the lease to mark the summary failed (%s: %s)",
                   rpc_code_name(code), msg != NULL ? msg : "");
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    mem_free(msg);
    return claimed;
}

/* A session out of attempts with no verdict (its last worker died, or the
 * lease ran out before the save): it will never be claimed again, so it is
 * marked FAILED here, under a lease like every save. Any replica may do it;
 * the lease makes one of them do it. */
static void give_up(sweep *sw, const Convo__V1__Session *s)
{
    if (!claim_give_up(sw, s))
        return; /* another replica does it, or it changed since the list */
    Convo__V1__SaveSummaryRequest req = CONVO__V1__SAVE_SUMMARY_REQUEST__INIT;
    char *reason = mem_asprintf("gave up after %d attempt%s; the last one: %s",
                                (int)s->summary_attempts, s->summary_attempts == 1 ? "" : "s",
                                s->summary_error != NULL && s->summary_error[0]
                                    ? s->summary_error
                                    : "did not finish (the worker stopped or its lease ran out)");
    req.session_id = s->session_id;
    req.status = CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_FAILED;
    req.summary = "";
    req.error = reason;
    req.worker_id = (char *)sw->cfg.worker_id;
    ProtobufCMessage *resp = NULL;
    char *msg = NULL;
    rpc_code code = bcall_unary(sw->sc, sw->store, &convo__v1__store__save_summary__method,
                                &req.base, sw->cfg.store_timeout_ms, &resp, &msg);
    const log_field f[] = {{"session_id", s->session_id}, {NULL, NULL}};
    if (code == RPC_OK)
        log_fields(LOG_WARN, f, "summary marked failed: %s", reason);
    else
        log_fields(LOG_WARN, f, "could not mark the summary failed (%s: %s)", rpc_code_name(code),
                   msg != NULL ? msg : "");
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    mem_free(msg);
    mem_free(reason);
}

/* Ends the live sessions whose gateway stopped keeping them alive (it
 * died, after or while their clients left): they become pending like any
 * ended session and are summarized from here on. Any replica may ask; the
 * store ends each once. */
static void end_abandoned(sweep *sw)
{
    Convo__V1__EndAbandonedSessionsRequest req = CONVO__V1__END_ABANDONED_SESSIONS_REQUEST__INIT;
    req.limit = sw->cfg.batch;
    ProtobufCMessage *resp = NULL;
    char *msg = NULL;
    rpc_code code =
        bcall_unary(sw->sc, sw->store, &convo__v1__store__end_abandoned_sessions__method, &req.base,
                    sw->cfg.store_timeout_ms, &resp, &msg);
    if (code == RPC_OK) {
        size_t n = ((Convo__V1__EndAbandonedSessionsResponse *)resp)->n_session_ids;
        if (n > 0)
            log_info("sweep: %zu live sessions ended, their gateway stopped keeping them alive", n);
    } else if (code != RPC_CANCELLED) {
        log_warn("sweep: EndAbandonedSessions failed (%s: %s)", rpc_code_name(code),
                 msg != NULL ? msg : "");
    }
    if (resp != NULL)
        protobuf_c_message_free_unpacked(resp, NULL);
    mem_free(msg);
}

static void sweep_once(sweep *sw)
{
    const sweep_cfg *cfg = &sw->cfg;
    end_abandoned(sw);
    if (sw->hooks.room(sw->hooks.arg) <= 0)
        return; /* every worker busy: the next round will look */
    if (!sw->hooks.llm_ok(sw->hooks.arg)) {
        if (sw->llm_skips++ == 0)
            log_warn("llm-svc is unreachable: sweeping paused until it answers");
        return;
    }
    if (sw->llm_skips > 0)
        log_info("llm-svc answers again: sweeping resumed");
    sw->llm_skips = 0;

    int64_t now = wall_us();
    Convo__V1__ListUnsummarizedSessionsRequest req =
        CONVO__V1__LIST_UNSUMMARIZED_SESSIONS_REQUEST__INIT;
    req.limit = cfg->batch;
    req.ended_before_us = now - cfg->delay_ms * 1000;
    /* Any attempt count: exhausted ones are given up on here. */
    req.max_attempts = 0;
    ProtobufCMessage *resp = NULL;
    char *msg = NULL;
    rpc_code code =
        bcall_unary(sw->sc, sw->store, &convo__v1__store__list_unsummarized_sessions__method,
                    &req.base, cfg->store_timeout_ms, &resp, &msg);
    if (code != RPC_OK) {
        if (code != RPC_CANCELLED)
            log_warn("sweep: ListUnsummarizedSessions failed (%s: %s)", rpc_code_name(code),
                     msg != NULL ? msg : "");
        mem_free(msg);
        return;
    }
    const Convo__V1__ListUnsummarizedSessionsResponse *r =
        (const Convo__V1__ListUnsummarizedSessionsResponse *)resp;
    size_t queued = 0, waiting = 0;
    if (sw->hooks.listed != NULL)
        sw->hooks.listed(sw->hooks.arg, r->n_sessions);
    for (size_t i = 0; i < r->n_sessions; i++) {
        const Convo__V1__Session *s = r->sessions[i];
        if (cfg->max_attempts > 0 && s->summary_attempts >= cfg->max_attempts) {
            give_up(sw, s);
            continue;
        }
        if (wall_us() < sweep_due_us(cfg, s->end_time_us, s->summary_attempts) ||
            !sw->hooks.may_retry(sw->hooks.arg, s->session_id)) {
            waiting++;
            continue;
        }
        if (sw->hooks.room(sw->hooks.arg) <= 0)
            break;
        int rc = sw->hooks.submit(sw->hooks.arg, s->session_id);
        if (rc < 0)
            break;
        queued += rc == 0;
    }
    if (queued > 0 || r->n_sessions > 0)
        log_debug("sweep: %zu pending sessions listed, %zu handed over, %zu waiting to retry",
                  r->n_sessions, queued, waiting);
    if (queued > 0)
        log_info("sweep: %zu sessions without a summary handed to the workers", queued);
    protobuf_c_message_free_unpacked(resp, NULL);
    mem_free(msg);
}

static void *sweep_main(void *arg)
{
    sweep *sw = arg;
    pthread_mutex_lock(&sw->mu);
    while (!sw->stop) {
        pthread_mutex_unlock(&sw->mu);
        sweep_once(sw);
        pthread_mutex_lock(&sw->mu);
        /* A little jitter keeps replicas started together from sweeping in
         * lockstep (they would only race for the same leases). */
        int64_t wait = sw->cfg.interval_ms +
                       backoff_rand_between(0, sw->cfg.interval_ms / INTERVAL_JITTER_DIVISOR);
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += wait / 1000;
        until.tv_nsec += (wait % 1000) * 1000000;
        if (until.tv_nsec >= 1000000000) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000;
        }
        while (!sw->stop) {
            if (pthread_cond_timedwait(&sw->cv, &sw->mu, &until) == ETIMEDOUT)
                break;
        }
    }
    pthread_mutex_unlock(&sw->mu);
    return NULL;
}

sweep *sweep_start(const sweep_cfg *cfg, cli_channel *store, const sweep_hooks *hooks)
{
    sweep *sw = mem_calloc(1, sizeof *sw);
    sw->cfg = *cfg;
    if (sw->cfg.interval_ms < 10)
        sw->cfg.interval_ms = 10;
    sw->store = store;
    sw->hooks = *hooks;
    sw->sc = bcall_scope_new();
    pthread_mutex_init(&sw->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&sw->cv, &ca);
    pthread_condattr_destroy(&ca);
    int rc = pthread_create(&sw->thread, NULL, sweep_main, sw);
    if (rc != 0) {
        log_error("cannot start the sweep thread: error %d", rc);
        abort();
    }
    return sw;
}

void sweep_stop(sweep **swp)
{
    sweep *sw = *swp;
    if (sw == NULL)
        return;
    pthread_mutex_lock(&sw->mu);
    sw->stop = 1;
    pthread_cond_signal(&sw->cv);
    pthread_mutex_unlock(&sw->mu);
    bcall_scope_cancel(sw->sc);
    pthread_join(sw->thread, NULL);
    bcall_scope_free(&sw->sc);
    pthread_mutex_destroy(&sw->mu);
    pthread_cond_destroy(&sw->cv);
    mem_free(sw);
    *swp = NULL;
}
