/* models — the model names a caller may ask for in GenerationParams.model.
 *
 * A caller that could name any model could run up any bill (or reach a
 * model the operator never chose), so llm-svc allows: the configured
 * default (--openai-model), the models router-svc's rules name (the
 * `model =` lines of the router.conf given with --router-config), and the
 * extra names of --allowed-models. Read once at start-up; read-only after,
 * so any thread may ask. */
#ifndef LLM_MODELS_H
#define LLM_MODELS_H

#include "conf.h"

#include <stddef.h>

#define MODELS_OPTS(X, S)                                                                          \
    X(S, allowed_models, STR, "allowed-models", "LLM_ALLOWED_MODELS", "",                          \
      "models a caller may name in params.model besides --openai-model and those named in "        \
      "--router-config, comma-separated; any other is refused")                                    \
    X(S, router_config, STR, "router-config", "ROUTER_CONFIG", "",                                 \
      "router-svc's router.conf: the models its strategies name are allowed")
CONF_DECLARE(models_opts, MODELS_OPTS)

typedef struct models models;

/* The allowed set from the default model, a comma-separated list (may be
 * "" or NULL) and a router.conf path ("" or NULL: none). Returns 0 and
 * *out, or -1 with err naming what is wrong (an unreadable file, a name
 * with a space or a quote). */
int models_create(const char *default_model, const char *allowed_csv, const char *router_conf,
                  models **out, char *err, size_t errsize);
void models_destroy(models **m);
/* Whether `name` may be asked for. */
int models_allowed(const models *m, const char *name);
/* The allowed names, comma-separated, for error messages. */
const char *models_list(const models *m);

#endif
