#include "caller.h"

#include "check.h"
#include "log.h"
#include "mem.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <json-c/json.h>
#include <libwebsockets.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

#define BEARER "bearer "

/* The longest Origin or Host compared (a scheme, a DNS name and a port). */
#define ORIGIN_MAX 256

typedef struct cidr {
    int family;
    unsigned char addr[16];
    int bits;
} cidr;

struct caller_rules {
    char **origins; /* scheme://host[:port], lower case */
    size_t norigins;
    cidr *proxies;
    size_t nproxies;
};

/* ---- start-up --------------------------------------------------------- */

static void lower(char *s)
{
    for (; *s; s++)
        *s = (char)tolower((unsigned char)*s);
}

/* Splits a comma list into trimmed, non-empty items (each from mem). */
static char **split(const char *list, size_t *n)
{
    char **items = NULL;
    *n = 0;
    const char *p = list;
    while (*p != '\0') {
        const char *end = strchr(p, ',');
        size_t len = end != NULL ? (size_t)(end - p) : strlen(p);
        const char *a = p, *b = p + len;
        while (a < b && isspace((unsigned char)*a))
            a++;
        while (b > a && isspace((unsigned char)b[-1]))
            b--;
        if (b > a) {
            items = mem_realloc(items, (*n + 1) * sizeof *items);
            items[(*n)++] = mem_strndup(a, (size_t)(b - a));
        }
        p = end != NULL ? end + 1 : p + len;
    }
    return items;
}

/* An origin as browsers send it: scheme://host[:port], nothing after; or
 * "null", what they send for a page opened from a file (the seed's
 * frontend/index.html is used that way). */
static int origin_valid(const char *o)
{
    if (strcmp(o, "null") == 0)
        return 1;
    const char *sep = strstr(o, "://");
    if (sep == NULL || sep == o || sep[3] == '\0' || strlen(o) >= ORIGIN_MAX)
        return 0;
    for (const char *p = o; p < sep; p++)
        if (!isalpha((unsigned char)*p))
            return 0;
    for (const char *p = sep + 3; *p; p++)
        if (*p == '/' || *p == '*' || isspace((unsigned char)*p))
            return 0;
    return 1;
}

static int cidr_parse(const char *s, cidr *c)
{
    char addr[INET6_ADDRSTRLEN + 8];
    snprintf(addr, sizeof addr, "%s", s);
    char *slash = strchr(addr, '/');
    if (slash != NULL)
        *slash = '\0';
    memset(c, 0, sizeof *c);
    if (inet_pton(AF_INET, addr, c->addr) == 1) {
        c->family = AF_INET;
        c->bits = 32;
    } else if (inet_pton(AF_INET6, addr, c->addr) == 1) {
        c->family = AF_INET6;
        c->bits = 128;
    } else {
        return -1;
    }
    if (slash != NULL) {
        char *end;
        long bits = strtol(slash + 1, &end, 10);
        if (*end != '\0' || slash[1] == '\0' || bits < 0 || bits > c->bits)
            return -1;
        c->bits = (int)bits;
    }
    return 0;
}

static int cidr_has(const cidr *c, const char *ip)
{
    unsigned char a[16];
    int family = strchr(ip, ':') != NULL ? AF_INET6 : AF_INET;
    if (family != c->family || inet_pton(family, ip, a) != 1)
        return 0;
    int full = c->bits / 8, rest = c->bits % 8;
    if (memcmp(a, c->addr, (size_t)full) != 0)
        return 0;
    if (rest == 0)
        return 1;
    unsigned char mask = (unsigned char)(0xff << (8 - rest));
    return (a[full] & mask) == (c->addr[full] & mask);
}

