#include "endpoints.h"

#include "health.h"
#include "log.h"
#include "mem.h"
#include "rpc.h"

#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ENDPOINTS_METRICS(X, S)                                                                    \
    X(S, requests, COUNTER_VEC, "convo_llm_endpoint_requests_total", "upstream,result", NULL,      \
      "model requests ended per endpoint (primary or a --fallback's name), by what they say of "   \
      "it: answered (it is up), failed (counted against its circuit), neutral (cancelled or "      \
      "stopped by llm-svc)")                                                                       \
    X(S, skipped, COUNTER_VEC, "convo_llm_endpoint_skipped_total", "upstream", NULL,               \
      "requests an endpoint's open circuit (or its probe already out) sent past it")               \
    X(S, circuit, GAUGE_VEC, "convo_llm_endpoint_circuit_state", "upstream", NULL,                 \
      "each endpoint's circuit: 0 closed, 1 open, 2 half-open")
METRICS_DECLARE(endpoints_metrics, ENDPOINTS_METRICS)

#define PRIMARY_NAME  "primary"
#define HEALTH_PREFIX "upstream/"
/* A key file longer than this is not a key (a wrong path, say). */
#define KEY_MAX_BYTES 4096
/* Entry names show up in health service names, logs and DoneEvents. */
#define NAME_MAX_BYTES 64

typedef struct entry {
    endpoint pub;
    char *name, *url, *api_key;
    char *model; /* NULL: the request's */
    char *health_name;
    breaker *br;
    /* Its series (NULL with metrics off), indexed by breaker_outcome. */
    metrics_counter *results[BREAKER_OUTCOMES], *skipped;
    metrics_gauge *circuit;
} entry;

struct endpoints {
    entry *v;
    size_t n;
    char *default_model;
    pthread_mutex_t pub_mu;
    health *health; /* under pub_mu: where circuits are published, or NULL */
    endpoints_metrics mx;
};

/* ---- building ------------------------------------------------------------ */

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
        s++;
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\n' || s[n - 1] == '\r'))
        s[--n] = '\0';
    return s;
}

/* Whether `url` is an http(s) URL with a host (curl's parser judges). */
static int check_url(const char *url, char *why, size_t whysize)
{
    CURLU *h = curl_url();
    char *scheme = NULL, *host = NULL;
    int rc = -1;
    if (h == NULL || curl_url_set(h, CURLUPART_URL, url, 0) != CURLUE_OK) {
        snprintf(why, whysize, "is not a URL (http://HOST[:PORT]/PATH or https://...)");
        goto out;
    }
    if (curl_url_get(h, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        (strcmp(scheme, "http") != 0 && strcmp(scheme, "https") != 0)) {
        snprintf(why, whysize, "is not an http:// or https:// URL");
        goto out;
    }
    if (curl_url_get(h, CURLUPART_HOST, &host, 0) != CURLUE_OK || host[0] == '\0') {
        snprintf(why, whysize, "names no host");
        goto out;
    }
    rc = 0;
out:
    curl_free(scheme);
    curl_free(host);
    curl_url_cleanup(h);
    return rc;
}

/* A key goes into an HTTP header: no line breaks or other controls. */
static int check_key(const char *key, char *why, size_t whysize)
{
    for (const char *p = key; *p; p++) {
        if ((unsigned char)*p < 0x20 || *p == 0x7f) {
            snprintf(why, whysize, "holds a line break or another control character");
            return -1;
        }
    }
    return 0;
}

static char *read_key_file(const char *path, char *why, size_t whysize)
{
    char buf[KEY_MAX_BYTES + 2];
    char *key = NULL;
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(why, whysize, "cannot be read: %s", strerror(errno));
        return NULL;
    }
    size_t len = fread(buf, 1, sizeof buf - 1, f);
    int failed = ferror(f);
    fclose(f);
    buf[len] = '\0';
    char *k = trim(buf);
    if (failed)
        snprintf(why, whysize, "cannot be read");
    else if (len > KEY_MAX_BYTES)
        snprintf(why, whysize, "is over %d bytes: not a key", KEY_MAX_BYTES);
    else if (k[0] == '\0')
        snprintf(why, whysize, "is empty");
    else if (check_key(k, why, whysize) == 0)
        key = mem_strdup(k);
    explicit_bzero(buf, sizeof buf);
    return key;
}

static int check_name(const char *name, char *why, size_t whysize)
{
    size_t n = strlen(name);
    if (n > NAME_MAX_BYTES || strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                           "0123456789._-") != n) {
        snprintf(why, whysize, "must be 1-%d letters, digits, '.', '_' or '-'", NAME_MAX_BYTES);
        return -1;
    }
    if (strcmp(name, PRIMARY_NAME) == 0) {
        snprintf(why, whysize, "'%s' is the primary endpoint's", PRIMARY_NAME);
        return -1;
    }
    return 0;
}

