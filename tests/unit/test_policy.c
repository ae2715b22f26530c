/* Unit tests: the data path's decisions (policy.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>
#include <uv.h>

#include "policy.h"

/* A held call ends before its own deadline, never after the hold limit. */
static void hold_ends_before_the_call_deadline(void **state) {
  (void)state;
  assert_int_equal(fs_policy_hold_ms(20000, 0, 0), 20000);
  assert_int_equal(fs_policy_hold_ms(20000, 1, 5000), 4800);   /* Flower's heartbeat deadline */
  assert_int_equal(fs_policy_hold_ms(20000, 1, 1000), 900);    /* 10% of a short deadline */
  assert_int_equal(fs_policy_hold_ms(20000, 1, 60000), 20000); /* the hold is shorter */
  assert_int_equal(fs_policy_hold_ms(20000, 1, 20100), 19900);
  assert_int_equal(fs_policy_hold_ms(20000, 1, 5), 5);
  assert_int_equal(fs_policy_hold_ms(20000, 1, 0), 1);
  assert_int_equal(fs_policy_hold_ms(0, 0, 0), 1);
}

static fs_retry_facts retryable(void) {
  fs_retry_facts f;
  memset(&f, 0, sizeof(f));
  f.replay_complete = 1;
  f.client_present = 1;
  f.method_repeatable = 1;
  return f;
}

/* Each fact that makes a repeat unsafe forbids it on its own. */
static void retry_only_when_provably_safe(void **state) {
  fs_retry_facts f = retryable();
  (void)state;
  assert_true(fs_policy_may_retry(&f));
  f.method_repeatable = 0; /* PushMessages on a lost connection: maybe processed */
  assert_false(fs_policy_may_retry(&f));
  f.refused = 1; /* REFUSED_STREAM: never processed, any method */
  assert_true(fs_policy_may_retry(&f));
#define FORBIDS(field, value)                                                                                          \
  do {                                                                                                                 \
    fs_retry_facts g = retryable();                                                                                    \
    g.refused = 1;                                                                                                     \
    g.field = value;                                                                                                   \
    assert_false(fs_policy_may_retry(&g));                                                                             \
  } while (0)
  FORBIDS(replay_complete, 0);
  FORBIDS(response_started, 1);
  FORBIDS(trailers_sent, 1);
  FORBIDS(finished, 1);
  FORBIDS(client_present, 0);
  FORBIDS(draining, 1);
  FORBIDS(attempts, FS_POLICY_MAX_RETRIES);
#undef FORBIDS
  f = retryable();
  f.attempts = FS_POLICY_MAX_RETRIES - 1;
  assert_true(fs_policy_may_retry(&f));
}

static void stall_watch_needs_all_four(void **state) {
  (void)state;
  assert_true(fs_policy_stall_watched(1, 1, 0, 1));
  assert_false(fs_policy_stall_watched(0, 1, 0, 1)); /* link role: off */
  assert_false(fs_policy_stall_watched(1, 0, 0, 1)); /* no deadline */
  assert_false(fs_policy_stall_watched(1, 1, 1, 1)); /* answered */
  assert_false(fs_policy_stall_watched(1, 1, 0, 0)); /* side effects */
}

/* Flower's heartbeat: 5 s deadline, sent at t=1000. */
static void stall_times_for_a_heartbeat(void **state) {
  (void)state;
  assert_int_equal(fs_policy_stall_check_at(1000, 6000), 1000 + 4800);
  assert_int_equal(fs_policy_stall_probe_at(1000, 6000), 1000 + 2400);
  /* A deadline already past: checked (and probed) at once. */
  assert_int_equal(fs_policy_stall_check_at(1000, 900), 1001);
  assert_int_equal(fs_policy_stall_probe_at(1000, 900), 1000);
}

