/* conf — command-line flags with environment-variable equivalents.
 *
 * Each module declares its options in one X-macro table beside its code; the
 * table generates the options struct, the defaults, the flag and env parsing
 * and the --help text, so they cannot drift apart:
 *
 *   #define MY_OPTS(X, S) \
 *       X(S, listen, STR, "listen", "LISTEN_ADDR", "0.0.0.0:50051", "HOST:PORT to serve on") \
 *       X(S, max_bytes, INT, "max-bytes", "MAX_BYTES", "65536", "largest accepted message")
 *   CONF_DECLARE(my_opts, MY_OPTS)
 *
 * declares `typedef struct my_opts {char *listen; long long max_bytes;} my_opts;`
 * and `my_opts_table`. Precedence: built-in default < environment < flag.
 *
 * SECRET is a string that is a credential (an API key, a database URL with
 * its password). Its variable may also be given as NAME_FILE, the path of a
 * file holding it (the Kubernetes convention for mounted Secrets; one
 * trailing newline is dropped); NAME and NAME_FILE together are an error. As
 * a flag it is accepted with a warning: a command line is visible to every
 * user of the machine (ps, /proc).
 *
 * A LIST option is a string that may be given several times on the command
 * line: the flags' values are joined with CONF_LIST_SEP, the form its
 * environment variable takes ("a;b" = --opt a --opt b); flags replace the
 * environment's list, they do not add to it.
 *
 * An INT is a non-negative integer. INT_IN(min, max) in the type column is
 * an integer in that range:
 *
 *       X(S, workers, INT_IN(1, 256), "workers", "WORKERS", "2", "worker threads")
 *
 * The range is checked here, once, for the default, the environment and
 * the flags alike (one message: "--workers: '0' is not an integer from 1
 * to 256"), and --help shows it; a module checks only what depends on
 * another option. CONF_NO_MAX leaves the top open. */
#ifndef CONVO_CONF_H
#define CONVO_CONF_H

#include <limits.h>
#include <stddef.h>

typedef enum conf_type { CONF_STR, CONF_INT, CONF_BOOL, CONF_SECRET, CONF_LIST } conf_type;

/* The largest file a NAME_FILE variable may name. */
#define CONF_SECRET_FILE_MAX 65536

#define CONF_LIST_SEP ';'

typedef struct conf_opt {
    const char *flag; /* without the leading "--" */
    const char *env;  /* NULL when there is none */
    conf_type type;
    const char *def; /* the default, as it would be written on the command line */
    const char *help;
    size_t offset;      /* of the field in the options struct */
    long long min, max; /* INT: the values accepted */
} conf_opt;

/* One options struct and its table; a program parses several at once (its
 * own and those of the runtime modules it uses). */
typedef struct conf_section {
    const conf_opt *opts;
    size_t n;
    void *base;
} conf_section;

#define CONF_NO_MAX LLONG_MAX

/* Per type token: the field's C type, the conf_type, and the range. */
#define CONF__T_STR                                        char *
#define CONF__T_INT                                        long long
#define CONF__T_INT_IN(lo, hi)                             long long
#define CONF__T_BOOL                                       int
#define CONF__T_SECRET                                     char *
#define CONF__T_LIST                                       char *
#define CONF__K_STR                                        CONF_STR
#define CONF__K_INT                                        CONF_INT
#define CONF__K_INT_IN(lo, hi)                             CONF_INT
#define CONF__K_BOOL                                       CONF_BOOL
#define CONF__K_SECRET                                     CONF_SECRET
#define CONF__K_LIST                                       CONF_LIST
#define CONF__R_STR                                        0, 0
#define CONF__R_INT                                        0, CONF_NO_MAX
#define CONF__R_INT_IN(lo, hi)                             (lo), (hi)
#define CONF__R_BOOL                                       0, 1
#define CONF__R_SECRET                                     0, 0
#define CONF__R_LIST                                       0, 0
#define CONF__MEMBER(S, field, type, flag, env, def, help) CONF__T_##type field;
#define CONF__ROW(S, field, type, flag, env, def, help)                                            \
    {flag, env, CONF__K_##type, def, help, offsetof(struct S, field), CONF__R_##type},
#define CONF_DECLARE(S, OPTS)                                                                      \
    typedef struct S {                                                                             \
        OPTS(CONF__MEMBER, S)                                                                      \
    } S;                                                                                           \
    static const conf_opt S##_table[] = {OPTS(CONF__ROW, S)};
#define CONF_SECTION(S, ptr)                                                                       \
    ((conf_section){S##_table, sizeof S##_table / sizeof S##_table[0], (ptr)})

/* Fills every section from defaults, the environment and argv (--flag value
 * or --flag=value; a BOOL flag alone means true; a LIST flag may repeat). INT values must be
 * integers in their range; BOOL values are true/false/1/0/yes/no; a SECRET
 * also from NAME_FILE (see above; a flag logs a warning).
 * Returns 0 to go on, 1 when --help or --version was printed (exit 0), -1
 * after printing what is wrong and the usage (exit 2). `about` is one line
 * for --help. Strings (STR, SECRET, LIST) in the sections are owned by them: conf_free()
 * (already done when this returns 1 or -1). */
int conf_parse(int argc, char **argv, const char *prog, const char *about, const conf_section *secs,
               size_t nsecs);
void conf_free(const conf_section *secs, size_t nsecs);

/* The project's version string, also printed by --version. */
const char *conf_version(void);

#endif
