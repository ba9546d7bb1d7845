/* keep — keeps this gateway's live sessions open in store-svc.
 *
 * A session is opened with --session-lease-seconds (OpenSession's
 * live_seconds): store-svc keeps it open that long without word from us.
 * Every third of it, one KeepSessionsAlive per batch of live sessions says
 * we are still here. When the gateway dies the renewals stop, and
 * summary-svc's sweep ends its sessions (EndAbandonedSessions) so that they
 * are summarized like any other; otherwise a session whose gateway died
 * after its client left would stay open, unsummarized, for good.
 * Loop thread only (the renewals' answers are only logged, on the gRPC
 * thread). */
#ifndef GW_KEEP_H
#define GW_KEEP_H

#include "gw.h"

#include <stddef.h>

/* One session, embedded in its owner (the session's evlog). */
typedef struct keep_entry {
    const char *session_id; /* the owner's; valid while the entry is added */
    int live;               /* open in the store and not ended: renewed */
    struct keep_entry *prev, *next;
} keep_entry;

/* Starts renewing every third of --session-lease-seconds on g's loop;
 * *out NULL with a lease of 0 (sessions are then opened without one and
 * nothing is renewed). Returns 0, or -1 with the reason in err (a lease
 * shorter than KEEP_MIN_SECONDS or over a day). */
#define KEEP_MIN_SECONDS 3
int keep_create(gw *g, keep **out, char *err, size_t errsize);
/* Stops renewing and frees; after the gRPC client is destroyed (renewals
 * in flight count their outcome into it). Clears *k. */
void keep_destroy(keep **k);
/* Adds or removes a session's entry; k NULL: nothing. */
void keep_add(keep *k, keep_entry *e);
void keep_remove(keep *k, keep_entry *e);

#endif
