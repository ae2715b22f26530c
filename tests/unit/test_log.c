/* Unit tests: the event logger's line format, escaping, limits and drops. */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "log.h"

static int fds[2];

static int setup(void **state) {
  (void)state;
  if (pipe(fds) < 0) return -1;
  return 0;
}
static int teardown(void **state) {
  (void)state;
  close(fds[0]);
  close(fds[1]);
  return 0;
}

static size_t read_line(char *out, size_t cap) {
  ssize_t n = read(fds[0], out, cap - 1);
  assert_true(n > 0);
  out[n] = '\0';
  return (size_t)n;
}

static void envelope_and_types(void **state) {
  fs_event ev;
  char line[FS_LOG_LINE_MAX + 1];
  (void)state;
  fs_log_init(FS_LOG_JSON, FS_LOG_INFO, "link", fds[1]);
  assert_int_equal(fs_ev_begin(&ev, FS_LOG_DEBUG, "filtered"), 0);
  assert_true(fs_ev_begin(&ev, FS_LOG_INFO, "conn.open"));
  fs_ev_str(&ev, "peer", "203.0.113.7:51234");
  fs_ev_id(&ev, "node_id", 11120582391849163402ull);
  fs_ev_u64(&ev, "bytes", 42);
  fs_ev_bool(&ev, "ok", 1);
  assert_int_equal(fs_ev_end(&ev), 0);
  read_line(line, sizeof(line));
  assert_memory_equal(line, "{\"ts\":\"", 7);
  assert_non_null(strstr(line, "Z\",\"level\":\"info\",\"event\":\"conn.open\",\"role\":\"link\""));
  assert_non_null(strstr(line, ",\"peer\":\"203.0.113.7:51234\""));
  assert_non_null(strstr(line, ",\"node_id\":\"11120582391849163402\"")); /* a string: > 2^53 */
  assert_non_null(strstr(line, ",\"bytes\":42,\"ok\":true}\n"));
  /* RFC 3339 with microseconds: 2026-11-22T04:12:00.123456Z */
  assert_int_equal(line[7 + 10], 'T');
  assert_int_equal(line[7 + 19], '.');
  assert_int_equal(line[7 + 26], 'Z');
}

static void escaping(void **state) {
  char out[128];
  size_t len = 0;
  const char in[] = "q\"b\\n\n\x01\x7f\xc3\xa9\xff\xe2\x82";
  (void)state;
  fs_json_escape(out, sizeof(out), &len, in, sizeof(in) - 1);
  out[len] = '\0';
  /* quote, backslash, newline, control chars, valid UTF-8 kept, invalid
   * bytes and a truncated sequence become U+FFFD */
  assert_string_equal(out, "q\\\"b\\\\n\\n\\u0001\\u007f\xc3\xa9\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
}

static void long_values_are_cut_and_marked(void **state) {
  fs_event ev;
  char big[8000], line[FS_LOG_LINE_MAX + 1];
  size_t n;
  int i;
  (void)state;
  memset(big, 'x', sizeof(big) - 1);
  big[sizeof(big) - 1] = '\0';
  fs_log_init(FS_LOG_JSON, FS_LOG_DEBUG, "node", fds[1]);
  fs_ev_begin(&ev, FS_LOG_WARN, "rpc.error");
  for (i = 0; i < 6; i++) fs_ev_str(&ev, "grpc_message", big);
  fs_ev_end(&ev);
  n = read_line(line, sizeof(line));
  assert_true(n <= FS_LOG_LINE_MAX);
  assert_int_equal(line[n - 1], '\n');
  assert_int_equal(line[n - 2], '}');
  assert_non_null(strstr(line, "...\""));
  assert_non_null(strstr(line, ",\"truncated\":true}"));
}

static void text_format(void **state) {
  fs_event ev;
  char line[FS_LOG_LINE_MAX + 1];
  (void)state;
  fs_log_init(FS_LOG_TEXT, FS_LOG_INFO, "link", fds[1]);
  fs_ev_begin(&ev, FS_LOG_WARN, "tls.fail");
  fs_ev_str(&ev, "peer", "127.0.0.1:5");
  fs_ev_str(&ev, "reason", "client did not offer ALPN h2");
  fs_ev_end(&ev);
  read_line(line, sizeof(line));
  assert_non_null(strstr(line, "Z warn  tls.fail peer=127.0.0.1:5 reason=\"client did not offer ALPN h2\"\n"));
}

/* A full pipe drops lines and counts them instead of blocking. */
static void full_output_drops_and_counts(void **state) {
  fs_event ev;
  uint64_t before;
  int i, dropped = 0;
  (void)state;
  fs_log_init(FS_LOG_JSON, FS_LOG_INFO, "link", fds[1]); /* sets O_NONBLOCK on the pipe */
  before = fs_log_dropped();
  for (i = 0; i < 100000 && !dropped; i++) {
    fs_ev_begin(&ev, FS_LOG_INFO, "flood");
    fs_ev_str(&ev, "pad", "0123456789012345678901234567890123456789");
    dropped = fs_ev_end(&ev) < 0;
  }
  assert_true(dropped);
  assert_true(fs_log_dropped() > before);
  {
    char drain[65536];
    fcntl(fds[0], F_SETFL, O_NONBLOCK);
    while (read(fds[0], drain, sizeof(drain)) > 0) {}
  }
}

/* A kind a peer can cause at will (rpc.error) writes its burst, then is
 * held back; the next line written says how many were suppressed.  Other
 * kinds are never limited. */
static void peer_caused_kinds_are_rate_limited(void **state) {
  fs_event ev;
  char drain[65536], line[FS_LOG_LINE_MAX + 1];
  int i, written = 0;
  (void)state;
  fs_log_init(FS_LOG_JSON, FS_LOG_INFO, "link", fds[1]);
  fcntl(fds[0], F_SETFL, O_NONBLOCK);
  for (i = 0; i < FS_LOG_BURST + 500; i++) {
    if (!fs_ev_begin(&ev, FS_LOG_WARN, "rpc.error")) continue;
    written++;
    fs_ev_end(&ev);
    if (i % 64 == 0)
      while (read(fds[0], drain, sizeof(drain)) > 0) {}
  }
  while (read(fds[0], drain, sizeof(drain)) > 0) {}
  /* The clock may tick during the loop: a few refills at FS_LOG_RATE. */
  assert_true(written >= FS_LOG_BURST && written < FS_LOG_BURST + 50);
  assert_true(fs_log_suppressed() >= 450);
  for (i = 0; i < FS_LOG_BURST + 500; i++) { /* node events are never limited */
    assert_true(fs_ev_begin(&ev, FS_LOG_INFO, "node.register"));
    fs_ev_end(&ev);
    if (i % 64 == 0)
      while (read(fds[0], drain, sizeof(drain)) > 0) {}
  }
  while (read(fds[0], drain, sizeof(drain)) > 0) {}
  usleep(1000 * 1000 / FS_LOG_RATE * 2);
  assert_true(fs_ev_begin(&ev, FS_LOG_WARN, "rpc.error"));
  fs_ev_end(&ev);
  fcntl(fds[0], F_SETFL, 0);
  read_line(line, sizeof(line));
  assert_non_null(strstr(line, ",\"suppressed\":"));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(peer_caused_kinds_are_rate_limited),
      cmocka_unit_test(envelope_and_types),
      cmocka_unit_test(escaping),
      cmocka_unit_test(long_values_are_cut_and_marked),
      cmocka_unit_test(text_format),
      cmocka_unit_test(full_output_drops_and_counts),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
