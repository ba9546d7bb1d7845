#include "upstream.h"

#include "backoff.h"
#include "log.h"
#include "mem.h"
#include "rpc.h"

#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* Socket events handled per epoll_wait. */
#define MAX_EVENTS 256

#define UPSTREAM_METRICS(X, S)                                                                     \
    X(S, in_flight, GAUGE, "convo_llm_upstream_requests_in_flight", "", NULL,                      \
      "model requests started and not ended")                                                      \
    X(S, first_byte, HISTOGRAM, "convo_llm_upstream_first_byte_seconds", "",                       \
      &metrics_buckets_seconds,                                                                    \
      "time from sending a model request (each attempt) to the first byte of its answer")          \
    X(S, seconds, HISTOGRAM, "convo_llm_upstream_request_seconds", "", &metrics_buckets_seconds,   \
      "time of a whole model request, from its start to its end, retries included")                \
    X(S, retries, COUNTER_VEC, "convo_llm_upstream_retries_total", "reason", NULL,                 \
      "model requests tried again, by reason (rate_limited, server_error, timeout, connect, "      \
      "dropped)")
METRICS_DECLARE(upstream_metrics, UPSTREAM_METRICS)

/* Why a request is tried again: the label values of convo_llm_upstream_retries_total. */
typedef enum retry_reason {
    RETRY_RATE_LIMITED, /* 429 */
    RETRY_SERVER_ERROR, /* 5xx */
    RETRY_TIMEOUT,      /* 408 */
    RETRY_CONNECT,
    RETRY_DROPPED,
    RETRY_N
} retry_reason;
static const char *const retry_names[RETRY_N] = {"rate_limited", "server_error", "timeout",
                                                 "connect", "dropped"};

/* Commands from other threads, as bits on the request. */
#define CMD_START  1
#define CMD_CANCEL 2
#define CMD_RESUME 4

struct upstream_req {
    upstream *u;
    upstream_cbs cbs;
    void *arg;
    char *url, *body, *auth, *request_id;
    char traceparent[sizeof "traceparent: " + TRACE_PARENT_LEN];
    char *tracestate; /* the header line; NULL: none */
    trace_span span;  /* started by upstream_start, then the loop's */
    int stream;
    int64_t deadline_ms;
    /* Under u->mu. */
    int cmd_bits, queued, dead;
    upstream_req *cmd_next;
    /* Loop thread only from here on. */
    upstream_req *prev, *next; /* the active list */
    CURL *easy;
    struct curl_slist *headers;
    char errbuf[CURL_ERROR_SIZE];
    int attempts, delivered, got_first_byte, paused, stop_requested;
    /* The waits between attempts. */
    backoff retry;
    uint64_t started_us, attempt_us; /* for the metrics (0 when off) */
    long status;
    long retry_after_ms;
    int64_t last_activity_ms, retry_due_ms; /* retry_due_ms != 0: waiting to retry */
    char *errbody;
    size_t errlen;
};

struct upstream {
    upstream_opts o;
    CURLM *multi;
    /* curl's socket interface on epoll: each wake-up costs what is ready,
     * not a scan of every transfer (curl_multi_poll/perform walk them all,
     * which thousands of streams cannot afford). Loop thread only. */
    int epfd;
    int wakefd;          /* eventfd: commands waiting, or stop */
    int64_t curl_due_ms; /* when curl wants its timeout handled; -1: never */
    pthread_t thread;
    pthread_mutex_t mu;
    upstream_req *cmds;   /* under mu */
    size_t count;         /* requests alive, under mu */
    int stopping;         /* under mu */
    upstream_req *active; /* loop only */
    int64_t last_scan_ms;
    upstream_metrics mx;
    metrics_counter *retries[RETRY_N];
};

static void req_free(upstream_req *r)
{
    mem_free(r->url);
    mem_free(r->body);
    mem_free(r->auth);
    mem_free(r->request_id);
    mem_free(r->tracestate);
    mem_free(r->errbody);
    trace_span_end(&r->span); /* ended by finish already; this only frees */
    mem_free(r);
}

static void wake(upstream *u)
{
    uint64_t one = 1;
    /* Only fails when the counter is full, and then the loop is awake. */
    if (write(u->wakefd, &one, sizeof one) < 0 && errno != EAGAIN)
        log_error("upstream: waking the loop failed: %s", strerror(errno));
}

