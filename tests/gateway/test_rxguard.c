/* rxguard over a real loopback TCP connection: a reader of lower priority
 * stands in for libwebsockets, taking the bytes in uneven bites. Masked
 * frames of every length class (7-bit, 16-bit, 64-bit), sent in pieces
 * that split headers, never trip the guard, also when a payload holds
 * bytes that look like an unmasked header; an unmasked frame does, at
 * once, wherever it starts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <ev.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "rxguard.h"

#define MAX_FRAME 200000

typedef struct world {
    struct ev_loop *loop;
    int client, server;
    ev_io reader;
    size_t bite; /* the reader's next read size, cycling */
    size_t read_total;
    int unmasked; /* times the guard fired */
    rxguard *guard;
} world;

static void on_unmasked(void *arg)
{
    ((world *)arg)->unmasked++;
}

/* The stand-in for libwebsockets: reads 1, 7, 64, 1000, 1, 7, ... bytes. */
static void on_read(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    static const size_t bites[] = {1, 7, 64, 1000};
    world *wd = w->data;
    char buf[1000];
    ssize_t n = recv(wd->server, buf, bites[wd->bite++ % 4], 0);
    if (n > 0)
        wd->read_total += (size_t)n;
}

static void setup_world(world *w)
{
    memset(w, 0, sizeof *w);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    assert_int_equal(bind(l, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(l, 1), 0);
    assert_int_equal(getsockname(l, (struct sockaddr *)&a, &alen), 0);
    w->client = socket(AF_INET, SOCK_STREAM, 0);
    assert_int_equal(connect(w->client, (struct sockaddr *)&a, sizeof a), 0);
    w->server = accept(l, NULL, NULL);
    assert_true(w->server >= 0);
    close(l);
    w->loop = ev_loop_new(EVFLAG_AUTO);
    ev_io_init(&w->reader, on_read, w->server, EV_READ);
    w->reader.data = w;
    ev_io_start(w->loop, &w->reader);
    w->guard = rxguard_start(w->loop, w->server, MAX_FRAME, on_unmasked, w);
    assert_non_null(w->guard);
}

static void teardown_world(world *w)
{
    rxguard_stop(&w->guard);
    assert_null(w->guard);
    ev_io_stop(w->loop, &w->reader);
    ev_loop_destroy(w->loop);
    close(w->client);
    close(w->server);
}

/* A client frame: FIN + text, the length in its class, masked or not. */
static size_t frame(unsigned char *out, const unsigned char *payload, size_t len, int masked)
{
    size_t n = 0;
    out[n++] = 0x81;
    unsigned char m = masked ? 0x80 : 0;
    if (len < 126) {
        out[n++] = m | (unsigned char)len;
    } else if (len <= 0xffff) {
        out[n++] = m | 126;
        out[n++] = (unsigned char)(len >> 8);
        out[n++] = (unsigned char)len;
    } else {
        out[n++] = m | 127;
        for (int i = 7; i >= 0; i--)
            out[n++] = (unsigned char)((uint64_t)len >> (8 * i));
    }
    static const unsigned char key[4] = {0x12, 0x34, 0x56, 0x78};
    if (masked) {
        memcpy(out + n, key, 4);
        n += 4;
    }
    for (size_t i = 0; i < len; i++)
        out[n + i] = masked ? payload[i] ^ key[i % 4] : payload[i];
    return n + len;
}

/* Sends data in pieces of `piece` bytes, turning the loop after each,
 * then until the reader has everything. */
static void deliver(world *w, const unsigned char *data, size_t len, size_t piece)
{
    size_t target = w->read_total + len;
    for (size_t at = 0; at < len; at += piece) {
        size_t n = len - at < piece ? len - at : piece;
        assert_int_equal(send(w->client, data + at, n, 0), (ssize_t)n);
        for (int i = 0; i < 3; i++)
            ev_run(w->loop, EVRUN_NOWAIT);
    }
    for (int spins = 0; w->read_total < target && spins < 100000; spins++)
        ev_run(w->loop, EVRUN_NOWAIT);
    assert_int_equal(w->read_total, target);
}

static void masked_frames_of_every_length_pass(void **state)
{
    (void)state;
    world w;
    setup_world(&w);
    static const size_t lengths[] = {0, 1, 5, 125, 126, 127, 300, 65535, 65536, 70000};
    unsigned char *payload = malloc(70000);
    unsigned char *buf = malloc(70000 + 14);
    /* Bytes that read as an unmasked header if the guard lost its place. */
    for (size_t i = 0; i < 70000; i++)
        payload[i] = i % 2 ? 0x05 : 0x81;
    for (size_t k = 0; k < sizeof lengths / sizeof lengths[0]; k++) {
        /* Masking would hide the look-alike bytes: send the plain payload
         * XORed with the key, so it arrives as 0x81 0x05 ... on the wire. */
        unsigned char *wire = malloc(lengths[k] + 1);
        static const unsigned char key[4] = {0x12, 0x34, 0x56, 0x78};
        for (size_t i = 0; i < lengths[k]; i++)
            wire[i] = payload[i] ^ key[i % 4];
        size_t n = frame(buf, wire, lengths[k], 1);
        deliver(&w, buf, n, k % 2 ? 3 : 4096);
        free(wire);
        assert_int_equal(w.unmasked, 0);
    }
    free(payload);
    free(buf);
    teardown_world(&w);
}

static void an_unmasked_frame_trips_it(void **state)
{
    (void)state;
    world w;
    setup_world(&w);
    unsigned char buf[400];
    const unsigned char text[] = "{\"message\":\"hi\"}";
    size_t n = frame(buf, text, sizeof text - 1, 1);
    deliver(&w, buf, n, 5);
    assert_int_equal(w.unmasked, 0);
    n = frame(buf, text, sizeof text - 1, 0);
    /* Found before the reader takes it: the guard runs first. */
    assert_int_equal(send(w.client, buf, n, 0), (ssize_t)n);
    for (int i = 0; i < 1000 && w.unmasked == 0; i++)
        ev_run(w.loop, EVRUN_NOWAIT);
    assert_int_equal(w.unmasked, 1);
    teardown_world(&w);
}

static void an_unmasked_frame_after_a_split_header_trips_it(void **state)
{
    (void)state;
    world w;
    setup_world(&w);
    unsigned char payload[300], buf[700];
    memset(payload, 'x', sizeof payload);
    size_t n = frame(buf, payload, sizeof payload, 1);
    n += frame(buf + n, payload, 10, 0);
    deliver(&w, buf, n, 1); /* one byte at a time */
    assert_int_equal(w.unmasked, 1);
    teardown_world(&w);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(masked_frames_of_every_length_pass),
        cmocka_unit_test(an_unmasked_frame_trips_it),
        cmocka_unit_test(an_unmasked_frame_after_a_split_header_trips_it),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
