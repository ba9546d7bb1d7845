#include "conf.h"

#include "log.h"
#include "mem.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#ifndef CONVO_VERSION
#define CONVO_VERSION "0.0.0-dev"
#endif

const char *conf_version(void)
{
    return CONVO_VERSION;
}

static int parse_bool(const char *text, int *out)
{
    static const char *const yes[] = {"1", "true", "yes", "on"};
    static const char *const no[] = {"0", "false", "no", "off"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(text, yes[i]) == 0) {
            *out = 1;
            return 0;
        }
        if (strcasecmp(text, no[i]) == 0) {
            *out = 0;
            return 0;
        }
    }
    return -1;
}

/* Stores `text` into the option's field; on a bad value prints why and
 * returns -1. `origin` names where the value came from, for that message.
 * `append` adds a LIST's next value instead of replacing the list. */
static int set_value(const conf_opt *o, void *base, const char *text, const char *origin,
                     int append)
{
    char *field = (char *)base + o->offset;
    switch (o->type) {
    case CONF_LIST:
        if (append) {
            char **s = (char **)field;
            char *joined = mem_asprintf("%s%c%s", *s, CONF_LIST_SEP, text);
            mem_free(*s);
            *s = joined;
            return 0;
        }
        /* The first value replaces the list, as a STR's does. */
        __attribute__((fallthrough));
    case CONF_STR:
    case CONF_SECRET: {
        char **s = (char **)field;
        mem_free(*s);
        *s = mem_strdup(text);
        return 0;
    }
    case CONF_INT: {
        char *end;
        errno = 0;
        long long v = strtoll(text, &end, 10);
        if (errno != 0 || end == text || *end != '\0' || v < o->min || v > o->max) {
            if (o->max == CONF_NO_MAX)
                fprintf(stderr, "%s: --%s: '%s' is not an integer of at least %lld\n", origin,
                        o->flag, text, o->min);
            else
                fprintf(stderr, "%s: --%s: '%s' is not an integer from %lld to %lld\n", origin,
                        o->flag, text, o->min, o->max);
            return -1;
        }
        *(long long *)field = v;
        return 0;
    }
    case CONF_BOOL:
        if (parse_bool(text, (int *)field) != 0) {
            fprintf(stderr, "%s: --%s: '%s' is not true or false\n", origin, o->flag, text);
            return -1;
        }
        return 0;
    }
    return -1;
}

/* The content of a NAME_FILE secret, one trailing newline dropped; NULL
 * after saying on stderr what is wrong (never the content). */
static char *read_secret_file(const char *var, const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fprintf(stderr, "%s: %s: %s\n", var, path, strerror(errno));
        return NULL;
    }
    char *buf = mem_alloc(CONF_SECRET_FILE_MAX + 2);
    size_t n = fread(buf, 1, CONF_SECRET_FILE_MAX + 1, f);
    int unreadable = ferror(f);
    fclose(f);
    int bad = 1;
    if (unreadable)
        fprintf(stderr, "%s: %s cannot be read\n", var, path);
    else if (n > CONF_SECRET_FILE_MAX)
        fprintf(stderr, "%s: %s is over %d bytes\n", var, path, CONF_SECRET_FILE_MAX);
    else if (memchr(buf, '\0', n) != NULL)
        fprintf(stderr, "%s: %s holds a NUL byte\n", var, path);
    else
        bad = 0;
    if (bad) {
        explicit_bzero(buf, n);
        mem_free(buf);
        return NULL;
    }
    if (n > 0 && buf[n - 1] == '\n')
        n--;
    if (n > 0 && buf[n - 1] == '\r')
        n--;
    buf[n] = '\0';
    return buf;
}

/* Sets an option from its environment variable (a SECRET also from
 * NAME_FILE); 0, or -1 after saying what is wrong. */
static int from_env(const conf_opt *o, void *base)
{
    if (o->env == NULL)
        return 0;
    const char *value = getenv(o->env);
    if (value != NULL && value[0] == '\0')
        value = NULL;
    if (o->type != CONF_SECRET)
        return value != NULL ? set_value(o, base, value, o->env, 0) : 0;
    char *file_var = mem_asprintf("%s_FILE", o->env);
    const char *path = getenv(file_var);
    int rc = 0;
    if (path != NULL && path[0] != '\0' && value != NULL) {
        fprintf(stderr, "%s and %s are both set; set one\n", o->env, file_var);
        rc = -1;
    } else if (path != NULL && path[0] != '\0') {
        char *secret = read_secret_file(file_var, path);
        rc = secret != NULL ? set_value(o, base, secret, file_var, 0) : -1;
        if (secret != NULL)
            explicit_bzero(secret, strlen(secret));
        mem_free(secret);
    } else if (value != NULL) {
        rc = set_value(o, base, value, o->env, 0);
    }
    mem_free(file_var);
    return rc;
}

