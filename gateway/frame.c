#include "frame.h"

#include "mem.h"
#include "rpc.h"

#include <ctype.h>
#include <json-c/json.h>
#include <stdio.h>
#include <string.h>

static void invalid(frame_in *out, const char *code, const char *fmt, const char *detail)
{
    out->kind = FRAME_INVALID;
    out->code = code;
    snprintf(out->error, sizeof out->error, fmt, detail);
}

static int blank(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (!isspace((unsigned char)s[i]))
            return 0;
    return 1;
}

/* Checks a message text and takes a copy into out. */
static void take_message(const char *text, size_t len, size_t max, frame_in *out)
{
    if (len > max) {
        char detail[32];
        snprintf(detail, sizeof detail, "%zu", max);
        invalid(out, "message_too_long", "the message is longer than %s bytes", detail);
        return;
    }
    if (memchr(text, '\0', len) != NULL) {
        invalid(out, "invalid_text", "the message contains a NUL character%s", "");
        return;
    }
    if (blank(text, len)) {
        invalid(out, "empty_message", "the message is empty%s", "");
        return;
    }
    out->kind = FRAME_MESSAGE;
    out->text = mem_strndup(text, len);
}

void frame_parse(const char *data, size_t len, size_t max_message_bytes, frame_in *out)
{
    memset(out, 0, sizeof *out);
    if (!rpc_utf8_valid(data, len)) {
        invalid(out, "invalid_utf8", "the frame is not valid UTF-8%s", "");
        return;
    }
    if (memchr(data, '\0', len) != NULL) {
        invalid(out, "invalid_text", "the frame contains a NUL character%s", "");
        return;
    }
    size_t i = 0;
    while (i < len && isspace((unsigned char)data[i]))
        i++;
    if (i == len || data[i] != '{') {
        /* Plain text is the message, as in the seed. */
        take_message(data, len, max_message_bytes, out);
        return;
    }

    json_tokener *tok = json_tokener_new_ex(32);
    json_object *obj = json_tokener_parse_ex(tok, data, (int)len);
    enum json_tokener_error jerr = json_tokener_get_error(tok);
    size_t consumed = json_tokener_get_parse_end(tok);
    json_tokener_free(tok);
    if (obj == NULL || jerr != json_tokener_success || !blank(data + consumed, len - consumed)) {
        invalid(out, "invalid_json", "the frame is not valid JSON: %s",
                obj == NULL || jerr != json_tokener_success ? json_tokener_error_desc(jerr)
                                                            : "text after the object");
        goto out;
    }
    if (!json_object_is_type(obj, json_type_object)) {
        invalid(out, "invalid_json", "the frame must be a JSON object%s", "");
        goto out;
    }
    json_object *type = NULL;
    if (json_object_object_get_ex(obj, "type", &type)) {
        const char *t = json_object_get_string(type);
        if (!json_object_is_type(type, json_type_string)) {
            invalid(out, "invalid_type", "\"type\" must be a string%s", "");
            goto out;
        }
        if (strcmp(t, "cancel") == 0) {
            out->kind = FRAME_CANCEL;
            goto out;
        }
        if (strcmp(t, "message") != 0) {
            invalid(out, "unknown_type", "unknown frame type '%.64s' (expected message or cancel)",
                    t);
            goto out;
        }
    }
    json_object *msg = NULL;
    if (!json_object_object_get_ex(obj, "message", &msg) ||
        !json_object_is_type(msg, json_type_string)) {
        invalid(out, "missing_message", "the frame needs a \"message\" string%s", "");
        goto out;
    }
    take_message(json_object_get_string(msg), (size_t)json_object_get_string_len(msg),
                 max_message_bytes, out);
out:
    json_object_put(obj);
}

void frame_in_clear(frame_in *f)
{
    mem_free(f->text);
    f->text = NULL;
}

/* Serializes and frees obj. */
static char *finish(json_object *obj, size_t *len)
{
    size_t n;
    const char *s = json_object_to_json_string_length(
        obj, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &n);
    char *copy = mem_strndup(s, n);
    json_object_put(obj);
    *len = n;
    return copy;
}

static json_object *typed(const char *type, uint64_t turn_id)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "type", json_object_new_string(type));
    if (turn_id != 0)
        json_object_object_add(o, "turn_id", json_object_new_int64((int64_t)turn_id));
    return o;
}

/* JSON text as a value when it parses, else as a string. */
static json_object *json_or_string(const char *text)
{
    if (text == NULL || text[0] == '\0')
        return json_object_new_object();
    json_object *v = json_tokener_parse(text);
    return v != NULL ? v : json_object_new_string(text);
}

/* Writes s as a JSON string (quotes included) at out, which has room for
 * 6 bytes per input byte plus 2; returns the bytes written. Escapes what
 * JSON requires and nothing else, as json-c does with NOSLASHESCAPE. */
