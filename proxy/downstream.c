/* downstream: see downstream.h. */
#include "downstream.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "call.h"
#include "fleet.h"
#include "h2mem.h"
#include "log.h"
#include "net.h"
#include "policy.h"
#include "uppool.h"

typedef struct downconn {
  fs_pconn pc;     /* first: a downconn* is an fs_pconn* and an fs_h2conn* */
  uint8_t opened;  /* HTTP/2 runs: counted in connections, conn.close logged */
  uint8_t preface; /* the client's preface and SETTINGS arrived */
  fs_flood_count flood;
  fs_list_node node; /* in D.conns */
} downconn;

static struct {
  SSL_CTX *tls;
  void (*on_maybe_idle)(void);
  uv_tcp_t listener;
  uint8_t listening, stopped;
  fs_list_node conns;
  unsigned nconns;
  unsigned max_conns; /* --max-connections, or the open-file limit less FD_RESERVE */
  uv_timer_t drain_timer;
  nghttp2_session_callbacks *cbs;
  nghttp2_option *opt;
} D;

/* File descriptors kept for what must never starve: the admin port, the
 * upstream connections, the event log, name lookups. */
#define FD_RESERVE 128

static downconn *downconn_of(void *p) { return (downconn *)p; }

static uint64_t handshake_ms(void) { return (uint64_t)(fs_env.cfg->tls_handshake_timeout_s * 1000); }

int fs_downstream_listening(void) { return D.listening; }

void fs_downstream_set_tls(SSL_CTX *tls) {
  SSL_CTX *old = D.tls;
  if (!old || D.stopped) {
    SSL_CTX_free(tls);
    return;
  }
  D.tls = tls;
  SSL_CTX_free(old); /* handshakes in progress hold their own reference (SSL_new) */
}
unsigned fs_downstream_conns(void) { return D.nconns; }

static void idle_timer_update(fs_pconn *pc) {
  fs_h2conn *h = &pc->h2;
  uint64_t ms = 0;
  switch (fs_policy_idle(h->tls_ready && downconn_of(pc)->preface, h->closing, pc->nstreams, pc->rpcs > 0,
                         (uint64_t)(fs_env.cfg->idle_timeout_s * 1000), &ms)) {
  case FS_IDLE_STOP:
    fs_h2conn_set_timer(h, 0);
    break;
  case FS_IDLE_ARM:
    if (!uv_is_active((uv_handle_t *)&h->timer)) fs_h2conn_set_timer(h, ms);
    break;
  case FS_IDLE_ASIS:
    break;
  }
}

/* --- nghttp2 callbacks of client sessions ------------------------------------------ */

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *frame, void *ud) {
  downconn *d = downconn_of(ud);
  fs_call *c;
  int rv;
  if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  if (fs_call_admit(&d->pc) < 0) {
    /* No call: what else arrives on the stream is ignored (on_header,
     * on_data_chunk) until the reset closes it. */
    if ((rv = nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, frame->hd.stream_id, NGHTTP2_REFUSED_STREAM)) != 0)
      return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    fs_h2conn_mark(&d->pc.h2);
    return 0;
  }
  if (!(c = fs_call_new())) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
  if ((rv = nghttp2_session_set_stream_user_data(s, frame->hd.stream_id, c)) != 0) {
    fs_call_maybe_free(c);
    return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* nghttp2 resets the stream */
  }
  fs_call_attach(c, FS_DOWN, &d->pc, frame->hd.stream_id);
  idle_timer_update(&d->pc);
  return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, nghttp2_rcbuf *name, nghttp2_rcbuf *value,
                     uint8_t flags, void *ud) {
  fs_call *c = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
  uint64_t seen;
  (void)flags;
  if (!c || frame->hd.type != NGHTTP2_HEADERS) return 0;
  seen = (uint64_t)c->hdr_seen + nghttp2_rcbuf_get_buf(name).len + nghttp2_rcbuf_get_buf(value).len + 32;
  c->hdr_seen = seen > UINT32_MAX ? UINT32_MAX : (uint32_t)seen;
  if (fs_policy_header_abuse(seen, fs_env.cfg->max_header_list_size)) {
    fs_pconn *pc = ud;
    snprintf(pc->h2.close_reason, sizeof(pc->h2.close_reason),
             "header abuse: a header block decoded to over %u bytes (--max-header-list-size %u x %d)",
             fs_env.cfg->max_header_list_size * FS_POLICY_HEADER_ABUSE_FACTOR, fs_env.cfg->max_header_list_size,
             FS_POLICY_HEADER_ABUSE_FACTOR);
    /* GOAWAY ENHANCE_YOUR_CALM if it can still go out; decoding stops here
     * either way (the callback failure ends nghttp2_session_mem_recv). */
    (void)nghttp2_session_terminate_session(s, NGHTTP2_ENHANCE_YOUR_CALM);
    return NGHTTP2_ERR_CALLBACK_FAILURE;
  }
  if (c->overflow) return 0;
  fs_call_recv_header(c, FS_DOWN, frame->headers.cat == NGHTTP2_HCAT_HEADERS, name, value);
  if (!c->path && !c->overflow) {
    nghttp2_vec k = nghttp2_rcbuf_get_buf(name);
    if (k.len == 5 && !memcmp(k.base, ":path", 5)) {
      nghttp2_rcbuf_incref(value);
      c->path = value;
    }
  }
  return 0;
}

