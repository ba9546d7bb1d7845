#include "models.h"

#include "mem.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

/* A model name as router.conf and the OpenAI API write it. */
#define MODEL_NAME_MAX 256

struct models {
    char **names;
    size_t n;
    char *list; /* "a, b, c" */
};

static int add(models *m, const char *name, size_t len, const char *where, char *err,
               size_t errsize)
{
    if (len == 0)
        return 0;
    if (len > MODEL_NAME_MAX) {
        snprintf(err, errsize, "%s: a model name is over %d bytes", where, MODEL_NAME_MAX);
        return -1;
    }
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)name[i];
        if (isspace(c) || c == '"' || c == '\'' || c == ',' || c < 0x20) {
            snprintf(err, errsize, "%s: model '%.*s' has a space, a comma or a quote", where,
                     (int)len, name);
            return -1;
        }
    }
    for (size_t i = 0; i < m->n; i++)
        if (strlen(m->names[i]) == len && memcmp(m->names[i], name, len) == 0)
            return 0;
    m->names = mem_realloc(m->names, (m->n + 1) * sizeof *m->names);
    m->names[m->n++] = mem_strndup(name, len);
    return 0;
}

static void trim(const char **s, size_t *len)
{
    while (*len > 0 && isspace((unsigned char)**s)) {
        (*s)++;
        (*len)--;
    }
    while (*len > 0 && isspace((unsigned char)(*s)[*len - 1]))
        (*len)--;
}

static int add_csv(models *m, const char *csv, char *err, size_t errsize)
{
    const char *p = csv;
    while (p != NULL && *p != '\0') {
        size_t len = strcspn(p, ",");
        const char *name = p;
        size_t n = len;
        trim(&name, &n);
        if (add(m, name, n, "--allowed-models", err, errsize) != 0)
            return -1;
        p += len;
        if (*p == ',')
            p++;
    }
    return 0;
}

/* The `model = NAME` lines of router.conf: keys start a line, values that
 * go on are indented, comments start with '#'. router-svc checks the rest
 * of the file; here only the names matter. */
static int add_router_conf(models *m, const char *path, char *err, size_t errsize)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        snprintf(err, errsize, "--router-config %s: %s", path, strerror(errno));
        return -1;
    }
    char line[1024], where[300];
    int rc = 0, lineno = 0;
    while (rc == 0 && fgets(line, sizeof line, f) != NULL) {
        lineno++;
        if (strncmp(line, "model", 5) != 0)
            continue;
        const char *p = line + 5;
        p += strspn(p, " \t");
        if (*p != '=')
            continue;
        p++;
        size_t n = strcspn(p, "#\r\n");
        trim(&p, &n);
        snprintf(where, sizeof where, "%s line %d", path, lineno);
        rc = add(m, p, n, where, err, errsize);
    }
    fclose(f);
    return rc;
}

int models_create(const char *default_model, const char *allowed_csv, const char *router_conf,
                  models **out, char *err, size_t errsize)
{
    models *m = mem_calloc(1, sizeof *m);
    *out = NULL;
    if (add(m, default_model, strlen(default_model), "--openai-model", err, errsize) != 0 ||
        add_csv(m, allowed_csv, err, errsize) != 0 ||
        (router_conf != NULL && router_conf[0] != '\0' &&
         add_router_conf(m, router_conf, err, errsize) != 0)) {
        models_destroy(&m);
        return -1;
    }
    size_t len = 1;
    for (size_t i = 0; i < m->n; i++)
        len += strlen(m->names[i]) + 2;
    m->list = mem_calloc(1, len);
    for (size_t i = 0; i < m->n; i++) {
        if (i > 0)
            strcat(m->list, ", ");
        strcat(m->list, m->names[i]);
    }
    *out = m;
    return 0;
}

void models_destroy(models **mp)
{
    models *m = *mp;
    if (m == NULL)
        return;
    *mp = NULL;
    for (size_t i = 0; i < m->n; i++)
        mem_free(m->names[i]);
    mem_free(m->names);
    mem_free(m->list);
    mem_free(m);
}

int models_allowed(const models *m, const char *name)
{
    for (size_t i = 0; i < m->n; i++)
        if (strcmp(m->names[i], name) == 0)
            return 1;
    return 0;
}

const char *models_list(const models *m)
{
    return m->list;
}
