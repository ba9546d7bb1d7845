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
