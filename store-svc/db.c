#include "db.h"

#include "log.h"
#include "mem.h"

#include <arpa/inet.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* PostgreSQL type OIDs (pg_type.h is a server header; these never change). */
#define OID_INT4       23
#define OID_TEXT       25
#define OID_INT8       20
#define OID_INT4_ARRAY 1007
#define OID_TEXT_ARRAY 1009
#define OID_INT8_ARRAY 1016

struct db_conn {
    PGconn *pg;
    char *url;
    char *application_name;
    int connect_timeout_s;
    int statement_timeout_ms;
    int prepare;       /* the setting */
    int use_prepared;  /* on this connection (off after a pooler refused them) */
    unsigned prepared; /* bit per statement id prepared on this connection */
    char err[512];
    char where[256];
    db_metrics *mx;
};

static const char *const event_names[DB_EVENT_MAX + 1] = {
    [DB_EVENT_USER_MESSAGE] = "user_message", [DB_EVENT_AI_TOKEN] = "ai_token",
    [DB_EVENT_TOOL_CALL] = "tool_call",       [DB_EVENT_TOOL_RESULT] = "tool_result",
    [DB_EVENT_SYSTEM_EVENT] = "system_event",
};

const char *db_event_type_name(int type)
{
    return type >= 1 && type <= DB_EVENT_MAX ? event_names[type] : NULL;
}

static int event_type_parse(const char *s)
{
    for (int t = 1; t <= DB_EVENT_MAX; t++)
        if (strcmp(s, event_names[t]) == 0)
            return t;
    return 0;
}

static const char *const summary_names[] = {
    [DB_SUMMARY_NONE] = "none",
    [DB_SUMMARY_PENDING] = "pending",
    [DB_SUMMARY_DONE] = "done",
    [DB_SUMMARY_FAILED] = "failed",
};

static int summary_parse(const char *s)
{
    for (int i = DB_SUMMARY_NONE; i <= DB_SUMMARY_FAILED; i++)
        if (strcmp(s, summary_names[i]) == 0)
            return i;
    return DB_SUMMARY_UNKNOWN;
}

