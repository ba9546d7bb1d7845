#include "pool.h"

#include "log.h"
#include "mem.h"
#include "migrate.h"
#include "rpc.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* How often an idle worker looks at its connection (a cheap non-blocking
 * read), so that a restarted server flips health without any traffic. */
#define CHECK_INTERVAL_MS 1000

typedef struct worker {
    pool *p;
    int index;
    pthread_t tid;
    db_conn *conn;
    int up;              /* connected and the schema current */
    int ever_up;         /* for counting reconnects */
    int64_t next_try_ms; /* when down: the next connection attempt */
    int64_t next_check_ms;
    int backoff_ms;
    unsigned seed; /* jitter */
} worker;

struct pool {
    pool_config cfg;
    char *url; /* cfg.db.url points here */
    char *app_name;

    pthread_mutex_t mu;
    pthread_cond_t cv;
    pool_job *head, *tail;
    size_t queued, queued_bytes;
    int stopping;
    int nup;
    int down_logged; /* the outage was logged once; no line per attempt */
    uint64_t rejected, unavailable, reconnects;

    /* The first connected worker migrates; the others wait on the mutex
     * and find it done. */
    pthread_mutex_t migrate_mu;
    int schema_ok;

    worker *workers;
    int nworkers;
};

const char *pool_strerror(int err)
{
    switch (err) {
    case 0:
        return "ok";
    case POOL_EFULL:
        return "the job queue is full";
    case POOL_ESHUTDOWN:
        return "the store is shutting down";
    case POOL_EUNAVAIL:
        return "no database connection";
    }
    return "unknown error";
}

/* ---- connection state ------------------------------------------------------- */

