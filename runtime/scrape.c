#include "scrape.h"

#include "log.h"
#include "mem.h"

#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* Scrapers at once; Prometheus sends one per target. */
#define MAX_CONNECTIONS 16
/* Seconds an idle connection is kept (Prometheus reuses it between scrapes). */
#define IDLE_TIMEOUT_S 60
/* What `auto` adds to the service's port (DESIGN: service port + 1000). */
#define AUTO_PORT_OFFSET 1000

#define CONTENT_TYPE_METRICS "text/plain; version=0.0.4; charset=utf-8"

struct scrape {
    struct MHD_Daemon *d;
    metrics *m;
    scrape_health_fn healthy;
    void *arg;
    int port;
};

/* Splits "HOST:PORT" (HOST may be "[v6]" or empty). Returns 0 or -1. */
static int split(const char *hp, char *host, size_t hostsize, long *port)
{
    const char *colon = strrchr(hp, ':');
    if (colon == NULL || colon[1] == '\0')
        return -1;
    char *end;
    errno = 0;
    long p = strtol(colon + 1, &end, 10);
    if (errno != 0 || *end != '\0' || p < 0 || p > 65535)
        return -1;
    const char *h = hp;
    size_t hlen = (size_t)(colon - hp);
    if (hlen >= 2 && h[0] == '[' && h[hlen - 1] == ']') {
        h++;
        hlen -= 2;
    }
    if (hlen >= hostsize)
        return -1;
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    *port = p;
    return 0;
}

/* 0 with addr filled, 1 for off, -1 with the reason in err. */
static int resolve(const char *value, const char *listen, char *addr, size_t addrsize, char *err,
                   size_t errsize)
{
    char host[256];
    long port;
    if (value[0] == '\0' || strcmp(value, "off") == 0)
        return 1;
    if (strcmp(value, "auto") != 0) {
        if (split(value, host, sizeof host, &port) != 0) {
            snprintf(err, errsize, "--metrics-listen: '%s' is not HOST:PORT, auto or off", value);
            return -1;
        }
        snprintf(addr, addrsize, "%s", value);
        return 0;
    }
    if (split(listen, host, sizeof host, &port) != 0) {
        snprintf(err, errsize, "--metrics-listen auto: the service address '%s' is not HOST:PORT",
                 listen);
        return -1;
    }
    if (port != 0)
        port += AUTO_PORT_OFFSET;
    if (port > 65535) {
        snprintf(err, errsize,
                 "--metrics-listen auto: port %ld + %d is past 65535; give HOST:PORT or off",
                 port - AUTO_PORT_OFFSET, AUTO_PORT_OFFSET);
        return -1;
    }
    snprintf(addr, addrsize, strchr(host, ':') != NULL ? "[%s]:%ld" : "%s:%ld", host, port);
    return 0;
}

int scrape_setup(const scrape_opts *o, const char *program, const char *listen, char *addr,
                 size_t addrsize, metrics **m)
{
    char err[512];
    *m = NULL;
    int rc = resolve(o->listen, listen, addr, addrsize, err, sizeof err);
    if (rc < 0) {
        fprintf(stderr, "%s: %s\n", program, err);
        return -1;
    }
    if (rc == 0)
        *m = metrics_create(program);
    return 0;
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    const log_field f[] = {{"origin", "libmicrohttpd"}, {NULL, NULL}};
    log_fields(LOG_WARN, f, "%s", msg);
}

static enum MHD_Result respond(struct MHD_Connection *conn, unsigned status, char *body, size_t len,
                               const char *type)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer_with_free_callback(len, body, mem_free);
    if (r == NULL) {
        mem_free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    enum MHD_Result rc = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return rc;
}

static enum MHD_Result respond_text(struct MHD_Connection *conn, unsigned status, const char *text)
{
    char *body = mem_strdup(text);
    return respond(conn, status, body, strlen(body), "text/plain; charset=utf-8");
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **state)
{
    scrape *s = cls;
    (void)version;
    (void)upload;
    /* A body (there should be none) is read and ignored before answering. */
    if (*state == NULL) {
        *state = s;
        return MHD_YES;
    }
    if (*upload_size != 0) {
        *upload_size = 0;
        return MHD_YES;
    }
    int get = strcmp(method, MHD_HTTP_METHOD_GET) == 0 || strcmp(method, MHD_HTTP_METHOD_HEAD) == 0;
    int known = strcmp(url, "/metrics") == 0 || strcmp(url, "/healthz") == 0;
    if (!known)
        return respond_text(conn, MHD_HTTP_NOT_FOUND, "not found: try /metrics or /healthz\n");
    if (!get)
        return respond_text(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    if (strcmp(url, "/healthz") == 0) {
        int ok = s->healthy == NULL || s->healthy(s->arg);
        return respond_text(conn, ok ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE,
                            ok ? "ok\n" : "not serving\n");
    }
    size_t len = 0;
    char *text = metrics_render(s->m, &len);
    return respond(conn, MHD_HTTP_OK, text, len, CONTENT_TYPE_METRICS);
}

scrape *scrape_start(const char *addr, metrics *m, scrape_health_fn healthy, void *arg)
{
    char host[256], service[8];
    long port;
    struct addrinfo *ai = NULL;
    scrape *s = NULL;
    if (split(addr, host, sizeof host, &port) != 0) {
        log_error("--metrics-listen: '%s' is not HOST:PORT", addr);
        goto out;
    }
    snprintf(service, sizeof service, "%ld", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    int grc = getaddrinfo(host[0] != '\0' ? host : NULL, service, &hints, &ai);
    if (grc != 0) {
        log_error("--metrics-listen %s: %s", addr, gai_strerror(grc));
        goto out;
    }
    s = mem_calloc(1, sizeof *s);
    s->m = m;
    s->healthy = healthy;
    s->arg = arg;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG;
    if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    /* libmicrohttpd's default: SO_REUSEADDR (a restart binds at once,
     * whatever TIME_WAIT connections of its predecessor hold the port) but
     * not SO_REUSEPORT, so a second process on the address fails to start
     * rather than share the port and answer half the scrapes. */
    s->d = MHD_start_daemon(
        flags, (uint16_t)port, NULL, NULL, on_request, s, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL,
        MHD_OPTION_SOCK_ADDR, ai->ai_addr, MHD_OPTION_CONNECTION_LIMIT, (unsigned)MAX_CONNECTIONS,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)IDLE_TIMEOUT_S, MHD_OPTION_END);
    if (s->d == NULL) {
        log_error("cannot serve metrics on %s: the address is in use or invalid; pick another "
                  "with --metrics-listen HOST:PORT (or off)",
                  addr);
        mem_free(s);
        s = NULL;
        goto out;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    s->port = info != NULL ? info->port : (int)port;
    log_info("serving /metrics and /healthz on %s (port %d)", addr, s->port);
out:
    if (ai != NULL)
        freeaddrinfo(ai);
    return s;
}

int scrape_port(const scrape *s)
{
    return s->port;
}

void scrape_stop(scrape **sp)
{
    scrape *s = *sp;
    if (s == NULL)
        return;
    *sp = NULL;
    MHD_stop_daemon(s->d);
    mem_free(s);
}
