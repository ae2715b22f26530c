/* Unit tests: configuration parsing, defaults and the exit-2 messages. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "config.h"

static int parse(fs_config *c, char *err, const char *a1, const char *a2, const char *a3) {
  char *argv[5] = {"flower-sidecar", (char *)a1, (char *)a2, (char *)a3, NULL};
  int argc = 1 + (a1 != NULL) + (a2 != NULL) + (a3 != NULL);
  return fs_config_parse(c, argc, argv, err, 256);
}

static void link_defaults(void **state) {
  fs_config c;
  char err[256];
  (void)state;
  assert_int_equal(parse(&c, err, "link", NULL, NULL), 0);
  assert_string_equal(c.listen, "0.0.0.0:9092");
  assert_string_equal(c.upstream, "127.0.0.1:9192");
  assert_string_equal(c.admin, "127.0.0.1:9099");
  assert_int_equal(c.tls, 1);
  assert_int_equal(c.max_message_size, 2147483647u);
  assert_true(c.drain_timeout_s == 10);
  assert_true(c.hold_timeout_s == 0 && c.retry_buffer == 0); /* the link fails fast, never repeats */
}

static void node_requires_upstream(void **state) {
  fs_config c;
  char err[256];
  (void)state;
  assert_int_equal(parse(&c, err, "node", NULL, NULL), -1);
  assert_non_null(strstr(err, "--upstream"));
  assert_int_equal(parse(&c, err, "node", "--upstream", "superlink.example:9092"), 0);
  assert_string_equal(c.listen, "127.0.0.1:9092");
  assert_true(c.backoff_initial_s == 10 && c.backoff_max_s == 300);
  assert_true(c.hold_timeout_s == 20 && c.retry_buffer == 8u << 20 && c.connect_timeout_s == 20);
  assert_true(c.keepalive_time_s == 30 && c.keepalive_timeout_s == 10);
}

/* Every bad value names the flag and echoes the value. */
static void bad_values_name_flag_and_value(void **state) {
  static const char *cases[][3] = {
      {"--listen", "nonsense", "--listen"},
      {"--listen", "1.2.3.4:99999", "--listen"},
      {"--max-message-size", "-1", "--max-message-size"},
      {"--log-level", "LOUD", "--log-level"},
      {"--drain-timeout", "soon", "--drain-timeout"},
      {"--stream-window", "1", "--stream-window"},
      {"--tls-san", "a b", "--tls-san"},
      {"--hold-timeout", "301", "--hold-timeout"}, /* past the SuperLink's ~300 s window */
      {"--hold-timeout", "-1", "--hold-timeout"},
      {"--retry-buffer", "65M", "--retry-buffer"},
      {"--keepalive-time", "0.5", "--keepalive-time"},
  };
  size_t i;
  (void)state;
  for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    fs_config c;
    char err[256] = "";
    assert_int_equal(parse(&c, err, "link", cases[i][0], cases[i][1]), -1);
    assert_non_null(strstr(err, cases[i][2]));
    assert_non_null(strstr(err, cases[i][1]));
  }
}

static void unknown_flag_and_role(void **state) {
  fs_config c;
  char err[256];
  (void)state;
  assert_int_equal(parse(&c, err, "link", "--bogus", NULL), -1);
  assert_non_null(strstr(err, "--bogus"));
  assert_int_equal(parse(&c, err, "relay", NULL, NULL), -1);
  assert_non_null(strstr(err, "relay"));
  assert_int_equal(parse(&c, err, NULL, NULL, NULL), -1);
}

static void variables_and_flag_precedence(void **state) {
  fs_config c;
  char err[256];
  (void)state;
  setenv("FL_LOG_LEVEL", "DEBUG", 1);
  setenv("FL_TLS_ENABLED", "NO", 1);
  assert_int_equal(parse(&c, err, "link", NULL, NULL), 0);
  assert_int_equal(c.log_level, FS_LOG_DEBUG);
  assert_int_equal(c.tls, 0);
  assert_int_equal(parse(&c, err, "link", "--log-level", "ERROR"), 0);
  assert_int_equal(c.log_level, FS_LOG_ERROR); /* the flag wins */
  setenv("FL_TLS_ENABLED", "maybe", 1);
  assert_int_equal(parse(&c, err, "link", NULL, NULL), -1);
  assert_non_null(strstr(err, "FL_TLS_ENABLED"));
  assert_non_null(strstr(err, "maybe"));
  unsetenv("FL_TLS_ENABLED");
  unsetenv("FL_LOG_LEVEL");
}

static void cert_needs_key(void **state) {
  fs_config c;
  char err[256];
  (void)state;
  assert_int_equal(parse(&c, err, "link", "--tls-cert", "/etc/x.pem"), -1);
  assert_non_null(strstr(err, "--tls-key"));
}

static void hostport_forms(void **state) {
  char host[64];
  int port;
  (void)state;
  assert_int_equal(fs_hostport_split("[::1]:9092", host, sizeof(host), &port), 0);
  assert_string_equal(host, "::1");
  assert_int_equal(port, 9092);
  assert_int_equal(fs_hostport_split(":80", host, sizeof(host), &port), 0);
  assert_string_equal(host, "");
  assert_int_equal(fs_hostport_split("::1:9092", host, sizeof(host), &port), -1);
  assert_int_equal(fs_hostport_split("host:0", host, sizeof(host), &port), -1);
  assert_int_equal(fs_hostport_split("host", host, sizeof(host), &port), -1);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(link_defaults),
      cmocka_unit_test(node_requires_upstream),
      cmocka_unit_test(bad_values_name_flag_and_value),
      cmocka_unit_test(unknown_flag_and_role),
      cmocka_unit_test(variables_and_flag_precedence),
      cmocka_unit_test(cert_needs_key),
      cmocka_unit_test(hostport_forms),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
