/* ws: the WebSocket transport (ws.c) behind a real libwebsockets server on
 * a libev loop (gwsrv.h), driven by a raw RFC 6455 client on a thread of
 * its own, so that fragments, masks, opcodes and sizes are exactly what
 * each test needs. The peer attached to each connection is the test's:
 * it records what it is given and sends or closes on command.
 *
 * Checked: fragments reassembled into one message; --max-frame-bytes at
 * its bound and past it (1009, counted over fragments); binary frames
 * (1003); unmasked frames (1002); frames written in order and their
 * charges given back once written; conn_close's code after the frames
 * queued before it, and nothing queued after it; a client that does not
 * read (1008); --max-connections and --max-connections-per-ip (1013);
 * bad session ids (4400); a handshake without a token in jwt mode (401,
 * before any upgrade). */
#include "gwsrv.h"

#include <stdlib.h>

#define PEERS_MAX    4
#define TEXT_MAX     256
#define SEEN_MAX     512
#define RX_MAX       (128 * 1024)
#define BAD_IDS      4
#define WS_OP_CONT   0x0
#define WS_OP_TEXT   0x1
#define WS_OP_BINARY 0x2
#define WS_OP_CLOSE  0x8

/* ---- the peer: what ws.c attaches a connection to ---------------------- */

typedef struct peer {
    conn *c;
    char id[TEXT_MAX], user[TEXT_MAX];
    char texts[8][TEXT_MAX];
    size_t text_len[8];
    int ntexts;
    int sent;      /* frames handed to conn_send */
    long charged;  /* their charges */
    long returned; /* charges given back through on_sent */
    int gone;      /* on_gone was called */
} peer;

static peer peers[PEERS_MAX];
static int npeers;

static void peer_send(peer *p, const char *text, size_t len)
{
    char *f = mem_alloc(len + 1);
    memcpy(f, text, len);
    f[len] = '\0';
    p->sent++;
    p->charged += (long)len;
    conn_send(p->c, f, len, (long)len);
}

/* Commands: "burst N" (N frames {"n":i}), "flood N SIZE" (N frames of SIZE
 * bytes, stopping once the connection gives up on the client), "report"
 * (a frame with the charges given back so far), "close CODE" (conn_close,
 * then one more frame that must never arrive); anything else is kept. */
static void peer_text(void *arg, const char *data, size_t len)
{
    peer *p = arg;
    char cmd[64];
    snprintf(cmd, sizeof cmd, "%.*s", (int)(len < sizeof cmd - 1 ? len : sizeof cmd - 1), data);
    int n, size;
    char frame[TEXT_MAX];
    if (sscanf(cmd, "burst %d", &n) == 1) {
        for (int i = 0; i < n; i++)
            peer_send(p, frame, (size_t)snprintf(frame, sizeof frame, "{\"n\":%d}", i));
    } else if (sscanf(cmd, "flood %d %d", &n, &size) == 2) {
        char *big = mem_alloc((size_t)size);
        memset(big, 'x', (size_t)size);
        for (int i = 0; i < n && !p->gone; i++)
            peer_send(p, big, (size_t)size);
        mem_free(big);
    } else if (strcmp(cmd, "report") == 0) {
        peer_send(p, frame,
                  (size_t)snprintf(frame, sizeof frame, "{\"returned\":%ld,\"charged\":%ld}",
                                   p->returned, p->charged));
    } else if (sscanf(cmd, "close %d", &n) == 1) {
        conn_close(p->c, n, "test_close", "closed by the test");
        peer_send(p, "{\"after\":1}", 11);
    } else if (p->ntexts < 8) {
        size_t kept = len < TEXT_MAX - 1 ? len : TEXT_MAX - 1;
        memcpy(p->texts[p->ntexts], data, kept);
        p->texts[p->ntexts][kept] = '\0';
        p->text_len[p->ntexts++] = len;
    }
}

static void peer_sent(void *arg, long charge)
{
    ((peer *)arg)->returned += charge;
}

