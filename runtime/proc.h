/* proc — process set-up that needs no gRPC (so the offline model, which
 * links no gRPC, can use it too). */
#ifndef CONVO_PROC_H
#define CONVO_PROC_H

/* Raises the soft limit on open descriptors to the hard one: a process
 * with thousands of streams or connections needs more than the usual 1,024. */
void proc_raise_fd_limit(void);

/* The folder of shipped data `name` (e.g. "knowledge", "web"): the
 * installed copy beside the running binary (<exe>/../share/convo/<name>,
 * whatever the install prefix), else `source_dir` (a binary run from the
 * build tree). A mem_alloc'd path, or NULL when neither exists. */
char *proc_data_dir(const char *name, const char *source_dir);

#endif
