/* http: the REST routes of http.c behind a real libwebsockets server on a
 * libev loop (gwsrv.h), called with libcurl from a client thread, its
 * gRPC calls answered by a fake store-svc served in-process (with the
 * runtime's grpc.health.v1 on it, for readiness).
 *
 * Checked: session ids and the paging arguments (after_seq, limit, before)
 * at and past their bounds, and what reaches the store; another user's
 * session answered exactly as a missing one (404) and its events never
 * read; --auth jwt without or with a bad token (401 with WWW-Authenticate)
 * while /api/health stays open; --auth dev tokens and a user_id naming
 * someone else (403); /readyz following llm-svc and store-svc but not
 * router-svc; --rest-rate-per-ip (429 with Retry-After). */
#include "gwsrv.h"

#include "convo_methods.h"
#include "health.h"
#include "srv.h"

#include "../common/fakesrv.h"

#include <curl/curl.h>
#include <json-c/json.h>
#include <stdlib.h>

#define REQS_MAX     24
#define BODY_CAP     8192
#define TOTAL_EVENTS 5 /* s-alice's stored events, seq 1 to 5 */
#define ALICE_ID     "s-alice"

/* ---- the fake store-svc ---------------------------------------------------- */

typedef struct fake {
    pthread_mutex_t mu;
    int gets, lists, list_users;
    int64_t after_seq, limit; /* of the last ListEvents */
    char list_user[64];       /* of the last ListUserSessions */
    uint32_t list_limit;
} fake;

static fake fk = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void on_get_session(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__GetSessionRequest *req = (const Convo__V1__GetSessionRequest *)msg;
    pthread_mutex_lock(&fk.mu);
    fk.gets++;
    pthread_mutex_unlock(&fk.mu);
    if (strcmp(req->session_id, ALICE_ID) != 0) {
        srv_call_finish(call, RPC_NOT_FOUND, "no such session", NULL);
        return;
    }
    Convo__V1__Session s = CONVO__V1__SESSION__INIT;
    s.session_id = ALICE_ID;
    s.user_id = "alice";
    s.start_time_us = 1700000000000000;
    s.event_count = TOTAL_EVENTS;
    s.last_seq = TOTAL_EVENTS;
    Convo__V1__GetSessionResponse r = CONVO__V1__GET_SESSION_RESPONSE__INIT;
    r.session = &s;
    srv_call_finish(call, RPC_OK, NULL, &r.base);
}

static void on_list_events(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__ListEventsRequest *req = (const Convo__V1__ListEventsRequest *)msg;
    pthread_mutex_lock(&fk.mu);
    fk.lists++;
    fk.after_seq = req->after_seq;
    fk.limit = req->limit;
    pthread_mutex_unlock(&fk.mu);
    for (int64_t seq = req->after_seq + 1;
         seq <= TOTAL_EVENTS && (req->limit == 0 || seq <= req->after_seq + req->limit); seq++) {
        char text[32];
        snprintf(text, sizeof text, "event %lld", (long long)seq);
        Convo__V1__Event ev = CONVO__V1__EVENT__INIT;
        ev.session_id = req->session_id;
        ev.seq = seq;
        ev.type = CONVO__V1__EVENT_TYPE__EVENT_TYPE_USER_MESSAGE;
        ev.content = text;
        srv_call_send(call, &ev.base);
    }
    srv_call_finish(call, RPC_OK, NULL, NULL);
}

static void on_list_user_sessions(srv_call *call, const ProtobufCMessage *msg)
{
    const Convo__V1__ListUserSessionsRequest *req = (const Convo__V1__ListUserSessionsRequest *)msg;
    pthread_mutex_lock(&fk.mu);
    fk.list_users++;
    snprintf(fk.list_user, sizeof fk.list_user, "%s", req->user_id);
    fk.list_limit = req->limit;
    pthread_mutex_unlock(&fk.mu);
    Convo__V1__ListUserSessionsResponse r = CONVO__V1__LIST_USER_SESSIONS_RESPONSE__INIT;
    srv_call_finish(call, RPC_OK, NULL, &r.base);
}

static fake fake_snap(void)
{
    pthread_mutex_lock(&fk.mu);
    fake f = fk;
    pthread_mutex_unlock(&fk.mu);
    return f;
}

