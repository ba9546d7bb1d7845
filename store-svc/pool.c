#include "pool.h"

#include "backoff.h"
#include "log.h"
#include "mem.h"
#include "migrate.h"
#include "rpc.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <time.h>

/* How often an idle worker looks at its connection (a cheap non-blocking
 * read), so that a restarted server flips health without any traffic. */
#define CHECK_INTERVAL_MS 1000

#define POOL_METRICS(X, S)                                                                         \
    X(S, queued, GAUGE, "convo_store_queue_jobs", "", NULL, "database jobs waiting for a worker")  \
    X(S, wait, HISTOGRAM, "convo_store_queue_wait_seconds", "", &metrics_buckets_seconds,          \
      "time a database job waited for a worker")                                                   \
    X(S, rejected, COUNTER, "convo_store_queue_rejected_total", "", NULL,                          \
      "calls refused because the job queue was full (RESOURCE_EXHAUSTED)")                         \
    X(S, unavailable, COUNTER, "convo_store_unavailable_total", "", NULL,                          \
      "jobs failed at once because no database connection was up (UNAVAILABLE)")                   \
    X(S, connected, GAUGE, "convo_store_db_connections", "", NULL,                                 \
      "workers with a database connection up")                                                     \
    X(S, connect_failures, COUNTER, "convo_store_db_connect_failures_total", "", NULL,             \
      "database connection attempts that failed (connecting, or the schema check after it)")       \
    X(S, lost, COUNTER, "convo_store_db_connections_lost_total", "", NULL,                         \
      "database connections found dead (a server restart, idle reaping, the network)")
METRICS_DECLARE(pool_metrics, POOL_METRICS)

typedef struct worker {
    pool *p;
    int index;
    pthread_t tid;
    db_conn *conn;
    int up;              /* connected and the schema current */
    int ever_up;         /* for counting reconnects */
    int64_t next_try_ms; /* when down: the next connection attempt */
    int64_t next_check_ms;
    backoff retry;    /* between connection attempts */
    pool_job **group; /* room for group_max_jobs jobs */
} worker;

struct pool {
    pool_config cfg;
    char *url; /* cfg.db.url points here */
    char *app_name;

    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_cond_t gather_cv; /* the gathering worker waits here */
    pool_job *head, *tail;
    size_t queued, queued_bytes;
    size_t queued_group_jobs, queued_group_weight;
    int gathering;        /* a worker is gathering a group */
    size_t gather_weight; /* what it holds so far */
    int64_t last_group_submit_us;
    int64_t gap_us; /* moving average of the gaps between group jobs (capped at the idle bound) */
    int stopping;
    int nup;
    int down_logged; /* the outage was logged once; no line per attempt */
    uint64_t rejected, unavailable, reconnects, groups, grouped;

    /* The first connected worker migrates; the others wait on the mutex
     * and find it done. */
    pthread_mutex_t migrate_mu;
    int schema_ok;

    worker *workers;
    int nworkers;
    pool_metrics mx;
};

/* ---- connection state ------------------------------------------------------- */

