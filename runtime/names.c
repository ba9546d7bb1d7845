#include "names.h"

const char *names_summary_status(Convo__V1__SummaryStatus s)
{
    switch (s) {
    case CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_NONE:
        return "none";
    case CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_PENDING:
        return "pending";
    case CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_DONE:
        return "done";
    case CONVO__V1__SUMMARY_STATUS__SUMMARY_STATUS_FAILED:
        return "failed";
    default:
        return "unknown";
    }
}

const char *names_event_type(Convo__V1__EventType t)
{
    switch (t) {
    case CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE:
        return "user_message";
    case CONVO__V1__EVENT_TYPE__EVENT_TYPE_AI_TOKEN:
        return "ai_token";
    case CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_CALL:
        return "tool_call";
    case CONVO__V1__EVENT_TYPE__EVENT_TYPE_TOOL_RESULT:
        return "tool_result";
    case CONVO__V1__EVENT_TYPE__EVENT_TYPE_SYSTEM_EVENT:
        return "system_event";
    default:
        return "unknown";
    }
}

const char *names_error_category(Convo__V1__ErrorCategory c)
{
    switch (c) {
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_RATE_LIMITED:
        return "rate_limited";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_AUTH_FAILED:
        return "auth_failed";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_MODEL_NOT_FOUND:
        return "model_not_found";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_UPSTREAM_UNAVAILABLE:
        return "upstream_unavailable";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_TIMEOUT:
        return "timeout";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_BAD_UPSTREAM_DATA:
        return "bad_upstream_data";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INVALID_REQUEST:
        return "invalid_request";
    case CONVO__V1__ERROR_CATEGORY__ERROR_CATEGORY_INTERNAL:
        return "internal";
    default:
        return "unknown";
    }
}

const char *names_strategy(Convo__V1__Strategy s)
{
    switch (s) {
    case CONVO__V1__STRATEGY__STRATEGY_FAST_CONCISE:
        return "fast_concise";
    case CONVO__V1__STRATEGY__STRATEGY_ANALYTICAL:
        return "analytical";
    case CONVO__V1__STRATEGY__STRATEGY_SUMMARIZATION_AWARE:
        return "summarization_aware";
    case CONVO__V1__STRATEGY__STRATEGY_TOOL_HEAVY:
        return "tool_heavy";
    default:
        return "unknown";
    }
}
