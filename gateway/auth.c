#include "auth.h"

#include "check.h"
#include "log.h"
#include "mem.h"

#include <cjose/cjose.h>
#include <curl/curl.h>
#include <json-c/json.h>

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

/* RFC 7518 3.2: an HS256 key must be at least as long as the hash. */
#define AUTH_SECRET_MIN 32
/* A secret file longer than this is not a secret file. */
#define AUTH_SECRET_FILE_MAX 4096
/* The dev mode's random secret. */
#define AUTH_DEV_SECRET_BYTES 32
/* iss of the dev mode's tokens (says where a token came from). */
#define AUTH_DEV_ISSUER "convo-gateway-dev"
/* RSA keys shorter than this are skipped (NIST SP 800-131A). */
#define AUTH_RSA_MIN_BITS 2048
/* Nesting accepted in a JWKS or in claims; real ones are 2-3 deep. */
#define AUTH_JSON_DEPTH 16
/* Signature sizes in bytes: HS256 is one SHA-256, ES256 is r||s of P-256. */
#define AUTH_HS256_SIG_BYTES 32
#define AUTH_ES256_SIG_BYTES 64

typedef enum auth_alg { AUTH_ALG_HS256, AUTH_ALG_RS256, AUTH_ALG_ES256 } auth_alg;

typedef struct auth_key {
    char *kid; /* NULL when the JWK has none */
    auth_alg alg;
    cjose_jwk_t *jwk;
} auth_key;

/* One loaded JWKS. Shared by the loop thread (verifying) and auth's thread
 * (replacing it); freed by whoever drops the last reference. */
typedef struct auth_keyset {
    int refs; /* under auth.lock */
    size_t n;
    auth_key *keys;
} auth_keyset;

struct auth {
    auth_mode mode;
    long long leeway, refetch_secs, refresh_secs, timeout_ms, ttl;
    size_t jwks_max, token_max;
    char *audience, *issuer, *jwks_file, *jwks_url, *ca_file;
    cjose_jwk_t *hmac;   /* the HS256 secret (jwt) or the start-up secret (dev) */
    double last_refetch; /* loop thread: monotonic time of the last unknown-kid reload; <0 never */
    int curl_ready;
    int thread_started;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake; /* on CLOCK_MONOTONIC */
    /* under lock: */
    auth_keyset *keys; /* NULL until a JWKS is loaded */
    int refetch_wanted;
    int stopping;
};

static const char *const codes[] = {
    "ok",
    "missing_token",
    "malformed_token",
    "bad_signature",
    "alg_not_allowed",
    "token_expired",
    "token_not_yet_valid",
    "wrong_audience",
    "wrong_issuer",
    "unknown_key",
    "invalid_subject",
    "auth_unavailable",
    "missing_exp",
    "wrong_mode",
};

const char *auth_strerror(int status)
{
    size_t i = (size_t)(-(long)status);
    if (status > 0 || i >= sizeof codes / sizeof codes[0])
        return "unknown_error";
    return codes[i];
}

auth_mode auth_get_mode(const auth *a)
{
    return a->mode;
}

static double now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static char *nonempty_dup(const char *s)
{
    return s != NULL && s[0] != '\0' ? mem_strdup(s) : NULL;
}

/* base64url length, without padding, of n bytes. */
static size_t b64url_len(size_t n)
{
    return (n * 4 + 2) / 3;
}

static int b64url_char(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_';
}

/* Parses all of text (trailing whitespace allowed) as JSON; NULL when it is
 * not exactly one JSON value. */
static json_object *json_parse_all(const char *text, size_t len)
{
    json_tokener *tok = json_tokener_new_ex(AUTH_JSON_DEPTH);
    json_object *o = json_tokener_parse_ex(tok, text, (int)len);
    size_t end = json_tokener_get_parse_end(tok);
    int ok = o != NULL && json_tokener_get_error(tok) == json_tokener_success;
    json_tokener_free(tok);
    for (; ok && end < len; end++)
        ok = text[end] == ' ' || text[end] == '\t' || text[end] == '\n' || text[end] == '\r';
    if (!ok) {
        json_object_put(o);
        return NULL;
    }
    return o;
}

/* A string member, or NULL when absent or not a string. */
static const char *str_member(json_object *o, const char *name)
{
    json_object *v;
    if (!json_object_object_get_ex(o, name, &v) || !json_object_is_type(v, json_type_string))
        return NULL;
    return json_object_get_string(v);
}

/* Reads a whole file of at most max bytes into a new NUL-terminated buffer.
 * `what` names the option, for the message in err. */
