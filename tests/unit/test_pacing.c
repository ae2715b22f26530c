/* Unit tests: how deep a connection's output queue may be (pacing.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

#include "pacing.h"

/* Relations between the constants: the compiler checks them. */
_Static_assert(FS_PACING_LAN < FS_PACING_DEEP, "a paced connection queues less than a loopback one");
_Static_assert(FS_PACING_MIN > 16384, "the smallest queue still holds a whole TLS record");

static int wanted4(const char *ip) {
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  assert_int_equal(inet_pton(AF_INET, ip, &a.sin_addr), 1);
  return fs_pacing_wanted((struct sockaddr *)&a);
}

static int wanted6(const char *ip) {
  struct sockaddr_in6 a;
  memset(&a, 0, sizeof(a));
  a.sin6_family = AF_INET6;
  assert_int_equal(inet_pton(AF_INET6, ip, &a.sin6_addr), 1);
  return fs_pacing_wanted((struct sockaddr *)&a);
}

/* Loopback peers (the SuperLink beside the link, the SuperNode beside the
 * node, benches) are never paced; every other address may be. */
static void loopback_peers_are_never_paced(void **state) {
  struct sockaddr un;
  (void)state;
  assert_false(wanted4("127.0.0.1"));
  assert_false(wanted4("127.255.0.9"));
  assert_false(wanted6("::1"));
  assert_false(wanted6("::ffff:127.0.0.1"));
  assert_true(wanted4("10.213.7.2"));
  assert_true(wanted4("192.0.2.1"));
  assert_true(wanted4("128.0.0.1"));
  assert_true(wanted6("2001:db8::1"));
  assert_true(wanted6("::ffff:192.0.2.1"));
  memset(&un, 0, sizeof(un));
  un.sa_family = AF_UNIX;
  assert_false(fs_pacing_wanted(&un));
}

/* A LAN round trip (1 ms) keeps the LAN queue whatever the window. */
static void short_round_trips_keep_the_lan_queue(void **state) {
  (void)state;
  assert_int_equal(fs_pacing_cap(40, 10, 65483), FS_PACING_LAN);
  assert_int_equal(fs_pacing_cap(1000, 2, 1448), FS_PACING_LAN);
  assert_int_equal(fs_pacing_cap(FS_PACING_WAN_RTT_US - 1, 1, 1448), FS_PACING_LAN);
  assert_false(fs_pacing_is_wan(FS_PACING_WAN_RTT_US - 1));
}

/* A WAN link gets about one congestion window. */
static void wan_gets_one_congestion_window(void **state) {
  (void)state;
  assert_true(fs_pacing_is_wan(FS_PACING_WAN_RTT_US));
  assert_int_equal(fs_pacing_cap(200000, 40, 1448), 40 * 1448);
  assert_int_equal(fs_pacing_cap(FS_PACING_WAN_RTT_US, 20, 1448), 20 * 1448);
}

/* Never below one TLS record (a small window on a lossy link), never above the LAN queue. */
static void window_is_clamped(void **state) {
  (void)state;
  assert_int_equal(fs_pacing_cap(400000, 2, 1448), FS_PACING_MIN);
  assert_int_equal(fs_pacing_cap(50000, 10000, 1448), FS_PACING_LAN);
  assert_int_equal(fs_pacing_cap(50000, 0xffffffffu, 0xffffffffu), FS_PACING_LAN); /* no overflow */
}

/* Nothing known (no window or no MSS yet): the LAN queue. */
static void unknown_window_keeps_the_lan_queue(void **state) {
  (void)state;
  assert_int_equal(fs_pacing_cap(300000, 0, 1448), FS_PACING_LAN);
  assert_int_equal(fs_pacing_cap(300000, 10, 0), FS_PACING_LAN);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(short_round_trips_keep_the_lan_queue),
      cmocka_unit_test(wan_gets_one_congestion_window),
      cmocka_unit_test(window_is_clamped),
      cmocka_unit_test(unknown_window_keeps_the_lan_queue),
      cmocka_unit_test(loopback_peers_are_never_paced),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
