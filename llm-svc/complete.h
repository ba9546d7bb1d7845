/* complete — the Complete method: one non-streamed completion without
 * tools (summary-svc asks for summaries with it) over the shared turn core
 * (turn.h). The upstream's answer is gathered whole (capped by
 * --max-answer-bytes), parsed, and returned as one CompleteResponse;
 * failures map to gRPC codes (turn_failure).
 *
 * Threads and locks: as turn.h says; the gathered answer is under t->mu. */
#ifndef CONVO_COMPLETE_H
#define CONVO_COMPLETE_H

#include "srv.h"

/* The srv on_call of /convo.v1.Llm/Complete (method data: a turn_env). */
void complete_on_call(srv_call *call, const ProtobufCMessage *msg);

#endif