/* Pushes a command; the loop picks it up at its next wakeup. */
static void push_cmd(upstream_req *r, int bit)
{
    upstream *u = r->u;
    pthread_mutex_lock(&u->mu);
    r->cmd_bits |= bit;
    if (!r->queued) {
        r->queued = 1;
        r->cmd_next = u->cmds;
        u->cmds = r;
    }
    pthread_mutex_unlock(&u->mu);
    wake(u);
}

static void detach_easy(upstream_req *r)
{
    if (r->easy != NULL) {
        /* Removing an unfinished transfer closes its connection: the
         * upstream sees the client leave and stops generating. */
        curl_multi_remove_handle(r->u->multi, r->easy);
        curl_easy_cleanup(r->easy);
        r->easy = NULL;
    }
    curl_slist_free_all(r->headers);
    r->headers = NULL;
}

static const char *const result_words[] = {
    [UPSTREAM_OK] = "ok",
    [UPSTREAM_HTTP] = "http_error",
    [UPSTREAM_CONNECT] = "connect_error",
    [UPSTREAM_TIMEOUT] = "timeout",
    [UPSTREAM_DROPPED] = "dropped",
    [UPSTREAM_STOPPED] = "stopped",
    [UPSTREAM_CANCELLED] = "cancelled",
};

static void end_span(upstream_req *r, const upstream_done_info *info)
{
    trace_span *sp = &r->span;
    if (trace_span_recording(sp)) {
        if (info->status != 0)
            trace_span_set_int(sp, "http.response.status_code", info->status);
        trace_span_set_int(sp, "convo.upstream.attempts", info->attempts);
        trace_span_set_str(sp, "convo.upstream.result", result_words[info->result]);
        /* The caller leaving is not the request's failure. */
        if (info->result != UPSTREAM_OK && info->result != UPSTREAM_CANCELLED)
            trace_span_error(sp, "%s: %.200s", result_words[info->result], info->message);
    }
    trace_span_end(sp);
}

/* Ends a request: on_done, then free (or leave it to the command pass when
 * a command still points at it). */
static void finish(upstream_req *r, upstream_result result, const char *message)
{
    upstream *u = r->u;
    detach_easy(r);
    if (r->prev)
        r->prev->next = r->next;
    else if (u->active == r)
        u->active = r->next;
    if (r->next)
        r->next->prev = r->prev;
    r->prev = r->next = NULL;
    if (r->errbody != NULL)
        r->errbody[r->errlen] = '\0';
    upstream_done_info info = {
        .result = result,
        .status = r->status,
        .message = message ? message : "",
        .attempts = r->attempts,
        .delivered = r->delivered,
    };
    end_span(r, &info);
    /* What on_done logs names the request's trace. */
    const trace_span *prev = trace_set_current(&r->span);
    r->cbs.on_done(r->arg, &info);
    trace_set_current(prev);
    metrics_gauge_add(u->mx.in_flight, -1);
    if (r->started_us != 0)
        metrics_histogram_observe(u->mx.seconds, metrics_now_us() - r->started_us);
    pthread_mutex_lock(&u->mu);
    u->count--;
    int keep = r->queued;
    r->dead = 1;
    pthread_mutex_unlock(&u->mu);
    if (!keep)
        req_free(r);
}

static int64_t now_ms(void)
{
    return rpc_now_ms();
}

/* The first byte of an attempt's answer (a header or the body). */
static void first_byte(upstream_req *r)
{
    if (r->got_first_byte)
        return;
    if (r->attempt_us != 0)
        metrics_histogram_observe(r->u->mx.first_byte, metrics_now_us() - r->attempt_us);
    trace_span_event(&r->span, "first_byte");
    r->got_first_byte = 1;
}

static size_t on_write(char *p, size_t sz, size_t n, void *ud)
{
    upstream_req *r = ud;
    size_t len = sz * n;
    r->last_activity_ms = now_ms();
    first_byte(r);
    if (r->status == 0)
        curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &r->status);
    if (r->status < 200 || r->status >= 300) {
        /* An error answer: keep its start for the message, bounded. */
        size_t room = (size_t)r->u->o.max_error_body - r->errlen;
        size_t take = len < room ? len : room;
        if (r->errbody == NULL)
            r->errbody = mem_alloc((size_t)r->u->o.max_error_body + 1);
        memcpy(r->errbody + r->errlen, p, take);
        r->errlen += take;
        return len;
    }
    r->delivered = 1;
    int rc = r->cbs.on_data(r->arg, p, len);
    if (rc < 0) {
        r->stop_requested = 1;
        return 0; /* curl ends the transfer with a write error */
    }
    if (rc == 1 && !r->paused) {
        /* The data was consumed; only what comes next waits. */
        r->paused = 1;
        curl_easy_pause(r->easy, CURLPAUSE_RECV);
    }
    return len;
}