static void peer_gone(void *arg, conn *c)
{
    peer *p = arg;
    assert_ptr_equal(c, p->c);
    p->gone++;
}

static const conn_peer_ops ops = {peer_text, peer_sent, peer_gone};

static void peer_open(void *arg, conn *c, const char *id, const char *user)
{
    (void)arg;
    assert_true(npeers < PEERS_MAX);
    peer *p = &peers[npeers++];
    p->c = c;
    snprintf(p->id, sizeof p->id, "%s", id);
    snprintf(p->user, sizeof p->user, "%s", user);
    conn_attach(c, &ops, p);
}

/* ---- the raw client (client thread: records, never asserts) ------------- */

/* A blocking TCP connection to the server, with timeouts; -1 on failure. */
static int gwsrv_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct timeval tv = {.tv_sec = GWSRV_IO_SECS};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

typedef struct seen {
    int status; /* the handshake's HTTP status */
    char frames[SEEN_MAX][TEXT_MAX];
    size_t frame_len[SEEN_MAX];
    int nframes;
    int close_code; /* 0: none came */
} seen;

static int write_all(int fd, const void *buf, size_t len)
{
    for (size_t off = 0; off < len;) {
        ssize_t n = send(fd, (const char *)buf + off, len - off, MSG_NOSIGNAL);
        if (n <= 0)
            return -1;
        off += (size_t)n;
    }
    return 0;
}

static int read_all(int fd, void *buf, size_t len)
{
    for (size_t off = 0; off < len;) {
        ssize_t n = recv(fd, (char *)buf + off, len - off, 0);
        if (n <= 0)
            return -1;
        off += (size_t)n;
    }
    return 0;
}

/* Connects and upgrades at `path`; the fd, or -1 when the answer was not
 * 101 (its status in s->status). */
static int ws_connect(gwsrv *srv, const char *path, const char *headers, seen *s)
{
    int fd = gwsrv_connect(srv->port);
    if (fd < 0)
        return -1;
    char req[1024];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n%s\r\n",
                     path, srv->port, headers != NULL ? headers : "");
    char resp[2048];
    size_t got = 0;
    if (write_all(fd, req, (size_t)n) != 0)
        goto fail;
    while (got < sizeof resp - 1 && (got < 4 || memcmp(resp + got - 4, "\r\n\r\n", 4) != 0))
        if (recv(fd, resp + got++, 1, 0) != 1)
            goto fail;
    resp[got] = '\0';
    s->status = atoi(resp + strlen("HTTP/1.1 "));
    if (s->status == 101)
        return fd;
fail:
    close(fd);
    return -1;
}

/* Sends one frame: fin, opcode, masked or (against the RFC) not. */
static int ws_send(int fd, int fin, int op, const char *data, size_t len, int masked)
{
    unsigned char h[14];
    size_t hl = 0;
    h[hl++] = (unsigned char)((fin ? 0x80 : 0) | op);
    unsigned char m = masked ? 0x80 : 0;
    if (len < 126) {
        h[hl++] = (unsigned char)(m | len);
    } else if (len <= 0xffff) {
        h[hl++] = m | 126;
        h[hl++] = (unsigned char)(len >> 8);
        h[hl++] = (unsigned char)len;
    } else {
        h[hl++] = m | 127;
        for (int i = 7; i >= 0; i--)
            h[hl++] = (unsigned char)((uint64_t)len >> (8 * i));
    }
    static const unsigned char key[4] = {0x37, 0xfa, 0x21, 0x3d};
    if (masked) {
        memcpy(h + hl, key, 4);
        hl += 4;
    }
    unsigned char *body = mem_alloc(len + 1);
    for (size_t i = 0; i < len; i++)
        body[i] = (unsigned char)data[i] ^ (masked ? key[i % 4] : 0);
    int rc = write_all(fd, h, hl) != 0 || write_all(fd, body, len) != 0 ? -1 : 0;
    mem_free(body);
    return rc;
}

