/* names — the words convo.v1 enum values are written as where people read
 * them (REST answers, tool results): one table, so every service says the
 * same thing. */
#ifndef CONVO_NAMES_H
#define CONVO_NAMES_H

#include "convo/v1/common.pb-c.h"
#include "convo/v1/llm.pb-c.h"
#include "convo/v1/router.pb-c.h"
#include "convo/v1/store.pb-c.h"

/* "none", "pending", "done", "failed"; "unknown" for any other value. */
const char *names_summary_status(Convo__V1__SummaryStatus s);
/* "user_message", "ai_token", "tool_call", "tool_result", "system_event"
 * (the seed's event_type values); "unknown" for any other value. */
const char *names_event_type(Convo__V1__EventType t);
/* "rate_limited", "auth_failed", "model_not_found", "upstream_unavailable",
 * "timeout", "bad_upstream_data", "invalid_request", "internal"; "unknown"
 * for any other value. Metric label values. */
const char *names_error_category(Convo__V1__ErrorCategory c);
/* "fast_concise", "analytical", "summarization_aware", "tool_heavy" (the
 * names router.conf uses); "unknown" for any other value. */
const char *names_strategy(Convo__V1__Strategy s);

#endif
