/* testsvc-server: the runtime's Test service as a process, for the
 * cross-language runtime tests (tests/runtime/test_runtime_interop.py). */
#include "log.h"
#include "testsvc_server.h"

#include <stdio.h>

#define TESTSVC_OPTS(X, S)                                                                         \
    X(S, listen, STR, "listen", "LISTEN_ADDR", "127.0.0.1:50099", "HOST:PORT to serve gRPC on")
CONF_DECLARE(testsvc_opts, TESTSVC_OPTS)

int main(int argc, char **argv)
{
    srv_block_signals();
    testsvc_opts opts = {0};
    srv_opts sopts = {0};
    conf_section secs[] = {CONF_SECTION(testsvc_opts, &opts), CONF_SECTION(srv_opts, &sopts)};
    int rc = conf_parse(argc, argv, "testsvc-server", "the gRPC runtime's test service", secs, 2);
    if (rc != 0)
        return rc > 0 ? 0 : 2;
    log_init("testsvc-server", LOG_INFO);
    srv *s = srv_create("testsvc-server", opts.listen, &sopts);
    testsvc_register(s);
    if (srv_start(s) != 0) {
        srv_destroy(&s);
        conf_free(secs, 2);
        return 1;
    }
    srv_run(s);
    testsvc_shutdown();
    srv_destroy(&s);
    conf_free(secs, 2);
    return 0;
}
