/* Unit tests: Fleet method table, protobuf walker on truncated input,
 * object headers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "fleet.h"

static void methods(void **state) {
  const char *p = "/flwr.proto.Fleet/PullMessages";
  (void)state;
  assert_int_equal(fs_fleet_method_of((const uint8_t *)p, strlen(p)), FS_FLEET_PULL_MESSAGES);
  p = "/flwr.proto.Fleet/PullMessagesX";
  assert_int_equal(fs_fleet_method_of((const uint8_t *)p, strlen(p)), FS_FLEET_NONE);
  p = "/other.Svc/PullMessages";
  assert_int_equal(fs_fleet_method_of((const uint8_t *)p, strlen(p)), FS_FLEET_NONE);
  assert_string_equal(fs_fleet_method_name(FS_FLEET_CONFIRM_MESSAGE_RECEIVED), "ConfirmMessageReceived");
  /* Only side-effect-free or content-addressed calls may be repeated. */
  assert_true(fs_fleet_repeatable(FS_FLEET_GET_RUN) && fs_fleet_repeatable(FS_FLEET_PUSH_OBJECT));
  assert_false(fs_fleet_repeatable(FS_FLEET_PUSH_MESSAGES) || fs_fleet_repeatable(FS_FLEET_PULL_MESSAGES) ||
               fs_fleet_repeatable(FS_FLEET_CONFIRM_MESSAGE_RECEIVED) || fs_fleet_repeatable(FS_FLEET_REGISTER_NODE) ||
               fs_fleet_repeatable(FS_FLEET_ACTIVATE_NODE) || fs_fleet_repeatable(FS_FLEET_DEACTIVATE_NODE) ||
               fs_fleet_repeatable(FS_FLEET_UNREGISTER_NODE));
}

/* PushObjectRequest{node{node_id=300}, run_id=2^63+5, object_id="ab", object_content=<1000 bytes>}
 * cut after 40 bytes: every field before the content is read, the content's
 * declared size is known. */
static void walker_on_truncated_push_object(void **state) {
  uint8_t m[64] = {0x0a, 0x03, 0x08, 0xac, 0x02,                                     /* node */
                   0x10, 0x85, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01, /* run_id */
                   0x1a, 0x02, 'a',  'b',                                            /* object_id */
                   0x22, 0xe8, 0x07,                                                 /* content: 1000 */
                   'A',  'r',  'r',  'a',  'y',  'C',  'h',  'u',  'n',  'k',  ' ',  ' ', '9', '9', '9', 0, 1};
  const uint8_t *p = m, *end = m + 40;
  fs_pb_field f;
  char type[32];
  uint64_t body;
  (void)state;
  assert_int_equal(fs_pb_next(&p, end, &f), 1);
  assert_int_equal(f.num, 1);
  assert_int_equal(f.len, 3);
  assert_int_equal(fs_pb_next(&p, end, &f), 1);
  assert_true(f.num == 2 && f.value == 0x8000000000000005ull);
  assert_int_equal(fs_pb_next(&p, end, &f), 1);
  assert_true(f.num == 3 && f.len == 2 && !memcmp(f.data, "ab", 2));
  assert_int_equal(fs_pb_next(&p, end, &f), 1);
  assert_true(f.num == 4 && f.declared == 1000 && f.len == 17);
  assert_int_equal(fs_fleet_object_header(f.data, f.len, type, sizeof(type), &body), 16);
  assert_string_equal(type, "ArrayChunk");
  assert_int_equal(body, 999);
  assert_int_equal(fs_pb_next(&p, end, &f), 0);
}

static void walker_rejects_malformed(void **state) {
  static const uint8_t bad_varint[] = {0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
  static const uint8_t group[] = {0x0b, 0x00};
  static const uint8_t field0[] = {0x00, 0x01};
  static const uint8_t short_fixed[] = {0x09, 1, 2, 3};
  const uint8_t *p;
  fs_pb_field f;
  (void)state;
  p = bad_varint;
  assert_int_equal(fs_pb_next(&p, bad_varint + sizeof(bad_varint), &f), -1);
  p = group;
  assert_int_equal(fs_pb_next(&p, group + 2, &f), -1);
  p = field0;
  assert_int_equal(fs_pb_next(&p, field0 + 2, &f), -1);
  p = short_fixed;
  assert_int_equal(fs_pb_next(&p, short_fixed + 4, &f), -1);
}

static void object_headers(void **state) {
  char type[8];
  uint64_t n;
  static const uint8_t cfg[] = "ConfigRecord  24\0xx";
  static const uint8_t msg[] = "Message a1,b2 7\0";
  static const uint8_t bad1[] = "NoNul 12";
  static const uint8_t bad2[] = "Message a1,b2 7x\0";
  (void)state;
  assert_int_equal(fs_fleet_object_header(cfg, sizeof(cfg) - 1, type, sizeof(type), &n), 17);
  assert_string_equal(type, "ConfigR"); /* cut to the buffer */
  assert_int_equal(n, 24);
  assert_int_equal(fs_fleet_object_header(msg, sizeof(msg) - 1, type, sizeof(type), &n), 16);
  assert_int_equal(n, 7);
  assert_int_equal(fs_fleet_object_header(bad1, sizeof(bad1) - 1, type, sizeof(type), &n), -1);
  assert_int_equal(fs_fleet_object_header(bad2, sizeof(bad2) - 1, type, sizeof(type), &n), -1);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(methods),
      cmocka_unit_test(walker_on_truncated_push_object),
      cmocka_unit_test(walker_rejects_malformed),
      cmocka_unit_test(object_headers),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