static int read_capped(const char *path, size_t max, const char *what, char **out, size_t *outlen,
                       char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        snprintf(err, errlen, "%s %s: %s", what, path, strerror(errno));
        return -1;
    }
    size_t cap = 4096, len = 0;
    char *buf = mem_alloc(cap);
    int rc = 0;
    for (;;) {
        if (len + 1 == cap)
            buf = mem_realloc(buf, cap *= 2);
        size_t n = fread(buf + len, 1, cap - 1 - len, f);
        len += n;
        if (len > max) {
            snprintf(err, errlen, "%s %s: over %zu bytes", what, path, max);
            rc = -1;
            break;
        }
        if (n == 0) {
            if (ferror(f)) {
                snprintf(err, errlen, "%s %s: read failed", what, path);
                rc = -1;
            }
            break;
        }
    }
    fclose(f);
    if (rc != 0) {
        mem_free(buf);
        return -1;
    }
    buf[len] = '\0';
    *out = buf;
    *outlen = len;
    return 0;
}

/* ------------------------------------------------------------------ keys */

static void keyset_free(auth_keyset *s)
{
    for (size_t i = 0; i < s->n; i++) {
        mem_free(s->keys[i].kid);
        cjose_jwk_release(s->keys[i].jwk);
    }
    mem_free(s->keys);
    mem_free(s);
}

static auth_keyset *keyset_get(auth *a)
{
    pthread_mutex_lock(&a->lock);
    auth_keyset *s = a->keys;
    if (s != NULL)
        s->refs++;
    pthread_mutex_unlock(&a->lock);
    return s;
}

static void keyset_put(auth *a, auth_keyset *s)
{
    if (s == NULL)
        return;
    pthread_mutex_lock(&a->lock);
    int last = --s->refs == 0;
    pthread_mutex_unlock(&a->lock);
    if (last)
        keyset_free(s);
}

/* Whether two sets hold the same kids in the same order (for the log). */
static int keyset_same_kids(const auth_keyset *x, const auth_keyset *y)
{
    if (x == NULL || y == NULL || x->n != y->n)
        return 0;
    for (size_t i = 0; i < x->n; i++) {
        const char *p = x->keys[i].kid, *q = y->keys[i].kid;
        if ((p == NULL) != (q == NULL) || (p != NULL && strcmp(p, q) != 0))
            return 0;
    }
    return 1;
}

/* Installs a new set (reference passed in); returns whether its kids differ
 * from the set it replaces. */
static int keyset_install(auth *a, auth_keyset *s)
{
    pthread_mutex_lock(&a->lock);
    auth_keyset *old = a->keys;
    int changed = !keyset_same_kids(old, s);
    a->keys = s;
    pthread_mutex_unlock(&a->lock);
    keyset_put(a, old);
    return changed;
}

/* Whether key_ops, when present, allows verifying. */
static int key_ops_verify(json_object *jk)
{
    json_object *ops;
    if (!json_object_object_get_ex(jk, "key_ops", &ops))
        return 1;
    if (!json_object_is_type(ops, json_type_array))
        return 0;
    for (size_t i = 0; i < json_object_array_length(ops); i++) {
        const char *op = json_object_get_string(json_object_array_get_idx(ops, i));
        if (op != NULL && strcmp(op, "verify") == 0)
            return 1;
    }
    return 0;
}

/* One JWK of a set: 0 with *k, or -1 with why it is skipped in why. Only
 * signature keys of the two asymmetric algorithms are taken: a symmetric
 * ("oct") key published in a JWKS would let anyone who read it sign. */
static int key_from_json(json_object *jk, auth_key *k, char *why, size_t whylen)
{
    const char *kty = str_member(jk, "kty"), *alg = str_member(jk, "alg");
    const char *use = str_member(jk, "use"), *crv = str_member(jk, "crv");
    const char *want;
    if (kty != NULL && strcmp(kty, "RSA") == 0) {
        k->alg = AUTH_ALG_RS256;
        want = "RS256";
    } else if (kty != NULL && strcmp(kty, "EC") == 0 && crv != NULL && strcmp(crv, "P-256") == 0) {
        k->alg = AUTH_ALG_ES256;
        want = "ES256";
    } else {
        snprintf(why, whylen, "kty %s%s%s is not used (RSA for RS256, EC P-256 for ES256)",
                 kty != NULL ? kty : "(none)", crv != NULL ? " " : "", crv != NULL ? crv : "");
        return -1;
    }
    if (alg != NULL && strcmp(alg, want) != 0) {
        snprintf(why, whylen, "alg %s is not accepted (only %s for kty %s)", alg, want, kty);
        return -1;
    }
    if ((use != NULL && strcmp(use, "sig") != 0) || !key_ops_verify(jk)) {
        snprintf(why, whylen, "not a signature key (use / key_ops)");
        return -1;
    }
    const char *text = json_object_to_json_string_ext(jk, JSON_C_TO_STRING_PLAIN);
    cjose_err cerr = {0};
    k->jwk = cjose_jwk_import(text, strlen(text), &cerr);
    if (k->jwk == NULL) {
        snprintf(why, whylen, "not a valid key (%s)", cerr.message ? cerr.message : "cjose");
        return -1;
    }
    if (k->alg == AUTH_ALG_RS256 && cjose_jwk_get_keysize(k->jwk, NULL) < AUTH_RSA_MIN_BITS) {
        snprintf(why, whylen, "RSA key of %zu bits, under %d", cjose_jwk_get_keysize(k->jwk, NULL),
                 AUTH_RSA_MIN_BITS);
        cjose_jwk_release(k->jwk);
        return -1;
    }
    const char *kid = str_member(jk, "kid");
    k->kid = kid != NULL ? mem_strdup(kid) : NULL;
    return 0;
}

