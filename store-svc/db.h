/* db — one PostgreSQL connection (libpq) and every SQL statement of the store.
 *
 * A db_conn belongs to one thread at a time (a pool worker); libpq blocks
 * that thread for the length of a statement, which is why the gRPC threads
 * never call in here. Every statement is parameterized; the few constant
 * DDL scripts of migrate.c are the only unparameterized SQL.
 *
 * Functions return 0 or a negative DB_E* constant (store.c maps each to a
 * gRPC status once). After
 * DB_EUNAVAIL the connection may be dead: the caller checks db_conn_ok() and
 * reconnects; the statement either committed whole or not at all (each is a
 * single statement, so a single transaction), and retrying it is safe
 * because every write is idempotent or guarded (see store.proto). The text
 * of the last failure is db_conn_error(). */
#ifndef CONVO_DB_H
#define CONVO_DB_H

#include "metrics.h"

#include <libpq-fe.h>
#include <stddef.h>
#include <stdint.h>

#define DB_EUNAVAIL  (-1) /* unreachable, connection lost, timed out, shutting down: retry */
#define DB_ENOTFOUND (-2) /* no such session */
#define DB_EOWNER    (-3) /* the session belongs to another user */
#define DB_EENDED    (-4) /* the session has ended */
#define DB_ELEASE    (-5) /* the summary lease is held by another worker (or nobody) */
#define DB_EQUERY    (-6) /* the server refused a statement: a bug or a foreign schema */
#define DB_ESTALE    (-7) /* the writer epoch named is not the session's: it was taken over */

/* Event types and summary states carry the numbers of the proto enums
 * (convo.v1.EventType, convo.v1.SummaryStatus) so the glue can cast;
 * store.c asserts at compile time that they do. */
enum {
    DB_EVENT_USER_MESSAGE = 1,
    DB_EVENT_AI_TOKEN = 2,
    DB_EVENT_TOOL_CALL = 3,
    DB_EVENT_TOOL_RESULT = 4,
    DB_EVENT_SYSTEM_EVENT = 5,
    DB_EVENT_MAX = 5,
};
enum {
    DB_SUMMARY_UNKNOWN = 0, /* a value in the table this binary does not know */
    DB_SUMMARY_NONE = 1,
    DB_SUMMARY_PENDING = 2,
    DB_SUMMARY_DONE = 3,
    DB_SUMMARY_FAILED = 4,
};

/* The seed's event_type text of a DB_EVENT_* value ("user_message", ...);
 * NULL when out of range. */
const char *db_event_type_name(int type);

/* The statements' metrics: time by statement, failures by statement and
 * kind. Shared by every connection; NULL counts nothing. */
typedef struct db_metrics db_metrics;
db_metrics *db_metrics_create(metrics *m);
void db_metrics_destroy(db_metrics **dm);

typedef struct db_settings {
    const char *url;              /* a libpq URI or key=value string (DATABASE_URL) */
    int connect_timeout_s;        /* libpq connect_timeout, unless the URL sets one */
    int statement_timeout_ms;     /* SET statement_timeout after connecting; 0: none */
    const char *application_name; /* shown in pg_stat_activity */
    int prepare;         /* prepare statements per connection (falls back by itself when refused) */
    db_metrics *metrics; /* NULL: not counted; else it outlives the connections */
} db_settings;

typedef struct db_conn db_conn;

/* A connection handle, not yet connected. The settings are copied. */
db_conn *db_conn_create(const db_settings *s);
/* Closes and frees; clears *c. */
void db_conn_destroy(db_conn **c);
/* (Re)connects, blocking up to the connect timeout. Returns 0 or
 * DB_EUNAVAIL (db_conn_error() says why; never contains the password). */
int db_conn_connect(db_conn *c);
/* Closes the connection (the handle stays usable for db_conn_connect). */
void db_conn_close(db_conn *c);
/* Whether the connection is open and usable as far as libpq knows. */
int db_conn_ok(db_conn *c);
/* Like db_conn_ok, but first reads whatever the server sent without
 * blocking, so a server that closed the connection (restart, idle reaping)
 * is noticed before the next statement is sent into a dead socket. Closes
 * a dead connection. */
