#include "llm.h"

#include "complete.h"
#include "mem.h"

#include "convo_methods.h"

struct llm {
    chat_svc chat;
    turn_env complete; /* Complete's own: its calls take their own binding lock */
    tools *tools;
};

static void on_list_tools(srv_call *call, const ProtobufCMessage *msg)
{
    (void)msg;
    tools *ts = srv_call_method_data(call);
    size_t n = tools_count(ts);
    Convo__V1__Tool *tv = mem_calloc(n ? n : 1, sizeof *tv);
    Convo__V1__Tool **tp = mem_calloc(n ? n : 1, sizeof *tp);
    for (size_t i = 0; i < n; i++) {
        const tool_def *d = tools_get(ts, i);
        convo__v1__tool__init(&tv[i]);
        tv[i].name = (char *)d->name;
        tv[i].description = (char *)d->description;
        tv[i].parameters_json_schema = (char *)d->schema;
        tp[i] = &tv[i];
    }
    Convo__V1__ListToolsResponse r = CONVO__V1__LIST_TOOLS_RESPONSE__INIT;
    r.n_tools = n;
    r.tools = tp;
    srv_call_finish(call, RPC_OK, NULL, &r.base);
    mem_free(tv);
    mem_free(tp);
}

llm *llm_create(const turn_opts *to, const chat_opts *co, upstream *u, endpoints *eps,
                const models *m, tools *t, metrics *mx)
{
    llm *l = mem_calloc(1, sizeof *l);
    chat_svc_init(&l->chat, to, co, u, eps, m, t, mx);
    turn_env_init(&l->complete, "complete", to, u, eps, m, mx);
    l->tools = t;
    return l;
}

int llm_register(srv *s, llm *l)
{
    /* Who calls what (README.md), enforced under mutual TLS: turns come from
     * the gateway, summaries from summary-svc; `admin` (an operator) only
     * reads the tools. */
    const srv_method methods[] = {
        {&convo__v1__llm__chat__method, chat_on_call, NULL, NULL, "gateway"},
        {&convo__v1__llm__complete__method, complete_on_call, NULL, NULL, "summary-svc"},
        {&convo__v1__llm__list_tools__method, on_list_tools, NULL, NULL,
         "gateway summary-svc admin"},
    };
    void *data[] = {&l->chat, &l->complete, l->tools};
    for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
        if (srv_add_method(s, &methods[i], data[i]) != 0)
            return RPC_EARG;
    return 0;
}

void llm_destroy(llm **lp)
{
    if (lp == NULL || *lp == NULL)
        return;
    chat_svc_destroy(&(*lp)->chat);
    turn_env_destroy(&(*lp)->complete);
    mem_free(*lp);
    *lp = NULL;
}