static void set_up(worker *w)
{
    pool *p = w->p;
    pthread_mutex_lock(&p->mu);
    w->up = 1;
    backoff_reset(&w->retry);
    if (w->ever_up)
        p->reconnects++;
    w->ever_up = 1;
    int became_ready = p->nup++ == 0;
    metrics_gauge_set(p->mx.connected, p->nup);
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
    /* Jittered so that replicas and workers do not knock in step. */
    w->next_try_ms = retry_now ? now : now + backoff_next(&w->retry);
    pthread_mutex_lock(&p->mu);
    if (w->up) {
        w->up = 0;
        if (--p->nup == 0 && p->cfg.on_ready != NULL)
            p->cfg.on_ready(p->cfg.arg, 0);
        metrics_gauge_set(p->mx.connected, p->nup);
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
        metrics_counter_inc(w->p->mx.connect_failures);
        set_down(w, 0);
        return;
    }
    if (ensure_schema(w) != 0) {
        db_conn_close(w->conn);
        metrics_counter_inc(w->p->mx.connect_failures);
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

/* Takes *link (a queued job) out of the queue; prev is the job before it
 * (NULL at the head). */
static pool_job *unlink_locked(pool *p, pool_job **link, pool_job *prev)
{
    pool_job *job = *link;
    *link = job->next;
    if (p->tail == job)
        p->tail = prev;
    job->next = NULL;
    p->queued--;
    p->queued_bytes -= job->bytes;
    metrics_gauge_add(p->mx.queued, -1);
    if (job->queued_us != 0)
        metrics_histogram_observe(p->mx.wait, metrics_now_us() - job->queued_us);
    if (job->group != NULL) {
        p->queued_group_jobs--;
        p->queued_group_weight -= job->weight;
    }
    return job;
}

static pool_job *pop_locked(pool *p)
{
    return unlink_locked(p, &p->head, NULL);
}

/* The first queued job, or the first that is not a group job while
 * another worker gathers a group (it takes those). */
static pool_job *take_locked(pool *p, int skip_groups)
{
    pool_job *prev = NULL;
    for (pool_job **link = &p->head; *link != NULL; prev = *link, link = &(*link)->next)
        if (!skip_groups || (*link)->group == NULL)
            return unlink_locked(p, link, prev);
    return NULL;
}

/* Moves queued jobs of first's group into w->group (which holds *n), in
 * queue order, while the bounds allow; stops at the first that does not
 * fit, so no job overtakes an earlier one of its kind. Returns the weight
 * now held. */
static size_t collect_locked(pool *p, worker *w, const pool_job *first, size_t *n, size_t weight)
{
    pool_job *prev = NULL;
    pool_job **link = &p->head;
    while (*link != NULL && *n < p->cfg.group_max_jobs) {
        pool_job *j = *link;
        if (j->group != first->group) {
            prev = j;
            link = &j->next;
            continue;
        }
        if (weight + j->weight > p->cfg.group_max_weight)
            break;
        w->group[(*n)++] = unlink_locked(p, link, prev);
        weight += j->weight;
    }
    return weight;
}

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* How long without a new group job closes a group: four times the recent
 * mean gap between them (a burst's last call is soon followed by silence),
 * at least GROUP_IDLE_MIN_US, at most group_idle_ms. */
#define GROUP_IDLE_GAPS   4
#define GROUP_IDLE_MIN_US 200

static int64_t idle_us_locked(const pool *p)
{
    int64_t cap = (int64_t)p->cfg.group_idle_ms * 1000;
    int64_t idle = GROUP_IDLE_GAPS * p->gap_us;
    if (idle < GROUP_IDLE_MIN_US)
        idle = GROUP_IDLE_MIN_US;
    return idle < cap ? idle : cap;
}

/* Gathers a group behind `first` (already taken): what is queued now, and
 * what comes while calls keep coming (no gap longer than idle_us_locked())
 * until first has waited group_window_ms or the group is full. A client
 * that sends a burst and then waits for the answers (a closed loop) costs
 * a short gap, not a whole window; calls that trickle in (a gateway's
 * sessions, each every 100 ms) gather for longer. Returns the number of
 * jobs in w->group. p->mu held (released while waiting). */
static size_t gather_locked(pool *p, worker *w, pool_job *first)
{
    size_t n = 1;
    size_t weight = first->weight;
    int64_t deadline = first->submitted_us + (int64_t)p->cfg.group_window_ms * 1000;
    w->group[0] = first;
    p->gathering = 1;
    for (;;) {
        weight = collect_locked(p, w, first, &n, weight);
        p->gather_weight = weight;
        int64_t now = now_us();
        int64_t until = p->last_group_submit_us + idle_us_locked(p);
        if (until > deadline)
            until = deadline;
        /* Full (a job left queued did not fit), its time is up, or quiet. */
        if (n >= p->cfg.group_max_jobs || weight >= p->cfg.group_max_weight ||
            p->queued_group_jobs > 0 || p->stopping || now >= until)
            break;
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        int64_t ns = ts.tv_nsec + (until - now) * 1000;
        ts.tv_sec += ns / 1000000000;
        ts.tv_nsec = ns % 1000000000;
        pthread_cond_timedwait(&p->gather_cv, &p->mu, &ts);
    }
    p->gathering = 0;
    p->groups++;
    p->grouped += n;
    /* What did not fit may start the next group on another worker now. */
    if (p->queued_group_jobs > 0)
        pthread_cond_signal(&p->cv);
    return n;
}

/* A statement failed on a dead connection: counted, closed, and the worker
 * reconnects at once rather than at the next check. */
static void conn_lost(pool *p, worker *w)
{
    log_info("worker %d: connection lost: %s", w->index, db_conn_error(w->conn));
    metrics_counter_inc(p->mx.lost);
    db_conn_close(w->conn);
    set_down(w, 1);
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
        size_t ngroup = 0;
        if (p->head != NULL && (w->up || p->nup == 0 || maintenance))
            job = take_locked(p, w->up && p->gathering);
        if (job == NULL && !maintenance) {
            /* Going idle: give back what a burst (200 resumed sessions'
             * pages) left free; mem_trim_idle does it at most once a
             * second, and not under the queue's lock. */
            if (p->head == NULL) {
                pthread_mutex_unlock(&p->mu);
                mem_trim_idle();
                pthread_mutex_lock(&p->mu);
                if (p->head != NULL || p->stopping)
                    continue; /* it came while the lock was free */
            }
            timed_wait(p, w->up ? w->next_check_ms : w->next_try_ms);
            continue;
        }
        if (job != NULL && job->group != NULL && w->up)
            ngroup = gather_locked(p, w, job);
        pthread_mutex_unlock(&p->mu);

        if (w->up && !db_conn_alive(w->conn)) {
            log_info("worker %d: connection lost: %s", w->index, db_conn_error(w->conn));
            metrics_counter_inc(p->mx.lost);
            set_down(w, 1);
        }
        if (!w->up && rpc_now_ms() >= w->next_try_ms)
            try_connect(w);
        if (w->up)
            w->next_check_ms = rpc_now_ms() + CHECK_INTERVAL_MS;

        if (ngroup > 0 && !w->up) {
            /* The connection died while the group gathered: each fails,
             * counted as any job that found no connection. */
            pthread_mutex_lock(&p->mu);
            p->unavailable += ngroup;
            pthread_mutex_unlock(&p->mu);
            for (size_t i = 0; i < ngroup; i++) {
                metrics_counter_inc(p->mx.unavailable);
                w->group[i]->fn(w->group[i], NULL, POOL_EUNAVAIL);
            }
        } else if (ngroup > 0) {
            job->group(w->group, ngroup, w->conn);
            if (!db_conn_ok(w->conn))
                conn_lost(p, w);
        } else if (job != NULL) {
            if (w->up) {
                job->fn(job, w->conn, 0);
                /* A statement that failed on a dead connection: reconnect
                 * at once rather than wait for the next check. */
                if (!db_conn_ok(w->conn))
                    conn_lost(p, w);
            } else {
                pthread_mutex_lock(&p->mu);
                p->unavailable++;
                pthread_mutex_unlock(&p->mu);
                metrics_counter_inc(p->mx.unavailable);
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
    metrics_register(cfg->metrics, METRICS_SECTION(pool_metrics, &p->mx));
    if (p->cfg.workers < 1)
        p->cfg.workers = 1;
    if (p->cfg.retry_min_ms < 1)
        p->cfg.retry_min_ms = 100;
    if (p->cfg.retry_max_ms < p->cfg.retry_min_ms)
        p->cfg.retry_max_ms = p->cfg.retry_min_ms;
    if (p->cfg.group_max_jobs < 1)
        p->cfg.group_max_jobs = 1;
    if (p->cfg.group_window_ms < 0)
        p->cfg.group_window_ms = 0;
    if (p->cfg.group_idle_ms < 0)
        p->cfg.group_idle_ms = 0;

    pthread_mutex_init(&p->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&p->cv, &ca);
    pthread_cond_init(&p->gather_cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&p->migrate_mu, NULL);

    p->nworkers = p->cfg.workers;
    p->workers = mem_calloc((size_t)p->nworkers, sizeof *p->workers);
    for (int i = 0; i < p->nworkers; i++) {
        worker *w = &p->workers[i];
        w->p = p;
        w->index = i;
        w->conn = db_conn_create(&p->cfg.db);
        backoff_init(&w->retry, p->cfg.retry_min_ms, p->cfg.retry_max_ms, BACKOFF_DECORRELATED);
        w->next_try_ms = 0;
        w->group = mem_calloc(p->cfg.group_max_jobs, sizeof *w->group);
    }
    for (int i = 0; i < p->nworkers; i++)
        pthread_create(&p->workers[i].tid, NULL, worker_main, &p->workers[i]);
    return p;
}

static void push_locked(pool *p, pool_job *job)
{
    job->next = NULL;
    job->submitted_us = now_us();
    if (p->tail != NULL)
        p->tail->next = job;
    else
        p->head = job;
    p->tail = job;
    p->queued++;
    p->queued_bytes += job->bytes;
    metrics_gauge_add(p->mx.queued, 1);
    job->queued_us = p->mx.wait != NULL ? metrics_now_us() : 0;
    if (job->group != NULL) {
        p->queued_group_jobs++;
        p->queued_group_weight += job->weight;
        int64_t gap = job->submitted_us - p->last_group_submit_us;
        int64_t cap = (int64_t)p->cfg.group_idle_ms * 1000;
        p->gap_us += ((gap < cap ? gap : cap) - p->gap_us) / 8;
        p->last_group_submit_us = job->submitted_us;
        if (p->gathering) {
            /* The gatherer collects it when its window ends; it is woken
             * early only when the group would be full. */
            if (p->gather_weight + p->queued_group_weight >= p->cfg.group_max_weight)
                pthread_cond_signal(&p->gather_cv);
            return;
        }
    }
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
        metrics_counter_inc(p->mx.rejected);
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
    st->groups = p->groups;
    st->grouped = p->grouped;
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
    pthread_cond_broadcast(&p->gather_cv);
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
    for (int i = 0; i < p->nworkers; i++) {
        db_conn_destroy(&p->workers[i].conn);
        mem_free(p->workers[i].group);
    }
    mem_free(p->workers);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    pthread_cond_destroy(&p->gather_cv);
    pthread_mutex_destroy(&p->migrate_mu);
    mem_free(p->url);
    mem_free(p->app_name);
    mem_free(p);
}