/* Parses a JWKS: 0 with a set of at least one usable key (refs 1), or -1
 * with why in err. Unusable keys are skipped with a warning. */
static int keyset_parse(const char *body, size_t len, const char *source, auth_keyset **out,
                        char *err, size_t errlen)
{
    json_object *root = json_parse_all(body, len), *arr;
    if (root == NULL || !json_object_object_get_ex(root, "keys", &arr) ||
        !json_object_is_type(arr, json_type_array)) {
        snprintf(err, errlen, "JWKS %s: not a JSON object with a \"keys\" array", source);
        json_object_put(root);
        return -1;
    }
    size_t n = json_object_array_length(arr);
    auth_keyset *s = mem_calloc(1, sizeof *s);
    s->refs = 1;
    s->keys = mem_calloc(n > 0 ? n : 1, sizeof *s->keys);
    for (size_t i = 0; i < n; i++) {
        json_object *jk = json_object_array_get_idx(arr, i);
        char why[256];
        if (!json_object_is_type(jk, json_type_object)) {
            log_warn("JWKS %s: key %zu skipped: not an object", source, i);
            continue;
        }
        if (key_from_json(jk, &s->keys[s->n], why, sizeof why) != 0) {
            const char *kid = str_member(jk, "kid");
            log_warn("JWKS %s: key %zu (kid %s) skipped: %s", source, i, kid != NULL ? kid : "none",
                     why);
            continue;
        }
        s->n++;
    }
    json_object_put(root);
    if (s->n == 0) {
        snprintf(err, errlen,
                 "JWKS %s: no usable key (RSA 2048+ bits for RS256, EC P-256 for "
                 "ES256)",
                 source);
        keyset_free(s);
        return -1;
    }
    *out = s;
    return 0;
}

/* The body of a JWKS fetch, capped at --jwks-max-bytes. */
typedef struct fetch_buf {
    char *data;
    size_t len, cap, max;
    int over;
} fetch_buf;

static size_t on_body(char *p, size_t size, size_t n, void *arg)
{
    fetch_buf *b = arg;
    size_t add = size * n;
    if (add > b->max - b->len) {
        b->over = 1;
        return 0; /* curl stops with CURLE_WRITE_ERROR */
    }
    if (b->len + add + 1 > b->cap) {
        while (b->len + add + 1 > b->cap)
            b->cap = b->cap ? b->cap * 2 : 4096;
        b->data = mem_realloc(b->data, b->cap);
    }
    memcpy(b->data + b->len, p, add);
    b->len += add;
    b->data[b->len] = '\0';
    return add;
}

/* GETs --jwks-url: 0 with the body (mem_alloc), or -1 with why in err. */
static int fetch_url(auth *a, char **out, size_t *outlen, char *err, size_t errlen)
{
    fetch_buf b = {.max = a->jwks_max};
    char cerr[CURL_ERROR_SIZE] = "";
    long status = 0;
    int rc = -1;
    CURL *h = curl_easy_init();
    if (h == NULL) {
        snprintf(err, errlen, "JWKS %s: curl_easy_init failed", a->jwks_url);
        return -1;
    }
    curl_easy_setopt(h, CURLOPT_URL, a->jwks_url);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https"); /* http: loopback only (auth_new) */
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)a->timeout_ms);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(h, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
    if (a->ca_file != NULL)
        curl_easy_setopt(h, CURLOPT_CAINFO, a->ca_file);
    curl_easy_setopt(h, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)a->jwks_max);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, cerr);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "convo-gateway/" CONVO_VERSION);
    CURLcode cc = curl_easy_perform(h);
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    if (b.over || cc == CURLE_FILESIZE_EXCEEDED)
        snprintf(err, errlen, "JWKS %s: over --jwks-max-bytes (%zu)", a->jwks_url, b.max);
    else if (cc != CURLE_OK)
        snprintf(err, errlen, "JWKS %s: %s", a->jwks_url, cerr[0] ? cerr : curl_easy_strerror(cc));
    else if (status != 200)
        snprintf(err, errlen, "JWKS %s: HTTP status %ld", a->jwks_url, status);
    else
        rc = 0;
    curl_easy_cleanup(h);
    if (rc != 0) {
        mem_free(b.data);
        return -1;
    }
    *out = b.data != NULL ? b.data : mem_strdup("");
    *outlen = b.len;
    return 0;
}