/* ---- the client (libcurl, on the client thread) ---------------------------- */

typedef struct request {
    const char *path;   /* with its arguments */
    const char *bearer; /* Authorization: Bearer (NULL: none) */
    const char *post;   /* a POST body (NULL: GET) */
    /* what came back */
    long status;
    char body[BODY_CAP];
    size_t body_len;
    char www_authenticate[256];
    char retry_after[256];
} request;

static size_t on_body(char *data, size_t size, size_t n, void *arg)
{
    request *r = arg;
    size_t len = size * n, room = sizeof r->body - 1 - r->body_len;
    size_t kept = len < room ? len : room;
    memcpy(r->body + r->body_len, data, kept);
    r->body_len += kept;
    r->body[r->body_len] = '\0';
    return len;
}

static size_t on_header(char *data, size_t size, size_t n, void *arg)
{
    request *r = arg;
    size_t len = size * n;
    char line[256];
    snprintf(line, sizeof line, "%.*s", (int)(len < sizeof line - 1 ? len : sizeof line - 1), data);
    line[strcspn(line, "\r\n")] = '\0';
    if (strncasecmp(line, "www-authenticate:", 17) == 0)
        snprintf(r->www_authenticate, sizeof r->www_authenticate, "%s", line + 17 + 1);
    else if (strncasecmp(line, "retry-after:", 12) == 0)
        snprintf(r->retry_after, sizeof r->retry_after, "%s", line + 12 + 1);
    return len;
}

static void call(int port, request *r)
{
    CURL *h = curl_easy_init();
    char url[512], authz[2048];
    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", port, r->path);
    struct curl_slist *hdrs = NULL;
    if (r->bearer != NULL) {
        snprintf(authz, sizeof authz, "Authorization: Bearer %s", r->bearer);
        hdrs = curl_slist_append(hdrs, authz);
    }
    if (r->post != NULL) {
        hdrs = curl_slist_append(hdrs, "Content-Type: application/json");
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, r->post);
    }
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(h, CURLOPT_TIMEOUT, (long)GWSRV_IO_SECS);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    if (curl_easy_perform(h) == CURLE_OK)
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r->status);
    curl_slist_free_all(hdrs);
    curl_easy_cleanup(h);
}

/* ---- the tests ----------------------------------------------------------- */

typedef struct env {
    struct ev_loop *loop;
    cli *client;
    fakesrv store;
    health *health;
    gwsrv srv;
    request reqs[REQS_MAX];
    size_t nreqs;
    /* dev mode: the user each request's token is made for (POST first) */
    const char *token_users[REQS_MAX];
} env;

static int setup(void **state)
{
    env *e = mem_calloc(1, sizeof *e);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    lws_set_log_level(LLL_ERR, NULL);
    fakesrv_create(&e->store, "store-svc");
    e->health = health_attach(e->store.s);
    assert_non_null(e->health);
    const srv_method ms[] = {
        {.method = &convo__v1__store__get_session__method,
         .on_call = on_get_session,
         .callers = "*"},
        {.method = &convo__v1__store__list_events__method,
         .on_call = on_list_events,
         .callers = "*"},
        {.method = &convo__v1__store__list_user_sessions__method,
         .on_call = on_list_user_sessions,
         .callers = "*"},
    };
    fakesrv_add(&e->store, ms, sizeof ms / sizeof ms[0]);
    fakesrv_run(&e->store);
    e->loop = ev_loop_new(EVFLAG_AUTO);
    e->client = cli_create(1, 0);
    *state = e;
    return 0;
}

static int teardown(void **state)
{
    env *e = *state;
    cli_destroy(&e->client);
    ev_loop_destroy(e->loop);
    fakesrv_stop(&e->store);
    curl_global_cleanup();
    mem_free(e);
    return 0;
}

static env *begin(void **state, const char *const *args)
{
    env *e = *state;
    pthread_mutex_lock(&fk.mu);
    fk.gets = fk.lists = fk.list_users = 0;
    pthread_mutex_unlock(&fk.mu);
    memset(e->reqs, 0, sizeof e->reqs);
    memset(e->token_users, 0, sizeof e->token_users);
    e->nreqs = 0;
    health_set(e->health, "", HEALTH_SERVING);
    gwsrv_start(&e->srv, e->loop, e->client, e->store.target, args, NULL, NULL);
    return e;
}

