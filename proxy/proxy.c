/*
 * proxy: see proxy.h.
 *
 * A call joins two legs: leg[DOWN] is the client's stream on a downstream
 * connection, leg[UP] the stream opened for it on an upstream connection.
 * Bytes received on leg L are kept in fl[L] until they are sent on leg !L;
 * only then are they consumed on leg L (WINDOW_UPDATE to the sender).
 * The call is freed when both legs are detached.
 */
#include "proxy.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <nghttp2/nghttp2.h>
#include <openssl/x509.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <unistd.h>

#include "backoff.h"
#include "bufq.h"
#include "grpc.h"
#include "grpcmsg.h"
#include "policy.h"
#include "h2conn.h"
#include "h2mem.h"
#include "keepalive.h"
#include "log.h"
#include "metrics.h"
#include "observe.h"

enum { DOWN = 0, UP = 1 };

enum { GRPC_CANCELLED = 1, GRPC_INTERNAL = 13, GRPC_RESOURCE_EXHAUSTED = 8, GRPC_UNAVAILABLE = 14 };

/* Fields per header block, at most: bounds the nghttp2_nv arrays on the stack. */
#define FS_MAX_FIELDS 256

/* Header fields of one block, kept as nghttp2's refcounted buffers: no copy. */
typedef struct hdrs {
  nghttp2_rcbuf **v; /* name, value, name, value, ... */
  uint32_t n, cap;   /* entries in v */
  uint32_t bytes;    /* RFC 7541 size: name + value + 32 per field */
} hdrs;

typedef struct flow {
  fs_bufq data;     /* received on this leg, not yet sent on the other */
  fs_grpcmsg msgs;  /* message boundaries, for the size limit */
  hdrs trailers;    /* to send once data is drained */
  uint8_t eof;      /* END_STREAM received */
  uint8_t deferred; /* the sink's data provider waits for data */
  uint8_t discard;  /* the sink is gone: consume and drop */
  size_t promised;  /* bytes a DATA frame of the sink's session will take: never dropped */
  size_t noack;     /* bytes at the front already acknowledged to their sender (a retry's replay) */
} flow;

/* A call is repeated at most this many times. */
#define FS_MAX_RETRIES 3

typedef struct pconn pconn;
typedef struct call call;

struct leg {
  pconn *conn;
  int32_t sid;
  call *prev, *next; /* the connection's calls */
};

struct call {
  struct leg leg[2];
  flow fl[2];
  hdrs head[2];        /* request headers until sent upstream; response headers */
  nghttp2_rcbuf *path; /* kept for events */
  fs_obs *obs;         /* Fleet observation, NULL for other methods */
  uint64_t node_id;    /* the node the request named (observed), 0 unknown */
  uint64_t bytes[2];   /* gRPC payload bytes received on each leg */
  uint8_t method;      /* fs_fleet_method */
  uint8_t ended;       /* call_end() ran */
  uint64_t t_start;
  call *qprev, *qnext;  /* waiting for an upstream connection */
  uint64_t hold_until;  /* queued: wait for an upstream until then; 0 = fail when none can be had */
  uint64_t deadline;    /* the client's own (grpc-timeout), 0: none */
  uint64_t t_sent;      /* when the current attempt went upstream */
  uint64_t probe_ms;    /* when a PING probed its connection for it; 0: not yet */
  uint8_t stall_done;   /* checked once: left to its own deadline */
  fs_bufq replay;       /* request bytes sent upstream, kept to repeat the call */
  uint8_t replay_on;    /* replay holds every byte sent on this attempt */
  uint8_t up_headers;   /* response headers arrived: the upstream processed the call */
  uint8_t req_trailers; /* request trailers were sent (not kept: no retry) */
  uint8_t attempts;     /* repeats made */
  uint8_t queued, resp_started, overflow, finished, synth;
  int synth_status;
  char synth_msg[240];
};

struct pconn {
  fs_h2conn h2; /* first: a pconn* is an fs_h2conn* */
  uint8_t upstream, ready, goaway, opened;
  uint32_t nstreams;
  fs_keepalive ka;      /* node role: upstream liveness */
  uint64_t ping_t0;     /* when our outstanding PING was sent, for its round trip */
  uint64_t ping_ack_ms; /* when the last PING ACK arrived (loop clock); 0: never */
  uint64_t rpcs;
  call *calls;
  pconn *prev, *next;
  uv_connect_t creq;
};

static struct {
  uv_loop_t *loop;
  const fs_config *cfg;
  SSL_CTX *down_ctx, *up_ctx;
  uv_tcp_t listener;
  uint8_t listening, draining, stopped, upstream_up, resolving;
  pconn *downs, *ups;
  uint32_t ndowns, nups, nups_connecting;
  call *qhead, *qtail;
  char up_host[256];
  int up_port;
  char up_name[300]; /* "host:port" or "[v6]:port", for events and messages */
  struct sockaddr_storage up_addr;
  int up_addr_ok;
  uv_getaddrinfo_t gai;
  fs_backoff backoff;
  uv_timer_t reconnect_timer, drain_timer, hold_timer;
  uint64_t ka_time_ms;             /* doubled after GOAWAY too_many_pings */
  size_t replay_total, replay_max; /* bytes kept for retries, all calls */
  char up_error[400];
  nghttp2_session_callbacks *cbs;
  nghttp2_option *down_opt, *up_opt;
  fs_proxy_stats stats;
  void (*on_stopped)(void);
} P;

static void up_connect(void);
static void up_log_down(const char *reason);
static void schedule_reconnect(void);
static void maybe_stopped(void);

const fs_proxy_stats *fs_proxy_get_stats(void) { return &P.stats; }
int fs_proxy_upstream_up(void) { return P.upstream_up; }
int fs_proxy_draining(void) { return P.draining; }
int fs_proxy_listening(void) { return P.listening; }
const char *fs_proxy_upstream_error(void) { return P.up_error; }

static void (*state_cb)(void);
void fs_proxy_on_state_change(void (*cb)(void)) { state_cb = cb; }
static void state_changed(void) {
  if (state_cb) state_cb();
}

/* --- small helpers --------------------------------------------------------- */

static void hdrs_clear(hdrs *h) {
  uint32_t i;
  for (i = 0; i < h->n; i++) nghttp2_rcbuf_decref(h->v[i]);
  free(h->v);
  memset(h, 0, sizeof(*h));
}

/* Returns 0, or -1 when the block would exceed the header list limit. */
static int hdrs_push(hdrs *h, nghttp2_rcbuf *name, nghttp2_rcbuf *value) {
  size_t add = nghttp2_rcbuf_get_buf(name).len + nghttp2_rcbuf_get_buf(value).len + 32;
  if (h->bytes + add > P.cfg->max_header_list_size || h->n >= 2 * FS_MAX_FIELDS) return -1;
  if (h->n + 2 > h->cap) {
    uint32_t cap = h->cap ? h->cap * 2 : 16;
    nghttp2_rcbuf **v = realloc(h->v, cap * sizeof(*v));
    if (!v) return -1;
    h->v = v;
    h->cap = cap;
  }
  nghttp2_rcbuf_incref(name);
  nghttp2_rcbuf_incref(value);
  h->v[h->n++] = name;
  h->v[h->n++] = value;
  h->bytes += (uint32_t)add;
  return 0;
}

/* Builds nghttp2_nv entries pointing into |h| (valid while |h| lives). When
 * |scheme| is set, :scheme is rewritten for the upstream hop. */
static size_t hdrs_nv(const hdrs *h, nghttp2_nv *nv, const char *scheme) {
  uint32_t i;
  size_t n = 0;
  for (i = 0; i < h->n; i += 2) {
    nghttp2_vec name = nghttp2_rcbuf_get_buf(h->v[i]), value = nghttp2_rcbuf_get_buf(h->v[i + 1]);
    nv[n].name = name.base;
    nv[n].namelen = name.len;
    nv[n].value = value.base;
    nv[n].valuelen = value.len;
    if (scheme && name.len == 7 && !memcmp(name.base, ":scheme", 7)) {
      nv[n].value = (uint8_t *)scheme;
      nv[n].valuelen = strlen(scheme);
    }
    /* nghttp2 copies: the rcbufs are released right after submitting. */
    nv[n].flags = NGHTTP2_NV_FLAG_NONE;
    n++;
  }
  return n;
}

