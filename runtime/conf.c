#include "conf.h"

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
    case CONF_STR: {
        char **s = (char **)field;
        mem_free(*s);
        *s = mem_strdup(text);
        return 0;
    }
    case CONF_INT: {
        char *end;
        errno = 0;
        long long v = strtoll(text, &end, 10);
        if (errno != 0 || end == text || *end != '\0' || v < 0) {
            fprintf(stderr, "%s: --%s: '%s' is not a non-negative integer\n", origin, o->flag,
                    text);
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

static void print_usage(FILE *f, const char *prog, const char *about, const conf_section *secs,
                        size_t nsecs)
{
    static const char *const type_names[] = {"TEXT", "N", "BOOL", "LIST"};
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
            fprintf(f, "  [default: %s]\n      %s\n", o->def[0] ? o->def : "\"\"", o->help);
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
            const char *env = o->env != NULL ? getenv(o->env) : NULL;
            if (env != NULL && env[0] != '\0' && set_value(o, secs[s].base, env, o->env, 0) != 0)
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
    }
    rc = 0;
    goto out;

usage:
    fprintf(stderr, "Run '%s --help' for the options.\n", prog);
out:
    mem_free(lists_seen);
    return rc;
}

void conf_free(const conf_section *secs, size_t nsecs)
{
    for (size_t s = 0; s < nsecs; s++) {
        for (size_t i = 0; i < secs[s].n; i++) {
            const conf_opt *o = &secs[s].opts[i];
            if (o->type == CONF_STR || o->type == CONF_LIST) {
                char **p = (char **)((char *)secs[s].base + o->offset);
                mem_free(*p);
                *p = NULL;
            }
        }
    }
}
