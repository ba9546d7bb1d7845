/* upstream: the curl multi loop against a scripted HTTP server on a real
 * socket: the request as sent (method, headers, body), a 2xx body reaching
 * on_data, 5xx and 429 answers retried, 4xx answers and refused
 * connections ending with the right result and attempt count. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "mem.h"
#include "upstream.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_ANSWERS  4
#define REQ_BYTES    8192
#define MAX_ATTEMPTS 3
#define WAIT_S       20

/* The server: answers[i] to the i-th connection, one request each. */
typedef struct server {
    int fd;
    int port;
    const char *answers[MAX_ANSWERS];
    int nanswers;
    int served;
    char first_request[REQ_BYTES];
    pthread_t th;
} server;

/* Reads one request (headers and a Content-Length body) into buf. */
static void read_request(int c, char *buf, size_t size)
{
    size_t len = 0;
    buf[0] = '\0';
    while (len + 1 < size) {
        ssize_t n = recv(c, buf + len, size - 1 - len, 0);
        if (n <= 0)
            break;
        len += (size_t)n;
        buf[len] = '\0';
        char *end = strstr(buf, "\r\n\r\n");
        if (end == NULL)
            continue;
        const char *cl = strcasestr(buf, "content-length:");
        size_t body = cl != NULL ? (size_t)strtoul(cl + 15, NULL, 10) : 0;
        if (len >= (size_t)(end + 4 - buf) + body)
            break;
    }
}

static void *serve(void *arg)
{
    server *s = arg;
    for (int i = 0; i < s->nanswers; i++) {
        int c = accept(s->fd, NULL, NULL);
        if (c < 0)
            break;
        char buf[REQ_BYTES];
        read_request(c, buf, sizeof buf);
        if (i == 0)
            memcpy(s->first_request, buf, sizeof buf);
        const char *a = s->answers[i];
        ssize_t off = 0, n;
        while (off < (ssize_t)strlen(a) && (n = send(c, a + off, strlen(a) - off, 0)) > 0)
            off += n;
        s->served = i + 1;
        close(c);
    }
    return NULL;
}

