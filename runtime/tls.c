#include "tls.h"

#include "log.h"
#include "mem.h"
#include "rpc_internal.h"

#include <ctype.h>
#include <errno.h>
#include <grpc/grpc_security.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

struct tls {
    grpc_tls_certificate_provider *provider;
    char name[TLS_NAME_MAX + 1];
};

void tls_name_of_dns(const char *dns, size_t len, char *out)
{
    size_t n = 0;
    out[0] = '\0';
    while (n < len && dns[n] != '.')
        n++;
    if (n == 0 || n > TLS_NAME_MAX)
        return;
    for (size_t i = 0; i < n; i++) {
        int c = tolower((unsigned char)dns[i]);
        if (!(isdigit(c) || (c >= 'a' && c <= 'z') || c == '-'))
            return;
        out[i] = (char)c;
    }
    out[n] = '\0';
}

/* ---- checking the files at start-up ---------------------------------- */

/* The last OpenSSL error as text ("" when none). */
static const char *ssl_error(void)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e != 0 ? ERR_reason_error_string(e) : NULL;
    return r != NULL ? r : "no PEM data found";
}

/* Reads every certificate of a PEM file; at least one. */
static STACK_OF(X509) * read_certs(const char *flag, const char *path, char *err, size_t errsize)
{
    STACK_OF(X509) *certs = NULL;
    X509 *x = NULL;
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, errsize, "--%s %s: %s", flag, path, strerror(errno));
        return NULL;
    }
    certs = sk_X509_new_null();
    ERR_clear_error();
    while ((x = PEM_read_X509(f, NULL, NULL, NULL)) != NULL)
        sk_X509_push(certs, x);
    fclose(f);
    if (sk_X509_num(certs) == 0) {
        snprintf(err, errsize, "--%s %s holds no PEM certificate (%s)", flag, path, ssl_error());
        sk_X509_pop_free(certs, X509_free);
        return NULL;
    }
    ERR_clear_error(); /* the end of the file reads as an error */
    return certs;
}

static EVP_PKEY *read_key(const char *path, char *err, size_t errsize)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, errsize, "--tls-key-file %s: %s", path, strerror(errno));
        return NULL;
    }
    ERR_clear_error();
    EVP_PKEY *k = PEM_read_PrivateKey(f, NULL, NULL, NULL);
    fclose(f);
    if (k == NULL)
        snprintf(err, errsize, "--tls-key-file %s holds no PEM private key (%s)", path,
                 ssl_error());
    return k;
}

/* The caller name of the first DNS subject alternative name of x. */
static void name_of_cert(X509 *x, char *out)
{
    out[0] = '\0';
    GENERAL_NAMES *sans = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
    for (int i = 0; i < sk_GENERAL_NAME_num(sans); i++) {
        const GENERAL_NAME *g = sk_GENERAL_NAME_value(sans, i);
        if (g->type == GEN_DNS) {
            tls_name_of_dns((const char *)ASN1_STRING_get0_data(g->d.dNSName),
                            (size_t)ASN1_STRING_length(g->d.dNSName), out);
            break;
        }
    }
    GENERAL_NAMES_free(sans);
}

static void format_time(const ASN1_TIME *t, char *out, size_t size)
{
    struct tm tm;
    if (ASN1_TIME_to_tm(t, &tm) != 1 || strftime(out, size, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
        snprintf(out, size, "(unknown)");
}

/* What a peer would check of our certificate, checked now so that a wrong
 * file is a start-up error naming it rather than refused handshakes. */
static int check_files(const tls_opts *o, tls *t, char *err, size_t errsize)
{
    STACK_OF(X509) *cas = NULL, *chain = NULL;
    EVP_PKEY *key = NULL;
    X509_STORE *store = NULL;
    X509_STORE_CTX *ctx = NULL;
    int rc = -1;

    if ((cas = read_certs("tls-ca-file", o->ca_file, err, errsize)) == NULL ||
        (chain = read_certs("tls-cert-file", o->cert_file, err, errsize)) == NULL ||
        (key = read_key(o->key_file, err, errsize)) == NULL)
        goto out;
    X509 *leaf = sk_X509_value(chain, 0);
    if (X509_check_private_key(leaf, key) != 1) {
        snprintf(err, errsize, "--tls-key-file %s is not the key of --tls-cert-file %s",
                 o->key_file, o->cert_file);
        goto out;
    }
    store = X509_STORE_new();
    for (int i = 0; i < sk_X509_num(cas); i++)
        X509_STORE_add_cert(store, sk_X509_value(cas, i));
    ctx = X509_STORE_CTX_new();
    X509_STORE_CTX_init(ctx, store, leaf, chain);
    if (X509_verify_cert(ctx) != 1) {
        snprintf(err, errsize, "--tls-cert-file %s is not accepted by --tls-ca-file %s: %s",
                 o->cert_file, o->ca_file,
                 X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx)));
        goto out;
    }
    name_of_cert(leaf, t->name);
    if (t->name[0] == '\0') {
        snprintf(err, errsize,
                 "--tls-cert-file %s has no usable DNS subject alternative name: a caller's name "
                 "is the first label of the first one (e.g. DNS:gateway.convo.svc)",
                 o->cert_file);
        goto out;
    }
    char until[32];
    format_time(X509_get0_notAfter(leaf), until, sizeof until);
    log_info("mutual TLS: this process is '%s', its certificate is valid until %s; the files are "
             "read again every %lld s",
             t->name, until, o->refresh_seconds);
    rc = 0;
out:
    X509_STORE_CTX_free(ctx);
    X509_STORE_free(store);
    EVP_PKEY_free(key);
    sk_X509_pop_free(chain, X509_free);
    sk_X509_pop_free(cas, X509_free);
    ERR_clear_error();
    return rc;
}

