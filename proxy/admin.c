/*
 * admin: the admin listener (--admin).  One port, two protocols, told apart
 * by the first bytes: the HTTP/2 preface means h2c gRPC (grpc.health.v1
 * Health/Check and /Watch), anything that looks like an HTTP/1.1 request
 * line gets GET /healthz, GET /metrics, GET /v1/federation (fedview's JSON),
 * GET / (the federation page, fedpage.c) or 404, and the connection closes
 * after one response.  Everything else gets 400 and a close.
 */
#include "admin.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bufq.h"
#include "h2conn.h"
#include "health.h"
#include "health.pb-c.h"
#include "list.h"
#include "log.h"
#include "net.h"
#include "metrics.h"
#include "onegate.h"
#include "fedpage.h"
#include "fedstate.h"
#include "fedview.h"
#include "grpc.h"
#include "proxy.h"
#include "tls.h"
#include "uppool.h"
#include "uphealth.h"

#define PREFACE     "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#define PREFACE_LEN 24
/* An HTTP/1.1 request head larger than this is refused. */
#define HTTP1_MAX 8192
/* A HealthCheckRequest larger than this is refused. */
#define REQ_MAX 1024
/* A request (HTTP/1.1, or an HTTP/2 stream's) must be complete within this
 * time: half-open clients do not hold resources. */
#define REQUEST_TIMEOUT_MS 10000
/* Admin connections at once, at most: a local flood must not take the file
 * descriptors the Fleet listener needs. */
#define MAX_ADMIN_CONNS 256
/* An HTTP/2 admin connection with no stream open closes after this. */
#define IDLE_TIMEOUT_MS 30000
/* Watch streams, all connections together; more get RESOURCE_EXHAUSTED. */
#define MAX_WATCHERS 1024
/* GET /v1/federation: the document's size at most, and the bytes all admin
 * connections may have queued (unsent) before it answers 503 instead. */
#define VIEW_MAX      (16 * 1024 * 1024)
#define ADMIN_OUT_MAX (64 * 1024 * 1024)

enum { M_OTHER = 0, M_CHECK, M_WATCH };

typedef struct aconn aconn;
typedef struct astream astream;

struct astream {
  aconn *conn;
  int32_t sid;
  uint8_t method, end_after, deferred, overflow;
  uint8_t req[REQ_MAX];
  size_t req_len;
  fs_bufq out;        /* framed HealthCheckResponse messages not yet sent */
  fs_list_node node;  /* in the connection's streams */
  fs_list_node wnode; /* in A.watchers while it is a Watch */
  uint8_t unknown_service, complete;
};

struct aconn {
  fs_h2conn h2;
  char *head; /* HTTP/1.1 or preface bytes while sniffing */
  size_t head_len;
  fs_list_node streams;
  uint32_t nstreams;
  uint32_t incomplete; /* streams whose request has not fully arrived */
  fs_list_node node;   /* in A.conns */
};

static struct {
  uv_loop_t *loop;
  const fs_config *cfg;
  uv_tcp_t listener;
  int listening;
  fs_list_node conns; /* newest first */
  uint32_t nconns;
  uint32_t nclosing; /* of them, closing (not yet freed) */
  fs_list_node watchers;
  uint32_t nwatchers;
  nghttp2_session_callbacks *cbs;
  fs_health_status status;
  const char *reason;
  void (*on_closed)(void);
} A;

/* --- health verdict ------------------------------------------------------- */

static fs_health_status current(const char **reason) {
  fs_health_inputs in = {fs_proxy_listening(), fs_proxy_upstream_up(), fs_proxy_draining(), fs_uphealth_ok()};
  return fs_health_eval(&in, reason);
}

/* The detail behind a NOT_SERVING verdict about the upstream. */
static const char *upstream_detail(void) {
  return fs_proxy_upstream_up() && !fs_uphealth_ok() ? fs_uphealth_reason() : fs_proxy_upstream_error();
}

static void push_status(astream *s, fs_health_status st);

static void (*on_change_cb)(const char *verdict, const char *reason);

void fs_admin_on_change(void (*cb)(const char *verdict, const char *reason)) { on_change_cb = cb; }

