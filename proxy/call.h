/*
 * call: one proxied gRPC call, its two legs and the flow control between
 * them (nghttpx's Downstream).  leg[FS_DOWN] is the client's stream on a
 * client connection (downstream.c), leg[FS_UP] the stream opened for it on
 * an upstream connection (uppool.c).  Bytes received on leg L wait in
 * fl[L] until they are sent on leg !L; only then are they consumed on leg L
 * (WINDOW_UPDATE to their sender), so at most one stream window per stream
 * and direction is ever buffered and a slow reader slows only its own
 * stream.  The call is freed when both legs are detached and it waits in no
 * queue.
 *
 * Also here: what both sides' connections share (fs_pconn), and the
 * environment every room of the proxy reads (fs_env).
 */
#ifndef FS_CALL_H
#define FS_CALL_H

#include <nghttp2/nghttp2.h>
#include <stdint.h>
#include <uv.h>

#include "bufq.h"
#include "config.h"
#include "grpc.h"
#include "grpcmsg.h"
#include "h2conn.h"
#include "hdrs.h"
#include "list.h"
#include "observe.h"
#include "policy.h"
#include "proxy.h"

enum { FS_DOWN = 0, FS_UP = 1 };

/* The window an upstream stream starts with (one fs_bufq block): the
 * response may use the full --stream-window once the client takes bytes.
 * Bounds what a client that reads nothing (zero window) makes the
 * sidecar hold: one block per call instead of a whole stream window. */
#define FS_CALL_FIRST_WINDOW FS_BLOCK_SIZE

typedef struct fs_pconn fs_pconn;
typedef struct fs_call fs_call;

/* A proxied HTTP/2 connection as the calls on it see it.  downstream.c and
 * uppool.c embed it first in their connection objects. */
struct fs_pconn {
  fs_h2conn h2; /* first: an fs_pconn* is an fs_h2conn* */
  uint8_t side; /* which leg of its calls it carries: FS_DOWN or FS_UP */
  /* Connection-level flow control credit is returned on receipt (upstream
   * connections, shared by many clients: one slow client must never stall
   * the others), else when the other leg took the bytes. */
  uint8_t credit_on_receipt;
  uint32_t nstreams;  /* calls attached */
  uint64_t rpcs;      /* calls ever attached */
  fs_list_node calls; /* fs_call.leg[side].node */
  /* Optional: a call left this connection (downstream: the idle timer). */
  void (*calls_changed)(fs_pconn *pc);
};

typedef struct fs_flow {
  fs_bufq data;     /* received on this leg, not yet sent on the other */
  fs_grpcmsg msgs;  /* message boundaries, for the size limit */
  fs_hdrs trailers; /* to send once data is drained */
  uint8_t eof;      /* END_STREAM received */
  uint8_t deferred; /* the sink's data provider waits for data */
  uint8_t discard;  /* the sink is gone: consume and drop */
  size_t promised;  /* bytes a DATA frame of the sink's session will take: never dropped */
  size_t noack;     /* bytes at the front already acknowledged to their sender (a retry's replay) */
} fs_flow;

typedef struct fs_leg {
  fs_pconn *conn;    /* NULL: detached */
  int32_t sid;       /* 0 on an upstream leg whose request is not submitted yet (upcall.c) */
  fs_list_node node; /* in conn->calls */
} fs_leg;

