/* metrics: see metrics.h. */
#include "metrics.h"

#include "config.h"
#include "grpc.h"
#include "log.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Call duration buckets, in microseconds (durations are measured in
 * microseconds, shown in seconds): Fleet calls range from sub-millisecond
 * heartbeats to multi-second object transfers. */
static const uint64_t buckets_us[] = {100,    250,    500,    1000,    2500,    5000,    10000,    25000,   50000,
                                      100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000, 30000000};
#define NBUCKETS (sizeof(buckets_us) / sizeof(buckets_us[0]))

/* gRPC status codes as grpc-ecosystem's go-grpc-prometheus names them. */
static const char *const eco_codes[FS_GRPC_NSTATUS] = {
    "OK",       "Canceled",       "Unknown",          "InvalidArgument",   "DeadlineExceeded",
    "NotFound", "AlreadyExists",  "PermissionDenied", "ResourceExhausted", "FailedPrecondition",
    "Aborted",  "OutOfRange",     "Unimplemented",    "Internal",          "Unavailable",
    "DataLoss", "Unauthenticated"};

static struct {
  uint64_t calls[FS_FLEET_METHODS][FS_GRPC_NSTATUS];
  uint64_t hist[FS_FLEET_METHODS][NBUCKETS];
  uint64_t hist_count[FS_FLEET_METHODS];
  uint64_t hist_sum_us[FS_FLEET_METHODS];
  uint64_t bytes[FS_FLEET_METHODS][2];
} M;

void fs_metrics_reset(void) { memset(&M, 0, sizeof(M)); }

void fs_metrics_call(fs_fleet_method m, int status, uint64_t us, uint64_t bytes_in, uint64_t bytes_out) {
  size_t b;
  if ((int)m < 0 || m >= FS_FLEET_METHODS) m = FS_FLEET_NONE;
  if (status < 0 || status >= FS_GRPC_NSTATUS) status = FS_GRPC_UNKNOWN;
  M.calls[m][status]++;
  for (b = 0; b < NBUCKETS; b++)
    if (us <= buckets_us[b]) M.hist[m][b]++;
  M.hist_count[m]++;
  M.hist_sum_us[m] += us;
  M.bytes[m][0] += bytes_in;
  M.bytes[m][1] += bytes_out;
}

typedef struct out {
  char *p;
  size_t len, cap;
  int full;
} out;

static void put(out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(out *o, const char *fmt, ...) {
  va_list ap;
  int n;
  if (o->full) return;
  va_start(ap, fmt);
  n = vsnprintf(o->p + o->len, o->cap - o->len, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t)n >= o->cap - o->len) o->full = 1;
  else o->len += (size_t)n;
}

static void head(out *o, const char *name, const char *type, const char *help) {
  put(o, "# HELP flower_sidecar_%s %s\n# TYPE flower_sidecar_%s %s\n", name, help, name, type);
}

/* A family with one sample and no labels. */
static void scalar(out *o, const char *name, const char *type, const char *help, uint64_t v) {
  head(o, name, type, help);
  put(o, "flower_sidecar_%s %" PRIu64 "\n", name, v);
}

/* A bucket bound in seconds, as Prometheus clients print it ("0.0001"). */
static const char *le_str(char *buf, size_t cap, uint64_t us) {
  snprintf(buf, cap, "%g", (double)us / 1e6);
  return buf;
}

/* One histogram series per method: |name| with the label text |lab| of
 * method |m| (e.g. `method="PullMessages"`). */
static void histogram(out *o, const char *name, const char *lab, int m) {
  char le[32];
  size_t b;
  for (b = 0; b < NBUCKETS; b++)
    put(o, "%s_bucket{%s,le=\"%s\"} %" PRIu64 "\n", name, lab, le_str(le, sizeof(le), buckets_us[b]), M.hist[m][b]);
  put(o, "%s_bucket{%s,le=\"+Inf\"} %" PRIu64 "\n", name, lab, M.hist_count[m]);
  put(o, "%s_sum{%s} %" PRIu64 ".%06" PRIu64 "\n", name, lab, M.hist_sum_us[m] / 1000000, M.hist_sum_us[m] % 1000000);
  put(o, "%s_count{%s} %" PRIu64 "\n", name, lab, M.hist_count[m]);
}