/* The verdict's reason with the upstream's detail when that is the cause. */
static void full_reason(fs_health_status st, const char *reason, char *why, size_t whylen) {
  int upstream_reason = st != FS_HEALTH_SERVING && fs_proxy_listening() && !fs_proxy_draining();
  char phase[96] = "";
  if (upstream_reason && !fs_proxy_upstream_up()) fs_proxy_upstream_phase(phase, sizeof(phase));
  snprintf(why, whylen, "%s%s%s%s%s", reason, upstream_reason ? ": " : "", upstream_reason ? upstream_detail() : "",
           phase[0] ? "; " : "", phase);
}

const char *fs_admin_verdict(char *why, size_t whylen) {
  const char *reason;
  fs_health_status st = current(&reason);
  full_reason(st, reason, why, whylen);
  return fs_health_status_name(st);
}

void fs_admin_update(void) {
  const char *reason;
  fs_health_status st = current(&reason);
  fs_list_node *n, *next;
  fs_event ev;
  char why[600];
  /* warn is for operators' alerts: not the first verdict at start, a drain
   * they asked for, or an upstream that announced its stop. */
  fs_log_level level = st == FS_HEALTH_SERVING || A.status == FS_HEALTH_UNKNOWN || fs_proxy_draining() ||
                               fs_proxy_upstream_down_planned()
                           ? FS_LOG_INFO
                           : FS_LOG_WARN;
  if (st == A.status) return;
  full_reason(st, reason, why, sizeof(why));
  if (fs_ev_begin(&ev, level, "health.change")) {
    fs_ev_str(&ev, "service", "flwr.proto.Fleet");
    fs_ev_str(&ev, "from", fs_health_status_name(A.status));
    fs_ev_str(&ev, "to", fs_health_status_name(st));
    fs_ev_str(&ev, "reason", why);
    fs_ev_end(&ev);
  }
  if (on_change_cb) on_change_cb(fs_health_status_name(st), why);
  A.status = st;
  A.reason = reason;
  fs_list_for_each_safe(n, next, &A.watchers) { /* push_status may take |w| off the list, no other */
    astream *w = fs_list_entry(n, astream, wnode);
    if (!w->unknown_service) push_status(w, st);
  }
}

/* --- gRPC health service --------------------------------------------------- */

static void watch_del(astream *s) {
  if (!fs_list_linked(&s->wnode)) return;
  fs_list_remove(&s->wnode);
  A.nwatchers--;
}

/* The connection's timer: REQUEST_TIMEOUT_MS while a request is incomplete
 * (counted from the first of them), IDLE_TIMEOUT_MS while it has no stream
 * at all, none while only answered streams (Watch) are open.  Sending the
 * HTTP/2 preface alone no longer stops the clock. */
static void conn_timer_update(aconn *c) {
  if (c->h2.closing) return;
  if (c->incomplete > 0) {
    if (!uv_is_active((uv_handle_t *)&c->h2.timer)) fs_h2conn_set_timer(&c->h2, REQUEST_TIMEOUT_MS);
  } else {
    fs_h2conn_set_timer(&c->h2, c->nstreams == 0 ? IDLE_TIMEOUT_MS : 0);
  }
}

static void request_done(astream *s) {
  if (s->complete) return;
  s->complete = 1;
  s->conn->incomplete--;
  fs_h2conn_set_timer(&s->conn->h2, 0);
  conn_timer_update(s->conn);
}

static void stream_free(astream *s) {
  aconn *c = s->conn;
  request_done(s);
  watch_del(s);
  fs_list_remove(&s->node);
  c->nstreams--;
  conn_timer_update(c);
  fs_bufq_reset(&s->out);
  free(s);
}

/* nghttp2 refused something for stream |s| (|what|, error |rv|): the stream
 * gets no more updates and is reset, or, when even that is refused, the
 * connection closes at its next flush.  Either way |s| is freed later (its
 * stream's close, or the connection's), never under the caller, which may
 * be inside an nghttp2 callback or walking the watchers. */
static void stream_fail(astream *s, const char *what, int rv) {
  aconn *c = s->conn;
  watch_del(s);
  if (nghttp2_submit_rst_stream(c->h2.session, NGHTTP2_FLAG_NONE, s->sid, NGHTTP2_INTERNAL_ERROR) != 0) {
    char why[160];
    snprintf(why, sizeof(why), "admin: %s: %s", what, nghttp2_strerror(rv));
    fs_h2conn_close_soon(&c->h2, why);
    return;
  }
  fs_h2conn_mark(&c->h2);
}

