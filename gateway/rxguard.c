#include "rxguard.h"

#include "mem.h"

#include <errno.h>
#include <ev.h>
#include <stddef.h>
#include <linux/sockios.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

/* The longest frame header: 2 bytes, 8 of length, 4 of mask. */
#define HEADER_MAX 14

/* When libwebsockets leaves waiting bytes unread for a while (it drains
 * what it has buffered first), the socket stays readable and this watcher
 * would run every loop turn: it rests this long instead. Should the reader
 * take bytes never looked at meanwhile, the guard stops (it cannot follow
 * the stream any more); libwebsockets reads whenever bytes wait, so this is
 * a brief state, not one a client can hold it in. */
#define REST_S 0.01

/* Attempts at reading a consistent position while bytes arrive. */
#define POSITION_TRIES 4

struct rxguard {
    ev_io io;
    ev_timer rest;
    struct ev_loop *loop;
    int fd;
    uint64_t next;                     /* stream offset of the next frame header */
    unsigned char hdr[HEADER_MAX - 4]; /* its bytes seen so far (the mask is not kept) */
    size_t have;
    uint64_t last_end;  /* stream offset up to which bytes were waiting last time */
    uint64_t last_read; /* and up to which the reader had read */
    unsigned char *buf;
    size_t cap;
    rxguard_fn on_unmasked;
    void *arg;
};

/* Where the reader of the socket is: bytes received so far minus those
 * still waiting. Returns 0, or -1 (not readable as TCP). */
static int position(int fd, uint64_t *read_upto, uint64_t *waiting)
{
    for (int i = 0; i < POSITION_TRIES; i++) {
        struct tcp_info a, b;
        socklen_t la = sizeof a, lb = sizeof b;
        int inq = 0;
        if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &a, &la) != 0 || ioctl(fd, SIOCINQ, &inq) != 0 ||
            getsockopt(fd, IPPROTO_TCP, TCP_INFO, &b, &lb) != 0 ||
            la < offsetof(struct tcp_info, tcpi_bytes_received) + sizeof a.tcpi_bytes_received)
            return -1;
        if (a.tcpi_bytes_received == b.tcpi_bytes_received) {
            *waiting = (uint64_t)inq;
            *read_upto = a.tcpi_bytes_received - (uint64_t)inq;
            return 0;
        }
    }
    return -1; /* bytes keep arriving: next time */
}

/* Follows the stream through the bytes at offsets [base, base + n):
 * collects the header at g->next (its first 2 bytes and the extended
 * length), then skips its mask and payload. Returns 1 at an unmasked
 * frame, else 0. */
static int scan(rxguard *g, const unsigned char *data, size_t n, uint64_t base)
{
    uint64_t pos = g->next + g->have;
    if (pos < base)
        pos = base; /* cannot happen: checked by the caller */
    while (pos < base + n) {
        g->hdr[g->have++] = data[pos - base];
        pos++;
        if (g->have < 2)
            continue;
        if ((g->hdr[1] & 0x80) == 0)
            return 1;
        size_t len7 = g->hdr[1] & 0x7f;
        size_t ext = len7 == 126 ? 2 : len7 == 127 ? 8 : 0;
        if (g->have < 2 + ext)
            continue;
        uint64_t len = len7;
        if (ext > 0) {
            len = 0;
            for (size_t i = 0; i < ext; i++)
                len = (len << 8) | g->hdr[2 + i];
        }
        if (len > (UINT64_MAX >> 2))
            len = UINT64_MAX >> 2; /* nonsense: libwebsockets closes it; stay finite */
        g->next += 2 + ext + 4 + len;
        g->have = 0;
        if (pos < g->next)
            pos = g->next;
    }
    return 0;
}

static void on_rest(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    rxguard *g = w->data;
    ev_io_start(loop, &g->io);
}

static void on_readable(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    rxguard *g = w->data;
    uint64_t read_upto, waiting;
    if (position(g->fd, &read_upto, &waiting) != 0)
        return;
    if (read_upto > g->next + g->have) {
        /* The reader took header bytes this guard never saw (only while it
         * rested): it cannot follow the stream any more. */
        ev_io_stop(loop, &g->io);
        return;
    }
    uint64_t end = read_upto + waiting;
    if (end == g->last_end && read_upto == g->last_read) {
        /* Nothing arrived and nothing was read since last time: the
         * reader leaves the bytes waiting for now. */
        ev_io_stop(loop, &g->io);
        ev_timer_set(&g->rest, REST_S, 0.);
        ev_timer_start(loop, &g->rest);
        return;
    }
    int fresh = end != g->last_end;
    g->last_end = end;
    g->last_read = read_upto;
    if (!fresh)
        return; /* the reader is taking what was already looked at */
    /* Looked at: from where the reader is to the end of the next header
     * (what waits beyond is looked at next time). */
    uint64_t from = g->next + g->have;
    uint64_t want = from - read_upto + HEADER_MAX;
    size_t n = want < g->cap ? (size_t)want : g->cap;
    if (from - read_upto >= n)
        return; /* the next header is beyond what can be looked at now */
    ssize_t got = recv(g->fd, g->buf, n, MSG_PEEK | MSG_DONTWAIT);
    if (got <= 0)
        return;
    if (scan(g, g->buf, (size_t)got, read_upto)) {
        ev_io_stop(loop, &g->io);
        g->on_unmasked(g->arg);
    }
}

rxguard *rxguard_start(struct ev_loop *loop, int fd, size_t max_frame, rxguard_fn on_unmasked,
                       void *arg)
{
    uint64_t read_upto, waiting;
    if (position(fd, &read_upto, &waiting) != 0)
        return NULL;
    rxguard *g = mem_calloc(1, sizeof *g);
    g->loop = loop;
    g->fd = fd;
    g->next = read_upto;
    g->cap = max_frame + HEADER_MAX;
    g->buf = mem_alloc(g->cap);
    g->on_unmasked = on_unmasked;
    g->arg = arg;
    ev_io_init(&g->io, on_readable, fd, EV_READ);
    ev_set_priority(&g->io, EV_MAXPRI);
    g->io.data = g;
    ev_timer_init(&g->rest, on_rest, 0., 0.);
    g->rest.data = g;
    ev_io_start(loop, &g->io);
    return g;
}

void rxguard_stop(rxguard **gp)
{
    rxguard *g = *gp;
    if (g == NULL)
        return;
    *gp = NULL;
    ev_io_stop(g->loop, &g->io);
    ev_timer_stop(g->loop, &g->rest);
    mem_free(g->buf);
    mem_free(g);
}