static request *add(env *e, const char *path)
{
    assert_true(e->nreqs < REQS_MAX);
    request *r = &e->reqs[e->nreqs++];
    r->path = path;
    return r;
}

static void client(void *arg)
{
    env *e = arg;
    for (size_t i = 0; i < e->nreqs; i++)
        call(e->srv.port, &e->reqs[i]);
}

/* Sends every request added, in order. */
static void run(env *e)
{
    assert_int_equal(gwsrv_run_client(&e->srv, client, e, 0), 0);
}

/* A field of a request's JSON answer as text ("" when absent). */
static const char *field(const request *r, const char *key)
{
    static char buf[256];
    buf[0] = '\0';
    json_object *o = json_tokener_parse(r->body), *v;
    if (o != NULL && json_object_object_get_ex(o, key, &v))
        snprintf(buf, sizeof buf, "%s", v != NULL ? json_object_get_string(v) : "null");
    json_object_put(o);
    return buf;
}

static void expect(const request *r, long status, const char *code)
{
    if (r->status != status || (code != NULL && strcmp(field(r, "code"), code) != 0))
        fail_msg("%s: %ld %s, expected %ld %s", r->path, r->status, r->body, status,
                 code != NULL ? code : "");
}

static const char *const none_mode[] = {"--auth", "none", NULL};

static void ids_and_paging_are_checked(void **state)
{
    env *e = begin(state, none_mode);
    static char longest[300];
    snprintf(longest, sizeof longest, "/api/sessions/%0129d?user_id=alice", 0);
    request *bad_char = add(e, "/api/sessions/bad%21id?user_id=alice");
    request *too_long = add(e, longest);
    const char *bad_paging[] = {
        "/api/sessions/" ALICE_ID "/events?user_id=alice&after_seq=-1",
        "/api/sessions/" ALICE_ID "/events?user_id=alice&after_seq=abc",
        "/api/sessions/" ALICE_ID "/events?user_id=alice&after_seq=",
        "/api/sessions/" ALICE_ID "/events?user_id=alice&limit=0",
        "/api/sessions/" ALICE_ID "/events?user_id=alice&limit=1001",
        "/api/sessions/" ALICE_ID "/events?user_id=alice&limit=12x",
    };
    request *paging[6];
    for (size_t i = 0; i < 6; i++)
        paging[i] = add(e, bad_paging[i]);
    request *widest = add(e, "/api/sessions/" ALICE_ID "/events?user_id=alice&limit=1000");
    request *page = add(e, "/api/sessions/" ALICE_ID "/events?user_id=alice&after_seq=1&limit=2");
    request *list0 = add(e, "/api/sessions?user_id=alice&limit=0");
    request *list101 = add(e, "/api/sessions?user_id=alice&limit=101");
    request *list100 = add(e, "/api/sessions?user_id=alice&limit=100");
    request *cursor = add(e, "/api/sessions?user_id=alice&before=junk");
    request *nouser = add(e, "/api/sessions");
    request *unknown = add(e, "/api/sessions/" ALICE_ID "/nope?user_id=alice");
    run(e);

    expect(bad_char, 400, "invalid_session_id");
    expect(too_long, 400, "invalid_session_id");
    for (size_t i = 0; i < 6; i++)
        expect(paging[i], 400, "invalid_paging");
    /* The bounds themselves are taken; the store is asked one more than the
     * page, to know whether a next page exists. */
    expect(widest, 200, NULL);
    expect(page, 200, NULL);
    fake f = fake_snap();
    assert_int_equal(f.lists, 2);
    assert_int_equal(f.after_seq, 1);
    assert_int_equal(f.limit, 3);
    json_object *o = json_tokener_parse(page->body), *events, *next;
    assert_non_null(o);
    assert_true(json_object_object_get_ex(o, "events", &events));
    assert_int_equal(json_object_array_length(events), 2);
    json_object *seq;
    assert_true(json_object_object_get_ex(json_object_array_get_idx(events, 0), "seq", &seq));
    assert_int_equal(json_object_get_int(seq), 2);
    assert_true(json_object_object_get_ex(o, "next_after_seq", &next));
    assert_int_equal(json_object_get_int(next), 3);
    json_object_put(o);
    assert_string_equal(field(widest, "next_after_seq"), "null");

    expect(list0, 400, "invalid_limit");
    expect(list101, 400, "invalid_limit");
    expect(list100, 200, NULL);
    assert_int_equal(f.list_users, 1);
    assert_string_equal(f.list_user, "alice");
    assert_int_equal(f.list_limit, 101);
    expect(cursor, 400, "invalid_cursor");
    expect(nouser, 400, "missing_user_id");
    expect(unknown, 404, "no_such_endpoint");
    gwsrv_stop(&e->srv);
}

