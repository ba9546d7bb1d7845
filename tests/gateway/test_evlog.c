/* evlog: a session's events on their way to store-svc, against a fake
 * store-svc and summary-svc served in-process (runtime srv over a real
 * socket). The test thread is the gateway's loop: it drains the bridge and
 * runs libev until what it waits for happened. Checks sequence numbers
 * after the stored ones, batches bounded by --event-batch, a failed batch
 * retried with the same seqs, the per-session buffer bound, the total byte
 * bound (evlog_full), a refused session, the end (EndSession, then
 * Summarize), and a session taken over by another writer (fenced: no more
 * writes, no EndSession, the owner told once). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "bridge.h"
#include "convo_methods.h"
#include "evlog.h"
#include "mem.h"
#include "rpc.h"
#include "srv.h"

#include "../common/fakesrv.h"

#include <ev.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define LAST_STORED 10 /* the session's last stored seq when it is opened */
#define BATCH       2
#define MAX_SEQS    64
#define MAX_APPENDS 32
#define WAIT_MS     10000
#define POLL_US     1000
#define USER_ID     "u1"
#define SESSION_ID  "s1"

/* How the fake store answers, and what it saw. */
typedef struct fake {
    pthread_mutex_t mu;
    rpc_code open_code;
    int append_failures;              /* the next appends that fail UNAVAILABLE */
    int64_t epoch;                    /* the session's writer epoch; 0: not checked */
    int64_t open_epochs[MAX_APPENDS]; /* writer_epoch of each OpenSession */
    int64_t append_epoch;             /* of the last AppendEvents */
    int stale;                        /* calls refused as the writer before */
    int ended;                        /* ended elsewhere: appends refused until reopened */
    int opens, appends, ends, summarizes;
    size_t batch_sizes[MAX_APPENDS];
    int64_t seqs[MAX_SEQS]; /* every seq of every append, in arrival order */
    size_t nseqs;
    char first_content[64];
} fake;

static fake fk = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void fake_reset(void)
{
    pthread_mutex_lock(&fk.mu);
    pthread_mutex_t mu = fk.mu;
    memset(&fk, 0, sizeof fk);
    fk.mu = mu;
    pthread_mutex_unlock(&fk.mu);
}

/* As store-svc fences writers: a call naming another epoch than the
 * session's is refused. Under fk.mu. */
static int fake_stale(int64_t epoch)
{
    int stale = fk.epoch != 0 && epoch != 0 && epoch != fk.epoch;
    fk.stale += stale;
    return stale;
}

static void on_open_session(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__OpenSessionRequest *req = (const Convo__V1__OpenSessionRequest *)msg;
    pthread_mutex_lock(&fk.mu);
    if (fk.opens < MAX_APPENDS)
        fk.open_epochs[fk.opens] = req->writer_epoch;
    fk.opens++;
    rpc_code code = fake_stale(req->writer_epoch) ? RPC_FAILED_PRECONDITION : fk.open_code;
    if (code == RPC_OK)
        fk.ended = 0;
    if (code == RPC_OK && req->writer_epoch == 0 && fk.epoch != 0)
        fk.epoch++; /* a new writer */
    int64_t epoch = fk.epoch;
    pthread_mutex_unlock(&fk.mu);
    Convo__V1__Session s = CONVO__V1__SESSION__INIT;
    s.session_id = SESSION_ID;
    s.user_id = USER_ID;
    s.last_seq = LAST_STORED;
    s.writer_epoch = epoch;
    Convo__V1__OpenSessionResponse r = CONVO__V1__OPEN_SESSION_RESPONSE__INIT;
    r.session = &s;
    if (code != RPC_OK)
        srv_call_finish(call, code, "open refused", NULL);
    else
        srv_call_finish(call, RPC_OK, NULL, &r.base);
}

