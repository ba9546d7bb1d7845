/* store-svc — serves convo.v1.Store: sessions and their event log in
 * PostgreSQL.
 *
 *   store-svc [options]           serve (migrating the schema on start-up)
 *   store-svc migrate [options]   apply the migrations and exit (a Kubernetes Job) */
#include "backoff.h"
#include "conf.h"
#include "db.h"
#include "health.h"
#include "scrape.h"
#include "log.h"
#include "mem.h"
#include "migrate.h"
#include "otlp.h"
#include "pool.h"
#include "srv.h"
#include "store.h"
#include "tls.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define STORE_OPTS(X, S)                                                                           \
    X(S, listen, STR, "listen", "LISTEN_ADDR", "0.0.0.0:50053", "HOST:PORT to serve gRPC on")      \
    X(S, database_url, SECRET, "database-url", "DATABASE_URL",                                     \
      "postgresql://postgres@127.0.0.1:5432/postgres",                                             \
      "PostgreSQL connection URI or key=value string (libpq); sslmode and other parameters in "    \
      "it are honoured (a Supabase connection string works as given)")                             \
    X(S, db_pool_size, INT_IN(1, 256), "db-pool-size", "DB_POOL_SIZE", "4",                        \
      "database connections, one per worker thread")                                               \
    X(S, db_connect_timeout, INT_IN(1, 600), "db-connect-timeout", "DB_CONNECT_TIMEOUT", "5",      \
      "seconds a connection attempt may take (unless DATABASE_URL sets connect_timeout)")          \
    X(S, db_statement_timeout_ms, INT_IN(0, 86400000), "db-statement-timeout-ms",                  \
      "DB_STATEMENT_TIMEOUT_MS", "30000",                                                          \
      "statement_timeout of every connection; a statement cut off fails UNAVAILABLE "              \
      "and rolls back whole (0: none)")                                                            \
    X(S, db_retry_max_ms, INT_IN(100, 600000), "db-retry-max-ms", "DB_RETRY_MAX_MS", "5000",       \
      "longest wait between reconnection attempts (the waits start at 100 ms and grow, with "      \
      "random jitter, up to it)")                                                                  \
    X(S, db_prepare, BOOL, "db-prepare", "DB_PREPARE", "true",                                     \
      "prepare the store's statements on each connection (parsed and planned once); turned off "   \
      "by itself on a connection where a transaction pooler refuses them")                         \
    X(S, migrate_on_start, BOOL, "migrate-on-start", "MIGRATE_ON_START", "true",                   \
      "apply pending migrations when the first connection is made; with false, stay "              \
      "NOT_SERVING until `store-svc migrate` has brought the schema up to date")                   \
    X(S, migrate_wait_ms, INT_IN(0, 86400000), "migrate-wait-ms", "MIGRATE_WAIT_MS", "60000",      \
      "`store-svc migrate` only: how long to keep trying to reach the database")                   \
    X(S, max_batch_events, INT_IN(1, 100000), "max-batch-events", "STORE_MAX_BATCH_EVENTS",        \
      "1000", "events accepted in one AppendEvents call")                                          \
    X(S, max_content_bytes, INT_IN(1, CONF_NO_MAX), "max-content-bytes",                           \
      "STORE_MAX_CONTENT_BYTES", "262144",                                                         \
      "largest event content, summary or error text in bytes")                                     \
    X(S, queue_size, INT_IN(1, 10000000), "queue-size", "STORE_QUEUE_SIZE", "1024",                \
      "database jobs waiting for a worker; beyond it calls fail RESOURCE_EXHAUSTED")               \
    X(S, queue_max_bytes, INT_IN(1, 1LL << 40), "queue-max-bytes", "STORE_QUEUE_MAX_BYTES",        \
      "67108864",                                                                                  \
      "bytes held by waiting jobs (their event batches); beyond it calls fail "                    \
      "RESOURCE_EXHAUSTED")                                                                        \
    X(S, append_group_ms, INT_IN(0, 10000), "append-group-ms", "STORE_APPEND_GROUP_MS", "20",      \
      "group commit: AppendEvents calls go to the database together, one statement and one "       \
      "commit, each answered once it is stored; a call waits at most this many ms for others "     \
      "(0: only calls already waiting are grouped)")                                               \
    X(S, append_group_idle_ms, INT_IN(0, 10000), "append-group-idle-ms",                           \
      "STORE_APPEND_GROUP_IDLE_MS", "5",                                                           \
      "a group is closed when no AppendEvents call came for four times their recent mean gap, "    \
      "this many ms at most")                                                                      \
    X(S, append_group_calls, INT_IN(1, 100000), "append-group-calls", "STORE_APPEND_GROUP_CALLS",  \
      "64",                                                                                        \
      "AppendEvents calls in one group at most (groups run side by side on the workers, so a "     \
      "burst is spread over them rather than made one statement on one core)")                     \
    X(S, append_group_events, INT_IN(1, 10000000), "append-group-events",                          \
      "STORE_APPEND_GROUP_EVENTS", "1000",                                                         \
      "events in one group at most (a bigger call runs alone)")                                    \
    X(S, list_page_size, INT_IN(1, 100000), "list-page-size", "STORE_LIST_PAGE_SIZE", "1000",      \
      "events read from the database per page of ListEvents (the most held per stream)")           \
    X(S, list_pages_max, INT_IN(1, 100000), "list-pages-max", "STORE_LIST_PAGES_MAX", "16",        \
      "ListEvents pages held in memory at once over all streams (a burst of resumes waits for "    \
      "pages to be sent, rather than holding --list-page-size events each)")                       \
    X(S, log_level, STR, "log-level", "LOG_LEVEL", "info", "debug, info, warn or error")