/* The grpc-ecosystem labels of method |m|. */
static void eco_labels(char *buf, size_t cap, int m) {
  snprintf(buf, cap, "grpc_type=\"unary\",grpc_service=\"%s\",grpc_method=\"%s\"", m ? "flwr.proto.Fleet" : "other",
           fs_fleet_method_name((fs_fleet_method)m));
}

size_t fs_metrics_render(char *buf, size_t cap, const fs_metrics_sample *s) {
  out o = {buf, 0, cap, 0};
  int m, st;
  size_t b;
  if (s->version) {
    head(&o, "build_info", "gauge", "Always 1; the version in a label.");
    put(&o, "flower_sidecar_build_info{version=\"%s\"} 1\n", s->version);
  }
  scalar(&o, "connections", "gauge", "Downstream connections open now.", s->conns_current);
  scalar(&o, "connections_total", "counter", "Downstream connections accepted and set up.", s->conns_total);
  scalar(&o, "connections_refused_total", "counter", "Client connections closed at once: --max-connections reached.",
         s->conns_refused);
  scalar(&o, "calls_open", "gauge", "Calls open now (counted against --max-calls).", s->calls_open);
  scalar(&o, "calls_refused_total", "counter",
         "New calls refused with REFUSED_STREAM: --max-calls reached and no call idle for 2 s to give way.",
         s->calls_refused);
  scalar(&o, "calls_evicted_total", "counter",
         "Calls idle for 2 s or more ended RESOURCE_EXHAUSTED to admit a new one (--max-calls reached).",
         s->calls_evicted);
  head(&o, "buffer_pool_bytes", "gauge",
       "The pool stream windows beyond their first 16 KiB are taken from (--max-buffer): used, and its cap.");
  put(&o, "flower_sidecar_buffer_pool_bytes{state=\"used\"} %" PRIu64 "\n", s->buffer_pool_used);
  put(&o, "flower_sidecar_buffer_pool_bytes{state=\"cap\"} %" PRIu64 "\n", s->buffer_pool_cap);
  scalar(&o, "buffer_pool_refusals_total", "counter",
         "Stream windows left at 16 KiB for now because the pool was spent (the calls go on more slowly).",
         s->buffer_pool_refused);
  scalar(&o, "upstream_probes_total", "counter",
         "TCP probes of an upstream unreachable at the network level (--probe-interval).", s->probes);
  scalar(&o, "upstream_outages_total", "counter", "Upstream outages that ended (the upstream was up again).",
         s->outages);
  head(&o, "upstream_outage_seconds_total", "counter", "Time the upstream was down, summed over ended outages.");
  put(&o, "flower_sidecar_upstream_outage_seconds_total %.3f\n", s->outage_s);
  if (s->onegate) {
    head(&o, "onegate_requests_total", "counter",
         "OneGate requests by kind (publish: PUT /vm, discover: GET /service) and result (a discovery that finds no "
         "ready SuperLink yet is a failure).");
    put(&o, "flower_sidecar_onegate_requests_total{request=\"publish\",result=\"ok\"} %" PRIu64 "\n",
        s->onegate_publish_ok);
    put(&o, "flower_sidecar_onegate_requests_total{request=\"publish\",result=\"failed\"} %" PRIu64 "\n",
        s->onegate_publish_failed);
    put(&o, "flower_sidecar_onegate_requests_total{request=\"discover\",result=\"ok\"} %" PRIu64 "\n",
        s->onegate_discover_ok);
    put(&o, "flower_sidecar_onegate_requests_total{request=\"discover\",result=\"failed\"} %" PRIu64 "\n",
        s->onegate_discover_failed);
  }
  head(&o, "calls_total", "counter", "Calls finished, by method and gRPC status.");
  for (m = 0; m < FS_FLEET_METHODS; m++)
    for (st = 0; st < FS_GRPC_NSTATUS; st++)
      if (M.calls[m][st] || (st == 0 && m > 0))
        put(&o, "flower_sidecar_calls_total{method=\"%s\",status=\"%s\"} %" PRIu64 "\n",
            fs_fleet_method_name((fs_fleet_method)m), fs_grpc_status_name(st), M.calls[m][st]);
  head(&o, "call_duration_seconds", "histogram",
       "Call duration from request headers to the final status (measured in microseconds).");
  for (m = 0; m < FS_FLEET_METHODS; m++) {
    char lab[128];
    if (!M.hist_count[m] && m == 0) continue;
    snprintf(lab, sizeof(lab), "method=\"%s\"", fs_fleet_method_name((fs_fleet_method)m));
    histogram(&o, "flower_sidecar_call_duration_seconds", lab, m);
  }
  /* The same calls under go-grpc-prometheus's names. */
  put(&o, "# HELP grpc_server_handled_total Total number of RPCs completed on the server, regardless of success or "
          "failure.\n# TYPE grpc_server_handled_total counter\n");
  for (m = 0; m < FS_FLEET_METHODS; m++)
    for (st = 0; st < FS_GRPC_NSTATUS; st++)
      if (M.calls[m][st] || (st == 0 && m > 0)) {
        char lab[160];
        eco_labels(lab, sizeof(lab), m);
        put(&o, "grpc_server_handled_total{%s,grpc_code=\"%s\"} %" PRIu64 "\n", lab, eco_codes[st], M.calls[m][st]);
      }
  put(&o, "# HELP grpc_server_handling_seconds Histogram of response latency (seconds) of gRPC that had been "
          "application-level handled by the server.\n# TYPE grpc_server_handling_seconds histogram\n");
  for (m = 0; m < FS_FLEET_METHODS; m++) {
    char lab[160];
    if (!M.hist_count[m] && m == 0) continue;
    eco_labels(lab, sizeof(lab), m);
    histogram(&o, "grpc_server_handling_seconds", lab, m);
  }
  head(&o, "bytes_total", "counter", "gRPC payload bytes carried, by method; in = from the client, out = to it.");
  for (m = 0; m < FS_FLEET_METHODS; m++) {
    if (!M.hist_count[m] && m == 0) continue;
    put(&o, "flower_sidecar_bytes_total{method=\"%s\",direction=\"in\"} %" PRIu64 "\n",
        fs_fleet_method_name((fs_fleet_method)m), M.bytes[m][0]);
    put(&o, "flower_sidecar_bytes_total{method=\"%s\",direction=\"out\"} %" PRIu64 "\n",
        fs_fleet_method_name((fs_fleet_method)m), M.bytes[m][1]);
  }
  head(&o, "upstream_up", "gauge", "1 while an upstream HTTP/2 connection is established.");
  put(&o, "flower_sidecar_upstream_up %d\n", s->upstream_up ? 1 : 0);
  scalar(&o, "upstream_connects_total", "counter", "Upstream connection attempts.", s->upstream_connects);
  scalar(&o, "calls_held_total", "counter", "Calls that waited for an upstream connection.", s->calls_held);
  scalar(&o, "calls_failed_upstream_down_total", "counter",
         "Calls ended UNAVAILABLE because the upstream was unreachable or its connection was lost.",
         s->calls_failed_down);
  scalar(&o, "call_retries_total", "counter",
         "Calls the sidecar repeated (refused by the upstream, or side-effect free).", s->retries);
  scalar(&o, "keepalive_pings_total", "counter", "Keepalive PINGs sent to the upstream.", s->pings);
  head(&o, "upstream_ping_rtt_seconds", "gauge", "Round trip of the last keepalive PING.");
  if (s->ping_rtt_s > 0) put(&o, "flower_sidecar_upstream_ping_rtt_seconds %.6f\n", s->ping_rtt_s);
  scalar(&o, "tls_handshake_failures_total", "counter", "Failed TLS handshakes on the listener.", s->tls_failures);
  /* A timestamp, not a countdown: Prometheus subtracts time() itself. */
  head(&o, "tls_cert_not_after_seconds", "gauge",
       "Unix time a certificate in use expires (its notAfter): cert=server, the listener's (link); cert=upstream, the "
       "one the upstream presented on the current connection (node).");
  if (s->server_not_after)
    put(&o, "flower_sidecar_tls_cert_not_after_seconds{cert=\"server\"} %" PRId64 "\n", s->server_not_after);
  if (s->upstream_not_after)
    put(&o, "flower_sidecar_tls_cert_not_after_seconds{cert=\"upstream\"} %" PRId64 "\n", s->upstream_not_after);
  scalar(&o, "nodes_active", "gauge", "SuperNodes activated and not deactivated.", s->nodes_active);
  head(&o, "nodes", "gauge", "SuperNodes tracked, by state (as GET /v1/federation shows them).");
  for (st = 0; st < FS_NODE_NSTATES; st++)
    put(&o, "flower_sidecar_nodes{state=\"%s\"} %" PRIu64 "\n", fs_fed_node_state_name((fs_node_state)st),
        s->node_states ? s->node_states[st] : 0);
  head(&o, "run_round_open_seconds", "gauge",
       "How long the open round of each recent run has been running (absent: no round open).");
  for (b = 0; b < s->n_runs; b++)
    if (s->runs[b].open_since_ms)
      put(&o, "flower_sidecar_run_round_open_seconds{run_id=\"%" PRIu64 "\"} %.3f\n", s->runs[b].run_id,
          s->now_ms > s->runs[b].open_since_ms ? (double)(s->now_ms - s->runs[b].open_since_ms) / 1000.0 : 0.0);
  head(&o, "run_round", "gauge", "Latest server round of each recent run (-1: none seen).");
  for (b = 0; b < s->n_runs; b++)
    put(&o, "flower_sidecar_run_round{run_id=\"%" PRIu64 "\"} %" PRId64 "\n", s->runs[b].run_id, s->runs[b].round);
  head(&o, "run_messages_total", "counter",
       "Messages of each recent run (the 8 most recently active): instructions sent to nodes, replies, error replies.");
  for (b = 0; b < s->n_runs; b++) {
    put(&o, "flower_sidecar_run_messages_total{run_id=\"%" PRIu64 "\",kind=\"instruction\"} %" PRIu64 "\n",
        s->runs[b].run_id, s->runs[b].instructions);
    put(&o, "flower_sidecar_run_messages_total{run_id=\"%" PRIu64 "\",kind=\"reply\"} %" PRIu64 "\n", s->runs[b].run_id,
        s->runs[b].replies);
    put(&o, "flower_sidecar_run_messages_total{run_id=\"%" PRIu64 "\",kind=\"error_reply\"} %" PRIu64 "\n",
        s->runs[b].run_id, s->runs[b].error_replies);
  }
  head(&o, "health_serving", "gauge", "1 when grpc.health.v1 answers SERVING.");
  put(&o, "flower_sidecar_health_serving %d\n", s->serving ? 1 : 0);
  scalar(&o, "event_lines_dropped_total", "counter", "Event lines dropped because the output could not keep up.",
         s->dropped_lines);
  scalar(
      &o, "event_lines_suppressed_total", "counter",
      "Event lines a peer could cause at will (rpc.error, conn.*, tls.fail, fleet.undecoded) held back by their rate "
      "limit.",
      fs_log_suppressed());
  return o.full ? 0 : o.len;
}