/* Loads the JWKS from its source and installs it. 0, or -1 with why in err
 * (the set loaded before stays). */
static int keys_load(auth *a, const char *why, char *err, size_t errlen)
{
    char *body = NULL;
    size_t len = 0;
    auth_keyset *s = NULL;
    const char *source = a->jwks_url != NULL ? a->jwks_url : a->jwks_file;
    int rc = a->jwks_url != NULL
                 ? fetch_url(a, &body, &len, err, errlen)
                 : read_capped(a->jwks_file, a->jwks_max, "--jwks-file", &body, &len, err, errlen);
    if (rc == 0)
        rc = keyset_parse(body, len, source, &s, err, errlen);
    mem_free(body);
    if (rc != 0)
        return -1;
    size_t n = s->n;
    if (keyset_install(a, s))
        log_info("JWKS %s loaded (%s): %zu keys", source, why, n);
    else
        log_debug("JWKS %s reloaded (%s): %zu keys, unchanged", source, why, n);
    return 0;
}

/* keys_load from a thread that goes on when it fails (the old set stays). */
static void keys_reload(auth *a, const char *why)
{
    char err[512];
    if (keys_load(a, why, err, sizeof err) != 0) {
        auth_keyset *s = keyset_get(a);
        log_warn("%s; keeping the %zu keys loaded before", err, s != NULL ? s->n : 0);
        keyset_put(a, s);
    }
}

