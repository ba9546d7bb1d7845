/* modelsrv — a scripted model endpoint for llm-svc's unit tests: an HTTP/1.1
 * server on a free loopback port, run on a thread of its own, answering the
 * n-th request with the n-th reply of its script (the last one again when
 * the script is shorter) and keeping every request body it was sent, so a
 * test sees exactly what llm-svc asked the model.
 *
 * One connection at a time, each closed after its reply (Connection:
 * close), so a request is a connection. A streamed reply is one chunk of
 * chunked transfer encoding; it then ends (the last chunk), drops (the
 * connection closes without it: a stream cut mid-answer; a JSON answer
 * is cut short of its Content-Length) or holds (the
 * connection stays open until the client closes it, which is recorded).
 * Failures are cmocka assertions. */
#ifndef CONVO_TESTS_MODELSRV_H
#define CONVO_TESTS_MODELSRV_H

#include <pthread.h>
#include <stddef.h>

#define MODELSRV_MAX_REPLIES  8
#define MODELSRV_MAX_REQUESTS 32

/* Pieces of a streamed OpenAI answer, for scripts: one SSE event each.
 * JSON-escape what goes in (\" inside a C string: \\\"). */
#define CHUNK(json) "data: " json "\n\n"
#define CHUNK_ROLE  CHUNK("{\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}")
#define CHUNK_TOKEN(txt)                                                                           \
    CHUNK("{\"model\":\"m-served\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"" txt        \
          "\"}}]}")
#define CHUNK_FINISH(reason)                                                                       \
    CHUNK("{\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"" reason "\"}]}")
#define CHUNK_USAGE(p, c, t)                                                                       \
    CHUNK("{\"choices\":[],\"usage\":{\"prompt_tokens\":" #p ",\"completion_tokens\":" #c          \
          ",\"total_tokens\":" #t "}}")
/* The first delta of tool call `i` (its id and name), then more arguments. */
#define CHUNK_CALL(i, id, name, args)                                                              \
    CHUNK("{\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":" #i ",\"id\":\"" id   \
          "\",\"type\":\"function\",\"function\":{\"name\":\"" name "\",\"arguments\":\"" args     \
          "\"}}]}}]}")
#define CHUNK_ARGS(i, args)                                                                        \
    CHUNK("{\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":" #i                   \
          ",\"function\":{\"arguments\":\"" args "\"}}]}}]}")
#define CHUNK_DONE "data: [DONE]\n\n"

typedef enum modelsrv_end {
    MODELSRV_END,  /* the whole reply, then the connection closes */
    MODELSRV_DROP, /* cut short: a stream before its last chunk, a body before its length */
    MODELSRV_HOLD, /* the reply so far, then wait for the client to close */
} modelsrv_end;

typedef struct modelsrv_reply {
    int status;       /* the HTTP status */
    int sse;          /* an event stream in chunked encoding; else a Content-Length body */
    const char *body; /* SSE events or a JSON text; NULL: nothing (HOLD: not even headers) */
    modelsrv_end end;
} modelsrv_reply;

typedef struct modelsrv {
    int fd, port;
    char base_url[64]; /* http://127.0.0.1:PORT/v1, as --openai-base-url takes it */
    modelsrv_reply script[MODELSRV_MAX_REPLIES];
    size_t nscript;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* Under mu. */
    char *bodies[MODELSRV_MAX_REQUESTS]; /* each request's body (mem_*) */
    size_t nrequests;
    size_t holds_closed; /* held replies whose client closed the connection */
    int stop;
} modelsrv;

/* Starts serving `n` replies (copied; their strings must outlive it). */
void modelsrv_start(modelsrv *m, const modelsrv_reply *script, size_t n);
/* Stops the thread and frees the bodies. */
void modelsrv_stop(modelsrv *m);
/* Requests received so far. */
size_t modelsrv_requests(modelsrv *m);
/* Waits until `n` requests came (asserts they do within the test's wait). */
void modelsrv_wait_requests(modelsrv *m, size_t n);
/* Waits until a held reply's client closed its connection (asserted). */
void modelsrv_wait_hold_closed(modelsrv *m);
/* The i-th request's body parsed as JSON (asserted); json_object_put it. */
struct json_object *modelsrv_body(modelsrv *m, size_t i);
/* A loopback base URL where nothing listens (connections are refused);
 * returns the socket that keeps its port, to close after the test. */
int modelsrv_dead_url(char *out, size_t size);

#endif