caller_rules *caller_rules_create(const gw_opts *o, char *err, size_t errlen)
{
    caller_rules *r = mem_calloc(1, sizeof *r);
    r->origins = split(o->allowed_origins, &r->norigins);
    for (size_t i = 0; i < r->norigins; i++) {
        if (!origin_valid(r->origins[i])) {
            snprintf(err, errlen,
                     "--allowed-origins: '%.200s' is not an origin (scheme://host[:port]; '*' is "
                     "never allowed)",
                     r->origins[i]);
            goto fail;
        }
        lower(r->origins[i]);
    }
    size_t n;
    char **proxies = split(o->trusted_proxies, &n);
    r->proxies = mem_calloc(n ? n : 1, sizeof *r->proxies);
    for (size_t i = 0; i < n; i++) {
        int bad = cidr_parse(proxies[i], &r->proxies[r->nproxies]) != 0;
        if (bad)
            snprintf(err, errlen, "--trusted-proxies: '%.200s' is not an address or CIDR range",
                     proxies[i]);
        else
            r->nproxies++;
        mem_free(proxies[i]);
        if (bad) {
            for (size_t j = i + 1; j < n; j++)
                mem_free(proxies[j]);
            mem_free(proxies);
            goto fail;
        }
    }
    mem_free(proxies);
    return r;
fail:
    caller_rules_destroy(&r);
    return NULL;
}

void caller_rules_destroy(caller_rules **rp)
{
    caller_rules *r = *rp;
    if (r == NULL)
        return;
    *rp = NULL;
    for (size_t i = 0; i < r->norigins; i++)
        mem_free(r->origins[i]);
    mem_free(r->origins);
    mem_free(r->proxies);
    mem_free(r);
}

/* ---- per request -------------------------------------------------------- */

/* A fresh request id (CALLER_ID_LEN hex digits) into id. */
static void caller_new_id(char id[CALLER_ID_LEN + 1])
{
    /* splitmix64 over a per-process random start: unique within the
     * process, unpredictable across processes; not a secret. */
    static uint64_t state;
    static int seeded;
    if (!seeded) {
        if (getrandom(&state, sizeof state, 0) != (ssize_t)sizeof state)
            state = (uint64_t)lws_now_usecs();
        seeded = 1;
    }
    uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    snprintf(id, CALLER_ID_LEN + 1, "%016llx", (unsigned long long)z);
}

int caller_arg(struct lws *wsi, const char *name, char *buf, size_t cap)
{
    size_t nlen = strlen(name);
    for (int i = 0;; i++) {
        int flen = lws_hdr_fragment_length(wsi, WSI_TOKEN_HTTP_URI_ARGS, i);
        if (flen <= 0)
            return 0;
        if ((size_t)flen <= nlen)
            continue;
        char *frag = mem_alloc((size_t)flen + 1);
        int got = lws_hdr_copy_fragment(wsi, frag, flen + 1, WSI_TOKEN_HTTP_URI_ARGS, i);
        int rc = 0;
        if (got > (int)nlen && memcmp(frag, name, nlen) == 0 && frag[nlen] == '=') {
            size_t vlen = (size_t)got - nlen - 1;
            rc = vlen + 1 > cap ? -1 : 1;
            if (rc == 1) {
                memcpy(buf, frag + nlen + 1, vlen);
                buf[vlen] = '\0';
            }
        }
        mem_free(frag);
        if (rc != 0)
            return rc;
    }
}

void caller_log_target(struct lws *wsi, char *buf, size_t cap)
{
    char path[512] = "";
    if (lws_hdr_copy(wsi, path, sizeof path, WSI_TOKEN_GET_URI) < 0 &&
        lws_hdr_copy(wsi, path, sizeof path, WSI_TOKEN_POST_URI) < 0)
        lws_hdr_copy(wsi, path, sizeof path, WSI_TOKEN_OPTIONS_URI);
    size_t at = (size_t)snprintf(buf, cap, "%s", path);
    for (int i = 0; at < cap; i++) {
        char frag[256];
        int flen = lws_hdr_fragment_length(wsi, WSI_TOKEN_HTTP_URI_ARGS, i);
        if (flen <= 0)
            break;
        if (lws_hdr_copy_fragment(wsi, frag, sizeof frag, WSI_TOKEN_HTTP_URI_ARGS, i) < 0)
            snprintf(frag, sizeof frag, "(%d bytes)", flen);
        const char *sep = i == 0 ? "?" : "&";
        if (strncmp(frag, "access_token=", 13) == 0)
            at += (size_t)snprintf(buf + at, cap - at, "%saccess_token=(hidden)", sep);
        else
            at += (size_t)snprintf(buf + at, cap - at, "%s%s", sep, frag);
    }
}