CONF_DECLARE(store_opts, STORE_OPTS)

/* The first wait after a failed connection attempt; it grows (with jitter)
 * up to --db-retry-max-ms. */
#define DB_RETRY_FIRST_MS 100

/* Health follows the pool: NOT_SERVING while no connection is up. */
static void on_ready(void *arg, int ready)
{
    health *h = arg;
    health_status st = ready ? HEALTH_SERVING : HEALTH_NOT_SERVING;
    health_set(h, STORE_SERVICE, st);
    health_set(h, "", st);
}

/* What conf's ranges cannot say: the bounds that depend on other options,
 * and the database URL. */
static int check_opts(const store_opts *o, const srv_opts *so)
{
    if (o->max_content_bytes > so->max_message_bytes) {
        fprintf(stderr,
                "store-svc: --max-content-bytes: '%lld' is not an integer from 1 to %lld "
                "(--max-message-bytes)\n",
                o->max_content_bytes, so->max_message_bytes);
        return -1;
    }
    if (o->database_url[0] == '\0') {
        fprintf(stderr, "store-svc: --database-url is empty\n");
        return -1;
    }
    /* A malformed URL never gets better: refuse it now rather than retry
     * forever. (The message names the bad part, never the password.) */
    char *err = NULL;
    PQconninfoOption *parsed = PQconninfoParse(o->database_url, &err);
    if (parsed == NULL) {
        fprintf(stderr,
                "store-svc: --database-url (DATABASE_URL) is not a libpq URI or "
                "key=value string: %s",
                err != NULL ? err : "out of memory\n");
        PQfreemem(err);
        return -1;
    }
    PQconninfoFree(parsed);
    return 0;
}

static db_settings settings_of(const store_opts *o)
{
    db_settings s = {
        .url = o->database_url,
        .connect_timeout_s = (int)o->db_connect_timeout,
        .statement_timeout_ms = (int)o->db_statement_timeout_ms,
        .application_name = "store-svc",
        .prepare = o->db_prepare,
    };
    return s;
}

/* `store-svc migrate`: connect (retrying while the database comes up, as a
 * Job started beside it would see), migrate, exit 0. */
static int run_migrate(const store_opts *o)
{
    db_settings s = settings_of(o);
    db_conn *c = db_conn_create(&s);
    int64_t deadline = rpc_now_ms() + o->migrate_wait_ms;
    int status = 1, rc;
    backoff retry;
    backoff_init(&retry, DB_RETRY_FIRST_MS, o->db_retry_max_ms, BACKOFF_DECORRELATED);

    while ((rc = db_conn_connect(c)) != 0) {
        int64_t delay = backoff_next(&retry);
        if (rpc_now_ms() + delay > deadline) {
            log_error("cannot reach the database within %lld ms: %s", o->migrate_wait_ms,
                      db_conn_error(c));
            goto out;
        }
        log_warn("cannot reach the database (%s); retrying in %lld ms", db_conn_error(c),
                 (long long)delay);
        usleep((useconds_t)delay * 1000);
    }
    int version = 0, applied = 0;
    if ((rc = migrate_apply(c, &version, &applied)) != 0) {
        log_error("migration failed: %s", db_conn_error(c));
        goto out;
    }
    log_info("database %s at schema version %d (%d migrations applied now)", db_conn_where(c),
             version, applied);
    status = 0;
out:
    db_conn_destroy(&c);
    return status;
}

