/* defroute: the default route is the strategy asked for, from the built-in
 * rules or a router.conf (refused at start-up with its line when bad); an
 * outage begins at the first failed Route, lets one probe through at a
 * time, and ends at the first Route that answers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "defroute.h"
#include "route.h"

static defroute *make(const char *config, const char *strategy)
{
    defroute_opts o = {.config = (char *)config, .strategy = (char *)strategy};
    defroute *d = NULL;
    char err[512];
    if (defroute_create(&o, &d, err, sizeof err) != 0)
        fail_msg("defroute_create: %s", err);
    return d;
}

static void the_built_in_route_is_fast_concise_of_the_shipped_rules(void **state)
{
    defroute *d = make("", "fast_concise");
    route_config *cfg = route_config_new();
    const Convo__V1__RouteResponse *r = defroute_response(d);
    assert_int_equal(r->strategy, CONVO__V1__STRATEGY__STRATEGY_FAST_CONCISE);
    assert_string_equal(r->strategy_name, "fast_concise");
    assert_string_equal(r->system_prompt, cfg->strategies[ROUTE_FAST_CONCISE].system_prompt);
    assert_int_equal(r->params->max_tokens, cfg->strategies[ROUTE_FAST_CONCISE].max_tokens);
    assert_true(r->params->tools_enabled);
    assert_int_equal(r->n_reasons, 1);
    route_config_free(&cfg);
    defroute_destroy(&d);
    assert_null(d);
}

static void a_file_sets_the_prompt_and_parameters(void **state)
{
    char path[] = "/tmp/defroute-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char text[] = "[prompt]\nbase = Be brief.\n[strategy.analytical]\ninstructions =\n"
                        "temperature = 0.9\nmax_tokens = 77\ntools = false\nmodel = small\n";
    assert_int_equal(write(fd, text, sizeof text - 1), (ssize_t)(sizeof text - 1));
    close(fd);
    defroute *d = make(path, "analytical");
    const Convo__V1__RouteResponse *r = defroute_response(d);
    assert_string_equal(r->strategy_name, "analytical");
    assert_string_equal(r->system_prompt, "Be brief.");
    assert_int_equal(r->params->max_tokens, 77);
    assert_false(r->params->tools_enabled);
    assert_string_equal(r->params->model, "small");
    assert_true(r->params->temperature > 0.89f && r->params->temperature < 0.91f);
    defroute_destroy(&d);
    unlink(path);
}

static void a_bad_file_or_strategy_is_refused_with_why(void **state)
{
    char path[] = "/tmp/defroute-XXXXXX";
    int fd = mkstemp(path);
    const char text[] = "[strategy.fast_concise]\ntemprature = 0.1\n";
    assert_int_equal(write(fd, text, sizeof text - 1), (ssize_t)(sizeof text - 1));
    close(fd);
    char err[512];
    defroute *d = (defroute *)1;
    defroute_opts o = {.config = path, .strategy = "fast_concise"};
    assert_int_equal(defroute_create(&o, &d, err, sizeof err), -1);
    assert_null(d);
    char want[300];
    snprintf(want, sizeof want, "--default-route-config: %s:2: unknown key 'temprature'", path);
    assert_non_null(strstr(err, want));
    unlink(path);

    o.config = "";
    o.strategy = "fastest";
    assert_int_equal(defroute_create(&o, &d, err, sizeof err), -1);
    assert_non_null(strstr(err, "--default-route-strategy 'fastest'"));
    o.config = "/nonexistent/router.conf";
    o.strategy = "fast_concise";
    assert_int_equal(defroute_create(&o, &d, err, sizeof err), -1);
    assert_non_null(strstr(err, "cannot read"));
}

static void reasons_name_the_failure(void **state)
{
    assert_null(defroute_reason(RPC_OK));
    assert_null(defroute_reason(RPC_CANCELLED));
    assert_string_equal(defroute_reason(RPC_UNAVAILABLE), DEFROUTE_UNAVAILABLE);
    assert_string_equal(defroute_reason(RPC_DEADLINE_EXCEEDED), DEFROUTE_TIMEOUT);
    assert_string_equal(defroute_reason(RPC_INTERNAL), DEFROUTE_ERROR);
    assert_string_equal(defroute_reason(RPC_PERMISSION_DENIED), DEFROUTE_ERROR);
}

static void an_outage_lets_one_probe_through_until_route_answers(void **state)
{
    defroute *d = make("", "fast_concise");
    int probe = -1;
    /* While router-svc answers, every turn asks it. */
    assert_int_equal(defroute_ask(d, &probe), 1);
    assert_int_equal(probe, 0);
    assert_int_equal(defroute_ask(d, &probe), 1);
    assert_false(defroute_down(d));
    /* The first failure starts the outage; a second changes nothing. */
    defroute_result(d, 0, RPC_DEADLINE_EXCEEDED, "deadline", 1000);
    assert_true(defroute_down(d));
    defroute_result(d, 0, RPC_DEADLINE_EXCEEDED, "deadline", 1100);
    /* One probe at a time; the others take the default route at once. */
    assert_int_equal(defroute_ask(d, &probe), 1);
    assert_int_equal(probe, 1);
    assert_int_equal(defroute_ask(d, &probe), 0);
    assert_int_equal(probe, 0);
    defroute_count(d);
    /* The probe fails: the outage goes on, and the next turn probes. */
    defroute_result(d, 1, RPC_UNAVAILABLE, "refused", 2000);
    assert_true(defroute_down(d));
    assert_int_equal(defroute_ask(d, &probe), 1);
    assert_int_equal(probe, 1);
    /* A cancelled probe says nothing of router-svc but frees the slot. */
    defroute_result(d, 1, RPC_CANCELLED, "cancelled", 2100);
    assert_true(defroute_down(d));
    assert_int_equal(defroute_ask(d, &probe), 1);
    assert_int_equal(probe, 1);
    /* It answers: the outage is over, and every turn asks again. */
    defroute_result(d, 1, RPC_OK, "", 3000);
    assert_false(defroute_down(d));
    assert_int_equal(defroute_ask(d, &probe), 1);
    assert_int_equal(probe, 0);
    assert_int_equal(defroute_ask(d, &probe), 1);
    assert_int_equal(defroute_degraded(d), 1);
    defroute_destroy(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(the_built_in_route_is_fast_concise_of_the_shipped_rules),
        cmocka_unit_test(a_file_sets_the_prompt_and_parameters),
        cmocka_unit_test(a_bad_file_or_strategy_is_refused_with_why),
        cmocka_unit_test(reasons_name_the_failure),
        cmocka_unit_test(an_outage_lets_one_probe_through_until_route_answers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