static void on_request_headers(fs_call *c, const nghttp2_frame *frame) {
  if (c->overflow) {
    fs_call_fail(c, FS_GRPC_RESOURCE_EXHAUSTED,
                 "flower-sidecar: request headers exceed --max-header-list-size %u bytes",
                 fs_env.cfg->max_header_list_size);
    return;
  }
  if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) c->fl[FS_DOWN].eof = 1;
  if (c->path) {
    nghttp2_vec p = nghttp2_rcbuf_get_buf(c->path);
    c->method = (uint8_t)fs_fleet_method_of(p.base, p.len);
    if (c->method != FS_FLEET_NONE && fs_env.cfg->observe)
      c->obs = fs_obs_start(p.base, p.len, c->leg[FS_DOWN].conn->h2.peer);
  }
  fs_uppool_route(c);
}

/* Frames that carry nothing: counted against policy.h's flood limits.
 * Returns 0, or NGHTTP2_ERR_CALLBACK_FAILURE after ending the session. */
static int flood_check(nghttp2_session *s, const nghttp2_frame *frame, downconn *d) {
  fs_flood_count *f = &d->flood;
  const char *what;
  switch (frame->hd.type) {
  case NGHTTP2_DATA:
    if (frame->hd.length == 0 && !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) f->empty_in_a_row++;
    else f->empty_in_a_row = 0;
    break;
  case NGHTTP2_HEADERS:
    f->empty_in_a_row = 0;
    if (frame->headers.cat == NGHTTP2_HCAT_REQUEST) f->streams++;
    break;
  case NGHTTP2_PRIORITY:
    f->priority++;
    break;
  case NGHTTP2_WINDOW_UPDATE:
    f->window_updates++;
    break;
  default:
    return 0;
  }
  if (!(what = fs_policy_flood(f))) return 0;
  snprintf(d->pc.h2.close_reason, sizeof(d->pc.h2.close_reason), "flood: too many %s", what);
  (void)nghttp2_session_terminate_session(s, NGHTTP2_ENHANCE_YOUR_CALM);
  return NGHTTP2_ERR_CALLBACK_FAILURE;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *ud) {
  fs_call *c;
  if (flood_check(s, frame, downconn_of(ud)) != 0) return NGHTTP2_ERR_CALLBACK_FAILURE;
  switch (frame->hd.type) {
  case NGHTTP2_SETTINGS:
    if (!(frame->hd.flags & NGHTTP2_FLAG_ACK) && !downconn_of(ud)->preface) {
      /* The client spoke HTTP/2: the preface timer gives way to the idle one. */
      downconn_of(ud)->preface = 1;
      fs_h2conn_set_timer(ud, 0);
      idle_timer_update(ud);
    }
    return 0;
  case NGHTTP2_GOAWAY:
    fs_pconn_note_goaway(ud, frame);
    return 0;
  case NGHTTP2_HEADERS:
  case NGHTTP2_DATA:
    break;
  default:
    return 0;
  }
  if (!(c = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id))) return 0;
  if (frame->hd.type == NGHTTP2_HEADERS) {
    if (frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
      on_request_headers(c, frame);
      return 0;
    }
    if (frame->headers.cat == NGHTTP2_HCAT_HEADERS && fs_call_recv_trailers(c, FS_DOWN) < 0) return 0;
  }
  if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) fs_call_recv_end(c, FS_DOWN);
  return 0;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data, size_t len, void *ud) {
  fs_call *c = nghttp2_session_get_stream_user_data(s, sid);
  int rv;
  (void)flags;
  if (c) {
    fs_call_widen_down(c, len);
    fs_call_recv_data(c, FS_DOWN, data, len);
  } else if ((rv = nghttp2_session_consume(s, sid, len)) != 0) {
    /* A stream we do not know (reset by us): its bytes still count. */
    fs_pconn_broken(ud, "returning flow control credit", rv);
  }
  return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t sid, uint32_t code, void *ud) {
  fs_call *c = nghttp2_session_get_stream_user_data(s, sid);
  (void)ud;
  if (!c) return 0;
  if (c->leg[FS_UP].conn && !c->finished) {
    char msg[96];
    snprintf(msg, sizeof(msg), "client reset the stream (%s)", nghttp2_http2_strerror(code));
    c->finished = 1;
    fs_call_end(c, FS_GRPC_CANCELLED);
    fs_call_log_error(c, FS_GRPC_CANCELLED, msg, strlen(msg));
  }
  fs_call_detach(c, FS_DOWN);
  fs_list_remove(&c->qnode);
  fs_call_cancel_up(c, code ? code : NGHTTP2_CANCEL);
  fs_call_maybe_free(c);
  return 0;
}

