#include "rpc_internal.h"

#include "log.h"
#include "mem.h"

#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <grpc/support/log.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static const char *const code_names[] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

const char *rpc_code_name(rpc_code code)
{
    if ((unsigned)code >= sizeof code_names / sizeof code_names[0])
        return "UNKNOWN";
    return code_names[code];
}

int rpc_code_http_status(rpc_code code)
{
    /* The mapping of google.rpc.Code's documentation. */
    static const int http[] = {200, 499, 500, 400, 504, 404, 409, 403, 429,
                               400, 409, 400, 501, 500, 503, 500, 401};
    if ((unsigned)code >= sizeof http / sizeof http[0])
        return 500;
    return http[code];
}

const char *rpc_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
    case RPC_EFULL:
        return "the call's write queue is full";
    case RPC_EDONE:
        return "the call is finished or cancelled";
    case RPC_EENCODE:
        return "the message could not be serialized";
    case RPC_ECALL:
        return "the gRPC core refused the operation";
    case RPC_EBIND:
        return "the listen address could not be bound";
    case RPC_EARG:
        return "invalid argument";
    case RPC_ESHUTDOWN:
        return "shutting down";
    }
    return "unknown error";
}

int64_t rpc_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int rpc_utf8_valid(const char *str, size_t len)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < len) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n;
        unsigned cp;
        if (c >= 0xC2 && c <= 0xDF) {
            n = 1;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 2;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (i + n >= len)
            return 0;
        for (size_t k = 1; k <= n; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += n + 1;
    }
    return 1;
}

/* The lists are fixed in code: running out of room is a bug in this
 * runtime, caught by the tests. */
static grpc_arg *args_next(rpc__args *args)
{
    if (args->n == sizeof args->a / sizeof args->a[0]) {
        log_error("rpc__args: more than %zu channel arguments; the rest are ignored", args->n);
        return NULL;
    }
    grpc_arg *a = &args->a[args->n++];
    memset(a, 0, sizeof *a);
    return a;
}

void rpc__args_int(rpc__args *args, const char *key, int value)
{
    grpc_arg *a = args_next(args);
    if (a == NULL)
        return;
    a->type = GRPC_ARG_INTEGER;
    a->key = (char *)key;
    a->value.integer = value;
}

void rpc__args_str(rpc__args *args, const char *key, const char *value)
{
    grpc_arg *a = args_next(args);
    if (a == NULL)
        return;
    a->type = GRPC_ARG_STRING;
    a->key = (char *)key;
    a->value.string = (char *)value; /* the core copies it, never writes it */
}

void rpc__args_init(rpc__args *args, int64_t max_message_bytes)
{
    args->n = 0;
    rpc__args_int(args, GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, (int)max_message_bytes);
    rpc__args_int(args, GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, (int)max_message_bytes);
}

grpc_channel_args rpc__args_get(rpc__args *args)
{
    grpc_channel_args c = {args->n, args->a};
    return c;
}

grpc_byte_buffer *rpc__encode(const ProtobufCMessage *msg)
{
    size_t len = protobuf_c_message_get_packed_size(msg);
    grpc_slice slice = grpc_slice_malloc(len);
    if (protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(slice)) != len) {
        grpc_slice_unref(slice);
        return NULL;
    }
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&slice, 1);
    grpc_slice_unref(slice);
    return bb;
}

/* Reads a varint at *p (< end); -1 when it runs past the end or is too
 * long. */
static int read_varint(const uint8_t **p, const uint8_t *end, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if ((b & 0x80) == 0) {
            *out = v;
            return 0;
        }
    }
    return -1;
}

/* Whether a string field of a `desc` message in wire format holds a NUL
 * byte, nested messages included; the field's path goes to `path`. 0 for
 * malformed bytes too (decoding reports those). */
static int nul_in_strings(const ProtobufCMessageDescriptor *desc, const uint8_t *data, size_t len,
                          char *path, size_t pathsize, int depth)
{
    const uint8_t *p = data, *end = data + len;
    if (depth > 32)
        return 0;
    while (p < end) {
        uint64_t key, n;
        if (read_varint(&p, end, &key) != 0)
            return 0; /* malformed: the decoder will say so */
        switch (key & 7) {
        case 0:
            if (read_varint(&p, end, &n) != 0)
                return 0;
            break;
        case 1:
            p += 8;
            break;
        case 5:
            p += 4;
            break;
        case 2: {
            if (read_varint(&p, end, &n) != 0 || n > (uint64_t)(end - p))
                return 0;
            const ProtobufCFieldDescriptor *f =
                protobuf_c_message_descriptor_get_field(desc, (unsigned)(key >> 3));
            if (f != NULL && f->type == PROTOBUF_C_TYPE_STRING && memchr(p, 0, n) != NULL) {
                snprintf(path, pathsize, "%s", f->name);
                return 1;
            }
            if (f != NULL && f->type == PROTOBUF_C_TYPE_MESSAGE &&
                nul_in_strings(f->descriptor, p, n, path, pathsize, depth + 1)) {
                /* Prefix the inner path with this field: "events.content". */
                char inner[128];
                snprintf(inner, sizeof inner, "%s", path);
                snprintf(path, pathsize, "%s.%s", f->name, inner);
                return 1;
            }
            p += n;
            break;
        }
        default:
            return 0;
        }
    }
    return 0;
}

ProtobufCMessage *rpc__decode(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc,
                              char *nul_field, size_t nul_size)
{
    grpc_byte_buffer_reader reader;
    if (!grpc_byte_buffer_reader_init(&reader, bb))
        return NULL;
    grpc_slice slice = grpc_byte_buffer_reader_readall(&reader);
    grpc_byte_buffer_reader_destroy(&reader);
    ProtobufCMessage *msg = NULL;
    if (nul_field != NULL && nul_in_strings(desc, GRPC_SLICE_START_PTR(slice),
                                            GRPC_SLICE_LENGTH(slice), nul_field, nul_size, 0))
        goto out;
    msg = protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(slice),
                                    GRPC_SLICE_START_PTR(slice));
out:
    grpc_slice_unref(slice);
    return msg;
}

void rpc__cq_loop(grpc_completion_queue *cq)
{
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            return;
        if (ev.type == GRPC_OP_COMPLETE) {
            rpc__tag *tag = ev.tag;
            tag->fn(tag, ev.success);
        }
    }
}

/* The core's own diagnostics go through our JSON logger, so stderr stays
 * one JSON object per line. */
static void core_log(gpr_log_func_args *args)
{
    log_level level = args->severity == GPR_LOG_SEVERITY_ERROR  ? LOG_ERROR
                      : args->severity == GPR_LOG_SEVERITY_INFO ? LOG_INFO
                                                                : LOG_DEBUG;
    const log_field fields[] = {{"origin", "grpc-core"}, {NULL, NULL}};
    log_fields(level, fields, "%s", args->message);
}

void rpc__grpc_ref(void)
{
    gpr_set_log_function(core_log);
    grpc_init();
}

void rpc__grpc_unref(void)
{
    grpc_shutdown_blocking();
}
