/* llm — the convo.v1.Llm service: registers Chat (chat.h), Complete
 * (complete.h) and ListTools, each with the callers it answers under mutual
 * TLS, and owns the state they share: each method's turn_env over one
 * upstream loop (upstream.h), the model endpoints (endpoints.h) and the
 * allowed models (models.h), and the tools registry (tools.h). How a call
 * is driven, by which threads under which locks, is in turn.h. */
#ifndef CONVO_LLM_H
#define CONVO_LLM_H

#include "chat.h"
#include "endpoints.h"
#include "metrics.h"
#include "models.h"
#include "srv.h"
#include "tools.h"
#include "turn.h"
#include "upstream.h"

typedef struct llm llm;

/* The service over options, an upstream loop, the endpoints, the allowed
 * models and a tools registry (all borrowed; they must outlive it; the
 * tools are all registered already). Counts its turns, model requests,
 * tokens and tool calls in mx (NULL: nothing). */
llm *llm_create(const turn_opts *to, const chat_opts *co, upstream *u, endpoints *eps,
                const models *m, tools *t, metrics *mx);
/* Registers Chat, Complete and ListTools on `s`. Returns 0 or RPC_EARG. */
int llm_register(srv *s, llm *l);
/* After the server stopped. Clears *l. */
void llm_destroy(llm **l);

#endif
