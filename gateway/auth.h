/* auth — who is calling: bearer tokens (JWT) checked at the gateway's edge.
 *
 * --auth jwt verifies the tokens of an identity provider: HS256 with a shared
 * secret (--jwt-secret-file: Supabase's legacy project JWT secret) and
 * RS256/ES256 with the provider's public keys (a JWKS, --jwks-file or
 * --jwks-url); both sources may be set at once (a provider migrating from
 * the secret to asymmetric keys). --auth dev signs and verifies the
 * gateway's own HS256 tokens with a random secret made at start-up (a local
 * run without an identity provider). --auth none verifies nothing.
 *
 * Signatures are checked by libcjose; the claims here: exp (required),
 * nbf and iat (with --jwt-leeway-secs), iss and aud (when configured), sub
 * (the user: 1 to AUTH_USER_MAX bytes of [A-Za-z0-9._-], the rule every
 * service applies to user ids). Each algorithm is accepted only with its
 * own key type: HS256 with the secret, RS256 with an RSA key (2048 bits or
 * more), ES256 with an EC P-256 key; anything else (alg "none", HS256
 * "signed" with a public key, RS384, ...) is alg_not_allowed.
 *
 * Threads: auth_verify and auth_dev_sign run on one thread (the gateway's
 * loop) and never wait for the network. A --jwks-url is fetched by auth's
 * own thread (libcurl, TLS verified, size and time bounded), at start, every
 * --jwks-refresh-secs and when a token names an unknown kid (at most once
 * per --jwks-refetch-secs); a new key set replaces the old one under a lock.
 * Meanwhile that token is refused (unknown_key) — the client retries, and
 * once the fetch has landed its token verifies. A --jwks-file is re-read on
 * the calling thread for an unknown kid (same rate bound; a local read) and
 * on auth's thread every --jwks-refresh-secs.
 *
 * Tokens are never logged, at any level. */
#ifndef GW_AUTH_H
#define GW_AUTH_H

#include "check.h"
#include "conf.h"

#include <stddef.h>

/* Upper bounds of the size options (json-c parses lengths as int). */
#define AUTH_JWKS_MAX_LIMIT  (16 * 1024 * 1024)
#define AUTH_TOKEN_MAX_LIMIT (1024 * 1024)

#define AUTH_OPTS(X, S)                                                                            \
    X(S, mode, STR, "auth", "AUTH_MODE", "jwt",                                                    \
      "jwt (verify an identity provider's tokens), dev (the gateway signs its own tokens; "        \
      "local runs) or none (trust ?user_id=, as the seed did)")                                    \
    X(S, jwt_secret_file, STR, "jwt-secret-file", "JWT_SECRET_FILE", "",                           \
      "file holding the HS256 secret (Supabase: the legacy project JWT secret), at least 32 "      \
      "bytes; one trailing newline is ignored")                                                    \
    X(S, jwks_file, STR, "jwks-file", "JWKS_FILE", "",                                             \
      "JWKS file of the RS256/ES256 public keys; re-read for an unknown kid and every "            \
      "--jwks-refresh-secs")                                                                       \
    X(S, jwks_url, STR, "jwks-url", "JWKS_URL", "",                                                \
      "JWKS URL (Supabase: https://<ref>.supabase.co/auth/v1/.well-known/jwks.json); https, "      \
      "or http to a loopback host only")                                                           \
    X(S, jwks_ca_file, STR, "jwks-ca-file", "JWKS_CA_FILE", "",                                    \
      "CA certificates (PEM) trusted for --jwks-url; empty: the system's")                         \
    X(S, jwt_audience, STR, "jwt-audience", "JWT_AUDIENCE", "",                                    \
      "when set, tokens must carry it in aud (Supabase: authenticated)")                           \
    X(S, jwt_issuer, STR, "jwt-issuer", "JWT_ISSUER", "",                                          \
      "when set, tokens must carry it as iss (Supabase: https://<ref>.supabase.co/auth/v1)")       \
    X(S, jwt_leeway_secs, INT, "jwt-leeway-secs", "JWT_LEEWAY_SECS", "30",                         \
      "clock difference allowed when checking exp, nbf and iat")                                   \
    X(S, jwt_max_bytes, INT_IN(1, AUTH_TOKEN_MAX_LIMIT), "jwt-max-bytes", "JWT_MAX_BYTES", "8192", \
      "longest token accepted; longer is malformed_token")                                         \
    X(S, jwks_refetch_secs, INT_IN(1, CONF_NO_MAX), "jwks-refetch-secs", "JWKS_REFETCH_SECS",      \
      "30", "least time between JWKS reloads asked for by tokens with an unknown kid")             \
    X(S, jwks_refresh_secs, INT_IN(1, CONF_NO_MAX), "jwks-refresh-secs", "JWKS_REFRESH_SECS",      \
      "600", "the JWKS is reloaded this often (a key the provider removed stops verifying)")       \
    X(S, jwks_timeout_ms, INT_IN(1, CONF_NO_MAX), "jwks-timeout-ms", "JWKS_TIMEOUT_MS", "5000",    \
      "deadline of one --jwks-url fetch")                                                          \
    X(S, jwks_max_bytes, INT_IN(1, AUTH_JWKS_MAX_LIMIT), "jwks-max-bytes", "JWKS_MAX_BYTES",       \
      "262144", "largest JWKS accepted (file or URL)")                                             \
    X(S, dev_token_ttl_secs, INT_IN(1, CONF_NO_MAX), "dev-token-ttl-secs", "DEV_TOKEN_TTL_SECS",   \
      "86400", "lifetime of the tokens --auth dev signs")                                          \
    X(S, dev_allow_remote, BOOL, "dev-allow-remote", "DEV_ALLOW_REMOTE", "false",                  \
      "let --auth dev listen on a non-loopback address (anyone reaching it can sign in as "        \
      "anyone)")