int main(int argc, char **argv)
{
    store_opts opts = {0};
    srv_opts sopts = {0};
    tls_opts topts = {0};
    scrape_opts mopts = {0};
    otlp_opts oopts = {0};
    const conf_section secs[] = {
        CONF_SECTION(store_opts, &opts), CONF_SECTION(srv_opts, &sopts),
        CONF_SECTION(tls_opts, &topts),  CONF_SECTION(scrape_opts, &mopts),
        CONF_SECTION(otlp_opts, &oopts),
    };
    const size_t nsecs = sizeof secs / sizeof secs[0];
    srv *server = NULL;
    health *hl = NULL;
    pool *db_pool = NULL;
    store *st = NULL;
    tls *mtls = NULL;
    char err[512];
    metrics *m = NULL;
    db_metrics *dbm = NULL;
    otlp *exp = NULL;
    scrape *sc = NULL;
    char maddr[300];
    int status = 2;
    int migrate_only = 0;

    srv_block_signals();
    /* The subcommand comes first; the options after it are the same. */
    if (argc > 1 && strcmp(argv[1], "migrate") == 0) {
        migrate_only = 1;
        argv[1] = argv[0];
        argv++;
        argc--;
    }
    int rc = conf_parse(argc, argv, "store-svc",
                        "sessions and their event log in PostgreSQL (convo.v1.Store); "
                        "`store-svc migrate [options]` applies the schema migrations and exits",
                        secs, nsecs);
    if (rc != 0) {
        status = rc > 0 ? 0 : 2;
        goto out;
    }
    if (log_setup("store-svc", opts.log_level) != 0 || check_opts(&opts, &sopts) != 0)
        goto out;

    if (!migrate_only && tls_create(&topts, &mtls, err, sizeof err) != 0) {
        log_error("%s", err);
        goto out;
    }
    if (migrate_only) {
        status = run_migrate(&opts);
        goto out;
    }
    if (scrape_setup(&mopts, "store-svc", opts.listen, maddr, sizeof maddr, &m) != 0 ||
        otlp_setup(&oopts, "store-svc", m, &exp) != 0)
        goto out;

    status = 1;
    server = srv_create("store-svc", opts.listen, &sopts);
    hl = health_attach(server);
    srv_use_tls(server, mtls);
    srv_set_metrics(server, m);
    srv_set_tracer(server, exp);
    dbm = db_metrics_create(m);
    pool_config pc = {
        .db = settings_of(&opts),
        .workers = (int)opts.db_pool_size,
        .max_jobs = (size_t)opts.queue_size,
        .max_bytes = (size_t)opts.queue_max_bytes,
        .retry_min_ms = DB_RETRY_FIRST_MS,
        .retry_max_ms = (int)opts.db_retry_max_ms,
        .migrate = opts.migrate_on_start,
        .group_window_ms = (int)opts.append_group_ms,
        .group_idle_ms = (int)opts.append_group_idle_ms,
        .group_max_jobs = (size_t)opts.append_group_calls,
        .group_max_weight = (size_t)opts.append_group_events,
        .on_ready = on_ready,
        .arg = hl,
        .metrics = m,
    };
    pc.db.metrics = dbm;
    store_limits lim = {
        .max_batch_events = opts.max_batch_events,
        .max_content_bytes = opts.max_content_bytes,
        .list_page_size = opts.list_page_size,
        .list_pages_max = opts.list_pages_max,
        .max_message_bytes = sopts.max_message_bytes,
    };
    /* NOT_SERVING until a worker is connected and the schema is current
     * (health marks SERVING at srv_start only what is still UNKNOWN). The
     * workers start connecting now; no call can reach them before
     * srv_start. */
    health_set(hl, "", HEALTH_NOT_SERVING);
    health_set(hl, STORE_SERVICE, HEALTH_NOT_SERVING);
    db_pool = pool_create(&pc);
    st = store_create(server, db_pool, &lim, m);
    if (st == NULL)
        goto out;
    if (m != NULL && (sc = scrape_start(maddr, m, health_serving, hl)) == NULL)
        goto out;
    if (srv_start(server) != 0)
        goto out; /* srv_start logged the address */
    log_info("store-svc: %lld database workers, queue %lld jobs / %lld bytes, batches up to %lld "
             "events, content up to %lld bytes",
             opts.db_pool_size, opts.queue_size, opts.queue_max_bytes, opts.max_batch_events,
             opts.max_content_bytes);
    srv_run(server);
    pool_stats ps;
    pool_get_stats(db_pool, &ps);
    log_info("store-svc: stopped; %llu calls refused on a full queue, %llu failed without a "
             "database connection, %llu reconnections; %llu AppendEvents calls in %llu groups",
             (unsigned long long)ps.rejected, (unsigned long long)ps.unavailable,
             (unsigned long long)ps.reconnects, (unsigned long long)ps.grouped,
             (unsigned long long)ps.groups);
    status = 0;

out:
    scrape_stop(&sc);
    /* srv_run returned only when every call was finished; the workers are
     * idle or running nothing that belongs to a call. */
    pool_destroy(&db_pool);
    if (server != NULL)
        srv_destroy(&server);
    store_destroy(&st);
    tls_destroy(&mtls);
    otlp_destroy(&exp);
    db_metrics_destroy(&dbm);
    metrics_destroy(&m);
    conf_free(secs, nsecs);
    return status;
}
