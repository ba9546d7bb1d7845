/* frame — the WebSocket wire format (docs/protocol.md; seed-compatible).
 *
 * Client → server: {"message": "..."}, or any text that does not start with
 * '{' (taken as the message, as the seed does), or {"type": "cancel"}.
 * Server → client: token, tool_call, tool_result, done, error (the seed's
 * frames, with added fields such as turn_id and code) and session (sent once
 * after connecting). Every builder returns a NUL-terminated JSON text the
 * caller frees with mem_free(), its length in *len. */
#ifndef GW_FRAME_H
#define GW_FRAME_H

#include <stddef.h>
#include <stdint.h>

typedef enum frame_kind {
    FRAME_MESSAGE, /* text: the user's message */
    FRAME_CANCEL,  /* stop the answer being streamed */
    FRAME_INVALID, /* code and error say why */
} frame_kind;

typedef struct frame_in {
    frame_kind kind;
    char *text;       /* FRAME_MESSAGE: owned, free with mem_free */
    const char *code; /* FRAME_INVALID: machine-readable, e.g. "invalid_json" */
    char error[200];  /* FRAME_INVALID: for people */
} frame_in;

/* Parses one complete text message from a client. Messages over
 * max_message_bytes, empty or whitespace-only messages, invalid UTF-8, a
 * NUL character (raw, or escaped as \u0000 in JSON: every service refuses
 * NUL in text, so it is refused here, whole, with invalid_text), malformed
 * JSON and unknown types are FRAME_INVALID. */
void frame_parse(const char *data, size_t len, size_t max_message_bytes, frame_in *out);
void frame_in_clear(frame_in *f);

char *frame_token(const char *content, uint64_t turn_id, size_t *len);
/* arguments_json is embedded as JSON when it parses, else as a string. */
char *frame_tool_call(const char *tool, const char *call_id, const char *arguments_json,
                      uint64_t turn_id, size_t *len);
char *frame_tool_result(const char *tool, const char *call_id, const char *result_json,
                        int is_error, uint64_t turn_id, size_t *len);
/* What a turn cost in model tokens, as llm-svc reported it. */
typedef struct frame_usage {
    uint32_t prompt_tokens;
    uint32_t completion_tokens;
    uint32_t total_tokens;
} frame_usage;

/* status: "completed" or "cancelled"; finish_reason, usage and upstream
 * may be NULL (usage adds "usage":{prompt_tokens, completion_tokens,
 * total_tokens}; upstream, the model endpoint that answered, "upstream").
 * degraded adds "degraded":true: the turn took the default route, not
 * router-svc's. */
char *frame_done(uint64_t turn_id, const char *status, const char *finish_reason,
                 const frame_usage *usage, const char *upstream, int degraded, size_t *len);
/* turn_id 0: not about a turn; request_id (NULL: none) names the request
 * in the gateway's logs. */
char *frame_error(const char *code, const char *content, uint64_t turn_id, const char *request_id,
                  size_t *len);
/* The first frame of a connection. */
char *frame_session(const char *session_id, const char *user_id, int resumed, int history_loaded,
                    int64_t user_messages, size_t *len);
/* A message was queued behind the answer being streamed. */
char *frame_queued(uint64_t turn_id, size_t position, size_t *len);

/* The longest header frame_ws_header writes. */
#define FRAME_WS_HEADER_MAX 10
/* Writes the RFC 6455 header of an unmasked, final server-to-client text
 * frame carrying `len` bytes into h (FRAME_WS_HEADER_MAX bytes of room);
 * returns its length. Lets the gateway put several frames in one write. */
size_t frame_ws_header(unsigned char *h, uint64_t len);

#endif