static void print_usage(FILE *f, const char *prog, const char *about, const conf_section *secs,
                        size_t nsecs)
{
    static const char *const type_names[] = {"TEXT", "N", "BOOL", "SECRET", "LIST"};
    fprintf(f,
            "%s %s — %s\n\nUsage: %s [options]\n\nOptions (flag, environment variable, "
            "default):\n",
            prog, CONVO_VERSION, about, prog);
    for (size_t s = 0; s < nsecs; s++) {
        for (size_t i = 0; i < secs[s].n; i++) {
            const conf_opt *o = &secs[s].opts[i];
            fprintf(f, "  --%s %s", o->flag, type_names[o->type]);
            if (o->env != NULL)
                fprintf(f, "  (env %s)", o->env);
            fprintf(f, "  [default: %s]\n      %s", o->def[0] ? o->def : "\"\"", o->help);
            if (o->type == CONF_INT && o->max != CONF_NO_MAX)
                fprintf(f, " [%lld to %lld]", o->min, o->max);
            else if (o->type == CONF_INT && o->min > 0)
                fprintf(f, " [at least %lld]", o->min);
            fprintf(f, "\n");
            if (o->type == CONF_SECRET && o->env != NULL)
                fprintf(f,
                        "      (a secret: or %s_FILE, a file holding it; as a flag it shows in "
                        "ps)\n",
                        o->env);
        }
    }
    fprintf(f, "  --help\n      print this help and exit\n  --version\n      print the version "
               "and exit\n");
}

static const conf_opt *find_flag(const conf_section *secs, size_t nsecs, const char *name,
                                 size_t len, void **base)
{
    for (size_t s = 0; s < nsecs; s++) {
        for (size_t i = 0; i < secs[s].n; i++) {
            const conf_opt *o = &secs[s].opts[i];
            if (strlen(o->flag) == len && strncmp(o->flag, name, len) == 0) {
                *base = secs[s].base;
                return o;
            }
        }
    }
    return NULL;
}

int conf_parse(int argc, char **argv, const char *prog, const char *about, const conf_section *secs,
               size_t nsecs)
{
    /* The LIST options given on the command line so far: a later flag adds
     * to what an earlier one set, the first replaces the environment's. */
    size_t nopts = 0;
    for (size_t s = 0; s < nsecs; s++)
        nopts += secs[s].n;
    const conf_opt **lists_seen = mem_calloc(nopts ? nopts : 1, sizeof *lists_seen);
    size_t nlists = 0;
    int rc = -1;

    for (size_t s = 0; s < nsecs; s++) {
        for (size_t i = 0; i < secs[s].n; i++) {
            const conf_opt *o = &secs[s].opts[i];
            if (set_value(o, secs[s].base, o->def, "built-in default", 0) != 0)
                goto out;
            if (from_env(o, secs[s].base) != 0)
                goto usage;
        }
    }

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            print_usage(stdout, prog, about, secs, nsecs);
            rc = 1;
            goto out;
        }
        if (strcmp(arg, "--version") == 0) {
            printf("%s %s\n", prog, CONVO_VERSION);
            rc = 1;
            goto out;
        }
        if (strncmp(arg, "--", 2) != 0) {
            fprintf(stderr, "%s: unexpected argument '%s'\n", prog, arg);
            goto usage;
        }
        const char *name = arg + 2;
        const char *eq = strchr(name, '=');
        size_t len = eq != NULL ? (size_t)(eq - name) : strlen(name);
        void *base = NULL;
        const conf_opt *o = find_flag(secs, nsecs, name, len, &base);
        if (o == NULL) {
            fprintf(stderr, "%s: unknown option '%s'\n", prog, arg);
            goto usage;
        }
        const char *value;
        if (eq != NULL)
            value = eq + 1;
        else if (o->type == CONF_BOOL && (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0))
            value = "true";
        else if (i + 1 < argc)
            value = argv[++i];
        else {
            fprintf(stderr, "%s: option '--%s' needs a value\n", prog, o->flag);
            goto usage;
        }
        int append = 0;
        if (o->type == CONF_LIST) {
            for (size_t k = 0; k < nlists; k++)
                append = append || lists_seen[k] == o;
            if (!append)
                lists_seen[nlists++] = o;
        }
        if (set_value(o, base, value, prog, append) != 0)
            goto usage;
        if (o->type == CONF_SECRET)
            log_warn("%s: --%s was given on the command line, where every user of this machine "
                     "can read it (ps); pass it as %s or %s_FILE instead",
                     prog, o->flag, o->env != NULL ? o->env : "an environment variable",
                     o->env != NULL ? o->env : "NAME");
    }
    rc = 0;
    goto out;

usage:
    fprintf(stderr, "Run '%s --help' for the options.\n", prog);
out:
    mem_free(lists_seen);
    /* A program that stops here owes nothing (conf_free again is harmless). */
    if (rc != 0)
        conf_free(secs, nsecs);
    return rc;
}

void conf_free(const conf_section *secs, size_t nsecs)
{
    for (size_t s = 0; s < nsecs; s++) {
        for (size_t i = 0; i < secs[s].n; i++) {
            const conf_opt *o = &secs[s].opts[i];
            if (o->type == CONF_STR || o->type == CONF_SECRET || o->type == CONF_LIST) {
                char **p = (char **)((char *)secs[s].base + o->offset);
                mem_free(*p);
                *p = NULL;
            }
        }
    }
}
