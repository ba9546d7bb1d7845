/* history — a session's conversation as the model sees it.
 *
 * Built by applying the session's logged events in order, the same events
 * that go to store-svc, so a live session and one rebuilt from the store
 * after a reconnect (on this or another gateway) agree exactly:
 *   user_message  → a user message
 *   ai_token      → appended to the open assistant message
 *   tool_call     → a tool call of the open assistant message
 *   tool_result   → closes the assistant message, adds a tool message
 * Bounded: the oldest turns are dropped past max_messages (always at a user
 * message, so no tool result loses its call), and an answer's text is
 * capped at max_answer_bytes. Not thread-safe (the gateway loop owns it). */
#ifndef GW_HISTORY_H
#define GW_HISTORY_H

#include "convo/v1/llm.pb-c.h"
#include "convo/v1/store.pb-c.h"

#include <stddef.h>
#include <stdint.h>

typedef struct hist hist;

typedef struct hist_counts {
    int64_t user_messages;      /* over the whole session, not only what is kept */
    int64_t assistant_messages; /* assistant messages started */
    int64_t tool_calls;
} hist_counts;

hist *hist_create(size_t max_messages, size_t max_answer_bytes);
void hist_destroy(hist **h);

/* Applies one event. Returns 0, or -1 (and changes nothing) for a tool
 * event whose content is not the JSON the gateway logs, or an unknown type. */
int hist_apply(hist *h, Convo__V1__EventType type, const char *content, size_t len);
/* Closes the open assistant message (the turn ended). */
void hist_end_turn(hist *h);
/* The kept messages, oldest first; valid until the next change. */
size_t hist_view(hist *h, Convo__V1__Message ***msgs);
hist_counts hist_get_counts(const hist *h);
/* Sets the user-message and tool-call counts to a whole session's, as the
 * store counted them, once a resume has applied only its newest events;
 * events applied later add to them as usual. */
void hist_set_counts(hist *h, int64_t user_messages, int64_t tool_calls);

#endif