static size_t on_header(char *p, size_t sz, size_t n, void *ud)
{
    upstream_req *r = ud;
    size_t len = sz * n;
    r->last_activity_ms = now_ms();
    first_byte(r);
    if (len > 15 && strncasecmp(p, "retry-after-ms:", 15) == 0) {
        r->retry_after_ms = strtol(p + 15, NULL, 10);
    } else if (len > 12 && strncasecmp(p, "retry-after:", 12) == 0 && r->retry_after_ms < 0) {
        /* Seconds; an HTTP-date form parses as 0 and means "soon". */
        r->retry_after_ms = strtol(p + 12, NULL, 10) * 1000;
    } else if (len >= 5 && strncmp(p, "HTTP/", 5) == 0) {
        r->retry_after_ms = -1; /* a new response (after a 100 Continue) */
    }
    return len;
}

static void attempt(upstream_req *r)
{
    upstream *u = r->u;
    r->attempts++;
    r->status = 0;
    r->errlen = 0;
    r->retry_after_ms = -1;
    r->got_first_byte = 0;
    r->attempt_us = u->mx.first_byte != NULL ? metrics_now_us() : 0;
    r->retry_due_ms = 0;
    r->errbuf[0] = '\0';
    r->last_activity_ms = now_ms();
    CURL *e = curl_easy_init();
    r->easy = e;
    r->headers = curl_slist_append(NULL, "Content-Type: application/json");
    r->headers = curl_slist_append(r->headers, r->stream ? "Accept: text/event-stream"
                                                         : "Accept: application/json");
    if (r->auth != NULL)
        r->headers = curl_slist_append(r->headers, r->auth);
    if (r->request_id != NULL)
        r->headers = curl_slist_append(r->headers, r->request_id);
    r->headers = curl_slist_append(r->headers, r->traceparent);
    if (r->tracestate != NULL)
        r->headers = curl_slist_append(r->headers, r->tracestate);
    curl_easy_setopt(e, CURLOPT_URL, r->url);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, r->body);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)strlen(r->body));
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->headers);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(e, CURLOPT_PRIVATE, r);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)u->o.connect_timeout_ms);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    /* HTTP/2 over TLS multiplexes many streams on one connection. */
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
    curl_easy_setopt(e, CURLOPT_PIPEWAIT, 1L);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "convo-llm-svc/" CONVO_VERSION);
    curl_multi_add_handle(u->multi, e);
}

static retry_reason retry_reason_of(upstream_result result, long status)
{
    if (result == UPSTREAM_CONNECT)
        return RETRY_CONNECT;
    if (result != UPSTREAM_HTTP)
        return RETRY_DROPPED;
    return status == 429 ? RETRY_RATE_LIMITED : status == 408 ? RETRY_TIMEOUT : RETRY_SERVER_ERROR;
}

/* Retries when allowed (nothing delivered, attempts and deadline left),
 * else ends the request with `result`. */
static void retry_or_finish(upstream_req *r, upstream_result result, const char *message)
{
    upstream *u = r->u;
    int64_t now = now_ms();
    if (!r->delivered && r->attempts < u->o.max_attempts) {
        int64_t delay;
        int from_header = r->retry_after_ms >= 0;
        if (from_header) {
            delay = r->retry_after_ms;
        } else {
            /* Full jitter: many streams refused at once (a rate limit)
             * come back spread over the whole wait. */
            delay = backoff_next(&r->retry);
        }
        int fits = delay <= u->o.backoff_max_ms &&
                   (r->deadline_ms == 0 || now + delay + 50 < r->deadline_ms);
        if (fits) {
            const trace_span *prev = trace_set_current(&r->span);
            log_info("upstream attempt %d failed (%s%s%ld), retrying in %lld ms", r->attempts,
                     message ? message : "", r->status ? ", HTTP " : "", r->status,
                     (long long)delay);
            trace_set_current(prev);
            trace_span_event(&r->span, "retry");
            detach_easy(r);
            r->retry_due_ms = now + (delay > 0 ? delay : 1);
            metrics_counter_inc(u->retries[retry_reason_of(result, r->status)]);
            return;
        }
    }
    finish(r, result, message);
}