CONF_DECLARE(auth_opts, AUTH_OPTS)

typedef enum auth_mode { AUTH_MODE_JWT, AUTH_MODE_DEV, AUTH_MODE_NONE } auth_mode;

typedef struct auth auth;

/* The longest user id (sub) accepted: the ids rule of runtime/check.h, so a
 * verified user is a valid user_id for every service. Supabase's subs are
 * UUIDs; a provider whose subs hold other bytes ("auth0|...") is refused
 * with invalid_subject. */
#define AUTH_USER_MAX CHECK_ID_MAX

/* Refusals, each with a stable code from auth_strerror(). */
enum {
    AUTH_EMISSING = -1,      /* missing_token: no token given */
    AUTH_EMALFORMED = -2,    /* malformed_token: not a compact JWS with JSON header and claims */
    AUTH_EBADSIG = -3,       /* bad_signature */
    AUTH_EALG = -4,          /* alg_not_allowed: an algorithm without a key of its type */
    AUTH_EEXPIRED = -5,      /* token_expired */
    AUTH_ENOTYET = -6,       /* token_not_yet_valid: nbf or iat in the future */
    AUTH_EAUDIENCE = -7,     /* wrong_audience */
    AUTH_EISSUER = -8,       /* wrong_issuer */
    AUTH_EUNKNOWNKEY = -9,   /* unknown_key: no key with the token's kid (retry shortly) */
    AUTH_ESUBJECT = -10,     /* invalid_subject: sub missing or not a valid user id */
    AUTH_EUNAVAILABLE = -11, /* auth_unavailable: no key set loaded yet (retry later) */
    AUTH_ENOEXP = -12,       /* missing_exp: a token that never expires */
    AUTH_EMODE = -13,        /* wrong_mode: dev tokens asked for outside --auth dev */
};

/* Checks the options (conf_parse checked their numbers' ranges) and sets up
 * the mode: reads the secret and the JWKS file, fetches the JWKS URL once (a
 * failure there is logged and retried on auth's thread; tokens get
 * auth_unavailable meanwhile) and starts auth's thread. Returns 0 with
 * *out, or -1 with the reason in err (jwt mode without a key source names
 * `--auth dev` for local use). */
int auth_new(const auth_opts *o, auth **out, char *err, size_t errlen);
/* Stops auth's thread and frees everything; clears *a. NULL is fine. */
void auth_destroy(auth **a);
auth_mode auth_get_mode(const auth *a);
/* Verifies a bearer token (NUL-terminated; NULL or "" is missing_token).
 * Returns 0 with the user (sub) in user, or an AUTH_E* code (wrong_mode
 * under --auth none); usercap must be at least AUTH_USER_MAX + 1. Loop
 * thread; never blocks on the network. */
int auth_verify(auth *a, const char *token, char *user, size_t usercap);
/* --auth dev only: a token for user (an id as above; else invalid_subject),
 * HS256 with the start-up secret, exp = now + --dev-token-ttl-secs.
 * *token_out is from mem_alloc (the caller frees it). */
int auth_dev_sign(auth *a, const char *user, char **token_out);
/* The code of a status: "ok" for 0, "missing_token", "bad_signature", ... */
const char *auth_strerror(int status);

#endif
