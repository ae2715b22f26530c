/* Unit tests: when certificates are renewed (renew.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "renew.h"

/* Renewed once less than a third of the lifetime is left, not before. */
static void renewed_in_the_last_third(void **state) {
  int64_t nb = 1000000, na = nb + 900; /* 900 s lifetime: renewal point at nb + 600 */
  (void)state;
  assert_int_equal(fs_renew_at(nb, na), nb + 600);
  assert_false(fs_renew_due(nb, nb, na));
  assert_false(fs_renew_due(nb + 599, nb, na));
  assert_true(fs_renew_due(nb + 600, nb, na));
  assert_true(fs_renew_due(na - 1, nb, na));
  /* The real lifetimes: 825 days renews with 275 days left, the CA with ~1217 days left. */
  assert_false(fs_renew_due(nb + 549 * 86400LL, nb, nb + FS_RENEW_SERVER_LIFETIME_S));
  assert_true(fs_renew_due(nb + 550 * 86400LL, nb, nb + FS_RENEW_SERVER_LIFETIME_S));
  assert_false(fs_renew_due(nb + 2400 * 86400LL, nb, nb + FS_RENEW_CA_LIFETIME_S));
  assert_true(fs_renew_due(nb + 2434 * 86400LL, nb, nb + FS_RENEW_CA_LIFETIME_S));
}

/* Expired, not yet valid and nonsense validities are always renewed. */
static void invalid_or_expired_is_due(void **state) {
  (void)state;
  assert_true(fs_renew_due(2000, 1000, 1900));  /* expired */
  assert_true(fs_renew_due(1900, 1000, 1900));  /* notAfter reached */
  assert_true(fs_renew_due(999, 1000, 100000)); /* not valid yet (clock went back) */
  assert_true(fs_renew_due(1000, 1000, 1000));  /* empty */
  assert_true(fs_renew_due(1000, 2000, 1000));  /* inverted */
  assert_int_equal(fs_renew_at(2000, 1000), 2000);
}

/* The timer looks at the soonest renewal point, at most an hour away, at
 * least a second. */
static void next_check_is_the_soonest_renewal_clamped(void **state) {
  int64_t at[2] = {5000, 4000};
  (void)state;
  assert_int_equal(fs_renew_next_check_s(3990, at, 2), 10);
  assert_int_equal(fs_renew_next_check_s(0, at, 2), FS_RENEW_CHECK_MAX_S);
  assert_int_equal(fs_renew_next_check_s(4000, at, 2), FS_RENEW_CHECK_MIN_S);
  assert_int_equal(fs_renew_next_check_s(9000, at, 2), FS_RENEW_CHECK_MIN_S); /* overdue: soon, not a busy loop */
  assert_int_equal(fs_renew_next_check_s(0, NULL, 0), FS_RENEW_CHECK_MAX_S);
}

/* Backdating only for real lifetimes; a server certificate never outlives its CA. */
static void backdate_and_ca_bound(void **state) {
  (void)state;
  assert_int_equal(fs_renew_backdate_s(FS_RENEW_SERVER_LIFETIME_S), 3600);
  assert_int_equal(fs_renew_backdate_s(86400), 3600);
  assert_int_equal(fs_renew_backdate_s(6), 0);
  assert_int_equal(fs_renew_server_not_after(100, 50, 1000), 150);
  assert_int_equal(fs_renew_server_not_after(100, 5000, 1000), 1000);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(renewed_in_the_last_third),
      cmocka_unit_test(invalid_or_expired_is_due),
      cmocka_unit_test(next_check_is_the_soonest_renewal_clamped),
      cmocka_unit_test(backdate_and_ca_bound),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