static void another_users_session_is_404(void **state)
{
    env *e = begin(state, none_mode);
    request *own = add(e, "/api/sessions/" ALICE_ID "?user_id=alice");
    request *other = add(e, "/api/sessions/" ALICE_ID "?user_id=bob");
    request *missing = add(e, "/api/sessions/s-missing?user_id=bob");
    request *events = add(e, "/api/sessions/" ALICE_ID "/events?user_id=bob");
    run(e);
    expect(own, 200, NULL);
    assert_string_equal(field(own, "session_id"), ALICE_ID);
    assert_string_equal(field(own, "user_id"), "alice");
    assert_string_equal(field(own, "event_count"), "5");
    /* Another user's session reads exactly as one that does not exist. */
    expect(other, 404, "not_found");
    expect(missing, 404, "not_found");
    assert_string_equal(field(other, "error"), "no such session");
    assert_string_equal(field(missing, "error"), "no such session");
    expect(events, 404, "not_found");
    assert_int_equal(fake_snap().lists, 0); /* bob's request never read alice's events */
    gwsrv_stop(&e->srv);
}

static void jwt_mode_needs_a_token(void **state)
{
    char path[] = "/tmp/test_http_secret_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char secret[] = "a secret of more than thirty-two bytes for HS256";
    assert_int_equal(write(fd, secret, sizeof secret - 1), (ssize_t)(sizeof secret - 1));
    close(fd);
    const char *const args[] = {"--auth", "jwt", "--jwt-secret-file", path, NULL};
    env *e = begin(state, args);
    request *none = add(e, "/api/sessions/" ALICE_ID);
    request *bad = add(e, "/api/sessions/" ALICE_ID);
    bad->bearer = "not.a.token";
    request *list = add(e, "/api/sessions?user_id=alice");
    request *api_health = add(e, "/api/health");
    request *alive = add(e, "/healthz");
    run(e);
    unlink(path);
    expect(none, 401, NULL);
    assert_string_equal(none->www_authenticate, "Bearer");
    expect(bad, 401, NULL);
    assert_string_equal(bad->www_authenticate, "Bearer");
    expect(list, 401, NULL);
    assert_int_equal(fake_snap().gets + fake_snap().list_users, 0);
    /* The probes stay open; without a token /api/health shows no address. */
    expect(api_health, 200, NULL);
    assert_null(strstr(api_health->body, e->store.target));
    assert_string_equal(api_health->www_authenticate, "");
    expect(alive, 200, NULL);
    assert_int_equal(atomic_load(&e->srv.g.counters.unauthorized), 3);
    gwsrv_stop(&e->srv);
}

/* Dev mode: a token per user, then requests with them. */
static void dev_client(void *arg)
{
    env *e = arg;
    static char tokens[2][2048];
    const char *users[] = {"alice", "bob"};
    for (int i = 0; i < 2; i++) {
        request r = {.path = "/api/dev/token"};
        char body[64];
        snprintf(body, sizeof body, "{\"user_id\":\"%s\"}", users[i]);
        r.post = body;
        call(e->srv.port, &r);
        snprintf(tokens[i], sizeof tokens[i], "%s", field(&r, "access_token"));
    }
    for (size_t i = 0; i < e->nreqs; i++) {
        if (e->token_users[i] != NULL)
            e->reqs[i].bearer = tokens[strcmp(e->token_users[i], "alice") == 0 ? 0 : 1];
        call(e->srv.port, &e->reqs[i]);
    }
}