/* Finds |name| in |h|; returns its value or a zero-length vector. */
static nghttp2_vec hdrs_get(const hdrs *h, const char *name) {
  uint32_t i;
  size_t nl = strlen(name);
  nghttp2_vec none = {NULL, 0};
  for (i = 0; i < h->n; i += 2) {
    nghttp2_vec k = nghttp2_rcbuf_get_buf(h->v[i]);
    if (k.len == nl && !memcmp(k.base, name, nl)) return nghttp2_rcbuf_get_buf(h->v[i + 1]);
  }
  return none;
}

static pconn *conn_of(fs_h2conn *c) { return (pconn *)c; }

/* Nonzero while an upstream connection takes new calls: SETTINGS arrived
 * and no GOAWAY. */
static int any_up_ready(void) {
  pconn *u;
  for (u = P.ups; u; u = u->next)
    if (u->ready && !u->goaway && !u->h2.closing) return 1;
  return 0;
}

static void peer_name(uv_tcp_t *t, char *out, size_t len) {
  struct sockaddr_storage ss;
  int sl = sizeof(ss);
  char host[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  out[0] = '\0';
  if (uv_tcp_getpeername(t, (struct sockaddr *)&ss, &sl) < 0) return;
  if (ss.ss_family == AF_INET6) {
    uv_ip6_name((struct sockaddr_in6 *)&ss, host, sizeof(host));
    port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    snprintf(out, len, "[%s]:%d", host, port);
  } else {
    uv_ip4_name((struct sockaddr_in *)&ss, host, sizeof(host));
    port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    snprintf(out, len, "%s:%d", host, port);
  }
}

/* --- call lifecycle --------------------------------------------------------- */

static void list_add(call **head, call *c, int side) {
  c->leg[side].prev = NULL;
  c->leg[side].next = *head;
  if (*head) (*head)->leg[side].prev = c;
  *head = c;
}

static void list_del(call **head, call *c, int side) {
  if (c->leg[side].prev) c->leg[side].prev->leg[side].next = c->leg[side].next;
  else *head = c->leg[side].next;
  if (c->leg[side].next) c->leg[side].next->leg[side].prev = c->leg[side].prev;
  c->leg[side].prev = c->leg[side].next = NULL;
}

static void queue_del(call *c) {
  if (!c->queued) return;
  if (c->qprev) c->qprev->qnext = c->qnext;
  else P.qhead = c->qnext;
  if (c->qnext) c->qnext->qprev = c->qprev;
  else P.qtail = c->qprev;
  c->qprev = c->qnext = NULL;
  c->queued = 0;
}

static void queue_add(call *c) {
  c->queued = 1;
  c->qnext = NULL;
  c->qprev = P.qtail;
  if (P.qtail) P.qtail->qnext = c;
  else P.qhead = c;
  P.qtail = c;
}

static call *call_new(void) {
  call *c = calloc(1, sizeof(*c));
  int i;
  if (!c) return NULL;
  for (i = 0; i < 2; i++) {
    /* One stream window plus a frame: the peer cannot legally send more. */
    fs_bufq_init(&c->fl[i].data, (size_t)P.cfg->stream_window + 16384);
    fs_grpcmsg_init(&c->fl[i].msgs, P.cfg->max_message_size);
  }
  fs_bufq_init(&c->replay, P.cfg->retry_buffer);
  c->replay_on = P.cfg->retry_buffer > 0;
  c->t_start = fs_now_ms();
  P.stats.calls_total++;
  return c;
}

/* The call's final gRPC status is known: count it and end observation.
 * Runs once per call. */
static void call_end(call *c, int status) {
  if (c->ended) return;
  c->ended = 1;
  fs_metrics_call((fs_fleet_method)c->method, status, fs_now_ms() - c->t_start, c->bytes[DOWN], c->bytes[UP]);
  if (c->obs) {
    c->node_id = fs_obs_node_id(c->obs); /* for rpc.error, logged after */
    fs_obs_finish(c->obs, status);
  }
  c->obs = NULL;
}

/* The call can no longer be repeated: let go of what was kept for it. */
static void replay_off(call *c) {
  P.replay_total -= c->replay.len;
  fs_bufq_reset(&c->replay);
  c->replay_on = 0;
  hdrs_clear(&c->head[DOWN]);
}

/* Keeps a copy of the first |n| bytes of |q|, about to be sent upstream. */
static void replay_keep(call *c, const fs_bufq *q, size_t n) {
  const fs_block *b;
  if (!c->replay_on || n == 0) return;
  if (c->replay.len + n > P.cfg->retry_buffer || P.replay_total + n > P.replay_max) {
    replay_off(c);
    return;
  }
  for (b = q->head; b && n > 0; b = b->next) {
    size_t take = b->end - b->start < n ? b->end - b->start : n;
    if (fs_bufq_append(&c->replay, b->data + b->start, take) < 0) {
      replay_off(c);
      return;
    }
    P.replay_total += take;
    n -= take;
  }
}

static void call_free(call *c) {
  int i;
  call_end(c, GRPC_CANCELLED); /* ended by a lost connection */
  queue_del(c);
  replay_off(c);
  for (i = 0; i < 2; i++) {
    fs_bufq_reset(&c->fl[i].data);
    hdrs_clear(&c->fl[i].trailers);
    hdrs_clear(&c->head[i]);
  }
  if (c->path) nghttp2_rcbuf_decref(c->path);
  free(c);
}

static void maybe_free(call *c) {
  if (!c->leg[DOWN].conn && !c->leg[UP].conn && !c->queued) call_free(c);
}

static void idle_timer_update(pconn *d);

/* Consumes |n| bytes received on leg |side| so its sender may send more. */
static void consume(call *c, int side, size_t n) {
  pconn *pc = c->leg[side].conn;
  if (!pc || n == 0 || pc->h2.closing) return;
  /* Upstream connections consume connection-level credit on receipt (see
   * on_data_chunk), so one slow client never stalls the shared connection. */
  if (pc->upstream) nghttp2_session_consume_stream(pc->h2.session, c->leg[side].sid, n);
  else nghttp2_session_consume(pc->h2.session, c->leg[side].sid, n);
  fs_h2conn_mark(&pc->h2);
}

/* Drops what fl[side] holds (except what an nghttp2 DATA frame was already
 * promised) and everything that arrives later. */
static void flow_discard(call *c, int side) {
  flow *f = &c->fl[side];
  size_t acked = f->promised > f->noack ? f->promised : f->noack;
  f->discard = 1;
  if (f->data.len > acked) consume(c, side, f->data.len - acked);
  if (f->noack > f->promised) f->noack = f->promised;
  if (f->data.len > f->promised) fs_bufq_keep(&f->data, f->promised);
}

static void rst_leg(call *c, int side, uint32_t code);

/* Cancels the upstream stream.  The leg stays attached until nghttp2 closes
 * the stream (on_stream_close): until then a DATA frame of it may still be
 * in flight inside the session, pointing at this call. */
static void cancel_up(call *c, uint32_t code) {
  if (!c->leg[UP].conn) return;
  rst_leg(c, UP, code);
  flow_discard(c, DOWN);
}

/* Unlinks the call from leg |side|'s connection, keeping what the other
 * leg sent (the call may go on elsewhere). */
static void detach_keep(call *c, int side) {
  pconn *pc = c->leg[side].conn;
  if (!pc) return;
  list_del(&pc->calls, c, side);
  if (!pc->h2.closing) nghttp2_session_set_stream_user_data(pc->h2.session, c->leg[side].sid, NULL);
  c->leg[side].conn = NULL;
  pc->nstreams--;
  if (!pc->upstream) idle_timer_update(pc);
}

static void detach(call *c, int side) {
  if (!c->leg[side].conn) return;
  detach_keep(c, side);
  /* Nothing will ever take what the other leg sends now. */
  flow_discard(c, !side);
}

static void rst_leg(call *c, int side, uint32_t code) {
  pconn *pc = c->leg[side].conn;
  if (!pc || pc->h2.closing) return;
  nghttp2_submit_rst_stream(pc->h2.session, NGHTTP2_FLAG_NONE, c->leg[side].sid, code);
  fs_h2conn_mark(&pc->h2);
}

static void resume(call *c, int sink) {
  pconn *pc = c->leg[sink].conn;
  flow *f = &c->fl[!sink];
  if (!pc || !f->deferred || pc->h2.closing) return;
  f->deferred = 0;
  nghttp2_session_resume_data(pc->h2.session, c->leg[sink].sid);
  fs_h2conn_mark(&pc->h2);
}

static void method_of(const call *c, char *out, size_t len) {
  if (c->path) {
    nghttp2_vec v = nghttp2_rcbuf_get_buf(c->path);
    snprintf(out, len, "%.*s", (int)v.len, (const char *)v.base);
  } else {
    snprintf(out, len, "?");
  }
}

static void log_rpc_error(call *c, int status, const char *msg, size_t msglen) {
  fs_event ev;
  char method[256];
  P.stats.calls_failed++;
  if (!fs_ev_begin(&ev, FS_LOG_WARN, "rpc.error")) return;
  method_of(c, method, sizeof(method));
  fs_ev_str(&ev, "method", method);
  fs_ev_i64(&ev, "grpc_status", status);
  fs_ev_strn(&ev, "grpc_message", msg, msglen);
  if (c->node_id) fs_ev_id(&ev, "node_id", c->node_id);
  if (c->leg[DOWN].conn) fs_ev_str(&ev, "peer", c->leg[DOWN].conn->h2.peer);
  fs_ev_u64(&ev, "duration_ms", fs_now_ms() - c->t_start);
  fs_ev_end(&ev);
}

/* Notes the final status found in a response header block. */
static void observe_status(call *c, const hdrs *h) {
  nghttp2_vec st = hdrs_get(h, "grpc-status"), msg;
  int status = 0;
  size_t i;
  if (c->finished) return;
  c->finished = 1;
  if (!st.len) {
    nghttp2_vec http = hdrs_get(h, ":status");
    /* No grpc-status: a non-200 answer is an error, a bare 200 is not ours to judge. */
    status = http.len && (http.len != 3 || memcmp(http.base, "200", 3)) ? GRPC_UNAVAILABLE : 2 /* UNKNOWN */;
  }
  for (i = 0; i < st.len; i++) status = status * 10 + (st.base[i] >= '0' && st.base[i] <= '9' ? st.base[i] - '0' : 0);
  call_end(c, status);
  if (status == 0) return;
  msg = hdrs_get(h, "grpc-message");
  log_rpc_error(c, status, (const char *)msg.base, msg.len);
}

/* Ends the call for the client with |status| and |fmt| (the sidecar's own
 * message, "flower-sidecar: ..."), and cancels the upstream leg. */
static void fail_call(call *c, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail_call(call *c, int status, const char *fmt, ...) {
  pconn *d = c->leg[DOWN].conn;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->synth_msg, sizeof(c->synth_msg), fmt, ap);
  va_end(ap);
  queue_del(c);
  cancel_up(c, NGHTTP2_CANCEL);
  flow_discard(c, DOWN);
  if (!d || c->finished) return; /* the caller frees a call with no legs */
  c->finished = 1;
  call_end(c, status);
  log_rpc_error(c, status, c->synth_msg, strlen(c->synth_msg));
  if (!c->resp_started) {
    /* Trailers-Only: nothing was sent to the client yet. */
    char st[8], enc[720];
    nghttp2_nv nv[4] = {
        {(uint8_t *)":status", (uint8_t *)"200", 7, 3, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12, 16, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"grpc-status", (uint8_t *)st, 11, 0, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"grpc-message", (uint8_t *)enc, 12, 0, NGHTTP2_NV_FLAG_NONE},
    };
    nv[2].valuelen = (size_t)snprintf(st, sizeof(st), "%d", status);
    nv[3].valuelen = fs_grpc_message_encode(enc, sizeof(enc), c->synth_msg);
    c->resp_started = 1;
    c->fl[UP].eof = 1;
    flow_discard(c, UP); /* nothing more of the upstream's answer goes out */
    nghttp2_submit_response(d->h2.session, c->leg[DOWN].sid, nv, 4, NULL);
  } else {
    /* Headers went out: end with trailers after what is already queued. */
    c->synth = 1;
    c->synth_status = status;
    hdrs_clear(&c->fl[UP].trailers);
    c->fl[UP].eof = 1;
    c->fl[UP].discard = 1; /* what is buffered goes out, then our trailers */
    c->fl[UP].deferred = 1;
    resume(c, DOWN);
  }
  fs_h2conn_mark(&d->h2);
}

/* --- forwarding ------------------------------------------------------------- */

static void submit_trailers(call *c, int sink) {
  pconn *pc = c->leg[sink].conn;
  flow *f = &c->fl[!sink];
  if (sink == DOWN && c->synth) {
    char st[8], enc[720];
    nghttp2_nv nv[2] = {
        {(uint8_t *)"grpc-status", (uint8_t *)st, 11, 0, NGHTTP2_NV_FLAG_NONE},
        {(uint8_t *)"grpc-message", (uint8_t *)enc, 12, 0, NGHTTP2_NV_FLAG_NONE},
    };
    nv[0].valuelen = (size_t)snprintf(st, sizeof(st), "%d", c->synth_status);
    nv[1].valuelen = fs_grpc_message_encode(enc, sizeof(enc), c->synth_msg);
    nghttp2_submit_trailer(pc->h2.session, c->leg[sink].sid, nv, 2);
    return;
  }
  if (sink == UP) c->req_trailers = 1;
  {
    nghttp2_nv nv[f->trailers.n / 2 + 1];
    size_t n = hdrs_nv(&f->trailers, nv, NULL);
    nghttp2_submit_trailer(pc->h2.session, c->leg[sink].sid, nv, n);
    hdrs_clear(&f->trailers);
  }
}

static int has_trailers(const call *c, int sink) { return c->fl[!sink].trailers.n > 0 || (sink == DOWN && c->synth); }

static ssize_t read_cb(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t length, uint32_t *flags,
                       nghttp2_data_source *src, void *ud) {
  call *c = src->ptr;
  int sink = conn_of(ud)->upstream ? UP : DOWN;
  flow *f = &c->fl[!sink];
  size_t n;
  (void)s, (void)sid, (void)buf;
  if (f->data.len == 0 && !f->eof) {
    f->deferred = 1;
    return NGHTTP2_ERR_DEFERRED;
  }
  n = f->data.len < length ? f->data.len : length;
  if (n) *flags |= NGHTTP2_DATA_FLAG_NO_COPY;
  f->promised = n;
  if (n == f->data.len && f->eof) {
    *flags |= NGHTTP2_DATA_FLAG_EOF;
    if (has_trailers(c, sink)) {
      *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
      submit_trailers(c, sink);
    }
  }
  return (ssize_t)n;
}

static int send_data_cb(nghttp2_session *s, nghttp2_frame *frame, const uint8_t *framehd, size_t length,
                        nghttp2_data_source *src, void *ud) {
  pconn *pc = ud;
  call *c = src->ptr;
  int sink = pc->upstream ? UP : DOWN;
  flow *f = &c->fl[!sink];
  size_t left = length, padlen = frame->data.padlen;
  fs_block *b;
  (void)s;
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
  if (left > 0) { /* the frame was promised |length| bytes; never short-send */
    static const uint8_t zeros[256];
    while (left > 0) {
      size_t take = left < sizeof(zeros) ? left : sizeof(zeros);
      fs_h2conn_write(&pc->h2, zeros, take);
      left -= take;
    }
  }
  if (padlen > 1) {
    static const uint8_t zeros[256];
    fs_h2conn_write(&pc->h2, zeros, padlen - 1);
  }
  if (sink == UP) replay_keep(c, &f->data, length);
  fs_bufq_drop(&f->data, length);
  f->promised = 0;
  /* The bytes are on their way: let the sender send more (a replay's bytes
   * were acknowledged the first time). */
  if (f->noack) {
    size_t k = f->noack < length ? f->noack : length;
    f->noack -= k;
    length -= k;
  }
  consume(c, !sink, length);
  return 0;
}

static nghttp2_data_provider provider(call *c) {
  nghttp2_data_provider prd;
  prd.source.ptr = c;
  prd.read_callback = read_cb;
  return prd;
}

/* Node role: a call with its own deadline that is safe to answer UNAVAILABLE
 * for (the SuperNode repeats it: heartbeats, side-effect-free methods) is
 * watched while it waits for its response headers; see up_timer. */
static int stall_watched(const call *c) {
  return P.cfg->role == FS_ROLE_NODE && c->deadline && !c->up_headers &&
         (c->method == FS_FLEET_SEND_NODE_HEARTBEAT || fs_fleet_repeatable((fs_fleet_method)c->method));
}

/* When to give up on it: the margin of fs_policy_hold_ms before its deadline. */
static uint64_t stall_check_at(const call *c) {
  uint64_t left = c->deadline > c->t_sent ? c->deadline - c->t_sent : 0;
  return c->t_sent + fs_policy_hold_ms(UINT64_MAX, 1, left);
}

/* When to probe its connection: halfway to the check. */
static uint64_t stall_probe_at(const call *c) { return c->t_sent + (stall_check_at(c) - c->t_sent) / 2; }

static void submit_upstream(call *c, pconn *u) {
  nghttp2_data_provider prd = provider(c);
  nghttp2_nv nv[c->head[DOWN].n / 2 + 1];
  size_t n = hdrs_nv(&c->head[DOWN], nv, P.up_ctx ? "https" : "http");
  int32_t sid;
  char left_s[24];
  uint64_t now = fs_now_ms();
  if (c->deadline && now > c->t_start) {
    /* Time went by here (held, repeated): the upstream gets what is left of
     * the client's deadline, as a gRPC client would send it. */
    uint64_t left = c->deadline > now ? c->deadline - now : 1;
    size_t i, len = left <= 99999999u ? (size_t)snprintf(left_s, sizeof(left_s), "%" PRIu64 "m", left)
                                      : (size_t)snprintf(left_s, sizeof(left_s), "%" PRIu64 "S", (left + 999) / 1000);
    if (len <= 9) /* at most 8 digits and a unit */
      for (i = 0; i < n; i++)
        if (nv[i].namelen == 12 && !memcmp(nv[i].name, "grpc-timeout", 12)) {
          nv[i].value = (uint8_t *)left_s;
          nv[i].valuelen = len;
        }
  }
  int no_body = c->fl[DOWN].eof && c->fl[DOWN].data.len == 0 && !c->fl[DOWN].trailers.n;
  sid = nghttp2_submit_request(u->h2.session, NULL, nv, n, no_body ? NULL : &prd, c);
  if (!c->replay_on) hdrs_clear(&c->head[DOWN]); /* else kept to repeat the call */
  if (sid < 0) {
    fail_call(c, GRPC_UNAVAILABLE, "flower-sidecar: upstream %s cannot take the call (%s)", P.up_name,
              nghttp2_strerror(sid));
    return;
  }
  c->leg[UP].conn = u;
  c->leg[UP].sid = sid;
  c->t_sent = now;
  c->probe_ms = 0;
  c->stall_done = 0;
  list_add(&u->calls, c, UP);
  u->nstreams++;
  fs_h2conn_mark(&u->h2);
  if (stall_watched(c)) { /* look at it halfway to its deadline (up_timer) */
    uint64_t due = stall_probe_at(c), in = due > now ? due - now : 1;
    if (!uv_is_active((uv_handle_t *)&u->h2.timer) || uv_timer_get_due_in(&u->h2.timer) > in)
      fs_h2conn_set_timer(&u->h2, in);
  }
}

/* An upstream connection that can take a new stream now, or NULL. */
static pconn *pick_upstream(int *should_connect) {
  pconn *u, *best = NULL;
  int connecting = 0;
  for (u = P.ups; u; u = u->next) {
    uint32_t max;
    if (u->h2.closing) continue;
    if (!u->ready) {
      connecting = 1;
      continue;
    }
    if (u->goaway) continue;
    max = nghttp2_session_get_remote_settings(u->h2.session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
    if (u->nstreams < max) return u;
    if (!best || u->nstreams < best->nstreams) best = u;
  }
  *should_connect = !connecting && P.nups < P.cfg->upstream_conns_max && !P.draining;
  /* Every connection is full and no more may be opened: nghttp2 queues the
   * stream until one closes. */
  return *should_connect || connecting ? NULL : best;
}

static void on_hold_timer(uv_timer_t *t);

/* Arms the hold timer for |until| unless it fires earlier already. */
static void hold_timer_arm(uint64_t until) {
  uint64_t now = fs_now_ms(), delay = until > now ? until - now : 0;
  if (uv_is_active((uv_handle_t *)&P.hold_timer) && uv_timer_get_due_in(&P.hold_timer) <= delay) return;
  uv_timer_start(&P.hold_timer, on_hold_timer, delay, 0);
}

static void route_call(call *c) {
  int should_connect = 0;
  pconn *u = pick_upstream(&should_connect);
  if (u) {
    submit_upstream(c, u);
    return;
  }
  queue_add(c);
  P.stats.calls_held++;
  if (c->hold_until) {
    fs_event ev;
    hold_timer_arm(c->hold_until);
    if (fs_ev_begin(&ev, FS_LOG_DEBUG, "call.held")) {
      char method[256];
      method_of(c, method, sizeof(method));
      fs_ev_str(&ev, "method", method);
      uint64_t now = fs_now_ms();
      fs_ev_u64(&ev, "hold_ms", c->hold_until > now ? c->hold_until - now : 0);
      fs_ev_end(&ev);
    }
  }
  /* A call is waiting: try now rather than after the backoff delay, unless
   * calls may wait (the node role): then the backoff schedule holds. */
  if (should_connect && (!c->hold_until || !uv_is_active((uv_handle_t *)&P.reconnect_timer))) {
    uv_timer_stop(&P.reconnect_timer);
    up_connect();
  }
}

/* Where the next connection attempt stands, for messages. */
static void next_attempt(char *out, size_t len) {
  if (P.nups_connecting > 0 || P.resolving) snprintf(out, len, "a connection attempt is in progress");
  else if (uv_is_active((uv_handle_t *)&P.reconnect_timer))
    snprintf(out, len, "next attempt in %.1f s", (double)uv_timer_get_due_in(&P.reconnect_timer) / 1000.0);
  else if (P.draining || P.stopped) snprintf(out, len, "no further attempt (shutting down)");
  else snprintf(out, len, "reconnecting");
}

static void dispatch_queue(void) {
  while (P.qhead) {
    int should_connect;
    pconn *u = pick_upstream(&should_connect);
    call *c = P.qhead;
    if (!u) {
      if (should_connect) up_connect();
      return;
    }
    queue_del(c);
    submit_upstream(c, u);
  }
}

/* Ends the waiting calls that may not wait longer: every one when |all|,
 * else those without a hold or whose hold is over.  The others keep
 * waiting (the hold timer is re-armed for them). */
static void fail_queue(const char *why, int all) {
  uint64_t now = fs_now_ms(), next = 0;
  char when[64];
  call *c, *n;
  next_attempt(when, sizeof(when));
  for (c = P.qhead; c; c = n) {
    n = c->qnext;
    if (!all && c->hold_until > now) {
      if (!next || c->hold_until < next) next = c->hold_until;
      continue;
    }
    queue_del(c);
    P.stats.calls_failed_down++;
    if (c->hold_until)
      fail_call(c, GRPC_UNAVAILABLE, "flower-sidecar: upstream %s unreachable (%s); waited %.1f s, %s", P.up_name, why,
                (double)(now - c->t_start) / 1000.0, when);
    else fail_call(c, GRPC_UNAVAILABLE, "flower-sidecar: upstream %s unreachable (%s); %s", P.up_name, why, when);
  }
  if (next) hold_timer_arm(next);
}

static void on_hold_timer(uv_timer_t *t) {
  (void)t;
  fail_queue(P.upstream_up ? "no upstream connection could take the call in time" : P.up_error, 0);
}

/* Repeats a call whose upstream stream ended before the upstream processed
 * it (see can_retry); its upstream leg is already detached. */
static void retry_call(call *c, const char *reason) {
  flow *f = &c->fl[DOWN];
  fs_event ev;
  uint64_t now = fs_now_ms();
  if (c->hold_until && c->hold_until <= now) {
    /* The hold counts from the call's start (the SuperLink refuses requests
     * signed too long ago): past it, the call ends instead of waiting. */
    P.stats.calls_failed_down++;
    fail_call(c, GRPC_UNAVAILABLE, "flower-sidecar: upstream %s %s; the call is %.1f s old, past --hold-timeout",
              P.up_name, reason, (double)(now - c->t_start) / 1000.0);
    return;
  }
  c->attempts++;
  P.stats.retries++;
  /* What was sent goes out again ahead of what still waits; it was
   * acknowledged to the client the first time. */
  f->noack += c->replay.len;
  P.replay_total -= c->replay.len;
  fs_bufq_prepend(&f->data, &c->replay);
  f->promised = 0;
  f->deferred = 0;
  if (fs_ev_begin(&ev, FS_LOG_INFO, "call.retry")) {
    char method[256];
    method_of(c, method, sizeof(method));
    fs_ev_str(&ev, "method", method);
    fs_ev_str(&ev, "reason", reason);
    fs_ev_u64(&ev, "attempt", c->attempts);
    fs_ev_end(&ev);
  }
  route_call(c);
}

/* Nonzero when the call may be repeated: everything sent is kept, no answer
 * came, and either the upstream never saw it (|refused|) or the method has
 * no side effects. */
static int can_retry(const call *c, int refused) {
  return c->replay_on && !c->up_headers && !c->req_trailers && !c->finished && c->leg[DOWN].conn &&
         c->attempts < FS_MAX_RETRIES && !P.draining && (refused || fs_fleet_repeatable((fs_fleet_method)c->method));
}

/* --- nghttp2 callbacks (both sides) ------------------------------------ */

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *frame, void *ud) {
  pconn *pc = ud;
  call *c;
  if (pc->upstream || frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  if (!(c = call_new())) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
  c->leg[DOWN].conn = pc;
  c->leg[DOWN].sid = frame->hd.stream_id;
  list_add(&pc->calls, c, DOWN);
  pc->nstreams++;
  pc->rpcs++;
  idle_timer_update(pc);
  nghttp2_session_set_stream_user_data(s, frame->hd.stream_id, c);
  return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, nghttp2_rcbuf *name, nghttp2_rcbuf *value,
                     uint8_t flags, void *ud) {
  pconn *pc = ud;
  call *c = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
  int side = pc->upstream ? UP : DOWN;
  hdrs *h;
  (void)flags;
  if (!c || frame->hd.type != NGHTTP2_HEADERS || c->overflow) return 0;
  h = frame->headers.cat == NGHTTP2_HCAT_HEADERS ? &c->fl[side].trailers : &c->head[side];
  if (hdrs_push(h, name, value) < 0) {
    c->overflow = 1;
    return 0;
  }
  if (side == DOWN && !c->path) {
    nghttp2_vec k = nghttp2_rcbuf_get_buf(name);
    if (k.len == 5 && !memcmp(k.base, ":path", 5)) {
      nghttp2_rcbuf_incref(value);
      c->path = value;
    }
  }
  return 0;
}

static void on_request_headers(call *c, const nghttp2_frame *frame) {
  if (c->overflow) {
    fail_call(c, GRPC_RESOURCE_EXHAUSTED, "flower-sidecar: request headers exceed --max-header-list-size %u bytes",
              P.cfg->max_header_list_size);
    return;
  }
  if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) c->fl[DOWN].eof = 1;
  if (c->path) {
    nghttp2_vec p = nghttp2_rcbuf_get_buf(c->path);
    c->method = (uint8_t)fs_fleet_method_of(p.base, p.len);
    if (c->method != FS_FLEET_NONE && P.cfg->observe) c->obs = fs_obs_start(p.base, p.len, c->leg[DOWN].conn->h2.peer);
  }
  /* The deadline matters to holding and, in the node role, to the stall
   * probe (check_stalled_calls), which works with --hold-timeout 0 too. */
  if (P.cfg->hold_timeout_s > 0 || P.cfg->role == FS_ROLE_NODE) {
    nghttp2_vec to = hdrs_get(&c->head[DOWN], "grpc-timeout");
    uint64_t ms = 0;
    int has_deadline = to.len && fs_grpc_timeout_ms(to.base, to.len, &ms) == 0;
    if (P.cfg->hold_timeout_s > 0)
      c->hold_until = c->t_start + fs_policy_hold_ms((uint64_t)(P.cfg->hold_timeout_s * 1000), has_deadline, ms);
    if (has_deadline) c->deadline = c->t_start + (ms ? ms : 1);
  }
  route_call(c);
}

static void on_response_headers(call *c, const nghttp2_frame *frame) {
  pconn *d = c->leg[DOWN].conn;
  int end = frame->hd.flags & NGHTTP2_FLAG_END_STREAM;
  if (c->overflow) {
    fail_call(c, GRPC_INTERNAL, "flower-sidecar: upstream response headers exceed --max-header-list-size %u bytes",
              P.cfg->max_header_list_size);
    return;
  }
  c->up_headers = 1;
  replay_off(c); /* processed: never repeated */
  if (end) {
    c->fl[UP].eof = 1;
    observe_status(c, &c->head[UP]);
  }
  if (d && !c->resp_started) {
    nghttp2_data_provider prd = provider(c);
    nghttp2_nv nv[c->head[UP].n / 2 + 1];
    size_t n = hdrs_nv(&c->head[UP], nv, NULL);
    c->resp_started = 1;
    nghttp2_submit_response(d->h2.session, c->leg[DOWN].sid, nv, n, end ? NULL : &prd);
    fs_h2conn_mark(&d->h2);
  }
  hdrs_clear(&c->head[UP]);
}

static void up_timer(fs_h2conn *h);

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *ud) {
  pconn *pc = ud;
  int side = pc->upstream ? UP : DOWN;
  call *c;
  switch (frame->hd.type) {
  case NGHTTP2_SETTINGS:
    if (pc->upstream && !(frame->hd.flags & NGHTTP2_FLAG_ACK) && !pc->ready) {
      fs_event ev;
      pc->ready = 1;
      P.nups_connecting--;
      if (P.cfg->role == FS_ROLE_NODE) {
        fs_keepalive_init(&pc->ka, P.ka_time_ms, (uint64_t)(P.cfg->keepalive_timeout_s * 1000), fs_now_ms());
        fs_h2conn_set_timer(&pc->h2, P.ka_time_ms);
      } else {
        fs_h2conn_set_timer(&pc->h2, 0);
      }
      fs_backoff_reset(&P.backoff);
      if (!P.upstream_up) {
        P.upstream_up = 1;
        if (fs_ev_begin(&ev, FS_LOG_INFO, "upstream.up")) {
          fs_ev_str(&ev, "upstream", P.up_name);
          fs_ev_u64(&ev, "connect_ms", fs_now_ms() - pc->h2.opened_ms);
          fs_ev_end(&ev);
        }
        state_changed();
      }
      dispatch_queue();
    }
    return 0;
  case NGHTTP2_PING:
    if (pc->upstream && (frame->hd.flags & NGHTTP2_FLAG_ACK) && pc->ping_t0) {
      fs_event ev;
      P.stats.ping_rtt_us = (uv_hrtime() / 1000) - pc->ping_t0;
      pc->ping_t0 = 0;
      pc->ping_ack_ms = fs_now_ms();
      if (fs_ev_begin(&ev, FS_LOG_DEBUG, "upstream.ping")) {
        fs_ev_str(&ev, "upstream", P.up_name);
        fs_ev_num(&ev, "rtt_ms", (double)P.stats.ping_rtt_us / 1000.0, 3);
        fs_ev_end(&ev);
      }
      /* Answered: the next PING is due keepalive-time after this ACK, not
       * after the look the PING's timeout had scheduled. */
      if (P.cfg->role == FS_ROLE_NODE && pc->ready) up_timer(&pc->h2);
    }
    return 0;
  case NGHTTP2_GOAWAY:
    if (pc->upstream && frame->goaway.error_code == NGHTTP2_ENHANCE_YOUR_CALM && frame->goaway.opaque_data_len == 14 &&
        !memcmp(frame->goaway.opaque_data, "too_many_pings", 14) && P.cfg->role == FS_ROLE_NODE) {
      /* As gRPC clients do: PING half as often on the next connections. */
      fs_event ev;
      if (P.ka_time_ms < 86400000) P.ka_time_ms *= 2;
      if (fs_ev_begin(&ev, FS_LOG_WARN, "upstream.too_many_pings")) {
        fs_ev_str(&ev, "upstream", P.up_name);
        fs_ev_num(&ev, "keepalive_time_s", (double)P.ka_time_ms / 1000.0, 3);
        fs_ev_end(&ev);
      }
    }
    if (!pc->h2.close_reason[0]) {
      /* The debug data says why ("too_many_pings", "max_age"): keep it
       * when it is printable. */
      size_t i, n = frame->goaway.opaque_data_len < 64 ? frame->goaway.opaque_data_len : 64;
      for (i = 0; i < n && frame->goaway.opaque_data[i] >= 0x20 && frame->goaway.opaque_data[i] < 0x7f; i++) {}
      if (n && i == n)
        snprintf(pc->h2.close_reason, sizeof(pc->h2.close_reason), "peer sent GOAWAY %s (%.*s)",
                 nghttp2_http2_strerror(frame->goaway.error_code), (int)n, (const char *)frame->goaway.opaque_data);
      else
        snprintf(pc->h2.close_reason, sizeof(pc->h2.close_reason), "peer sent GOAWAY %s",
                 nghttp2_http2_strerror(frame->goaway.error_code));
    }
    if (pc->upstream && !pc->goaway) {
      int should_connect;
      pc->goaway = 1;
      snprintf(P.up_error, sizeof(P.up_error), "%s", pc->h2.close_reason);
      /* The upstream is going away: health says so at once, and a new
       * connection is tried now for the calls to come. */
      if (P.upstream_up && !any_up_ready()) up_log_down(pc->h2.close_reason);
      if (!pick_upstream(&should_connect) && should_connect) up_connect();
      if (P.qhead) dispatch_queue();
    }
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
    if (frame->headers.cat == NGHTTP2_HCAT_RESPONSE) {
      on_response_headers(c, frame);
      return 0;
    }
    /* Trailers (always END_STREAM). */
    if (c->overflow) {
      fail_call(c, GRPC_INTERNAL, "flower-sidecar: trailers exceed --max-header-list-size %u bytes",
                P.cfg->max_header_list_size);
      return 0;
    }
    if (side == UP) observe_status(c, &c->fl[UP].trailers);
  }
  if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) {
    c->fl[side].eof = 1;
    if (c->fl[side].discard) hdrs_clear(&c->fl[side].trailers);
    else resume(c, !side);
  }
  return 0;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data, size_t len, void *ud) {
  pconn *pc = ud;
  int side = pc->upstream ? UP : DOWN;
  call *c = nghttp2_session_get_stream_user_data(s, sid);
  flow *f;
  int rv;
  (void)flags;
  if (pc->upstream) nghttp2_session_consume_connection(s, len);
  if (!c) {
    if (!pc->upstream) nghttp2_session_consume(s, sid, len);
    return 0;
  }
  f = &c->fl[side];
  if (f->discard) {
    consume(c, side, len);
    return 0;
  }
  rv = fs_grpcmsg_feed(&f->msgs, data, len, NULL, NULL);
  if (rv == FS_GRPCMSG_TOO_BIG) {
    fail_call(c, GRPC_RESOURCE_EXHAUSTED, "flower-sidecar: %s message larger than --max-message-size %u bytes",
              side == DOWN ? "request" : "response", P.cfg->max_message_size);
    consume(c, side, len);
    return 0;
  }
  c->bytes[side] += len;
  fs_obs_data(c->obs, side, data, len);
  if (fs_bufq_append(&f->data, data, len) < 0) {
    /* Only a peer ignoring flow control, or no memory, gets here. */
    fail_call(c, GRPC_INTERNAL, "flower-sidecar: stream buffer limit exceeded");
    consume(c, side, len);
    return 0;
  }
  resume(c, !side);
  return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t sid, uint32_t code, void *ud) {
  pconn *pc = ud;
  int side = pc->upstream ? UP : DOWN;
  call *c = nghttp2_session_get_stream_user_data(s, sid);
  if (!c) return 0;
  if (side == UP && code == NGHTTP2_REFUSED_STREAM && !c->fl[UP].eof && can_retry(c, 1)) {
    /* Refused (or above a GOAWAY's last-stream-id): never processed. */
    detach_keep(c, UP);
    retry_call(c, "upstream refused the stream");
    return 0;
  }
  if (side == DOWN && c->leg[UP].conn && !c->finished) {
    char msg[96];
    snprintf(msg, sizeof(msg), "client reset the stream (%s)", nghttp2_http2_strerror(code));
    c->finished = 1;
    call_end(c, GRPC_CANCELLED);
    log_rpc_error(c, GRPC_CANCELLED, msg, strlen(msg));
  }
  detach(c, side);
  if (side == UP) {
    if (c->leg[DOWN].conn && !c->fl[UP].eof) {
      /* The upstream reset the stream: pass the reset on. */
      if (!c->finished) {
        char msg[96];
        snprintf(msg, sizeof(msg), "upstream reset the stream (%s)", nghttp2_http2_strerror(code));
        c->finished = 1;
        call_end(c, code == NGHTTP2_REFUSED_STREAM ? GRPC_UNAVAILABLE : GRPC_CANCELLED);
        log_rpc_error(c, code == NGHTTP2_REFUSED_STREAM ? GRPC_UNAVAILABLE : GRPC_CANCELLED, msg, strlen(msg));
      }
      rst_leg(c, DOWN, code ? code : NGHTTP2_INTERNAL_ERROR);
    }
  } else {
    queue_del(c);
    cancel_up(c, code ? code : NGHTTP2_CANCEL);
  }
  maybe_free(c);
  return 0;
}