static void on_append(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__AppendEventsRequest *req = (const Convo__V1__AppendEventsRequest *)msg;
    pthread_mutex_lock(&fk.mu);
    if (fk.appends < MAX_APPENDS)
        fk.batch_sizes[fk.appends] = req->n_events;
    fk.appends++;
    for (size_t i = 0; i < req->n_events && fk.nseqs < MAX_SEQS; i++)
        fk.seqs[fk.nseqs++] = req->events[i]->seq;
    if (fk.first_content[0] == '\0' && req->n_events > 0)
        snprintf(fk.first_content, sizeof fk.first_content, "%s", req->events[0]->content);
    int fail = fk.append_failures > 0;
    if (fail)
        fk.append_failures--;
    fk.append_epoch = req->writer_epoch;
    int stale = fake_stale(req->writer_epoch) || fk.ended;
    pthread_mutex_unlock(&fk.mu);
    Convo__V1__AppendEventsResponse r = CONVO__V1__APPEND_EVENTS_RESPONSE__INIT;
    r.appended = (uint32_t)req->n_events;
    if (stale)
        srv_call_finish(call, RPC_FAILED_PRECONDITION, "taken over", NULL);
    else if (fail)
        srv_call_finish(call, RPC_UNAVAILABLE, "store busy", NULL);
    else
        srv_call_finish(call, RPC_OK, NULL, &r.base);
}

static void on_end_session(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__EndSessionRequest *req = (const Convo__V1__EndSessionRequest *)msg;
    pthread_mutex_lock(&fk.mu);
    fk.ends++;
    int stale = fake_stale(req->writer_epoch);
    pthread_mutex_unlock(&fk.mu);
    Convo__V1__EndSessionResponse r = CONVO__V1__END_SESSION_RESPONSE__INIT;
    if (stale)
        srv_call_finish(call, RPC_FAILED_PRECONDITION, "taken over", NULL);
    else
        srv_call_finish(call, RPC_OK, NULL, &r.base);
}

static void on_summarize(srv_call *call, const ProtobufCMessage *msg)
{
    (void)msg;
    pthread_mutex_lock(&fk.mu);
    fk.summarizes++;
    pthread_mutex_unlock(&fk.mu);
    Convo__V1__SummarizeResponse r = CONVO__V1__SUMMARIZE_RESPONSE__INIT;
    srv_call_finish(call, RPC_OK, NULL, &r.base);
}

/* A copy of what the fake saw, to assert on without holding its lock (a
 * failed assertion must not leave it locked). */
static fake fake_snap(void)
{
    pthread_mutex_lock(&fk.mu);
    fake f = fk;
    pthread_mutex_unlock(&fk.mu);
    return f;
}

static int fake_get(const int *field)
{
    pthread_mutex_lock(&fk.mu);
    int v = *field;
    pthread_mutex_unlock(&fk.mu);
    return v;
}

typedef struct env {
    fakesrv fake;
    gw g;
    /* what the evlog told its owner */
    int opened;
    rpc_code open_code;
    int closed;
    int taken_over;
} env;

static int setup(void **state)
{
    env *e = mem_calloc(1, sizeof *e);
    fakesrv_create(&e->fake, "fake");
    const srv_method ms[] = {
        {.method = &convo__v1__store__open_session__method,
         .on_call = on_open_session,
         .callers = "*"},
        {.method = &convo__v1__store__append_events__method, .on_call = on_append, .callers = "*"},
        {.method = &convo__v1__store__end_session__method,
         .on_call = on_end_session,
         .callers = "*"},
        {.method = &convo__v1__summary__summarize__method, .on_call = on_summarize, .callers = "*"},
    };
    fakesrv_add(&e->fake, ms, sizeof ms / sizeof ms[0]);
    fakesrv_run(&e->fake);
    e->g.client = cli_create(1, 0);
    e->g.store = cli_channel_create(e->g.client, e->fake.target, NULL, 0, NULL, NULL, 0);
    e->g.summary = e->g.store;
    e->g.loop = ev_loop_new(EVFLAG_AUTO);
    e->g.bridge = bridge_create();
    *state = e;
    return 0;
}

static int teardown(void **state)
{
    env *e = *state;
    cli_destroy(&e->g.client);
    bridge_drain(e->g.bridge);
    bridge_destroy(&e->g.bridge);
    ev_loop_destroy(e->g.loop);
    fakesrv_stop(&e->fake);
    mem_free(e);
    return 0;
}

/* Fresh options and counters for one test; the fake answers OK. */
static env *begin(void **state)
{
    env *e = *state;
    fake_reset();
    e->opened = e->closed = e->taken_over = 0;
    e->open_code = RPC_OK;
    memset(&e->g.counters, 0, sizeof e->g.counters);
    e->g.events_full = 0;
    e->g.opts.event_batch = BATCH;
    e->g.opts.event_flush_ms = 20;
    e->g.opts.event_buffer = 1000;
    e->g.opts.event_buffer_total_bytes = 0;
    e->g.opts.store_timeout_ms = 5000;
    e->g.opts.event_retry_ms = 600000;
    e->g.opts.store_before_send = 0;
    return e;
}

