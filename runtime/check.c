#include "check.h"

#include "rpc.h"

#include <stdio.h>
#include <string.h>

int check_id_char(int c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == '-';
}

int check_id(const char *field, const char *s, char *err, size_t errsize)
{
    size_t len = s != NULL ? strlen(s) : 0;
    if (len == 0) {
        snprintf(err, errsize, "%s is empty", field);
        return -1;
    }
    if (len > CHECK_ID_MAX) {
        snprintf(err, errsize, "%s is %zu bytes, over the limit of %d", field, len, CHECK_ID_MAX);
        return -1;
    }
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (!check_id_char(ch)) {
            snprintf(err, errsize, "%s has a byte outside [A-Za-z0-9._-] at offset %zu (0x%02x)",
                     field, i, ch);
            return -1;
        }
    }
    return 0;
}

int check_text(const char *field, const char *s, size_t max, char *err, size_t errsize)
{
    size_t len = s != NULL ? strlen(s) : 0;
    if (len > max) {
        snprintf(err, errsize, "%s is %zu bytes, over the limit of %zu", field, len, max);
        return -1;
    }
    if (!rpc_utf8_valid(s != NULL ? s : "", len)) {
        snprintf(err, errsize, "%s is not valid UTF-8", field);
        return -1;
    }
    return 0;
}
