/* testsvc-server: the runtime's Test service as a process, for the
 * cross-language runtime tests (tests/runtime/test_runtime_interop.py,
 * test_tls.py). */
#include "log.h"
#include "testsvc_server.h"
#include "tls.h"

#include <stdio.h>

#define TESTSVC_OPTS(X, S)                                                                         \
    X(S, listen, STR, "listen", "LISTEN_ADDR", "127.0.0.1:50099", "HOST:PORT to serve gRPC on")
CONF_DECLARE(testsvc_opts, TESTSVC_OPTS)

int main(int argc, char **argv)
{
    srv_block_signals();
    testsvc_opts opts = {0};
    srv_opts sopts = {0};
    tls_opts topts = {0};
    conf_section secs[] = {CONF_SECTION(testsvc_opts, &opts), CONF_SECTION(srv_opts, &sopts),
                           CONF_SECTION(tls_opts, &topts)};
    const size_t nsecs = sizeof secs / sizeof secs[0];
    int rc =
        conf_parse(argc, argv, "testsvc-server", "the gRPC runtime's test service", secs, nsecs);
    if (rc != 0)
        return rc > 0 ? 0 : 2;
    log_init("testsvc-server", LOG_INFO);
    tls *mtls = NULL;
    char err[512];
    if (tls_create(&topts, &mtls, err, sizeof err) != 0) {
        log_error("%s", err);
        conf_free(secs, nsecs);
        return 2;
    }
    srv *s = srv_create("testsvc-server", opts.listen, &sopts);
    health_attach(s);
    srv_use_tls(s, mtls);
    testsvc_register(s);
    int status = 1;
    if (srv_start(s) == 0) {
        srv_run(s);
        status = 0;
    }
    testsvc_shutdown();
    srv_destroy(&s);
    tls_destroy(&mtls);
    conf_free(secs, nsecs);
    return status;
}
