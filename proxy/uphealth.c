/* uphealth: see uphealth.h. */
#include "uphealth.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "grpc.h"
#include "fleet.h"
#include "h2conn.h"
#include "log.h"

#define CHECK_EVERY_MS   500
#define CHECK_TIMEOUT_MS 1000

typedef struct uconn {
  fs_h2conn h2; /* first: a uconn* is an fs_h2conn* */
  uv_connect_t creq;
  int ready;
} uconn;

static struct {
  uv_loop_t *loop;
  struct sockaddr_storage addr;
  char name[300];
  uv_timer_t timer;
  uconn *conn;
  nghttp2_session_callbacks *cbs;
  void (*on_change)(void);
  int configured, stopping;
  int32_t sid; /* the Check in flight, 0: none */
  uint64_t sent_ms;
  uint8_t body[64]; /* the answer's gRPC message (HealthCheckResponse is 2 bytes) */
  size_t body_len;
  int grpc_status; /* -1 until seen */
  int ok;
  char reason[200];
} U;

int fs_uphealth_ok(void) { return !U.configured || U.ok; }
const char *fs_uphealth_reason(void) { return U.ok ? "" : U.reason; }

static void set_result(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_result(int ok, const char *fmt, ...) {
  char why[sizeof(U.reason)];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof(why), fmt, ap);
  va_end(ap);
  if (ok == U.ok && !strcmp(why, U.reason)) return;
  U.ok = ok;
  snprintf(U.reason, sizeof(U.reason), "%s", why);
  if (U.on_change) U.on_change();
}

/* --- the answer ----------------------------------------------------------- */

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen, uint8_t flags, void *ud) {
  (void)s, (void)flags, (void)ud;
  if (frame->hd.stream_id != U.sid || namelen != 11 || memcmp(name, "grpc-status", 11)) return 0;
  U.grpc_status = fs_grpc_status_parse(value, valuelen);
  return 0;
}

static int on_data(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data, size_t len, void *ud) {
  size_t take;
  (void)s, (void)flags, (void)ud;
  if (sid != U.sid) return 0;
  take = len < sizeof(U.body) - U.body_len ? len : sizeof(U.body) - U.body_len;
  memcpy(U.body + U.body_len, data, take);
  U.body_len += take;
  return 0;
}

/* HealthCheckResponse { ServingStatus status = 1; } in one gRPC message. */
static int serving_status(void) {
  const uint8_t *p = U.body + FS_GRPC_PREFIX_LEN, *end;
  fs_pb_field f;
  uint32_t mlen;
  if (U.body_len < FS_GRPC_PREFIX_LEN || U.body[0] != 0) return -1;
  mlen = fs_grpc_prefix_len(U.body);
  if (mlen > U.body_len - FS_GRPC_PREFIX_LEN) return -1;
  end = p + mlen;
  while (fs_pb_next(&p, end, &f) == 1)
    if (f.num == 1 && f.wire == 0) return (int)f.value;
  return 0; /* absent: UNKNOWN */
}

static int on_stream_close(nghttp2_session *s, int32_t sid, uint32_t code, void *ud) {
  int st;
  (void)s, (void)ud;
  if (sid != U.sid) return 0;
  U.sid = 0;
  if (code) set_result(0, "SuperLink health %s: stream reset (%s)", U.name, nghttp2_http2_strerror(code));
  else if (U.grpc_status != FS_GRPC_OK)
    set_result(0, "SuperLink health %s: Check failed with grpc-status %d", U.name, U.grpc_status);
  else if ((st = serving_status()) != 1)
    set_result(0, "SuperLink health %s answered %s", U.name,
               st == 2   ? "NOT_SERVING"
               : st == 3 ? "SERVICE_UNKNOWN"
               : st < 0  ? "a malformed message"
                         : "UNKNOWN");
  else set_result(1, "%s", "");
  return 0;
}

/* --- the connection --------------------------------------------------------- */

static int on_ready(fs_h2conn *h) {
  if (fs_h2conn_session_new(h, 0, U.cbs, NULL) != 0 ||
      nghttp2_submit_settings(h->session, NGHTTP2_FLAG_NONE, NULL, 0) != 0) {
    snprintf(h->close_reason, sizeof(h->close_reason), "out of memory");
    return -1;
  }
  ((uconn *)h)->ready = 1;
  fs_h2conn_mark(h);
  return 0;
}

static void on_closing(fs_h2conn *h, const char *reason) {
  if (U.conn == (uconn *)h) U.conn = NULL;
  U.sid = 0;
  if (!U.stopping) set_result(0, "SuperLink health %s: %s", U.name, reason);
}

static void on_freed(fs_h2conn *h) { free(h); }
static void on_conn_timer(fs_h2conn *h) { (void)h; }

static const fs_h2conn_ops ops = {
    .on_ready = on_ready, .on_closing = on_closing, .on_freed = on_freed, .on_timer = on_conn_timer};

static void on_connected(uv_connect_t *req, int status) {
  uconn *c = req->data;
  if (c->h2.closing) return;
  if (status < 0) {
    fs_h2conn_close(&c->h2, uv_strerror(status));
    return;
  }
  (void)fs_h2conn_start(&c->h2, NULL, 0, NULL, NULL); /* -1: closed, on_closing said why */
}

