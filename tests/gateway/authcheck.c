/* authcheck — gateway/auth.c alone, for tests/gateway/test_auth.py.
 *
 *   authcheck [auth options] [--log-level L]
 *
 * Reads lines on stdin and answers one line each on stdout:
 *   <token>       ->  "ok <sub>" or "error <code>"   (an empty line: no token)
 *   sign <user>   ->  "token <jwt>" or "error <code>" (--auth dev)
 * auth_new failing: its message on stderr, exit 2. Logs on stderr. */
#include "auth.h"
#include "conf.h"
#include "log.h"
#include "mem.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK_OPTS(X, S)                                                                           \
    X(S, log_level, STR, "log-level", NULL, "info", "debug, info, warn or error")
CONF_DECLARE(check_opts, CHECK_OPTS)

static void answer(auth *a, char *line)
{
    if (strncmp(line, "sign ", 5) == 0) {
        char *token = NULL;
        int rc = auth_dev_sign(a, line + 5, &token);
        if (rc == 0)
            printf("token %s\n", token);
        else
            printf("error %s\n", auth_strerror(rc));
        mem_free(token);
        return;
    }
    char user[AUTH_USER_MAX + 1];
    int rc = auth_verify(a, line, user, sizeof user);
    if (rc == 0)
        printf("ok %s\n", user);
    else
        printf("error %s\n", auth_strerror(rc));
}

int main(int argc, char **argv)
{
    auth_opts ao = {0};
    check_opts co = {0};
    conf_section secs[] = {CONF_SECTION(auth_opts, &ao), CONF_SECTION(check_opts, &co)};
    size_t nsecs = sizeof secs / sizeof secs[0];
    auth *a = NULL;
    char err[512];
    char *line = NULL;
    size_t cap = 0;
    int status = 2;

    int rc = conf_parse(argc, argv, "authcheck", "verifies tokens read on stdin", secs, nsecs);
    if (rc != 0) {
        status = rc > 0 ? 0 : 2;
        goto out;
    }
    if (log_setup("authcheck", co.log_level) != 0)
        goto out;
    if (auth_new(&ao, &a, err, sizeof err) != 0) {
        fprintf(stderr, "authcheck: %s\n", err);
        goto out;
    }
    ssize_t n;
    while ((n = getline(&line, &cap, stdin)) >= 0) {
        if (n > 0 && line[n - 1] == '\n')
            line[--n] = '\0';
        answer(a, line);
        fflush(stdout);
    }
    status = 0;
out:
    free(line); /* getline's, not mem_alloc's */
    auth_destroy(&a);
    conf_free(secs, nsecs);
    return status;
}
