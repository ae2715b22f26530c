/*
 * upconn: what the two halves of the upstream side share (internal to it):
 * uppool.c owns the connections (connect, resolve, reconnect, keepalive,
 * SETTINGS/PING/GOAWAY), upcall.c the calls on them (sending a call, the
 * hold queue, repeats, the stall probe, response and trailers back).
 */
#ifndef FS_UPCONN_H
#define FS_UPCONN_H

#include <stdint.h>

#include "call.h"
#include "keepalive.h"
#include "uppool.h"

typedef struct fs_upconn {
  fs_pconn pc; /* first: an fs_upconn* is an fs_pconn* and an fs_h2conn* */
  uint8_t ready, goaway;
  uint8_t tcp_ok;    /* the TCP handshake completed */
  uint8_t was_ready; /* SETTINGS arrived once: an established connection, not an attempt */
  uint8_t unreached; /* failed without reaching the upstream's process (policy.h) */
  fs_keepalive ka;
  uint64_t ping_t0;     /* when our outstanding PING was sent (µs), for its round trip; 0: none */
  uint64_t ping_ack_ms; /* when the last PING ACK arrived (loop clock); 0: never */
  uv_connect_t creq;
  fs_list_node node;   /* in the pool */
  fs_list_node unsent; /* fs_call.qnode: calls given to this connection, submitted at its flush */
} fs_upconn;

/* --- uppool.c, for upcall.c ------------------------------------------------- */

/* The options the pool was started with. */
const fs_uppool_options *fs_uppool_options_get(void);

/* "host:port" of the upstream, for messages. */
const char *fs_uppool_name(void);

/* A connection that can take a new stream now, or NULL; sets
 * *|should_connect| when a new connection should be opened for the call
 * (policy.h, fs_policy_pick_upstream). */
fs_upconn *fs_uppool_pick(int *should_connect);

/* Starts a connection attempt now (no-op while draining or resolving). */
void fs_uppool_connect_now(void);

/* Nonzero while a reconnect waits for its backoff delay. */
int fs_uppool_backing_off(void);

/* Cancels the backoff delay (an attempt follows with connect_now). */
void fs_uppool_stop_backoff(void);

/* Where the next connection attempt stands ("next attempt in 0.8 s"). */
void fs_uppool_next_attempt(char *out, size_t len);

/* Makes |u|'s timer fire within |in_ms| (never later than it would). */
void fs_upconn_timer_within(fs_upconn *u, uint64_t in_ms);

/* Sends a PING on |u| (timed for its round trip). */
void fs_upconn_ping(fs_upconn *u);

/* Writes a sidecar.error event: something that cannot fail in practice
 * did; the data path goes on. */
void fs_uppool_report(const char *what, const char *why);

/* --- upcall.c, for uppool.c ------------------------------------------------- */

/* Initialises the hold queue and its timer.  Returns 0 or a libuv error. */
int fs_upcall_start(void);

/* Ends every waiting call ("shutting down") and closes the hold timer. */
void fs_upcall_stop(void);

/* Registers the callbacks of the calls' upstream legs. */
void fs_upcall_set_callbacks(nghttp2_session_callbacks *cbs);

/* Sends waiting calls to connections that can take them. */
void fs_upcall_dispatch(void);

/* Ends the waiting calls that may not wait longer (all when |all|) with
 * UNAVAILABLE and |why|. */
void fs_upcall_fail_waiting(const char *why, int all);

/* Nonzero when calls wait for a connection. */
int fs_upcall_waiting(void);

/* |u| is about to write: submits the calls given to it since its last
 * flush.  A call whose client reset it meanwhile never reaches the
 * upstream session (a rapid-reset flood costs the upstream nothing). */
void fs_upcall_flush(fs_upconn *u);

/* A HEADERS or DATA frame for one of |u|'s streams arrived. */
void fs_upcall_frame_recv(nghttp2_session *s, const nghttp2_frame *frame);

/* |u| is closing (|reason|): every call on it is repeated where safe, else
 * ended UNAVAILABLE. */
void fs_upcall_conn_lost(fs_upconn *u, const char *reason);

/* The stall probe over |u|'s calls (policy.h, fs_policy_stall).  Returns
 * the delay before the next look, at most |next| (0: none). */
uint64_t fs_upcall_check_stalled(fs_upconn *u, uint64_t next);

#endif
