/* Tests of runtime/routemsg.c: a route decision as the wire's RouteResponse. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "mem.h"
#include "route.h"
#include "routemsg.h"

#include <math.h>
#include <string.h>

static route_config *cfg;

static int setup(void **state)
{
    cfg = route_config_new();
    return 0;
}

static int teardown(void **state)
{
    route_config_free(&cfg);
    return 0;
}

static void test_reply_fill_and_pack(void **state)
{
    route_input in = {"why?", 4, 11, 0};
    route_decision d;
    route_decide(cfg, &in, &d);
    routemsg r;
    routemsg_fill(&r, &d);

    /* Through the wire format and back, as a client sees it. */
    size_t len = protobuf_c_message_get_packed_size(&r.resp.base);
    uint8_t *buf = mem_alloc(len);
    assert_int_equal(protobuf_c_message_pack(&r.resp.base, buf), len);
    Convo__V1__RouteResponse *resp = convo__v1__route_response__unpack(NULL, len, buf);
    mem_free(buf);
    assert_non_null(resp);

    assert_int_equal(resp->strategy, CONVO__V1__STRATEGY__STRATEGY_ANALYTICAL);
    assert_int_equal(resp->verbosity, CONVO__V1__VERBOSITY__VERBOSITY_DETAILED);
    assert_string_equal(resp->strategy_name, "analytical");
    assert_int_equal(resp->n_reasons, 2);
    assert_string_equal(resp->reasons[0], d.reasons[0]);
    assert_string_equal(resp->reasons[1], d.reasons[1]);
    assert_string_equal(resp->system_prompt, cfg->strategies[ROUTE_ANALYTICAL].system_prompt);
    assert_non_null(resp->params);
    assert_string_equal(resp->params->model, "");
    assert_true(fabsf(resp->params->temperature -
                      (float)cfg->strategies[ROUTE_ANALYTICAL].temperature) < 1e-6f);
    assert_int_equal(resp->params->max_tokens, cfg->strategies[ROUTE_ANALYTICAL].max_tokens);
    assert_true(resp->params->tools_enabled);
    convo__v1__route_response__free_unpacked(resp, NULL);
}

static void test_reply_maps_every_strategy(void **state)
{
    static const struct {
        route_input in;
        Convo__V1__Strategy strategy;
        Convo__V1__Verbosity verbosity;
    } cases[] = {
        {{"hi", 2, 1, 0},
         CONVO__V1__STRATEGY__STRATEGY_FAST_CONCISE,
         CONVO__V1__VERBOSITY__VERBOSITY_CONCISE},
        {{"how", 3, 1, 0},
         CONVO__V1__STRATEGY__STRATEGY_ANALYTICAL,
         CONVO__V1__VERBOSITY__VERBOSITY_DETAILED},
        {{"hi", 2, 11, 0},
         CONVO__V1__STRATEGY__STRATEGY_SUMMARIZATION_AWARE,
         CONVO__V1__VERBOSITY__VERBOSITY_BALANCED},
        {{"hi", 2, 1, 3},
         CONVO__V1__STRATEGY__STRATEGY_TOOL_HEAVY,
         CONVO__V1__VERBOSITY__VERBOSITY_CONCISE},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        route_decision d;
        route_decide(cfg, &cases[i].in, &d);
        routemsg r;
        routemsg_fill(&r, &d);
        assert_int_equal(r.resp.strategy, cases[i].strategy);
        assert_int_equal(r.resp.verbosity, cases[i].verbosity);
        assert_string_equal(r.resp.strategy_name, route_strategy_name(d.strategy));
    }
}

static void test_fixed_decision_is_the_strategy_asked_for(void **state)
{
    route_decision d;
    route_fixed(cfg, ROUTE_TOOL_HEAVY, "router-svc did not answer", &d);
    routemsg r;
    routemsg_fill(&r, &d);
    assert_int_equal(r.resp.strategy, CONVO__V1__STRATEGY__STRATEGY_TOOL_HEAVY);
    assert_int_equal(r.resp.verbosity, CONVO__V1__VERBOSITY__VERBOSITY_CONCISE);
    assert_string_equal(r.resp.system_prompt, cfg->strategies[ROUTE_TOOL_HEAVY].system_prompt);
    assert_int_equal(r.resp.params->max_tokens, cfg->strategies[ROUTE_TOOL_HEAVY].max_tokens);
    assert_int_equal(r.resp.n_reasons, 1);
    assert_string_equal(r.resp.reasons[0], "router-svc did not answer");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reply_fill_and_pack),
        cmocka_unit_test(test_reply_maps_every_strategy),
        cmocka_unit_test(test_fixed_decision_is_the_strategy_asked_for),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