static int on_frame_send(nghttp2_session *s, const nghttp2_frame *frame, void *ud) {
  int rv;
  if (frame->hd.type == NGHTTP2_DATA && downconn_of(ud)->flood.data_sent < UINT32_MAX)
    downconn_of(ud)->flood.data_sent++;
  if (frame->hd.type == NGHTTP2_GOAWAY) {
    fs_pconn_note_sent_goaway(ud, frame);
    return 0;
  }
  /* Our response ended while the client is still sending: tell it to stop
   * (RFC 9113 8.1) so the stream closes without waiting for its body. */
  if (!(frame->hd.flags & NGHTTP2_FLAG_END_STREAM) ||
      (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA))
    return 0;
  if (nghttp2_session_get_stream_user_data(s, frame->hd.stream_id) &&
      nghttp2_session_get_stream_remote_close(s, frame->hd.stream_id) == 0 &&
      (rv = nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, frame->hd.stream_id, NGHTTP2_NO_ERROR)) != 0)
    fs_pconn_broken(ud, "resetting a finished stream", rv);
  return 0;
}

static int send_data(nghttp2_session *s, nghttp2_frame *frame, const uint8_t *framehd, size_t length,
                     nghttp2_data_source *src, void *ud) {
  (void)s;
  return fs_call_send_data(src->ptr, FS_DOWN, ud, frame, framehd, length);
}

/* --- connections --------------------------------------------------------------------- */

static void log_open(fs_h2conn *h) {
  fs_event ev;
  if (!fs_ev_begin(&ev, FS_LOG_INFO, "conn.open")) return;
  fs_ev_str(&ev, "peer", h->peer);
  if (h->ssl) {
    X509 *cert = SSL_get1_peer_certificate(h->ssl);
    fs_ev_str(&ev, "tls_version", SSL_get_version(h->ssl));
    fs_ev_str(&ev, "alpn", "h2");
    if (cert) {
      char subj[256];
      X509_NAME_oneline(X509_get_subject_name(cert), subj, sizeof(subj));
      fs_ev_str(&ev, "client_cert", subj);
      X509_free(cert);
    }
  } else {
    fs_ev_str(&ev, "alpn", "h2c");
  }
  fs_ev_end(&ev);
}

static int conn_ready(fs_h2conn *h) {
  downconn *d = downconn_of(h);
  const fs_config *cfg = fs_env.cfg;
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, cfg->max_concurrent_streams},
      /* widened to --stream-window when a body comes and the pool has room */
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE,
       cfg->stream_window < FS_CALL_FIRST_WINDOW ? cfg->stream_window : FS_CALL_FIRST_WINDOW},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, cfg->max_header_list_size},
  };
  /* The client's preface and SETTINGS must follow within the handshake
   * timeout (h2c clients included: they never had a TLS timer). */
  fs_h2conn_set_timer(h, handshake_ms());
  if (fs_h2conn_session_new(h, 1, D.cbs, D.opt) != 0 ||
      nghttp2_submit_settings(h->session, NGHTTP2_FLAG_NONE, iv, 3) != 0 ||
      nghttp2_session_set_local_window_size(h->session, NGHTTP2_FLAG_NONE, 0, (int32_t)cfg->conn_window) != 0) {
    snprintf(h->close_reason, sizeof(h->close_reason), "out of memory");
    return -1;
  }
  d->opened = 1;
  fs_env.stats.conns_current++;
  log_open(h);
  if (fs_env.draining) fs_pconn_goaway(&d->pc, "draining");
  idle_timer_update(&d->pc);
  fs_h2conn_mark(h);
  return 0;
}