static void push_status(astream *s, fs_health_status st) {
  Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
  uint8_t buf[FS_GRPC_PREFIX_LEN + 16];
  size_t n;
  int rv;
  if (s->conn->h2.closing) return;
  resp.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)st;
  n = grpc__health__v1__health_check_response__pack(&resp, buf + FS_GRPC_PREFIX_LEN);
  fs_grpc_prefix_put(buf, (uint32_t)n);
  /* Full (a Watch client that left 4 KiB of updates unread): it misses this
   * one. */
  if (fs_bufq_append(&s->out, buf, FS_GRPC_PREFIX_LEN + n) < 0) return;
  if (s->deferred) {
    s->deferred = 0;
    if ((rv = nghttp2_session_resume_data(s->conn->h2.session, s->sid)) != 0) {
      stream_fail(s, "cannot resume a response", rv);
      return;
    }
  }
  fs_h2conn_mark(&s->conn->h2);
}

static ssize_t read_cb(nghttp2_session *ses, int32_t sid, uint8_t *buf, size_t length, uint32_t *flags,
                       nghttp2_data_source *src, void *ud) {
  astream *s = src->ptr;
  size_t n = fs_bufq_copy(&s->out, buf, length);
  (void)ud;
  fs_bufq_drop(&s->out, n);
  if (s->out.len == 0 && s->end_after) {
    fs_grpc_reply r;
    fs_grpc_reply_init(&r, FS_GRPC_OK, NULL, 0);
    /* Without its trailers the stream would never end: reset it instead. */
    if (nghttp2_submit_trailer(ses, sid, r.nv, r.n) != 0) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
    return (ssize_t)n;
  }
  if (n == 0) {
    s->deferred = 1;
    return NGHTTP2_ERR_DEFERRED;
  }
  return (ssize_t)n;
}

static void respond_error(astream *s, fs_grpc_status status, const char *msg) {
  fs_grpc_reply r;
  int rv;
  fs_grpc_reply_init(&r, status, msg, 1);
  if ((rv = nghttp2_submit_response(s->conn->h2.session, s->sid, r.nv, r.n, NULL)) != 0)
    stream_fail(s, "cannot submit a response", rv);
}