static char *completions_url(const char *base)
{
    size_t n = strlen(base);
    while (n > 0 && base[n - 1] == '/')
        n--;
    return mem_asprintf("%.*s/chat/completions", (int)n, base);
}

/* The fields of one --fallback entry. */
typedef struct fields {
    char *url, *model, *key_env, *key_file, *name;
} fields;

/* Splits "k=v,k=v" (modified in place) into *f. Field values are never
 * quoted back: one could be a key written where it must not be. */
static int split_fields(char *text, fields *f, char *why, size_t whysize)
{
    static const char *const names[] = {"url", "model", "key-env", "key-file", "name"};
    char **slots[] = {&f->url, &f->model, &f->key_env, &f->key_file, &f->name};
    int index = 0;
    for (char *save = NULL, *p = strtok_r(text, ",", &save); p; p = strtok_r(NULL, ",", &save)) {
        index++;
        char *eq = strchr(p, '=');
        if (eq == NULL) {
            snprintf(why, whysize, "field %d is not NAME=VALUE", index);
            return -1;
        }
        *eq = '\0';
        char *k = trim(p), *v = trim(eq + 1);
        if (strcmp(k, "key") == 0 || strcmp(k, "api-key") == 0 || strcmp(k, "api_key") == 0) {
            snprintf(why, whysize,
                     "a key is never written here: name where it is read from with key-env=VAR "
                     "or key-file=PATH");
            return -1;
        }
        char **slot = NULL;
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
            if (strcmp(k, names[i]) == 0)
                slot = slots[i];
        if (slot == NULL) {
            snprintf(why, whysize, "unknown field '%.32s' (url, model, key-env, key-file, name)",
                     k);
            return -1;
        }
        if (*slot != NULL) {
            snprintf(why, whysize, "%s is given twice", k);
            return -1;
        }
        if (v[0] == '\0') {
            snprintf(why, whysize, "%s is empty", k);
            return -1;
        }
        *slot = v;
    }
    return 0;
}

/* Fills `x` from one --fallback entry (the index-th, 1-based). */
static int parse_entry(char *text, size_t index, entry *x, char *why, size_t whysize)
{
    fields f = {0};
    if (split_fields(text, &f, why, whysize) != 0)
        return -1;
    if (f.url == NULL) {
        snprintf(why, whysize, "url= is required");
        return -1;
    }
    char sub[128];
    if (check_url(f.url, sub, sizeof sub) != 0) {
        snprintf(why, whysize, "url %s", sub);
        return -1;
    }
    if (f.key_env != NULL && f.key_file != NULL) {
        snprintf(why, whysize, "key-env and key-file are both given: one key source");
        return -1;
    }
    if (f.name != NULL && check_name(f.name, sub, sizeof sub) != 0) {
        snprintf(why, whysize, "name %s", sub);
        return -1;
    }
    const char *env = f.key_env != NULL ? getenv(f.key_env) : NULL;
    if (f.key_env != NULL && (env == NULL || env[0] == '\0')) {
        snprintf(why, whysize, "key-env=%.64s: that environment variable is not set or empty",
                 f.key_env);
        return -1;
    }
    if (env != NULL && check_key(env, sub, sizeof sub) != 0) {
        snprintf(why, whysize, "key-env=%.64s: the key %s", f.key_env, sub);
        return -1;
    }
    char *key = NULL;
    if (f.key_file != NULL && (key = read_key_file(f.key_file, sub, sizeof sub)) == NULL) {
        snprintf(why, whysize, "key-file=%.100s %s", f.key_file, sub);
        return -1;
    }
    x->name = f.name != NULL ? mem_strdup(f.name) : mem_asprintf("fallback%zu", index);
    x->url = completions_url(f.url);
    x->api_key = key != NULL ? key : mem_strdup(env != NULL ? env : "");
    x->model = f.model != NULL ? mem_strdup(f.model) : NULL;
    return 0;
}

static void entry_clear(entry *x)
{
    mem_free(x->name);
    mem_free(x->url);
    if (x->api_key != NULL)
        explicit_bzero(x->api_key, strlen(x->api_key));
    mem_free(x->api_key);
    mem_free(x->model);
    mem_free(x->health_name);
    breaker_destroy(&x->br);
}

static entry *add_entry(endpoints *e)
{
    e->v = mem_realloc(e->v, (e->n + 1) * sizeof *e->v);
    entry *x = &e->v[e->n++];
    memset(x, 0, sizeof *x);
    return x;
}

