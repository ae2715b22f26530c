/* Unit tests: keepalive decisions (gRFC A8, client side). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "keepalive.h"

/* Silence with a call open: PING after time_ms, dead timeout_ms later. */
static void silent_upstream_is_pinged_then_dead(void **state) {
  fs_keepalive k;
  uint64_t next = 0;
  (void)state;
  fs_keepalive_init(&k, 30000, 10000, 1000, 500);
  assert_int_equal(fs_keepalive_check(&k, 1000, 500, 1, &next), FS_KA_WAIT);
  assert_int_equal(next, 30000);
  assert_int_equal(fs_keepalive_check(&k, 30999, 500, 1, &next), FS_KA_WAIT);
  assert_int_equal(next, 1);
  assert_int_equal(fs_keepalive_check(&k, 31000, 500, 1, &next), FS_KA_PING);
  assert_int_equal(next, 10000);
  assert_int_equal(fs_keepalive_check(&k, 35000, 500, 1, &next), FS_KA_WAIT);
  assert_int_equal(next, 6000);
  assert_int_equal(fs_keepalive_check(&k, 41000, 500, 1, &next), FS_KA_DEAD);
}

/* Any byte after the PING (its ACK) keeps the connection; the next PING
 * comes only after another full period of silence. */
static void answer_resets_the_clock(void **state) {
  fs_keepalive k;
  uint64_t next = 0;
  (void)state;
  fs_keepalive_init(&k, 1000, 1000, 0, 0);
  assert_int_equal(fs_keepalive_check(&k, 1000, 0, 1, &next), FS_KA_PING);
  assert_int_equal(fs_keepalive_check(&k, 1500, 17, 1, &next), FS_KA_WAIT); /* ACK read */
  assert_int_equal(next, 1000);
  assert_int_equal(fs_keepalive_check(&k, 2400, 17, 1, &next), FS_KA_WAIT);
  assert_int_equal(fs_keepalive_check(&k, 2500, 17, 1, &next), FS_KA_PING);
}

/* A receiving connection is never pinged, however long the call. */
static void traffic_means_no_ping(void **state) {
  fs_keepalive k;
  uint64_t next = 0, t, rx = 0;
  (void)state;
  fs_keepalive_init(&k, 1000, 1000, 0, 0);
  for (t = 0; t < 100000; t += 900) assert_int_equal(fs_keepalive_check(&k, t, rx += 9, 1, &next), FS_KA_WAIT);
}

/* No PING without an open call (a stock gRPC server punishes those), and a
 * call opening after a long idle period gets a PING on the next look. */
static void idle_connection_is_not_pinged(void **state) {
  fs_keepalive k;
  uint64_t next = 0, t;
  (void)state;
  fs_keepalive_init(&k, 1000, 500, 0, 0);
  for (t = 1000; t < 60000; t += next) {
    assert_int_equal(fs_keepalive_check(&k, t, 0, 0, &next), FS_KA_WAIT);
    assert_true(next > 0);
  }
  assert_int_equal(fs_keepalive_check(&k, t, 0, 1, &next), FS_KA_PING);
}

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(silent_upstream_is_pinged_then_dead),
    cmocka_unit_test(answer_resets_the_clock),
    cmocka_unit_test(traffic_means_no_ping),
    cmocka_unit_test(idle_connection_is_not_pinged),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
