/* call: see call.h. */
#include "call.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fleet.h"
#include "log.h"
#include "metrics.h"

fs_proxy_env fs_env;

/* --- connections ------------------------------------------------------------ */

void fs_pconn_init(fs_pconn *pc, int side) {
  pc->side = (uint8_t)side;
  pc->credit_on_receipt = side == FS_UP;
  fs_list_init(&pc->calls);
}

void fs_pconn_broken(fs_pconn *pc, const char *what, int rv) {
  if (pc->h2.closing) return;
  snprintf(pc->h2.close_reason, sizeof(pc->h2.close_reason), "%s failed: %s", what, nghttp2_strerror(rv));
  fs_h2conn_close_after_flush(&pc->h2);
}

void fs_pconn_goaway(fs_pconn *pc, const char *reason) {
  int rv;
  if (pc->h2.closing || !pc->h2.session) return;
  snprintf(pc->h2.close_reason, sizeof(pc->h2.close_reason), "%s", reason);
  rv = nghttp2_submit_goaway(pc->h2.session, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(pc->h2.session),
                             NGHTTP2_NO_ERROR, NULL, 0);
  if (rv != 0) {
    /* Without a GOAWAY the peer cannot tell which calls were processed:
     * closing is the only clean end left. */
    fs_h2conn_close(&pc->h2, reason);
    return;
  }
  fs_h2conn_mark(&pc->h2);
}

void fs_pconn_note_goaway(fs_pconn *pc, const nghttp2_frame *frame) {
  /* The debug data says why ("too_many_pings", "max_age"): keep it when it
   * is printable. */
  size_t i, n = frame->goaway.opaque_data_len < 64 ? frame->goaway.opaque_data_len : 64;
  if (pc->h2.close_reason[0]) return;
  for (i = 0; i < n && frame->goaway.opaque_data[i] >= 0x20 && frame->goaway.opaque_data[i] < 0x7f; i++) {}
  if (n && i == n)
    snprintf(pc->h2.close_reason, sizeof(pc->h2.close_reason), "peer sent GOAWAY %s (%.*s)",
             nghttp2_http2_strerror(frame->goaway.error_code), (int)n, (const char *)frame->goaway.opaque_data);
  else
    snprintf(pc->h2.close_reason, sizeof(pc->h2.close_reason), "peer sent GOAWAY %s",
             nghttp2_http2_strerror(frame->goaway.error_code));
}

void fs_pconn_note_sent_goaway(fs_pconn *pc, const nghttp2_frame *frame) {
  /* A reason set before (ours, for ending the session) says more. */
  if (frame->goaway.error_code == NGHTTP2_NO_ERROR || pc->h2.close_reason[0]) return;
  snprintf(pc->h2.close_reason, sizeof(pc->h2.close_reason), "protocol error: sent GOAWAY %s",
           nghttp2_http2_strerror(frame->goaway.error_code));
}

/* --- a call's life ------------------------------------------------------------ */

fs_call *fs_call_new(void) {
  fs_call *c = calloc(1, sizeof(*c));
  int i;
  if (!c) return NULL;
  for (i = 0; i < 2; i++) {
    /* One stream window plus a frame: the peer cannot legally send more. */
    fs_bufq_init(&c->fl[i].data, (size_t)fs_env.cfg->stream_window + 16384);
    fs_grpcmsg_init(&c->fl[i].msgs, fs_env.cfg->max_message_size);
    fs_list_node_init(&c->leg[i].node);
  }
  fs_list_node_init(&c->qnode);
  c->t_moved = fs_now_ms();
  if (!fs_env.idle_calls.next) fs_list_init(&fs_env.idle_calls); /* zeroed: before fs_proxy_start (unit tests) */
  fs_list_push_back(&fs_env.idle_calls, &c->lru);
  fs_env.calls_open++;
  fs_bufq_init(&c->replay, fs_env.cfg->retry_buffer);
  c->replay_on = fs_env.cfg->retry_buffer > 0;
  c->t_start = fs_now_ms();
  c->t_start_us = uv_hrtime() / 1000;
  return c;
}

void fs_call_end(fs_call *c, int status) {
  if (c->ended) return;
  c->ended = 1;
  fs_metrics_call((fs_fleet_method)c->method, status, uv_hrtime() / 1000 - c->t_start_us, c->bytes[FS_DOWN],
                  c->bytes[FS_UP]);
  if (c->obs) {
    c->node_id = fs_obs_node_id(c->obs); /* for rpc.error, logged after */
    fs_obs_finish(c->obs, status);
  }
  c->obs = NULL;
}