static void on_request_complete(astream *s) {
  nghttp2_nv nv[] = {
      {(uint8_t *)":status", (uint8_t *)"200", 7, 3, NGHTTP2_NV_FLAG_NONE},
      {(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12, 16, NGHTTP2_NV_FLAG_NONE},
  };
  nghttp2_data_provider prd;
  Grpc__Health__V1__HealthCheckRequest *req;
  uint32_t len;
  int known, rv;
  const char *reason;
  if (s->method == M_OTHER) {
    respond_error(s, FS_GRPC_UNIMPLEMENTED, "flower-sidecar: the admin port serves grpc.health.v1.Health only");
    return;
  }
  if (s->overflow || s->req_len < FS_GRPC_PREFIX_LEN || s->req[0] != 0 ||
      (len = fs_grpc_prefix_len(s->req)) != s->req_len - FS_GRPC_PREFIX_LEN ||
      !(req = grpc__health__v1__health_check_request__unpack(NULL, len, s->req + FS_GRPC_PREFIX_LEN))) {
    respond_error(s, FS_GRPC_INTERNAL, "flower-sidecar: cannot decode the HealthCheckRequest");
    return;
  }
  known = fs_health_known_service(req->service, strlen(req->service));
  grpc__health__v1__health_check_request__free_unpacked(req, NULL);
  if (s->method == M_CHECK && !known) {
    respond_error(s, FS_GRPC_NOT_FOUND, "unknown service");
    return;
  }
  if (s->method == M_WATCH && A.nwatchers >= MAX_WATCHERS) {
    respond_error(s, FS_GRPC_RESOURCE_EXHAUSTED, "flower-sidecar: too many Watch streams on the admin port");
    return;
  }
  prd.source.ptr = s;
  prd.read_callback = read_cb;
  if ((rv = nghttp2_submit_response(s->conn->h2.session, s->sid, nv, 2, &prd)) != 0) {
    stream_fail(s, "cannot submit a response", rv);
    return;
  }
  if (s->method == M_CHECK) {
    s->end_after = 1;
    push_status(s, current(&reason));
  } else {
    s->unknown_service = !known;
    push_status(s, known ? current(&reason) : FS_HEALTH_SERVICE_UNKNOWN);
    fs_list_push_front(&A.watchers, &s->wnode);
    A.nwatchers++;
  }
}

static int on_begin_headers(nghttp2_session *ses, const nghttp2_frame *frame, void *ud) {
  aconn *c = ud;
  astream *s;
  if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  /* A temporal failure resets only this stream. */
  if (!(s = calloc(1, sizeof(*s)))) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
  if (nghttp2_session_set_stream_user_data(ses, frame->hd.stream_id, s) != 0) {
    free(s);
    return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
  }
  s->conn = c;
  s->sid = frame->hd.stream_id;
  fs_bufq_init(&s->out, 4096);
  fs_list_node_init(&s->wnode);
  fs_list_push_front(&c->streams, &s->node);
  c->nstreams++;
  c->incomplete++;
  conn_timer_update(c);
  return 0;
}

static int on_header(nghttp2_session *ses, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen, uint8_t flags, void *ud) {
  astream *s = nghttp2_session_get_stream_user_data(ses, frame->hd.stream_id);
  (void)flags, (void)ud;
  if (!s || namelen != 5 || memcmp(name, ":path", 5)) return 0;
  if (valuelen == 28 && !memcmp(value, "/grpc.health.v1.Health/Check", 28)) s->method = M_CHECK;
  else if (valuelen == 28 && !memcmp(value, "/grpc.health.v1.Health/Watch", 28)) s->method = M_WATCH;
  return 0;
}

static int on_data_chunk(nghttp2_session *ses, uint8_t flags, int32_t sid, const uint8_t *data, size_t len, void *ud) {
  astream *s = nghttp2_session_get_stream_user_data(ses, sid);
  (void)flags, (void)ud;
  if (!s) return 0;
  if (s->req_len + len > REQ_MAX) s->overflow = 1;
  else memcpy(s->req + s->req_len, data, len), s->req_len += len;
  return 0;
}

static int on_frame_recv(nghttp2_session *ses, const nghttp2_frame *frame, void *ud) {
  astream *s;
  (void)ud;
  if ((frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) ||
      !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
    return 0;
  if ((s = nghttp2_session_get_stream_user_data(ses, frame->hd.stream_id))) {
    request_done(s);
    on_request_complete(s);
  }
  return 0;
}

static int on_stream_close(nghttp2_session *ses, int32_t sid, uint32_t code, void *ud) {
  astream *s = nghttp2_session_get_stream_user_data(ses, sid);
  (void)code, (void)ud;
  if (s) stream_free(s);
  return 0;
}

/* --- connections ------------------------------------------------------------ */

static int a_ready(fs_h2conn *h) {
  nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 1000},
                                 {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, 16384}};
  /* The request timer set at accept keeps running: a preface alone does
   * not hold an admin slot (conn_timer_update takes over per stream). */
  if (fs_h2conn_session_new(h, 1, A.cbs, NULL) != 0 ||
      nghttp2_submit_settings(h->session, NGHTTP2_FLAG_NONE, iv, 2) != 0) {
    snprintf(h->close_reason, sizeof(h->close_reason), "out of memory");
    return -1;
  }
  return 0;
}

static void a_closing(fs_h2conn *h, const char *reason) {
  aconn *c = (aconn *)h;
  fs_list_node *n;
  (void)reason;
  A.nclosing++;
  while ((n = fs_list_first(&c->streams))) stream_free(fs_list_entry(n, astream, node));
}

static void a_freed(fs_h2conn *h) {
  aconn *c = (aconn *)h;
  fs_list_remove(&c->node);
  A.nconns--;
  A.nclosing--;
  free(c->head);
  free(c);
  if (!A.listening && fs_list_empty(&A.conns) && A.on_closed) {
    void (*cb)(void) = A.on_closed;
    A.on_closed = NULL;
    nghttp2_session_callbacks_del(A.cbs);
    cb();
  }
}

static void a_timer(fs_h2conn *h) {
  aconn *c = (aconn *)h;
  fs_h2conn_close(h, h->session && c->incomplete == 0 ? "admin connection idle" : "admin request timeout");
}

