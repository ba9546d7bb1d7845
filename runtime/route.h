/* route — the rules that pick the strategy of one conversation turn, and
 * the config they read (router.conf, parsed by rconf.h). router-svc applies
 * them; the gateway reads the same config for the route it takes when
 * router-svc cannot answer.
 *
 * Pure logic: no I/O, no gRPC, no shared state written in route_decide(),
 * so it is cheap, thread-safe over a shared read-only config and easy to test.
 *
 * The rules, in order; a later rule that matches overrides an earlier one:
 *   1. user messages so far > summarization_min_user_messages -> SUMMARIZATION_AWARE
 *   2. a keyword of analytical_keywords is a word of the last user message -> ANALYTICAL
 *   3. tool calls so far > tool_heavy_min_tool_calls -> TOOL_HEAVY
 *   otherwise FAST_CONCISE.
 *
 * Words: a keyword matches a whole word of the message after both are
 * case-folded with Unicode's full folding (libunistring): "WHY", "Почему"
 * and "STRASSE" match "why", "почему" and "straße". Words are split at
 * Unicode's word boundaries (UAX #29) and, beyond them, at apostrophes; a
 * segment is a word when it starts with a letter, mark, digit or '_'
 * (route_is_word_char()). So "¿Why?", "how's" and "请explain" (CJK
 * characters are words of their own) match; "howdy", "somehow", "éwhy"
 * and "how_to" do not. Keywords are single words; a phrase cannot be a
 * keyword. route_decide() allocates only for messages over 2 KiB. */
#ifndef CONVO_ROUTE_H
#define CONVO_ROUTE_H

#include <stddef.h>
#include <stdint.h>

/* The values index tables; they are not the proto's numbers (router.c maps them). */
typedef enum route_strategy {
    ROUTE_FAST_CONCISE,
    ROUTE_ANALYTICAL,
    ROUTE_SUMMARIZATION_AWARE,
    ROUTE_TOOL_HEAVY,
    ROUTE_N_STRATEGIES
} route_strategy;

typedef enum route_verbosity {
    ROUTE_CONCISE,
    ROUTE_BALANCED,
    ROUTE_DETAILED,
    ROUTE_N_VERBOSITIES
} route_verbosity;

/* What one strategy asks of the model. Strings are owned by the config. */
typedef struct route_strategy_conf {
    char *instructions;        /* appended to the base prompt */
    route_verbosity verbosity; /* reported with the decision */
    char *model;               /* "" = llm-svc's default model */
    double temperature;        /* 0.0 .. 2.0 */
    uint32_t max_tokens;       /* 0 = the upstream's default */
    int tools_enabled;         /* whether the model is offered the tools */
    char *system_prompt;       /* base + instructions, built by route_config_prepare() */
} route_strategy_conf;

/* The whole rule set. Built by route_config_new() (the built-in defaults,
 * which equal the shipped router.conf) and changed by rconf when a file is
 * loaded; read-only once route_config_prepare() has run, and then safe to
 * share between threads. Every string is owned (mem_alloc) and freed by
 * route_config_free(). */
typedef struct route_config {
    long long summarization_min_user_messages; /* rule 1 fires when count > this */
    long long tool_heavy_min_tool_calls;       /* rule 3 fires when count > this */
    char **keywords;                           /* rule 2's words */
    size_t n_keywords;
    size_t max_message_bytes; /* longest last_user_message accepted */
    char *base_prompt;
    route_strategy_conf strategies[ROUTE_N_STRATEGIES];
} route_config;

/* One turn's context. The message need not be NUL-terminated. */
typedef struct route_input {
    const char *message;
    size_t message_len;
    long long user_message_count;
    long long tool_call_count;
} route_input;

#define ROUTE_MAX_REASONS 4   /* one per rule, the default included */
#define ROUTE_REASON_SIZE 200 /* a reason quotes at most one keyword (<= ROUTE_KEYWORD_MAX) */
#define ROUTE_KEYWORD_MAX 64  /* bytes */

typedef struct route_decision {
    route_strategy strategy;
    route_verbosity verbosity;
    /* The chosen strategy's parameters and prompt; points into the config,
     * valid as long as it is. */
    const route_strategy_conf *conf;
    /* One line per rule that matched, in rule order; when none did, one line
     * saying the default was taken. */
    size_t n_reasons;
    char reasons[ROUTE_MAX_REASONS][ROUTE_REASON_SIZE];
} route_decision;

/* A config holding the built-in defaults, prepared. Never fails (mem aborts). */
route_config *route_config_new(void);
/* Frees a config and clears *cfg; NULL is fine. */
void route_config_free(route_config **cfg);
/* Replaces the keyword list by the comma-separated words of `csv` (spaces
 * around each are dropped; empty items are skipped, so "" disables rule 2).
 * Returns 0, or -1 with a reason in err (list unchanged) when an item is
 * not a single word or is longer than ROUTE_KEYWORD_MAX bytes. */
int route_config_set_keywords(route_config *cfg, const char *csv, char *err, size_t errsize);
/* Builds each strategy's system prompt from the base prompt and its
 * instructions. Call after changing either. */
void route_config_prepare(route_config *cfg);

/* Applies the rules to one turn. `cfg` must be prepared. Negative counts
 * count as 0 (callers reject them before: route does not judge requests). */
void route_decide(const route_config *cfg, const route_input *in, route_decision *out);

/* The decision for strategy s without the rules, for a caller that cannot
 * ask router-svc (the gateway's default route): s's parameters and
 * prompt, with `reason` (cut to ROUTE_REASON_SIZE) as its one reason. */
void route_fixed(const route_config *cfg, route_strategy s, const char *reason,
                 route_decision *out);

/* Whether the code point is part of words (see the top of this file). */
int route_is_word_char(uint32_t cp);

/* "fast_concise", "analytical", ...: the names used in router.conf and logs. */
const char *route_strategy_name(route_strategy s);
/* "concise", "balanced", "detailed". */
const char *route_verbosity_name(route_verbosity v);
/* The strategy or verbosity called `name`, or -1. */
int route_strategy_parse(const char *name);
int route_verbosity_parse(const char *name);

#endif