static void on_complete(upstream_req *r, CURLcode res)
{
    if (r->status == 0 && r->easy)
        curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &r->status);
    if (r->stop_requested) {
        finish(r, UPSTREAM_STOPPED, "stopped by the consumer");
        return;
    }
    if (res == CURLE_OK) {
        if (r->status >= 200 && r->status < 300) {
            finish(r, UPSTREAM_OK, NULL);
            return;
        }
        if (r->errbody != NULL)
            r->errbody[r->errlen] = '\0';
        const char *msg = r->errbody ? r->errbody : "";
        if (r->status == 429 || r->status == 408 || r->status >= 500)
            retry_or_finish(r, UPSTREAM_HTTP, msg);
        else
            finish(r, UPSTREAM_HTTP, msg);
        return;
    }
    const char *msg = r->errbuf[0] ? r->errbuf : curl_easy_strerror(res);
    switch (res) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_SSL_CONNECT_ERROR:
        retry_or_finish(r, UPSTREAM_CONNECT, msg);
        return;
    case CURLE_OPERATION_TIMEDOUT:
        finish(r, UPSTREAM_TIMEOUT, msg);
        return;
    default:
        /* Broken before anything reached the consumer: safe to retry. */
        if (!r->delivered)
            retry_or_finish(r, UPSTREAM_DROPPED, msg);
        else
            finish(r, UPSTREAM_DROPPED, msg);
    }
}

/* Retries that are due, first-byte and idle timeouts. Returns the ms until
 * the next thing due (capped). */
static long scan(upstream *u, int64_t now)
{
    long wait = 1000;
    for (upstream_req *r = u->active, *next; r != NULL; r = next) {
        next = r->next;
        if (r->retry_due_ms != 0) {
            if (now >= r->retry_due_ms)
                attempt(r);
            else if (r->retry_due_ms - now < wait)
                wait = (long)(r->retry_due_ms - now);
            continue;
        }
        if (r->paused)
            continue; /* our consumer is slow, not the upstream */
        int64_t limit = r->got_first_byte ? u->o.idle_timeout_ms : u->o.first_byte_timeout_ms;
        int64_t due = r->last_activity_ms + limit;
        if (now >= due) {
            char msg[96];
            snprintf(msg, sizeof msg, "%s %lld ms",
                     r->got_first_byte ? "no data for" : "no answer within", (long long)limit);
            finish(r, UPSTREAM_TIMEOUT, msg);
        } else if (due - now < wait) {
            wait = (long)(due - now);
        }
    }
    return wait;
}

/* curl says which events a socket of its needs (CURLMOPT_SOCKETFUNCTION). */
static int on_socket(CURL *e, curl_socket_t fd, int what, void *userp, void *socketp)
{
    (void)e;
    upstream *u = userp;
    if (what == CURL_POLL_REMOVE) {
        epoll_ctl(u->epfd, EPOLL_CTL_DEL, fd, NULL);
        return 0;
    }
    struct epoll_event ev = {
        .events = (what & CURL_POLL_IN ? EPOLLIN : 0u) | (what & CURL_POLL_OUT ? EPOLLOUT : 0u),
        .data.fd = fd,
    };
    /* socketp marks a socket already in the epoll set; a descriptor number
     * curl reused, or one the kernel dropped from the set on close, may
     * still say otherwise, so the other operation is the fallback. */
    int op = socketp != NULL ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    if (epoll_ctl(u->epfd, op, fd, &ev) != 0 &&
        (errno != (op == EPOLL_CTL_ADD ? EEXIST : ENOENT) ||
         epoll_ctl(u->epfd, op == EPOLL_CTL_ADD ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, fd, &ev) != 0)) {
        log_error("upstream: epoll_ctl on a model connection failed: %s", strerror(errno));
        return -1;
    }
    if (socketp == NULL)
        curl_multi_assign(u->multi, fd, u);
    return 0;
}

/* curl says when it next needs its timeout handled (CURLMOPT_TIMERFUNCTION). */
static int on_timer(CURLM *m, long timeout_ms, void *userp)
{
    (void)m;
    upstream *u = userp;
    u->curl_due_ms = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    return 0;
}

/* Ends the transfers curl has finished. */
static void reap(upstream *u)
{
    CURLMsg *m;
    int left;
    while ((m = curl_multi_info_read(u->multi, &left)) != NULL) {
        if (m->msg != CURLMSG_DONE)
            continue;
        upstream_req *r = NULL;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
        on_complete(r, m->data.result);
    }
}

/* Takes the commands queued by other threads and acts on them. Returns
 * whether the loop is to stop. */
