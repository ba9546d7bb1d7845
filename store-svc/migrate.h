/* migrate — the store's versioned schema migrations.
 *
 * Each migration runs in its own transaction that first takes a
 * transaction-level advisory lock, so replicas starting at once (or a
 * `store-svc migrate` Job racing them) apply each migration exactly once:
 * the others wait for the lock, then see it recorded in schema_migrations
 * and skip it. A transaction-level lock (not a session one) also works
 * through transaction poolers (Supabase's port 6543, PgBouncer) and is
 * released by the server if the connection dies mid-way; a migration that
 * fails rolls back whole and leaves the schema at the previous version.
 *
 * Migrations are additive (the seed's tables and columns stay as they
 * are; the only thing ever dropped is an index another index makes
 * redundant), so an older binary keeps working against a newer schema
 * during a rollout. */
#ifndef CONVO_MIGRATE_H
#define CONVO_MIGRATE_H

#include "db.h"

/* The schema version this binary needs (the last migration's number). */
int migrate_latest(void);

/* Applies every migration newer than the database's version. *version
 * (when not NULL) gets the version afterwards and *applied how many were
 * applied now. Returns 0, DB_EUNAVAIL (retry later) or DB_EQUERY (a
 * migration failed; db_conn_error() says which and why). */
int migrate_apply(db_conn *c, int *version, int *applied);

/* The database's schema version without changing anything (0 when it was
 * never migrated). Returns 0, DB_EUNAVAIL or DB_EQUERY. */
int migrate_version(db_conn *c, int *version);

#endif