/* The --fallback entries, in order, after the primary. */
static int add_fallbacks(endpoints *e, const char *list, char *err, size_t errsize)
{
    char *copy = mem_strdup(list);
    char why[320];
    int rc = 0;
    size_t index = 0;
    for (char *save = NULL, *p = strtok_r(copy, ";", &save); p; p = strtok_r(NULL, ";", &save)) {
        char *text = trim(p);
        if (text[0] == '\0')
            continue;
        index++;
        entry *x = add_entry(e);
        if (parse_entry(text, index, x, why, sizeof why) != 0) {
            snprintf(err, errsize, "--fallback entry %zu: %s", index, why);
            rc = -1;
            break;
        }
        for (size_t i = 0; i + 1 < e->n; i++) {
            if (strcmp(e->v[i].name, x->name) == 0) {
                snprintf(err, errsize, "--fallback entry %zu: the name %s is taken", index,
                         x->name);
                rc = -1;
                break;
            }
        }
        if (rc != 0)
            break;
    }
    explicit_bzero(copy, strlen(list));
    mem_free(copy);
    return rc;
}

/* Each endpoint's series, made at 0 (a circuit starts closed). */
static void make_series(endpoints *e, metrics *m)
{
    static const char *const results[BREAKER_OUTCOMES] = {
        [BREAKER_SUCCESS] = "answered",
        [BREAKER_FAILURE] = "failed",
        [BREAKER_NEUTRAL] = "neutral",
    };
    metrics_register(m, METRICS_SECTION(endpoints_metrics, &e->mx));
    for (size_t i = 0; i < e->n; i++) {
        entry *x = &e->v[i];
        for (int r = 0; r < BREAKER_OUTCOMES; r++)
            x->results[r] =
                metrics_counter_of(e->mx.requests, (const char *[]){x->name, results[r]});
        x->skipped = metrics_counter_of(e->mx.skipped, (const char *[]){x->name});
        x->circuit = metrics_gauge_of(e->mx.circuit, (const char *[]){x->name});
        metrics_gauge_set(x->circuit, BREAKER_CLOSED);
    }
}

int endpoints_create(const endpoints_opts *o, metrics *m, endpoints **out, char *err,
                     size_t errsize)
{
    endpoints *e = mem_calloc(1, sizeof *e);
    pthread_mutex_init(&e->pub_mu, NULL);
    e->default_model = mem_strdup(o->model);
    char why[160];
    if (check_url(o->base_url, why, sizeof why) != 0) {
        snprintf(err, errsize, "--openai-base-url %s", why);
        goto fail;
    }
    entry *p = add_entry(e);
    p->name = mem_strdup(PRIMARY_NAME);
    p->url = completions_url(o->base_url);
    p->api_key = mem_strdup(o->api_key);
    if (add_fallbacks(e, o->fallbacks, err, errsize) != 0)
        goto fail;
    for (size_t i = 0; i < e->n; i++) {
        entry *x = &e->v[i];
        x->pub = (endpoint){x->name, x->url, x->api_key};
        x->health_name = mem_asprintf(HEALTH_PREFIX "%s", x->name);
        x->br = breaker_create((int)o->breaker_failures, o->breaker_cooldown_ms,
                               o->breaker_cooldown_max_ms);
    }
    make_series(e, m);
    *out = e;
    return 0;
fail:
    endpoints_destroy(&e);
    return -1;
}

void endpoints_destroy(endpoints **ep)
{
    if (ep == NULL || *ep == NULL)
        return;
    endpoints *e = *ep;
    for (size_t i = 0; i < e->n; i++)
        entry_clear(&e->v[i]);
    mem_free(e->v);
    mem_free(e->default_model);
    pthread_mutex_destroy(&e->pub_mu);
    mem_free(e);
    *ep = NULL;
}

size_t endpoints_count(const endpoints *e)
{
    return e->n;
}

const endpoint *endpoints_get(const endpoints *e, size_t i)
{
    return &e->v[i].pub;
}

const char *endpoints_default_model(const endpoints *e)
{
    return e->default_model;
}

const char *endpoints_model(const endpoints *e, size_t i, const char *wanted)
{
    return e->v[i].model != NULL ? e->v[i].model : wanted;
}

/* ---- circuits ------------------------------------------------------------ */

static void publish_locked(endpoints *e, entry *x)
{
    if (e->health != NULL)
        health_set(e->health, x->health_name,
                   breaker_get(x->br) == BREAKER_CLOSED ? HEALTH_SERVING : HEALTH_NOT_SERVING);
}