static struct timespec mono_deadline(double secs_from_now)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double whole = floor(secs_from_now);
    ts.tv_sec += (time_t)whole;
    ts.tv_nsec += (long)((secs_from_now - whole) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

/* auth's thread: reloads the JWKS every --jwks-refresh-secs (every
 * --jwks-refetch-secs while none is loaded) and when the loop asks. */
static void *refresher(void *arg)
{
    auth *a = arg;
    pthread_mutex_lock(&a->lock);
    while (!a->stopping) {
        long long period = a->keys != NULL ? a->refresh_secs : a->refetch_secs;
        struct timespec until = mono_deadline((double)period);
        int rc = 0;
        while (!a->stopping && !a->refetch_wanted && rc != ETIMEDOUT)
            rc = pthread_cond_timedwait(&a->wake, &a->lock, &until);
        if (a->stopping)
            break;
        const char *why = a->refetch_wanted ? "unknown kid" : "refresh";
        a->refetch_wanted = 0;
        pthread_mutex_unlock(&a->lock);
        keys_reload(a, why);
        pthread_mutex_lock(&a->lock);
    }
    pthread_mutex_unlock(&a->lock);
    return NULL;
}

/* ---------------------------------------------------------------- verify */

/* The key for alg/kid in s: 0 with *key, or unknown_key / alg_not_allowed /
 * auth_unavailable. A token without kid is verified only when exactly one
 * key of its algorithm is loaded: trying every key would let one token cost
 * as many verifications as the set has keys. */
static int find_key(const auth_keyset *s, auth_alg alg, const char *kid, const cjose_jwk_t **key)
{
    if (s == NULL)
        return AUTH_EUNAVAILABLE;
    int rc = AUTH_EUNKNOWNKEY;
    size_t fits = 0;
    for (size_t i = 0; i < s->n; i++) {
        const auth_key *k = &s->keys[i];
        if (kid != NULL && (k->kid == NULL || strcmp(k->kid, kid) != 0))
            continue;
        if (k->alg != alg) {
            rc = kid != NULL ? AUTH_EALG : rc; /* the kid names a key of another type */
            continue;
        }
        *key = k->jwk;
        fits++;
        if (kid != NULL)
            return 0;
    }
    return fits == 1 ? 0 : rc;
}

/* Whether an unknown-kid reload may start now (--jwks-refetch-secs). */
static int refetch_due(auth *a)
{
    double now = now_mono();
    if (a->last_refetch >= 0 && now - a->last_refetch < (double)a->refetch_secs)
        return 0;
    a->last_refetch = now;
    return 1;
}

/* The JWKS key for a token, holding a reference on its set in *set. */
static int jwks_key(auth *a, auth_alg alg, const char *kid, auth_keyset **set,
                    const cjose_jwk_t **key)
{
    if (a->jwks_url == NULL && a->jwks_file == NULL)
        return AUTH_EALG;
    *set = keyset_get(a);
    int rc = find_key(*set, alg, kid, key);
    int missing = rc == AUTH_EUNAVAILABLE || (rc == AUTH_EUNKNOWNKEY && kid != NULL);
    if (!missing || !refetch_due(a))
        return rc;
    if (a->jwks_file != NULL) {
        /* A local file: read it now, so a rotated key verifies at once. */
        keyset_put(a, *set);
        keys_reload(a, "unknown kid");
        *set = keyset_get(a);
        return find_key(*set, alg, kid, key);
    }
    pthread_mutex_lock(&a->lock);
    a->refetch_wanted = 1;
    pthread_cond_signal(&a->wake);
    pthread_mutex_unlock(&a->lock);
    return rc;
}

/* Members of the header libcjose's API cannot show when they are not
 * strings: crit (RFC 7515 4.1.11: extensions named there must be understood;
 * we understand none, so any crit is refused) and a kid that is no string.
 * The header segment (hdr, len) is decoded and read once more for them. */
static int header_members_ok(const char *hdr, size_t len)
{
    uint8_t *text = NULL;
    size_t tlen = 0;
    json_object *h = NULL, *kid;
    int ok =
        cjose_base64url_decode(hdr, len, &text, &tlen, NULL) &&
        (h = json_parse_all((const char *)text, tlen)) != NULL &&
        json_object_is_type(h, json_type_object) && !json_object_object_get_ex(h, "crit", NULL) &&
        (!json_object_object_get_ex(h, "kid", &kid) || json_object_is_type(kid, json_type_string));
    json_object_put(h);
    cjose_get_dealloc()(text);
    return ok;
}

/* alg and kid of the protected header (hdr, len: its segment). */
static int read_header(cjose_jws_t *jws, const char *hdr, size_t len, auth_alg *alg,
                       const char **kid)
{
    cjose_header_t *h = cjose_jws_get_protected(jws);
    const char *name = cjose_header_get(h, CJOSE_HDR_ALG, NULL);
    if (name == NULL)
        return AUTH_EMALFORMED;
    if (strcmp(name, "HS256") == 0)
        *alg = AUTH_ALG_HS256;
    else if (strcmp(name, "RS256") == 0)
        *alg = AUTH_ALG_RS256;
    else if (strcmp(name, "ES256") == 0)
        *alg = AUTH_ALG_ES256;
    else
        return AUTH_EALG; /* "none", HS512, PS256, ... */
    if (!header_members_ok(hdr, len))
        return AUTH_EMALFORMED;
    *kid = cjose_header_get(h, CJOSE_HDR_KID, NULL);
    return 0;
}

/* Whether the signature segment has the one length the key produces. libcjose
 * compares an HMAC over the digest's length before checking the length of
 * the signature (reading past a shorter one), so this runs first. */
static int sig_length_ok(auth_alg alg, const cjose_jwk_t *key, size_t chars)
{
    size_t bytes = alg == AUTH_ALG_HS256   ? AUTH_HS256_SIG_BYTES
                   : alg == AUTH_ALG_ES256 ? AUTH_ES256_SIG_BYTES
                                           : cjose_jwk_get_keysize(key, NULL) / 8;
    return chars == b64url_len(bytes);
}

/* A NumericDate claim: 1 with *out, 0 when absent, -1 when not a number. */
static int numeric_date(json_object *c, const char *name, double *out)
{
    json_object *v;
    if (!json_object_object_get_ex(c, name, &v))
        return 0;
    if (json_object_is_type(v, json_type_int))
        *out = (double)json_object_get_int64(v);
    else if (json_object_is_type(v, json_type_double))
        *out = json_object_get_double(v);
    else
        return -1;
    return isfinite(*out) ? 1 : -1;
}

/* aud is a string or an array of strings (RFC 7519 4.1.3). */
static int audience_has(json_object *c, const char *want)
{
    json_object *aud;
    if (!json_object_object_get_ex(c, "aud", &aud))
        return 0;
    if (json_object_is_type(aud, json_type_string))
        return strcmp(json_object_get_string(aud), want) == 0;
    if (!json_object_is_type(aud, json_type_array))
        return 0;
    for (size_t i = 0; i < json_object_array_length(aud); i++) {
        json_object *v = json_object_array_get_idx(aud, i);
        if (json_object_is_type(v, json_type_string) &&
            strcmp(json_object_get_string(v), want) == 0)
            return 1;
    }
    return 0;
}

static int check_times(const auth *a, json_object *c)
{
    double now = (double)time(NULL), leeway = (double)a->leeway, t;
    int has = numeric_date(c, "exp", &t);
    if (has < 0)
        return AUTH_EMALFORMED;
    if (has == 0)
        return AUTH_ENOEXP;
    if (now >= t + leeway)
        return AUTH_EEXPIRED;
    const char *const later[] = {"nbf", "iat"}; /* neither may lie in the future */
    for (size_t i = 0; i < 2; i++) {
        has = numeric_date(c, later[i], &t);
        if (has < 0)
            return AUTH_EMALFORMED;
        if (has > 0 && now + leeway < t)
            return AUTH_ENOTYET;
    }
    return 0;
}

static int check_claims(const auth *a, json_object *c, char *user, size_t usercap)
{
    int rc = check_times(a, c);
    if (rc != 0)
        return rc;
    const char *iss = str_member(c, "iss");
    if (a->mode == AUTH_MODE_JWT && a->issuer != NULL &&
        (iss == NULL || strcmp(iss, a->issuer) != 0))
        return AUTH_EISSUER;
    if (a->mode == AUTH_MODE_JWT && a->audience != NULL && !audience_has(c, a->audience))
        return AUTH_EAUDIENCE;
    json_object *sub;
    char why[128];
    if (!json_object_object_get_ex(c, "sub", &sub) || !json_object_is_type(sub, json_type_string))
        return AUTH_ESUBJECT;
    const char *s = json_object_get_string(sub);
    size_t len = (size_t)json_object_get_string_len(sub);
    if (strlen(s) != len || check_id("sub", s, why, sizeof why) != 0 || len >= usercap)
        return AUTH_ESUBJECT; /* an escaped NUL, a byte outside the id rule, too long */
    memcpy(user, s, len + 1);
    return 0;
}

/* A compact JWS: three non-empty base64url segments, no padding. Returns the
 * signature segment, or NULL. (JWE tokens have five segments.) */
static const char *compact_sig(const char *t, size_t len)
{
    const char *dot[2] = {NULL, NULL};
    int n = 0;
    for (size_t i = 0; i < len; i++) {
        if (t[i] == '.') {
            if (n == 2)
                return NULL;
            dot[n++] = t + i;
        } else if (!b64url_char((unsigned char)t[i])) {
            return NULL;
        }
    }
    if (n != 2 || dot[0] == t || dot[1] == dot[0] + 1 || dot[1] + 1 == t + len)
        return NULL;
    return dot[1] + 1;
}

int auth_verify(auth *a, const char *token, char *user, size_t usercap)
{
    if (a->mode == AUTH_MODE_NONE)
        return AUTH_EMODE;
    if (token == NULL || token[0] == '\0')
        return AUTH_EMISSING;
    size_t len = strnlen(token, a->token_max + 1);
    const char *sig = len <= a->token_max ? compact_sig(token, len) : NULL;
    if (sig == NULL)
        return AUTH_EMALFORMED;

    cjose_jws_t *jws = NULL;
    auth_keyset *set = NULL;
    json_object *claims = NULL;
    const cjose_jwk_t *key = NULL;
    auth_alg alg;
    const char *kid = NULL;
    uint8_t *payload;
    size_t plen;
    int rc;

    jws = cjose_jws_import(token, len, NULL);
    if (jws == NULL) {
        rc = AUTH_EMALFORMED;
        goto out;
    }
    rc = read_header(jws, token, (size_t)(strchr(token, '.') - token), &alg, &kid);
    if (rc != 0)
        goto out;
    if (alg == AUTH_ALG_HS256) {
        key = a->hmac;
        rc = key != NULL ? 0 : AUTH_EALG; /* e.g. an HS256 token "signed" with a public key */
    } else {
        rc = a->mode == AUTH_MODE_JWT ? jwks_key(a, alg, kid, &set, &key) : AUTH_EALG;
    }
    if (rc != 0)
        goto out;
    if (!sig_length_ok(alg, key, (size_t)(token + len - sig)) ||
        !cjose_jws_verify(jws, key, NULL)) {
        rc = AUTH_EBADSIG;
        goto out;
    }
    /* Claims are read only from a token whose signature holds. */
    if (!cjose_jws_get_plaintext(jws, &payload, &plen, NULL) ||
        (claims = json_parse_all((const char *)payload, plen)) == NULL ||
        !json_object_is_type(claims, json_type_object)) {
        rc = AUTH_EMALFORMED;
        goto out;
    }
    rc = check_claims(a, claims, user, usercap);
out:
    json_object_put(claims);
    keyset_put(a, set);
    cjose_jws_release(jws);
    return rc;
}

/* ------------------------------------------------------------------- dev */

int auth_dev_sign(auth *a, const char *user, char **token_out)
{
    char why[128];
    if (a->mode != AUTH_MODE_DEV)
        return AUTH_EMODE;
    if (check_id("user", user, why, sizeof why) != 0)
        return AUTH_ESUBJECT;
    int64_t now = (int64_t)time(NULL);
    json_object *c = json_object_new_object();
    json_object_object_add(c, "sub", json_object_new_string(user));
    json_object_object_add(c, "iss", json_object_new_string(AUTH_DEV_ISSUER));
    json_object_object_add(c, "iat", json_object_new_int64(now));
    json_object_object_add(c, "exp", json_object_new_int64(now + a->ttl));
    const char *payload = json_object_to_json_string_ext(c, JSON_C_TO_STRING_PLAIN);
    cjose_header_t *h = cjose_header_new(NULL);
    cjose_jws_t *jws = NULL;
    const char *compact = NULL;
    int rc = AUTH_EUNAVAILABLE;
    if (h != NULL && cjose_header_set(h, CJOSE_HDR_ALG, CJOSE_HDR_ALG_HS256, NULL) &&
        cjose_header_set(h, "typ", "JWT", NULL))
        jws = cjose_jws_sign(a->hmac, h, (const uint8_t *)payload, strlen(payload), NULL);
    if (jws != NULL && cjose_jws_export(jws, &compact, NULL)) {
        *token_out = mem_strdup(compact);
        rc = 0;
    }
    cjose_jws_release(jws);
    cjose_header_release(h);
    json_object_put(c);
    return rc;
}

/* ----------------------------------------------------------------- setup */

static int random_bytes(uint8_t *buf, size_t n)
{
    for (size_t got = 0; got < n;) {
        ssize_t r = getrandom(buf + got, n - got, 0);
        if (r < 0 && errno != EINTR)
            return -1;
        if (r > 0)
            got += (size_t)r;
    }
    return 0;
}

static int setup_secret(auth *a, const char *path, char *err, size_t errlen)
{
    char *secret = NULL;
    size_t len = 0;
    if (read_capped(path, AUTH_SECRET_FILE_MAX, "--jwt-secret-file", &secret, &len, err, errlen) !=
        0)
        return -1;
    if (len > 0 && secret[len - 1] == '\n')
        len--;
    if (len > 0 && secret[len - 1] == '\r')
        len--;
    int rc = -1;
    if (len < AUTH_SECRET_MIN)
        snprintf(err, errlen,
                 "--jwt-secret-file %s: the secret is %zu bytes; HS256 needs at least %d", path,
                 len, AUTH_SECRET_MIN);
    else if ((a->hmac = cjose_jwk_create_oct_spec((const uint8_t *)secret, len, NULL)) == NULL)
        snprintf(err, errlen, "--jwt-secret-file %s: the key could not be made", path);
    else
        rc = 0;
    explicit_bzero(secret, len);
    mem_free(secret);
    return rc;
}

static int setup_dev(auth *a, char *err, size_t errlen)
{
    uint8_t secret[AUTH_DEV_SECRET_BYTES];
    if (random_bytes(secret, sizeof secret) != 0) {
        snprintf(err, errlen, "--auth dev: getrandom failed: %s", strerror(errno));
        return -1;
    }
    a->hmac = cjose_jwk_create_oct_spec(secret, sizeof secret, NULL);
    explicit_bzero(secret, sizeof secret);
    if (a->hmac == NULL) {
        snprintf(err, errlen, "--auth dev: the signing key could not be made");
        return -1;
    }
    return 0;
}

/* --jwks-url must be https: keys fetched in the clear could be replaced on
 * the way. http is accepted to a loopback host (an identity provider run on
 * the same machine, e.g. a local Supabase). */
static int check_jwks_url(const char *url, char *err, size_t errlen)
{
    CURLU *u = curl_url();
    char *scheme = NULL, *host = NULL;
    int rc = -1;
    if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK) {
        snprintf(err, errlen, "--jwks-url '%s' is not a URL", url);
    } else if (strcmp(scheme, "https") == 0) {
        rc = 0;
    } else if (strcmp(scheme, "http") == 0 &&
               (strcmp(host, "localhost") == 0 || strncmp(host, "127.", 4) == 0 ||
                strcmp(host, "[::1]") == 0)) {
        rc = 0;
    } else {
        snprintf(err, errlen, "--jwks-url '%s': must be https (http only to a loopback host)", url);
    }
    curl_free(scheme);
    curl_free(host);
    curl_url_cleanup(u);
    return rc;
}