void fs_call_replay_off(fs_call *c) {
  fs_env.replay_total -= c->replay.len;
  fs_bufq_reset(&c->replay);
  c->replay_on = 0;
  fs_hdrs_clear(&c->head[FS_DOWN]);
}

/* Keeps a copy of the first |n| bytes of |q|, about to be sent upstream. */
static void replay_keep(fs_call *c, const fs_bufq *q, size_t n) {
  const fs_block *b;
  if (!c->replay_on || n == 0) return;
  if (c->replay.len + n > fs_env.cfg->retry_buffer || fs_env.replay_total + n > fs_env.replay_max) {
    fs_call_replay_off(c);
    return;
  }
  for (b = q->head; b && n > 0; b = b->next) {
    size_t take = b->end - b->start < n ? b->end - b->start : n;
    if (fs_bufq_append(&c->replay, b->data + b->start, take) < 0) {
      fs_call_replay_off(c);
      return;
    }
    fs_env.replay_total += take;
    n -= take;
  }
}

void fs_call_replay_rewind(fs_call *c) {
  fs_flow *f = &c->fl[FS_DOWN];
  f->noack += c->replay.len;
  fs_env.replay_total -= c->replay.len;
  fs_bufq_prepend(&f->data, &c->replay);
  f->promised = 0;
  f->deferred = 0;
}

static void call_free(fs_call *c) {
  int i;
  fs_call_end(c, FS_GRPC_CANCELLED); /* ended by a lost connection */
  fs_list_remove(&c->qnode);
  fs_call_replay_off(c);
  for (i = 0; i < 2; i++) {
    fs_bufq_reset(&c->fl[i].data);
    fs_hdrs_clear(&c->fl[i].trailers);
    fs_hdrs_clear(&c->head[i]);
  }
  if (c->path) nghttp2_rcbuf_decref(c->path);
  if (fs_list_linked(&c->lru)) fs_env.calls_open--;
  fs_list_remove(&c->lru);
  fs_budget_give(&fs_env.buffers, c->granted);
  free(c);
  fs_env.calls_freed++;
}

void fs_call_maybe_free(fs_call *c) {
  if (!c->leg[FS_DOWN].conn && !c->leg[FS_UP].conn && !fs_call_queued(c)) call_free(c);
}

void fs_call_attach(fs_call *c, int side, fs_pconn *pc, int32_t sid) {
  c->leg[side].conn = pc;
  c->leg[side].sid = sid;
  fs_list_push_front(&pc->calls, &c->leg[side].node);
  pc->nstreams++;
  pc->rpcs++;
}

void fs_call_detach_keep(fs_call *c, int side) {
  fs_pconn *pc = c->leg[side].conn;
  if (!pc) return;
  fs_list_remove(&c->leg[side].node);
  /* Its only error, INVALID_ARGUMENT, means the stream is gone already
   * (closing it is why we are here, or it was never submitted): then
   * nothing points at the call any more, which is all this is for.  One
   * lookup, not a find_stream before it: this runs once per leg. */
  if (!pc->h2.closing && pc->h2.session)
    (void)nghttp2_session_set_stream_user_data(pc->h2.session, c->leg[side].sid, NULL);
  c->leg[side].conn = NULL;
  pc->nstreams--;
  if (pc->calls_changed) pc->calls_changed(pc);
}

void fs_call_detach(fs_call *c, int side) {
  if (!c->leg[side].conn) return;
  fs_call_detach_keep(c, side);
  /* Nothing will ever take what the other leg sends now. */
  fs_call_discard(c, !side);
}

/* --- flow ---------------------------------------------------------------------- */

void fs_call_consume(fs_call *c, int side, size_t n) {
  fs_pconn *pc = c->leg[side].conn;
  int rv;
  if (!pc || n == 0 || pc->h2.closing) return;
  /* Connections that return connection credit on receipt (on_data_chunk)
   * only give the stream its credit back here. */
  rv = pc->credit_on_receipt ? nghttp2_session_consume_stream(pc->h2.session, c->leg[side].sid, n)
                             : nghttp2_session_consume(pc->h2.session, c->leg[side].sid, n);
  if (rv != 0) {
    fs_pconn_broken(pc, "returning flow control credit", rv);
    return;
  }
  fs_h2conn_mark(&pc->h2);
}

