#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "modelsrv.h"

#include "mem.h"

#include <arpa/inet.h>
#include <errno.h>
#include <json-c/json.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define POLL_MS     50    /* how often a waiting server looks at m->stop */
#define WAIT_S      10    /* the longest a test waits for the server (asserted) */
#define HOLD_POLLS  200   /* a held connection's longest wait: 200 polls of POLL_MS */
#define HEAD_BYTES  512   /* a reply's status line and headers */
#define FIRST_BYTES 16384 /* a request buffer's first size; doubled as needed */
#define DROP_SHORT  64    /* the bytes a dropped JSON answer leaves out */

static const char *reason(int status)
{
    return status == 200 ? "OK" : status < 500 ? "Client Error" : "Server Error";
}

/* Reads one request; returns its body (mem_*), or NULL when the client
 * went away first. Answers "Expect: 100-continue" as a server does. */
static char *read_request(modelsrv *m, int c)
{
    size_t cap = FIRST_BYTES, len = 0, want = 0, head = 0;
    char *buf = mem_alloc(cap);
    int continued = 0;
    for (;;) {
        if (head != 0 && len >= head + want)
            break;
        struct pollfd p = {.fd = c, .events = POLLIN};
        int pr = poll(&p, 1, POLL_MS);
        pthread_mutex_lock(&m->mu);
        int stop = m->stop;
        pthread_mutex_unlock(&m->mu);
        if (stop)
            goto fail;
        if (pr <= 0)
            continue;
        if (len + 1 >= cap) {
            cap *= 2;
            buf = mem_realloc(buf, cap);
        }
        ssize_t n = recv(c, buf + len, cap - 1 - len, 0);
        if (n <= 0)
            goto fail;
        len += (size_t)n;
        buf[len] = '\0';
        char *end = head == 0 ? strstr(buf, "\r\n\r\n") : NULL;
        if (end == NULL)
            continue;
        head = (size_t)(end + 4 - buf);
        const char *cl = strcasestr(buf, "\r\ncontent-length:");
        want = cl != NULL ? strtoul(cl + 17, NULL, 10) : 0;
        if (!continued && strcasestr(buf, "\r\nexpect: 100-continue") != NULL) {
            static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
            continued = send(c, cont, sizeof cont - 1, MSG_NOSIGNAL) > 0;
        }
    }
    char *body = mem_strndup(buf + head, want);
    mem_free(buf);
    return body;
fail:
    mem_free(buf);
    return NULL;
}

static void send_all(int c, const char *s, size_t len)
{
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(c, s + off, len - off, MSG_NOSIGNAL);
        if (n <= 0)
            return; /* the client went away: what it saw is the test's to judge */
        off += (size_t)n;
    }
}

/* Waits for the client to close a held connection; counts it. */
static void hold(modelsrv *m, int c)
{
    char b[256];
    for (int i = 0; i < HOLD_POLLS; i++) {
        struct pollfd p = {.fd = c, .events = POLLIN};
        if (poll(&p, 1, POLL_MS) > 0 && recv(c, b, sizeof b, 0) <= 0) {
            pthread_mutex_lock(&m->mu);
            m->holds_closed++;
            pthread_cond_broadcast(&m->cv);
            pthread_mutex_unlock(&m->mu);
            return;
        }
        pthread_mutex_lock(&m->mu);
        int stop = m->stop;
        pthread_mutex_unlock(&m->mu);
        if (stop)
            return;
    }
}

static void reply(modelsrv *m, int c, const modelsrv_reply *r)
{
    char head[HEAD_BYTES];
    const char *body = r->body != NULL ? r->body : "";
    size_t blen = strlen(body);
    if (r->end == MODELSRV_HOLD && r->body == NULL) {
        hold(m, c);
        return;
    }
    if (r->sse) {
        snprintf(head, sizeof head,
                 "HTTP/1.1 %d %s\r\nContent-Type: text/event-stream\r\n"
                 "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n%zx\r\n",
                 r->status, reason(r->status), blen);
        send_all(c, head, strlen(head));
        send_all(c, body, blen);
        send_all(c, "\r\n", 2);
        if (r->end == MODELSRV_END)
            send_all(c, "0\r\n\r\n", 5);
    } else {
        /* A dropped answer promises more than it sends. */
        size_t promised = r->end == MODELSRV_DROP ? blen + DROP_SHORT : blen;
        snprintf(head, sizeof head,
                 "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                 "Connection: close\r\n\r\n",
                 r->status, reason(r->status), promised);
        send_all(c, head, strlen(head));
        send_all(c, body, blen);
    }
    if (r->end == MODELSRV_HOLD)
        hold(m, c);
}

