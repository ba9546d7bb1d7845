/* tls — mutual TLS between the services, with the gRPC core's own TLS
 * credentials.
 *
 * With --tls-cert-file, --tls-key-file and --tls-ca-file all set, every
 * gRPC server of the process requires a client certificate signed by the
 * CA (srv_use_tls) and every channel verifies the server's certificate,
 * chain and host name, and presents the process's own (cli_use_tls). The
 * three files are read again every --tls-refresh-seconds: a renewed
 * certificate (cert-manager rewrites the files in place) is used by new
 * connections; connections already made, and their calls, go on. With none
 * of them set, plaintext. Some but not all set is a start-up error.
 *
 * A caller's name is the first label of its certificate's first DNS
 * subject alternative name: a certificate for "gateway.convo.svc" calls as
 * "gateway". Servers allow each method to the names given at registration
 * (srv_method.callers). */
#ifndef CONVO_TLS_H
#define CONVO_TLS_H

#include "conf.h"

#include <stddef.h>

/* The longest --tls-refresh-seconds: a day. */
#define TLS_REFRESH_MAX_S 86400

#define TLS_OPTS(X, S)                                                                             \
    X(S, cert_file, STR, "tls-cert-file", "TLS_CERT_FILE", "",                                     \
      "this process's certificate (PEM; intermediate certificates after it), shown to peers as "   \
      "server and as client; with --tls-key-file and --tls-ca-file it turns on mutual TLS")        \
    X(S, key_file, STR, "tls-key-file", "TLS_KEY_FILE", "",                                        \
      "the private key of --tls-cert-file (PEM)")                                                  \
    X(S, ca_file, STR, "tls-ca-file", "TLS_CA_FILE", "",                                           \
      "the CA certificate(s) (PEM) that every peer's certificate must be signed by")               \
    X(S, refresh_seconds, INT_IN(1, TLS_REFRESH_MAX_S), "tls-refresh-seconds",                     \
      "TLS_REFRESH_SECONDS", "60",                                                                 \
      "how often the three files are read again, so a renewed certificate is used by new "         \
      "connections")
CONF_DECLARE(tls_opts, TLS_OPTS)

/* The longest caller name: one DNS label. */
#define TLS_NAME_MAX 63

typedef struct tls tls;

/* From the options (as conf_parse left them, in their ranges): none set
 * gives 0 and *out = NULL (plaintext). All
 * three set: the files are read and checked (PEM, the key matches the
 * certificate, the certificate is signed by the CA and valid now, it has a
 * DNS name), the watcher starts, 0 and *out. Otherwise, or with
 * --tls-refresh-seconds out of its range (set or not), -1 and err says
 * what is missing or wrong (the program exits 2). */
int tls_create(const tls_opts *o, tls **out, char *err, size_t errsize);
/* After every server and client using it is destroyed; clears *t. */
void tls_destroy(tls **t);

/* The caller name of a DNS name of `len` bytes: its first label, if that
 * is 1 to TLS_NAME_MAX bytes of [a-z0-9-] (lower-cased first); otherwise
 * "" (a wildcard or a malformed name names nobody). out has room for
 * TLS_NAME_MAX + 1 bytes. */
void tls_name_of_dns(const char *dns, size_t len, char *out);

#endif
