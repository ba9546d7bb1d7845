/* tools: the registry's schema checks, dispatch and error results, with a
 * recording tool in place of the real ones. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "mem.h"
#include "tools.h"

#include <json-c/json.h>
#include <stdio.h>
#include <string.h>

#define ECHO_SCHEMA                                                                                \
    "{\"type\":\"object\",\"properties\":{\"q\":{\"type\":\"string\",\"minLength\":2,"             \
    "\"maxLength\":5},\"n\":{\"type\":\"integer\"},\"x\":{\"type\":\"number\"}},"                  \
    "\"required\":[\"q\"],\"additionalProperties\":false}"

/* What the done callback saw. */
typedef struct seen {
    int calls;
    int is_error;
    char *result;
} seen;

/* What the tool's run saw. */
typedef struct ran {
    int calls;
    char args[128];
    const char *session_id;
} ran;

static void on_done(void *arg, int is_error, char *result_json)
{
    seen *s = arg;
    s->calls++;
    s->is_error = is_error;
    mem_free(s->result);
    s->result = result_json;
}

/* Answers {"echo": args} and records what it was called with. */
static void echo_run(void *state, const tool_ctx *ctx, json_object *args, tool_done_fn done,
                     void *arg)
{
    ran *r = state;
    r->calls++;
    r->session_id = ctx->session_id;
    snprintf(r->args, sizeof r->args, "%s",
             json_object_to_json_string_ext(args, JSON_C_TO_STRING_PLAIN));
    done(arg, 0, mem_asprintf("{\"echo\":%s}", r->args));
}

static tools *make(ran *r)
{
    tools *t = tools_create();
    tool_def d = {.name = "echo",
                  .description = "echoes its arguments",
                  .schema = ECHO_SCHEMA,
                  .run = echo_run,
                  .state = r};
    assert_int_equal(tools_add(t, &d), 0);
    return t;
}

/* Calls `name` with `args`; done must have fired exactly once. */
static void call(tools *t, const char *name, const char *args, seen *s)
{
    tool_ctx ctx = {.session_id = "s1", .user_id = "u1", .request_id = "r1", .span = NULL};
    s->calls = 0;
    tools_call(t, &ctx, name, args, on_done, s);
    assert_int_equal(s->calls, 1);
}

/* The "error" member of an error result. */
static void assert_error_has(const seen *s, const char *needle)
{
    assert_int_equal(s->is_error, 1);
    json_object *o = json_tokener_parse(s->result);
    assert_non_null(o);
    json_object *e = NULL;
    assert_true(json_object_object_get_ex(o, "error", &e));
    assert_non_null(strstr(json_object_get_string(e), needle));
    json_object_put(o);
}

static void registers_and_lists(void **state)
{
    (void)state;
    ran r = {0};
    tools *t = make(&r);
    assert_int_equal(tools_count(t), 1);
    assert_string_equal(tools_get(t, 0)->name, "echo");
    assert_null(tools_get(t, 1));
    tool_def bad = {.name = "bad", .description = "", .schema = "[1,2]", .run = echo_run};
    assert_int_equal(tools_add(t, &bad), -1);
    bad.schema = "{not json";
    assert_int_equal(tools_add(t, &bad), -1);
    assert_int_equal(tools_count(t), 1);

    json_object *arr = tools_openai_json(t);
    json_object *back = json_tokener_parse(json_object_to_json_string(arr));
    json_object_put(arr);
    assert_non_null(back);
    assert_int_equal(json_object_array_length(back), 1);
    json_object *tool = json_object_array_get_idx(back, 0), *fn, *v;
    assert_true(json_object_object_get_ex(tool, "type", &v));
    assert_string_equal(json_object_get_string(v), "function");
    assert_true(json_object_object_get_ex(tool, "function", &fn));
    assert_true(json_object_object_get_ex(fn, "name", &v));
    assert_string_equal(json_object_get_string(v), "echo");
    assert_true(json_object_object_get_ex(fn, "parameters", &v));
    assert_true(json_object_object_get_ex(v, "required", NULL));
    json_object_put(back);
    tools_destroy(&t);
    assert_null(t);
}