static size_t json_quote(char *out, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    char *o = out;
    *o++ = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc = 0;
        switch (c) {
        case '"':
        case '\\':
            esc = (char)c;
            break;
        case '\b':
            esc = 'b';
            break;
        case '\f':
            esc = 'f';
            break;
        case '\n':
            esc = 'n';
            break;
        case '\r':
            esc = 'r';
            break;
        case '\t':
            esc = 't';
            break;
        }
        if (esc != 0) {
            *o++ = '\\';
            *o++ = esc;
        } else if (c >= 0x20) {
            *o++ = (char)c;
        } else {
            memcpy(o, "\\u00", 4);
            o[4] = hex[c >> 4];
            o[5] = hex[c & 15];
            o += 6;
        }
    }
    *o++ = '"';
    return (size_t)(o - out);
}

/* The commonest frame by far (one per token), so it is written directly
 * rather than built as a json-c object. */
char *frame_token(const char *content, uint64_t turn_id, size_t *len)
{
    size_t n = strlen(content);
    char *f = mem_alloc(64 + 6 * n);
    int head = turn_id != 0 ? snprintf(f, 64, "{\"type\":\"token\",\"turn_id\":%llu,\"content\":",
                                       (unsigned long long)turn_id)
                            : snprintf(f, 64, "{\"type\":\"token\",\"content\":");
    size_t at = (size_t)head + json_quote(f + head, content, n);
    f[at++] = '}';
    f[at] = '\0';
    *len = at;
    return f;
}

char *frame_tool_call(const char *tool, const char *call_id, const char *arguments_json,
                      uint64_t turn_id, size_t *len)
{
    json_object *o = typed("tool_call", turn_id);
    json_object_object_add(o, "tool", json_object_new_string(tool));
    json_object_object_add(o, "arguments", json_or_string(arguments_json));
    json_object_object_add(o, "id", json_object_new_string(call_id));
    return finish(o, len);
}

char *frame_tool_result(const char *tool, const char *call_id, const char *result_json,
                        int is_error, uint64_t turn_id, size_t *len)
{
    json_object *o = typed("tool_result", turn_id);
    json_object_object_add(o, "tool", json_object_new_string(tool));
    json_object_object_add(o, "result", json_or_string(result_json));
    json_object_object_add(o, "id", json_object_new_string(call_id));
    if (is_error)
        json_object_object_add(o, "is_error", json_object_new_boolean(1));
    return finish(o, len);
}

char *frame_done(uint64_t turn_id, const char *status, const char *finish_reason,
                 const frame_usage *usage, const char *upstream, int degraded, size_t *len)
{
    json_object *o = typed("done", turn_id);
    json_object_object_add(o, "status", json_object_new_string(status));
    if (finish_reason != NULL && finish_reason[0] != '\0')
        json_object_object_add(o, "finish_reason", json_object_new_string(finish_reason));
    if (usage != NULL) {
        json_object *u = json_object_new_object();
        json_object_object_add(u, "prompt_tokens", json_object_new_int64(usage->prompt_tokens));
        json_object_object_add(u, "completion_tokens",
                               json_object_new_int64(usage->completion_tokens));
        json_object_object_add(u, "total_tokens", json_object_new_int64(usage->total_tokens));
        json_object_object_add(o, "usage", u);
    }
    if (upstream != NULL && upstream[0] != '\0')
        json_object_object_add(o, "upstream", json_object_new_string(upstream));
    if (degraded)
        json_object_object_add(o, "degraded", json_object_new_boolean(1));
    return finish(o, len);
}

char *frame_error(const char *code, const char *content, uint64_t turn_id, const char *request_id,
                  size_t *len)
{
    json_object *o = typed("error", turn_id);
    json_object_object_add(o, "content", json_object_new_string(content));
    json_object_object_add(o, "code", json_object_new_string(code));
    if (request_id != NULL && request_id[0] != '\0')
        json_object_object_add(o, "request_id", json_object_new_string(request_id));
    return finish(o, len);
}

char *frame_session(const char *session_id, const char *user_id, int resumed, int history_loaded,
                    int64_t user_messages, size_t *len)
{
    json_object *o = typed("session", 0);
    json_object_object_add(o, "session_id", json_object_new_string(session_id));
    json_object_object_add(o, "user_id", json_object_new_string(user_id));
    json_object_object_add(o, "resumed", json_object_new_boolean(resumed));
    json_object_object_add(o, "history_loaded", json_object_new_boolean(history_loaded));
    json_object_object_add(o, "message_count", json_object_new_int64(user_messages));
    return finish(o, len);
}

char *frame_queued(uint64_t turn_id, size_t position, size_t *len)
{
    json_object *o = typed("queued", turn_id);
    json_object_object_add(o, "position", json_object_new_int64((int64_t)position));
    return finish(o, len);
}

size_t frame_ws_header(unsigned char *h, uint64_t len)
{
    h[0] = 0x81; /* FIN, text */
    if (len < 126) {
        h[1] = (unsigned char)len;
        return 2;
    }
    if (len <= 0xffff) {
        h[1] = 126;
        h[2] = (unsigned char)(len >> 8);
        h[3] = (unsigned char)len;
        return 4;
    }
    h[1] = 127;
    for (int i = 0; i < 8; i++)
        h[2 + i] = (unsigned char)(len >> (56 - 8 * i));
    return 10;
}
