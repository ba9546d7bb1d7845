#include "migrate.h"

#include "log.h"

#include <stdio.h>
#include <stdlib.h>

/* pg_advisory_xact_lock key: "convo" store migrations. Any constant works as
 * long as nothing else in the database uses it. */
#define MIGRATE_LOCK_KEY "7210431702"

typedef struct migration {
    int version;
    const char *name;
    const char *sql; /* constant DDL/DML, no inputs */
} migration;

static const migration migrations[] = {
    {1, "seed schema: sessions, session_events and their indexes",
     /* Exactly the seed's tables (IF NOT EXISTS: a database the seed's
      * Python backend already created is adopted as it is). */
     "CREATE TABLE IF NOT EXISTS sessions ("
     " session_id VARCHAR(255) PRIMARY KEY,"
     " user_id VARCHAR(255) NOT NULL,"
     " start_time TIMESTAMPTZ NOT NULL DEFAULT NOW(),"
     " end_time TIMESTAMPTZ,"
     " duration_seconds INTEGER,"
     " final_summary TEXT,"
     " created_at TIMESTAMPTZ DEFAULT NOW());"
     "CREATE TABLE IF NOT EXISTS session_events ("
     " event_id BIGSERIAL PRIMARY KEY,"
     " session_id VARCHAR(255) NOT NULL REFERENCES sessions(session_id) ON DELETE CASCADE,"
     " event_type VARCHAR(50) NOT NULL,"
     " content TEXT NOT NULL,"
     " timestamp TIMESTAMPTZ NOT NULL DEFAULT NOW(),"
     " created_at TIMESTAMPTZ DEFAULT NOW());"
     "CREATE INDEX IF NOT EXISTS idx_session_events_session_id ON session_events(session_id);"
     "CREATE INDEX IF NOT EXISTS idx_session_events_timestamp"
     " ON session_events(session_id, timestamp);"
     "CREATE INDEX IF NOT EXISTS idx_sessions_user_id ON sessions(user_id);"
     "CREATE INDEX IF NOT EXISTS idx_sessions_start_time ON sessions(start_time);"},

    {2, "store-svc: per-session seq, counters, summary state and lease",
     /* seq orders the log exactly (timestamps tie) and makes a retried
      * batch idempotent through UNIQUE (session_id, seq). Rows written
      * before (by the seed's backend) are numbered by time, then id. */
     "ALTER TABLE session_events ADD COLUMN IF NOT EXISTS seq BIGINT;"
     "UPDATE session_events e SET seq = n.rn FROM (SELECT event_id, row_number() OVER"
     " (PARTITION BY session_id ORDER BY timestamp, event_id) AS rn FROM session_events) n"
     " WHERE e.event_id = n.event_id AND e.seq IS NULL;"
     "ALTER TABLE session_events ALTER COLUMN seq SET NOT NULL;"
     "ALTER TABLE session_events ADD CONSTRAINT session_events_session_id_seq_key"
     " UNIQUE (session_id, seq);"
     /* Counters kept by AppendEvents in the same statement as the rows, so
      * GetSession never counts a 100,000-event log. */
     "ALTER TABLE sessions"
     " ADD COLUMN IF NOT EXISTS summary_status VARCHAR(16) NOT NULL DEFAULT 'none'"
     "  CONSTRAINT sessions_summary_status_check"
     "  CHECK (summary_status IN ('none', 'pending', 'done', 'failed')),"
     " ADD COLUMN IF NOT EXISTS summary_error TEXT,"
     " ADD COLUMN IF NOT EXISTS summary_attempts INTEGER NOT NULL DEFAULT 0,"
     " ADD COLUMN IF NOT EXISTS summary_lease_owner VARCHAR(255),"
     " ADD COLUMN IF NOT EXISTS summary_lease_until TIMESTAMPTZ,"
     " ADD COLUMN IF NOT EXISTS last_seq BIGINT NOT NULL DEFAULT 0,"
     " ADD COLUMN IF NOT EXISTS event_count BIGINT NOT NULL DEFAULT 0,"
     " ADD COLUMN IF NOT EXISTS user_message_count BIGINT NOT NULL DEFAULT 0,"
     " ADD COLUMN IF NOT EXISTS tool_call_count BIGINT NOT NULL DEFAULT 0;"
     "UPDATE sessions SET summary_status = CASE WHEN final_summary IS NOT NULL THEN 'done'"
     " ELSE 'pending' END WHERE end_time IS NOT NULL;"
     "UPDATE sessions s SET last_seq = c.max_seq, event_count = c.n,"
     " user_message_count = c.um, tool_call_count = c.tc"
     " FROM (SELECT session_id, max(seq) AS max_seq, count(*) AS n,"
     " count(*) FILTER (WHERE event_type = 'user_message') AS um,"
     " count(*) FILTER (WHERE event_type = 'tool_call') AS tc"
     " FROM session_events GROUP BY session_id) c WHERE s.session_id = c.session_id;"
     /* ListUserSessions (newest first) and the summary sweep. */
     "CREATE INDEX IF NOT EXISTS idx_sessions_user_start ON sessions(user_id, start_time DESC);"
     "CREATE INDEX IF NOT EXISTS idx_sessions_summary_pending ON sessions(end_time)"
     " WHERE summary_status = 'pending';"},

    {3,
     "drop idx_session_events_session_id: UNIQUE (session_id, seq) serves every lookup by session",
     /* Every row paid for a fourth index that nothing needs: a lookup by
      * session (ListEvents, the ON DELETE CASCADE of a session, the seed's
      * queries) uses the unique (session_id, seq) index, whose first column
      * is session_id, or (session_id, timestamp). */
     "DROP INDEX IF EXISTS idx_session_events_session_id;"},

    {4, "store-svc: sessions kept alive by their gateway (live_until), ended when it stops",
     /* A gateway that dies leaves its live sessions open: nothing would
      * ever end (or summarize) them. OpenSession and KeepSessionsAlive set
      * live_until; EndAbandonedSessions ends the live ones past it, found
      * through the partial index (live sessions only, a small one). */
     "ALTER TABLE sessions ADD COLUMN IF NOT EXISTS live_until TIMESTAMPTZ;"
     "CREATE INDEX IF NOT EXISTS idx_sessions_live_until ON sessions(live_until)"
     " WHERE end_time IS NULL AND live_until IS NOT NULL;"},

    {5, "store-svc: the session's writer epoch (fencing two gateways writing one session)",
     /* Every OpenSession by a new writer moves it on; AppendEvents and
      * EndSession that name an older one are refused, checked under the
      * session's row lock, so a gateway that lost its client to another
      * gateway cannot write over the new writer's seqs. 0: never opened
      * since (rows of before). */
     "ALTER TABLE sessions ADD COLUMN IF NOT EXISTS writer_epoch BIGINT NOT NULL DEFAULT 0;"},
};

