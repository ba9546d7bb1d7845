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