static int ws_text(int fd, const char *text)
{
    return ws_send(fd, 1, WS_OP_TEXT, text, strlen(text), 1);
}

/* Reads one frame into buf (RX_MAX); its opcode in *op. Returns its
 * length or -1 (closed, timed out). */
static long ws_recv(int fd, int *op, unsigned char *buf)
{
    unsigned char h[2];
    if (read_all(fd, h, 2) != 0)
        return -1;
    *op = h[0] & 0x0f;
    uint64_t len = h[1] & 0x7f;
    unsigned char ext[8];
    if (len == 126) {
        if (read_all(fd, ext, 2) != 0)
            return -1;
        len = (uint64_t)ext[0] << 8 | ext[1];
    } else if (len == 127) {
        if (read_all(fd, ext, 8) != 0)
            return -1;
        len = 0;
        for (int i = 0; i < 8; i++)
            len = len << 8 | ext[i];
    }
    if (len > RX_MAX || read_all(fd, buf, (size_t)len) != 0)
        return -1;
    return (long)len;
}

/* Reads frames until `want` text frames (0: until the close), recording
 * them and the close code. */
static void ws_read(int fd, seen *s, int want)
{
    static unsigned char buf[RX_MAX];
    int op;
    long n;
    int texts = 0;
    while ((want == 0 || texts < want) && (n = ws_recv(fd, &op, buf)) >= 0) {
        if (op == WS_OP_CLOSE) {
            s->close_code = n >= 2 ? buf[0] << 8 | buf[1] : 1005;
            return;
        }
        if (op != WS_OP_TEXT || s->nframes >= SEEN_MAX)
            continue;
        size_t kept = (size_t)n < TEXT_MAX - 1 ? (size_t)n : TEXT_MAX - 1;
        memcpy(s->frames[s->nframes], buf, kept);
        s->frames[s->nframes][kept] = '\0';
        s->frame_len[s->nframes++] = (size_t)n;
        texts++;
    }
}

/* The error code of the last error frame seen ("" when none). */
static const char *error_code(const seen *s)
{
    static char code[64];
    code[0] = '\0';
    for (int i = 0; i < s->nframes; i++) {
        const char *k = strstr(s->frames[i], "\"code\":\"");
        if (strstr(s->frames[i], "\"type\":\"error\"") != NULL && k != NULL)
            sscanf(k + 8, "%63[^\"]", code);
    }
    return code;
}

/* ---- the tests ----------------------------------------------------------- */

typedef struct env {
    struct ev_loop *loop;
    cli *client;
    gwsrv srv;
    seen a, b; /* what the test's clients saw */
    seen bad[BAD_IDS];
} env;

static int setup(void **state)
{
    env *e = mem_calloc(1, sizeof *e);
    e->loop = ev_loop_new(EVFLAG_AUTO);
    e->client = cli_create(1, 0);
    lws_set_log_level(LLL_ERR, NULL);
    *state = e;
    return 0;
}

static int teardown(void **state)
{
    env *e = *state;
    cli_destroy(&e->client);
    ev_loop_destroy(e->loop);
    mem_free(e);
    return 0;
}

/* The server with the defaults, no pings, and `args`. */
static env *begin(void **state, const char *a1, const char *a2, const char *a3, const char *a4)
{
    env *e = *state;
    memset(peers, 0, sizeof peers);
    npeers = 0;
    memset(&e->a, 0, sizeof e->a);
    memset(&e->b, 0, sizeof e->b);
    memset(e->bad, 0, sizeof e->bad);
    const char *args[] = {"--auth", "none", "--ws-ping-secs", "0", a1, a2, a3, a4, NULL};
    gwsrv_start(&e->srv, e->loop, e->client, NULL, args, peer_open, NULL);
    return e;
}

static void end(env *e)
{
    gwsrv_stop(&e->srv);
}

static void run(env *e, void (*fn)(void *))
{
    assert_int_equal(gwsrv_run_client(&e->srv, fn, e, 100), 0);
}

