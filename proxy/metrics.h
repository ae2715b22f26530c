/*
 * metrics: Prometheus counters for /metrics (text format 0.0.4), names
 * prefixed flower_sidecar_, and the calls again under the grpc-ecosystem
 * names (grpc_server_handled_total, grpc_server_handling_seconds) so that
 * existing gRPC dashboards work.  Labels stay low-cardinality: method (the
 * 12 Fleet methods or "other"), gRPC status name, direction, node state,
 * certificate.  Fixed arrays, no allocation on the data path.
 */
#ifndef FS_METRICS_H
#define FS_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "fedstate.h"
#include "fleet.h"

/* A call ended with gRPC |status| (0..16; anything else counts as UNKNOWN)
 * after |duration_us| microseconds, having carried |bytes_in| from the
 * client and |bytes_out| to it.  Rendered under the sidecar's names and the
 * grpc-ecosystem ones (grpc_server_handled_total, grpc_server_handling_seconds). */
void fs_metrics_call(fs_fleet_method m, int status, uint64_t duration_us, uint64_t bytes_in, uint64_t bytes_out);

/* Gauges and counters owned by other modules, sampled when rendering. */
typedef struct fs_metrics_sample {
  uint64_t conns_current, conns_total;
  uint64_t tls_failures;
  int upstream_up;
  uint64_t upstream_connects;
  int serving;
  uint64_t dropped_lines;
  uint64_t nodes_active;
  const char *version;    /* build_info; NULL: not rendered */
  const fs_fed_run *runs; /* most recent first */
  size_t n_runs;
  uint64_t calls_held, calls_failed_down, retries, pings;
  double ping_rtt_s; /* <= 0: not measured yet */
  uint64_t conns_refused;
  uint64_t calls_open, calls_refused, calls_evicted;
  uint64_t buffer_pool_used, buffer_pool_cap, buffer_pool_refused;
  uint64_t probes, outages;
  double outage_s;
  int onegate; /* the OneGate client runs: its counters follow */
  uint64_t onegate_publish_ok, onegate_publish_failed, onegate_discover_ok, onegate_discover_failed;
  /* When a certificate expires (its notAfter, Unix time; 0: unknown): the
   * listener's server certificate (link), the certificate the upstream
   * presented on the current connection (node). */
  int64_t server_not_after, upstream_not_after;
  uint64_t now_ms;             /* fedstate's clock, for the age of open rounds */
  const uint64_t *node_states; /* FS_NODE_NSTATES counts, or NULL */
} fs_metrics_sample;

/* Renders everything into |out| (capacity |cap|).  Returns the length, or
 * 0 when |cap| is too small. */
size_t fs_metrics_render(char *out, size_t cap, const fs_metrics_sample *s);

/* Forgets every count (tests). */
void fs_metrics_reset(void);

#endif
