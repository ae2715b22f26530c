/* Unit tests: the token bucket (ratelimit.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "ratelimit.h"

static void burst_then_rate(void **state) {
  fs_ratelimit r;
  int i, ok = 0;
  (void)state;
  fs_ratelimit_init(&r, 100, 1000, 5000);
  for (i = 0; i < 1500; i++) ok += fs_ratelimit_take(&r, 5000);
  assert_int_equal(ok, 1000); /* the burst, all at once */
  assert_int_equal(fs_ratelimit_refused_take(&r), 500);
  assert_int_equal(fs_ratelimit_refused_take(&r), 0); /* reset by taking */
  /* 100 a second: 10 ms per token. */
  assert_false(fs_ratelimit_take(&r, 5009));
  assert_true(fs_ratelimit_take(&r, 5010));
  assert_false(fs_ratelimit_take(&r, 5010));
  for (ok = 0, i = 0; i < 1000; i++) ok += fs_ratelimit_take(&r, 6010);
  assert_int_equal(ok, 100); /* one second later: 100 more */
}

static void a_long_pause_only_refills_the_burst(void **state) {
  fs_ratelimit r;
  int i, ok = 0;
  (void)state;
  fs_ratelimit_init(&r, 100, 10, 0);
  for (i = 0; i < 10; i++) assert_true(fs_ratelimit_take(&r, 0));
  for (i = 0; i < 100; i++) ok += fs_ratelimit_take(&r, UINT64_MAX / 2);
  assert_int_equal(ok, 10);
}

static void a_clock_that_stands_still_gives_nothing(void **state) {
  fs_ratelimit r;
  (void)state;
  fs_ratelimit_init(&r, 1, 1, 1000);
  assert_true(fs_ratelimit_take(&r, 1000));
  assert_false(fs_ratelimit_take(&r, 1000));
  assert_false(fs_ratelimit_take(&r, 999)); /* never earlier than the last refill */
  assert_false(fs_ratelimit_take(&r, 1999));
  assert_true(fs_ratelimit_take(&r, 2000));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(burst_then_rate),
      cmocka_unit_test(a_long_pause_only_refills_the_burst),
      cmocka_unit_test(a_clock_that_stands_still_gives_nothing),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