void fs_call_discard(fs_call *c, int side) {
  fs_flow *f = &c->fl[side];
  size_t acked = f->promised > f->noack ? f->promised : f->noack;
  f->discard = 1;
  if (f->data.len > acked) fs_call_consume(c, side, f->data.len - acked);
  if (f->noack > f->promised) f->noack = f->promised;
  if (f->data.len > f->promised) fs_bufq_keep(&f->data, f->promised);
}

void fs_call_rst(fs_call *c, int side, uint32_t code) {
  fs_pconn *pc = c->leg[side].conn;
  int rv;
  if (!pc || pc->h2.closing) return;
  if (c->leg[side].sid == 0) { /* never submitted: nothing to reset */
    fs_list_remove(&c->qnode);
    fs_call_detach_keep(c, side);
    return;
  }
  rv = nghttp2_submit_rst_stream(pc->h2.session, NGHTTP2_FLAG_NONE, c->leg[side].sid, code);
  if (rv != 0) {
    fs_pconn_broken(pc, "resetting a stream", rv);
    return;
  }
  fs_h2conn_mark(&pc->h2);
}

void fs_call_cancel_up(fs_call *c, uint32_t code) {
  if (!c->leg[FS_UP].conn) return;
  fs_call_rst(c, FS_UP, code);
  fs_call_discard(c, FS_DOWN);
}

void fs_call_resume(fs_call *c, int sink) {
  fs_pconn *pc = c->leg[sink].conn;
  fs_flow *f = &c->fl[!sink];
  int rv;
  if (!pc || !f->deferred || pc->h2.closing) return;
  f->deferred = 0;
  rv = nghttp2_session_resume_data(pc->h2.session, c->leg[sink].sid);
  /* INVALID_ARGUMENT: the stream has no deferred data (its provider was
   * never called yet): nothing to wake. */
  if (rv != 0 && rv != NGHTTP2_ERR_INVALID_ARGUMENT) {
    fs_pconn_broken(pc, "resuming a stream", rv);
    return;
  }
  fs_h2conn_mark(&pc->h2);
}

static int has_trailers(const fs_call *c, int sink) {
  return c->fl[!sink].trailers.n > 0 || (sink == FS_DOWN && c->synth);
}

/* Submits the trailers that end leg |sink|.  Returns nghttp2's result. */
static int submit_trailers(fs_call *c, int sink) {
  fs_pconn *pc = c->leg[sink].conn;
  fs_flow *f = &c->fl[!sink];
  int rv;
  if (sink == FS_DOWN && c->synth) {
    fs_grpc_reply r;
    fs_grpc_reply_init(&r, (fs_grpc_status)c->synth_status, c->synth_msg, 0);
    return nghttp2_submit_trailer(pc->h2.session, c->leg[sink].sid, r.nv, r.n);
  }
  if (sink == FS_UP) c->req_trailers = 1;
  {
    nghttp2_nv nv[fs_hdrs_count(&f->trailers) + 1];
    size_t n = fs_hdrs_nv(&f->trailers, nv, NULL);
    rv = nghttp2_submit_trailer(pc->h2.session, c->leg[sink].sid, nv, n);
    fs_hdrs_clear(&f->trailers);
  }
  return rv;
}

static ssize_t read_leg(fs_call *c, int sink, size_t length, uint32_t *flags) {
  fs_flow *f = &c->fl[!sink];
  size_t n;
  if (f->data.len == 0 && !f->eof) {
    f->deferred = 1;
    return NGHTTP2_ERR_DEFERRED;
  }
  n = f->data.len < length ? f->data.len : length;
  if (n) *flags |= NGHTTP2_DATA_FLAG_NO_COPY;
  f->promised = n;
  if (n == f->data.len && f->eof) {
    if (has_trailers(c, sink)) {
      /* Without its trailers the stream would never end: reset it. */
      if (submit_trailers(c, sink) != 0) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
      *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
    }
    *flags |= NGHTTP2_DATA_FLAG_EOF;
  }
  return (ssize_t)n;
}

static ssize_t read_down(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t length, uint32_t *flags,
                         nghttp2_data_source *src, void *ud) {
  (void)s, (void)sid, (void)buf, (void)ud;
  return read_leg(src->ptr, FS_DOWN, length, flags);
}

