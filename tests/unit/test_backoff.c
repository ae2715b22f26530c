/* Unit tests: reconnect backoff schedule (gRPC connection-backoff rules). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "backoff.h"

static void first_attempt_is_immediate(void **state) {
  fs_backoff b;
  (void)state;
  fs_backoff_init(&b, 10000, 300000, 42);
  assert_int_equal(fs_backoff_next(&b), 0);
}

/* Each delay lies within +-20% of initial * 1.6^k, capped at max. */
static void delays_grow_with_jitter_and_cap(void **state) {
  fs_backoff b;
  double base = 10000;
  int i;
  (void)state;
  fs_backoff_init(&b, 10000, 300000, 7);
  fs_backoff_next(&b);
  for (i = 0; i < 20; i++) {
    uint64_t d = fs_backoff_next(&b);
    double lo = base * 0.8, hi = base * 1.2;
    if (hi > 300000) hi = 300000;
    if (lo > 300000) lo = 300000 * 0.8;
    assert_true((double)d >= lo - 1 && (double)d <= hi + 1);
    base *= 1.6;
    if (base > 300000) base = 300000;
  }
}

static void jitter_is_not_constant(void **state) {
  fs_backoff b;
  uint64_t seen[16];
  int i, distinct = 0;
  (void)state;
  for (i = 0; i < 16; i++) {
    int j, dup = 0;
    fs_backoff_init(&b, 10000, 300000, (uint64_t)i + 1);
    fs_backoff_next(&b);
    seen[i] = fs_backoff_next(&b);
    for (j = 0; j < i; j++) dup |= seen[j] == seen[i];
    distinct += !dup;
  }
  assert_true(distinct > 8);
}

static void reset_starts_over(void **state) {
  fs_backoff b;
  int i;
  (void)state;
  fs_backoff_init(&b, 1000, 30000, 3);
  for (i = 0; i < 10; i++) fs_backoff_next(&b);
  fs_backoff_reset(&b);
  assert_int_equal(fs_backoff_next(&b), 0);
  assert_in_range(fs_backoff_next(&b), 800, 1200);
}

static void same_seed_same_schedule(void **state) {
  fs_backoff a, b;
  int i;
  (void)state;
  fs_backoff_init(&a, 1000, 60000, 99);
  fs_backoff_init(&b, 1000, 60000, 99);
  for (i = 0; i < 12; i++) assert_int_equal(fs_backoff_next(&a), fs_backoff_next(&b));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(first_attempt_is_immediate), cmocka_unit_test(delays_grow_with_jitter_and_cap),
      cmocka_unit_test(jitter_is_not_constant),     cmocka_unit_test(reset_starts_over),
      cmocka_unit_test(same_seed_same_schedule),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