int db_conn_alive(db_conn *c);
/* The last error's text, "" when none. Valid until the next call. */
const char *db_conn_error(const db_conn *c);
/* "host:port/dbname" of the open connection, for logs ("" when closed). */
const char *db_conn_where(const db_conn *c);
/* The libpq handle (NULL when closed), for migrate.c. */
PGconn *db_conn_pg(db_conn *c);
/* Classifies a failed result of c's connection (res may be NULL): returns
 * DB_EUNAVAIL or DB_EQUERY and records the error text. For migrate.c. */
int db_conn_fail(db_conn *c, const PGresult *res, const char *what);

/* ---- sessions ----------------------------------------------------------- */

/* A session row. Strings are owned (db_session_clear frees them). */
typedef struct db_session {
    char *session_id;
    char *user_id;
    char *final_summary; /* "" when none */
    char *summary_error; /* "" when none */
    int64_t start_time_us;
    int64_t end_time_us; /* 0 while live */
    int32_t duration_seconds;
    int32_t summary_attempts;
    int summary_status; /* DB_SUMMARY_* */
    int64_t event_count;
    int64_t last_seq;
    int64_t user_message_count;
    int64_t tool_call_count;
    int64_t writer_epoch; /* the current writer's fencing token */
} db_session;

void db_session_clear(db_session *s);
/* Frees an array of n sessions from a db_list_* call; clears *ss. */
void db_sessions_free(db_session **ss, size_t n);

/* Creates the session for user_id (writer epoch 1), or resumes it: an
 * ended session of the same user is reopened (end cleared, summary state
 * back to NONE; the old summary stays until a new one is saved). *created
 * says which. DB_EOWNER when it belongs to another user (out is filled
 * anyway). live_seconds > 0 keeps it open that long (db_keep_alive renews
 * it, db_end_abandoned ends it after); 0 leaves it to EndSession (a live
 * session keeps its lease). epoch 0: a new writer, the session's writer
 * epoch moves on; else it is resumed only while its epoch is still that
 * one, kept (DB_ESTALE otherwise, nothing changed, out filled). */
int db_open_session(db_conn *c, const char *session_id, const char *user_id, int32_t live_seconds,
                    int64_t epoch, db_session *out, int *created);
/* Ends a live session of user_id at end_us (0: now) with its duration and
 * summary PENDING; an ended session is returned unchanged. DB_ENOTFOUND;
 * DB_EOWNER (nothing changed) when it belongs to another user; DB_ESTALE
 * (nothing changed) when epoch is not 0 and not the session's. */
int db_end_session(db_conn *c, const char *session_id, const char *user_id, int64_t epoch,
                   int64_t end_us, db_session *out);
int db_get_session(db_conn *c, const char *session_id, db_session *out);

/* status is DB_SUMMARY_DONE (summary), _FAILED or _PENDING (error). The
 * worker must hold the session's live lease (DB_ELEASE otherwise, nothing
 * saved; out is filled with the session as it is). The lease is released. */
int db_save_summary(db_conn *c, const char *session_id, int status, const char *summary,
                    const char *error, const char *worker_id, db_session *out);
/* Takes the summary lease when the session ended, its summary is PENDING,
 * fewer than max_attempts (0: any) attempts were made and no other worker
 * holds a live lease; the attempts go up by one. With give_up, instead only
 * when max_attempts > 0 attempts were made already, and none is counted (the
 * lease to record FAILED). *claimed says whether it was taken; out is the
 * session as it is now. DB_ENOTFOUND. */
int db_claim_summary(db_conn *c, const char *session_id, const char *worker_id,
                     int32_t lease_seconds, int32_t max_attempts, int give_up, db_session *out,
                     int *claimed);
/* Newest first, at most limit, without exclude ("" excludes nothing),
 * only those older than (before_us, before_id) in that order when
 * before_us > 0 (paging). *out is an array of *n sessions
 * (db_sessions_free). */
int db_list_user_sessions(db_conn *c, const char *user_id, uint32_t limit, const char *exclude,
                          int64_t before_us, const char *before_id, db_session **out, size_t *n);
/* Ended sessions with a PENDING summary and no live lease, oldest end first. */
int db_list_unsummarized(db_conn *c, uint32_t limit, int64_t ended_before_us, int32_t max_attempts,
                         db_session **out, size_t *n);