/* |extra|: more header lines, each ending in CRLF ("" for none). */
static void http_reply_n(aconn *c, int code, const char *status, const char *ctype, const char *extra, const char *body,
                         size_t len, int head_only) {
  char hdr[1024];
  int n = snprintf(hdr, sizeof(hdr),
                   "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nCache-Control: no-store\r\n"
                   "X-Content-Type-Options: nosniff\r\n%sConnection: close\r\n\r\n",
                   code, status, ctype, len, extra);
  fs_h2conn_write(&c->h2, hdr, (size_t)n);
  if (!head_only) fs_h2conn_write(&c->h2, body, len);
  fs_h2conn_close_after_flush(&c->h2);
}

static void http_reply(aconn *c, int code, const char *status, const char *ctype, const char *body, int head_only) {
  http_reply_n(c, code, status, ctype, "", body, strlen(body), head_only);
}

/* Bytes queued, not yet sent, on all admin connections. */
static size_t admin_queued(void) {
  fs_list_node *n;
  size_t q = 0;
  fs_list_for_each(n, &A.conns) q += fs_list_entry(n, aconn, node)->h2.outq.len;
  return q;
}

static uint64_t wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void federation(aconn *c, int head_only) {
  const char *reason;
  fs_health_status st = current(&reason);
  char why[600];
  fs_view_ctx ctx;
  char *doc;
  size_t len;
  if (admin_queued() > ADMIN_OUT_MAX) {
    http_reply(c, 503, "Service Unavailable", "text/plain", "admin port busy: try again\n", head_only);
    return;
  }
  if (st != FS_HEALTH_SERVING && fs_proxy_listening() && !fs_proxy_draining())
    snprintf(why, sizeof(why), "%s: %s", reason, upstream_detail());
  else snprintf(why, sizeof(why), "%s", reason);
  ctx.role = A.cfg->role_name;
  ctx.version = FS_VERSION;
  ctx.upstream = A.cfg->upstream;
  ctx.upstream_up = fs_proxy_upstream_up();
  ctx.health = fs_health_status_name(st);
  ctx.health_reason = why;
  ctx.now_ms = fs_now_ms();
  ctx.wall_ms = wall_ms();
  if (!(doc = fs_view_render(&ctx, VIEW_MAX, &len))) {
    http_reply(c, 500, "Internal Server Error", "text/plain", "federation view too large or out of memory\n",
               head_only);
    return;
  }
  http_reply_n(c, 200, "OK", "application/json", "", doc, len, head_only);
  free(doc);
}

