/*
 * h2conn: one HTTP/2 connection's transport: a libuv TCP handle, optional
 * TLS through OpenSSL with an in-memory BIO, the nghttp2 session, and the
 * bounded queue of bytes waiting for the socket.
 *
 * Output is never written from inside nghttp2 callbacks.  A connection
 * with something to send is marked dirty (fs_h2conn_mark); once per loop
 * iteration, just before libuv polls, every dirty connection runs
 * nghttp2_session_send() and writes what it produced with one try-write.
 * This coalesces all frames of an iteration into full TLS records and few
 * syscalls, and lets one connection's callbacks make others dirty without
 * recursion.
 *
 * Input is read in slices: a connection that has read FS_READ_SLICE bytes
 * in one loop pass stops reading until the pass ends (libuv's check phase),
 * so one peer's burst never holds the loop while timers, signals, the admin
 * port and every other connection wait (without it libuv reads up to 32 x
 * 64 KiB per connection and pass).  Between slices the data path runs: the
 * flush writes what the slice produced.
 *
 * Ownership: the embedding object (the proxy's connections, admin's,
 * uphealth's) allocates the fs_h2conn and calls fs_h2conn_init().  When that
 * fails the object is still the caller's to free; once it succeeds the loop
 * refers to it, and it is freed only in ops->on_freed, which runs after
 * every libuv handle it opened is closed (fs_h2conn_close -> close callbacks
 * -> on_freed).
 */
#ifndef FS_H2CONN_H
#define FS_H2CONN_H

#include <nghttp2/nghttp2.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <uv.h>

#include "bufq.h"
#include "list.h"
#include "pacing.h"

/* TLS plaintext is gathered into records of this size. */
#define FS_TLS_RECORD 16384

/* Socket bytes one connection reads in one loop pass, at most (plus one
 * read of at most 64 KiB that crosses it). */
#define FS_READ_SLICE (128 * 1024)

typedef struct fs_h2conn fs_h2conn;

typedef struct fs_h2conn_ops {
  /* The transport is ready for HTTP/2 (TLS handshake done, or cleartext):
   * create c->session.  Return 0, or -1 to close with |c->close_reason|. */
  int (*on_ready)(fs_h2conn *c);
  /* The TLS handshake did not complete: |reason| is one line. Called before closing. */
  void (*on_tls_fail)(fs_h2conn *c, const char *reason);
  /* The connection is closing: detach everything that refers to it. Called
   * exactly once; the session must not be used afterwards. */
  void (*on_closing)(fs_h2conn *c, const char *reason);
  /* Both handles are closed: free the memory. */
  void (*on_freed)(fs_h2conn *c);
  /* c->timer fired. */
  void (*on_timer)(fs_h2conn *c);
  /* Optional, cleartext only: bytes read before the connection is ready.
   * The owner may answer with fs_h2conn_write() and
   * fs_h2conn_close_after_flush(), or switch to HTTP/2 with
   * fs_h2conn_begin_h2().  Lets one port speak HTTP/1.1 and h2c. */
  void (*on_raw)(fs_h2conn *c, const uint8_t *data, size_t len);
  /* Optional: the connection is about to write (its flush, once per loop
   * pass it was marked, outside any nghttp2 callback): the owner submits
   * what it deferred until now. */
  void (*on_flush)(fs_h2conn *c);
} fs_h2conn_ops;

struct fs_h2conn {
  uv_tcp_t tcp;
  uv_timer_t timer;         /* the owner's: handshake, idle, connect, keepalive */
  nghttp2_session *session; /* fs_h2conn_session_new() in ops->on_ready; the connection deletes it */
  SSL *ssl;                 /* NULL for h2c */
  const fs_h2conn_ops *ops;
  fs_bufq outq;      /* bytes (ciphertext with TLS) for the socket */
  size_t inflight;   /* bytes of outq handed to uv_write */
  size_t outq_cap;   /* bytes queued above which nghttp2 waits (pacing.h) */
  uint64_t paced_ms; /* loop time TCP_INFO was last looked at */
  uv_write_t wreq;
  const uint8_t *rx; /* ciphertext the BIO hands to OpenSSL */
  size_t rx_len;
  fs_list_node dnode;           /* in the list of connections to flush (zeroed: in none) */
  fs_list_node pnode;           /* in the list of connections paused for this pass (zeroed: in none) */
  uint64_t slice_pass;          /* the loop pass |slice_bytes| counts */
  size_t slice_bytes;           /* socket bytes read in that pass */
  uint64_t bytes_in, bytes_out; /* socket bytes */
  uint64_t last_rx_ms;          /* loop time of the last byte read */
  uint64_t opened_ms;
  uint8_t closing, tls_ready, open_handles, connected, tls_fail_reported, close_after_flush;
  uint8_t pacing_off;    /* loopback peer: never paced (pacing.h) */
  uint8_t timer_open;    /* |timer| was initialised (fs_h2conn_init) */
  uint8_t close_pending; /* closes with |close_reason| at its next flush */
  char peer[300];
  char close_reason[160];
};

