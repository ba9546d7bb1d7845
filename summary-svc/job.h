/* job — one session summarized, start to end, on a worker thread.
 *
 * The steps, each a blocking call (bcall) so the job reads as a sequence:
 * ClaimSummary (the lease that makes the work happen once across replicas;
 * it also counts the attempt), ListEvents in pages with backpressure into
 * the summarizer, the Complete calls it asks for, then SaveSummary: DONE
 * with the summary, PENDING with the error for a later retry, or FAILED once
 * the attempts are used up. Nothing here runs on a gRPC thread.
 *
 * The job never outlives its lease: every call's deadline is cut to what is
 * left of it, and a job that runs out gives up the attempt (saved PENDING)
 * rather than risk a second replica taking the session over while it still
 * works on it. */
#ifndef SUMMARY_JOB_H
#define SUMMARY_JOB_H

#include "bcall.h"
#include "cli.h"
#include "rpc.h"

#include <stddef.h>
#include <stdint.h>

/* What every job shares (read-only while jobs run). */
typedef struct job_env {
    cli_channel *store;
    cli_channel *llm;
    const char *worker_id;    /* this process's lease owner id */
    int32_t lease_seconds;    /* ClaimSummary's lease */
    int32_t max_attempts;     /* ClaimSummary's bound; the last failure is FAILED */
    size_t budget;            /* summarizer chunk size in bytes */
    int64_t store_timeout_ms; /* one store call (a ListEvents page included) */
    int64_t llm_timeout_ms;   /* one Complete call */
    const char *model;        /* GenerationParams.model; "" is llm-svc's default */
    int64_t page_events;      /* events per ListEvents call */
} job_env;

typedef enum job_outcome {
    JOB_DONE,      /* the summary is saved (now or before): summary */
    JOB_FAILED,    /* the session is FAILED (now or before): error */
    JOB_RETRY,     /* this attempt failed and is saved PENDING: error; the sweep retries */
    JOB_BUSY,      /* not claimed: another worker holds the lease, or no attempt is left */
    JOB_NOT_ENDED, /* the session is still live */
    JOB_ERROR,     /* stopped before or at the claim: code and error (NOT_FOUND, UNAVAILABLE) */
} job_outcome;

typedef struct job_result {
    job_outcome outcome;
    rpc_code code; /* JOB_ERROR's status */
    char *summary; /* JOB_DONE */
    char *error;   /* JOB_FAILED, JOB_RETRY, JOB_ERROR; may be NULL otherwise */
    int32_t attempts;
    int claimed;        /* this run held the lease */
    int lease_conflict; /* another worker held the lease, or took it from this run */
    unsigned model_calls;
    int llm_unreachable; /* a Complete failed with UNAVAILABLE: llm-svc may be down */
} job_result;

/* Summarizes `session_id`. Calls go through `sc`, so cancelling it (at
 * shutdown) ends the job quickly; the lease is then released with PENDING.
 * Fills *out (release with job_result_clear). Logs what it did. */
void job_run(const job_env *env, bcall_scope *sc, const char *session_id, job_result *out);

void job_result_clear(job_result *r);

const char *job_outcome_name(job_outcome o);

#endif
