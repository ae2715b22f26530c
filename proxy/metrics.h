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
 * client and |bytes_out| to it. */
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
  const fs_fed_run *runs; /* most recent first */
  size_t n_runs;
  uint64_t calls_held, calls_failed_down, retries, pings;
  double ping_rtt_s; /* <= 0: not measured yet */
  uint64_t conns_refused;
  uint64_t now_ms;             /* fedstate's clock, for the age of open rounds */
  const uint64_t *node_states; /* FS_NODE_NSTATES counts, or NULL */
  int64_t cert_not_after[2];   /* Unix time: [0] the listener's (link), [1] the client's (node); 0 none */
} fs_metrics_sample;

/* Renders everything into |out| (capacity |cap|).  Returns the length, or
 * 0 when |cap| is too small. */
size_t fs_metrics_render(char *out, size_t cap, const fs_metrics_sample *s);

/* Forgets every count (tests). */
void fs_metrics_reset(void);

#endif