struct fs_call {
  fs_leg leg[2];
  fs_flow fl[2];
  fs_hdrs head[2];      /* request headers until sent upstream (kept for a repeat); response headers */
  nghttp2_rcbuf *path;  /* kept for events */
  fs_obs *obs;          /* Fleet observation, NULL for other methods */
  uint64_t node_id;     /* the node the request named (observed), 0 unknown */
  uint64_t bytes[2];    /* gRPC payload bytes received on each leg */
  uint8_t method;       /* fs_fleet_method */
  uint8_t ended;        /* fs_call_end() ran */
  uint64_t t_start;     /* loop clock, ms: holds and deadlines */
  uint64_t t_start_us;  /* monotonic, µs: the call's duration in /metrics */
  fs_list_node qnode;   /* waiting: in the hold queue (no connection yet), or in its upstream connection's
                           unsent list (leg[FS_UP] attached with sid 0 until the connection's flush) */
  uint64_t hold_until;  /* queued: wait for an upstream until then; 0 = fail when none can be had */
  uint64_t deadline;    /* the client's own (grpc-timeout), 0: none */
  uint64_t t_sent;      /* when the current attempt went upstream */
  uint64_t probe_ms;    /* when a PING probed its connection for it; 0: not yet */
  uint8_t stall_done;   /* checked once: left to its own deadline */
  fs_bufq replay;       /* request bytes sent upstream, kept to repeat the call */
  uint8_t replay_on;    /* replay holds every byte sent on this attempt */
  uint8_t up_headers;   /* response headers arrived: the upstream processed the call */
  uint8_t widened[2];   /* leg's stream has its full window (a body past half the first window; the
                           response's once its client takes bytes) */
  uint32_t granted;     /* bytes of fs_env.buffers those windows took */
  fs_list_node lru;     /* in fs_env.idle_calls, least recently moving first (unlinked: evicted) */
  uint64_t t_moved;     /* loop clock, ms: the last byte this call moved */
  uint8_t req_trailers; /* request trailers were sent (not kept: no repeat) */
  uint8_t attempts;     /* repeats made */
  uint8_t resp_started; /* response headers went to the client */
  uint8_t overflow;     /* a header block exceeded the limit */
  uint32_t hdr_seen;    /* RFC 7541 size of the client's header blocks so far (abuse check) */
  uint8_t finished;     /* the final status is decided */
  uint8_t synth;        /* our own trailers end the response (synth_status, synth_msg) */
  int synth_status;
  char synth_msg[240];
};

/* What every room of the proxy shares, set by fs_proxy_start(). */
typedef struct fs_proxy_env {
  uv_loop_t *loop;
  const fs_config *cfg;
  fs_proxy_stats stats;
  size_t replay_total, replay_max; /* request bytes kept for repeats, all calls; and their cap */
  uint64_t calls_freed;            /* since start (proxy.c hands memory back to the system after many) */
  uint64_t calls_open;             /* calls in idle_calls: counted against --max-calls */
  fs_list_node idle_calls;         /* open calls, the one idle longest first */
  fs_budget buffers;               /* --max-buffer: stream windows beyond the first block */
  uint8_t draining;
} fs_proxy_env;

extern fs_proxy_env fs_env;

/* --- connections -------------------------------------------------------------- */

/* Initialises the call bookkeeping of |pc| for |side|. */
void fs_pconn_init(fs_pconn *pc, int side);

/* A session call that must not fail failed (|what|, nghttp2 error |rv|):
 * the connection closes once its queued bytes are out, ending its calls
 * cleanly.  Safe inside nghttp2 callbacks. */
void fs_pconn_broken(fs_pconn *pc, const char *what, int rv);

/* Graceful GOAWAY (last processed stream, NO_ERROR) with |reason| kept for
 * conn.close.  No-op before the session exists or while closing. */
void fs_pconn_goaway(fs_pconn *pc, const char *reason);

/* Keeps why the peer said GOAWAY (code and printable debug data) as the
 * connection's close reason, unless one is set already. */
void fs_pconn_note_goaway(fs_pconn *pc, const nghttp2_frame *frame);

/* Keeps a GOAWAY nghttp2 sent for a protocol violation as the close reason,
 * unless one is set already. */
void fs_pconn_note_sent_goaway(fs_pconn *pc, const nghttp2_frame *frame);

/* --- a call's life ---------------------------------------------------------------- */

/* Allocates a call (counted in fs_env.stats).  Returns NULL when out of memory. */
fs_call *fs_call_new(void);

/* A new call is about to open on client connection |pc|: at --max-calls,
 * the call idle longest ends RESOURCE_EXHAUSTED to make room when
 * fs_policy_admit() says so.  Returns 0 when the new call may open, -1 when
 * it must be refused (REFUSED_STREAM; counted). */
int fs_call_admit(const fs_pconn *pc);

/* The client sends |len| more bytes of a request body: once the body
 * reaches half the first window (a small body never needs more), its
 * stream may use the full --stream-window if the buffer pool has room;
 * tried again at each DATA until it has. */
void fs_call_widen_down(fs_call *c, size_t len);

/* The call's final gRPC status is known: count it and end observation.
 * Runs once per call; later calls do nothing. */
void fs_call_end(fs_call *c, int status);

/* Attaches leg |side| to stream |sid| of |pc|. */
void fs_call_attach(fs_call *c, int side, fs_pconn *pc, int32_t sid);