static int run_commands(upstream *u)
{
    pthread_mutex_lock(&u->mu);
    upstream_req *cmds = u->cmds;
    u->cmds = NULL;
    int stopping = u->stopping;
    /* Move the command bits out under the lock; act on them outside. */
    for (upstream_req *r = cmds; r != NULL; r = r->cmd_next) {
        r->queued = 0;
        int bits = r->cmd_bits;
        r->cmd_bits = 0;
        r->cmd_bits = bits << 8; /* loop-owned copy in the high bits */
    }
    pthread_mutex_unlock(&u->mu);
    for (upstream_req *r = cmds, *next; r != NULL; r = next) {
        next = r->cmd_next;
        int bits = r->cmd_bits >> 8;
        r->cmd_bits = 0;
        if (r->dead) {
            req_free(r); /* ended while a command was on its way */
            continue;
        }
        if (bits & CMD_START) {
            r->next = u->active;
            if (u->active)
                u->active->prev = r;
            u->active = r;
            if (!(bits & CMD_CANCEL))
                attempt(r);
        }
        if (bits & CMD_CANCEL) {
            finish(r, UPSTREAM_CANCELLED, "cancelled");
        } else if ((bits & CMD_RESUME) && r->paused) {
            r->paused = 0;
            r->last_activity_ms = now_ms();
            if (r->easy)
                curl_easy_pause(r->easy, CURLPAUSE_CONT);
        }
    }
    return stopping;
}

static void *loop_main(void *arg)
{
    upstream *u = arg;
    struct epoll_event evs[MAX_EVENTS];
    int running = 0;
    for (;;) {
        if (run_commands(u)) {
            while (u->active != NULL)
                finish(u->active, UPSTREAM_CANCELLED, "shutting down");
            break;
        }
        int64_t now = now_ms();
        /* A request just added is due at once: sent before sleeping. */
        if (u->curl_due_ms >= 0 && now >= u->curl_due_ms) {
            u->curl_due_ms = -1;
            curl_multi_socket_action(u->multi, CURL_SOCKET_TIMEOUT, 0, &running);
        }
        reap(u);
        long wait = 1000;
        if (u->active != NULL) {
            /* Scanning is O(streams): at most every 10 ms. */
            if (now - u->last_scan_ms >= 10) {
                u->last_scan_ms = now;
                wait = scan(u, now);
            } else {
                wait = 10;
            }
        }
        if (u->curl_due_ms >= 0 && u->curl_due_ms - now < wait)
            wait = (long)(u->curl_due_ms > now ? u->curl_due_ms - now : 0);
        int n = epoll_wait(u->epfd, evs, MAX_EVENTS, (int)wait);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == u->wakefd) {
                uint64_t count;
                if (read(u->wakefd, &count, sizeof count) < 0 && errno != EAGAIN)
                    log_error("upstream: reading the wake-up counter failed: %s", strerror(errno));
                continue;
            }
            uint32_t e = evs[i].events;
            int mask = (e & EPOLLIN ? CURL_CSELECT_IN : 0) | (e & EPOLLOUT ? CURL_CSELECT_OUT : 0) |
                       (e & (EPOLLERR | EPOLLHUP) ? CURL_CSELECT_ERR : 0);
            curl_multi_socket_action(u->multi, fd, mask, &running);
        }
        reap(u);
    }
    return NULL;
}

static void global_init(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
}

upstream *upstream_create(const upstream_opts *o, metrics *m)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, global_init);
    upstream *u = mem_calloc(1, sizeof *u);
    u->o = *o;
    metrics_register(m, METRICS_SECTION(upstream_metrics, &u->mx));
    for (int i = 0; i < RETRY_N; i++)
        u->retries[i] = metrics_counter_of(u->mx.retries, (const char *[]){retry_names[i]});
    u->curl_due_ms = -1;
    u->epfd = epoll_create1(EPOLL_CLOEXEC);
    u->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    u->multi = curl_multi_init();
    struct epoll_event wev = {.events = EPOLLIN, .data.fd = u->wakefd};
    if (u->multi == NULL || u->epfd < 0 || u->wakefd < 0 ||
        epoll_ctl(u->epfd, EPOLL_CTL_ADD, u->wakefd, &wev) != 0)
        goto fail;
    curl_multi_setopt(u->multi, CURLMOPT_PIPELINING, CURLPIPE_MULTIPLEX);
    curl_multi_setopt(u->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(u->multi, CURLMOPT_SOCKETDATA, u);
    curl_multi_setopt(u->multi, CURLMOPT_TIMERFUNCTION, on_timer);
    curl_multi_setopt(u->multi, CURLMOPT_TIMERDATA, u);
    pthread_mutex_init(&u->mu, NULL);
    if (pthread_create(&u->thread, NULL, loop_main, u) != 0) {
        pthread_mutex_destroy(&u->mu);
        goto fail;
    }
    return u;
fail:
    if (u->multi != NULL)
        curl_multi_cleanup(u->multi);
    if (u->epfd >= 0)
        close(u->epfd);
    if (u->wakefd >= 0)
        close(u->wakefd);
    mem_free(u);
    return NULL;
}

