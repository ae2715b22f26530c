/* Unit tests: bufq, the capped block queue under every buffer.  Includes the
 * .c with malloc() replaced, to make block allocation fail on demand. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

/* Mallocs bufq may still make before they fail; -1: no limit. */
static int malloc_budget = -1;

static void *budget_malloc(size_t n) {
  if (malloc_budget == 0) return NULL;
  if (malloc_budget > 0) malloc_budget--;
  return malloc(n);
}

#define malloc budget_malloc
#include "bufq.c"
#undef malloc

static int teardown(void **state) {
  (void)state;
  malloc_budget = -1;
  fs_bufq_global_free();
  return 0;
}

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

/* bufq.h: an append that fails appends nothing.  Here the second of the two
 * blocks it needs cannot be allocated: the queue is as it was, and the block
 * it did get is given back. */
static void failed_malloc_appends_nothing(void **state) {
  fs_bufq q;
  size_t n = 2 * FS_BLOCK_SIZE, i;
  uint8_t *in = malloc(n), *out = malloc(n);
  (void)state;
  for (i = 0; i < n; i++) in[i] = (uint8_t)(i * 3);
  fs_bufq_global_free(); /* no block to reuse: every block is a malloc */
  fs_bufq_init(&q, 0);
  assert_int_equal(fs_bufq_append(&q, in, 100), 0);
  malloc_budget = 1;
  assert_int_equal(fs_bufq_append(&q, in, n), -1);
  assert_int_equal(q.len, 100);
  assert_ptr_equal(q.head, q.tail);
  assert_null(q.tail->next);
  assert_int_equal(q.tail->end - q.tail->start, 100);
  assert_int_equal(nfree, 1); /* the block it got is back on the free list */
  /* The queue still works, from where it was. */
  malloc_budget = -1;
  assert_int_equal(fs_bufq_append(&q, in + 100, n - 100), 0);
  assert_int_equal(fs_bufq_copy(&q, out, n), n);
  assert_memory_equal(out, in, n);
  fs_bufq_reset(&q);
  free(in);
  free(out);
}

/* The same on an empty queue: it still holds no block afterwards. */
static void failed_malloc_leaves_empty_queue_empty(void **state) {
  fs_bufq q;
  static uint8_t in[FS_BLOCK_SIZE + 10];
  (void)state;
  fs_bufq_global_free();
  fs_bufq_init(&q, 0);
  malloc_budget = 1;
  assert_int_equal(fs_bufq_append(&q, in, sizeof(in)), -1);
  assert_int_equal(q.len, 0);
  assert_null(q.head);
  assert_null(q.tail);
  malloc_budget = 0;
  assert_int_equal(fs_bufq_append(&q, in, 1), 0); /* the free list serves it */
  assert_int_equal(q.len, 1);
  fs_bufq_reset(&q);
}

/* The cap check cannot wrap around: a length near SIZE_MAX is refused before
 * a byte of |data| is read. */
static void cap_check_does_not_wrap(void **state) {
  fs_bufq q;
  uint8_t buf[10] = {0};
  (void)state;
  fs_bufq_init(&q, 1000);
  assert_int_equal(fs_bufq_append(&q, buf, 10), 0);
  assert_int_equal(fs_bufq_append(&q, buf, SIZE_MAX - 9), -1);
  assert_int_equal(fs_bufq_append(&q, buf, SIZE_MAX), -1);
  assert_int_equal(q.len, 10);
  fs_bufq_reset(&q);
}

/* A retry's replay goes back in front of what is still queued. */
static void prepend_moves_blocks_in_front(void **state) {
  fs_bufq q, front;
  static uint8_t a[40000], b[100];
  uint8_t out[40100];
  size_t i;
  (void)state;
  for (i = 0; i < sizeof(a); i++) a[i] = (uint8_t)(i * 7);
  memset(b, 0xEE, sizeof(b));
  fs_bufq_init(&q, 1000);
  fs_bufq_init(&front, 0);
  assert_int_equal(fs_bufq_append(&q, b, sizeof(b)), 0);
  assert_int_equal(fs_bufq_append(&front, a, sizeof(a)), 0);
  fs_bufq_prepend(&q, &front);
  assert_int_equal(front.len, 0);
  assert_null(front.head);
  assert_int_equal(q.len, sizeof(a) + sizeof(b));
  assert_int_equal(fs_bufq_copy(&q, out, sizeof(out)), sizeof(out));
  assert_memory_equal(out, a, sizeof(a));
  assert_memory_equal(out + sizeof(a), b, sizeof(b));
  /* The cap grew by what was moved: the sender's window is still free. */
  assert_int_equal(fs_bufq_append(&q, a, 900), 0);
  assert_int_equal(fs_bufq_append(&q, a, 1), -1);
  fs_bufq_prepend(&q, &front); /* empty front: nothing changes */
  assert_int_equal(q.len, sizeof(a) + 1000);
  fs_bufq_reset(&q);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_teardown(append_copy_drop_across_blocks, teardown),
      cmocka_unit_test_teardown(cap_refuses_without_partial_append, teardown),
      cmocka_unit_test_teardown(empty_queue_holds_no_block, teardown),
      cmocka_unit_test_teardown(failed_malloc_appends_nothing, teardown),
      cmocka_unit_test_teardown(failed_malloc_leaves_empty_queue_empty, teardown),
      cmocka_unit_test_teardown(cap_check_does_not_wrap, teardown),
      cmocka_unit_test_teardown(prepend_moves_blocks_in_front, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