/* The sum of the request headers the parser kept. */
static size_t header_bytes(struct lws *wsi)
{
    size_t n = 0;
    for (int t = 0; t < WSI_TOKEN_COUNT; t++) {
        int len = lws_hdr_total_length(wsi, (enum lws_token_indexes)t);
        if (len > 0)
            n += (size_t)len;
    }
    return n;
}

static void address(gw *g, struct lws *wsi, char *ip, size_t cap)
{
    const caller_rules *r = g->callers;
    lws_get_peer_simple(wsi, ip, cap);
    /* An IPv4 peer on a dual-stack socket reads ::ffff:a.b.c.d. */
    if (strncmp(ip, "::ffff:", 7) == 0 && strchr(ip + 7, ':') == NULL)
        memmove(ip, ip + 7, strlen(ip + 7) + 1);
    if (r->nproxies == 0)
        return;
    int xlen = lws_hdr_total_length(wsi, WSI_TOKEN_X_FORWARDED_FOR);
    if (xlen <= 0)
        return;
    /* Only a trusted proxy's word is taken, and it is read from the right:
     * each proxy appends the address it saw, so the first one that is not
     * a proxy of ours is the client. */
    char *xff = mem_alloc((size_t)xlen + 1);
    lws_hdr_copy(wsi, xff, xlen + 1, WSI_TOKEN_X_FORWARDED_FOR);
    for (;;) {
        int trusted = 0;
        for (size_t i = 0; i < r->nproxies && !trusted; i++)
            trusted = cidr_has(&r->proxies[i], ip);
        if (!trusted)
            break;
        char *comma = strrchr(xff, ',');
        char *item = comma != NULL ? comma + 1 : xff;
        while (*item == ' ')
            item++;
        size_t len = strlen(item);
        while (len > 0 && item[len - 1] == ' ')
            len--;
        if (len == 0 || len >= cap)
            break;
        memcpy(ip, item, len);
        ip[len] = '\0';
        if (comma == NULL)
            break;
        *comma = '\0';
    }
    mem_free(xff);
}

/* Whether origin is the gateway's own (its host and port are the Host the
 * request was sent to) or one of --allowed-origins. */
static int origin_allowed(gw *g, struct lws *wsi, const char *origin)
{
    const caller_rules *r = g->callers;
    char o[ORIGIN_MAX];
    snprintf(o, sizeof o, "%s", origin);
    lower(o);
    for (size_t i = 0; i < r->norigins; i++)
        if (strcmp(o, r->origins[i]) == 0)
            return 1;
    const char *sep = strstr(o, "://");
    char host[ORIGIN_MAX] = "";
    if (sep == NULL || lws_hdr_copy(wsi, host, sizeof host, WSI_TOKEN_HOST) <= 0)
        return 0;
    lower(host);
    return strcmp(sep + 3, host) == 0;
}

static int refuse(caller_refusal *why, int status, const char *code, const char *message)
{
    why->status = status;
    why->code = code;
    why->message = message;
    why->close = 0;
    return -1;
}

/* A declared body length, 0 when there is none. */
static long long content_length(struct lws *wsi)
{
    char buf[24];
    if (lws_hdr_copy(wsi, buf, sizeof buf, WSI_TOKEN_HTTP_CONTENT_LENGTH) <= 0)
        return 0;
    char *end;
    long long v = strtoll(buf, &end, 10);
    return *end == '\0' && v >= 0 ? v : -1;
}

/* traceparent and tracestate (headers libwebsockets does not know: its
 * custom headers, names lower case with the colon). */
static void read_trace(struct lws *wsi, caller *c)
{
    static const char tp_name[] = "traceparent:", ts_name[] = "tracestate:";
    char tp[TRACE_PARENT_LEN + 1];
    int n = lws_hdr_custom_length(wsi, tp_name, (int)strlen(tp_name));
    if (n != TRACE_PARENT_LEN ||
        lws_hdr_custom_copy(wsi, tp, sizeof tp, tp_name, (int)strlen(tp_name)) != n ||
        trace_parse(tp, &c->trace_parent) != 0)
        return;
    n = lws_hdr_custom_length(wsi, ts_name, (int)strlen(ts_name));
    if (n <= 0 || n > TRACE_STATE_MAX ||
        lws_hdr_custom_copy(wsi, c->trace_state, sizeof c->trace_state, ts_name,
                            (int)strlen(ts_name)) != n ||
        !trace_state_ok(c->trace_state))
        c->trace_state[0] = '\0';
}