/* Unlinks the call from leg |side|'s connection, keeping what the other
 * leg sent (the call may go on elsewhere).  No-op when detached. */
void fs_call_detach_keep(fs_call *c, int side);

/* Detaches leg |side| and drops whatever the other leg sends from now on. */
void fs_call_detach(fs_call *c, int side);

/* Frees the call when both legs are detached and it is in no queue. */
void fs_call_maybe_free(fs_call *c);

/* Nonzero while the call waits in the hold queue. */
static inline int fs_call_queued(const fs_call *c) { return fs_list_linked(&c->qnode); }

/* --- flow ------------------------------------------------------------------------------- */

/* Consumes |n| bytes received on leg |side| so its sender may send more. */
void fs_call_consume(fs_call *c, int side, size_t n);

/* Drops what fl[side] holds (except what a DATA frame was already promised)
 * and everything that arrives later. */
void fs_call_discard(fs_call *c, int side);

/* Wakes leg |sink|'s data provider if it waits for data. */
void fs_call_resume(fs_call *c, int sink);

/* Resets leg |side|'s stream with |code|. */
void fs_call_rst(fs_call *c, int side, uint32_t code);

/* Cancels the upstream stream.  The leg stays attached until nghttp2 closes
 * the stream: until then a DATA frame of it may still be in flight inside
 * the session, pointing at this call.  A request not submitted yet (sid 0)
 * never reaches the session: its leg is detached at once. */
void fs_call_cancel_up(fs_call *c, uint32_t code);

/* The data provider for leg |sink|: it sends fl[!sink], then its trailers. */
nghttp2_data_provider fs_call_provider(fs_call *c, int sink);

/* The body of an nghttp2 send_data_callback for leg |sink| of |pc|: writes
 * the frame header, |length| bytes of fl[!sink] (and padding) to the
 * socket, keeps the bytes for a repeat (upstream) and consumes them on the
 * other leg.  Returns 0 or NGHTTP2_ERR_WOULDBLOCK. */
int fs_call_send_data(fs_call *c, int sink, fs_pconn *pc, const nghttp2_frame *frame, const uint8_t *framehd,
                      size_t length);

/* --- what arrives ---------------------------------------------------------------------- */

/* A header field for leg |side| (|trailer|: of a trailer block).  Past the
 * header list limit the call is marked overflowed and the field dropped. */
void fs_call_recv_header(fs_call *c, int side, int trailer, nghttp2_rcbuf *name, nghttp2_rcbuf *value);

/* A DATA chunk on leg |side|: checked against the message size limit,
 * observed, buffered for the other leg.  Fails the call (and consumes the
 * chunk) when it is too big or the buffer is full. */
void fs_call_recv_data(fs_call *c, int side, const uint8_t *data, size_t len);

/* A trailer block on leg |side| is complete.  Returns 0, or -1 after
 * failing the call (the block exceeded the header list limit). */
int fs_call_recv_trailers(fs_call *c, int side);

/* END_STREAM arrived on leg |side|. */
void fs_call_recv_end(fs_call *c, int side);

/* Sends the response headers in head[FS_UP] to the client (|end|: the
 * response ends with them).  No-op when the client is gone or a response
 * started. */
void fs_call_respond(fs_call *c, int end);

/* --- ending it ------------------------------------------------------------------------ */

/* Notes the final status found in a response header block |h|. */
void fs_call_observe_status(fs_call *c, const fs_hdrs *h);

/* Counts a failed call and writes its rpc.error event. */
void fs_call_log_error(fs_call *c, int status, const char *msg, size_t msglen);

/* Ends the call for the client with |status| and a message (the sidecar's
 * own, "flower-sidecar: ..."): a Trailers-Only response when nothing was
 * sent yet, else trailers after what is queued; leaves the hold queue and
 * cancels the upstream leg. */
void fs_call_fail(fs_call *c, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* The call's :path, for events ("?" when absent). */
void fs_call_method(const fs_call *c, char *out, size_t len);

/* --- repeats ------------------------------------------------------------------------ */

/* The call can no longer be repeated: lets go of what was kept for it. */
void fs_call_replay_off(fs_call *c);

/* Puts the bytes kept for a repeat back ahead of what still waits to go
 * upstream (they were acknowledged to the client the first time). */
void fs_call_replay_rewind(fs_call *c);

#endif