static void server_start(server *s)
{
    s->fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(s->fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(s->fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t alen = sizeof a;
    assert_int_equal(getsockname(s->fd, (struct sockaddr *)&a, &alen), 0);
    s->port = ntohs(a.sin_port);
    assert_int_equal(listen(s->fd, 8), 0);
    assert_int_equal(pthread_create(&s->th, NULL, serve, s), 0);
}

static void server_stop(server *s)
{
    shutdown(s->fd, SHUT_RDWR);
    pthread_join(s->th, NULL);
    close(s->fd);
}

/* What the consumer saw. */
typedef struct result {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
    upstream_done_info info;
    char message[256];
    char body[1024];
    size_t body_len;
} result;

static int on_data(void *arg, const char *buf, size_t len)
{
    result *r = arg;
    pthread_mutex_lock(&r->mu);
    if (r->body_len + len < sizeof r->body) {
        memcpy(r->body + r->body_len, buf, len);
        r->body_len += len;
        r->body[r->body_len] = '\0';
    }
    pthread_mutex_unlock(&r->mu);
    return 0;
}

static void on_done(void *arg, const upstream_done_info *info)
{
    result *r = arg;
    pthread_mutex_lock(&r->mu);
    r->info = *info;
    snprintf(r->message, sizeof r->message, "%s", info->message != NULL ? info->message : "");
    r->info.message = NULL;
    r->done = 1;
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static upstream *make(void)
{
    upstream_opts o = {.connect_timeout_ms = 2000,
                       .first_byte_timeout_ms = 5000,
                       .idle_timeout_ms = 5000,
                       .max_attempts = MAX_ATTEMPTS,
                       .backoff_base_ms = 10,
                       .backoff_max_ms = 50,
                       .max_requests = 16,
                       .max_error_body = 1024};
    upstream *u = upstream_create(&o, NULL);
    assert_non_null(u);
    return u;
}

/* Sends one request to port and waits for its end. */
static void fetch(upstream *u, int port, const char *api_key, result *r)
{
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/chat/completions", port);
    upstream_spec spec = {.url = url,
                          .api_key = api_key,
                          .body = "{\"model\":\"m\"}",
                          .request_id = "req-42",
                          .name = "primary",
                          .model = "m",
                          .stream = 0};
    upstream_cbs cbs = {.on_data = on_data, .on_done = on_done};
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    upstream_req *req = NULL;
    assert_int_equal(upstream_start(u, &spec, &cbs, r, &req), 0);
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += WAIT_S;
    pthread_mutex_lock(&r->mu);
    while (!r->done && pthread_cond_timedwait(&r->cv, &r->mu, &until) == 0)
        ;
    int done = r->done;
    pthread_mutex_unlock(&r->mu);
    assert_true(done);
}

#define OK_ANSWER                                                                                  \
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"                  \
    "Connection: close\r\n\r\n{\"ok\":true}"
#define UNAVAILABLE_ANSWER                                                                         \
    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy"
#define BAD_ANSWER                                                                                 \
    "HTTP/1.1 400 Bad Request\r\nContent-Length: 13\r\nConnection: close\r\n\r\nbad model 'm'"
#define LIMITED_ANSWER                                                                             \
    "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\nContent-Length: 4\r\n"                    \
    "Connection: close\r\n\r\nslow"

static void sends_the_request_and_delivers_the_body(void **state)
{
    (void)state;
    server s = {.answers = {OK_ANSWER}, .nanswers = 1};
    server_start(&s);
    upstream *u = make();
    result r = {0};
    fetch(u, s.port, "sk-test", &r);
    assert_int_equal(r.info.result, UPSTREAM_OK);
    assert_int_equal(r.info.status, 200);
    assert_int_equal(r.info.attempts, 1);
    assert_int_equal(r.info.delivered, 1);
    assert_string_equal(r.body, "{\"ok\":true}");
    assert_non_null(strstr(s.first_request, "POST /v1/chat/completions HTTP/1.1"));
    assert_non_null(strcasestr(s.first_request, "Authorization: Bearer sk-test"));
    assert_non_null(strcasestr(s.first_request, "X-Request-Id: req-42"));
    assert_non_null(strcasestr(s.first_request, "traceparent: 00-"));
    assert_non_null(strstr(s.first_request, "\r\n\r\n{\"model\":\"m\"}"));
    upstream_destroy(&u);
    assert_null(u);
    server_stop(&s);
}

static void no_key_sends_no_authorization(void **state)
{
    (void)state;
    server s = {.answers = {OK_ANSWER}, .nanswers = 1};
    server_start(&s);
    upstream *u = make();
    result r = {0};
    fetch(u, s.port, "", &r);
    assert_int_equal(r.info.result, UPSTREAM_OK);
    assert_null(strcasestr(s.first_request, "Authorization:"));
    upstream_destroy(&u);
    server_stop(&s);
}

static void retries_5xx_and_429(void **state)
{
    (void)state;
    server s = {.answers = {UNAVAILABLE_ANSWER, LIMITED_ANSWER, OK_ANSWER}, .nanswers = 3};
    server_start(&s);
    upstream *u = make();
    result r = {0};
    fetch(u, s.port, "k", &r);
    assert_int_equal(r.info.result, UPSTREAM_OK);
    assert_int_equal(r.info.attempts, 3);
    assert_int_equal(s.served, 3);
    /* Only the answer that succeeded reached the consumer. */
    assert_string_equal(r.body, "{\"ok\":true}");
    upstream_destroy(&u);
    server_stop(&s);
}

static void gives_up_after_max_attempts(void **state)
{
    (void)state;
    server s = {.answers = {UNAVAILABLE_ANSWER, UNAVAILABLE_ANSWER, UNAVAILABLE_ANSWER, OK_ANSWER},
                .nanswers = MAX_ATTEMPTS};
    server_start(&s);
    upstream *u = make();
    result r = {0};
    fetch(u, s.port, "k", &r);
    assert_int_equal(r.info.result, UPSTREAM_HTTP);
    assert_int_equal(r.info.status, 503);
    assert_int_equal(r.info.attempts, MAX_ATTEMPTS);
    assert_int_equal(r.info.delivered, 0);
    assert_non_null(strstr(r.message, "busy"));
    assert_int_equal(r.body_len, 0);
    upstream_destroy(&u);
    server_stop(&s);
}

static void client_error_is_not_retried(void **state)
{
    (void)state;
    server s = {.answers = {BAD_ANSWER}, .nanswers = 1};
    server_start(&s);
    upstream *u = make();
    result r = {0};
    fetch(u, s.port, "k", &r);
    assert_int_equal(r.info.result, UPSTREAM_HTTP);
    assert_int_equal(r.info.status, 400);
    assert_int_equal(r.info.attempts, 1);
    assert_non_null(strstr(r.message, "bad model 'm'"));
    upstream_destroy(&u);
    server_stop(&s);
}

static void refused_connection_is_retried_then_connect(void **state)
{
    (void)state;
    /* A port that was bound and closed: nothing listens there. */
    server s = {.nanswers = 0};
    server_start(&s);
    int port = s.port;
    server_stop(&s);
    upstream *u = make();
    result r = {0};
    fetch(u, port, "k", &r);
    assert_int_equal(r.info.result, UPSTREAM_CONNECT);
    assert_int_equal(r.info.status, 0);
    assert_int_equal(r.info.attempts, MAX_ATTEMPTS);
    upstream_destroy(&u);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(sends_the_request_and_delivers_the_body),
        cmocka_unit_test(no_key_sends_no_authorization),
        cmocka_unit_test(retries_5xx_and_429),
        cmocka_unit_test(gives_up_after_max_attempts),
        cmocka_unit_test(client_error_is_not_retried),
        cmocka_unit_test(refused_connection_is_retried_then_connect),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