static void fragments_client(void *arg)
{
    env *e = arg;
    int fd = ws_connect(&e->srv, "/ws/session/s1?user_id=u1", NULL, &e->a);
    if (fd < 0)
        return;
    ws_send(fd, 0, WS_OP_TEXT, "{\"message\":", 11, 1);
    ws_send(fd, 0, WS_OP_CONT, "\"hel", 4, 1);
    ws_send(fd, 1, WS_OP_CONT, "lo\"}", 4, 1);
    char exact[65];
    memset(exact, 'a', 64);
    exact[64] = '\0';
    ws_text(fd, exact); /* at --max-frame-bytes: taken */
    /* 40 + 30 bytes: each fragment within the bound, the message past it. */
    char part[41];
    memset(part, 'b', 40);
    ws_send(fd, 0, WS_OP_TEXT, part, 40, 1);
    ws_send(fd, 1, WS_OP_CONT, part, 30, 1);
    ws_read(fd, &e->a, 0);
    close(fd);
}

static void fragments_are_reassembled_within_the_limit(void **state)
{
    env *e = begin(state, "--max-frame-bytes", "64", NULL, NULL);
    run(e, fragments_client);
    assert_int_equal(e->a.status, 101);
    assert_int_equal(npeers, 1);
    assert_string_equal(peers[0].id, "s1");
    assert_string_equal(peers[0].user, "u1");
    assert_int_equal(peers[0].ntexts, 2);
    assert_string_equal(peers[0].texts[0], "{\"message\":\"hello\"}");
    assert_int_equal(peers[0].text_len[1], 64);
    assert_int_equal(e->a.close_code, WS_CLOSE_TOO_BIG);
    assert_string_equal(error_code(&e->a), "frame_too_big");
    assert_int_equal(peers[0].gone, 1);
    end(e);
}

static void binary_client(void *arg)
{
    env *e = arg;
    int fd = ws_connect(&e->srv, "/ws/session/s2", NULL, &e->a);
    if (fd < 0)
        return;
    ws_send(fd, 1, WS_OP_BINARY, "\x01\x02\x03", 3, 1);
    ws_read(fd, &e->a, 0);
    close(fd);
}

static void binary_frame_closes_1003(void **state)
{
    env *e = begin(state, NULL, NULL, NULL, NULL);
    run(e, binary_client);
    assert_int_equal(e->a.close_code, WS_CLOSE_UNSUPPORTED);
    assert_string_equal(error_code(&e->a), "binary_frame");
    assert_int_equal(npeers, 1);
    assert_string_equal(peers[0].user, "s2"); /* no user_id: the session id stands in */
    assert_int_equal(peers[0].ntexts, 0);
    assert_int_equal(peers[0].gone, 1);
    end(e);
}

static void unmasked_client(void *arg)
{
    env *e = arg;
    int fd = ws_connect(&e->srv, "/ws/session/s3", NULL, &e->a);
    if (fd < 0)
        return;
    ws_send(fd, 1, WS_OP_TEXT, "{\"message\":\"hi\"}", 16, 0);
    ws_read(fd, &e->a, 0);
    close(fd);
}

static void unmasked_frame_closes_1002(void **state)
{
    env *e = begin(state, NULL, NULL, NULL, NULL);
    run(e, unmasked_client);
    assert_int_equal(e->a.close_code, WS_CLOSE_PROTOCOL);
    assert_string_equal(error_code(&e->a), "unmasked_frame");
    assert_int_equal(peers[0].ntexts, 0);
    assert_int_equal(peers[0].gone, 1);
    end(e);
}

enum { BURST = 300 };

static void order_client(void *arg)
{
    env *e = arg;
    int fd = ws_connect(&e->srv, "/ws/session/s4", NULL, &e->a);
    if (fd < 0)
        return;
    char cmd[32];
    snprintf(cmd, sizeof cmd, "burst %d", BURST);
    ws_text(fd, cmd);
    ws_read(fd, &e->a, BURST);
    ws_text(fd, "report");
    ws_read(fd, &e->a, 1);
    close(fd);
}