/* ---- the options ------------------------------------------------------ */

int tls_create(const tls_opts *o, tls **out, char *err, size_t errsize)
{
    const struct {
        const char *value, *what;
    } files[] = {
        {o->cert_file, "--tls-cert-file (TLS_CERT_FILE)"},
        {o->key_file, "--tls-key-file (TLS_KEY_FILE)"},
        {o->ca_file, "--tls-ca-file (TLS_CA_FILE)"},
    };
    char missing[160] = "";
    size_t set = 0;
    *out = NULL;
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        if (files[i].value != NULL && files[i].value[0] != '\0')
            set++;
        else
            snprintf(missing + strlen(missing), sizeof missing - strlen(missing), "%s%s",
                     missing[0] ? ", " : "", files[i].what);
    }
    if (set == 0)
        return 0;
    if (set < 3) {
        snprintf(err, errsize,
                 "mutual TLS needs a certificate, its key and the CA, all three; missing: %s",
                 missing);
        return -1;
    }
    tls *t = mem_calloc(1, sizeof *t);
    if (check_files(o, t, err, errsize) != 0) {
        mem_free(t);
        return -1;
    }
    rpc__grpc_ref();
    t->provider = grpc_tls_certificate_provider_file_watcher_create(
        o->key_file, o->cert_file, o->ca_file, (unsigned)o->refresh_seconds);
    *out = t;
    return 0;
}

void tls_destroy(tls **tp)
{
    tls *t = *tp;
    if (t == NULL)
        return;
    *tp = NULL;
    /* Credentials still alive hold their own references to the provider. */
    grpc_tls_certificate_provider_release(t->provider);
    mem_free(t);
    rpc__grpc_unref();
}

/* ---- credentials, for srv.c and cli.c ----------------------------------- */

static grpc_tls_credentials_options *options_of(tls *t)
{
    grpc_tls_credentials_options *opt = grpc_tls_credentials_options_create();
    grpc_tls_credentials_options_set_certificate_provider(opt, t->provider);
    grpc_tls_credentials_options_watch_root_certs(opt);
    grpc_tls_credentials_options_watch_identity_key_cert_pairs(opt);
    return opt;
}

grpc_server_credentials *tls__server_credentials(tls *t)
{
    if (t == NULL)
        return grpc_insecure_server_credentials_create();
    grpc_tls_credentials_options *opt = options_of(t);
    grpc_tls_credentials_options_set_cert_request_type(
        opt, GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    return grpc_tls_server_credentials_create(opt);
}

grpc_channel_credentials *tls__channel_credentials(tls *t)
{
    if (t == NULL)
        return grpc_insecure_credentials_create();
    grpc_tls_credentials_options *opt = options_of(t);
    /* The chain up to the CA and the target's host name (the core's
     * default verifier). */
    grpc_tls_credentials_options_set_verify_server_cert(opt, 1);
    return grpc_tls_credentials_create(opt);
}

int tls__caller(grpc_call *call, char *out)
{
    out[0] = '\0';
    grpc_auth_context *ctx = grpc_call_auth_context(call);
    if (ctx == NULL)
        return 0;
    int verified = grpc_auth_context_peer_is_authenticated(ctx);
    /* The DNS names in the certificate's order. */
    grpc_auth_property_iterator it =
        grpc_auth_context_find_properties_by_name(ctx, GRPC_PEER_DNS_PROPERTY_NAME);
    const grpc_auth_property *p = grpc_auth_property_iterator_next(&it);
    if (p != NULL)
        tls_name_of_dns(p->value, p->value_length, out);
    grpc_auth_context_release(ctx);
    return verified;
}