static void on_open(void *arg, rpc_code code, const char *message,
                    const Convo__V1__OpenSessionResponse *resp)
{
    (void)message;
    (void)resp;
    env *e = arg;
    e->opened++;
    e->open_code = code;
}

static void on_closed(void *arg)
{
    env *e = arg;
    e->closed++;
}

/* Runs the loop (bridge and timers) until *flag is set; 0 when it was not
 * within WAIT_MS. */
static int run_until(env *e, int (*done)(env *, void *), void *arg)
{
    for (int waited = 0; waited < WAIT_MS * 1000; waited += POLL_US) {
        bridge_drain(e->g.bridge);
        ev_run(e->g.loop, EVRUN_NOWAIT);
        if (done(e, arg))
            return 1;
        usleep(POLL_US);
    }
    return 0;
}

static int is_opened(env *e, void *arg)
{
    (void)arg;
    return e->opened > 0;
}

static int is_closed(env *e, void *arg)
{
    (void)arg;
    return e->closed > 0;
}

static int settled_all(env *e, void *arg)
{
    (void)e;
    evlog *ev = arg;
    return evlog_settled(ev) == evlog_added(ev);
}

static void add(evlog *ev, const char *text)
{
    evlog_add(ev, CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE, text, strlen(text), NULL);
}

static void close_and_destroy(env *e, evlog **ev)
{
    evlog_close(*ev, on_closed);
    assert_true(run_until(e, is_closed, NULL));
    assert_int_equal(e->closed, 1);
    evlog_destroy(ev);
    assert_null(*ev);
}

static void numbers_after_the_stored_in_batches(void **state)
{
    env *e = begin(state);
    evlog *ev = evlog_create(&e->g, SESSION_ID, USER_ID, on_open, e);
    assert_true(run_until(e, is_opened, NULL));
    assert_int_equal(e->open_code, RPC_OK);
    char text[32];
    for (int i = 0; i < 5; i++) {
        snprintf(text, sizeof text, "event %d", i);
        add(ev, text);
    }
    assert_int_equal(evlog_added(ev), 5);
    assert_true(run_until(e, settled_all, ev));
    fake f = fake_snap();
    assert_int_equal(f.nseqs, 5);
    for (size_t i = 0; i < f.nseqs; i++)
        assert_int_equal(f.seqs[i], LAST_STORED + 1 + (int64_t)i);
    assert_true(f.appends >= 3); /* five events, at most BATCH a call */
    for (int i = 0; i < f.appends; i++)
        assert_true(f.batch_sizes[i] >= 1 && f.batch_sizes[i] <= BATCH);
    assert_string_equal(f.first_content, "event 0");
    assert_int_equal(atomic_load(&e->g.counters.events_logged), 5);
    assert_int_equal(atomic_load(&e->g.counters.events_buffered), 0);
    assert_int_equal(atomic_load(&e->g.counters.events_buffered_bytes), 0);

    close_and_destroy(e, &ev);
    assert_int_equal(fake_get(&fk.ends), 1);
    /* Summarize is fire and forget: it arrives after on_closed. */
    for (int i = 0; i < WAIT_MS && fake_get(&fk.summarizes) == 0; i++)
        usleep(1000);
    assert_int_equal(fake_get(&fk.summarizes), 1);
    assert_int_equal(fake_get(&fk.opens), 1);
}

static void failed_batch_is_retried_with_its_seqs(void **state)
{
    env *e = begin(state);
    fk.append_failures = 1;
    evlog *ev = evlog_create(&e->g, SESSION_ID, USER_ID, on_open, e);
    assert_true(run_until(e, is_opened, NULL));
    add(ev, "a");
    add(ev, "b");
    assert_true(run_until(e, settled_all, ev));
    fake f = fake_snap();
    /* The failed batch, then one starting with the same events under the
     * same seqs (with what arrived meanwhile). */
    assert_int_equal(f.appends, 2);
    size_t failed = f.batch_sizes[0];
    assert_true(failed >= 1);
    assert_int_equal(f.batch_sizes[1], 2);
    assert_int_equal(f.nseqs, failed + 2);
    for (size_t i = 0; i < failed; i++)
        assert_int_equal(f.seqs[failed + i], f.seqs[i]);
    assert_int_equal(f.seqs[failed], LAST_STORED + 1);
    assert_int_equal(f.seqs[failed + 1], LAST_STORED + 2);
    assert_int_equal(atomic_load(&e->g.counters.events_dropped), 0);
    close_and_destroy(e, &ev);
}