int caller_check(gw *g, struct lws *wsi, caller *c, caller_refusal *why)
{
    memset(c, 0, sizeof *c);
    caller_new_id(c->request_id);
    read_trace(wsi, c);
    address(g, wsi, c->ip, sizeof c->ip);
    if (lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_TRANSFER_ENCODING) > 0) {
        refuse(why, 501, "transfer_encoding_not_supported",
               "the gateway takes no Transfer-Encoding; send Content-Length");
        why->close = 1;
        return -1;
    }
    long long body = content_length(wsi);
    if (body < 0 || (body > 0 && lws_hdr_total_length(wsi, WSI_TOKEN_POST_URI) <= 0)) {
        refuse(why, 400, "unexpected_body", "only POST requests carry a body");
        why->close = 1;
        return -1;
    }
    if (header_bytes(wsi) > (size_t)g->opts.max_header_bytes)
        return refuse(why, 431, "headers_too_large",
                      "the request's headers are over the limit (--max-header-bytes)");
    int olen = lws_hdr_total_length(wsi, WSI_TOKEN_ORIGIN);
    if (olen > 0) {
        char origin[ORIGIN_MAX] = "";
        if (olen >= (int)sizeof origin ||
            lws_hdr_copy(wsi, origin, sizeof origin, WSI_TOKEN_ORIGIN) <= 0 ||
            !origin_allowed(g, wsi, origin))
            return refuse(why, 403, "origin_not_allowed",
                          "requests from this origin are not allowed (--allowed-origins)");
        snprintf(c->origin, sizeof c->origin, "%s", origin);
    }
    return 0;
}

/* The bearer token: the Authorization header, else ?access_token=. NULL
 * when there is none; from mem otherwise. */
static char *bearer_token(struct lws *wsi)
{
    int len = lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_AUTHORIZATION);
    if (len > 0) {
        char *h = mem_alloc((size_t)len + 1);
        lws_hdr_copy(wsi, h, len + 1, WSI_TOKEN_HTTP_AUTHORIZATION);
        if (strncasecmp(h, BEARER, strlen(BEARER)) == 0) {
            const char *t = h + strlen(BEARER);
            while (*t == ' ')
                t++;
            char *token = mem_strdup(t);
            mem_free(h);
            return token;
        }
        mem_free(h);
    }
    for (int i = 0;; i++) {
        int flen = lws_hdr_fragment_length(wsi, WSI_TOKEN_HTTP_URI_ARGS, i);
        if (flen <= 0)
            return NULL;
        char *frag = mem_alloc((size_t)flen + 1);
        if (lws_hdr_copy_fragment(wsi, frag, flen + 1, WSI_TOKEN_HTTP_URI_ARGS, i) > 0 &&
            strncmp(frag, "access_token=", 13) == 0) {
            char *token = mem_strdup(frag + 13);
            mem_free(frag);
            return token;
        }
        mem_free(frag);
    }
}

int caller_identify(gw *g, struct lws *wsi, caller *c, caller_refusal *why)
{
    char claimed[AUTH_USER_MAX + 2] = "";
    int has = caller_arg(wsi, "user_id", claimed, sizeof claimed);
    char err[160];
    c->user_arg = has == 0                                                        ? 0
                  : has < 0 || check_id("user_id", claimed, err, sizeof err) != 0 ? -1
                                                                                  : 1;
    if (auth_get_mode(g->auth) == AUTH_MODE_NONE) {
        snprintf(c->user, sizeof c->user, "%s", c->user_arg > 0 ? claimed : "");
        return 0;
    }
    char *token = bearer_token(wsi);
    int rc = auth_verify(g->auth, token, c->user, sizeof c->user);
    mem_free(token);
    if (rc != 0) {
        c->user[0] = '\0';
        return refuse(why, 401, auth_strerror(rc),
                      rc == AUTH_EMISSING ? "a bearer token is required (Authorization: Bearer "
                                            "<token>, or ?access_token=<token>)"
                                          : "the bearer token was not accepted");
    }
    c->verified = 1;
    if (c->user_arg > 0 && strcmp(claimed, c->user) != 0)
        return refuse(why, 403, "user_mismatch",
                      "user_id names another user than the token's; leave it out or send the "
                      "token's own");
    return 0;
}

