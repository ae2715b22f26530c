/* Unit tests: the Prometheus text rendering of metrics.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "config.h"
#include "fleet.h"
#include "metrics.h"

static char out[256 * 1024];

static const fs_fed_run runs[2] = {
    {.run_id = 18446744073709551615ull,
     .round = 3,
     .instructions = 6,
     .replies = 5,
     .error_replies = 1,
     .last_ms = 9,
     .open_since_ms = 500},
    {.run_id = 42, .round = -1, .instructions = 0, .replies = 0, .error_replies = 0, .last_ms = 1},
};

static const uint64_t node_states[FS_NODE_NSTATES] = {4, 3, 2, 1};

static const fs_metrics_sample sample = {
    .conns_current = 3,
    .conns_total = 17,
    .tls_failures = 2,
    .upstream_up = 1,
    .upstream_connects = 4,
    .serving = 1,
    .dropped_lines = 5,
    .nodes_active = 2,
    .runs = runs,
    .n_runs = 2,
    .calls_held = 7,
    .calls_failed_down = 3,
    .retries = 2,
    .pings = 11,
    .ping_rtt_s = 0.0125,
    .server_not_after = 1798761600,
    .calls_open = 12,
    .calls_refused = 5,
    .calls_evicted = 6,
    .buffer_pool_used = 1000,
    .buffer_pool_cap = 67108864,
    .buffer_pool_refused = 9,
    .now_ms = 2750,
    .node_states = node_states,
    .version = "1.2.3",
};

static size_t render(void) {
  size_t n = fs_metrics_render(out, sizeof(out), &sample);
  assert_true(n > 0 && n < sizeof(out));
  out[n] = '\0';
  return n;
}

/* |line| is one whole line of the output. */
static void has_line(const char *line) {
  char pat[512];
  snprintf(pat, sizeof(pat), "\n%s\n", line);
  if (!strstr(out, pat) && strncmp(out, pat + 1, strlen(pat + 1)) != 0) fail_msg("missing line: %s", line);
}

static void no_line_starting(const char *prefix) {
  char pat[512];
  snprintf(pat, sizeof(pat), "\n%s", prefix);
  if (strstr(out, pat)) fail_msg("unexpected line starting with %s", prefix);
}

static int setup(void **state) {
  (void)state;
  fs_metrics_reset();
  return 0;
}