static int setup_jwks(auth *a, char *err, size_t errlen)
{
    if (a->jwks_url != NULL && a->jwks_file != NULL) {
        snprintf(err, errlen, "give one of --jwks-file and --jwks-url, not both");
        return -1;
    }
    if (a->jwks_url != NULL) {
        if (check_jwks_url(a->jwks_url, err, errlen) != 0)
            return -1;
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
            snprintf(err, errlen, "curl_global_init failed");
            return -1;
        }
        a->curl_ready = 1;
        char why[512];
        if (keys_load(a, "start", why, sizeof why) != 0)
            log_warn("%s; tokens signed with its keys are refused (auth_unavailable) until a "
                     "fetch succeeds (retried every %lld s)",
                     why, a->refetch_secs);
    } else if (keys_load(a, "start", err, errlen) != 0) {
        return -1;
    }
    if (pthread_create(&a->thread, NULL, refresher, a) != 0) {
        snprintf(err, errlen, "the JWKS refresh thread could not start");
        return -1;
    }
    a->thread_started = 1;
    return 0;
}

static int parse_mode(const char *s, auth_mode *m)
{
    if (strcmp(s, "jwt") == 0)
        *m = AUTH_MODE_JWT;
    else if (strcmp(s, "dev") == 0)
        *m = AUTH_MODE_DEV;
    else if (strcmp(s, "none") == 0)
        *m = AUTH_MODE_NONE;
    else
        return -1;
    return 0;
}

