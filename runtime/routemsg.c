#include "routemsg.h"

static const Convo__V1__Strategy proto_strategy[ROUTE_N_STRATEGIES] = {
    [ROUTE_FAST_CONCISE] = CONVO__V1__STRATEGY__STRATEGY_FAST_CONCISE,
    [ROUTE_ANALYTICAL] = CONVO__V1__STRATEGY__STRATEGY_ANALYTICAL,
    [ROUTE_SUMMARIZATION_AWARE] = CONVO__V1__STRATEGY__STRATEGY_SUMMARIZATION_AWARE,
    [ROUTE_TOOL_HEAVY] = CONVO__V1__STRATEGY__STRATEGY_TOOL_HEAVY,
};

static const Convo__V1__Verbosity proto_verbosity[ROUTE_N_VERBOSITIES] = {
    [ROUTE_CONCISE] = CONVO__V1__VERBOSITY__VERBOSITY_CONCISE,
    [ROUTE_BALANCED] = CONVO__V1__VERBOSITY__VERBOSITY_BALANCED,
    [ROUTE_DETAILED] = CONVO__V1__VERBOSITY__VERBOSITY_DETAILED,
};

void routemsg_fill(routemsg *r, const route_decision *d)
{
    convo__v1__route_response__init(&r->resp);
    convo__v1__generation_params__init(&r->params);
    /* protobuf-c's message fields are not const; packing never writes
     * through them, so pointing into the read-only config is safe. */
    r->params.model = d->conf->model;
    r->params.temperature = (float)d->conf->temperature;
    r->params.max_tokens = d->conf->max_tokens;
    r->params.tools_enabled = d->conf->tools_enabled != 0;
    for (size_t i = 0; i < d->n_reasons; i++)
        r->reasons[i] = (char *)d->reasons[i];
    r->resp.strategy = proto_strategy[d->strategy];
    r->resp.verbosity = proto_verbosity[d->verbosity];
    r->resp.n_reasons = d->n_reasons;
    r->resp.reasons = r->reasons;
    r->resp.system_prompt = d->conf->system_prompt;
    r->resp.params = &r->params;
    r->resp.strategy_name = (char *)route_strategy_name(d->strategy);
}