static void connect_now(void) {
  uconn *c = calloc(1, sizeof(*c));
  int rv;
  if (!c) return;
  if (fs_h2conn_init(&c->h2, U.loop, &ops) < 0) {
    free(c);
    return;
  }
  snprintf(c->h2.peer, sizeof(c->h2.peer), "%s", U.name);
  U.conn = c;
  c->creq.data = c;
  if ((rv = uv_tcp_connect(&c->creq, &c->h2.tcp, (struct sockaddr *)&U.addr, on_connected)) < 0)
    fs_h2conn_close(&c->h2, uv_strerror(rv));
}

/* The request body: one gRPC message, HealthCheckRequest{service: ""}. */
static ssize_t read_request(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t length, uint32_t *flags,
                            nghttp2_data_source *src, void *ud) {
  (void)s, (void)sid, (void)src, (void)ud;
  if (length < 5) return NGHTTP2_ERR_CALLBACK_FAILURE;
  memset(buf, 0, 5);
  *flags |= NGHTTP2_DATA_FLAG_EOF;
  return 5;
}

static void send_check(void) {
  nghttp2_nv nv[] = {
#define NV(n, v) {(uint8_t *)n, (uint8_t *)v, sizeof(n) - 1, sizeof(v) - 1, NGHTTP2_NV_FLAG_NONE}
      NV(":method", "POST"),
      NV(":scheme", "http"),
      NV(":path", "/grpc.health.v1.Health/Check"),
      NV(":authority", "localhost"),
      NV("content-type", "application/grpc"),
      NV("te", "trailers"),
      NV("grpc-timeout", "1000m"),
#undef NV
  };
  nghttp2_data_provider prd;
  prd.source.ptr = NULL;
  prd.read_callback = read_request;
  U.body_len = 0;
  U.grpc_status = -1;
  U.sent_ms = uv_now(U.loop);
  U.sid = nghttp2_submit_request(U.conn->h2.session, NULL, nv, sizeof(nv) / sizeof(nv[0]), &prd, NULL);
  if (U.sid < 0) {
    U.sid = 0;
    fs_h2conn_close(&U.conn->h2, "cannot submit a Check");
    return;
  }
  fs_h2conn_mark(&U.conn->h2);
}

static void on_tick(uv_timer_t *t) {
  (void)t;
  if (U.stopping) return;
  if (!U.conn) {
    connect_now();
    return;
  }
  if (U.sid) { /* the previous Check has not answered */
    if (uv_now(U.loop) - U.sent_ms >= CHECK_TIMEOUT_MS) fs_h2conn_close(&U.conn->h2, "Check timed out after 1 s");
    return;
  }
  if (U.conn->ready && !U.conn->h2.closing) send_check();
}

int fs_uphealth_start(uv_loop_t *loop, const char *addr, void (*on_change)(void), char *err, size_t errlen) {
  char host[256];
  int port, rv;
  memset(&U, 0, sizeof(U));
  U.loop = loop;
  U.on_change = on_change;
  if (fs_hostport_split(addr, host, sizeof(host), &port) < 0 ||
      (uv_ip4_addr(host, port, (struct sockaddr_in *)&U.addr) != 0 &&
       uv_ip6_addr(host, port, (struct sockaddr_in6 *)&U.addr) != 0)) {
    snprintf(err, errlen, "invalid --upstream-health: '%s' (expected a numeric IP:PORT)", addr);
    return -1;
  }
  snprintf(U.name, sizeof(U.name), "%s", addr);
  snprintf(U.reason, sizeof(U.reason), "SuperLink health %s: not checked yet", addr);
  if (nghttp2_session_callbacks_new(&U.cbs) != 0) {
    snprintf(err, errlen, "--upstream-health: out of memory");
    return -1;
  }
  fs_h2conn_set_callbacks(U.cbs);
  nghttp2_session_callbacks_set_on_header_callback(U.cbs, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(U.cbs, on_data);
  nghttp2_session_callbacks_set_on_stream_close_callback(U.cbs, on_stream_close);
  if ((rv = uv_timer_init(loop, &U.timer)) == 0 && (rv = uv_timer_start(&U.timer, on_tick, 0, CHECK_EVERY_MS)) < 0)
    uv_close((uv_handle_t *)&U.timer, NULL); /* static: nothing to free */
  if (rv < 0) {
    snprintf(err, errlen, "--upstream-health: cannot start its timer: %s", uv_strerror(rv));
    nghttp2_session_callbacks_del(U.cbs);
    return -1;
  }
  U.configured = 1; /* from here fs_uphealth_stop() closes the timer */
  return 0;
}

void fs_uphealth_stop(void) {
  if (!U.configured || U.stopping) return;
  U.stopping = 1;
  uv_close((uv_handle_t *)&U.timer, NULL);
  if (U.conn) fs_h2conn_close(&U.conn->h2, "shutting down");
  nghttp2_session_callbacks_del(U.cbs);
}
