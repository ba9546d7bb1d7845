/* check — request field checks every service shares, so that all of them
 * refuse the same things in the same words. Each returns 0, or -1 with a
 * message naming the field written to err (for INVALID_ARGUMENT). */
#ifndef CONVO_CHECK_H
#define CONVO_CHECK_H

#include <stddef.h>

/* The longest id (common.proto: ids match [A-Za-z0-9._-]{1,128}). */
#define CHECK_ID_MAX 128

#define CHECK__STR(x)  #x
#define CHECK__XSTR(x) CHECK__STR(x)
/* The id rule in words, for messages people read ("1 to 128 characters
 * from ..."), made from CHECK_ID_MAX so the two cannot drift apart. */
#define CHECK_ID_RULE "1 to " CHECK__XSTR(CHECK_ID_MAX) " characters from A-Z a-z 0-9 . _ -"

/* Whether c may appear in an id. */
int check_id_char(int c);
/* A required id: 1 to CHECK_ID_MAX bytes of [A-Za-z0-9._-]. s may be NULL. */
int check_id(const char *field, const char *s, char *err, size_t errsize);
/* A text: at most max bytes of valid UTF-8. s may be NULL (empty). */
int check_text(const char *field, const char *s, size_t max, char *err, size_t errsize);

#endif
