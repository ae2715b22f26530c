/* Unit tests: bufq, the capped block queue under every buffer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "bufq.h"

static void append_copy_drop_across_blocks(void **state) {
  fs_bufq q;
  size_t n = 3 * FS_BLOCK_SIZE + 123, i;
  uint8_t *in = malloc(n), *out = malloc(n);
  (void)state;
  for (i = 0; i < n; i++) in[i] = (uint8_t)(i * 7);
  fs_bufq_init(&q, 0);
  assert_int_equal(fs_bufq_append(&q, in, 100), 0);
  assert_int_equal(fs_bufq_append(&q, in + 100, n - 100), 0);
  assert_int_equal(q.len, n);
  assert_int_equal(fs_bufq_copy(&q, out, n), n);
  assert_memory_equal(in, out, n);
  fs_bufq_drop(&q, FS_BLOCK_SIZE + 5);
  assert_int_equal(q.len, n - FS_BLOCK_SIZE - 5);
  assert_int_equal(fs_bufq_copy(&q, out, n), n - FS_BLOCK_SIZE - 5);
  assert_memory_equal(in + FS_BLOCK_SIZE + 5, out, n - FS_BLOCK_SIZE - 5);
  fs_bufq_drop(&q, n); /* more than held: empties */
  assert_int_equal(q.len, 0);
  assert_null(q.head);
  fs_bufq_reset(&q);
  free(in);
  free(out);
}

static void cap_refuses_without_partial_append(void **state) {
  fs_bufq q;
  uint8_t buf[1000] = {0};
  (void)state;
  fs_bufq_init(&q, 1500);
  assert_int_equal(fs_bufq_append(&q, buf, 1000), 0);
  assert_int_equal(fs_bufq_append(&q, buf, 501), -1);
  assert_int_equal(q.len, 1000);
  assert_int_equal(fs_bufq_append(&q, buf, 500), 0);
  assert_int_equal(q.len, 1500);
  fs_bufq_reset(&q);
}

static void empty_queue_holds_no_block(void **state) {
  fs_bufq q;
  uint8_t b = 1;
  (void)state;
  fs_bufq_init(&q, 0);
  fs_bufq_append(&q, &b, 1);
  fs_bufq_drop(&q, 1);
  assert_null(q.head);
  assert_null(q.tail);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(append_copy_drop_across_blocks), cmocka_unit_test(cap_refuses_without_partial_append),
    cmocka_unit_test(empty_queue_holds_no_block),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