static void stall_verdicts(void **state) {
  uint64_t next = 0;
  (void)state;
  /* Before the probe time: wait for it. */
  assert_int_equal(fs_policy_stall(2000, 1000, 6000, 0, 0, &next), FS_STALL_WAIT);
  assert_int_equal(next, 3400);
  /* Probe time: PING now. */
  assert_int_equal(fs_policy_stall(3400, 1000, 6000, 0, 0, &next), FS_STALL_PROBE);
  /* Probed: wait for the check time. */
  assert_int_equal(fs_policy_stall(3400, 1000, 6000, 3400, 0, &next), FS_STALL_WAIT);
  assert_int_equal(next, 5800);
  /* Check time, no ACK since the probe (an older ACK does not count). */
  assert_int_equal(fs_policy_stall(5800, 1000, 6000, 3400, 3399, &next), FS_STALL_FAIL);
  /* Check time, ACK after the probe: alive, a slow server. */
  assert_int_equal(fs_policy_stall(5800, 1000, 6000, 3400, 3500, &next), FS_STALL_ALIVE);
  assert_int_equal(fs_policy_stall(5800, 1000, 6000, 3400, 3400, &next), FS_STALL_ALIVE);
  /* Looked at only after the check time and never probed: probe first. */
  assert_int_equal(fs_policy_stall(9000, 1000, 6000, 0, 0, &next), FS_STALL_PROBE);
}

static fs_upconn_view up(int ready, int goaway, uint32_t streams, uint32_t max) {
  fs_upconn_view v;
  memset(&v, 0, sizeof(v));
  v.ready = (uint8_t)ready;
  v.goaway = (uint8_t)goaway;
  v.streams = streams;
  v.max_streams = max;
  return v;
}

static void upstream_choice(void **state) {
  fs_upconn_view v[4] = {{0}};
  int sc = -1;
  (void)state;
  /* None: connect. */
  assert_int_equal(fs_policy_pick_upstream(v, 0, 8, 0, &sc), -1);
  assert_int_equal(sc, 1);
  /* None, draining: never connect. */
  assert_int_equal(fs_policy_pick_upstream(v, 0, 8, 1, &sc), -1);
  assert_int_equal(sc, 0);
  /* The first with room wins. */
  v[0] = up(1, 0, 100, 100);
  v[1] = up(1, 0, 3, 100);
  v[2] = up(1, 0, 0, 100);
  assert_int_equal(fs_policy_pick_upstream(v, 3, 8, 0, &sc), 1);
  assert_int_equal(sc, 0);
  /* GOAWAY and closing connections take nothing. */
  v[1].goaway = 1;
  v[2].closing = 1;
  assert_int_equal(fs_policy_pick_upstream(v, 3, 8, 0, &sc), -1);
  assert_int_equal(sc, 1); /* all full: open another */
  /* All full and at the limit: the least loaded, nghttp2 queues the stream. */
  v[0].streams = 130;
  v[1] = up(1, 0, 120, 100);
  v[2] = up(1, 0, 101, 100);
  assert_int_equal(fs_policy_pick_upstream(v, 3, 3, 0, &sc), 2);
  assert_int_equal(sc, 0);
  /* One still connecting: wait for it rather than pile on a full one. */
  v[3] = up(0, 0, 0, 0);
  assert_int_equal(fs_policy_pick_upstream(v, 4, 8, 0, &sc), -1);
  assert_int_equal(sc, 0);
  /* ... but a ready one with room is used meanwhile. */
  v[1].streams = 99;
  assert_int_equal(fs_policy_pick_upstream(v, 4, 8, 0, &sc), 1);
}

static void header_abuse_is_four_times_the_limit(void **state) {
  (void)state;
  assert_false(fs_policy_header_abuse(8192, 8192));
  assert_false(fs_policy_header_abuse(20032, 8192)); /* one 20 KB header: the call fails, the connection lives */
  assert_false(fs_policy_header_abuse(4 * 8192, 8192));
  assert_true(fs_policy_header_abuse(4 * 8192 + 1, 8192));
  assert_true(fs_policy_header_abuse(UINT64_MAX, UINT32_MAX));
}

static void keepalive_doubles_up_to_a_day(void **state) {
  (void)state;
  assert_int_equal(fs_policy_keepalive_backoff(30000), 60000);
  assert_int_equal(fs_policy_keepalive_backoff(43200000), 86400000);
  assert_int_equal(fs_policy_keepalive_backoff(50000000), 86400000);
  assert_int_equal(fs_policy_keepalive_backoff(86400000), 86400000);
  assert_int_equal(fs_policy_keepalive_backoff(UINT64_MAX), 86400000);
}