static int on_frame_send(nghttp2_session *s, const nghttp2_frame *frame, void *ud) {
  pconn *pc = ud;
  call *c;
  if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR) {
    /* nghttp2 found a protocol violation: say so when the connection closes. */
    snprintf(pc->h2.close_reason, sizeof(pc->h2.close_reason), "protocol error: sent GOAWAY %s",
             nghttp2_http2_strerror(frame->goaway.error_code));
    return 0;
  }
  /* Our response ended while the client is still sending: tell it to stop
   * (RFC 9113 8.1) so the stream closes without waiting for its body. */
  if (pc->upstream || !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM) ||
      (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA))
    return 0;
  c = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
  if (c && nghttp2_session_get_stream_remote_close(s, frame->hd.stream_id) == 0)
    nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, frame->hd.stream_id, NGHTTP2_NO_ERROR);
  return 0;
}

/* --- downstream connections ------------------------------------------------- */

static void idle_timer_update(pconn *d) {
  uint64_t ms = (uint64_t)(P.cfg->idle_timeout_s * 1000);
  if (d->upstream || d->h2.closing || !d->h2.tls_ready) return;
  if (d->nstreams > 0 || ms == 0) fs_h2conn_set_timer(&d->h2, 0);
  else if (!uv_is_active((uv_handle_t *)&d->h2.timer)) fs_h2conn_set_timer(&d->h2, ms);
}