static ssize_t read_up(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t length, uint32_t *flags,
                       nghttp2_data_source *src, void *ud) {
  (void)s, (void)sid, (void)buf, (void)ud;
  return read_leg(src->ptr, FS_UP, length, flags);
}

nghttp2_data_provider fs_call_provider(fs_call *c, int sink) {
  nghttp2_data_provider prd;
  prd.source.ptr = c;
  prd.read_callback = sink == FS_UP ? read_up : read_down;
  return prd;
}

/* A byte of |c| moved: it is the least idle call now. */
static void moved(fs_call *c) {
  if (!fs_list_linked(&c->lru)) return; /* evicted */
  c->t_moved = fs_now_ms();
  if (fs_env.idle_calls.prev == &c->lru) return; /* last already: a transfer's every chunk */
  fs_list_remove(&c->lru);
  fs_list_push_back(&fs_env.idle_calls, &c->lru);
}

/* Widens leg |side|'s stream window from FS_CALL_FIRST_WINDOW to
 * --stream-window with bytes from the pool, once; when the pool has no
 * room, nothing is done and a later call tries again. */
static void widen(fs_call *c, int side) {
  fs_pconn *pc = c->leg[side].conn;
  uint32_t extra =
      fs_env.cfg->stream_window > FS_CALL_FIRST_WINDOW ? fs_env.cfg->stream_window - FS_CALL_FIRST_WINDOW : 0;
  int rv;
  if (c->widened[side]) return;
  if (!pc || pc->h2.closing || c->leg[side].sid <= 0 || !extra) {
    c->widened[side] = 1; /* nothing to widen */
    return;
  }
  if (fs_budget_take(&fs_env.buffers, extra) < 0) return;
  c->granted += extra;
  c->widened[side] = 1;
  rv = nghttp2_session_set_local_window_size(pc->h2.session, NGHTTP2_FLAG_NONE, c->leg[side].sid,
                                             (int32_t)fs_env.cfg->stream_window);
  if (rv != 0) {
    fs_pconn_broken(pc, "opening a stream window", rv);
    return;
  }
  fs_h2conn_mark(&pc->h2);
}

void fs_call_widen_down(fs_call *c, size_t len) {
  if (c->bytes[FS_DOWN] + len >= FS_CALL_FIRST_WINDOW / 2) widen(c, FS_DOWN);
}

/* Candidates to give way at --max-calls: this many of the calls idle longest. */
#define ADMIT_CANDIDATES 16

int fs_call_admit(const fs_pconn *pc) {
  fs_list_node *n;
  fs_call *old = NULL;
  uint64_t now = fs_now_ms();
  int seen = 0;
  fs_admit verdict = FS_ADMIT_REFUSE;
  if (fs_env.calls_open < fs_env.cfg->max_calls) return 0;
  fs_list_for_each(n, &fs_env.idle_calls) {
    const fs_pconn *oc;
    if (seen++ == ADMIT_CANDIDATES) break;
    old = fs_list_entry(n, fs_call, lru);
    oc = old->leg[FS_DOWN].conn;
    verdict = fs_policy_admit(fs_env.calls_open, fs_env.cfg->max_calls, now > old->t_moved ? now - old->t_moved : 0,
                              old->fl[FS_UP].data.len > 0, oc ? oc->nstreams : 0, pc->nstreams);
    if (verdict != FS_ADMIT_REFUSE) break;
  }
  switch (verdict) {
  case FS_ADMIT_OK:
    return 0;
  case FS_ADMIT_EVICT:
    fs_list_remove(&old->lru);
    fs_env.calls_open--;
    fs_env.stats.calls_evicted++;
    fs_call_fail(old, FS_GRPC_RESOURCE_EXHAUSTED,
                 "flower-sidecar: ended to admit another call (--max-calls %u reached; idle %" PRIu64 " ms)",
                 fs_env.cfg->max_calls, now - old->t_moved);
    /* Its client may read nothing (that is how calls sit idle): the reset
     * frees the streams whatever it does. */
    fs_call_rst(old, FS_DOWN, NGHTTP2_ENHANCE_YOUR_CALM);
    fs_call_maybe_free(old);
    return 0;
  case FS_ADMIT_REFUSE:
    break;
  }
  fs_env.stats.calls_refused++;
  return -1;
}

