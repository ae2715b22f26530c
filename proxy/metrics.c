/* metrics: see metrics.h. */
#include "metrics.h"

#include "grpc.h"
#include "log.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Call duration buckets, seconds, from durations measured in microseconds:
 * Fleet calls range from sub-millisecond heartbeats on loopback to
 * multi-second object transfers. */
static const double buckets[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                 0.1,    0.25,    0.5,    1,     2.5,    5,     10,   30};
#define NBUCKETS (sizeof(buckets) / sizeof(buckets[0]))

static struct {
  uint64_t calls[FS_FLEET_METHODS][FS_GRPC_NSTATUS];
  uint64_t hist[FS_FLEET_METHODS][NBUCKETS];
  uint64_t hist_count[FS_FLEET_METHODS];
  double hist_sum[FS_FLEET_METHODS];
  uint64_t bytes[FS_FLEET_METHODS][2];
} M;

void fs_metrics_reset(void) { memset(&M, 0, sizeof(M)); }

void fs_metrics_call(fs_fleet_method m, int status, uint64_t duration_us, uint64_t bytes_in, uint64_t bytes_out) {
  double s = (double)duration_us / 1e6;
  size_t b;
  if ((int)m < 0 || m >= FS_FLEET_METHODS) m = FS_FLEET_NONE;
  if (status < 0 || status >= FS_GRPC_NSTATUS) status = FS_GRPC_UNKNOWN;
  M.calls[m][status]++;
  for (b = 0; b < NBUCKETS; b++)
    if (s <= buckets[b]) M.hist[m][b]++;
  M.hist_count[m]++;
  M.hist_sum[m] += s;
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

size_t fs_metrics_render(char *buf, size_t cap, const fs_metrics_sample *s) {
  out o = {buf, 0, cap, 0};
  int m, st;
  size_t b;
  if (s->version) {
    head(&o, "build_info", "gauge", "Always 1; the version in a label.");
    put(&o, "flower_sidecar_build_info{version=\"%s\"} 1\n", s->version);
  }
  head(&o, "connections", "gauge", "Downstream connections open now.");
  put(&o, "flower_sidecar_connections %" PRIu64 "\n", s->conns_current);
  head(&o, "connections_total", "counter", "Downstream connections accepted and set up.");
  put(&o, "flower_sidecar_connections_total %" PRIu64 "\n", s->conns_total);
  head(&o, "connections_refused_total", "counter", "Client connections closed at once: --max-connections reached.");
  put(&o, "flower_sidecar_connections_refused_total %" PRIu64 "\n", s->conns_refused);
  head(&o, "upstream_probes_total", "counter",
       "TCP probes of an upstream unreachable at the network level (--probe-interval).");
  put(&o, "flower_sidecar_upstream_probes_total %" PRIu64 "\n", s->probes);
  head(&o, "upstream_outages_total", "counter", "Upstream outages that ended (the upstream was up again).");
  put(&o, "flower_sidecar_upstream_outages_total %" PRIu64 "\n", s->outages);
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
  head(&o, "call_duration_seconds", "histogram", "Call duration from request headers to the final status.");
  for (m = 0; m < FS_FLEET_METHODS; m++) {
    const char *name = fs_fleet_method_name((fs_fleet_method)m);
    if (!M.hist_count[m] && m == 0) continue;
    for (b = 0; b < NBUCKETS; b++)
      put(&o, "flower_sidecar_call_duration_seconds_bucket{method=\"%s\",le=\"%g\"} %" PRIu64 "\n", name, buckets[b],
          M.hist[m][b]);
    put(&o, "flower_sidecar_call_duration_seconds_bucket{method=\"%s\",le=\"+Inf\"} %" PRIu64 "\n", name,
        M.hist_count[m]);
    put(&o, "flower_sidecar_call_duration_seconds_sum{method=\"%s\"} %.6f\n", name, M.hist_sum[m]);
    put(&o, "flower_sidecar_call_duration_seconds_count{method=\"%s\"} %" PRIu64 "\n", name, M.hist_count[m]);
  }
  /* The same, under the names of go-grpc-prometheus / grpc-ecosystem, so
   * existing gRPC dashboards work (all Fleet methods are unary). */
  put(&o, "# HELP grpc_server_handled_total Calls finished, by method and gRPC status (grpc-ecosystem names).\n"
          "# TYPE grpc_server_handled_total counter\n");
  for (m = 0; m < FS_FLEET_METHODS; m++)
    for (st = 0; st < FS_GRPC_NSTATUS; st++)
      if (M.calls[m][st] || (st == 0 && m > 0))
        put(&o,
            "grpc_server_handled_total{grpc_type=\"%s\",grpc_service=\"%s\",grpc_method=\"%s\",grpc_code=\"%s\"} "
            "%" PRIu64 "\n",
            m ? "unary" : "unknown", m ? "flwr.proto.Fleet" : "unknown",
            m ? fs_fleet_method_name((fs_fleet_method)m) : "unknown", fs_grpc_status_name(st), M.calls[m][st]);
  put(&o, "# HELP grpc_server_handling_seconds Call duration (grpc-ecosystem names).\n"
          "# TYPE grpc_server_handling_seconds histogram\n");
  for (m = 0; m < FS_FLEET_METHODS; m++) {
    char lbl[160];
    if (!M.hist_count[m] && m == 0) continue;
    snprintf(lbl, sizeof(lbl), "grpc_type=\"%s\",grpc_service=\"%s\",grpc_method=\"%s\"", m ? "unary" : "unknown",
             m ? "flwr.proto.Fleet" : "unknown", m ? fs_fleet_method_name((fs_fleet_method)m) : "unknown");
    for (b = 0; b < NBUCKETS; b++)
      put(&o, "grpc_server_handling_seconds_bucket{%s,le=\"%g\"} %" PRIu64 "\n", lbl, buckets[b], M.hist[m][b]);
    put(&o, "grpc_server_handling_seconds_bucket{%s,le=\"+Inf\"} %" PRIu64 "\n", lbl, M.hist_count[m]);
    put(&o, "grpc_server_handling_seconds_sum{%s} %.6f\n", lbl, M.hist_sum[m]);
    put(&o, "grpc_server_handling_seconds_count{%s} %" PRIu64 "\n", lbl, M.hist_count[m]);
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
  head(&o, "upstream_connects_total", "counter", "Upstream connection attempts.");
  put(&o, "flower_sidecar_upstream_connects_total %" PRIu64 "\n", s->upstream_connects);
  head(&o, "calls_held_total", "counter", "Calls that waited for an upstream connection.");
  put(&o, "flower_sidecar_calls_held_total %" PRIu64 "\n", s->calls_held);
  head(&o, "calls_failed_upstream_down_total", "counter",
       "Calls ended UNAVAILABLE because the upstream was unreachable or its connection was lost.");
  put(&o, "flower_sidecar_calls_failed_upstream_down_total %" PRIu64 "\n", s->calls_failed_down);
  head(&o, "call_retries_total", "counter",
       "Calls the sidecar repeated (refused by the upstream, or side-effect free).");
  put(&o, "flower_sidecar_call_retries_total %" PRIu64 "\n", s->retries);
  head(&o, "keepalive_pings_total", "counter", "Keepalive PINGs sent to the upstream.");
  put(&o, "flower_sidecar_keepalive_pings_total %" PRIu64 "\n", s->pings);
  head(&o, "upstream_ping_rtt_seconds", "gauge", "Round trip of the last keepalive PING.");
  if (s->ping_rtt_s > 0) put(&o, "flower_sidecar_upstream_ping_rtt_seconds %.6f\n", s->ping_rtt_s);
  head(&o, "tls_handshake_failures_total", "counter", "Failed TLS handshakes on the listener.");
  put(&o, "flower_sidecar_tls_handshake_failures_total %" PRIu64 "\n", s->tls_failures);
  head(&o, "cert_expiry_seconds", "gauge",
       "Seconds until a certificate expires: cert=server, the listener's (link); cert=upstream, the one the upstream "
       "presented on the current connection (node).");
  if (s->has_server_expiry) put(&o, "flower_sidecar_cert_expiry_seconds{cert=\"server\"} %.0f\n", s->server_expiry_s);
  if (s->has_upstream_expiry)
    put(&o, "flower_sidecar_cert_expiry_seconds{cert=\"upstream\"} %.0f\n", s->upstream_expiry_s);
  head(&o, "nodes_active", "gauge", "SuperNodes activated and not deactivated.");
  put(&o, "flower_sidecar_nodes_active %" PRIu64 "\n", s->nodes_active);
  head(&o, "nodes_offline", "gauge",
       "Active SuperNodes silent for more than twice their heartbeat interval (link role, node.offline).");
  put(&o, "flower_sidecar_nodes_offline %" PRIu64 "\n", s->nodes_offline);
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
  head(&o, "event_lines_dropped_total", "counter", "Event lines dropped because the output could not keep up.");
  put(&o, "flower_sidecar_event_lines_dropped_total %" PRIu64 "\n", s->dropped_lines);
  head(&o, "event_lines_suppressed_total", "counter",
       "Event lines a peer could cause at will (rpc.error, conn.*, tls.fail, fleet.undecoded) held back by their rate "
       "limit.");
  put(&o, "flower_sidecar_event_lines_suppressed_total %" PRIu64 "\n", fs_log_suppressed());
  return o.full ? 0 : o.len;
}