static void counters_after_calls(void **state) {
  (void)state;
  /* durations in microseconds */
  fs_metrics_call(FS_FLEET_PULL_MESSAGES, 0, 3000, 100, 200);
  fs_metrics_call(FS_FLEET_PULL_MESSAGES, 0, 2000, 10, 20);
  fs_metrics_call(FS_FLEET_PUSH_OBJECT, 14, 2000000, 5000000, 7);
  fs_metrics_call(FS_FLEET_PUSH_OBJECT, 0, 40000000, 1, 2);    /* beyond the last bucket */
  fs_metrics_call(FS_FLEET_GET_RUN, 99, 1000, 0, 0);           /* not a gRPC status: UNKNOWN */
  fs_metrics_call(FS_FLEET_NONE, 5, 0, 7, 8);                  /* a non-Fleet call */
  fs_metrics_call(FS_FLEET_SEND_NODE_HEARTBEAT, 0, 180, 0, 0); /* 0.18 ms: a millisecond clock would say 0 */
  fs_metrics_call(FS_FLEET_SEND_NODE_HEARTBEAT, 0, 1, 0, 0);
  render();
  has_line("# TYPE flower_sidecar_calls_total counter");
  has_line("flower_sidecar_calls_total{method=\"PullMessages\",status=\"OK\"} 2");
  has_line("flower_sidecar_calls_total{method=\"PushObject\",status=\"UNAVAILABLE\"} 1");
  has_line("flower_sidecar_calls_total{method=\"PushObject\",status=\"OK\"} 1");
  has_line("flower_sidecar_calls_total{method=\"GetRun\",status=\"UNKNOWN\"} 1");
  has_line("flower_sidecar_calls_total{method=\"GetRun\",status=\"OK\"} 0");
  has_line("flower_sidecar_calls_total{method=\"other\",status=\"NOT_FOUND\"} 1");
  /* every Fleet method is there from the start (OK 0), so rate() works */
  has_line("flower_sidecar_calls_total{method=\"ConfirmMessageReceived\",status=\"OK\"} 0");
  no_line_starting("flower_sidecar_calls_total{method=\"other\",status=\"OK\"}");
  no_line_starting("flower_sidecar_calls_total{method=\"PullMessages\",status=\"CANCELLED\"}");

  has_line("flower_sidecar_bytes_total{method=\"PullMessages\",direction=\"in\"} 110");
  has_line("flower_sidecar_bytes_total{method=\"PullMessages\",direction=\"out\"} 220");
  has_line("flower_sidecar_bytes_total{method=\"PushObject\",direction=\"in\"} 5000001");
  has_line("flower_sidecar_bytes_total{method=\"other\",direction=\"out\"} 8");

  has_line("# TYPE flower_sidecar_call_duration_seconds histogram");
  has_line("flower_sidecar_call_duration_seconds_bucket{method=\"PullMessages\",le=\"0.001\"} 0");
  has_line("flower_sidecar_call_duration_seconds_bucket{method=\"PullMessages\",le=\"0.0025\"} 1");
  has_line("flower_sidecar_call_duration_seconds_bucket{method=\"PullMessages\",le=\"0.005\"} 2");
  has_line("flower_sidecar_call_duration_seconds_bucket{method=\"PullMessages\",le=\"+Inf\"} 2");
  has_line("flower_sidecar_call_duration_seconds_sum{method=\"PullMessages\"} 0.005000");
  has_line("flower_sidecar_call_duration_seconds_count{method=\"PullMessages\"} 2");
  has_line("flower_sidecar_call_duration_seconds_bucket{method=\"PushObject\",le=\"2.5\"} 1");
  has_line("flower_sidecar_call_duration_seconds_bucket{method=\"PushObject\",le=\"30\"} 1");
  has_line("flower_sidecar_call_duration_seconds_bucket{method=\"PushObject\",le=\"+Inf\"} 2");
  /* a bucket's bound is inclusive: 1 ms is in le="0.001" */
  has_line("flower_sidecar_call_duration_seconds_bucket{method=\"GetRun\",le=\"0.001\"} 1");
  has_line("flower_sidecar_connections 3");
  has_line("flower_sidecar_calls_open 12");
  has_line("flower_sidecar_calls_refused_total 5");
  has_line("flower_sidecar_calls_evicted_total 6");
  has_line("flower_sidecar_buffer_pool_bytes{state=\"used\"} 1000");
  has_line("flower_sidecar_buffer_pool_bytes{state=\"cap\"} 67108864");
  has_line("flower_sidecar_buffer_pool_refusals_total 9");
  has_line("flower_sidecar_connections_total 17");
  has_line("flower_sidecar_upstream_up 1");
  has_line("flower_sidecar_upstream_connects_total 4");
  has_line("flower_sidecar_tls_handshake_failures_total 2");
  has_line("flower_sidecar_nodes_active 2");
  has_line("flower_sidecar_health_serving 1");
  has_line("flower_sidecar_event_lines_dropped_total 5");
  has_line("flower_sidecar_run_round{run_id=\"18446744073709551615\"} 3");
  has_line("flower_sidecar_run_round{run_id=\"42\"} -1");
  has_line("flower_sidecar_calls_held_total 7");
  has_line("flower_sidecar_calls_failed_upstream_down_total 3");
  has_line("flower_sidecar_call_retries_total 2");
  has_line("flower_sidecar_keepalive_pings_total 11");
  has_line("flower_sidecar_upstream_ping_rtt_seconds 0.012500");
  has_line("flower_sidecar_run_messages_total{run_id=\"18446744073709551615\",kind=\"instruction\"} 6");
  has_line("flower_sidecar_run_messages_total{run_id=\"18446744073709551615\",kind=\"reply\"} 5");
  has_line("flower_sidecar_run_messages_total{run_id=\"18446744073709551615\",kind=\"error_reply\"} 1");
  has_line("flower_sidecar_run_messages_total{run_id=\"42\",kind=\"reply\"} 0");

  /* sub-millisecond calls land in sub-millisecond buckets, the sum keeps microseconds */
  has_line("flower_sidecar_call_duration_seconds_bucket{method=\"SendNodeHeartbeat\",le=\"0.0001\"} 1");
  has_line("flower_sidecar_call_duration_seconds_bucket{method=\"SendNodeHeartbeat\",le=\"0.00025\"} 2");
  has_line("flower_sidecar_call_duration_seconds_sum{method=\"SendNodeHeartbeat\"} 0.000181");
  /* the same calls under the grpc-ecosystem names */
  has_line("# TYPE grpc_server_handled_total counter");
  has_line(
      "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"flwr.proto.Fleet\",grpc_method=\"PullMessages\","
      "grpc_code=\"OK\"} 2");
  has_line("grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"flwr.proto.Fleet\",grpc_method=\"PushObject\","
           "grpc_code=\"Unavailable\"} 1");
  has_line("grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"flwr.proto.Fleet\",grpc_method=\"GetRun\","
           "grpc_code=\"Unknown\"} 1");
  has_line("grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"other\",grpc_method=\"other\","
           "grpc_code=\"NotFound\"} 1");
  has_line("# TYPE grpc_server_handling_seconds histogram");
  has_line("grpc_server_handling_seconds_bucket{grpc_type=\"unary\",grpc_service=\"flwr.proto.Fleet\","
           "grpc_method=\"PushObject\",le=\"2.5\"} 1");
  has_line("grpc_server_handling_seconds_count{grpc_type=\"unary\",grpc_service=\"flwr.proto.Fleet\","
           "grpc_method=\"PushObject\"} 2");
  has_line("grpc_server_handling_seconds_sum{grpc_type=\"unary\",grpc_service=\"flwr.proto.Fleet\","
           "grpc_method=\"PushObject\"} 42.000000");

  has_line("flower_sidecar_build_info{version=\"1.2.3\"} 1");
  has_line("flower_sidecar_nodes{state=\"active\"} 4");
  has_line("flower_sidecar_nodes{state=\"late\"} 3");
  has_line("flower_sidecar_nodes{state=\"offline\"} 2");
  has_line("flower_sidecar_nodes{state=\"deactivated\"} 1");
  /* the open round of the first run started at 500, now is 2750; the other run has none */
  has_line("flower_sidecar_run_round_open_seconds{run_id=\"18446744073709551615\"} 2.250");
  no_line_starting("flower_sidecar_run_round_open_seconds{run_id=\"42\"}");
}