static void frames_go_out_in_order_and_charges_come_back(void **state)
{
    env *e = begin(state, NULL, NULL, NULL, NULL);
    run(e, order_client);
    assert_int_equal(e->a.nframes, BURST + 1);
    for (int i = 0; i < BURST; i++) {
        char want[32];
        snprintf(want, sizeof want, "{\"n\":%d}", i);
        assert_string_equal(e->a.frames[i], want);
    }
    /* Once written (the client read them), every charge was given back. */
    long returned, charged;
    assert_int_equal(
        sscanf(e->a.frames[BURST], "{\"returned\":%ld,\"charged\":%ld}", &returned, &charged), 2);
    assert_true(charged > 0);
    assert_int_equal(returned, charged);
    /* And the report's own, by the time the client had left. */
    assert_int_equal(peers[0].returned, peers[0].charged);
    assert_int_equal(peers[0].gone, 1);
    end(e);
}

static void close_client(void *arg)
{
    env *e = arg;
    int fd = ws_connect(&e->srv, "/ws/session/s5", NULL, &e->a);
    if (fd < 0)
        return;
    ws_text(fd, "burst 3");
    /* 40 kB more: a write the socket takes only in part, the close after it. */
    ws_text(fd, "flood 40 1000");
    ws_text(fd, "close 4409");
    ws_read(fd, &e->a, 0);
    close(fd);
}

static void close_code_follows_the_queued_frames(void **state)
{
    env *e = begin(state, NULL, NULL, NULL, NULL);
    run(e, close_client);
    assert_int_equal(e->a.nframes, 3 + 40 + 1);
    assert_string_equal(e->a.frames[0], "{\"n\":0}");
    assert_string_equal(e->a.frames[2], "{\"n\":2}");
    assert_int_equal(e->a.frame_len[42], 1000);
    assert_string_equal(error_code(&e->a), "test_close");
    assert_int_equal(e->a.close_code, 4409);
    for (int i = 0; i < e->a.nframes; i++)
        assert_null(strstr(e->a.frames[i], "after")); /* queued after the close: dropped */
    /* conn_close tells the peer nothing: it asked. */
    assert_int_equal(peers[0].gone, 0);
    end(e);
}

static void flood_client(void *arg)
{
    env *e = arg;
    int fd = ws_connect(&e->srv, "/ws/session/s6", NULL, &e->a);
    if (fd < 0)
        return;
    ws_text(fd, "flood 100 1000");
    ws_read(fd, &e->a, 0);
    close(fd);
}

static void client_that_does_not_read_is_closed_1008(void **state)
{
    /* 4 × 1024 + 65536 bytes may wait for a client: 70 frames of 1000. */
    env *e = begin(state, "--max-out-buffer-bytes", "1024", NULL, NULL);
    run(e, flood_client);
    assert_int_equal(e->a.close_code, WS_CLOSE_POLICY);
    assert_string_equal(error_code(&e->a), "not_reading");
    assert_int_equal(peers[0].gone, 1);
    assert_true(peers[0].sent < 100);
    assert_int_equal(peers[0].sent, (4 * 1024 + 65536) / 1000 + 1);
    assert_int_equal(e->a.nframes, peers[0].sent + 1);
    assert_int_equal(peers[0].returned, peers[0].charged);
    end(e);
}

static void two_clients(void *arg)
{
    env *e = arg;
    int a = ws_connect(&e->srv, "/ws/session/first?user_id=u1", NULL, &e->a);
    if (a < 0)
        return;
    ws_text(a, "burst 1");
    ws_read(a, &e->a, 1); /* the first is established */
    int b = ws_connect(&e->srv, "/ws/session/second?user_id=u2", NULL, &e->b);
    if (b >= 0) {
        ws_read(b, &e->b, 0);
        close(b);
    }
    ws_text(a, "burst 1"); /* the first is still served */
    ws_read(a, &e->a, 1);
    close(a);
}

