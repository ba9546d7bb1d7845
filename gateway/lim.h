/* lim — limits: how much one client address and one user may use, kept by the
 * gateway (not by a connection or a session, so reconnecting refills
 * nothing).
 *
 * Each limit is a table keyed by client address or user id: a count of what
 * the key holds now (connections, sessions in memory) or a token bucket (rates, refilled
 * continuously, bursts up to its capacity). A table tracks at most
 * --limit-keys keys. Entries that hold nothing and are full again are
 * forgotten (that is all their state); at the bound the least recently
 * used entry that holds no connection is forgotten to make room (its
 * client starts afresh, counted as an eviction), and when every entry
 * holds a connection a new key is refused (LIM_EFULL). A limit set to 0
 * is off. Every refusal is counted per limit. Not thread-safe: the
 * gateway's loop owns it. Times are monotonic milliseconds, passed in. */
#ifndef GW_LIM_H
#define GW_LIM_H

#include "conf.h"

#include <stddef.h>
#include <stdint.h>

#define LIM_OPTS(X, S)                                                                             \
    X(S, conn_per_ip, INT, "max-connections-per-ip", "MAX_CONNECTIONS_PER_IP", "100",              \
      "WebSocket connections at once from one client address; more are closed with 1013 "          \
      "(too_many_connections_ip); 0: no limit")                                                    \
    X(S, conn_per_user, INT, "max-connections-per-user", "MAX_CONNECTIONS_PER_USER", "20",         \
      "WebSocket connections at once of one user; more are closed with 1013 "                      \
      "(too_many_connections_user); 0: no limit")                                                  \
    X(S, open_sessions_per_user, INT, "max-sessions-per-user", "MAX_SESSIONS_PER_USER", "20",      \
      "sessions of one user in the gateway's memory at once (connected, waiting --end-grace-ms, "  \
      "or storing their last events); a new one past it is closed with 1013 "                      \
      "(too_many_sessions_user); 0: no limit")                                                     \
    X(S, sessions_per_hour, INT, "sessions-per-hour", "SESSIONS_PER_HOUR", "100",                  \
      "new sessions a user may start per hour (all of them at once at most); more are closed "     \
      "with 1013 (too_many_sessions); resuming a session is not a new one; 0: no limit")           \
    X(S, messages_per_minute, INT, "rate-limit", "RATE_LIMIT_PER_MINUTE", "120",                   \
      "frames a user may send per minute over all connections (messages, cancels and invalid "     \
      "frames alike, bursts of --rate-burst); more get an error frame (rate_limited); 0: no "      \
      "limit")                                                                                     \
    X(S, rate_burst, INT, "rate-burst", "RATE_BURST", "20",                                        \
      "frames a user may send at once before --rate-limit paces them")                             \
    X(S, tokens_per_minute, INT, "user-tokens-per-minute", "USER_TOKENS_PER_MINUTE", "200000",     \
      "model tokens (prompt and completion, as llm-svc reports them) a user's answers may use "    \
      "per minute; once used up a message gets an error frame (token_limit) until enough has "     \
      "come back; 0: no limit")                                                                    \
    X(S, rest_per_second, INT, "rest-rate-per-ip", "REST_RATE_PER_IP", "20",                       \
      "REST requests per second from one client address (bursts of twice as many); more get "      \
      "429 (rate_limited); 0: no limit")                                                           \
    X(S, max_keys, INT, "limit-keys", "LIMIT_KEYS", "100000",                                      \
      "client addresses or users each limit tracks at once (see the gateway README for what "      \
      "happens at the bound)")
CONF_DECLARE(lim_opts, LIM_OPTS)

typedef struct lim lim;

typedef enum lim_kind {
    LIM_CONN_IP,       /* connections held per client address */
    LIM_CONN_USER,     /* connections held per user */
    LIM_SESSIONS,      /* new sessions per user per hour */
    LIM_MESSAGES,      /* frames per user per minute */
    LIM_TOKENS,        /* model tokens per user per minute */
    LIM_REST,          /* REST requests per client address per second */
    LIM_OPEN_SESSIONS, /* sessions in memory per user */
    LIM_KINDS
} lim_kind;

#define LIM_EREFUSED -1 /* over the limit */
#define LIM_EFULL    -2 /* the table is full of keys that hold connections */

lim *lim_create(const lim_opts *o);
void lim_destroy(lim **l);

/* Counts (LIM_CONN_IP, LIM_CONN_USER, LIM_OPEN_SESSIONS): takes one for key. Returns 0
 * (give it back with lim_release), LIM_EREFUSED or LIM_EFULL. */
int lim_hold(lim *l, lim_kind k, const char *key, int64_t now_ms);
void lim_release(lim *l, lim_kind k, const char *key, int64_t now_ms);

/* Rates (LIM_SESSIONS, LIM_MESSAGES, LIM_REST): takes one unit from key's
 * bucket. Returns 0 or LIM_EREFUSED. */
int lim_take(lim *l, lim_kind k, const char *key, int64_t now_ms);
/* Gives back a unit taken for something that did not count (a session
 * that turned out to be resumed, not new). */
void lim_give(lim *l, lim_kind k, const char *key, int64_t now_ms);

/* LIM_TOKENS: whether key may start another answer (its bucket is not
 * used up: 0, else LIM_EREFUSED, counted), and what an answer used,
 * charged after the fact (the bucket may go below zero). */
int lim_check(lim *l, lim_kind k, const char *key, int64_t now_ms);
void lim_charge(lim *l, lim_kind k, const char *key, double amount, int64_t now_ms);

/* Refusals (LIM_EREFUSED and LIM_EFULL) and evictions so far. */
long lim_refused(const lim *l, lim_kind k);
long lim_evicted(const lim *l, lim_kind k);
/* Keys tracked now. */
size_t lim_keys(const lim *l, lim_kind k);
/* The error code a refusal of kind k is answered with. */
const char *lim_code(lim_kind k);
/* Kind k's own word, one per kind (connections_per_ip, messages_per_minute,
 * ...): the `limit` label of the gateway's rate_limited metric. */
const char *lim_name(lim_kind k);

#endif
