/* wsrun — the load through the gateway: `sessions` WebSocket sessions of
 * `turns` turns each, one answer at a time per session, every session a
 * libwebsockets client connection on the caller's libev loop (one thread,
 * no thread per session).
 *
 * A session waits for the gateway's `session` frame, sends the plan's
 * message, checks every `token` frame against the expected answer, and on
 * `done` (or `error`) sends the next message, after a think pause when the
 * plan has one. After the last answer it closes with 1000. A connection
 * that fails, closes early, or outlives the plan's timeout is an error. */
#ifndef CONVO_LOADGEN_WSRUN_H
#define CONVO_LOADGEN_WSRUN_H

#include "plan.h"
#include "stats.h"

#include <ev.h>
#include <stddef.h>

typedef struct wsrun_target {
    const char *host;
    int port;
    const char *run_id;      /* session i is "<run_id>-<i>" */
    const char *user_prefix; /* session i's user is "<user_prefix><i mod users>" */
    int users;
    char **tokens; /* when ntokens > 0, session i sends tokens[i mod ntokens] as
                      ?access_token= (a token for user i mod ntokens) */
    size_t ntokens;
} wsrun_target;

/* Runs every session to its end on `loop` and records into st; *seconds is
 * how long the run took. Returns 0 (errors are in st) or -1 when the
 * libwebsockets context could not be created (its libev plugin missing). */
int wsrun_run(struct ev_loop *loop, plan *p, const wsrun_target *t, stats *st, double *seconds);

#endif