static void goaway(pconn *pc, const char *reason) {
  if (pc->h2.closing || !pc->h2.session) return;
  snprintf(pc->h2.close_reason, sizeof(pc->h2.close_reason), "%s", reason);
  nghttp2_submit_goaway(pc->h2.session, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(pc->h2.session),
                        NGHTTP2_NO_ERROR, NULL, 0);
  fs_h2conn_mark(&pc->h2);
}

static int down_ready(fs_h2conn *h) {
  pconn *d = conn_of(h);
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, P.cfg->max_concurrent_streams},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, P.cfg->stream_window},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, P.cfg->max_header_list_size},
  };
  fs_event ev;
  fs_h2conn_set_timer(h, 0);
  if (nghttp2_session_server_new3(&h->session, P.cbs, d, P.down_opt, fs_h2mem()) != 0 ||
      nghttp2_submit_settings(h->session, NGHTTP2_FLAG_NONE, iv, 3) != 0 ||
      nghttp2_session_set_local_window_size(h->session, NGHTTP2_FLAG_NONE, 0, (int32_t)P.cfg->conn_window) != 0) {
    snprintf(h->close_reason, sizeof(h->close_reason), "out of memory");
    return -1;
  }
  d->opened = 1;
  P.stats.conns_current++;
  if (fs_ev_begin(&ev, FS_LOG_INFO, "conn.open")) {
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
  if (P.draining) goaway(d, "draining");
  idle_timer_update(d);
  fs_h2conn_mark(h);
  return 0;
}

