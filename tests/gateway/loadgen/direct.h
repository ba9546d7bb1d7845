/* direct — the same turns straight to the offline model, for the side-by-
 * side figures: each session posts its turns to /v1/chat/completions
 * ("stream": true) one after another, carrying the conversation so far (up
 * to the plan's history_messages earlier messages, as llm-svc does), and
 * reads the answer as Server-Sent Events. Every transfer is a libcurl easy
 * handle of one multi handle driven by the caller's libev loop (curl's
 * socket interface: one thread, a wake-up costs what is ready). A session
 * keeps its keep-alive connection from turn to turn.
 *
 * A transfer that fails, an HTTP status other than 200, or an answer that
 * is not the expected one is an error; the session goes on to its next
 * turn, as the gateway path does after an error frame. */
#ifndef CONVO_LOADGEN_DIRECT_H
#define CONVO_LOADGEN_DIRECT_H

#include "plan.h"
#include "stats.h"

#include <ev.h>

/* Runs every session to its end against the model at host:port on `loop`
 * and records into st; *seconds is how long the run took. Returns 0
 * (errors are in st) or -1 when libcurl could not be set up. */
int direct_run(struct ev_loop *loop, plan *p, const char *host, int port, stats *st,
               double *seconds);

#endif