static void conn_tls_fail(fs_h2conn *h, const char *reason) {
  fs_event ev;
  fs_env.stats.tls_failures++;
  if (fs_ev_begin(&ev, FS_LOG_WARN, "tls.fail")) {
    fs_ev_str(&ev, "peer", h->peer);
    fs_ev_str(&ev, "reason", reason);
    fs_ev_end(&ev);
  }
}

static void conn_closing(fs_h2conn *h, const char *reason) {
  downconn *d = downconn_of(h);
  fs_list_node *n;
  fs_event ev;
  while ((n = fs_list_first(&d->pc.calls))) {
    fs_call *c = fs_list_entry(n, fs_call, leg[FS_DOWN].node);
    fs_call_detach(c, FS_DOWN);
    fs_list_remove(&c->qnode);
    fs_call_cancel_up(c, NGHTTP2_CANCEL);
    fs_call_maybe_free(c);
  }
  if (!d->opened) return;
  fs_env.stats.conns_current--;
  if (fs_ev_begin(&ev, FS_LOG_INFO, "conn.close")) {
    fs_ev_str(&ev, "peer", h->peer);
    fs_ev_u64(&ev, "duration_ms", fs_now_ms() - h->opened_ms);
    fs_ev_u64(&ev, "bytes_in", h->bytes_in);
    fs_ev_u64(&ev, "bytes_out", h->bytes_out);
    fs_ev_u64(&ev, "rpcs", d->pc.rpcs);
    fs_ev_str(&ev, "reason", reason);
    fs_ev_end(&ev);
  }
}

static void conn_freed(fs_h2conn *h) {
  downconn *d = downconn_of(h);
  fs_list_remove(&d->node);
  D.nconns--;
  free(d);
  if (D.on_maybe_idle) D.on_maybe_idle();
}

static void conn_timer(fs_h2conn *h) {
  downconn *d = downconn_of(h);
  if (!h->tls_ready) {
    conn_tls_fail(h, "TLS handshake timeout");
    fs_h2conn_close(h, "TLS handshake timeout");
  } else if (!d->preface) {
    char why[96];
    snprintf(why, sizeof(why), "no HTTP/2 preface within %gs", fs_env.cfg->tls_handshake_timeout_s);
    fs_h2conn_close(h, why);
  } else if (d->pc.nstreams == 0) {
    fs_pconn_goaway(&d->pc, "idle timeout");
  }
}

static const fs_h2conn_ops conn_ops = {.on_ready = conn_ready,
                                       .on_tls_fail = conn_tls_fail,
                                       .on_closing = conn_closing,
                                       .on_freed = conn_freed,
                                       .on_timer = conn_timer};

static void on_refused_closed(uv_handle_t *h) { free(h); }

/* At --max-connections: take the connection off the backlog and close it
 * at once, so the descriptors kept in reserve stay free. */
static void refuse(uv_stream_t *server) {
  uv_tcp_t *t = malloc(sizeof(*t));
  fs_event ev;
  if (!t) return;
  if (uv_tcp_init(fs_env.loop, t) < 0) {
    free(t);
    return;
  }
  if (uv_accept(server, (uv_stream_t *)t) == 0) {
    fs_env.stats.conns_refused++;
    if (fs_ev_begin(&ev, FS_LOG_WARN, "conn.refused")) {
      char peer[64];
      fs_net_peer_name(t, peer, sizeof(peer));
      fs_ev_str(&ev, "peer", peer);
      fs_ev_u64(&ev, "max_connections", D.max_conns);
      fs_ev_end(&ev);
    }
  }
  uv_close((uv_handle_t *)t, on_refused_closed);
}