static void down_tls_fail(fs_h2conn *h, const char *reason) {
  fs_event ev;
  P.stats.tls_failures++;
  if (fs_ev_begin(&ev, FS_LOG_WARN, "tls.fail")) {
    fs_ev_str(&ev, "peer", h->peer);
    fs_ev_str(&ev, "reason", reason);
    fs_ev_end(&ev);
  }
}

static void down_closing(fs_h2conn *h, const char *reason) {
  pconn *d = conn_of(h);
  fs_event ev;
  while (d->calls) {
    call *c = d->calls;
    detach(c, DOWN);
    queue_del(c);
    cancel_up(c, NGHTTP2_CANCEL);
    maybe_free(c);
  }
  if (d->opened) {
    P.stats.conns_current--;
    if (fs_ev_begin(&ev, FS_LOG_INFO, "conn.close")) {
      fs_ev_str(&ev, "peer", h->peer);
      fs_ev_u64(&ev, "duration_ms", fs_now_ms() - h->opened_ms);
      fs_ev_u64(&ev, "bytes_in", h->bytes_in);
      fs_ev_u64(&ev, "bytes_out", h->bytes_out);
      fs_ev_u64(&ev, "rpcs", d->rpcs);
      fs_ev_str(&ev, "reason", reason);
      fs_ev_end(&ev);
    }
  }
}