static void empty_registry_lists_no_tool(void **state)
{
    (void)state;
    tools *t = tools_create();
    json_object *arr = tools_openai_json(t);
    assert_string_equal(json_object_to_json_string(arr), "[]");
    json_object_put(arr);
    tools_destroy(&t);
}

static void valid_arguments_run_the_tool(void **state)
{
    (void)state;
    ran r = {0};
    seen s = {0};
    tools *t = make(&r);
    call(t, "echo", "{\"q\":\"abc\",\"n\":3,\"x\":1.5}", &s);
    assert_int_equal(s.is_error, 0);
    assert_int_equal(r.calls, 1);
    assert_string_equal(r.session_id, "s1");
    assert_non_null(strstr(s.result, "\"q\":\"abc\""));
    call(t, "echo", "{\"q\":\"ab\",\"x\":2}", &s); /* an integer is a number */
    assert_int_equal(s.is_error, 0);
    assert_int_equal(r.calls, 2);
    mem_free(s.result);
    tools_destroy(&t);
}

static void bad_calls_are_error_results(void **state)
{
    (void)state;
    ran r = {0};
    seen s = {0};
    tools *t = make(&r);
    call(t, "nope", "{}", &s);
    assert_error_has(&s, "unknown tool 'nope'");
    call(t, "echo", "{\"q\":", &s);
    assert_error_has(&s, "not valid JSON");
    call(t, "echo", "{\"q\":\"abc\"} trailing", &s);
    assert_error_has(&s, "not valid JSON");
    call(t, "echo", "[\"abc\"]", &s);
    assert_error_has(&s, "must be a JSON object");
    call(t, "echo", "", &s); /* no arguments is {}: q is missing */
    assert_error_has(&s, "missing required argument 'q'");
    call(t, "echo", "{\"q\":5}", &s);
    assert_error_has(&s, "argument 'q' must be of type string");
    call(t, "echo", "{\"q\":\"abc\",\"n\":1.5}", &s);
    assert_error_has(&s, "argument 'n' must be of type integer");
    call(t, "echo", "{\"q\":\"abc\",\"x\":\"1\"}", &s);
    assert_error_has(&s, "argument 'x' must be of type number");
    call(t, "echo", "{\"q\":\"a\"}", &s);
    assert_error_has(&s, "shorter than 2");
    call(t, "echo", "{\"q\":\"abcdef\"}", &s);
    assert_error_has(&s, "longer than 5");
    call(t, "echo", "{\"q\":\"abc\",\"z\":1}", &s);
    assert_error_has(&s, "unknown argument 'z'");
    assert_int_equal(r.calls, 0); /* none of them reached the tool */
    mem_free(s.result);
    tools_destroy(&t);
}

static void open_schema_takes_extra_arguments(void **state)
{
    (void)state;
    ran r = {0};
    seen s = {0};
    tools *t = tools_create();
    tool_def d = {.name = "open",
                  .description = "no bounds",
                  .schema = "{\"type\":\"object\"}",
                  .run = echo_run,
                  .state = &r};
    assert_int_equal(tools_add(t, &d), 0);
    call(t, "open", "{\"anything\":[1,2]}", &s);
    assert_int_equal(s.is_error, 0);
    assert_int_equal(r.calls, 1);
    mem_free(s.result);
    tools_destroy(&t);
}

static void error_json_escapes_its_text(void **state)
{
    (void)state;
    char *e = tools_error_json("bad \"%s\" %d", "q\n", 7);
    json_object *o = json_tokener_parse(e);
    assert_non_null(o);
    json_object *v = NULL;
    assert_true(json_object_object_get_ex(o, "error", &v));
    assert_string_equal(json_object_get_string(v), "bad \"q\n\" 7");
    json_object_put(o);
    mem_free(e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(registers_and_lists),
        cmocka_unit_test(empty_registry_lists_no_tool),
        cmocka_unit_test(valid_arguments_run_the_tool),
        cmocka_unit_test(bad_calls_are_error_results),
        cmocka_unit_test(open_schema_takes_extra_arguments),
        cmocka_unit_test(error_json_escapes_its_text),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
