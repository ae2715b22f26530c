/*
 * proxy: the gRPC data path.  Every downstream HTTP/2 stream becomes a
 * call that is forwarded, headers, DATA, trailers and resets, over a pool
 * of upstream HTTP/2 connections.
 *
 * Flow control is end to end: DATA is acknowledged (WINDOW_UPDATE) to its
 * sender only once the other side has taken it, so at most one stream
 * window per stream and direction is ever buffered, and a slow reader
 * slows only its own stream.
 */
#ifndef FS_PROXY_H
#define FS_PROXY_H

#include <openssl/ssl.h>
#include <stdint.h>
#include <uv.h>

#include "config.h"

typedef struct fs_proxy_stats {
  uint64_t conns_total, conns_current;
  uint64_t conns_refused; /* closed at once: --max-connections reached */
  uint64_t tls_failures;
  uint64_t upstream_connects;
  uint64_t calls_held;         /* waited for an upstream connection */
  uint64_t calls_failed_down;  /* ended UNAVAILABLE: upstream unreachable or lost */
  uint64_t retries;            /* calls repeated by the sidecar */
  uint64_t pings;              /* keepalive PINGs sent */
  uint64_t ping_rtt_us;        /* last PING round trip; 0 none yet */
  uint64_t probes;             /* TCP probes of an unreachable upstream */
  uint64_t outages, outage_ms; /* upstream outages ended, and their total duration */
  uint64_t calls_refused;      /* REFUSED_STREAM: --max-calls reached and every call moving */
  uint64_t calls_evicted;      /* ended RESOURCE_EXHAUSTED to admit a new call (--max-calls) */
} fs_proxy_stats;

/* The call and buffer budgets now (--max-calls, --max-buffer). */
typedef struct fs_proxy_budget_view {
  uint64_t calls_open, pool_used, pool_cap, pool_refused;
} fs_proxy_budget_view;
void fs_proxy_get_budget(fs_proxy_budget_view *v);

/* Starts listening on cfg->listen (fs_h2conn_global_init() first) and connecting to cfg->upstream.
 * |down_ctx| (listener TLS) and |up_ctx| (upstream TLS) may be NULL for
 * h2c; the proxy takes ownership of both.  |on_stopped| runs once the
 * proxy has fully stopped after fs_proxy_drain().  Returns 0, or -1 with a
 * one-line reason in |err|. */
int fs_proxy_start(uv_loop_t *loop, const fs_config *cfg, SSL_CTX *down_ctx, SSL_CTX *up_ctx, void (*on_stopped)(void),
                   char *err, size_t errlen);

/* A new TLS context from a certificate reload or renewal (tls.h): the
 * listener's (link) or the upstream's (node).  Takes ownership of |ctx|;
 * new connections use it, established ones keep theirs.  Freed at once
 * while draining or when that side has no TLS. */
void fs_proxy_set_tls(SSL_CTX *ctx);

/* Graceful shutdown: stop accepting, GOAWAY every connection, let calls
 * finish up to cfg->drain_timeout_s, then close everything. Idempotent. */
void fs_proxy_drain(void);

/* Nonzero while at least one upstream connection is established (its
 * SETTINGS arrived). */
int fs_proxy_upstream_up(void);
/* Nonzero while the upstream is down after announcing it (GOAWAY NO_ERROR). */
int fs_proxy_upstream_down_planned(void);
int fs_proxy_draining(void);
int fs_proxy_listening(void);
const fs_proxy_stats *fs_proxy_get_stats(void);
/* Why the upstream is not connected (last connect or connection error). */
const char *fs_proxy_upstream_error(void);
/* What the pool does about a down upstream now ("link down, probing every
 * 1 s", "next attempt in 16.0 s", ...), for health's reason. */
void fs_proxy_upstream_phase(char *out, size_t len);
/* Failed upstream connection attempts in a row while down. */
unsigned fs_proxy_upstream_failures(void);
/* Node role: connect to |endpoint| from now on, trusting |ca_b64| (base64
 * PEM; "" keeps the configured trust).  Returns 0 or -1 with a reason. */
int fs_proxy_retarget(const char *endpoint, const char *ca_b64, char *err, size_t errlen);
/* |cb| runs whenever listening, upstream_up or draining changes. */
void fs_proxy_on_state_change(void (*cb)(void));

#endif