/* One HTTP/1.1 request head is complete in c->head. */
static void http_request(aconn *c) {
  char method[16], target[256], version[16], body[700];
  const char *reason;
  int head_only;
  if (sscanf(c->head, "%15[A-Z] %255[^ \r\n] %15[^\r\n]", method, target, version) != 3 ||
      strncmp(version, "HTTP/1.", 7) != 0) {
    http_reply(c, 400, "Bad Request", "text/plain", "bad request\n", 0);
    return;
  }
  head_only = !strcmp(method, "HEAD");
  target[strcspn(target, "?")] = '\0'; /* a query string changes nothing */
  if (strcmp(method, "GET") && !head_only) {
    http_reply(c, 405, "Method Not Allowed", "text/plain", "only GET and HEAD\n", 0);
    return;
  }
  if (!strcmp(target, "/") || !strcmp(target, "/index.html")) {
    /* Everything inline; the script may only fetch from this port. */
    http_reply_n(c, 200, "OK", "text/html; charset=utf-8",
                 "Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; style-src "
                 "'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                 "frame-ancestors 'none'\r\nReferrer-Policy: no-referrer\r\n",
                 fs_fedpage_html, fs_fedpage_len, head_only);
  } else if (!strcmp(target, "/v1/federation")) {
    federation(c, head_only);
  } else if (!strcmp(target, "/healthz")) {
    fs_health_status st = current(&reason);
    if (st == FS_HEALTH_SERVING) {
      http_reply(c, 200, "OK", "text/plain", "SERVING\n", head_only);
    } else {
      if (fs_proxy_draining()) snprintf(body, sizeof(body), "NOT_SERVING: %s\n", reason);
      else {
        char phase[96] = "";
        if (!fs_proxy_upstream_up()) fs_proxy_upstream_phase(phase, sizeof(phase));
        snprintf(body, sizeof(body), "NOT_SERVING: %s (%s%s%s)\n", reason, upstream_detail(), phase[0] ? "; " : "",
                 phase);
      }
      http_reply(c, 503, "Service Unavailable", "text/plain", body, head_only);
    }
  } else if (!strcmp(target, "/metrics") && A.cfg->metrics) {
    const fs_proxy_stats *ps = fs_proxy_get_stats();
    fs_fed_run runs[FS_FED_RUNS];
    fs_metrics_sample smp;
    uint64_t states[FS_NODE_NSTATES];
    memset(&smp, 0, sizeof(smp));
    smp.conns_current = ps->conns_current;
    smp.conns_total = ps->conns_total;
    smp.tls_failures = ps->tls_failures;
    smp.upstream_up = fs_proxy_upstream_up();
    smp.upstream_connects = ps->upstream_connects;
    smp.serving = current(&reason) == FS_HEALTH_SERVING;
    smp.dropped_lines = fs_log_dropped();
    smp.nodes_active = fs_fed_nodes_active();
    smp.version = fs_version;
    smp.runs = runs;
    smp.n_runs = fs_fed_runs(runs);
    smp.conns_refused = ps->conns_refused;
    {
      fs_proxy_budget_view bv;
      fs_proxy_get_budget(&bv);
      smp.calls_open = bv.calls_open, smp.calls_refused = ps->calls_refused, smp.calls_evicted = ps->calls_evicted;
      smp.buffer_pool_used = bv.pool_used, smp.buffer_pool_cap = bv.pool_cap, smp.buffer_pool_refused = bv.pool_refused;
    }
    smp.probes = ps->probes, smp.outages = ps->outages, smp.outage_s = (double)ps->outage_ms / 1000.0;
    if (A.cfg->onegate == FS_ONEGATE_ON) {
      const fs_onegate_stats *og = fs_onegate_get_stats();
      smp.onegate = 1;
      smp.onegate_publish_ok = og->publish_ok, smp.onegate_publish_failed = og->publish_failed;
      smp.onegate_discover_ok = og->discover_ok, smp.onegate_discover_failed = og->discover_failed;
    }
    smp.calls_held = ps->calls_held;
    smp.calls_failed_down = ps->calls_failed_down;
    smp.retries = ps->retries;
    smp.pings = ps->pings;
    smp.ping_rtt_s = (double)ps->ping_rtt_us / 1e6;
    if (fs_tls_server_not_after(&smp.server_not_after) < 0) smp.server_not_after = 0;
    if (fs_uppool_peer_not_after(&smp.upstream_not_after) < 0) smp.upstream_not_after = 0;
    smp.now_ms = fs_now_ms();
    fs_fed_node_states(smp.now_ms, states);
    smp.node_states = states;
    size_t cap = 256 * 1024, n;
    char *text = malloc(cap);
    if (!text || !(n = fs_metrics_render(text, cap, &smp))) {
      free(text);
      http_reply(c, 500, "Internal Server Error", "text/plain", "metrics too large\n", head_only);
      return;
    }
    http_reply(c, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", text, head_only);
    free(text);
  } else if (!strcmp(target, "/metrics")) {
    http_reply(c, 404, "Not Found", "text/plain", "metrics are disabled (--no-metrics)\n", head_only);
  } else {
    http_reply(c, 404, "Not Found", "text/plain", "not found: try /, /v1/federation, /healthz or /metrics\n",
               head_only);
  }
}

static void a_raw(fs_h2conn *h, const uint8_t *data, size_t len) {
  aconn *c = (aconn *)h;
  size_t cmp;
  if (h->close_after_flush) return; /* answered: ignore the rest */
  if (!c->head && !(c->head = malloc(HTTP1_MAX + 1))) {
    fs_h2conn_close(h, "out of memory");
    return;
  }
  if (c->head_len + len > HTTP1_MAX) {
    http_reply(c, 431, "Request Header Fields Too Large", "text/plain", "request too large\n", 0);
    return;
  }
  memcpy(c->head + c->head_len, data, len);
  c->head_len += len;
  c->head[c->head_len] = '\0';
  cmp = c->head_len < PREFACE_LEN ? c->head_len : PREFACE_LEN;
  if (memcmp(c->head, PREFACE, cmp) == 0) {
    if (c->head_len >= PREFACE_LEN) {
      char *pending = c->head;
      size_t n = c->head_len;
      c->head = NULL;
      c->head_len = 0;
      (void)fs_h2conn_begin_h2(h, (const uint8_t *)pending, n); /* -1: |h| is closing, nothing more to do */
      free(pending);
    }
    return;
  }
  if (!isupper((unsigned char)c->head[0]) || memchr(c->head, '\0', c->head_len)) {
    http_reply(c, 400, "Bad Request", "text/plain", "bad request\n", 0);
    return;
  }
  if (strstr(c->head, "\r\n\r\n") || strstr(c->head, "\n\n")) http_request(c);
}

static const fs_h2conn_ops admin_ops = {
    .on_ready = a_ready, .on_closing = a_closing, .on_freed = a_freed, .on_timer = a_timer, .on_raw = a_raw};

/* At MAX_ADMIN_CONNS, a new connection (a READY_SCRIPT probe, a scrape)
 * takes the place of the oldest one that is not serving a Watch: a client
 * that opens connections and says nothing cannot lock the admin port.
 * Returns 0 when a place was made. */
static int evict_oldest_idle(void) {
  fs_list_node *n;
  for (n = A.conns.prev; n != &A.conns; n = n->prev) {
    aconn *c = fs_list_entry(n, aconn, node);
    if (c->h2.closing || (c->nstreams > 0 && c->incomplete == 0)) continue;
    fs_h2conn_close(&c->h2, "admin: oldest idle connection closed for a new one");
    return 0;
  }
  return -1;
}

static void on_accept(uv_stream_t *server, int status) {
  aconn *c;
  if (status < 0) return;
  /* When every place serves a Watch, the newcomer is refused below. */
  if (A.nconns - A.nclosing >= MAX_ADMIN_CONNS) (void)evict_oldest_idle();
  if (!(c = calloc(1, sizeof(*c)))) return;
  if (fs_h2conn_init(&c->h2, A.loop, &admin_ops) < 0) {
    free(c);
    return;
  }
  fs_list_init(&c->streams);
  fs_list_push_front(&A.conns, &c->node);
  A.nconns++;
  if (uv_accept(server, (uv_stream_t *)&c->h2.tcp) < 0 || A.nconns - A.nclosing > MAX_ADMIN_CONNS) {
    fs_h2conn_close(&c->h2, "accept failed or too many admin connections");
    return;
  }
  snprintf(c->h2.peer, sizeof(c->h2.peer), "admin");
  fs_h2conn_set_timer(&c->h2, REQUEST_TIMEOUT_MS);
  fs_h2conn_start(&c->h2, NULL, 1, NULL, NULL);
}

int fs_admin_start(uv_loop_t *loop, const fs_config *cfg, char *err, size_t errlen) {
  memset(&A, 0, sizeof(A));
  fs_list_init(&A.conns);
  fs_list_init(&A.watchers);
  A.loop = loop;
  A.cfg = cfg;
  A.status = FS_HEALTH_UNKNOWN;
  if (nghttp2_session_callbacks_new(&A.cbs) != 0) return snprintf(err, errlen, "admin: out of memory"), -1;
  fs_h2conn_set_callbacks(A.cbs);
  nghttp2_session_callbacks_set_on_begin_headers_callback(A.cbs, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(A.cbs, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(A.cbs, on_data_chunk);
  nghttp2_session_callbacks_set_on_frame_recv_callback(A.cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_stream_close_callback(A.cbs, on_stream_close);
  {
    int opened = 0,
        rv = fs_net_listen(loop, &A.listener, cfg->admin, "127.0.0.1", "--admin", 128, on_accept, &opened, err, errlen);
    A.listening = opened; /* from here fs_admin_stop() closes the listener */
    if (rv < 0) return -1;
  }
  fs_admin_update();
  return 0;
}

void fs_admin_stop(void (*on_closed)(void)) {
  fs_list_node *n, *next;
  A.on_closed = on_closed;
  if (A.listening) {
    A.listening = 0;
    uv_close((uv_handle_t *)&A.listener, NULL);
  }
  fs_list_for_each_safe(n, next, &A.conns) fs_h2conn_close(&fs_list_entry(n, aconn, node)->h2, "shutting down");
  if (fs_list_empty(&A.conns) && A.on_closed) {
    A.on_closed = NULL;
    nghttp2_session_callbacks_del(A.cbs);
    on_closed();
  }
}