int fs_call_send_data(fs_call *c, int sink, fs_pconn *pc, const nghttp2_frame *frame, const uint8_t *framehd,
                      size_t length) {
  static const uint8_t zeros[256];
  fs_flow *f = &c->fl[!sink];
  size_t left = length, padlen = frame->data.padlen;
  fs_block *b;
  if (!fs_h2conn_writable(&pc->h2)) return NGHTTP2_ERR_WOULDBLOCK;
  fs_h2conn_write(&pc->h2, framehd, 9);
  if (padlen > 0) {
    uint8_t pl = (uint8_t)(padlen - 1);
    fs_h2conn_write(&pc->h2, &pl, 1);
  }
  for (b = f->data.head; b && left > 0; b = b->next) {
    size_t take = b->end - b->start;
    if (take > left) take = left;
    fs_h2conn_write(&pc->h2, b->data + b->start, take);
    left -= take;
  }
  while (left > 0) { /* the frame was promised |length| bytes; never short-send */
    size_t take = left < sizeof(zeros) ? left : sizeof(zeros);
    fs_h2conn_write(&pc->h2, zeros, take);
    left -= take;
  }
  if (padlen > 1) fs_h2conn_write(&pc->h2, zeros, padlen - 1);
  if (length > 0) moved(c);
  if (sink == FS_UP) replay_keep(c, &f->data, length);
  /* only a response larger than half the first window needs more */
  if (sink == FS_DOWN && length > 0 && c->bytes[FS_UP] >= FS_CALL_FIRST_WINDOW / 2) widen(c, FS_UP);
  fs_bufq_drop(&f->data, length);
  f->promised = 0;
  /* The bytes are on their way: let the sender send more (a replay's bytes
   * were acknowledged the first time). */
  if (f->noack) {
    size_t k = f->noack < length ? f->noack : length;
    f->noack -= k;
    length -= k;
  }
  fs_call_consume(c, !sink, length);
  return 0;
}

/* --- what arrives ------------------------------------------------------------------ */

void fs_call_recv_header(fs_call *c, int side, int trailer, nghttp2_rcbuf *name, nghttp2_rcbuf *value) {
  fs_hdrs *h = trailer ? &c->fl[side].trailers : &c->head[side];
  if (c->overflow) return;
  if (fs_hdrs_push(h, name, value, fs_env.cfg->max_header_list_size) < 0) c->overflow = 1;
}

void fs_call_recv_data(fs_call *c, int side, const uint8_t *data, size_t len) {
  fs_flow *f = &c->fl[side];
  if (f->discard) {
    fs_call_consume(c, side, len);
    return;
  }
  if (fs_grpcmsg_feed(&f->msgs, data, len, NULL, NULL) == FS_GRPCMSG_TOO_BIG) {
    fs_call_fail(c, FS_GRPC_RESOURCE_EXHAUSTED, "flower-sidecar: %s message larger than --max-message-size %u bytes",
                 side == FS_DOWN ? "request" : "response", fs_env.cfg->max_message_size);
    fs_call_consume(c, side, len);
    return;
  }
  c->bytes[side] += len;
  moved(c);
  fs_obs_data(c->obs, side, data, len);
  if (fs_bufq_append(&f->data, data, len) < 0) {
    /* Only a peer ignoring flow control, or no memory, gets here. */
    fs_call_fail(c, FS_GRPC_INTERNAL, "flower-sidecar: stream buffer limit exceeded");
    fs_call_consume(c, side, len);
    return;
  }
  fs_call_resume(c, !side);
}

int fs_call_recv_trailers(fs_call *c, int side) {
  if (c->overflow) {
    fs_call_fail(c, FS_GRPC_INTERNAL, "flower-sidecar: trailers exceed --max-header-list-size %u bytes",
                 fs_env.cfg->max_header_list_size);
    return -1;
  }
  if (side == FS_UP) fs_call_observe_status(c, &c->fl[FS_UP].trailers);
  return 0;
}

void fs_call_recv_end(fs_call *c, int side) {
  c->fl[side].eof = 1;
  if (c->fl[side].discard) fs_hdrs_clear(&c->fl[side].trailers);
  else fs_call_resume(c, !side);
}