void endpoints_publish(endpoints *e, health *h)
{
    pthread_mutex_lock(&e->pub_mu);
    e->health = h;
    for (size_t i = 0; i < e->n; i++)
        publish_locked(e, &e->v[i]);
    pthread_mutex_unlock(&e->pub_mu);
}

/* A circuit changed: logged, and published with its state as it is now
 * (two changes racing publish the later state last). */
static void moved(endpoints *e, entry *x, int was_probe, const char *why)
{
    const log_field f[] = {{"upstream", x->name}, {NULL, NULL}};
    /* This opening's cool-down (it just began, bar a race with another). */
    long long wait = (long long)breaker_wait_ms(x->br, rpc_now_ms());
    switch (breaker_get(x->br)) {
    case BREAKER_OPEN:
        if (was_probe)
            log_fields(LOG_WARN, f,
                       "upstream %s: the probe failed (%s): circuit open again for %lld ms",
                       x->name, why, wait);
        else
            log_fields(LOG_WARN, f,
                       "upstream %s: circuit open after failed requests in a row (last: %s): "
                       "skipped for %lld ms",
                       x->name, why, wait);
        break;
    case BREAKER_HALF_OPEN:
        log_fields(LOG_INFO, f, "upstream %s: circuit half-open: the next request probes it",
                   x->name);
        break;
    case BREAKER_CLOSED:
        log_fields(LOG_INFO, f, "upstream %s: circuit closed: the probe was answered", x->name);
        break;
    }
    pthread_mutex_lock(&e->pub_mu);
    publish_locked(e, x);
    metrics_gauge_set(x->circuit, breaker_get(x->br));
    pthread_mutex_unlock(&e->pub_mu);
}

int endpoints_admit(endpoints *e, size_t i, breaker_ticket *ticket)
{
    entry *x = &e->v[i];
    int changed = 0;
    int pass = breaker_admit(x->br, rpc_now_ms(), ticket, &changed);
    if (changed)
        moved(e, x, 0, "");
    if (!pass)
        metrics_counter_inc(x->skipped);
    return pass;
}

/* What an ended request says about its endpoint. */
static breaker_outcome outcome_of(const upstream_done_info *in)
{
    switch (in->result) {
    case UPSTREAM_OK:
        return BREAKER_SUCCESS;
    case UPSTREAM_HTTP:
        /* An answer the endpoint gave on purpose (400, 401, 404...) says it
         * is up; 429, 408 and 5xx say it cannot serve now. */
        return in->status == 429 || in->status == 408 || in->status >= 500 ? BREAKER_FAILURE
                                                                           : BREAKER_SUCCESS;
    case UPSTREAM_CONNECT:
    case UPSTREAM_TIMEOUT:
    case UPSTREAM_DROPPED:
        return BREAKER_FAILURE;
    default:
        return BREAKER_NEUTRAL; /* we stopped or cancelled it */
    }
}

static void describe(const upstream_done_info *in, char *out, size_t outsize)
{
    if (in->result == UPSTREAM_HTTP)
        snprintf(out, outsize, "HTTP %ld", in->status);
    else
        snprintf(out, outsize, "%s: %.120s",
                 in->result == UPSTREAM_CONNECT   ? "no connection"
                 : in->result == UPSTREAM_TIMEOUT ? "timeout"
                                                  : "dropped",
                 in->message);
}

int endpoints_report(endpoints *e, size_t i, const breaker_ticket *ticket,
                     const upstream_done_info *info)
{
    entry *x = &e->v[i];
    breaker_outcome o = outcome_of(info);
    metrics_counter_inc(x->results[o]);
    if (breaker_report(x->br, ticket, o, rpc_now_ms())) {
        char why[160];
        describe(info, why, sizeof why);
        moved(e, x, ticket->probe, why);
    }
    return o == BREAKER_FAILURE;
}

void endpoints_release(endpoints *e, size_t i, const breaker_ticket *ticket)
{
    breaker_report(e->v[i].br, ticket, BREAKER_NEUTRAL, rpc_now_ms());
}

void endpoints_refusal(endpoints *e, char *out, size_t outsize)
{
    int64_t now = rpc_now_ms();
    size_t off = (size_t)snprintf(out, outsize, "no upstream can take the request now:");
    for (size_t i = 0; i < e->n && off < outsize; i++) {
        entry *x = &e->v[i];
        int64_t wait = breaker_wait_ms(x->br, now);
        off += (size_t)snprintf(out + off, outsize - off, "%s %s circuit %s", i ? ";" : "", x->name,
                                breaker_state_name(breaker_get(x->br)));
        if (wait > 0 && off < outsize)
            off +=
                (size_t)snprintf(out + off, outsize - off, " (probed in %lld ms)", (long long)wait);
    }
}
