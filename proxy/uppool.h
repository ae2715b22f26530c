/*
 * uppool: the upstream side (nghttpx's Http2Session, ConnectBlocker and
 * DownstreamQueue in one small room): a pool of HTTP/2 connections to the
 * one upstream, opened on demand up to --upstream-conns, re-opened with
 * backoff when lost; the hold queue of calls waiting for a connection; the
 * upstream legs of calls (request out, response and trailers back); safe
 * repeats; keepalive PINGs and the stall probe.  Every decision is taken
 * by policy.h; this file gathers the facts and carries them out.
 *
 * One pool per process (the proxy has one upstream).
 */
#ifndef FS_UPPOOL_H
#define FS_UPPOOL_H

#include <openssl/ssl.h>
#include <stddef.h>
#include <stdint.h>

#include "call.h"

/* What differs between the roles, decided by their owner (proxy.c). */
typedef struct fs_uppool_options {
  /* Client TLS for upstream connections, NULL for h2c.  The pool frees it. */
  SSL_CTX *tls;
  /* PING the upstream while calls are open (keepalive_time_s/timeout_s of
   * the configuration, gRFC A8), and give its sockets TCP_USER_TIMEOUT. */
  int keepalive;
  /* Calls with a deadline that are safe to end UNAVAILABLE probe their
   * connection with a PING when they stall (policy.h). */
  int stall_probe;
  /* Runs when fs_uppool_up() changes. */
  void (*on_state_change)(void);
  /* Runs when the pool may have become idle (see fs_uppool_idle()). */
  void (*on_maybe_idle)(void);
} fs_uppool_options;

/* Sets the pool up for fs_env.cfg->upstream and starts the first
 * connection attempt.  Returns 0, or -1 with a one-line reason in |err|
 * (nothing to undo then). */
int fs_uppool_start(const fs_uppool_options *o, char *err, size_t errlen);

/* A call's request headers are complete: reads its deadline, then sends it
 * on a connection that can take it, or holds it (node role) or fails it
 * UNAVAILABLE when none can be had. */
void fs_uppool_route(fs_call *c);

/* Replaces the upstream TLS context (certificate reload): connections
 * opened from now on use |tls|, established ones keep theirs.  Takes
 * ownership of |tls|; freed at once when the pool has no TLS or stopped. */
void fs_uppool_set_tls(SSL_CTX *tls);

/* notAfter (seconds since the epoch) of the certificate the upstream
 * presented on the current (oldest established) TLS connection: 0, or -1
 * when no TLS connection is established. */
int fs_uppool_peer_not_after(int64_t *not_after);

/* Nonzero while an upstream connection is established (SETTINGS arrived). */
int fs_uppool_up(void);

/* Points the pool at |hostport| with client TLS |tls| (NULL: h2c; the pool
 * takes it, also on error): closes the connections to the old upstream and
 * connects now, backoff reset.  Returns 0, or -1 with a reason. */
int fs_uppool_retarget(const char *hostport, SSL_CTX *tls, char *err, size_t errlen);

/* Nonzero while the upstream is unreachable at the network level and
 * probed every --probe-interval (policy.h). */
int fs_uppool_probing(void);

/* Failed connection attempts and probes in a row while down (0 while up). */
unsigned fs_uppool_failures(void);

/* Nonzero while down after the upstream announced its going away
 * (GOAWAY NO_ERROR: a planned restart), for the level of health events. */
int fs_uppool_down_planned(void);

/* Why the upstream is not connected (last connect or connection error). */
const char *fs_uppool_error(void);

/* Draining: no more reconnects. */
void fs_uppool_drain(void);

/* Closes every connection (their calls end); fs_uppool_idle() becomes true
 * once they are freed and no name lookup runs. */
void fs_uppool_close_all(void);

/* Nonzero when no connection exists and no name lookup runs.  While a
 * lookup runs this cancels it (on_maybe_idle follows). */
int fs_uppool_idle(void);

/* Ends every held call, closes the timers and frees the callbacks and the
 * TLS context.  Call once, when idle. */
void fs_uppool_stop(void);

#endif