/* Prepares the loop-wide flush and resume handles (and the TLS BIO
 * method).  Call once before any connection.  Returns 0, or a libuv error (UV_ENOMEM when
 * OpenSSL cannot create the BIO method); then fs_h2conn_global_close() must
 * not be called. */
int fs_h2conn_global_init(uv_loop_t *loop);
/* Stops the flush and resume handles so the loop can end. */
void fs_h2conn_global_close(void);

/* Initialises |c| (zeroed first: its TCP handle, then its timer) on |loop|,
 * with |ops|.  fs_h2conn_global_init() must have run.
 *
 * Returns 0 when |c| is registered with |loop|.  From then on |c| ends only
 * through fs_h2conn_close(): ops->on_closing once, then ops->on_freed, where
 * the owner frees it.  If the timer cannot be created (uv_timer_init() cannot
 * fail in libuv 1.x, but its contract allows it), 0 is still returned: |c|
 * closes itself with the reason "cannot create a timer: ..." when the loop
 * next flushes, or in fs_h2conn_start() (which then returns -1), whichever
 * comes first; fs_h2conn_set_timer() does nothing meanwhile.  Either way no
 * callback of |ops| runs inside this call.
 *
 * Returns uv_tcp_init()'s error when nothing was registered: no callback of
 * |ops| will ever run for |c|, and the caller frees (or reuses) it at once. */
int fs_h2conn_init(fs_h2conn *c, uv_loop_t *loop, const fs_h2conn_ops *ops);

/* Creates |c|'s nghttp2 session (a server's when |server|, else a
 * client's) with |cbs| and |opt| (NULL: nghttp2's defaults), |c| as its
 * user data and the sidecar's allocator (h2mem.h).  Call it from
 * ops->on_ready.  The connection owns the session from then on: it is
 * deleted when both handles are closed, just before ops->on_freed, and by
 * nobody else.  Returns 0, or NGHTTP2_ERR_NOMEM with c->session left NULL. */
int fs_h2conn_session_new(fs_h2conn *c, int server, const nghttp2_session_callbacks *cbs, const nghttp2_option *opt);

/* Starts the transport on a connected socket.  With |ctx| non-NULL, runs a
 * TLS handshake (server when |server|, else client sending SNI |sni| and
 * verifying the peer against |verify_name| when non-NULL) before
 * ops->on_ready; without it calls ops->on_ready at once.  Returns 0, or -1
 * after closing |c| (ops->on_closing has run; ops->on_freed comes later):
 * when fs_h2conn_init() could not create the timer, OpenSSL cannot set up
 * the TLS state, the SNI or the name to verify, libuv cannot start reading,
 * the client's first handshake step fails, or ops->on_ready fails. */
int fs_h2conn_start(fs_h2conn *c, SSL_CTX *ctx, int server, const char *sni, const char *verify_name);

/* Fills the nghttp2 callbacks the transport owns (send_callback). */
void fs_h2conn_set_callbacks(nghttp2_session_callbacks *cbs);

/* Switches a connection in its on_raw phase to HTTP/2: calls
 * ops->on_ready, then feeds |pending| (bytes already read) to the session.
 * Returns 0, or -1 after closing |c|. */
int fs_h2conn_begin_h2(fs_h2conn *c, const uint8_t *pending, size_t len);

/* Closes |c| once every queued byte is written. */
void fs_h2conn_close_after_flush(fs_h2conn *c);

/* Queues plaintext for the peer.  With TLS, only valid from this
 * connection's own nghttp2 send callbacks (during its flush). */
void fs_h2conn_write(fs_h2conn *c, const void *data, size_t len);

/* Nonzero when more output may be queued now. */
int fs_h2conn_writable(const fs_h2conn *c);

/* (Re)arms c->timer to fire ops->on_timer after |ms|; 0 stops it.  Does
 * nothing once |c| is closing, or when it has no timer (fs_h2conn_init).
 * Never calls back: should libuv refuse to start the timer, |c| closes
 * with that reason at its next flush. */
void fs_h2conn_set_timer(fs_h2conn *c, uint64_t ms);

/* Schedules a flush of |c| before the loop next polls. */
void fs_h2conn_mark(fs_h2conn *c);

/* Closes |c| with |reason|: ops->on_closing now, ops->on_freed later.
 * Idempotent. */
void fs_h2conn_close(fs_h2conn *c, const char *reason);

/* Closes |c| with |reason| (copied) at its next flush, before the loop next
 * polls: nothing is called back now, and input arriving meanwhile is
 * ignored.  For failures found where ops->on_closing must not run under the
 * caller (inside nghttp2 callbacks, while walking a list the close would
 * change).  Does nothing when |c| is already closing or due to. */
void fs_h2conn_close_soon(fs_h2conn *c, const char *reason);

/* Milliseconds on the loop clock. */
uint64_t fs_now_ms(void);

#endif