static void *serve(void *arg)
{
    modelsrv *m = arg;
    for (;;) {
        pthread_mutex_lock(&m->mu);
        int stop = m->stop;
        pthread_mutex_unlock(&m->mu);
        if (stop)
            break;
        struct pollfd p = {.fd = m->fd, .events = POLLIN};
        if (poll(&p, 1, POLL_MS) <= 0)
            continue;
        int c = accept(m->fd, NULL, NULL);
        if (c < 0)
            continue;
        char *body = read_request(m, c);
        if (body == NULL) {
            close(c);
            continue;
        }
        pthread_mutex_lock(&m->mu);
        size_t i = m->nrequests;
        if (i < MODELSRV_MAX_REQUESTS) {
            m->bodies[i] = body;
            m->nrequests++;
        } else {
            mem_free(body);
        }
        pthread_cond_broadcast(&m->cv);
        pthread_mutex_unlock(&m->mu);
        reply(m, c, &m->script[i < m->nscript ? i : m->nscript - 1]);
        close(c);
    }
    return NULL;
}

static int listen_loopback(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t alen = sizeof a;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &alen), 0);
    *port = ntohs(a.sin_port);
    return fd;
}

void modelsrv_start(modelsrv *m, const modelsrv_reply *script, size_t n)
{
    assert_true(n >= 1 && n <= MODELSRV_MAX_REPLIES);
    memset(m, 0, sizeof *m);
    memcpy(m->script, script, n * sizeof *script);
    m->nscript = n;
    pthread_mutex_init(&m->mu, NULL);
    pthread_cond_init(&m->cv, NULL);
    m->fd = listen_loopback(&m->port);
    assert_int_equal(listen(m->fd, 16), 0);
    snprintf(m->base_url, sizeof m->base_url, "http://127.0.0.1:%d/v1", m->port);
    assert_int_equal(pthread_create(&m->th, NULL, serve, m), 0);
}

void modelsrv_stop(modelsrv *m)
{
    pthread_mutex_lock(&m->mu);
    m->stop = 1;
    pthread_mutex_unlock(&m->mu);
    pthread_join(m->th, NULL);
    close(m->fd);
    for (size_t i = 0; i < m->nrequests; i++)
        mem_free(m->bodies[i]);
    pthread_cond_destroy(&m->cv);
    pthread_mutex_destroy(&m->mu);
}

size_t modelsrv_requests(modelsrv *m)
{
    pthread_mutex_lock(&m->mu);
    size_t n = m->nrequests;
    pthread_mutex_unlock(&m->mu);
    return n;
}

/* Waits on m->cv until *value reaches `n` or the wait is over. */
static int wait_for(modelsrv *m, const size_t *value, size_t n)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += WAIT_S;
    pthread_mutex_lock(&m->mu);
    while (*value < n && pthread_cond_timedwait(&m->cv, &m->mu, &until) != ETIMEDOUT)
        ;
    int reached = *value >= n;
    pthread_mutex_unlock(&m->mu);
    return reached;
}

void modelsrv_wait_requests(modelsrv *m, size_t n)
{
    assert_true(wait_for(m, &m->nrequests, n));
}

void modelsrv_wait_hold_closed(modelsrv *m)
{
    assert_true(wait_for(m, &m->holds_closed, 1));
}

struct json_object *modelsrv_body(modelsrv *m, size_t i)
{
    pthread_mutex_lock(&m->mu);
    assert_true(i < m->nrequests);
    json_object *o = json_tokener_parse(m->bodies[i]);
    pthread_mutex_unlock(&m->mu);
    assert_non_null(o);
    return o;
}

int modelsrv_dead_url(char *out, size_t size)
{
    int port;
    int fd = listen_loopback(&port); /* bound, never listening: connects are refused */
    snprintf(out, size, "http://127.0.0.1:%d/v1", port);
    return fd;
}
