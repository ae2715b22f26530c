/* Unit tests: gRPC wire facts (grpc.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "grpc.h"

#define U8(s) ((const uint8_t *)(s))

static void status_values_and_nonsense(void **state) {
  (void)state;
  assert_int_equal(fs_grpc_status_parse(U8("0"), 1), FS_GRPC_OK);
  assert_int_equal(fs_grpc_status_parse(U8("14"), 2), FS_GRPC_UNAVAILABLE);
  assert_int_equal(fs_grpc_status_parse(U8("16"), 2), FS_GRPC_UNAUTHENTICATED);
  /* A peer's nonsense is an unknown error, never OK. */
  assert_int_equal(fs_grpc_status_parse(U8(""), 0), FS_GRPC_UNKNOWN);
  assert_int_equal(fs_grpc_status_parse(U8("17"), 2), FS_GRPC_UNKNOWN);
  assert_int_equal(fs_grpc_status_parse(U8("1a"), 2), FS_GRPC_UNKNOWN);
  assert_int_equal(fs_grpc_status_parse(U8("-1"), 2), FS_GRPC_UNKNOWN);
  assert_int_equal(fs_grpc_status_parse(U8("000"), 3), FS_GRPC_UNKNOWN);
  assert_string_equal(fs_grpc_status_name(FS_GRPC_RESOURCE_EXHAUSTED), "RESOURCE_EXHAUSTED");
  assert_string_equal(fs_grpc_status_name(FS_GRPC_UNAUTHENTICATED), "UNAUTHENTICATED");
  assert_string_equal(fs_grpc_status_name(99), "UNKNOWN");
  assert_string_equal(fs_grpc_status_name(-1), "UNKNOWN");
}

static void prefix_round_trip(void **state) {
  uint8_t p[FS_GRPC_PREFIX_LEN];
  (void)state;
  fs_grpc_prefix_put(p, 0x01020304u);
  assert_int_equal(p[0], 0);
  assert_int_equal(fs_grpc_prefix_len(p), 0x01020304u);
  fs_grpc_prefix_put(p, 0xffffffffu);
  assert_int_equal(fs_grpc_prefix_len(p), 0xffffffffu);
  fs_grpc_prefix_put(p, 7);
  assert_memory_equal(p, "\0\0\0\0\7", 5);
}

static void grpc_timeout_header(void **state) {
  uint64_t ms = 0;
  (void)state;
  assert_int_equal(fs_grpc_timeout_ms(U8("10S"), 3, &ms), 0);
  assert_int_equal(ms, 10000);
  assert_int_equal(fs_grpc_timeout_ms(U8("2500m"), 5, &ms), 0);
  assert_int_equal(ms, 2500);
  assert_int_equal(fs_grpc_timeout_ms(U8("1500u"), 5, &ms), 0);
  assert_int_equal(ms, 2); /* rounded up */
  assert_int_equal(fs_grpc_timeout_ms(U8("1n"), 2, &ms), 0);
  assert_int_equal(ms, 1);
  assert_int_equal(fs_grpc_timeout_ms(U8("99999999H"), 9, &ms), 0);
  assert_true(ms == 99999999ull * 3600000ull);
  assert_int_equal(fs_grpc_timeout_ms(U8("3M"), 2, &ms), 0);
  assert_int_equal(ms, 180000);
  assert_int_equal(fs_grpc_timeout_ms(U8("S"), 1, &ms), -1);
  assert_int_equal(fs_grpc_timeout_ms(U8("123456789S"), 10, &ms), -1);
  assert_int_equal(fs_grpc_timeout_ms(U8("10s"), 3, &ms), -1);
  assert_int_equal(fs_grpc_timeout_ms(U8("-1S"), 3, &ms), -1);
}

static void timeout_format_round_trips(void **state) {
  char v[16];
  uint64_t ms = 0;
  size_t n;
  (void)state;
  n = fs_grpc_timeout_format(v, sizeof(v), 2500);
  assert_string_equal(v, "2500m");
  assert_int_equal(fs_grpc_timeout_ms(U8(v), n, &ms), 0);
  assert_int_equal(ms, 2500);
  n = fs_grpc_timeout_format(v, sizeof(v), 99999999);
  assert_string_equal(v, "99999999m");
  /* Past 8 digits of ms: whole seconds, rounded up. */
  n = fs_grpc_timeout_format(v, sizeof(v), 100000001);
  assert_string_equal(v, "100001S");
  assert_int_equal(fs_grpc_timeout_ms(U8(v), n, &ms), 0);
  assert_true(ms >= 100000001);
  /* Too long for the spec's 8 digits even in seconds, or no room: nothing. */
  strcpy(v, "keep");
  assert_int_equal(fs_grpc_timeout_format(v, sizeof(v), UINT64_MAX), 0);
  assert_int_equal(fs_grpc_timeout_format(v, 5, 2500), 0);
  assert_string_equal(v, "keep");
}

static void message_encoding(void **state) {
  char out[16];
  (void)state;
  assert_int_equal(fs_grpc_message_encode(out, sizeof(out), "a%b\n"), 8);
  assert_string_equal(out, "a%25b%0A");
  assert_int_equal(fs_grpc_message_encode(out, sizeof(out), "caf\xc3\xa9"), 9);
  assert_string_equal(out, "caf%C3%A9");
  /* Cut at a whole character, always NUL-terminated. */
  assert_int_equal(fs_grpc_message_encode(out, 6, "abcd%"), 4);
  assert_string_equal(out, "abcd");
  assert_int_equal(fs_grpc_message_encode(out, 6, "abcdefgh"), 5);
  assert_string_equal(out, "abcde");
  assert_int_equal(fs_grpc_message_encode(out, 1, "abc"), 0);
  assert_string_equal(out, "");
}

static int nv_is(const nghttp2_nv *nv, const char *name, const char *value) {
  return nv->namelen == strlen(name) && !memcmp(nv->name, name, nv->namelen) && nv->valuelen == strlen(value) &&
         !memcmp(nv->value, value, nv->valuelen);
}

static void replies(void **state) {
  fs_grpc_reply r;
  (void)state;
  fs_grpc_reply_init(&r, FS_GRPC_UNAVAILABLE, "upstream down: 100%", 1);
  assert_int_equal(r.n, 4);
  assert_true(nv_is(&r.nv[0], ":status", "200"));
  assert_true(nv_is(&r.nv[1], "content-type", "application/grpc"));
  assert_true(nv_is(&r.nv[2], "grpc-status", "14"));
  assert_true(nv_is(&r.nv[3], "grpc-message", "upstream down: 100%25"));
  fs_grpc_reply_init(&r, FS_GRPC_INTERNAL, "x", 0);
  assert_int_equal(r.n, 2);
  assert_true(nv_is(&r.nv[0], "grpc-status", "13"));
  assert_true(nv_is(&r.nv[1], "grpc-message", "x"));
  fs_grpc_reply_init(&r, FS_GRPC_OK, NULL, 0);
  assert_int_equal(r.n, 1);
  assert_true(nv_is(&r.nv[0], "grpc-status", "0"));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(status_values_and_nonsense), cmocka_unit_test(prefix_round_trip),
      cmocka_unit_test(grpc_timeout_header),        cmocka_unit_test(timeout_format_round_trips),
      cmocka_unit_test(message_encoding),           cmocka_unit_test(replies),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