static void dev_tokens_name_their_user(void **state)
{
    const char *const args[] = {"--auth", "dev", NULL};
    env *e = begin(state, args);
    request *alice = add(e, "/api/sessions/" ALICE_ID);
    e->token_users[0] = "alice";
    request *bob = add(e, "/api/sessions/" ALICE_ID);
    e->token_users[1] = "bob";
    request *posing = add(e, "/api/sessions/" ALICE_ID "?user_id=alice");
    e->token_users[2] = "bob";
    request *badname = add(e, "/api/dev/token");
    badname->post = "{\"user_id\":\"no spaces allowed\"}";
    request *nobody = add(e, "/api/dev/token");
    nobody->post = "{}";
    assert_int_equal(gwsrv_run_client(&e->srv, dev_client, e, 0), 0);
    expect(alice, 200, NULL);
    assert_string_equal(field(alice, "user_id"), "alice");
    expect(bob, 404, "not_found");
    expect(posing, 403, NULL);
    expect(badname, 400, "invalid_user_id");
    expect(nobody, 400, "invalid_user_id");
    gwsrv_stop(&e->srv);
}

static void readiness_follows_llm_and_store(void **state)
{
    env *e = begin(state, none_mode);
    request *ready = add(e, "/readyz");
    run(e);
    expect(ready, 200, NULL);
    assert_string_equal(field(ready, "status"), "ready");

    /* router-svc down: turns take the default route, still ready. */
    char err[256];
    e->srv.g.router =
        cli_channel_create(e->client, GWSRV_DEAD_ADDR, NULL, 0, NULL, err, sizeof err);
    e->nreqs = 0;
    memset(e->reqs, 0, sizeof e->reqs);
    ready = add(e, "/readyz");
    request *api_health = add(e, "/api/health");
    run(e);
    expect(ready, 200, NULL);
    expect(api_health, 200, NULL);
    assert_string_equal(field(api_health, "status"), "degraded");
    assert_non_null(strstr(api_health->body, "\"router-svc\":{\"status\":\"UNREACHABLE\""));

    /* store-svc (here every service) not serving: not ready. */
    health_set(e->health, "", HEALTH_NOT_SERVING);
    e->nreqs = 0;
    memset(e->reqs, 0, sizeof e->reqs);
    ready = add(e, "/readyz");
    run(e);
    expect(ready, 503, NULL);
    assert_string_equal(field(ready, "status"), "not_ready");

    /* llm-svc alone unreachable: not ready either. */
    health_set(e->health, "", HEALTH_SERVING);
    e->srv.g.llm = e->srv.g.router;
    e->nreqs = 0;
    memset(e->reqs, 0, sizeof e->reqs);
    ready = add(e, "/readyz");
    run(e);
    expect(ready, 503, NULL);
    assert_non_null(strstr(ready->body, "\"llm-svc\":{\"status\":\"UNREACHABLE\""));
    assert_non_null(strstr(ready->body, "\"store-svc\":{\"status\":\"SERVING\""));
    gwsrv_stop(&e->srv);
}

static void rest_requests_are_paced_per_address(void **state)
{
    const char *const args[] = {"--auth", "none", "--rest-rate-per-ip", "1", NULL};
    env *e = begin(state, args);
    /* Bursts of twice the rate: the third at once is refused. */
    request *r[3];
    for (int i = 0; i < 3; i++)
        r[i] = add(e, "/api/sessions/s-missing?user_id=bob");
    request *probe = add(e, "/healthz"); /* probes are not paced */
    run(e);
    expect(r[0], 404, "not_found");
    expect(r[1], 404, "not_found");
    expect(r[2], 429, "rate_limited");
    assert_true(atoi(r[2]->retry_after) >= 1);
    expect(probe, 200, NULL);
    assert_int_equal(fake_snap().gets, 2);
    gwsrv_stop(&e->srv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(ids_and_paging_are_checked),
        cmocka_unit_test(another_users_session_is_404),
        cmocka_unit_test(jwt_mode_needs_a_token),
        cmocka_unit_test(dev_tokens_name_their_user),
        cmocka_unit_test(readiness_follows_llm_and_store),
        cmocka_unit_test(rest_requests_are_paced_per_address),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