void upstream_destroy(upstream **up)
{
    if (up == NULL || *up == NULL)
        return;
    upstream *u = *up;
    pthread_mutex_lock(&u->mu);
    u->stopping = 1;
    pthread_mutex_unlock(&u->mu);
    wake(u);
    pthread_join(u->thread, NULL);
    /* Requests started after the loop stopped never ran: end them too. */
    while (u->cmds != NULL) {
        upstream_req *r = u->cmds;
        u->cmds = r->cmd_next;
        r->queued = 0;
        if (r->dead) {
            req_free(r);
            continue;
        }
        finish(r, UPSTREAM_CANCELLED, "shutting down");
    }
    curl_multi_cleanup(u->multi);
    close(u->epfd);
    close(u->wakefd);
    pthread_mutex_destroy(&u->mu);
    mem_free(u);
    *up = NULL;
}

/* The request's client span and the headers that carry it on. */
static void start_span(upstream_req *r, const upstream_spec *spec)
{
    if (spec->trace_parent != NULL)
        trace_span_child(&r->span, spec->trace_parent, "POST chat/completions", TRACE_CLIENT);
    else
        trace_span_start(&r->span, NULL, "POST chat/completions", TRACE_CLIENT, NULL, NULL);
    char tp[TRACE_PARENT_LEN + 1];
    trace_format(&r->span.ctx, tp);
    snprintf(r->traceparent, sizeof r->traceparent, "traceparent: %s", tp);
    if (r->span.state != NULL)
        r->tracestate = mem_asprintf("tracestate: %s", r->span.state);
    if (trace_span_recording(&r->span)) {
        trace_span_set_str(&r->span, "http.request.method", "POST");
        /* A URL with credentials in it is not written down. */
        if (strchr(r->url, '@') == NULL)
            trace_span_set_str(&r->span, "url.full", r->url);
        trace_span_set_bool(&r->span, "convo.upstream.stream", r->stream);
        if (spec->name != NULL)
            trace_span_set_str(&r->span, "convo.upstream", spec->name);
        if (spec->model != NULL)
            trace_span_set_str(&r->span, "gen_ai.request.model", spec->model);
    }
}

int upstream_start(upstream *u, const upstream_spec *spec, const upstream_cbs *cbs, void *arg,
                   upstream_req **out)
{
    pthread_mutex_lock(&u->mu);
    int rc = u->stopping                             ? UPSTREAM_ESHUTDOWN
             : u->count >= (size_t)u->o.max_requests ? UPSTREAM_EBUSY
                                                     : 0;
    if (rc == 0)
        u->count++;
    pthread_mutex_unlock(&u->mu);
    if (rc != 0)
        return rc;
    metrics_gauge_add(u->mx.in_flight, 1);
    upstream_req *r = mem_calloc(1, sizeof *r);
    r->u = u;
    r->started_us = u->mx.seconds != NULL ? metrics_now_us() : 0;
    r->cbs = *cbs;
    r->arg = arg;
    r->url = mem_strdup(spec->url);
    r->body = mem_strdup(spec->body);
    if (spec->api_key != NULL && spec->api_key[0] != '\0')
        r->auth = mem_asprintf("Authorization: Bearer %s", spec->api_key);
    if (spec->request_id != NULL && spec->request_id[0] != '\0')
        r->request_id = mem_asprintf("X-Request-Id: %s", spec->request_id);
    r->stream = spec->stream;
    r->deadline_ms = spec->deadline_ms;
    backoff_init(&r->retry, u->o.backoff_base_ms, u->o.backoff_max_ms, BACKOFF_FULL);
    start_span(r, spec);
    if (out != NULL)
        *out = r;
    push_cmd(r, CMD_START);
    return 0;
}

void upstream_cancel(upstream_req *r)
{
    push_cmd(r, CMD_CANCEL);
}

void upstream_resume(upstream_req *r)
{
    push_cmd(r, CMD_RESUME);
}
