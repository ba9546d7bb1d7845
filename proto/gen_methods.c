/* gen_methods — writes the table of gRPC methods (rpc.h rpc_method) of a
 * descriptor set, at build time.
 *
 *   gen_methods SET.protoset OUT     writes OUT.h and OUT.c
 *
 * For every method of every service in the set (protoc's
 * --descriptor_set_out) it declares
 *
 *   const rpc_method <package>__<service>__<method>__method
 *
 * (convo__v1__store__append_events__method: protobuf-c's spelling of names)
 * holding the path ("/convo.v1.Store/AppendEvents"), the kind (unary or
 * which side streams) and the protobuf-c descriptors of its request and
 * response, and an array of them all. The descriptor names follow
 * protoc-c's rule, so a name spelled wrong here fails the link rather than
 * a call. Exits 1 with a message on any error. */
#include "google/protobuf/descriptor.pb-c.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A descriptor set larger than this is not ours. */
#define SET_MAX (16 << 20)
/* Longest C name or path written. */
#define NAME_MAX_LEN 512

typedef Google__Protobuf__FileDescriptorSet file_set;
typedef Google__Protobuf__FileDescriptorProto file_desc;
typedef Google__Protobuf__ServiceDescriptorProto service_desc;
typedef Google__Protobuf__MethodDescriptorProto method_desc;