void fs_call_respond(fs_call *c, int end) {
  fs_pconn *d = c->leg[FS_DOWN].conn;
  nghttp2_data_provider prd;
  int rv;
  if (!d || c->resp_started) return;
  prd = fs_call_provider(c, FS_DOWN);
  {
    nghttp2_nv nv[fs_hdrs_count(&c->head[FS_UP]) + 1];
    size_t n = fs_hdrs_nv(&c->head[FS_UP], nv, NULL);
    c->resp_started = 1;
    rv = nghttp2_submit_response(d->h2.session, c->leg[FS_DOWN].sid, nv, n, end ? NULL : &prd);
  }
  if (rv != 0) {
    fs_pconn_broken(d, "submitting a response", rv);
    return;
  }
  fs_h2conn_mark(&d->h2);
}

/* --- ending it ---------------------------------------------------------------------- */

void fs_call_method(const fs_call *c, char *out, size_t len) {
  if (c->path) {
    nghttp2_vec v = nghttp2_rcbuf_get_buf(c->path);
    snprintf(out, len, "%.*s", (int)v.len, (const char *)v.base);
  } else {
    snprintf(out, len, "?");
  }
}

void fs_call_log_error(fs_call *c, int status, const char *msg, size_t msglen) {
  fs_event ev;
  char method[256];
  if (!fs_ev_begin(&ev, FS_LOG_WARN, "rpc.error")) return;
  fs_call_method(c, method, sizeof(method));
  fs_ev_str(&ev, "method", method);
  fs_ev_i64(&ev, "grpc_status", status);
  fs_ev_strn(&ev, "grpc_message", msg, msglen);
  if (c->node_id) fs_ev_id(&ev, "node_id", c->node_id);
  if (c->leg[FS_DOWN].conn) fs_ev_str(&ev, "peer", c->leg[FS_DOWN].conn->h2.peer);
  fs_ev_u64(&ev, "duration_ms", fs_now_ms() - c->t_start);
  fs_ev_end(&ev);
}

void fs_call_observe_status(fs_call *c, const fs_hdrs *h) {
  nghttp2_vec st = fs_hdrs_get(h, "grpc-status"), msg;
  int status;
  if (c->finished) return;
  c->finished = 1;
  if (st.len) {
    status = fs_grpc_status_parse(st.base, st.len);
  } else {
    nghttp2_vec http = fs_hdrs_get(h, ":status");
    /* No grpc-status: a non-200 answer is an error, a bare 200 is not ours to judge. */
    status = http.len && (http.len != 3 || memcmp(http.base, "200", 3)) ? FS_GRPC_UNAVAILABLE : FS_GRPC_UNKNOWN;
  }
  fs_call_end(c, status);
  if (status == FS_GRPC_OK) return;
  msg = fs_hdrs_get(h, "grpc-message");
  fs_call_log_error(c, status, (const char *)msg.base, msg.len);
}

void fs_call_fail(fs_call *c, int status, const char *fmt, ...) {
  fs_pconn *d = c->leg[FS_DOWN].conn;
  va_list ap;
  int rv;
  va_start(ap, fmt);
  vsnprintf(c->synth_msg, sizeof(c->synth_msg), fmt, ap);
  va_end(ap);
  fs_list_remove(&c->qnode);
  fs_call_cancel_up(c, NGHTTP2_CANCEL);
  fs_call_discard(c, FS_DOWN);
  if (!d || c->finished) return; /* the caller frees a call with no legs */
  c->finished = 1;
  fs_call_end(c, status);
  fs_call_log_error(c, status, c->synth_msg, strlen(c->synth_msg));
  if (!c->resp_started) {
    /* Trailers-Only: nothing was sent to the client yet. */
    fs_grpc_reply r;
    fs_grpc_reply_init(&r, (fs_grpc_status)status, c->synth_msg, 1);
    c->resp_started = 1;
    c->fl[FS_UP].eof = 1;
    fs_call_discard(c, FS_UP); /* nothing more of the upstream's answer goes out */
    rv = nghttp2_submit_response(d->h2.session, c->leg[FS_DOWN].sid, r.nv, r.n, NULL);
    if (rv != 0) {
      fs_pconn_broken(d, "submitting a response", rv);
      return;
    }
  } else {
    /* Headers went out: end with trailers after what is already queued. */
    c->synth = 1;
    c->synth_status = status;
    fs_hdrs_clear(&c->fl[FS_UP].trailers);
    c->fl[FS_UP].eof = 1;
    c->fl[FS_UP].discard = 1; /* what is buffered goes out, then our trailers */
    c->fl[FS_UP].deferred = 1;
    fs_call_resume(c, FS_DOWN);
  }
  fs_h2conn_mark(&d->h2);
}