/* Moves the end of keeping alive of each live session of ids[0..n) that
 * was opened with live_seconds to live_seconds from now; *kept: how many. */
int db_keep_alive(db_conn *c, const char *const *ids, size_t n, int32_t live_seconds,
                  uint32_t *kept);
/* Ends at most limit live sessions whose keeping alive ran out, at their
 * last event, summary PENDING. *ids: an array of the *n ended ones' ids
 * (each and the array mem_free'd by the caller). */
int db_end_abandoned(db_conn *c, uint32_t limit, char ***ids, size_t *n);

/* ---- events --------------------------------------------------------------- */

/* A batch of events encoded as PostgreSQL binary arrays, built where the
 * request is checked (so the request itself need not be kept) and sent as
 * four array parameters of one INSERT. Grows without limit: the caller
 * bounds the events and their sizes before adding them. */
typedef struct db_batch db_batch;

db_batch *db_batch_create(size_t nevents, size_t content_bytes);
/* Adds one event; type is DB_EVENT_*; ts_us 0 means "now". */
void db_batch_add(db_batch *b, int64_t seq, int type, const char *content, size_t len,
                  int64_t ts_us);
/* Bytes held, for the job queue's byte bound. */
size_t db_batch_bytes(const db_batch *b);
void db_batch_destroy(db_batch **b);

typedef struct db_append_result {
    uint32_t appended;   /* rows written */
    uint32_t duplicates; /* rows whose (session, seq) was already stored, the same */
    uint32_t conflicts;  /* rows whose (session, seq) was stored with another type or content */
    int64_t last_seq;    /* the session's highest stored seq afterwards */
} db_append_result;

/* Appends the batch in one statement (one transaction): all rows or none.
 * Rows whose seq is stored already are skipped: duplicates when the stored
 * row has the same type and content, conflicts otherwise (the stored row
 * stays). DB_ENOTFOUND; DB_EOWNER (nothing written) when the session is not
 * user_id's; DB_ESTALE (nothing written) when epoch is not 0 and not the
 * session's writer epoch, read under the session's row lock; DB_EENDED
 * when the session ended, unless every event of the batch is stored
 * already (a retry after the end is still answered). */
int db_append_events(db_conn *c, const char *session_id, const char *user_id, int64_t epoch,
                     const db_batch *b, db_append_result *out);

/* One call of a group append (db_append_group): the session and its batch
 * in; its own outcome out. */
typedef struct db_append_call {
    const char *session_id;
    const char *user_id; /* the caller's: the session must be this user's */
    int64_t epoch;       /* the caller's writer epoch; 0: not checked */
    const db_batch *batch;
    int rc; /* what db_append_events would have returned: 0, DB_ENOTFOUND, DB_EOWNER,
             * DB_ESTALE, DB_EENDED */
    db_append_result res;
} db_append_call;

/* Appends the batches of n calls for n DISTINCT sessions in one statement,
 * so one transaction and one commit (group commit): each call's rc and res
 * are what db_append_events would have given it alone. The sessions' rows
 * are locked in session_id order, so two groups never deadlock. Returns 0
 * (the calls' own outcomes filled in), or DB_EUNAVAIL / DB_EQUERY for the
 * whole group, nothing written. */
int db_append_group(db_conn *c, db_append_call *calls, size_t n);

/* One page of a session's events, in seq order, held as the libpq result
 * (never more than a page in memory). */
typedef struct db_page db_page;

typedef struct db_event {
    int64_t event_id;
    int64_t seq;
    int64_t timestamp_us;
    int type;            /* DB_EVENT_*, 0 for a type this binary does not know */
    const char *content; /* NUL-terminated; valid while the page lives */
    size_t content_len;
} db_event;

/* Events with seq > after_seq, at most limit (>= 1). With check_session
 * an unknown session is DB_ENOTFOUND (otherwise it reads as empty). */
int db_list_events(db_conn *c, const char *session_id, int64_t after_seq, int64_t limit,
                   int check_session, db_page **out);
size_t db_page_count(const db_page *p);
void db_page_event(const db_page *p, size_t i, db_event *ev);
void db_page_destroy(db_page **p);

#endif