static void down_freed(fs_h2conn *h) {
  pconn *d = conn_of(h);
  if (d->prev) d->prev->next = d->next;
  else P.downs = d->next;
  if (d->next) d->next->prev = d->prev;
  P.ndowns--;
  free(d);
  maybe_stopped();
}

static void down_timer(fs_h2conn *h) {
  pconn *d = conn_of(h);
  if (!h->tls_ready) {
    down_tls_fail(h, "TLS handshake timeout");
    fs_h2conn_close(h, "TLS handshake timeout");
  } else if (d->nstreams == 0) {
    goaway(d, "idle timeout");
  }
}

static const fs_h2conn_ops down_ops = {down_ready, down_tls_fail, down_closing, down_freed, down_timer, NULL};

static void on_accept(uv_stream_t *server, int status) {
  pconn *d;
  if (status < 0 || P.draining) return;
  if (!(d = calloc(1, sizeof(*d)))) return;
  if (fs_h2conn_init(&d->h2, P.loop, &down_ops) < 0) {
    free(d);
    return;
  }
  d->next = P.downs;
  if (P.downs) P.downs->prev = d;
  P.downs = d;
  P.ndowns++;
  if (uv_accept(server, (uv_stream_t *)&d->h2.tcp) < 0) {
    fs_h2conn_close(&d->h2, "accept failed");
    return;
  }
  P.stats.conns_total++;
  peer_name(&d->h2.tcp, d->h2.peer, sizeof(d->h2.peer));
  if (P.down_ctx) fs_h2conn_set_timer(&d->h2, (uint64_t)(P.cfg->tls_handshake_timeout_s * 1000));
  fs_h2conn_start(&d->h2, P.down_ctx, 1, NULL, NULL);
}

