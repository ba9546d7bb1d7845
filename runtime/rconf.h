/* rconf — reads router.conf, the file an operator edits to tune the rules,
 * prompts and generation parameters without a rebuild.
 *
 * Format (INI-like; see router-svc/router.conf for every key):
 *   # a comment: a line whose first non-blank character is '#' or ';'
 *   [section]
 *   key = value
 *       an indented line continues the value above on a new line; blank
 *       lines between continuation lines are kept as empty lines
 * Sections: [rules], [prompt], [strategy.fast_concise], [strategy.analytical],
 * [strategy.summarization_aware], [strategy.tool_heavy]. Keys not in the file
 * keep their built-in defaults. Values are taken literally (no quotes, no
 * escapes, no trailing comments); spaces around them are dropped. Only the
 * prompt texts and the keyword list may span lines. Keys and section names
 * are lower case. A key set twice is an error, as are unknown keys and
 * sections, so a typo never silently leaves a default in place. */
#ifndef CONVO_RCONF_H
#define CONVO_RCONF_H

#include "route.h"

#include <stddef.h>

/* Biggest file rconf_load() reads: far more than any sane config. */
#define RCONF_MAX_FILE_BYTES (1024 * 1024)

/* Parses `len` bytes of `text`; `name` stands for the file in messages.
 * On success returns 0 and *out gets a new prepared config (free it with
 * route_config_free). On failure returns -1, *out is NULL and *err gets a
 * message "NAME:LINE: what is wrong" to free with mem_free. */
int rconf_parse(const char *name, const char *text, size_t len, route_config **out, char **err);

/* Reads and parses the file at `path`, as rconf_parse (an unreadable file
 * is reported as "PATH: cannot read: reason"). */
int rconf_load(const char *path, route_config **out, char **err);

#endif