static void connections_past_the_limits_are_refused_1013(void **state)
{
    const char *const limits[][2] = {{"--max-connections-per-ip", "too_many_connections_ip"},
                                     {"--max-connections", "too_many_connections"}};
    for (size_t i = 0; i < sizeof limits / sizeof limits[0]; i++) {
        env *e = begin(state, limits[i][0], "1", NULL, NULL);
        run(e, two_clients);
        assert_int_equal(e->b.status, 101);
        assert_int_equal(e->b.close_code, WS_CLOSE_TRY_LATER);
        assert_string_equal(error_code(&e->b), limits[i][1]);
        assert_int_equal(npeers, 1); /* the second never reached the open function */
        assert_int_equal(e->a.nframes, 2);
        assert_int_equal(e->a.close_code, 0);
        assert_int_equal(atomic_load(&e->srv.g.counters.refused), 1);
        end(e);
    }
}

static void bad_ids_client(void *arg)
{
    env *e = arg;
    char longest[400] = "/ws/session/";
    memset(longest + strlen(longest), 'x', 129); /* one over the longest id */
    const char *paths[BAD_IDS] = {"/ws/session/", "/ws/session/bad%21id", longest,
                                  "/ws/session/ok?user_id=not%20valid"};
    for (int i = 0; i < BAD_IDS; i++) {
        seen *s = &e->bad[i];
        int fd = ws_connect(&e->srv, paths[i], NULL, s);
        if (fd < 0)
            continue;
        ws_read(fd, s, 0);
        close(fd);
    }
}

static void bad_ids_are_refused_4400(void **state)
{
    env *e = begin(state, NULL, NULL, NULL, NULL);
    run(e, bad_ids_client);
    for (int i = 0; i < BAD_IDS; i++) {
        assert_int_equal(e->bad[i].status, 101);
        assert_int_equal(e->bad[i].close_code, WS_CLOSE_BAD_SESSION);
        assert_string_equal(error_code(&e->bad[i]),
                            i < BAD_IDS - 1 ? "invalid_session_id" : "invalid_user_id");
    }
    assert_int_equal(npeers, 0);
    end(e);
}

static void no_token_client(void *arg)
{
    env *e = arg;
    int fd = ws_connect(&e->srv, "/ws/session/s7", NULL, &e->a);
    if (fd >= 0)
        close(fd);
    fd = ws_connect(&e->srv, "/ws/session/s7?access_token=not.a.token", NULL, &e->b);
    if (fd >= 0)
        close(fd);
}

static void handshake_without_a_token_is_401(void **state)
{
    char path[] = "/tmp/test_ws_secret_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char secret[] = "a secret of more than thirty-two bytes for HS256";
    assert_int_equal(write(fd, secret, sizeof secret - 1), (ssize_t)(sizeof secret - 1));
    close(fd);
    env *e = begin(state, "--auth", "jwt", "--jwt-secret-file", path);
    run(e, no_token_client);
    unlink(path);
    assert_int_equal(e->a.status, 401);
    assert_int_equal(e->b.status, 401);
    assert_int_equal(npeers, 0);
    assert_int_equal(atomic_load(&e->srv.g.counters.unauthorized), 2);
    end(e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(fragments_are_reassembled_within_the_limit),
        cmocka_unit_test(binary_frame_closes_1003),
        cmocka_unit_test(unmasked_frame_closes_1002),
        cmocka_unit_test(frames_go_out_in_order_and_charges_come_back),
        cmocka_unit_test(close_code_follows_the_queued_frames),
        cmocka_unit_test(client_that_does_not_read_is_closed_1008),
        cmocka_unit_test(connections_past_the_limits_are_refused_1013),
        cmocka_unit_test(bad_ids_are_refused_4400),
        cmocka_unit_test(handshake_without_a_token_is_401),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