static void die(const char *what, const char *detail)
{
    fprintf(stderr, "gen_methods: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(1);
}

/* protoc-c's CamelToLower: "AppendEvents" -> "append_events" (an
 * underscore before an upper-case letter that follows a lower-case one). */
static void camel_to_lower(const char *in, size_t len, char *out, size_t *o, size_t cap)
{
    int was_upper = 1;
    for (size_t i = 0; i < len; i++) {
        int up = isupper((unsigned char)in[i]);
        if (*o + 3 >= cap)
            die("name too long", in);
        if (up && !was_upper)
            out[(*o)++] = '_';
        out[(*o)++] = (char)tolower((unsigned char)in[i]);
        was_upper = up;
    }
    out[*o] = '\0';
}

/* protoc-c's FullNameToLower: ".convo.v1.AppendEventsRequest" ->
 * "convo__v1__append_events_request". */
static void full_name_to_lower(const char *full, char *out, size_t cap)
{
    size_t o = 0;
    out[0] = '\0';
    for (const char *p = full; *p != '\0';) {
        const char *dot = strchr(p, '.');
        size_t len = dot != NULL ? (size_t)(dot - p) : strlen(p);
        if (len > 0) {
            if (o > 0) {
                if (o + 3 >= cap)
                    die("name too long", full);
                out[o++] = '_';
                out[o++] = '_';
            }
            camel_to_lower(p, len, out, &o, cap);
        }
        p += len + (dot != NULL);
    }
}

static file_set *read_set(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        die(path, strerror(errno));
    uint8_t *buf = malloc(SET_MAX + 1);
    if (buf == NULL)
        die("out of memory", NULL);
    size_t n = fread(buf, 1, SET_MAX + 1, f);
    int bad = ferror(f) || n > SET_MAX;
    fclose(f);
    if (bad)
        die(path, "unreadable or too large");
    file_set *set = google__protobuf__file_descriptor_set__unpack(NULL, n, buf);
    free(buf);
    if (set == NULL)
        die(path, "not a descriptor set");
    return set;
}

static const char *kind_of(const method_desc *m)
{
    if (m->client_streaming && m->server_streaming)
        return "RPC_BIDI_STREAM";
    if (m->client_streaming)
        return "RPC_CLIENT_STREAM";
    return m->server_streaming ? "RPC_SERVER_STREAM" : "RPC_UNARY";
}

/* "convo/v1/store.proto" -> "convo/v1/store.pb-c.h". */
static void header_of(const char *proto, char *out, size_t cap)
{
    size_t len = strlen(proto);
    if (len < 6 || strcmp(proto + len - 6, ".proto") != 0 || len + 8 > cap)
        die("not a .proto file name", proto);
    snprintf(out, cap, "%.*s.pb-c.h", (int)(len - 6), proto);
}

/* The C name of a method: <package>__<service>__<method>__method. */
static void method_name(const file_desc *fd, const service_desc *sd, const method_desc *md,
                        char *out, size_t cap)
{
    char full[NAME_MAX_LEN];
    snprintf(full, sizeof full, "%s.%s.%s", fd->package ? fd->package : "", sd->name, md->name);
    full_name_to_lower(full, out, cap);
    strncat(out, "__method", cap - strlen(out) - 1);
}

static FILE *open_out(const char *base, const char *ext)
{
    char path[NAME_MAX_LEN];
    snprintf(path, sizeof path, "%s%s", base, ext);
    FILE *f = fopen(path, "w");
    if (f == NULL)
        die(path, strerror(errno));
    return f;
}

static void close_out(FILE *f, const char *base)
{
    if (ferror(f) || fclose(f) != 0)
        die(base, "could not be written");
}

/* What the two files are written from and named after. */
typedef struct gen {
    const file_set *set;
    const char *set_name;     /* "convo.protoset", for the comments */
    const char *stem;         /* "convo_methods" */
    char upper[NAME_MAX_LEN]; /* "CONVO_METHODS": the include guard and the count */
    FILE *h, *c;
} gen;

/* "/convo.v1.Store/AppendEvents" */
static void path_of(const file_desc *fd, const service_desc *sd, const method_desc *md, char *out,
                    size_t cap)
{
    snprintf(out, cap, "/%s%s%s/%s", fd->package ? fd->package : "", fd->package ? "." : "",
             sd->name, md->name);
}

/* One method: its declaration in the header, its definition in the source. */
static void write_method(gen *g, const file_desc *fd, const service_desc *sd, const method_desc *md)
{
    char name[NAME_MAX_LEN], path[NAME_MAX_LEN], in[NAME_MAX_LEN], out[NAME_MAX_LEN];
    method_name(fd, sd, md, name, sizeof name);
    path_of(fd, sd, md, path, sizeof path);
    full_name_to_lower(md->input_type, in, sizeof in);
    full_name_to_lower(md->output_type, out, sizeof out);
    fprintf(g->h, "/* %s */\nextern const rpc_method %s;\n", path, name);
    fprintf(g->c,
            "const rpc_method %s = {\n    \"%s\",\n    %s,\n    &%s__descriptor,\n"
            "    &%s__descriptor,\n};\n\n",
            name, path, kind_of(md), in, out);
}

static void write_files(gen *g)
{
    fprintf(g->h,
            "/* %s - every gRPC method of %s: its path, kind and messages.\n"
            " * Generated at build time by proto/gen_methods.c; not edited by hand. */\n"
            "#ifndef %s_H\n#define %s_H\n\n#include \"rpc.h\"\n\n",
            g->stem, g->set_name, g->upper, g->upper);
    fprintf(g->c, "/* Generated at build time by proto/gen_methods.c from %s. */\n", g->set_name);
    fprintf(g->c, "#include \"%s.h\"\n\n", g->stem);
    const file_set *set = g->set;
    for (size_t i = 0; i < set->n_file; i++) {
        char hdr[NAME_MAX_LEN];
        if (set->file[i]->n_service == 0)
            continue;
        header_of(set->file[i]->name, hdr, sizeof hdr);
        fprintf(g->h, "#include \"%s\"\n", hdr);
    }
    fprintf(g->h, "\n");
    size_t total = 0;
    for (size_t i = 0; i < set->n_file; i++)
        for (size_t s = 0; s < set->file[i]->n_service; s++)
            for (size_t m = 0; m < set->file[i]->service[s]->n_method; m++, total++)
                write_method(g, set->file[i], set->file[i]->service[s],
                             set->file[i]->service[s]->method[m]);
    fprintf(g->h, "\n/* All of them, in the order of the .proto files. */\n");
    fprintf(g->h, "#define %s_COUNT %zu\n", g->upper, total);
    fprintf(g->h, "extern const rpc_method *const %s[%s_COUNT];\n\n#endif\n", g->stem, g->upper);
    fprintf(g->c, "const rpc_method *const %s[%s_COUNT] = {\n", g->stem, g->upper);
    for (size_t i = 0; i < set->n_file; i++)
        for (size_t s = 0; s < set->file[i]->n_service; s++)
            for (size_t m = 0; m < set->file[i]->service[s]->n_method; m++) {
                char name[NAME_MAX_LEN];
                method_name(set->file[i], set->file[i]->service[s],
                            set->file[i]->service[s]->method[m], name, sizeof name);
                fprintf(g->c, "    &%s,\n", name);
            }
    fprintf(g->c, "};\n");
}

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash != NULL ? slash + 1 : path;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        die("usage: gen_methods SET.protoset OUT (writes OUT.h and OUT.c)", NULL);
    gen g = {.set = read_set(argv[1]), .set_name = base_name(argv[1]), .stem = base_name(argv[2])};
    size_t u = 0;
    for (const char *p = g.stem; *p != '\0' && u + 1 < sizeof g.upper; p++)
        g.upper[u++] = isalnum((unsigned char)*p) ? (char)toupper((unsigned char)*p) : '_';
    g.upper[u] = '\0';
    g.h = open_out(argv[2], ".h");
    g.c = open_out(argv[2], ".c");
    write_files(&g);
    close_out(g.h, argv[2]);
    close_out(g.c, argv[2]);
    google__protobuf__file_descriptor_set__free_unpacked((file_set *)g.set, NULL);
    return 0;
}