static void refused_session_drops_its_events(void **state)
{
    env *e = begin(state);
    fk.open_code = RPC_PERMISSION_DENIED;
    evlog *ev = evlog_create(&e->g, SESSION_ID, USER_ID, on_open, e);
    assert_true(run_until(e, is_opened, NULL));
    assert_int_equal(e->open_code, RPC_PERMISSION_DENIED);
    add(ev, "not stored");
    assert_int_equal(evlog_added(ev), 1);
    assert_int_equal(evlog_settled(ev), 1); /* dropped, so settled */
    assert_int_equal(atomic_load(&e->g.counters.events_dropped), 1);
    close_and_destroy(e, &ev);
    assert_int_equal(fake_get(&fk.appends), 0);
    assert_int_equal(fake_get(&fk.ends), 0);
    assert_int_equal(fake_get(&fk.opens), 1); /* a refusal is not retried */
}

static void buffer_bounds_events_and_bytes(void **state)
{
    env *e = begin(state);
    e->g.opts.event_buffer = 3;
    /* Room for about two events of 100 bytes with their overhead. */
    e->g.opts.event_buffer_total_bytes = 300;
    /* Not yet open (no loop run): the events wait. */
    evlog *ev = evlog_create(&e->g, SESSION_ID, USER_ID, on_open, e);
    char big[101];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    add(ev, big);
    assert_int_equal(evlog_full(&e->g), 0);
    add(ev, big);
    add(ev, big);
    assert_int_equal(evlog_full(&e->g), 1);
    add(ev, big); /* past --event-buffer: dropped */
    add(ev, big);
    assert_int_equal(evlog_added(ev), 5);
    assert_int_equal(atomic_load(&e->g.counters.events_dropped), 2);
    assert_int_equal(atomic_load(&e->g.counters.events_buffered), 3);
    assert_int_equal(evlog_settled(ev), 0);
    /* Once stored, the total drains and messages are taken again. */
    assert_true(run_until(e, settled_all, ev));
    assert_int_equal(evlog_full(&e->g), 0);
    assert_int_equal(fake_snap().nseqs, 3);
    assert_int_equal(atomic_load(&e->g.counters.events_logged), 3);
    close_and_destroy(e, &ev);
    /* Events were dropped: the summary is left to summary-svc's sweep. */
    usleep(100 * 1000);
    assert_int_equal(fake_get(&fk.summarizes), 0);
}

static void abandoned_session_sends_nothing_more(void **state)
{
    env *e = begin(state);
    evlog *ev = evlog_create(&e->g, SESSION_ID, USER_ID, on_open, e);
    add(ev, "pending");
    evlog_abandon(ev);
    add(ev, "later");
    assert_int_equal(evlog_added(ev), 2);
    assert_int_equal(evlog_settled(ev), 2);
    assert_int_equal(atomic_load(&e->g.counters.events_buffered), 0);
    /* Let the OpenSession in flight finish, then free. */
    for (int i = 0; i < WAIT_MS && fake_get(&fk.opens) == 0; i++)
        usleep(1000);
    usleep(100 * 1000);
    bridge_drain(e->g.bridge);
    ev_run(e->g.loop, EVRUN_NOWAIT);
    assert_int_equal(e->opened, 0);
    assert_int_equal(fake_get(&fk.appends), 0);
    evlog_destroy(&ev);
}

static void on_taken(void *arg)
{
    ((env *)arg)->taken_over++;
}

static int is_taken_over(env *e, void *arg)
{
    (void)arg;
    return e->taken_over > 0;
}