/* --- upstream connections ----------------------------------------------------- */

static void up_log_down(const char *reason) {
  fs_event ev;
  P.upstream_up = 0;
  if (fs_ev_begin(&ev, FS_LOG_WARN, "upstream.down")) {
    fs_ev_str(&ev, "upstream", P.up_name);
    fs_ev_str(&ev, "reason", reason);
    fs_ev_end(&ev);
  }
  state_changed();
}

static int up_ready(fs_h2conn *h) {
  pconn *u = conn_of(h);
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, P.cfg->stream_window},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, P.cfg->max_header_list_size},
  };
  if (nghttp2_session_client_new3(&h->session, P.cbs, u, P.up_opt, fs_h2mem()) != 0 ||
      nghttp2_submit_settings(h->session, NGHTTP2_FLAG_NONE, iv, 3) != 0 ||
      /* Stream windows bound memory; the connection window only must not
       * get in the way (see consume()). */
      nghttp2_session_set_local_window_size(h->session, NGHTTP2_FLAG_NONE, 0, 1 << 30) != 0) {
    snprintf(h->close_reason, sizeof(h->close_reason), "out of memory");
    return -1;
  }
  fs_h2conn_mark(h);
  return 0;
}

static void up_closing(fs_h2conn *h, const char *reason) {
  pconn *u = conn_of(h);
  int was_ready = u->ready;
  if (!u->ready) P.nups_connecting--;
  u->ready = 0;
  snprintf(P.up_error, sizeof(P.up_error), "%s", reason);
  while (u->calls) {
    call *c = u->calls;
    if (!c->fl[UP].eof && can_retry(c, 0)) { /* side-effect free: repeat it */
      char why[200];
      detach_keep(c, UP);
      snprintf(why, sizeof(why), "connection lost (%s)", reason);
      retry_call(c, why);
      continue;
    }
    detach(c, UP);
    if (!c->fl[UP].eof) {
      P.stats.calls_failed_down++;
      fail_call(c, GRPC_UNAVAILABLE, "flower-sidecar: upstream %s connection lost (%s)", P.up_name, reason);
    }
    maybe_free(c);
  }
  if (!was_ready) P.stats.upstream_failures++;
}

static void up_freed(fs_h2conn *h) {
  pconn *u = conn_of(h);
  if (u->prev) u->prev->next = u->next;
  else P.ups = u->next;
  if (u->next) u->next->prev = u->prev;
  P.nups--;
  free(u);
  if (P.upstream_up && !any_up_ready()) up_log_down(P.up_error);
  schedule_reconnect(); /* first: failed calls say when the next attempt is */
  if (P.nups_connecting == 0 && !any_up_ready()) fail_queue(P.up_error, 0);
  else dispatch_queue();
  maybe_stopped();
}

static void send_ping(pconn *u) {
  if (nghttp2_submit_ping(u->h2.session, NGHTTP2_FLAG_NONE, NULL) == 0) {
    /* Time the oldest outstanding PING: its ACK comes first. */
    if (!u->ping_t0) u->ping_t0 = uv_hrtime() / 1000;
    P.stats.pings++;
    fs_h2conn_mark(&u->h2);
  }
}

/* Watched calls (stall_watched) without response headers halfway to their
 * deadline probe the connection with a PING (unless one is already out);
 * if no PING ACK arrives between the probe and the check time
 * (stall_check_at) the call ends UNAVAILABLE, which the SuperNode retries,
 * rather than DEADLINE_EXCEEDED, which it does not, and keepalive judges
 * the connection.  Only the ACK counts: on a lossy link other bytes trickle
 * in for seconds (retransmitted DATA queued long before) while the call's
 * own bytes are stuck behind them.  A connection that answers the PING in
 * time is alive: the call is left to its own deadline (a slow server).
 * Returns the delay before the next look, at most |next| (0: none). */
static uint64_t check_stalled_calls(pconn *u, uint64_t next) {
  uint64_t now = fs_now_ms(), probe_next;
  call *c, *n;
  for (c = u->calls; c; c = n) {
    uint64_t at, probe_at;
    n = c->leg[UP].next;
    if (!stall_watched(c) || c->finished || c->stall_done) continue;
    at = stall_check_at(c);
    probe_at = stall_probe_at(c);
    if (!c->probe_ms && now >= probe_at) {
      c->probe_ms = now;
      if (!u->ping_t0 && fs_keepalive_probe(&u->ka, now, u->h2.last_rx_ms, &probe_next)) send_ping(u);
    }
    if (now < at) {
      uint64_t due = c->probe_ms ? at : probe_at;
      if (!next || due - now < next) next = due - now;
      continue;
    }
    c->stall_done = 1;
    if (u->ping_ack_ms >= c->probe_ms) continue; /* the connection answered: a slow call */
    P.stats.calls_failed_down++;
    fail_call(c, GRPC_UNAVAILABLE,
              "flower-sidecar: upstream %s did not answer a PING within %.1f s, the call's deadline is near", P.up_name,
              (double)(now - c->probe_ms) / 1000.0);
  }
  return next;
}

static void up_timer(fs_h2conn *h) {
  pconn *u = conn_of(h);
  char why[96];
  uint64_t next = 0;
  if (!u->ready) {
    snprintf(why, sizeof(why), "no HTTP/2 SETTINGS within %gs", P.cfg->connect_timeout_s);
    fs_h2conn_close(h, why);
    return;
  }
  switch (fs_keepalive_check(&u->ka, fs_now_ms(), h->last_rx_ms, u->nstreams > 0, &next)) {
  case FS_KA_DEAD:
    snprintf(why, sizeof(why), "keepalive: no PING ACK within %gs", P.cfg->keepalive_timeout_s);
    fs_h2conn_close(h, why);
    return;
  case FS_KA_PING:
    send_ping(u);
    break;
  case FS_KA_WAIT:
    break;
  }
  next = check_stalled_calls(u, next);
  fs_h2conn_set_timer(h, next);
}

static const fs_h2conn_ops up_ops = {up_ready, NULL, up_closing, up_freed, up_timer, NULL};

static void on_up_connected(uv_connect_t *req, int status) {
  pconn *u = req->data;
  if (u->h2.closing) return;
  if (status < 0) {
    fs_h2conn_close(&u->h2, uv_strerror(status));
    return;
  }
  if (P.cfg->role == FS_ROLE_NODE) {
    /* Unacknowledged bytes for longer than the keepalive timeout: the
     * kernel gives up too (a stalled write would otherwise hide it). */
    uv_os_fd_t fd;
    unsigned int ms = (unsigned int)(P.cfg->keepalive_timeout_s * 1000);
    if (uv_fileno((uv_handle_t *)&u->h2.tcp, &fd) == 0) setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof(ms));
  }
  fs_h2conn_start(&u->h2, P.up_ctx, 0, P.cfg->tls_server_name ? P.cfg->tls_server_name : P.up_host,
                  P.cfg->tls_server_name ? P.cfg->tls_server_name : P.up_host);
}

