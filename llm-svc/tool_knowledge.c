/* fetch_internal_knowledge(topic): BM25 over the shipped knowledge folder
 * (kb.c). CPU-only and fast (microseconds for the shipped docs), so it runs
 * on the caller's thread. */
#include "kb.h"
#include "mem.h"
#include "tools.h"

#include <stdio.h>

#define KNOWLEDGE_HITS 3

static void run(void *state, const tool_ctx *ctx, json_object *args, tool_done_fn done, void *arg)
{
    const kb *k = state;
    const char *topic = json_object_get_string(json_object_object_get(args, "topic"));
    kb_hit hits[KNOWLEDGE_HITS];
    size_t n = kb_search(k, topic, hits, KNOWLEDGE_HITS);
    json_object *o = json_object_new_object(), *arr = json_object_new_array();
    json_object_object_add(o, "topic", json_object_new_string(topic));
    for (size_t i = 0; i < n; i++) {
        json_object *h = json_object_new_object();
        json_object_object_add(h, "source", json_object_new_string(hits[i].source));
        json_object_object_add(h, "section", json_object_new_string(hits[i].section));
        /* Written as printed ("3.416"), not as the nearest double's 17 digits. */
        char score[32];
        snprintf(score, sizeof score, "%.3f", hits[i].score);
        json_object_object_add(h, "score", json_object_new_double_s(hits[i].score, score));
        json_object_object_add(h, "text", json_object_new_string(hits[i].text));
        json_object_array_add(arr, h);
    }
    json_object_object_add(o, "results", arr);
    if (n == 0)
        json_object_object_add(o, "message",
                               json_object_new_string("nothing found in the knowledge base"));
    done(arg, 0,
         mem_strdup(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN |
                                                          JSON_C_TO_STRING_NOSLASHESCAPE)));
    json_object_put(o);
}

int tool_knowledge_register(tools *t, const kb *k)
{
    const tool_def def = {
        .name = "fetch_internal_knowledge",
        .description = "Search the internal knowledge base (Python, async programming, "
                       "WebSockets, LLMs, gRPC, PostgreSQL) and return the best passages with "
                       "their source and relevance score.",
        .schema = "{\"type\":\"object\",\"properties\":{\"topic\":{\"type\":\"string\","
                  "\"minLength\":1,\"maxLength\":500,\"description\":\"what to look up\"}},"
                  "\"required\":[\"topic\"],\"additionalProperties\":false}",
        .run = run,
        .state = (void *)k,
    };
    return tools_add(t, &def);
}