/* The reason phrase of the statuses refusals use. */
static const char *status_text(int status)
{
    switch (status) {
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 501:
        return "Not Implemented";
    default:
        return "Error";
    }
}

int caller_add_headers(struct lws *wsi, const caller *c, unsigned char **p, unsigned char *end)
{
    if (c->origin[0] != '\0' &&
        (lws_add_http_header_by_name(wsi, (const unsigned char *)"access-control-allow-origin:",
                                     (const unsigned char *)c->origin, (int)strlen(c->origin), p,
                                     end) ||
         lws_add_http_header_by_name(
             wsi, (const unsigned char *)"vary:", (const unsigned char *)"Origin", 6, p, end)))
        return -1;
    if (c->request_id[0] != '\0' &&
        lws_add_http_header_by_name(wsi, (const unsigned char *)"x-request-id:",
                                    (const unsigned char *)c->request_id, CALLER_ID_LEN, p, end))
        return -1;
    return lws_add_http_header_by_name(wsi, (const unsigned char *)"cache-control:",
                                       (const unsigned char *)"no-store", 8, p, end)
               ? -1
               : 0;
}

char *caller_error_json(const char *code, const char *message, const char *request_id, size_t *len)
{
    json_object *o = json_object_new_object();
    json_object_object_add(o, "error", json_object_new_string(message));
    json_object_object_add(o, "code", json_object_new_string(code));
    if (request_id != NULL && request_id[0] != '\0')
        json_object_object_add(o, "request_id", json_object_new_string(request_id));
    const char *text = json_object_to_json_string_length(
        o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, len);
    char *copy = mem_strndup(text, *len);
    json_object_put(o);
    return copy;
}

int caller_answer(struct lws *wsi, const caller *c, const caller_refusal *why, int upgrade)
{
    size_t len;
    char *body = caller_error_json(why->code, why->message, c->request_id, &len);
    unsigned char buf[LWS_PRE + 1024];
    unsigned char *start = buf + LWS_PRE, *p = start, *end = buf + sizeof buf - 1;
    int rc = -1;
    if (upgrade) {
        /* libwebsockets learns the request's HTTP version only when it
         * serves it as HTTP, after an upgrade is confirmed: its status line
         * would say HTTP/1.0, which WebSocket clients refuse. An upgrade is
         * HTTP/1.1 (RFC 6455 4.1). */
        p += snprintf((char *)p, (size_t)(end - p), "HTTP/1.1 %d %s\r\n", why->status,
                      status_text(why->status));
        if (lws_add_http_header_by_token(wsi, WSI_TOKEN_HTTP_CONTENT_TYPE,
                                         (const unsigned char *)"application/json", 16, &p, end) ||
            lws_add_http_header_content_length(wsi, len, &p, end))
            goto out;
    } else if (lws_add_http_common_headers(wsi, (unsigned)why->status, "application/json", len, &p,
                                           end)) {
        goto out;
    }
    if (caller_add_headers(wsi, c, &p, end) != 0)
        goto out;
    if (why->status == 401 &&
        lws_add_http_header_by_name(wsi, (const unsigned char *)"www-authenticate:",
                                    (const unsigned char *)"Bearer", 6, &p, end))
        goto out;
    if (why->status == 429 &&
        lws_add_http_header_by_name(
            wsi, (const unsigned char *)"retry-after:", (const unsigned char *)"1", 1, &p, end))
        goto out;
    if (why->close && lws_add_http_header_by_name(wsi, (const unsigned char *)"connection:",
                                                  (const unsigned char *)"close", 5, &p, end))
        goto out;
    if (lws_finalize_write_http_header(wsi, start, &p, end))
        goto out;
    unsigned char *out = mem_alloc(LWS_PRE + len);
    memcpy(out + LWS_PRE, body, len);
    int w = lws_write(wsi, out + LWS_PRE, len, LWS_WRITE_HTTP_FINAL);
    mem_free(out);
    rc = w < 0 ? -1 : 0;
out:
    mem_free(body);
    return rc;
}