static void up_connect_to(const struct sockaddr *sa) {
  pconn *u = calloc(1, sizeof(*u));
  int rv;
  if (!u) return;
  if (fs_h2conn_init(&u->h2, P.loop, &up_ops) < 0) {
    free(u);
    return;
  }
  u->upstream = 1;
  u->next = P.ups;
  if (P.ups) P.ups->prev = u;
  P.ups = u;
  P.nups++;
  P.nups_connecting++;
  P.stats.upstream_connects++;
  snprintf(u->h2.peer, sizeof(u->h2.peer), "%s", P.up_name);
  fs_h2conn_set_timer(&u->h2, (uint64_t)(P.cfg->connect_timeout_s * 1000));
  u->creq.data = u;
  if ((rv = uv_tcp_connect(&u->creq, &u->h2.tcp, sa, on_up_connected)) < 0) fs_h2conn_close(&u->h2, uv_strerror(rv));
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  (void)req;
  P.resolving = 0;
  if (status < 0 || !res) {
    snprintf(P.up_error, sizeof(P.up_error), "cannot resolve %s: %s", P.up_host, uv_strerror(status));
    if (P.upstream_up) up_log_down(P.up_error);
    schedule_reconnect();
    if (!P.nups_connecting) fail_queue(P.up_error, 0);
    maybe_stopped();
  } else if (!P.draining) {
    memcpy(&P.up_addr, res->ai_addr, res->ai_addrlen);
    up_connect_to(res->ai_addr);
  }
  uv_freeaddrinfo(res);
}

static void up_connect(void) {
  if (P.draining || P.resolving) return;
  if (P.up_addr_ok) {
    up_connect_to((const struct sockaddr *)&P.up_addr);
  } else {
    char port[8];
    struct addrinfo hints;
    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    snprintf(port, sizeof(port), "%d", P.up_port);
    if (uv_getaddrinfo(P.loop, &P.gai, on_resolved, P.up_host, port, &hints) == 0) P.resolving = 1;
  }
}

static void on_reconnect_timer(uv_timer_t *t) {
  (void)t;
  if (P.nups == 0) up_connect();
}

static void schedule_reconnect(void) {
  uint64_t delay;
  fs_event ev;
  if (P.draining || P.nups > 0 || P.resolving || uv_is_active((uv_handle_t *)&P.reconnect_timer)) return;
  delay = fs_backoff_next(&P.backoff);
  if (delay > 0 && fs_ev_begin(&ev, FS_LOG_INFO, "upstream.backoff")) {
    fs_ev_str(&ev, "upstream", P.up_name);
    fs_ev_u64(&ev, "attempt", P.backoff.attempt);
    fs_ev_u64(&ev, "delay_ms", delay);
    fs_ev_str(&ev, "reason", P.up_error);
    fs_ev_end(&ev);
  }
  uv_timer_start(&P.reconnect_timer, on_reconnect_timer, delay, 0);
}

/* --- start and stop --------------------------------------------------------- */

static int listen_on(const char *addr, char *err, size_t errlen) {
  char host[256];
  int port, rv;
  struct sockaddr_storage ss;
  fs_hostport_split(addr, host, sizeof(host), &port);
  if (!host[0]) strcpy(host, "0.0.0.0");
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)&ss) != 0 &&
      uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss) != 0) {
    snprintf(err, errlen, "invalid --listen: '%s' (not a numeric IP address)", addr);
    return -1;
  }
  uv_tcp_init(P.loop, &P.listener);
  P.listening = 1;
  if ((rv = uv_tcp_bind(&P.listener, (struct sockaddr *)&ss, 0)) < 0 ||
      (rv = uv_listen((uv_stream_t *)&P.listener, 1024, on_accept)) < 0) {
    snprintf(err, errlen, "cannot listen on %s: %s", addr, uv_strerror(rv));
    return -1;
  }
  return 0;
}

int fs_proxy_start(uv_loop_t *loop, const fs_config *cfg, SSL_CTX *down_ctx, SSL_CTX *up_ctx, void (*on_stopped)(void),
                   char *err, size_t errlen) {
  memset(&P, 0, sizeof(P));
  P.loop = loop;
  P.cfg = cfg;
  P.down_ctx = down_ctx;
  P.up_ctx = up_ctx;
  P.on_stopped = on_stopped;
  fs_hostport_split(cfg->upstream, P.up_host, sizeof(P.up_host), &P.up_port);
  snprintf(P.up_name, sizeof(P.up_name), strchr(P.up_host, ':') ? "[%s]:%d" : "%s:%d", P.up_host, P.up_port);
  if (uv_ip4_addr(P.up_host, P.up_port, (struct sockaddr_in *)&P.up_addr) == 0 ||
      uv_ip6_addr(P.up_host, P.up_port, (struct sockaddr_in6 *)&P.up_addr) == 0)
    P.up_addr_ok = 1;
  snprintf(P.up_error, sizeof(P.up_error), "not connected yet");
  fs_backoff_init(&P.backoff, (uint64_t)(cfg->backoff_initial_s * 1000), (uint64_t)(cfg->backoff_max_s * 1000),
                  (uint64_t)uv_hrtime() ^ (uint64_t)getpid());
  uv_timer_init(loop, &P.reconnect_timer);
  uv_timer_init(loop, &P.drain_timer);
  uv_timer_init(loop, &P.hold_timer);
  P.ka_time_ms = (uint64_t)(cfg->keepalive_time_s * 1000);
  P.replay_max = (size_t)cfg->retry_buffer * 8;

  nghttp2_session_callbacks_new(&P.cbs);
  fs_h2conn_set_callbacks(P.cbs);
  nghttp2_session_callbacks_set_on_begin_headers_callback(P.cbs, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback2(P.cbs, on_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(P.cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(P.cbs, on_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(P.cbs, on_stream_close);
  nghttp2_session_callbacks_set_on_frame_send_callback(P.cbs, on_frame_send);
  nghttp2_session_callbacks_set_send_data_callback(P.cbs, send_data_cb);
  nghttp2_option_new(&P.down_opt);
  nghttp2_option_set_no_auto_window_update(P.down_opt, 1);
  nghttp2_option_new(&P.up_opt);
  nghttp2_option_set_no_auto_window_update(P.up_opt, 1);

  if (listen_on(cfg->listen, err, errlen) < 0) return -1;
  state_changed();
  up_connect();
  return 0;
}

static void on_drain_timeout(uv_timer_t *t) {
  pconn *d, *next;
  (void)t;
  for (d = P.downs; d; d = next) {
    next = d->next;
    fs_h2conn_close(&d->h2, "drain timeout");
  }
}

static void close_listener(void) {
  if (!P.listening) return;
  P.listening = 0;
  uv_close((uv_handle_t *)&P.listener, NULL);
}

void fs_proxy_drain(void) {
  pconn *d, *next;
  if (P.draining) return;
  P.draining = 1;
  close_listener();
  state_changed();
  uv_timer_stop(&P.reconnect_timer);
  for (d = P.downs; d; d = next) {
    next = d->next;
    if (!d->h2.tls_ready) fs_h2conn_close(&d->h2, "draining");
    else goaway(d, "draining");
  }
  uv_timer_start(&P.drain_timer, on_drain_timeout, (uint64_t)(P.cfg->drain_timeout_s * 1000), 0);
  maybe_stopped();
}

static void maybe_stopped(void) {
  pconn *u, *next;
  if (!P.draining || P.stopped || P.ndowns > 0) return;
  if (P.nups > 0) {
    for (u = P.ups; u; u = next) {
      next = u->next;
      fs_h2conn_close(&u->h2, "shutting down");
    }
    return; /* back here from up_freed */
  }
  if (P.resolving) {
    uv_cancel((uv_req_t *)&P.gai);
    return;
  }
  P.stopped = 1;
  fail_queue("shutting down", 1);
  uv_close((uv_handle_t *)&P.reconnect_timer, NULL);
  uv_close((uv_handle_t *)&P.drain_timer, NULL);
  uv_close((uv_handle_t *)&P.hold_timer, NULL);
  nghttp2_session_callbacks_del(P.cbs);
  nghttp2_option_del(P.down_opt);
  nghttp2_option_del(P.up_opt);
  SSL_CTX_free(P.down_ctx);
  SSL_CTX_free(P.up_ctx);
  if (P.on_stopped) P.on_stopped();
}