int auth_new(const auth_opts *o, auth **out, char *err, size_t errlen)
{
    auth *a = mem_calloc(1, sizeof *a);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&a->wake, &attr);
    pthread_condattr_destroy(&attr);
    pthread_mutex_init(&a->lock, NULL);
    a->last_refetch = -1;
    a->leeway = o->jwt_leeway_secs;
    a->refetch_secs = o->jwks_refetch_secs;
    a->refresh_secs = o->jwks_refresh_secs;
    a->timeout_ms = o->jwks_timeout_ms;
    a->ttl = o->dev_token_ttl_secs;
    a->jwks_max = (size_t)o->jwks_max_bytes;
    a->token_max = (size_t)o->jwt_max_bytes;
    a->audience = nonempty_dup(o->jwt_audience);
    a->issuer = nonempty_dup(o->jwt_issuer);
    a->ca_file = nonempty_dup(o->jwks_ca_file);

    if (parse_mode(o->mode != NULL ? o->mode : "", &a->mode) != 0) {
        snprintf(err, errlen, "--auth: '%s' is not jwt, dev or none", o->mode ? o->mode : "");
        goto fail;
    }
    if (a->mode == AUTH_MODE_DEV && setup_dev(a, err, errlen) != 0)
        goto fail;
    if (a->mode != AUTH_MODE_JWT)
        goto done;

    a->jwks_file = nonempty_dup(o->jwks_file);
    a->jwks_url = nonempty_dup(o->jwks_url);
    int secret = o->jwt_secret_file != NULL && o->jwt_secret_file[0] != '\0';
    if (!secret && a->jwks_file == NULL && a->jwks_url == NULL) {
        snprintf(err, errlen,
                 "--auth jwt needs a key source: --jwt-secret-file, --jwks-file or --jwks-url "
                 "(env JWT_SECRET_FILE, JWKS_FILE, JWKS_URL); for a local run without an identity "
                 "provider use --auth dev");
        goto fail;
    }
    if (secret && setup_secret(a, o->jwt_secret_file, err, errlen) != 0)
        goto fail;
    if ((a->jwks_file != NULL || a->jwks_url != NULL) && setup_jwks(a, err, errlen) != 0)
        goto fail;
done:
    *out = a;
    return 0;
fail:
    auth_destroy(&a);
    return -1;
}

void auth_destroy(auth **ap)
{
    auth *a = *ap;
    if (a == NULL)
        return;
    if (a->thread_started) {
        pthread_mutex_lock(&a->lock);
        a->stopping = 1;
        pthread_cond_signal(&a->wake);
        pthread_mutex_unlock(&a->lock);
        pthread_join(a->thread, NULL);
    }
    keyset_put(a, a->keys);
    cjose_jwk_release(a->hmac);
    if (a->curl_ready)
        curl_global_cleanup();
    mem_free(a->audience);
    mem_free(a->issuer);
    mem_free(a->jwks_file);
    mem_free(a->jwks_url);
    mem_free(a->ca_file);
    pthread_cond_destroy(&a->wake);
    pthread_mutex_destroy(&a->lock);
    mem_free(a);
    *ap = NULL;
}