static void idle_timer(void **state) {
  uint64_t ms = 0;
  (void)state;
  assert_int_equal(fs_policy_idle(1, 0, 0, 1, 3600000, &ms), FS_IDLE_ARM);
  assert_int_equal(ms, 3600000);
  assert_int_equal(fs_policy_idle(1, 0, 1, 1, 3600000, &ms), FS_IDLE_STOP);
  assert_int_equal(fs_policy_idle(1, 0, 0, 1, 0, &ms), FS_IDLE_STOP);       /* --idle-timeout 0 */
  assert_int_equal(fs_policy_idle(0, 0, 0, 0, 3600000, &ms), FS_IDLE_ASIS); /* handshake/preface timer runs */
  assert_int_equal(fs_policy_idle(1, 1, 0, 1, 3600000, &ms), FS_IDLE_ASIS);
  /* Never used: at most a minute, whatever --idle-timeout says. */
  assert_int_equal(fs_policy_idle(1, 0, 0, 0, 3600000, &ms), FS_IDLE_ARM);
  assert_int_equal(ms, FS_POLICY_UNUSED_IDLE_MS);
  assert_int_equal(fs_policy_idle(1, 0, 0, 0, 0, &ms), FS_IDLE_ARM);
  assert_int_equal(ms, FS_POLICY_UNUSED_IDLE_MS);
  assert_int_equal(fs_policy_idle(1, 0, 0, 0, 5000, &ms), FS_IDLE_ARM);
  assert_int_equal(ms, 5000);
}

static void flood_limits_follow_useful_work(void **state) {
  fs_flood_count f = {0};
  (void)state;
  assert_null(fs_policy_flood(&f));
  f.empty_in_a_row = FS_FLOOD_EMPTY_IN_A_ROW;
  assert_null(fs_policy_flood(&f));
  f.empty_in_a_row++;
  assert_string_equal(fs_policy_flood(&f), "empty DATA frames");
  f.empty_in_a_row = 0;
  f.priority = 100; /* before any stream: 100 allowed */
  assert_null(fs_policy_flood(&f));
  f.priority = 101;
  assert_string_equal(fs_policy_flood(&f), "PRIORITY frames");
  f.streams = 1; /* each stream opened allows 100 more */
  assert_null(fs_policy_flood(&f));
  f.priority = 0;
  f.window_updates = 100;
  assert_null(fs_policy_flood(&f));
  f.window_updates = 101;
  assert_string_equal(fs_policy_flood(&f), "WINDOW_UPDATE frames");
  f.data_sent = 1; /* a reading client sends one or two per DATA frame */
  assert_null(fs_policy_flood(&f));
  f.data_sent = UINT32_MAX, f.window_updates = UINT32_MAX, f.streams = UINT32_MAX, f.priority = UINT32_MAX;
  assert_null(fs_policy_flood(&f)); /* no overflow in the products */
}

static void attempts_that_never_reached_the_upstream_are_probed(void **state) {
  (void)state;
  assert_int_equal(fs_policy_attempt_class(0, 0), FS_ATTEMPT_UNREACHED); /* our TCP connect timer */
  assert_int_equal(fs_policy_attempt_class(0, UV_ETIMEDOUT), FS_ATTEMPT_UNREACHED);
  assert_int_equal(fs_policy_attempt_class(0, UV_EHOSTUNREACH), FS_ATTEMPT_UNREACHED);
  assert_int_equal(fs_policy_attempt_class(0, UV_ENETUNREACH), FS_ATTEMPT_UNREACHED);
  assert_int_equal(fs_policy_attempt_class(0, UV_ECONNREFUSED), FS_ATTEMPT_UNREACHED);
  /* the TCP handshake completed: TLS, HTTP/2 or the server failed */
  assert_int_equal(fs_policy_attempt_class(1, 0), FS_ATTEMPT_REACHED);
  assert_int_equal(fs_policy_attempt_class(1, UV_ECONNREFUSED), FS_ATTEMPT_REACHED);
  /* local trouble is paced by the backoff */
  assert_int_equal(fs_policy_attempt_class(0, UV_EMFILE), FS_ATTEMPT_REACHED);
  assert_int_equal(fs_policy_attempt_class(0, UV_ENOMEM), FS_ATTEMPT_REACHED);
}

