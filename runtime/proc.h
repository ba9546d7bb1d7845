/* proc — process set-up that needs no gRPC (so the offline model, which
 * links no gRPC, can use it too). */
#ifndef CONVO_PROC_H
#define CONVO_PROC_H

/* Raises the soft limit on open descriptors to the hard one: a process
 * with thousands of streams or connections needs more than the usual 1,024. */
void proc_raise_fd_limit(void);

#endif
