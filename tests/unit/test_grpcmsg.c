/* Unit tests: the gRPC length-prefixed message splitter. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "grpcmsg.h"

typedef struct rec {
  int begins, ends;
  uint32_t lens[8];
  size_t body;
} rec;

static int on_begin(void *ud, uint8_t flags, uint32_t len) {
  rec *r = ud;
  (void)flags;
  r->lens[r->begins++ % 8] = len;
  return 0;
}
static void on_body(void *ud, const uint8_t *p, size_t n) {
  (void)p;
  ((rec *)ud)->body += n;
}
static void on_end(void *ud) { ((rec *)ud)->ends++; }
static const fs_grpcmsg_cb cb = {on_begin, on_body, on_end};

static size_t frame(uint8_t *out, uint32_t len, uint8_t fill) {
  out[0] = 0;
  out[1] = (uint8_t)(len >> 24), out[2] = (uint8_t)(len >> 16), out[3] = (uint8_t)(len >> 8), out[4] = (uint8_t)len;
  memset(out + 5, fill, len);
  return 5 + len;
}

/* Three messages (one empty) fed one byte at a time and all at once. */
static void splits_any_chunking(void **state) {
  uint8_t buf[512];
  size_t n = 0, i;
  int pass;
  (void)state;
  n += frame(buf + n, 100, 1);
  n += frame(buf + n, 0, 0);
  n += frame(buf + n, 300, 2);
  for (pass = 0; pass < 2; pass++) {
    fs_grpcmsg m;
    rec r = {0};
    fs_grpcmsg_init(&m, 1000);
    if (pass == 0)
      for (i = 0; i < n; i++) assert_int_equal(fs_grpcmsg_feed(&m, buf + i, 1, &cb, &r), 0);
    else assert_int_equal(fs_grpcmsg_feed(&m, buf, n, &cb, &r), 0);
    assert_int_equal(r.begins, 3);
    assert_int_equal(r.ends, 3);
    assert_int_equal(r.lens[0], 100);
    assert_int_equal(r.lens[1], 0);
    assert_int_equal(r.lens[2], 300);
    assert_int_equal(r.body, 400);
    assert_true(fs_grpcmsg_at_boundary(&m));
  }
}

static void too_big_is_refused_and_sticky(void **state) {
  uint8_t hdr[5] = {0, 0, 0x10, 0, 1}; /* 1 MiB + 1 */
  fs_grpcmsg m;
  (void)state;
  fs_grpcmsg_init(&m, 1 << 20);
  assert_int_equal(fs_grpcmsg_feed(&m, hdr, 5, NULL, NULL), FS_GRPCMSG_TOO_BIG);
  assert_int_equal(fs_grpcmsg_feed(&m, hdr, 1, NULL, NULL), FS_GRPCMSG_TOO_BIG);
}

static void limit_is_inclusive(void **state) {
  uint8_t hdr[5] = {0, 0, 0x10, 0, 0}; /* exactly 1 MiB */
  fs_grpcmsg m;
  (void)state;
  fs_grpcmsg_init(&m, 1 << 20);
  assert_int_equal(fs_grpcmsg_feed(&m, hdr, 5, NULL, NULL), 0);
  assert_false(fs_grpcmsg_at_boundary(&m));
}

static void max_length_header_with_default_limit(void **state) {
  uint8_t hdr[5] = {1, 0xff, 0xff, 0xff, 0xff};
  fs_grpcmsg m;
  (void)state;
  fs_grpcmsg_init(&m, 2147483647u);
  assert_int_equal(fs_grpcmsg_feed(&m, hdr, 5, NULL, NULL), FS_GRPCMSG_TOO_BIG);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(splits_any_chunking),
      cmocka_unit_test(too_big_is_refused_and_sticky),
      cmocka_unit_test(limit_is_inclusive),
      cmocka_unit_test(max_length_header_with_default_limit),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