static void on_accept(uv_stream_t *server, int status) {
  downconn *d;
  if (status < 0 || fs_env.draining) return;
  if (D.nconns >= D.max_conns) {
    refuse(server);
    return;
  }
  if (!(d = calloc(1, sizeof(*d)))) return;
  if (fs_h2conn_init(&d->pc.h2, fs_env.loop, &conn_ops) < 0) {
    free(d);
    return;
  }
  fs_pconn_init(&d->pc, FS_DOWN);
  d->pc.calls_changed = idle_timer_update;
  fs_list_push_front(&D.conns, &d->node);
  D.nconns++;
  if (uv_accept(server, (uv_stream_t *)&d->pc.h2.tcp) < 0) {
    fs_h2conn_close(&d->pc.h2, "accept failed");
    return;
  }
  fs_env.stats.conns_total++;
  fs_net_peer_name(&d->pc.h2.tcp, d->pc.h2.peer, sizeof(d->pc.h2.peer));
  if (D.tls) fs_h2conn_set_timer(&d->pc.h2, handshake_ms());
  /* On failure the connection is closed already and frees itself. */
  (void)fs_h2conn_start(&d->pc.h2, D.tls, 1, NULL, NULL);
}

/* --- the listener's life ------------------------------------------------------------- */

int fs_downstream_start(SSL_CTX *tls, void (*on_maybe_idle)(void), char *err, size_t errlen) {
  memset(&D, 0, sizeof(D));
  D.tls = tls;
  D.on_maybe_idle = on_maybe_idle;
  fs_list_init(&D.conns);
  D.max_conns = fs_env.cfg->max_connections;
  if (D.max_conns == 0) {
    struct rlimit rl;
    rlim_t n = getrlimit(RLIMIT_NOFILE, &rl) == 0 ? rl.rlim_cur : 1024;
    D.max_conns = n == RLIM_INFINITY || n > 10000000 ? 10000000 : n > FD_RESERVE + 16 ? (unsigned)(n - FD_RESERVE) : 16;
  }
  if (nghttp2_session_callbacks_new(&D.cbs) != 0 || nghttp2_option_new(&D.opt) != 0) {
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  fs_h2conn_set_callbacks(D.cbs);
  nghttp2_session_callbacks_set_on_begin_headers_callback(D.cbs, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback2(D.cbs, on_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(D.cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(D.cbs, on_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(D.cbs, on_stream_close);
  nghttp2_session_callbacks_set_on_frame_send_callback(D.cbs, on_frame_send);
  nghttp2_session_callbacks_set_send_data_callback(D.cbs, send_data);
  nghttp2_option_set_no_auto_window_update(D.opt, 1);
  (void)uv_timer_init(fs_env.loop, &D.drain_timer); /* cannot fail on a live loop */

  {
    int opened = 0, rv = fs_net_listen(fs_env.loop, &D.listener, fs_env.cfg->listen, "0.0.0.0", "--listen", 1024,
                                       on_accept, &opened, err, errlen);
    D.listening = (uint8_t)opened; /* from here fs_downstream_drain() closes the listener */
    if (rv < 0) return -1;
  }
  return 0;
}

static void on_drain_timeout(uv_timer_t *t) {
  fs_list_node *n, *tmp;
  (void)t;
  fs_list_for_each_safe(n, tmp, &D.conns) fs_h2conn_close(&fs_list_entry(n, downconn, node)->pc.h2, "drain timeout");
}

void fs_downstream_drain(uint64_t timeout_ms) {
  fs_list_node *n, *tmp;
  if (D.listening) {
    D.listening = 0;
    uv_close((uv_handle_t *)&D.listener, NULL);
  }
  fs_list_for_each_safe(n, tmp, &D.conns) {
    downconn *d = fs_list_entry(n, downconn, node);
    if (!d->pc.h2.tls_ready) fs_h2conn_close(&d->pc.h2, "draining");
    else fs_pconn_goaway(&d->pc, "draining");
  }
  (void)uv_timer_start(&D.drain_timer, on_drain_timeout, timeout_ms, 0); /* only fails for a closing handle */
}

void fs_downstream_stop(void) {
  uv_close((uv_handle_t *)&D.drain_timer, NULL);
  nghttp2_session_callbacks_del(D.cbs);
  nghttp2_option_del(D.opt);
  SSL_CTX_free(D.tls);
  D.tls = NULL;
  D.stopped = 1;
}