#define NMIGRATIONS (sizeof migrations / sizeof migrations[0])

int migrate_latest(void)
{
    return migrations[NMIGRATIONS - 1].version;
}

/* Runs a statement without parameters (constant text) that returns
 * nothing we need. */
static int run(db_conn *c, const char *what, const char *sql)
{
    PGresult *r = PQexec(db_conn_pg(c), sql);
    ExecStatusType st = PQresultStatus(r);
    int rc = 0;
    if (r == NULL || (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK))
        rc = db_conn_fail(c, r, what);
    PQclear(r);
    return rc;
}

/* The recorded version; the table must exist. */
static int current_version(db_conn *c, int *version)
{
    PGresult *r = PQexecParams(db_conn_pg(c),
                               "SELECT COALESCE(max(version), 0) FROM "
                               "schema_migrations",
                               0, NULL, NULL, NULL, NULL, 0);
    int rc = 0;
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        rc = db_conn_fail(c, r, "reading schema_migrations");
    else
        *version = atoi(PQgetvalue(r, 0, 0));
    PQclear(r);
    return rc;
}

/* One migration in one transaction, under the lock. *did says whether it
 * was applied now (0: someone else had). */
static int apply_one(db_conn *c, const migration *m, int *did)
{
    char version[16];
    int rc, have = 0;
    *did = 0;
    if ((rc = run(c, "BEGIN", "BEGIN")) != 0)
        return rc;
    if ((rc = run(c, "taking the migration lock",
                  "SELECT pg_advisory_xact_lock(" MIGRATE_LOCK_KEY ")")) != 0)
        goto rollback;
    if ((rc = run(c, "creating schema_migrations",
                  "CREATE TABLE IF NOT EXISTS schema_migrations ("
                  " version INTEGER PRIMARY KEY,"
                  " name TEXT NOT NULL,"
                  " applied_at TIMESTAMPTZ NOT NULL DEFAULT NOW())")) != 0)
        goto rollback;
    if ((rc = current_version(c, &have)) != 0)
        goto rollback;
    if (have >= m->version) {
        rc = run(c, "COMMIT", "COMMIT");
        return rc;
    }
    char what[64];
    snprintf(what, sizeof what, "migration %d", m->version);
    if ((rc = run(c, what, m->sql)) != 0)
        goto rollback;
    snprintf(version, sizeof version, "%d", m->version);
    const char *vals[] = {version, m->name};
    PGresult *r =
        PQexecParams(db_conn_pg(c), "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                     2, NULL, vals, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        rc = db_conn_fail(c, r, "recording the migration");
    PQclear(r);
    if (rc != 0)
        goto rollback;
    if ((rc = run(c, "COMMIT", "COMMIT")) != 0)
        return rc;
    *did = 1;
    return 0;

rollback:
    /* Keep the first error's text: ROLLBACK's own failure says nothing new. */
    if (db_conn_pg(c) != NULL && PQstatus(db_conn_pg(c)) == CONNECTION_OK)
        PQclear(PQexec(db_conn_pg(c), "ROLLBACK"));
    return rc;
}

int migrate_apply(db_conn *c, int *version, int *applied)
{
    int n = 0, rc = 0;
    if (db_conn_pg(c) == NULL)
        return DB_EUNAVAIL;
    for (size_t i = 0; i < NMIGRATIONS; i++) {
        int did = 0;
        if ((rc = apply_one(c, &migrations[i], &did)) != 0)
            goto out;
        if (did) {
            n++;
            log_info("applied migration %d: %s", migrations[i].version, migrations[i].name);
        }
    }
    int v = 0;
    rc = current_version(c, &v);
    if (rc == 0 && version != NULL)
        *version = v;
    if (rc == 0 && v > migrate_latest())
        log_info("the database schema (version %d) is newer than this binary's (%d); "
                 "migrations are additive, so carrying on",
                 v, migrate_latest());
out:
    if (applied != NULL)
        *applied = n;
    return rc;
}

int migrate_version(db_conn *c, int *version)
{
    *version = 0;
    if (db_conn_pg(c) == NULL)
        return DB_EUNAVAIL;
    PGresult *r = PQexecParams(db_conn_pg(c), "SELECT to_regclass('schema_migrations') IS NOT NULL",
                               0, NULL, NULL, NULL, NULL, 0);
    int rc = 0, exists = 0;
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        rc = db_conn_fail(c, r, "looking for schema_migrations");
    else
        exists = PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    if (rc == 0 && exists)
        rc = current_version(c, version);
    return rc;
}
