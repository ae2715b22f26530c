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
  fs_keepalive_init(&k, 30000, 10000, 1000);
  assert_int_equal(fs_keepalive_check(&k, 1000, 0, 1, &next), FS_KA_WAIT);
  assert_int_equal(next, 30000);
  assert_int_equal(fs_keepalive_check(&k, 30999, 0, 1, &next), FS_KA_WAIT);
  assert_int_equal(next, 1);
  assert_int_equal(fs_keepalive_check(&k, 31000, 0, 1, &next), FS_KA_PING);
  assert_int_equal(next, 10000);
  assert_int_equal(fs_keepalive_check(&k, 35000, 0, 1, &next), FS_KA_WAIT);
  assert_int_equal(next, 6000);
  assert_int_equal(fs_keepalive_check(&k, 41000, 0, 1, &next), FS_KA_DEAD);
}

/* Any byte after the PING (its ACK) keeps the connection; the next PING
 * comes a full period after that byte, not after the look that saw it. */
static void answer_resets_the_clock(void **state) {
  fs_keepalive k;
  uint64_t next = 0;
  (void)state;
  fs_keepalive_init(&k, 1000, 1000, 0);
  assert_int_equal(fs_keepalive_check(&k, 1000, 0, 1, &next), FS_KA_PING);
  assert_int_equal(next, 1000);
  /* the ACK arrived at 1200; the next look is when the PING's timeout ends */
  assert_int_equal(fs_keepalive_check(&k, 2000, 1200, 1, &next), FS_KA_WAIT);
  assert_int_equal(next, 200);
  assert_int_equal(fs_keepalive_check(&k, 2199, 1200, 1, &next), FS_KA_WAIT);
  assert_int_equal(fs_keepalive_check(&k, 2200, 1200, 1, &next), FS_KA_PING);
}

/* A connection that goes silent right after a PING ACK is known dead
 * time_ms + timeout_ms after that ACK, whenever the looks happen. */
static void detection_is_bounded_from_last_byte(void **state) {
  fs_keepalive k;
  uint64_t next = 0, t = 0, last = 0;
  fs_ka_action a;
  (void)state;
  fs_keepalive_init(&k, 1000, 1000, 0);
  while (t < 1000) { /* bytes keep arriving until 990 */
    last = t;
    assert_int_equal(fs_keepalive_check(&k, t, last, 1, &next), FS_KA_WAIT);
    t += 330;
  }
  for (;;) {
    a = fs_keepalive_check(&k, t, last, 1, &next);
    if (a == FS_KA_DEAD) break;
    t += next;
    assert_true(t <= 10000);
  }
  assert_true(t <= last + 2000);
  assert_true(t >= last + 2000);
}

/* A receiving connection is never pinged, however long the call. */
static void traffic_means_no_ping(void **state) {
  fs_keepalive k;
  uint64_t next = 0, t;
  (void)state;
  fs_keepalive_init(&k, 1000, 1000, 0);
  for (t = 0; t < 100000; t += 900) assert_int_equal(fs_keepalive_check(&k, t, t, 1, &next), FS_KA_WAIT);
}

/* A stale receive time (older than one already seen) changes nothing. */
static void stale_receive_time_is_ignored(void **state) {
  fs_keepalive k;
  uint64_t next = 0;
  (void)state;
  fs_keepalive_init(&k, 1000, 1000, 5000);
  assert_int_equal(fs_keepalive_check(&k, 5500, 100, 1, &next), FS_KA_WAIT);
  assert_int_equal(next, 500);
}

/* No PING without an open call (a stock gRPC server punishes those), and a
 * call opening after a long idle period gets a PING on the next look. */
static void idle_connection_is_not_pinged(void **state) {
  fs_keepalive k;
  uint64_t next = 0, t;
  (void)state;
  fs_keepalive_init(&k, 1000, 500, 0);
  for (t = 1000; t < 60000; t += next) {
    assert_int_equal(fs_keepalive_check(&k, t, 0, 0, &next), FS_KA_WAIT);
    assert_true(next > 0);
  }
  assert_int_equal(fs_keepalive_check(&k, t, 0, 1, &next), FS_KA_PING);
}

/* A stalled call asks for a PING at once; none while one is outstanding;
 * its silence still ends the connection timeout_ms after the PING. */
static void probe_pings_now_once(void **state) {
  fs_keepalive k;
  uint64_t next = 0;
  (void)state;
  fs_keepalive_init(&k, 30000, 10000, 0);
  assert_int_equal(fs_keepalive_probe(&k, 4800, 0, &next), 1);
  assert_int_equal(next, 10000);
  assert_int_equal(fs_keepalive_probe(&k, 5000, 0, &next), 0);
  assert_int_equal(next, 9800);
  assert_int_equal(fs_keepalive_check(&k, 14799, 0, 1, &next), FS_KA_WAIT);
  assert_int_equal(fs_keepalive_check(&k, 14800, 0, 1, &next), FS_KA_DEAD);
}

/* The probe's PING answered: back to the normal schedule from that byte. */
static void probe_answered(void **state) {
  fs_keepalive k;
  uint64_t next = 0;
  (void)state;
  fs_keepalive_init(&k, 30000, 10000, 0);
  assert_int_equal(fs_keepalive_probe(&k, 4800, 0, &next), 1);
  assert_int_equal(fs_keepalive_check(&k, 5000, 4850, 1, &next), FS_KA_WAIT);
  assert_int_equal(next, 29850);
  assert_int_equal(fs_keepalive_probe(&k, 6000, 4850, &next), 1); /* a new stall: a new PING */
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(silent_upstream_is_pinged_then_dead),
      cmocka_unit_test(answer_resets_the_clock),
      cmocka_unit_test(detection_is_bounded_from_last_byte),
      cmocka_unit_test(traffic_means_no_ping),
      cmocka_unit_test(stale_receive_time_is_ignored),
      cmocka_unit_test(idle_connection_is_not_pinged),
      cmocka_unit_test(probe_pings_now_once),
      cmocka_unit_test(probe_answered),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