static void taken_over_session_writes_nothing_more(void **state)
{
    env *e = begin(state);
    fk.epoch = 4; /* the first OpenSession makes it 5, ours */
    evlog *ev = evlog_create(&e->g, SESSION_ID, USER_ID, on_open, e);
    evlog_on_taken_over(ev, on_taken);
    assert_true(run_until(e, is_opened, NULL));
    add(ev, "mine");
    assert_true(run_until(e, settled_all, ev));
    assert_int_equal(fake_snap().append_epoch, 5); /* the epoch OpenSession gave */

    /* The client resumed on another gateway: the store's epoch moved on. */
    pthread_mutex_lock(&fk.mu);
    fk.epoch = 6;
    pthread_mutex_unlock(&fk.mu);
    add(ev, "after the move");
    add(ev, "and more");
    assert_true(run_until(e, is_taken_over, NULL));
    fake f = fake_snap();
    /* The refused append made it reopen as the writer it was (never as a
     * new writer, which would take the session back); that was refused. */
    assert_int_equal(f.opens, 2);
    assert_int_equal(f.open_epochs[0], 0);
    assert_int_equal(f.open_epochs[1], 5);
    assert_int_equal(evlog_settled(ev), evlog_added(ev));
    assert_int_equal(atomic_load(&e->g.counters.events_dropped), 2);
    add(ev, "ignored");
    assert_int_equal(atomic_load(&e->g.counters.events_dropped), 3);
    int appends = fake_get(&fk.appends);
    close_and_destroy(e, &ev);
    usleep(100 * 1000);
    /* Not ours to end or summarize; nothing retried; told once. */
    assert_int_equal(fake_get(&fk.appends), appends);
    assert_int_equal(fake_get(&fk.ends), 0);
    assert_int_equal(fake_get(&fk.summarizes), 0);
    assert_int_equal(fake_get(&fk.opens), 2);
    assert_int_equal(e->taken_over, 1);
}

static void ended_elsewhere_is_reopened_as_the_same_writer(void **state)
{
    env *e = begin(state);
    fk.epoch = 2; /* ours will be 3 */
    evlog *ev = evlog_create(&e->g, SESSION_ID, USER_ID, on_open, e);
    evlog_on_taken_over(ev, on_taken);
    assert_true(run_until(e, is_opened, NULL));
    /* Ended by the sweep, our epoch still current: the refused append
     * reopens it as ourselves and the same events go again. */
    pthread_mutex_lock(&fk.mu);
    fk.ended = 1;
    pthread_mutex_unlock(&fk.mu);
    add(ev, "x");
    assert_true(run_until(e, settled_all, ev));
    fake f = fake_snap();
    assert_int_equal(f.opens, 2);
    assert_int_equal(f.open_epochs[1], 3);
    assert_int_equal(f.nseqs, 2);
    assert_int_equal(f.seqs[0], LAST_STORED + 1);
    assert_int_equal(f.seqs[1], LAST_STORED + 1);
    assert_int_equal(atomic_load(&e->g.counters.events_dropped), 0);
    close_and_destroy(e, &ev);
    assert_int_equal(e->taken_over, 0);
    assert_int_equal(fake_get(&fk.ends), 1);
}

static void new_connection_takes_the_session_back(void **state)
{
    env *e = begin(state);
    fk.epoch = 4;
    evlog *ev = evlog_create(&e->g, SESSION_ID, USER_ID, on_open, e);
    evlog_on_taken_over(ev, on_taken);
    assert_true(run_until(e, is_opened, NULL));
    /* Another gateway took the session (epoch 6), then the client came
     * back here on a new connection: we open it as a new writer (7). */
    pthread_mutex_lock(&fk.mu);
    fk.epoch = 6;
    pthread_mutex_unlock(&fk.mu);
    evlog_claim(ev);
    add(ev, "back here");
    assert_true(run_until(e, settled_all, ev));
    fake f = fake_snap();
    assert_int_equal(f.opens, 2);
    assert_int_equal(f.open_epochs[1], 0);
    assert_int_equal(f.append_epoch, 7);
    assert_int_equal(f.stale, 0);
    assert_int_equal(atomic_load(&e->g.counters.events_dropped), 0);
    close_and_destroy(e, &ev);
    assert_int_equal(e->taken_over, 0);
    assert_int_equal(fake_get(&fk.ends), 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(numbers_after_the_stored_in_batches),
        cmocka_unit_test(failed_batch_is_retried_with_its_seqs),
        cmocka_unit_test(refused_session_drops_its_events),
        cmocka_unit_test(buffer_bounds_events_and_bytes),
        cmocka_unit_test(abandoned_session_sends_nothing_more),
        cmocka_unit_test(taken_over_session_writes_nothing_more),
        cmocka_unit_test(ended_elsewhere_is_reopened_as_the_same_writer),
        cmocka_unit_test(new_connection_takes_the_session_back),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