/* For every histogram series: buckets in increasing le, counts never
 * decreasing, +Inf last and equal to _count. */
static void histogram_buckets_monotonic(void **state) {
  static const fs_fleet_method ms[] = {FS_FLEET_REGISTER_NODE, FS_FLEET_PULL_MESSAGES, FS_FLEET_PULL_OBJECT,
                                       FS_FLEET_SEND_NODE_HEARTBEAT, FS_FLEET_NONE};
  /* microseconds */
  static const uint64_t durations[] = {0,       1,       99,       100,      101,      250,          251,     999,
                                       1000,    1001,    2000,     3000,     7000,     10000,        24000,   26000,
                                       99000,   100000,  101000,   250000,   999000,   1000000,      1000001, 4999000,
                                       5000000, 9999000, 29999000, 30000000, 30000001, 3600000000ull};
  char *line, *save = NULL;
  char cur[64] = "";
  double last_le = -1;
  uint64_t last_count = 0, inf = 0;
  int buckets = 0, series = 0;
  size_t i, j;
  (void)state;
  for (i = 0; i < sizeof(ms) / sizeof(ms[0]); i++)
    for (j = 0; j < sizeof(durations) / sizeof(durations[0]); j++)
      if ((i + j) % 3) fs_metrics_call(ms[i], (int)(j % 17), durations[j] * 1000, j, i); /* ms -> µs */
  render();
  for (line = strtok_r(out, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
    char method[64], le[32];
    unsigned long long v;
    if (sscanf(line, "flower_sidecar_call_duration_seconds_bucket{method=\"%63[^\"]\",le=\"%31[^\"]\"} %llu", method,
               le, &v) == 3) {
      if (strcmp(method, cur)) {
        assert_int_equal(cur[0] == 0 || inf != 0 || last_count == 0, 1);
        snprintf(cur, sizeof(cur), "%s", method);
        last_le = -1, last_count = 0, inf = 0, buckets = 0;
        series++;
      }
      assert_int_equal(inf, 0); /* nothing after +Inf */
      assert_true(v >= last_count);
      last_count = v;
      buckets++;
      if (!strcmp(le, "+Inf")) {
        inf = v;
        assert_int_equal(buckets, 18); /* 17 bounds from 100 µs to 30 s, and +Inf */
      } else {
        double d = strtod(le, NULL);
        assert_true(d > last_le);
        last_le = d;
      }
    } else if (sscanf(line, "flower_sidecar_call_duration_seconds_count{method=\"%63[^\"]\"} %llu", method, &v) == 2) {
      assert_string_equal(method, cur);
      assert_true(v == inf);
      assert_true(v == last_count);
    }
  }
  /* the 12 Fleet methods always, plus "other" once it has calls */
  assert_int_equal(series, 13);
}

/* Every metric has its # HELP and # TYPE once, right before its samples;
 * sample lines are name{labels} value. */
static void exposition_format(void **state) {
  char *line, *save = NULL;
  char family[128] = "";
  int helps = 0, types = 0;
  (void)state;
  fs_metrics_call(FS_FLEET_GET_FAB, 0, 12000, 3, 4);
  render();
  assert_int_equal(out[strlen(out) - 1], '\n');
  for (line = strtok_r(out, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
    char name[128], type[32];
    if (!strncmp(line, "# HELP ", 7)) {
      assert_int_equal(strncmp(line, "# HELP flower_sidecar_", 22) && strncmp(line, "# HELP grpc_server_", 19), 0);
      assert_int_equal(sscanf(line, "# HELP %127s", name), 1);
      snprintf(family, sizeof(family), "%s", name);
      helps++;
      continue;
    }
    if (!strncmp(line, "# TYPE ", 7)) {
      assert_int_equal(sscanf(line, "# TYPE %127s %31s", name, type), 2);
      assert_string_equal(name, family);
      assert_true(!strcmp(type, "counter") || !strcmp(type, "gauge") || !strcmp(type, "histogram"));
      types++;
      continue;
    }
    assert_int_equal(strncmp(line, family, strlen(family)), 0);
    assert_true(!strncmp(line, "flower_sidecar_", 15) || !strncmp(line, "grpc_server_", 12));
    assert_non_null(strrchr(line, ' '));
  }
  assert_int_equal(helps, types);
  assert_int_equal(helps, 34); /* every family, build_info included (the sample has a version) */
}

/* build_info carries the version, and is absent without one. */
static void build_info_only_with_a_version(void **state) {
  static char buf[256 * 1024];
  fs_metrics_sample smp;
  (void)state;
  memset(&smp, 0, sizeof(smp));
  assert_true(fs_metrics_render(buf, sizeof(buf), &smp) > 0);
  assert_null(strstr(buf, "build_info"));
  smp.version = "9.8.7";
  assert_true(fs_metrics_render(buf, sizeof(buf), &smp) > 0);
  assert_non_null(strstr(buf, "\nflower_sidecar_build_info{version=\"9.8.7\"} 1\n"));
}

/* Certificate expiry: a sample only for the certificates that are known. */
static void cert_expiry_only_when_known(void **state) {
  fs_metrics_sample s = sample;
  size_t n;
  (void)state;
  render();
  has_line("# TYPE flower_sidecar_tls_cert_not_after_seconds gauge");
  has_line("flower_sidecar_tls_cert_not_after_seconds{cert=\"server\"} 1798761600");
  no_line_starting("flower_sidecar_tls_cert_not_after_seconds{cert=\"upstream\"}");
  s.server_not_after = 0;
  s.upstream_not_after = 946684800; /* 2000-01-01: long expired, still shown as it is */
  n = fs_metrics_render(out, sizeof(out), &s);
  assert_true(n > 0 && n < sizeof(out));
  out[n] = '\0';
  has_line("flower_sidecar_tls_cert_not_after_seconds{cert=\"upstream\"} 946684800");
  no_line_starting("flower_sidecar_tls_cert_not_after_seconds{cert=\"server\"}");
}

static void small_buffer_gives_zero(void **state) {
  char small[64];
  (void)state;
  assert_int_equal(fs_metrics_render(small, sizeof(small), &sample), 0);
  assert_int_equal(fs_metrics_render(small, 0, &sample), 0);
}

static void reset_forgets(void **state) {
  (void)state;
  fs_metrics_call(FS_FLEET_PULL_OBJECT, 0, 1000, 1, 1);
  fs_metrics_reset();
  render();
  has_line("flower_sidecar_calls_total{method=\"PullObject\",status=\"OK\"} 0");
  has_line("flower_sidecar_call_duration_seconds_count{method=\"PullObject\"} 0");
  no_line_starting("flower_sidecar_bytes_total{method=\"other\"");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup(counters_after_calls, setup),
      cmocka_unit_test_setup(histogram_buckets_monotonic, setup),
      cmocka_unit_test_setup(exposition_format, setup),
      cmocka_unit_test_setup(small_buffer_gives_zero, setup),
      cmocka_unit_test_setup(reset_forgets, setup),
      cmocka_unit_test_setup(cert_expiry_only_when_known, setup),
      cmocka_unit_test_setup(build_info_only_with_a_version, setup),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