static void probe_delay_is_the_interval_plus_minus_20_percent(void **state) {
  uint64_t r, lo = UINT64_MAX, hi = 0, x = 88172645463325252ull;
  int i;
  (void)state;
  for (i = 0; i < 10000; i++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    r = fs_policy_probe_delay(1000, x);
    lo = r < lo ? r : lo, hi = r > hi ? r : hi;
  }
  assert_true(lo >= 800 && lo < 820);
  assert_true(hi <= 1200 && hi > 1180);
  assert_int_equal(fs_policy_probe_delay(1, 12345), 1); /* tiny intervals stay positive */
  assert_int_equal(fs_policy_probe_delay(0, 12345), 0);
}

/* The buffer pool: takes that fit, refusals that take nothing, give-backs. */
static void budget_takes_what_fits(void **state) {
  fs_budget b = {.cap = 1000};
  (void)state;
  assert_int_equal(fs_budget_take(&b, 600), 0);
  assert_int_equal(fs_budget_take(&b, 401), -1); /* would be 1001 */
  assert_int_equal(b.used, 600);
  assert_int_equal(b.refused, 1);
  assert_int_equal(fs_budget_take(&b, 400), 0); /* exactly the cap */
  assert_int_equal(fs_budget_take(&b, 1), -1);
  fs_budget_give(&b, 600);
  assert_int_equal(b.used, 400);
  assert_int_equal(fs_budget_take(&b, UINT64_MAX), -1); /* no overflow */
  fs_budget_give(&b, 5000);                             /* never below 0 */
  assert_int_equal(b.used, 0);
  b.cap = 0;
  assert_int_equal(fs_budget_take(&b, 1), -1);
  assert_int_equal(fs_budget_take(&b, 0), 0);
}

/* --max-calls: below it, admit; at it, a candidate gives way when its
 * client left it idle long enough or holds more calls than the newcomer's. */
static void calls_beyond_the_cap_evict_the_idle_or_the_greedy(void **state) {
  const uint64_t idle = FS_POLICY_EVICT_IDLE_MS;
  (void)state;
  assert_int_equal(fs_policy_admit(0, 10, 0, 0, 0, 0), FS_ADMIT_OK);
  assert_int_equal(fs_policy_admit(9, 10, 0, 1, 9, 0), FS_ADMIT_OK);
  /* every call moves, clients alike: refused */
  assert_int_equal(fs_policy_admit(10, 10, 0, 1, 1, 0), FS_ADMIT_REFUSE);
  assert_int_equal(fs_policy_admit(10, 10, idle - 1, 1, 3, 2), FS_ADMIT_REFUSE);
  /* left idle by its client long enough: gives way to anyone */
  assert_int_equal(fs_policy_admit(10, 10, idle, 1, 1, 5), FS_ADMIT_EVICT);
  assert_int_equal(fs_policy_admit(11, 10, 60000, 1, 1, 1), FS_ADMIT_EVICT);
  /* idle because the upstream is slow: not its client's doing */
  assert_int_equal(fs_policy_admit(10, 10, 60000, 0, 1, 5), FS_ADMIT_REFUSE);
  /* a client holding many calls gives way to one holding fewer, at once */
  assert_int_equal(fs_policy_admit(10, 10, 0, 0, 10, 0), FS_ADMIT_EVICT);
  assert_int_equal(fs_policy_admit(10, 10, 0, 0, 3, 1), FS_ADMIT_EVICT);
  assert_int_equal(fs_policy_admit(10, 10, 0, 0, 2, 1), FS_ADMIT_REFUSE); /* 2 vs 1 + 1: not more */
  assert_int_equal(fs_policy_admit(10, 10, 0, 0, 10, 10), FS_ADMIT_REFUSE);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(hold_ends_before_the_call_deadline),
      cmocka_unit_test(retry_only_when_provably_safe),
      cmocka_unit_test(stall_watch_needs_all_four),
      cmocka_unit_test(stall_times_for_a_heartbeat),
      cmocka_unit_test(stall_verdicts),
      cmocka_unit_test(upstream_choice),
      cmocka_unit_test(header_abuse_is_four_times_the_limit),
      cmocka_unit_test(keepalive_doubles_up_to_a_day),
      cmocka_unit_test(idle_timer),
      cmocka_unit_test(flood_limits_follow_useful_work),
      cmocka_unit_test(attempts_that_never_reached_the_upstream_are_probed),
      cmocka_unit_test(probe_delay_is_the_interval_plus_minus_20_percent),
      cmocka_unit_test(budget_takes_what_fits),
      cmocka_unit_test(calls_beyond_the_cap_evict_the_idle_or_the_greedy),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
