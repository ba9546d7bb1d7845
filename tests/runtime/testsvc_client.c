/* testsvc-client: the runtime's gRPC client as a process, for the tests
 * that put it against servers written by others (mutual TLS in
 * tests/runtime/test_tls.py, replica lists in test_replicas.py). Calls
 * Test/Echo --calls times on one channel, --interval-ms apart, and prints
 * one line per call: the status code's name and the status message or the
 * echoed text. Exits 0 when every call was OK, 2 for bad options (a peer
 * address cli_channel_create refuses). */
#include "cli.h"
#include "log.h"
#include "mem.h"
#include "testsvc_methods.h"
#include "tls.h"

#include <stdio.h>
#include <unistd.h>

#define CLIENT_OPTS(X, S)                                                                          \
    X(S, target, STR, "target", "TARGET", "127.0.0.1:50099",                                       \
      "the Test server(s), as a peer flag takes them (HOST:PORT, IP:PORT,IP:PORT, dns:///...)")    \
    X(S, service, STR, "peer-service", "PEER_SERVICE", "testsvc",                                  \
      "the name the Test server is known by, as the services give their peers' (cli.h): what "     \
      "the certificates of a list of replicas must name")                                          \
    X(S, text, STR, "text", "TEXT", "hello", "what Echo sends")                                    \
    X(S, calls, INT, "calls", "CALLS", "1", "Echo calls, one after the other")                     \
    X(S, interval_ms, INT, "interval-ms", "INTERVAL_MS", "0", "pause between calls")               \
    X(S, hold_until, INT, "hold-until", "HOLD_UNTIL", "0",                                         \
      "Echo's hold_until: testsvc-server holds a call until this many wait")                       \
    X(S, retry, BOOL, "retry", "RETRY", "false",                                                   \
      "name Echo safe to retry (cli_channel_create): sent again on UNAVAILABLE")                   \
    X(S, timeout_ms, INT, "timeout-ms", "TIMEOUT_MS", "5000", "deadline of each call")
CONF_DECLARE(client_opts, CLIENT_OPTS)

int main(int argc, char **argv)
{
    client_opts o = {0};
    tls_opts topts = {0};
    cli_conf copts = {0};
    conf_section secs[] = {CONF_SECTION(client_opts, &o), CONF_SECTION(tls_opts, &topts),
                           CONF_SECTION(cli_conf, &copts)};
    const size_t nsecs = sizeof secs / sizeof secs[0];
    int rc =
        conf_parse(argc, argv, "testsvc-client", "calls the runtime's test service", secs, nsecs);
    if (rc != 0)
        return rc > 0 ? 0 : 2;
    log_init("testsvc-client", LOG_WARN);
    tls *mtls = NULL;
    char err[512];
    if (tls_create(&topts, &mtls, err, sizeof err) != 0) {
        fprintf(stderr, "testsvc-client: %s\n", err);
        conf_free(secs, nsecs);
        return 2;
    }
    cli *c = cli_create(1, 4 << 20);
    cli_use_tls(c, mtls);
    static const rpc_method *const retry[] = {&convo__test__test__echo__method, NULL};
    cli_channel *ch = cli_channel_create(c, o.target, o.service, copts.round_robin,
                                         o.retry ? retry : NULL, err, sizeof err);
    int status = 0;
    if (ch == NULL) {
        fprintf(stderr, "testsvc-client: --target: %s\n", err);
        status = 2;
        goto out;
    }
    for (long long i = 0; i < o.calls; i++) {
        if (i > 0 && o.interval_ms > 0)
            usleep((useconds_t)o.interval_ms * 1000);
        Convo__Test__EchoRequest req = CONVO__TEST__ECHO_REQUEST__INIT;
        req.text = o.text;
        req.hold_until = (int32_t)o.hold_until;
        cli_opts co = {.timeout_ms = o.timeout_ms};
        ProtobufCMessage *resp = NULL;
        char *msg = NULL;
        rpc_code code =
            cli_unary_sync(ch, &convo__test__test__echo__method, &req.base, &co, &resp, &msg);
        printf("%s %s\n", rpc_code_name(code),
               code == RPC_OK ? ((Convo__Test__EchoReply *)resp)->text : msg);
        fflush(stdout);
        if (code != RPC_OK)
            status = 1;
        if (resp != NULL)
            protobuf_c_message_free_unpacked(resp, NULL);
        mem_free(msg);
    }
out:
    cli_destroy(&c);
    tls_destroy(&mtls);
    conf_free(secs, nsecs);
    return status;
}