static void set_err(db_conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_err(db_conn *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    /* libpq messages end with a newline (sometimes several lines). */
    for (char *p = c->err; *p != '\0'; p++)
        if (*p == '\n' || *p == '\r')
            *p = p[1] != '\0' ? ' ' : '\0';
}

/* ---- connection ------------------------------------------------------------ */

/* Server notices ("relation ... already exists, skipping") go to the log
 * as debug lines instead of libpq's default, raw text on stderr. */
static void on_notice(void *arg, const char *message)
{
    size_t len = strlen(message);
    while (len > 0 && (message[len - 1] == '\n' || message[len - 1] == '\r'))
        len--;
    log_debug("postgres: %.*s", (int)len, message);
}

db_conn *db_conn_create(const db_settings *s)
{
    db_conn *c = mem_calloc(1, sizeof *c);
    c->url = mem_strdup(s->url);
    c->application_name = mem_strdup(s->application_name ? s->application_name : "store-svc");
    c->connect_timeout_s = s->connect_timeout_s > 0 ? s->connect_timeout_s : 5;
    c->statement_timeout_ms = s->statement_timeout_ms;
    c->prepare = s->prepare;
    c->mx = s->metrics;
    return c;
}

void db_conn_close(db_conn *c)
{
    if (c->pg != NULL) {
        PQfinish(c->pg);
        c->pg = NULL;
    }
    c->where[0] = '\0';
}

void db_conn_destroy(db_conn **cp)
{
    db_conn *c = *cp;
    if (c == NULL)
        return;
    *cp = NULL;
    db_conn_close(c);
    mem_free(c->url);
    mem_free(c->application_name);
    mem_free(c);
}

int db_conn_connect(db_conn *c)
{
    char timeout[16], stmt_timeout[32];
    PGresult *res = NULL;
    int rc = DB_EUNAVAIL;

    db_conn_close(c);
    snprintf(timeout, sizeof timeout, "%d", c->connect_timeout_s);
    /* Our defaults come before the URL so that anything the URL says
     * (sslmode, connect_timeout, keepalives...) wins. TCP keepalives and
     * tcp_user_timeout make a dead peer or an idle-reaped connection (cloud
     * NATs, poolers) fail a statement within about a minute instead of
     * hanging a worker for the kernel's default of hours. */
    const char *keys[] = {"connect_timeout",  "keepalives",
                          "keepalives_idle",  "keepalives_interval",
                          "keepalives_count", "tcp_user_timeout",
                          "application_name", "client_encoding",
                          "dbname",           NULL};
    const char *vals[] = {timeout, "1",    "30", "10", "3", "30000", c->application_name,
                          "UTF8",  c->url, NULL};
    c->pg = PQconnectdbParams(keys, vals, 1);
    if (c->pg == NULL) {
        set_err(c, "out of memory creating a connection");
        goto out;
    }
    if (PQstatus(c->pg) != CONNECTION_OK) {
        set_err(c, "%s", PQerrorMessage(c->pg));
        goto out;
    }
    PQsetNoticeProcessor(c->pg, on_notice, NULL);
    /* Session settings as parameters, not in the startup packet: poolers
     * (PgBouncer, Supavisor) refuse unknown startup options. UTC so that
     * nothing depends on the server's TimeZone. */
    snprintf(stmt_timeout, sizeof stmt_timeout, "%d", c->statement_timeout_ms);
    const char *params[] = {stmt_timeout};
    /* Generic plans: the store's statements are planned once per
     * connection. Left to choose, PostgreSQL re-plans the group append
     * (arrays of unknown length) on every execution, which costs more than
     * running it. */
    res = PQexecParams(c->pg,
                       "SELECT set_config('statement_timeout', $1, false), "
                       "set_config('TimeZone', 'UTC', false), "
                       "set_config('plan_cache_mode', 'force_generic_plan', false)",
                       1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        set_err(c, "setting statement_timeout: %s", PQerrorMessage(c->pg));
        goto out;
    }
    snprintf(c->where, sizeof c->where, "%s:%s/%s", PQhost(c->pg), PQport(c->pg), PQdb(c->pg));
    c->use_prepared = c->prepare;
    c->prepared = 0;
    c->err[0] = '\0';
    rc = 0;
out:
    PQclear(res);
    if (rc != 0)
        db_conn_close(c);
    return rc;
}

int db_conn_ok(db_conn *c)
{
    return c->pg != NULL && PQstatus(c->pg) == CONNECTION_OK &&
           PQtransactionStatus(c->pg) == PQTRANS_IDLE;
}

int db_conn_alive(db_conn *c)
{
    if (c->pg == NULL)
        return 0;
    /* libpq's socket is non-blocking underneath: this reads what arrived
     * (the "terminating connection" notice of a restart, or EOF) and marks
     * the connection bad, without waiting. */
    if (PQstatus(c->pg) == CONNECTION_OK && !PQconsumeInput(c->pg))
        set_err(c, "%s", PQerrorMessage(c->pg));
    if (!db_conn_ok(c)) {
        if (c->err[0] == '\0')
            set_err(c, "the connection was closed");
        db_conn_close(c);
        return 0;
    }
    return 1;
}

const char *db_conn_error(const db_conn *c)
{
    return c->err;
}

const char *db_conn_where(const db_conn *c)
{
    return c->where;
}

PGconn *db_conn_pg(db_conn *c)
{
    return c->pg;
}

/* SQLSTATEs after which the same statement may well succeed later. */
static int retryable_sqlstate(const char *state)
{
    static const char *const states[] = {
        "57P01", /* admin_shutdown: the server is restarting */
        "57P02", /* crash_shutdown */
        "57P03", /* cannot_connect_now: starting up or in recovery */
        "57014", /* query_canceled: statement_timeout */
        "40001", /* serialization_failure */
        "40P01", /* deadlock_detected */
        "55P03", /* lock_not_available */
        "25006", /* read_only_sql_transaction: a failover in progress */
        "53300", /* too_many_connections */
    };
    if (state == NULL)
        return 1; /* no SQLSTATE: the failure came from libpq (connection) */
    if (strncmp(state, "08", 2) == 0 || strncmp(state, "53", 2) == 0)
        return 1; /* connection exception, insufficient resources */
    for (size_t i = 0; i < sizeof states / sizeof states[0]; i++)
        if (strcmp(state, states[i]) == 0)
            return 1;
    return 0;
}

int db_conn_fail(db_conn *c, const PGresult *res, const char *what)
{
    const char *state = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *msg = res != NULL ? PQresultErrorMessage(res) : "";
    if (msg[0] == '\0' && c->pg != NULL)
        msg = PQerrorMessage(c->pg);
    set_err(c, "%s: %s%s%s", what, state != NULL ? state : "", state != NULL ? " " : "", msg);
    if (c->pg == NULL || PQstatus(c->pg) != CONNECTION_OK || retryable_sqlstate(state))
        return DB_EUNAVAIL;
    return DB_EQUERY;
}

/* Statement ids: the name each is prepared under on a connection. */
enum {
    ST_GET,
    ST_OPEN_INSERT,
    ST_OPEN_REOPEN,
    ST_END,
    ST_SAVE,
    ST_CLAIM,
    ST_CLAIM_GIVE_UP,
    ST_LIST_USER,
    ST_LIST_UNSUMMARIZED,
    ST_APPEND,
    ST_APPEND_GROUP,
    ST_LIST_EVENTS,
    ST_OPEN_RESUME,
    ST_KEEP_ALIVE,
    ST_END_ABANDONED,
    ST_N
};

/* Their label values in the metrics. */
static const char *const statement_names[ST_N] = {
    [ST_GET] = "get_session",
    [ST_OPEN_INSERT] = "open_session_insert",
    [ST_OPEN_REOPEN] = "open_session_reopen",
    [ST_END] = "end_session",
    [ST_SAVE] = "save_summary",
    [ST_CLAIM] = "claim_summary",
    [ST_CLAIM_GIVE_UP] = "claim_summary_give_up",
    [ST_LIST_USER] = "list_user_sessions",
    [ST_LIST_UNSUMMARIZED] = "list_unsummarized",
    [ST_APPEND] = "append_events",
    [ST_APPEND_GROUP] = "append_events_group",
    [ST_LIST_EVENTS] = "list_events",
    [ST_OPEN_RESUME] = "open_session_resume",
    [ST_KEEP_ALIVE] = "keep_sessions_alive",
    [ST_END_ABANDONED] = "end_abandoned_sessions",
};

#define DB_METRICS(X, S)                                                                           \
    X(S, seconds, HISTOGRAM_VEC, "convo_store_db_statement_seconds", "statement",                  \
      &metrics_buckets_seconds, "time of one database statement, by statement")                    \
    X(S, errors, COUNTER_VEC, "convo_store_db_errors_total", "statement,kind", NULL,               \
      "statements that failed, by statement and kind (unavailable: the connection or a timeout, "  \
      "retried by callers; query: refused by the server)")
METRICS_DECLARE(db_metrics_table, DB_METRICS)

struct db_metrics {
    metrics_histogram *seconds[ST_N];
    metrics_counter *unavailable[ST_N], *query[ST_N];
};

db_metrics *db_metrics_create(metrics *m)
{
    db_metrics_table t;
    if (m == NULL || metrics_register(m, METRICS_SECTION(db_metrics_table, &t)) != 0)
        return NULL;
    db_metrics *dm = mem_calloc(1, sizeof *dm);
    for (int i = 0; i < ST_N; i++) {
        dm->seconds[i] = metrics_histogram_of(t.seconds, (const char *[]){statement_names[i]});
        dm->unavailable[i] =
            metrics_counter_of(t.errors, (const char *[]){statement_names[i], "unavailable"});
        dm->query[i] = metrics_counter_of(t.errors, (const char *[]){statement_names[i], "query"});
    }
    return dm;
}

void db_metrics_destroy(db_metrics **dm)
{
    mem_free(*dm);
    *dm = NULL;
}

/* Prepares statement `id` on first use so that later executions skip
 * parsing and planning (most of the cost of a small batch). A server or
 * pooler that will not keep prepared statements (PgBouncer or Supavisor in
 * transaction mode) turns them off for the connection; the statement then
 * goes unnamed, as it would with --db-prepare=false. Returns 0, or an error
 * when the connection failed. */
static int prepare(db_conn *c, int id, const char *name, const char *what, const char *sql, int n,
                   const Oid *types)
{
    if (c->prepared & (1u << id))
        return 0;
    PGresult *p = PQprepare(c->pg, name, sql, n, types);
    int rc = 0;
    if (PQresultStatus(p) == PGRES_COMMAND_OK) {
        c->prepared |= 1u << id;
    } else if (PQstatus(c->pg) != CONNECTION_OK) {
        rc = db_conn_fail(c, p, what);
    } else {
        log_warn("preparing %s failed (%s); using unnamed statements on this connection", what,
                 PQresultErrorMessage(p));
        c->use_prepared = 0;
    }
    PQclear(p);
    return rc;
}

/* Runs one parameterized statement. Returns its result (caller PQclears) or
 * NULL with *rc set. */
static PGresult *exec(db_conn *c, int id, const char *what, const char *sql, int n,
                      const Oid *types, const char *const *vals, const int *lens, const int *fmts,
                      int *rc)
{
    char name[16];
    PGresult *res = NULL;
    uint64_t t0 = c->mx != NULL ? metrics_now_us() : 0;
    if (c->pg == NULL) {
        set_err(c, "%s: not connected", what);
        *rc = DB_EUNAVAIL;
        return NULL;
    }
    snprintf(name, sizeof name, "convo_%d", id);
    if (c->use_prepared && (*rc = prepare(c, id, name, what, sql, n, types)) != 0)
        return NULL;
    if (c->use_prepared) {
        res = PQexecPrepared(c->pg, name, n, vals, lens, fmts, 0);
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        if (state != NULL && strcmp(state, "26000") == 0) {
            /* "prepared statement does not exist": a transaction pooler
             * gave us another server connection. It did not run. */
            log_warn("prepared statements do not survive on this connection (a transaction "
                     "pooler?); using unnamed statements");
            c->use_prepared = 0;
            PQclear(res);
            res = NULL;
        }
    }
    if (res == NULL && !c->use_prepared)
        res = PQexecParams(c->pg, sql, n, types, vals, lens, fmts, 0);
    ExecStatusType st = PQresultStatus(res);
    if (c->mx != NULL)
        metrics_histogram_observe(c->mx->seconds[id], metrics_now_us() - t0);
    if (res != NULL && (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK)) {
        *rc = 0;
        return res;
    }
    *rc = db_conn_fail(c, res, what);
    if (c->mx != NULL)
        metrics_counter_inc(*rc == DB_EUNAVAIL ? c->mx->unavailable[id] : c->mx->query[id]);
    PQclear(res);
    return NULL;
}

static int64_t get_i64(const PGresult *r, int row, int col)
{
    return strtoll(PQgetvalue(r, row, col), NULL, 10);
}

static int get_bool(const PGresult *r, int row, int col)
{
    return PQgetvalue(r, row, col)[0] == 't';
}

static void fmt_i64(char *buf, size_t size, int64_t v)
{
    snprintf(buf, size, "%lld", (long long)v);
}

/* ---- sessions ------------------------------------------------------------- */

/* Every statement that returns sessions returns these columns, in this
 * order (session_from_row). Times leave the database as microseconds since
 * the epoch; extract() is exact (numeric) on PostgreSQL 14 and later. */
#define SESSION_COLS                                                                               \
    "session_id, user_id, (extract(epoch FROM start_time) * 1000000)::int8, "                      \
    "COALESCE((extract(epoch FROM end_time) * 1000000)::int8, 0), COALESCE(duration_seconds, 0), " \
    "COALESCE(final_summary, ''), summary_status, COALESCE(summary_error, ''), "                   \
    "summary_attempts, event_count, last_seq, user_message_count, tool_call_count, writer_epoch"

static void session_from_row(const PGresult *r, int row, db_session *s)
{
    s->session_id = mem_strdup(PQgetvalue(r, row, 0));
    s->user_id = mem_strdup(PQgetvalue(r, row, 1));
    s->start_time_us = get_i64(r, row, 2);
    s->end_time_us = get_i64(r, row, 3);
    s->duration_seconds = (int32_t)get_i64(r, row, 4);
    s->final_summary = mem_strdup(PQgetvalue(r, row, 5));
    s->summary_status = summary_parse(PQgetvalue(r, row, 6));
    s->summary_error = mem_strdup(PQgetvalue(r, row, 7));
    s->summary_attempts = (int32_t)get_i64(r, row, 8);
    s->event_count = get_i64(r, row, 9);
    s->last_seq = get_i64(r, row, 10);
    s->user_message_count = get_i64(r, row, 11);
    s->tool_call_count = get_i64(r, row, 12);
    s->writer_epoch = get_i64(r, row, 13);
}

void db_session_clear(db_session *s)
{
    mem_free(s->session_id);
    mem_free(s->user_id);
    mem_free(s->final_summary);
    mem_free(s->summary_error);
    memset(s, 0, sizeof *s);
}

void db_sessions_free(db_session **ss, size_t n)
{
    if (*ss == NULL)
        return;
    for (size_t i = 0; i < n; i++)
        db_session_clear(&(*ss)[i]);
    mem_free(*ss);
    *ss = NULL;
}

/* Runs a statement returning zero or one session row. Returns 0 with *found
 * set, or an error. */
static int one_session(db_conn *c, int id, const char *what, const char *sql, int n,
                       const char *const *vals, db_session *out, int *found)
{
    int rc;
    PGresult *r = exec(c, id, what, sql, n, NULL, vals, NULL, NULL, &rc);
    *found = 0;
    if (r == NULL)
        return rc;
    if (PQntuples(r) > 0) {
        db_session_clear(out);
        session_from_row(r, 0, out);
        *found = 1;
    }
    PQclear(r);
    return 0;
}

int db_get_session(db_conn *c, const char *session_id, db_session *out)
{
    const char *vals[] = {session_id};
    int found, rc = one_session(c, ST_GET, "GetSession",
                                "SELECT " SESSION_COLS " FROM sessions WHERE session_id = $1", 1,
                                vals, out, &found);
    if (rc != 0)
        return rc;
    return found ? 0 : DB_ENOTFOUND;
}

/* The live_until a session opened or kept alive with $3 seconds gets:
 * none for 0 (only EndSession ends it). */
#define LIVE_UNTIL "CASE WHEN $3::int4 > 0 THEN now() + $3::int4 * interval '1 second' END"

/* A new writer ($4 = 0) moves the epoch on; a writer naming its own keeps
 * it, and only while it is still the session's. */
#define NEXT_EPOCH                                                                                 \
    "writer_epoch = CASE WHEN $4::int8 = 0 THEN writer_epoch + 1 ELSE writer_epoch END"
#define SAME_WRITER "($4::int8 = 0 OR writer_epoch = $4::int8)"

int db_open_session(db_conn *c, const char *session_id, const char *user_id, int32_t live_seconds,
                    int64_t epoch, db_session *out, int *created)
{
    char live[16], ep[24];
    snprintf(live, sizeof live, "%d", (int)live_seconds);
    fmt_i64(ep, sizeof ep, epoch);
    const char *vals[] = {session_id, user_id, live, ep};
    int found, rc;
    *created = 0;
    /* A session deleted or ended between the steps sends us round again; a
     * few rounds are plenty (each step is a fresh snapshot). */
    for (int round = 0; round < 3; round++) {
        rc = one_session(c, ST_OPEN_INSERT, "OpenSession(insert)",
                         "INSERT INTO sessions (session_id, user_id, summary_status, live_until, "
                         "writer_epoch) VALUES ($1, $2, 'none', " LIVE_UNTIL
                         ", 1) ON CONFLICT (session_id) DO NOTHING "
                         "RETURNING " SESSION_COLS,
                         3, vals, out, &found);
        if (rc != 0)
            return rc;
        if (found) {
            *created = 1;
            return 0;
        }
        /* It exists. Resuming an ended session of the same user reopens
         * it: a client that reconnects keeps appending, and the summary is
         * redone over everything when it ends again. */
        rc = one_session(c, ST_OPEN_REOPEN, "OpenSession(reopen)",
                         "UPDATE sessions SET end_time = NULL, duration_seconds = NULL, "
                         "summary_status = 'none', summary_error = NULL, summary_attempts = 0, "
                         "summary_lease_owner = NULL, summary_lease_until = NULL, "
                         "live_until = " LIVE_UNTIL ", " NEXT_EPOCH " "
                         "WHERE session_id = $1 AND user_id = $2 AND end_time IS NOT NULL "
                         "AND " SAME_WRITER " RETURNING " SESSION_COLS,
                         4, vals, out, &found);
        if (rc != 0 || found)
            return rc;
        /* Live: its new writer (a resume on another gateway, say) takes it
         * over, and keeps it open from now on. The row lock orders this
         * after any append of the writer before: last_seq counts them, and
         * the appends after it see the new epoch. */
        rc = one_session(c, ST_OPEN_RESUME, "OpenSession(resume)",
                         "UPDATE sessions SET live_until = CASE WHEN $3::int4 > 0 THEN now() + "
                         "$3::int4 * interval '1 second' ELSE live_until END, " NEXT_EPOCH " "
                         "WHERE session_id = $1 AND user_id = $2 AND end_time IS NULL "
                         "AND " SAME_WRITER " RETURNING " SESSION_COLS,
                         4, vals, out, &found);
        if (rc != 0 || found)
            return rc;
        rc = db_get_session(c, session_id, out);
        if (rc == DB_ENOTFOUND)
            continue;
        if (rc != 0)
            return rc;
        if (strcmp(out->user_id, user_id) != 0)
            return DB_EOWNER;
        if (epoch != 0 && out->writer_epoch != epoch)
            return DB_ESTALE;
        /* Ended or reopened between the steps: once more. */
    }
    set_err(c, "OpenSession: the session kept changing under it");
    return DB_EUNAVAIL;
}

int db_end_session(db_conn *c, const char *session_id, const char *user_id, int64_t epoch,
                   int64_t end_us, db_session *out)
{
    char ts[24], ep[24];
    fmt_i64(ts, sizeof ts, end_us);
    fmt_i64(ep, sizeof ep, epoch);
    const char *vals[] = {session_id, ts, user_id, ep};
    int found;
    /* Only a live session of this user changes; ending it again is
     * answered from a plain read (no new row version), another user's is
     * refused. A client clock behind the start gives a duration of 0, not a
     * negative one. */
    int rc = one_session(
        c, ST_END, "EndSession",
        "UPDATE sessions SET end_time = t.ts, "
        "duration_seconds = GREATEST(0, floor(extract(epoch FROM (t.ts - start_time))))::int4, "
        "summary_status = 'pending', summary_error = NULL, live_until = NULL "
        /* 0 means now; otherwise microseconds since the epoch, exactly (a
         * double through to_timestamp() would lose the last microsecond). */
        "FROM (SELECT CASE WHEN $2::int8 = 0 THEN now() ELSE 'epoch'::timestamptz + "
        "$2::int8 * interval '1 microsecond' END AS ts) t "
        "WHERE session_id = $1 AND user_id = $3 AND end_time IS NULL "
        "AND ($4::int8 = 0 OR writer_epoch = $4::int8) RETURNING " SESSION_COLS,
        4, vals, out, &found);
    if (rc != 0 || found)
        return rc;
    rc = db_get_session(c, session_id, out);
    if (rc == 0 && strcmp(out->user_id, user_id) != 0)
        return DB_EOWNER;
    if (rc == 0 && epoch != 0 && out->writer_epoch != epoch)
        return DB_ESTALE;
    return rc;
}

static const char *summary_name(int status)
{
    return status >= DB_SUMMARY_NONE && status <= DB_SUMMARY_FAILED ? summary_names[status] : NULL;
}

int db_save_summary(db_conn *c, const char *session_id, int status, const char *summary,
                    const char *error, const char *worker_id, db_session *out)
{
    const char *name = summary_name(status);
    if (name == NULL || status == DB_SUMMARY_NONE) {
        set_err(c, "SaveSummary: bad status %d", status);
        return DB_EQUERY;
    }
    const char *vals[] = {session_id, name, summary, error, worker_id};
    int found;
    int rc = one_session(c, ST_SAVE, "SaveSummary",
                         "UPDATE sessions SET "
                         "final_summary = CASE WHEN $2 = 'done' THEN $3 ELSE final_summary END, "
                         "summary_status = $2, "
                         "summary_error = CASE WHEN $2 = 'done' THEN NULL ELSE $4 END, "
                         "summary_lease_owner = NULL, summary_lease_until = NULL "
                         "WHERE session_id = $1 AND summary_lease_owner = $5 "
                         "AND summary_lease_until > now() RETURNING " SESSION_COLS,
                         5, vals, out, &found);
    if (rc != 0 || found)
        return rc;
    rc = db_get_session(c, session_id, out);
    return rc != 0 ? rc : DB_ELEASE;
}

/* One conditional UPDATE: the row lock makes concurrent claims queue, and
 * each re-checks the lease after the one before it committed, so two
 * workers never both get it. The same worker may claim again (a new
 * attempt). */
static const char claim_sql[] =
    "UPDATE sessions SET summary_lease_owner = $2, "
    "summary_lease_until = now() + $3::int4 * interval '1 second', "
    "summary_attempts = summary_attempts + 1 "
    "WHERE session_id = $1 AND end_time IS NOT NULL AND summary_status = 'pending' "
    "AND ($4::int4 = 0 OR summary_attempts < $4::int4) "
    "AND (summary_lease_owner IS NULL OR summary_lease_until IS NULL "
    "OR summary_lease_until <= now() OR summary_lease_owner = $2) "
    "RETURNING " SESSION_COLS;

/* The lease of a worker that records that the attempts ran out: no attempt
 * is counted, and only when they did. */
static const char claim_give_up_sql[] =
    "UPDATE sessions SET summary_lease_owner = $2, "
    "summary_lease_until = now() + $3::int4 * interval '1 second' "
    "WHERE session_id = $1 AND end_time IS NOT NULL AND summary_status = 'pending' "
    "AND $4::int4 > 0 AND summary_attempts >= $4::int4 "
    "AND (summary_lease_owner IS NULL OR summary_lease_until IS NULL "
    "OR summary_lease_until <= now() OR summary_lease_owner = $2) "
    "RETURNING " SESSION_COLS;

int db_claim_summary(db_conn *c, const char *session_id, const char *worker_id,
                     int32_t lease_seconds, int32_t max_attempts, int give_up, db_session *out,
                     int *claimed)
{
    char lease[16], max[16];
    snprintf(lease, sizeof lease, "%d", (int)lease_seconds);
    snprintf(max, sizeof max, "%d", (int)max_attempts);
    const char *vals[] = {session_id, worker_id, lease, max};
    int found, rc;
    if (give_up)
        rc = one_session(c, ST_CLAIM_GIVE_UP, "ClaimSummary(give_up)", claim_give_up_sql, 4, vals,
                         out, &found);
    else
        rc = one_session(c, ST_CLAIM, "ClaimSummary", claim_sql, 4, vals, out, &found);
    *claimed = 0;
    if (rc != 0)
        return rc;
    if (found) {
        *claimed = 1;
        return 0;
    }
    return db_get_session(c, session_id, out);
}

static int many_sessions(db_conn *c, int id, const char *what, const char *sql, int n,
                         const char *const *vals, db_session **out, size_t *count)
{
    int rc;
    *out = NULL;
    *count = 0;
    PGresult *r = exec(c, id, what, sql, n, NULL, vals, NULL, NULL, &rc);
    if (r == NULL)
        return rc;
    size_t rows = (size_t)PQntuples(r);
    if (rows > 0) {
        *out = mem_calloc(rows, sizeof **out);
        for (size_t i = 0; i < rows; i++)
            session_from_row(r, (int)i, &(*out)[i]);
    }
    *count = rows;
    PQclear(r);
    return 0;
}

int db_list_user_sessions(db_conn *c, const char *user_id, uint32_t limit, const char *exclude,
                          int64_t before_us, const char *before_id, db_session **out, size_t *n)
{
    char lim[16], before[32];
    snprintf(lim, sizeof lim, "%u", limit);
    fmt_i64(before, sizeof before, before_us);
    const char *vals[] = {user_id, exclude, lim, before, before_id};
    /* The cursor is a row of the previous page: its time exactly (the
     * microseconds the store handed out) and its id break ties. */
    return many_sessions(c, ST_LIST_USER, "ListUserSessions",
                         "SELECT " SESSION_COLS " FROM sessions WHERE user_id = $1 "
                         "AND session_id <> $2 AND ($4::int8 = 0 OR (start_time, session_id) < "
                         "('epoch'::timestamptz + $4::int8 * interval '1 microsecond', $5)) "
                         "ORDER BY start_time DESC, session_id DESC LIMIT $3::int8",
                         5, vals, out, n);
}

int db_list_unsummarized(db_conn *c, uint32_t limit, int64_t ended_before_us, int32_t max_attempts,
                         db_session **out, size_t *n)
{
    char lim[16], before[24], max[16];
    snprintf(lim, sizeof lim, "%u", limit);
    fmt_i64(before, sizeof before, ended_before_us);
    snprintf(max, sizeof max, "%d", (int)max_attempts);
    const char *vals[] = {lim, before, max};
    /* Served by the partial index on end_time WHERE summary_status =
     * 'pending' (migration 2). */
    return many_sessions(c, ST_LIST_UNSUMMARIZED, "ListUnsummarizedSessions",
                         "SELECT " SESSION_COLS " FROM sessions "
                         "WHERE summary_status = 'pending' AND end_time IS NOT NULL "
                         "AND (summary_lease_until IS NULL OR summary_lease_until <= now()) "
                         "AND ($2::int8 = 0 OR end_time < 'epoch'::timestamptz + "
                         "$2::int8 * interval '1 microsecond') "
                         "AND ($3::int4 = 0 OR summary_attempts < $3::int4) "
                         "ORDER BY end_time, session_id LIMIT $1::int8",
                         3, vals, out, n);
}

/* ---- event batches ------------------------------------------------------- */

/* A PostgreSQL binary array value: a 20-byte header (ndim 1, no nulls, the
 * element type, the length, lower bound 1) then per element its length
 * (int32, network order) and bytes. The header is filled in when sent. */
typedef struct arr {
    char *data;
    size_t len, cap;
} arr;

#define ARR_HEADER 20

static void arr_init(arr *a, size_t cap)
{
    a->cap = cap < ARR_HEADER + 64 ? ARR_HEADER + 64 : cap;
    a->data = mem_alloc(a->cap);
    a->len = ARR_HEADER;
}

static void arr_put(arr *a, const void *p, size_t n)
{
    if (a->len + n > a->cap) {
        while (a->len + n > a->cap)
            a->cap *= 2;
        a->data = mem_realloc(a->data, a->cap);
    }
    memcpy(a->data + a->len, p, n);
    a->len += n;
}

static void arr_put_u32(arr *a, uint32_t v)
{
    v = htonl(v);
    arr_put(a, &v, 4);
}

static void arr_put_i64(arr *a, int64_t v)
{
    uint64_t u = (uint64_t)v;
    uint32_t hi = htonl((uint32_t)(u >> 32)), lo = htonl((uint32_t)u);
    arr_put_u32(a, 8);
    arr_put(a, &hi, 4);
    arr_put(a, &lo, 4);
}

static void arr_header(const arr *a, uint32_t elem_oid, uint32_t n)
{
    uint32_t h[5] = {htonl(1), htonl(0), htonl(elem_oid), htonl(n), htonl(1)};
    memcpy(a->data, h, sizeof h);
}

/* ---- keeping sessions alive ----------------------------------------------- */

int db_keep_alive(db_conn *c, const char *const *ids, size_t n, int32_t live_seconds,
                  uint32_t *kept)
{
    arr a;
    size_t bytes = ARR_HEADER;
    for (size_t i = 0; i < n; i++)
        bytes += 4 + strlen(ids[i]);
    arr_init(&a, bytes);
    for (size_t i = 0; i < n; i++) {
        arr_put_u32(&a, (uint32_t)strlen(ids[i]));
        arr_put(&a, ids[i], strlen(ids[i]));
    }
    arr_header(&a, OID_TEXT, (uint32_t)n);
    char live[16];
    snprintf(live, sizeof live, "%d", (int)live_seconds);
    const Oid types[] = {OID_TEXT_ARRAY, OID_INT4};
    const char *vals[] = {a.data, live};
    const int lens[] = {(int)a.len, 0};
    const int fmts[] = {1, 0};
    int rc;
    *kept = 0;
    /* Only sessions opened with a lease: one opened without it is ended by
     * EndSession alone, whoever keeps it. */
    PGresult *r = exec(c, ST_KEEP_ALIVE, "KeepSessionsAlive",
                       "UPDATE sessions SET live_until = now() + $2::int4 * interval '1 second' "
                       "WHERE session_id = ANY($1::text[]) AND end_time IS NULL "
                       "AND live_until IS NOT NULL",
                       2, types, vals, lens, fmts, &rc);
    mem_free(a.data);
    if (r == NULL)
        return rc;
    *kept = (uint32_t)strtoul(PQcmdTuples(r), NULL, 10);
    PQclear(r);
    return 0;
}

int db_end_abandoned(db_conn *c, uint32_t limit, char ***ids, size_t *n)
{
    char lim[16];
    snprintf(lim, sizeof lim, "%u", limit);
    const char *vals[] = {lim};
    int rc;
    *ids = NULL;
    *n = 0;
    /* The oldest expired first (the partial index of migration 4), locked
     * and skipped when another replica ends them at the same time; each
     * ends at its last event (its start when it has none), as EndSession
     * would have ended it then. */
    PGresult *r = exec(
        c, ST_END_ABANDONED, "EndAbandonedSessions",
        "WITH a AS (SELECT s.session_id, COALESCE((SELECT e.\"timestamp\" FROM session_events e "
        "WHERE e.session_id = s.session_id ORDER BY e.seq DESC LIMIT 1), s.start_time) AS ts "
        "FROM sessions s WHERE s.end_time IS NULL AND s.live_until < now() "
        "ORDER BY s.live_until LIMIT $1::int8 FOR UPDATE OF s SKIP LOCKED) "
        "UPDATE sessions s SET end_time = a.ts, duration_seconds = "
        "GREATEST(0, floor(extract(epoch FROM (a.ts - s.start_time))))::int4, "
        "summary_status = 'pending', summary_error = NULL, live_until = NULL "
        "FROM a WHERE s.session_id = a.session_id RETURNING s.session_id",
        1, NULL, vals, NULL, NULL, &rc);
    if (r == NULL)
        return rc;
    *n = (size_t)PQntuples(r);
    *ids = mem_calloc(*n ? *n : 1, sizeof **ids);
    for (size_t i = 0; i < *n; i++)
        (*ids)[i] = mem_strdup(PQgetvalue(r, (int)i, 0));
    PQclear(r);
    return 0;
}

struct db_batch {
    size_t n;
    arr seq, type, content, ts;
};

db_batch *db_batch_create(size_t nevents, size_t content_bytes)
{
    db_batch *b = mem_calloc(1, sizeof *b);
    arr_init(&b->seq, ARR_HEADER + nevents * 12);
    arr_init(&b->type, ARR_HEADER + nevents * 8);
    arr_init(&b->content, ARR_HEADER + nevents * 4 + content_bytes);
    arr_init(&b->ts, ARR_HEADER + nevents * 12);
    return b;
}

void db_batch_add(db_batch *b, int64_t seq, int type, const char *content, size_t len,
                  int64_t ts_us)
{
    arr_put_i64(&b->seq, seq);
    arr_put_u32(&b->type, 4);
    arr_put_u32(&b->type, (uint32_t)type);
    arr_put_u32(&b->content, (uint32_t)len);
    arr_put(&b->content, content, len);
    arr_put_i64(&b->ts, ts_us);
    b->n++;
}

size_t db_batch_bytes(const db_batch *b)
{
    return sizeof *b + b->seq.cap + b->type.cap + b->content.cap + b->ts.cap;
}

void db_batch_destroy(db_batch **bp)
{
    db_batch *b = *bp;
    if (b == NULL)
        return;
    *bp = NULL;
    mem_free(b->seq.data);
    mem_free(b->type.data);
    mem_free(b->content.data);
    mem_free(b->ts.data);
    mem_free(b);
}

/* One statement, so one transaction: lock the session row (serializing
 * writers of one session and seeing a concurrent EndSession or OpenSession:
 * FOR UPDATE reads the row's latest version), check its owner ($6) and
 * writer epoch ($7, 0: not checked), insert the rows not stored yet in seq
 * order (event_id then follows seq too), and bump the session's counters by
 * what was really inserted. Rows come as four binary arrays unnested side
 * by side: one round trip and one plan for any batch size.
 *
 * A seq stored already is a retry when the stored row is the same, a
 * conflict when not. ON CONFLICT DO UPDATE ... WHERE (not DO NOTHING) sees
 * the stored row as committed, even one written after this statement's
 * snapshot, which a separate read would miss; it rewrites the row unchanged
 * only when it differs, and RETURNING shows those with xmax set (a fresh
 * insert has none), so they are counted and never stored over. */
#define APPEND_INSERT_TAIL                                                                         \
    "ON CONFLICT (session_id, seq) DO UPDATE SET event_type = session_events.event_type "          \
    "WHERE (session_events.event_type, session_events.content) IS DISTINCT FROM "                  \
    "(EXCLUDED.event_type, EXCLUDED.content) "

static const char append_sql[] =
    "WITH s AS (SELECT end_time IS NOT NULL AS ended, last_seq, user_id = $6 AS mine, "
    "($7::int8 <> 0 AND writer_epoch <> $7::int8) AS stale "
    "FROM sessions WHERE session_id = $1 FOR UPDATE), "
    "e AS (SELECT * FROM unnest($2::int8[], $3::int4[], $4::text[], $5::int8[]) "
    "AS e(seq, t, content, ts)), "
    "ins AS (INSERT INTO session_events (session_id, seq, event_type, content, \"timestamp\") "
    "SELECT $1, e.seq, (ARRAY['user_message','ai_token','tool_call','tool_result',"
    "'system_event'])[e.t], e.content, "
    "CASE WHEN e.ts = 0 THEN now() ELSE 'epoch'::timestamptz + e.ts * interval '1 microsecond' "
    "END FROM e WHERE EXISTS (SELECT 1 FROM s WHERE NOT s.ended AND s.mine AND NOT s.stale) "
    "ORDER BY e.seq " APPEND_INSERT_TAIL "RETURNING seq, event_type, xmax = 0 AS fresh), "
    "agg AS (SELECT count(*) FILTER (WHERE fresh) AS n, "
    "COALESCE(max(seq) FILTER (WHERE fresh), 0) AS max_seq, "
    "count(*) FILTER (WHERE fresh AND event_type = 'user_message') AS um, "
    "count(*) FILTER (WHERE fresh AND event_type = 'tool_call') AS tc, "
    "count(*) FILTER (WHERE NOT fresh) AS conflicts FROM ins), "
    "upd AS (UPDATE sessions SET last_seq = GREATEST(last_seq, agg.max_seq), "
    "event_count = event_count + agg.n, user_message_count = user_message_count + agg.um, "
    "tool_call_count = tool_call_count + agg.tc FROM agg "
    "WHERE session_id = $1 AND agg.n > 0 RETURNING last_seq) "
    "SELECT (SELECT count(*) FROM s), COALESCE((SELECT ended FROM s), false), "
    "(SELECT n FROM agg), "
    "COALESCE((SELECT last_seq FROM upd), (SELECT last_seq FROM s), 0), "
    "CASE WHEN (SELECT ended AND mine FROM s) THEN (SELECT count(*) FROM session_events "
    "WHERE session_id = $1 AND seq = ANY($2::int8[])) ELSE 0 END, "
    "COALESCE((SELECT mine FROM s), false), COALESCE((SELECT stale FROM s), false), "
    "(SELECT conflicts FROM agg)";

/* What a call's result row says, as db_append_events answers it. */
static int append_outcome(uint32_t n, int found, int mine, int stale, int ended, int64_t appended,
                          int64_t conflicts, int64_t stored, db_append_result *out)
{
    if (!found)
        return DB_ENOTFOUND;
    if (!mine || stale) {
        out->last_seq = 0; /* nothing about another user's or writer's session */
        return !mine ? DB_EOWNER : DB_ESTALE;
    }
    if (ended) {
        /* A retry of a batch that made it before the end is still a
         * success; anything new is refused. */
        if (stored != (int64_t)n)
            return DB_EENDED;
        out->duplicates = n;
        return 0;
    }
    out->appended = (uint32_t)appended;
    out->conflicts = (uint32_t)conflicts;
    out->duplicates = n - (uint32_t)appended - (uint32_t)conflicts;
    return 0;
}

int db_append_events(db_conn *c, const char *session_id, const char *user_id, int64_t epoch,
                     const db_batch *b, db_append_result *out)
{
    uint32_t n = (uint32_t)b->n;
    char ep[24];
    fmt_i64(ep, sizeof ep, epoch);
    arr_header(&b->seq, OID_INT8, n);
    arr_header(&b->type, OID_INT4, n);
    arr_header(&b->content, OID_TEXT, n);
    arr_header(&b->ts, OID_INT8, n);
    const Oid types[] = {OID_TEXT,       OID_INT8_ARRAY, OID_INT4_ARRAY, OID_TEXT_ARRAY,
                         OID_INT8_ARRAY, OID_TEXT,       OID_INT8};
    const char *vals[] = {session_id, b->seq.data, b->type.data, b->content.data, b->ts.data,
                          user_id,    ep};
    const int lens[] = {
        0, (int)b->seq.len, (int)b->type.len, (int)b->content.len, (int)b->ts.len, 0, 0};
    const int fmts[] = {0, 1, 1, 1, 1, 0, 0};
    int rc;

    memset(out, 0, sizeof *out);
    PGresult *r = exec(c, ST_APPEND, "AppendEvents", append_sql, 7, types, vals, lens, fmts, &rc);
    if (r == NULL)
        return rc;
    int found = get_i64(r, 0, 0) > 0;
    int ended = get_bool(r, 0, 1);
    int64_t appended = get_i64(r, 0, 2);
    out->last_seq = get_i64(r, 0, 3);
    int64_t stored = get_i64(r, 0, 4);
    int mine = get_bool(r, 0, 5);
    int stale = get_bool(r, 0, 6);
    int64_t conflicts = get_i64(r, 0, 7);
    PQclear(r);
    return append_outcome(n, found, mine, stale, ended, appended, conflicts, stored, out);
}

/* The group form of append_sql: $1 the calls' session ids, $2 their users
 * and $8 their writer epochs, then per event the (1-based) call it belongs
 * to, its seq, type, content and time. The sessions are locked in
 * session_id order (the Sort under LockRows), a call's rows go in only when
 * its session is live, its user's and its writer's (each call checked on
 * its own: a stale one writes nothing and fails alone), by call then seq,
 * counters move by what each session really got, and one row per call
 * comes back, in call order. */
static const char append_group_sql[] =
    "WITH s AS MATERIALIZED (SELECT session_id, user_id, end_time IS NOT NULL AS ended, last_seq, "
    "writer_epoch FROM sessions WHERE session_id = ANY($1::text[]) ORDER BY session_id "
    "FOR UPDATE), "
    "c AS (SELECT c.sid, c.i, s.session_id IS NOT NULL AS found, "
    "COALESCE(s.ended, false) AS ended, COALESCE(s.user_id = ($2::text[])[c.i], false) AS mine, "
    "COALESCE(($8::int8[])[c.i] <> 0 AND s.writer_epoch <> ($8::int8[])[c.i], false) AS stale, "
    "s.last_seq "
    "FROM unnest($1::text[]) WITH ORDINALITY AS c(sid, i) LEFT JOIN s ON s.session_id = c.sid), "
    "e AS (SELECT * FROM unnest($3::int4[], $4::int8[], $5::int4[], $6::text[], $7::int8[]) "
    "AS e(call, seq, t, content, ts)), "
    "ins AS (INSERT INTO session_events (session_id, seq, event_type, content, \"timestamp\") "
    "SELECT c.sid, e.seq, (ARRAY['user_message','ai_token','tool_call','tool_result',"
    "'system_event'])[e.t], e.content, "
    "CASE WHEN e.ts = 0 THEN now() ELSE 'epoch'::timestamptz + e.ts * interval '1 microsecond' "
    "END FROM e JOIN c ON c.i = e.call WHERE c.found AND c.mine AND NOT c.stale AND NOT c.ended "
    "ORDER BY e.call, e.seq " APPEND_INSERT_TAIL
    "RETURNING session_id, seq, event_type, xmax = 0 AS fresh), "
    "agg AS (SELECT session_id, count(*) FILTER (WHERE fresh) AS n, "
    "max(seq) FILTER (WHERE fresh) AS max_seq, "
    "count(*) FILTER (WHERE fresh AND event_type = 'user_message') AS um, "
    "count(*) FILTER (WHERE fresh AND event_type = 'tool_call') AS tc, "
    "count(*) FILTER (WHERE NOT fresh) AS conflicts FROM ins GROUP BY session_id), "
    "upd AS (UPDATE sessions x SET last_seq = GREATEST(x.last_seq, agg.max_seq), "
    "event_count = x.event_count + agg.n, user_message_count = x.user_message_count + agg.um, "
    "tool_call_count = x.tool_call_count + agg.tc FROM agg "
    "WHERE x.session_id = agg.session_id AND agg.n > 0 RETURNING x.session_id, x.last_seq) "
    "SELECT c.found, c.mine, c.ended, COALESCE(agg.n, 0), COALESCE(upd.last_seq, c.last_seq, 0), "
    "CASE WHEN c.ended AND c.mine THEN (SELECT count(*) FROM session_events x "
    "WHERE x.session_id = c.sid AND x.seq = ANY(ARRAY(SELECT e.seq FROM e WHERE e.call = c.i))) "
    "ELSE 0 END, c.stale, COALESCE(agg.conflicts, 0) "
    "FROM c LEFT JOIN agg ON agg.session_id = c.sid LEFT JOIN upd ON upd.session_id = c.sid "
    "ORDER BY c.i";

/* The elements of one batch's array (after its header), appended to a. */
static void arr_append(arr *a, const arr *from)
{
    arr_put(a, from->data + ARR_HEADER, from->len - ARR_HEADER);
}

static void arr_put_text(arr *a, const char *s)
{
    size_t len = strlen(s);
    arr_put_u32(a, (uint32_t)len);
    arr_put(a, s, len);
}

#define GROUP_PARAMS 8

int db_append_group(db_conn *c, db_append_call *calls, size_t n)
{
    size_t events = 0, content = 0;
    for (size_t i = 0; i < n; i++) {
        events += calls[i].batch->n;
        content += calls[i].batch->content.len;
    }
    arr sids, users, call, seq, type, text, ts, epochs;
    arr_init(&sids, ARR_HEADER + n * 64);
    arr_init(&epochs, ARR_HEADER + n * 12);
    arr_init(&users, ARR_HEADER + n * 64);
    arr_init(&call, ARR_HEADER + events * 8);
    arr_init(&seq, ARR_HEADER + events * 12);
    arr_init(&type, ARR_HEADER + events * 8);
    arr_init(&text, ARR_HEADER + content);
    arr_init(&ts, ARR_HEADER + events * 12);
    for (size_t i = 0; i < n; i++) {
        const db_batch *b = calls[i].batch;
        arr_put_text(&sids, calls[i].session_id);
        arr_put_text(&users, calls[i].user_id);
        arr_put_i64(&epochs, calls[i].epoch);
        for (size_t k = 0; k < b->n; k++) {
            arr_put_u32(&call, 4);
            arr_put_u32(&call, (uint32_t)(i + 1));
        }
        arr_append(&seq, &b->seq);
        arr_append(&type, &b->type);
        arr_append(&text, &b->content);
        arr_append(&ts, &b->ts);
        memset(&calls[i].res, 0, sizeof calls[i].res);
        calls[i].rc = 0;
    }
    arr_header(&sids, OID_TEXT, (uint32_t)n);
    arr_header(&users, OID_TEXT, (uint32_t)n);
    arr_header(&call, OID_INT4, (uint32_t)events);
    arr_header(&seq, OID_INT8, (uint32_t)events);
    arr_header(&type, OID_INT4, (uint32_t)events);
    arr_header(&text, OID_TEXT, (uint32_t)events);
    arr_header(&ts, OID_INT8, (uint32_t)events);
    arr_header(&epochs, OID_INT8, (uint32_t)n);
    const Oid types[GROUP_PARAMS] = {OID_TEXT_ARRAY, OID_TEXT_ARRAY, OID_INT4_ARRAY,
                                     OID_INT8_ARRAY, OID_INT4_ARRAY, OID_TEXT_ARRAY,
                                     OID_INT8_ARRAY, OID_INT8_ARRAY};
    arr *params[GROUP_PARAMS] = {&sids, &users, &call, &seq, &type, &text, &ts, &epochs};
    const char *vals[GROUP_PARAMS];
    int lens[GROUP_PARAMS], fmts[GROUP_PARAMS], rc;
    for (int i = 0; i < GROUP_PARAMS; i++) {
        vals[i] = params[i]->data;
        lens[i] = (int)params[i]->len;
        fmts[i] = 1;
    }
    PGresult *r = exec(c, ST_APPEND_GROUP, "AppendEvents(group)", append_group_sql, GROUP_PARAMS,
                       types, vals, lens, fmts, &rc);
    if (r != NULL && (size_t)PQntuples(r) != n) {
        set_err(c, "AppendEvents(group): %d rows for %zu calls", PQntuples(r), n);
        rc = DB_EQUERY;
    } else if (r != NULL) {
        for (size_t i = 0; i < n; i++) {
            int row = (int)i;
            db_append_call *k = &calls[i];
            k->res.last_seq = get_i64(r, row, 4);
            k->rc = append_outcome((uint32_t)k->batch->n, get_bool(r, row, 0), get_bool(r, row, 1),
                                   get_bool(r, row, 6), get_bool(r, row, 2), get_i64(r, row, 3),
                                   get_i64(r, row, 7), get_i64(r, row, 5), &k->res);
        }
    }
    PQclear(r);
    for (int i = 0; i < GROUP_PARAMS; i++)
        mem_free(params[i]->data);
    return rc;
}

/* ---- event pages -------------------------------------------------------- */

struct db_page {
    PGresult *res;
};

int db_list_events(db_conn *c, const char *session_id, int64_t after_seq, int64_t limit,
                   int check_session, db_page **out)
{
    char after[24], lim[24];
    fmt_i64(after, sizeof after, after_seq);
    fmt_i64(lim, sizeof lim, limit);
    const char *vals[] = {session_id, after, lim};
    int rc;

    *out = NULL;
    /* Keyset pagination on the (session_id, seq) unique index: every page
     * costs the same however deep into the log it starts. */
    PGresult *r = exec(c, ST_LIST_EVENTS, "ListEvents",
                       "SELECT event_id, seq, (extract(epoch FROM \"timestamp\") * 1000000)::int8, "
                       "event_type, content FROM session_events "
                       "WHERE session_id = $1 AND seq > $2::int8 ORDER BY seq LIMIT $3::int8",
                       3, NULL, vals, NULL, NULL, &rc);
    if (r == NULL)
        return rc;
    if (check_session && PQntuples(r) == 0) {
        /* No events: tell an empty session from an unknown one. */
        db_session s = {0};
        rc = db_get_session(c, session_id, &s);
        db_session_clear(&s);
        if (rc != 0) {
            PQclear(r);
            return rc;
        }
    }
    *out = mem_calloc(1, sizeof **out);
    (*out)->res = r;
    return 0;
}

size_t db_page_count(const db_page *p)
{
    return (size_t)PQntuples(p->res);
}

void db_page_event(const db_page *p, size_t i, db_event *ev)
{
    int row = (int)i;
    ev->event_id = get_i64(p->res, row, 0);
    ev->seq = get_i64(p->res, row, 1);
    ev->timestamp_us = get_i64(p->res, row, 2);
    ev->type = event_type_parse(PQgetvalue(p->res, row, 3));
    ev->content = PQgetvalue(p->res, row, 4);
    ev->content_len = (size_t)PQgetlength(p->res, row, 4);
}

void db_page_destroy(db_page **pp)
{
    db_page *p = *pp;
    if (p == NULL)
        return;
    *pp = NULL;
    PQclear(p->res);
    mem_free(p);
}