static void set_up(worker *w)
{
    pool *p = w->p;
    pthread_mutex_lock(&p->mu);
    w->up = 1;
    w->backoff_ms = p->cfg.retry_min_ms;
    if (w->ever_up)
        p->reconnects++;
    w->ever_up = 1;
    int became_ready = p->nup++ == 0;
    if (became_ready) {
        p->down_logged = 0;
        log_info("database ready: %s (worker %d)", db_conn_where(w->conn), w->index);
        if (p->cfg.on_ready != NULL)
            p->cfg.on_ready(p->cfg.arg, 1);
    }
    /* Jobs may have waited for a connected worker. */
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

/* The worker has no usable connection. `retry_now` when it just lost one
 * (the server probably restarted: try again at once) rather than failing
 * to connect (back off). */
static void set_down(worker *w, int retry_now)
{
    pool *p = w->p;
    int64_t now = rpc_now_ms();
    if (retry_now) {
        w->next_try_ms = now;
    } else {
        /* +-25% jitter so that replicas and workers do not knock in step. */
        int jitter = w->backoff_ms / 4;
        int delay =
            w->backoff_ms + (jitter > 0 ? (int)(rand_r(&w->seed) % (2 * jitter + 1)) - jitter : 0);
        w->next_try_ms = now + delay;
        w->backoff_ms =
            w->backoff_ms * 2 > p->cfg.retry_max_ms ? p->cfg.retry_max_ms : w->backoff_ms * 2;
    }
    pthread_mutex_lock(&p->mu);
    if (w->up) {
        w->up = 0;
        if (--p->nup == 0 && p->cfg.on_ready != NULL)
            p->cfg.on_ready(p->cfg.arg, 0);
    }
    if (p->nup == 0 && !p->down_logged && !retry_now) {
        p->down_logged = 1;
        log_warn("database unavailable: %s; calls fail with UNAVAILABLE until a connection is "
                 "back (retrying with backoff up to %d ms)",
                 db_conn_error(w->conn), p->cfg.retry_max_ms);
    }
    pthread_mutex_unlock(&p->mu);
}

/* Makes sure the schema is what this binary needs, once per process. */
static int ensure_schema(worker *w)
{
    pool *p = w->p;
    int rc = 0;
    pthread_mutex_lock(&p->migrate_mu);
    if (p->schema_ok)
        goto out;
    if (p->cfg.migrate) {
        int version = 0, applied = 0;
        rc = migrate_apply(w->conn, &version, &applied);
        if (rc == 0)
            log_info("database schema at version %d (%d migrations applied now)", version, applied);
        else
            log_error("migrating the database failed: %s", db_conn_error(w->conn));
    } else {
        int version = 0;
        rc = migrate_version(w->conn, &version);
        if (rc == 0 && version < migrate_latest()) {
            log_warn("the database schema is at version %d, this binary needs %d; waiting for "
                     "`store-svc migrate` (started with --migrate-on-start=false)",
                     version, migrate_latest());
            rc = DB_EUNAVAIL;
        }
    }
    if (rc == 0)
        p->schema_ok = 1;
out:
    pthread_mutex_unlock(&p->migrate_mu);
    return rc;
}

static void try_connect(worker *w)
{
    if (db_conn_connect(w->conn) != 0) {
        log_debug("worker %d: cannot connect: %s", w->index, db_conn_error(w->conn));
        set_down(w, 0);
        return;
    }
    if (ensure_schema(w) != 0) {
        db_conn_close(w->conn);
        set_down(w, 0);
        return;
    }
    w->next_check_ms = rpc_now_ms() + CHECK_INTERVAL_MS;
    set_up(w);
}

/* ---- the worker loop ----------------------------------------------------- */

static void timed_wait(pool *p, int64_t until_ms)
{
    /* rpc_now_ms is monotonic; the condvar uses CLOCK_MONOTONIC too. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t wait = until_ms - rpc_now_ms();
    if (wait < 1)
        wait = 1;
    ts.tv_sec += wait / 1000;
    ts.tv_nsec += (wait % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    pthread_cond_timedwait(&p->cv, &p->mu, &ts);
}

static pool_job *pop_locked(pool *p)
{
    pool_job *job = p->head;
    p->head = job->next;
    if (p->head == NULL)
        p->tail = NULL;
    job->next = NULL;
    p->queued--;
    p->queued_bytes -= job->bytes;
    return job;
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    pool *p = w->p;

    pthread_mutex_lock(&p->mu);
    while (!p->stopping) {
        pool_job *job = NULL;
        int64_t now = rpc_now_ms();
        int maintenance = w->up ? now >= w->next_check_ms : now >= w->next_try_ms;
        /* A worker without a connection leaves jobs to connected ones
         * until its next attempt is due; when none is connected it takes
         * them, to fail them at once rather than let them wait out an
         * outage. */
        if (p->head != NULL && (w->up || p->nup == 0 || maintenance))
            job = pop_locked(p);
        if (job == NULL && !maintenance) {
            timed_wait(p, w->up ? w->next_check_ms : w->next_try_ms);
            continue;
        }
        pthread_mutex_unlock(&p->mu);

        if (w->up && !db_conn_alive(w->conn)) {
            log_info("worker %d: connection lost: %s", w->index, db_conn_error(w->conn));
            set_down(w, 1);
        }
        if (!w->up && rpc_now_ms() >= w->next_try_ms)
            try_connect(w);
        if (w->up)
            w->next_check_ms = rpc_now_ms() + CHECK_INTERVAL_MS;

        if (job != NULL) {
            if (w->up) {
                job->fn(job, w->conn, 0);
                /* A statement that failed on a dead connection: reconnect
                 * at once rather than wait for the next check. */
                if (!db_conn_ok(w->conn)) {
                    log_info("worker %d: connection lost: %s", w->index, db_conn_error(w->conn));
                    db_conn_close(w->conn);
                    set_down(w, 1);
                }
            } else {
                pthread_mutex_lock(&p->mu);
                p->unavailable++;
                pthread_mutex_unlock(&p->mu);
                job->fn(job, NULL, POOL_EUNAVAIL);
            }
        }
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* ---- API -------------------------------------------------------------------- */

pool *pool_create(const pool_config *cfg)
{
    pool *p = mem_calloc(1, sizeof *p);
    p->cfg = *cfg;
    p->url = mem_strdup(cfg->db.url);
    p->app_name = mem_strdup(cfg->db.application_name ? cfg->db.application_name : "store-svc");
    p->cfg.db.url = p->url;
    p->cfg.db.application_name = p->app_name;
    if (p->cfg.workers < 1)
        p->cfg.workers = 1;
    if (p->cfg.retry_min_ms < 1)
        p->cfg.retry_min_ms = 100;
    if (p->cfg.retry_max_ms < p->cfg.retry_min_ms)
        p->cfg.retry_max_ms = p->cfg.retry_min_ms;

    pthread_mutex_init(&p->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&p->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&p->migrate_mu, NULL);

    p->nworkers = p->cfg.workers;
    p->workers = mem_calloc((size_t)p->nworkers, sizeof *p->workers);
    for (int i = 0; i < p->nworkers; i++) {
        worker *w = &p->workers[i];
        w->p = p;
        w->index = i;
        w->conn = db_conn_create(&p->cfg.db);
        w->backoff_ms = p->cfg.retry_min_ms;
        w->next_try_ms = 0;
        w->seed = (unsigned)(rpc_now_ms() ^ (i * 2654435761u));
    }
    for (int i = 0; i < p->nworkers; i++)
        pthread_create(&p->workers[i].tid, NULL, worker_main, &p->workers[i]);
    return p;
}

static void push_locked(pool *p, pool_job *job)
{
    job->next = NULL;
    if (p->tail != NULL)
        p->tail->next = job;
    else
        p->head = job;
    p->tail = job;
    p->queued++;
    p->queued_bytes += job->bytes;
    /* A worker without a connection may leave the job to others, so while
     * any is down, wake them all rather than perhaps only that one. */
    if (p->nup == p->nworkers)
        pthread_cond_signal(&p->cv);
    else
        pthread_cond_broadcast(&p->cv);
}

int pool_submit(pool *p, pool_job *job)
{
    int rc = 0;
    pthread_mutex_lock(&p->mu);
    if (p->stopping) {
        rc = POOL_ESHUTDOWN;
    } else if (p->queued >= p->cfg.max_jobs ||
               (p->queued > 0 && p->queued_bytes + job->bytes > p->cfg.max_bytes)) {
        /* One job is always let in when the queue is empty, however big:
         * the request limits bound it already. */
        if (p->rejected++ % 1000 == 0)
            log_warn("job queue full (%zu jobs, %zu bytes queued); refusing with "
                     "RESOURCE_EXHAUSTED (%llu refused so far)",
                     p->queued, p->queued_bytes, (unsigned long long)p->rejected);
        rc = POOL_EFULL;
    } else {
        push_locked(p, job);
    }
    pthread_mutex_unlock(&p->mu);
    return rc;
}

int pool_resubmit(pool *p, pool_job *job)
{
    int rc = 0;
    pthread_mutex_lock(&p->mu);
    if (p->stopping)
        rc = POOL_ESHUTDOWN;
    else
        push_locked(p, job);
    pthread_mutex_unlock(&p->mu);
    return rc;
}

void pool_get_stats(pool *p, pool_stats *st)
{
    pthread_mutex_lock(&p->mu);
    st->rejected = p->rejected;
    st->unavailable = p->unavailable;
    st->reconnects = p->reconnects;
    st->queued = p->queued;
    st->connected = p->nup;
    pthread_mutex_unlock(&p->mu);
}

void pool_destroy(pool **pp)
{
    pool *p = *pp;
    if (p == NULL)
        return;
    *pp = NULL;
    pthread_mutex_lock(&p->mu);
    p->stopping = 1;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->nworkers; i++)
        pthread_join(p->workers[i].tid, NULL);
    /* No worker is left: whatever is queued is failed here (a stream's
     * next page may re-queue itself; it gets POOL_ESHUTDOWN then). */
    for (;;) {
        pthread_mutex_lock(&p->mu);
        pool_job *job = p->head != NULL ? pop_locked(p) : NULL;
        pthread_mutex_unlock(&p->mu);
        if (job == NULL)
            break;
        job->fn(job, NULL, POOL_ESHUTDOWN);
    }
    for (int i = 0; i < p->nworkers; i++)
        db_conn_destroy(&p->workers[i].conn);
    mem_free(p->workers);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->migrate_mu);
    mem_free(p->url);
    mem_free(p->app_name);
    mem_free(p);
}
