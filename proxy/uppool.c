/* uppool: see uppool.h. */
#include "uppool.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backoff.h"
#include "fleet.h"
#include "h2mem.h"
#include "keepalive.h"
#include "log.h"
#include "policy.h"

/* --upstream-conns is at most this (config.c). */
#define MAX_CONNS 64

typedef struct upconn {
  fs_pconn pc; /* first: an upconn* is an fs_pconn* and an fs_h2conn* */
  uint8_t ready, goaway;
  fs_keepalive ka;
  uint64_t ping_t0;     /* when our outstanding PING was sent (µs), for its round trip; 0: none */
  uint64_t ping_ack_ms; /* when the last PING ACK arrived (loop clock); 0: never */
  uv_connect_t creq;
  fs_list_node node; /* in U.conns */
} upconn;

static struct {
  fs_uppool_options o;
  fs_list_node conns; /* upconn.node, newest first */
  fs_list_node queue; /* fs_call.qnode, oldest first: calls waiting for a connection */
  uint32_t nconns, nconnecting;
  uint8_t up, resolving, stopped;
  char host[256];
  int port;
  char name[300]; /* "host:port" or "[v6]:port", for events and messages */
  struct sockaddr_storage addr;
  int addr_ok;
  uv_getaddrinfo_t gai;
  fs_backoff backoff;
  uv_timer_t reconnect_timer, hold_timer;
  uint64_t ka_time_ms; /* doubled after GOAWAY too_many_pings */
  char error[400];
  nghttp2_session_callbacks *cbs;
  nghttp2_option *opt;
} U;

static void connect_now(void);
static void schedule_reconnect(void);
static void conn_timer(fs_h2conn *h);

static upconn *upconn_of(void *p) { return (upconn *)p; }

/* Something that cannot fail in practice did (a timer, a socket option):
 * say so, the data path goes on. */
static void report(const char *what, const char *why) {
  fs_event ev;
  if (!fs_ev_begin(&ev, FS_LOG_ERROR, "sidecar.error")) return;
  fs_ev_str(&ev, "reason", what);
  fs_ev_str(&ev, "error", why);
  fs_ev_end(&ev);
}

int fs_uppool_up(void) { return U.up; }
const char *fs_uppool_error(void) { return U.error; }

static void set_up(int up, const char *reason) {
  fs_event ev;
  if (U.up == up) return;
  U.up = (uint8_t)up;
  if (!up && fs_ev_begin(&ev, FS_LOG_WARN, "upstream.down")) {
    fs_ev_str(&ev, "upstream", U.name);
    fs_ev_str(&ev, "reason", reason);
    fs_ev_end(&ev);
  }
  if (U.o.on_state_change) U.o.on_state_change();
}

/* Nonzero while a connection takes new calls: SETTINGS arrived, no GOAWAY. */
static int any_ready(void) {
  fs_list_node *n;
  fs_list_for_each(n, &U.conns) {
    upconn *u = fs_list_entry(n, upconn, node);
    if (u->ready && !u->goaway && !u->pc.h2.closing) return 1;
  }
  return 0;
}

/* A connection that can take a new stream now, or NULL (policy.h). */
static upconn *pick(int *should_connect) {
  fs_upconn_view v[MAX_CONNS];
  upconn *by_index[MAX_CONNS];
  size_t n = 0;
  int i;
  fs_list_node *node;
  fs_list_for_each(node, &U.conns) {
    upconn *u = fs_list_entry(node, upconn, node);
    if (n == MAX_CONNS) break;
    v[n].closing = u->pc.h2.closing;
    v[n].ready = u->ready;
    v[n].goaway = u->goaway;
    v[n].streams = u->pc.nstreams;
    v[n].max_streams =
        u->ready ? nghttp2_session_get_remote_settings(u->pc.h2.session, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS) : 0;
    by_index[n++] = u;
  }
  i = fs_policy_pick_upstream(v, n, fs_env.cfg->upstream_conns_max, fs_env.draining, should_connect);
  return i < 0 ? NULL : by_index[i];
}

/* Where the next connection attempt stands, for messages. */
static void next_attempt(char *out, size_t len) {
  if (U.nconnecting > 0 || U.resolving) snprintf(out, len, "a connection attempt is in progress");
  else if (uv_is_active((uv_handle_t *)&U.reconnect_timer))
    snprintf(out, len, "next attempt in %.1f s", (double)uv_timer_get_due_in(&U.reconnect_timer) / 1000.0);
  else if (fs_env.draining || U.stopped) snprintf(out, len, "no further attempt (shutting down)");
  else snprintf(out, len, "reconnecting");
}

/* --- sending a call upstream --------------------------------------------------- */

static int stall_watched(const fs_call *c) {
  return fs_policy_stall_watched(U.o.stall_probe, c->deadline != 0, c->up_headers,
                                 c->method == FS_FLEET_SEND_NODE_HEARTBEAT ||
                                     fs_fleet_repeatable((fs_fleet_method)c->method));
}

static void arm_conn_timer(upconn *u, uint64_t in) {
  if (!uv_is_active((uv_handle_t *)&u->pc.h2.timer) || uv_timer_get_due_in(&u->pc.h2.timer) > in)
    fs_h2conn_set_timer(&u->pc.h2, in);
}

static void submit(fs_call *c, upconn *u) {
  nghttp2_data_provider prd = fs_call_provider(c, FS_UP);
  nghttp2_nv nv[fs_hdrs_count(&c->head[FS_DOWN]) + 1];
  size_t n = fs_hdrs_nv(&c->head[FS_DOWN], nv, U.o.tls ? "https" : "http");
  int32_t sid;
  char left_s[16];
  uint64_t now = fs_now_ms();
  int no_body;
  if (c->deadline && now > c->t_start) {
    /* Time went by here (held, repeated): the upstream gets what is left of
     * the client's deadline, as a gRPC client would send it. */
    size_t i, len = fs_grpc_timeout_format(left_s, sizeof(left_s), c->deadline > now ? c->deadline - now : 1);
    for (i = 0; len && i < n; i++)
      if (nv[i].namelen == 12 && !memcmp(nv[i].name, "grpc-timeout", 12)) {
        nv[i].value = (uint8_t *)left_s;
        nv[i].valuelen = len;
      }
  }
  no_body = c->fl[FS_DOWN].eof && c->fl[FS_DOWN].data.len == 0 && !c->fl[FS_DOWN].trailers.n;
  sid = nghttp2_submit_request(u->pc.h2.session, NULL, nv, n, no_body ? NULL : &prd, c);
  if (!c->replay_on) fs_hdrs_clear(&c->head[FS_DOWN]); /* else kept to repeat the call */
  if (sid < 0) {
    fs_call_fail(c, FS_GRPC_UNAVAILABLE, "flower-sidecar: upstream %s cannot take the call (%s)", U.name,
                 nghttp2_strerror(sid));
    return;
  }
  fs_call_attach(c, FS_UP, &u->pc, sid);
  c->t_sent = now;
  c->probe_ms = 0;
  c->stall_done = 0;
  fs_h2conn_mark(&u->pc.h2);
  if (stall_watched(c)) { /* look at it halfway to its deadline (conn_timer) */
    uint64_t due = fs_policy_stall_probe_at(c->t_sent, c->deadline);
    arm_conn_timer(u, due > now ? due - now : 1);
  }
}

static void on_hold_timer(uv_timer_t *t);

/* Arms the hold timer for |until| unless it fires earlier already. */
static void hold_timer_arm(uint64_t until) {
  uint64_t now = fs_now_ms(), delay = until > now ? until - now : 0;
  int rv;
  if (uv_is_active((uv_handle_t *)&U.hold_timer) && uv_timer_get_due_in(&U.hold_timer) <= delay) return;
  if ((rv = uv_timer_start(&U.hold_timer, on_hold_timer, delay, 0)) < 0)
    report("cannot arm the hold timer", uv_strerror(rv));
}

static void route(fs_call *c) {
  int should_connect = 0;
  upconn *u = pick(&should_connect);
  if (u) {
    submit(c, u);
    return;
  }
  fs_list_push_back(&U.queue, &c->qnode);
  fs_env.stats.calls_held++;
  if (c->hold_until) {
    fs_event ev;
    hold_timer_arm(c->hold_until);
    if (fs_ev_begin(&ev, FS_LOG_DEBUG, "call.held")) {
      char method[256];
      uint64_t now = fs_now_ms();
      fs_call_method(c, method, sizeof(method));
      fs_ev_str(&ev, "method", method);
      fs_ev_u64(&ev, "hold_ms", c->hold_until > now ? c->hold_until - now : 0);
      fs_ev_end(&ev);
    }
  }
  /* A call is waiting: try now rather than after the backoff delay, unless
   * calls may wait (the node role): then the backoff schedule holds. */
  if (should_connect && (!c->hold_until || !uv_is_active((uv_handle_t *)&U.reconnect_timer))) {
    uv_timer_stop(&U.reconnect_timer);
    connect_now();
  }
}

void fs_uppool_route(fs_call *c) {
  const fs_config *cfg = fs_env.cfg;
  /* The deadline matters to holding and to the stall probe (which works
   * with --hold-timeout 0 too). */
  if (cfg->hold_timeout_s > 0 || U.o.stall_probe) {
    nghttp2_vec to = fs_hdrs_get(&c->head[FS_DOWN], "grpc-timeout");
    uint64_t ms = 0;
    int has_deadline = to.len && fs_grpc_timeout_ms(to.base, to.len, &ms) == 0;
    if (cfg->hold_timeout_s > 0)
      c->hold_until = c->t_start + fs_policy_hold_ms((uint64_t)(cfg->hold_timeout_s * 1000), has_deadline, ms);
    if (has_deadline) c->deadline = c->t_start + (ms ? ms : 1);
  }
  route(c);
}

static void dispatch_queue(void) {
  fs_list_node *n;
  while ((n = fs_list_first(&U.queue))) {
    int should_connect;
    upconn *u = pick(&should_connect);
    fs_call *c = fs_list_entry(n, fs_call, qnode);
    if (!u) {
      if (should_connect) connect_now();
      return;
    }
    fs_list_remove(&c->qnode);
    submit(c, u);
  }
}

/* Ends the waiting calls that may not wait longer: every one when |all|,
 * else those without a hold or whose hold is over.  The others keep
 * waiting (the hold timer is re-armed for them). */
static void fail_queue(const char *why, int all) {
  uint64_t now = fs_now_ms(), next = 0;
  char when[64];
  fs_list_node *n, *tmp;
  next_attempt(when, sizeof(when));
  fs_list_for_each_safe(n, tmp, &U.queue) {
    fs_call *c = fs_list_entry(n, fs_call, qnode);
    if (!all && c->hold_until > now) {
      if (!next || c->hold_until < next) next = c->hold_until;
      continue;
    }
    fs_list_remove(&c->qnode);
    fs_env.stats.calls_failed_down++;
    if (c->hold_until)
      fs_call_fail(c, FS_GRPC_UNAVAILABLE, "flower-sidecar: upstream %s unreachable (%s); waited %.1f s, %s", U.name,
                   why, (double)(now - c->t_start) / 1000.0, when);
    else fs_call_fail(c, FS_GRPC_UNAVAILABLE, "flower-sidecar: upstream %s unreachable (%s); %s", U.name, why, when);
    fs_call_maybe_free(c);
  }
  if (next) hold_timer_arm(next);
}

static void on_hold_timer(uv_timer_t *t) {
  (void)t;
  fail_queue(U.up ? "no upstream connection could take the call in time" : U.error, 0);
}

/* Nonzero when the call may be repeated (policy.h). */
static int may_retry(const fs_call *c, int refused) {
  fs_retry_facts f;
  f.replay_complete = c->replay_on;
  f.response_started = c->up_headers;
  f.trailers_sent = c->req_trailers;
  f.finished = c->finished;
  f.client_present = c->leg[FS_DOWN].conn != NULL;
  f.draining = fs_env.draining;
  f.attempts = c->attempts;
  f.refused = (uint8_t)refused;
  f.method_repeatable = (uint8_t)fs_fleet_repeatable((fs_fleet_method)c->method);
  return fs_policy_may_retry(&f);
}

/* Repeats a call whose upstream stream ended before the upstream processed
 * it (may_retry); its upstream leg is already detached. */
static void retry(fs_call *c, const char *reason) {
  fs_event ev;
  uint64_t now = fs_now_ms();
  if (c->hold_until && c->hold_until <= now) {
    /* The hold counts from the call's start (the SuperLink refuses requests
     * signed too long ago): past it, the call ends instead of waiting. */
    fs_env.stats.calls_failed_down++;
    fs_call_fail(c, FS_GRPC_UNAVAILABLE, "flower-sidecar: upstream %s %s; the call is %.1f s old, past --hold-timeout",
                 U.name, reason, (double)(now - c->t_start) / 1000.0);
    return;
  }
  c->attempts++;
  fs_env.stats.retries++;
  fs_call_replay_rewind(c);
  if (fs_ev_begin(&ev, FS_LOG_INFO, "call.retry")) {
    char method[256];
    fs_call_method(c, method, sizeof(method));
    fs_ev_str(&ev, "method", method);
    fs_ev_str(&ev, "reason", reason);
    fs_ev_u64(&ev, "attempt", c->attempts);
    fs_ev_end(&ev);
  }
  route(c);
}

/* --- nghttp2 callbacks of upstream sessions -------------------------------------- */

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, nghttp2_rcbuf *name, nghttp2_rcbuf *value,
                     uint8_t flags, void *ud) {
  fs_call *c = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
  (void)flags, (void)ud;
  if (c && frame->hd.type == NGHTTP2_HEADERS)
    fs_call_recv_header(c, FS_UP, frame->headers.cat == NGHTTP2_HCAT_HEADERS, name, value);
  return 0;
}

static void on_response_headers(fs_call *c, const nghttp2_frame *frame) {
  int end = frame->hd.flags & NGHTTP2_FLAG_END_STREAM;
  if (c->overflow) {
    fs_call_fail(c, FS_GRPC_INTERNAL,
                 "flower-sidecar: upstream response headers exceed --max-header-list-size %u bytes",
                 fs_env.cfg->max_header_list_size);
    return;
  }
  c->up_headers = 1;
  fs_call_replay_off(c); /* processed: never repeated */
  if (end) {
    c->fl[FS_UP].eof = 1;
    fs_call_observe_status(c, &c->head[FS_UP]);
  }
  fs_call_respond(c, end);
  fs_hdrs_clear(&c->head[FS_UP]);
}

static void on_settings(upconn *u) {
  fs_event ev;
  u->ready = 1;
  U.nconnecting--;
  if (U.o.keepalive) {
    fs_keepalive_init(&u->ka, U.ka_time_ms, (uint64_t)(fs_env.cfg->keepalive_timeout_s * 1000), fs_now_ms());
    fs_h2conn_set_timer(&u->pc.h2, U.ka_time_ms);
  } else {
    fs_h2conn_set_timer(&u->pc.h2, 0);
  }
  fs_backoff_reset(&U.backoff);
  if (!U.up) {
    if (fs_ev_begin(&ev, FS_LOG_INFO, "upstream.up")) {
      fs_ev_str(&ev, "upstream", U.name);
      fs_ev_u64(&ev, "connect_ms", fs_now_ms() - u->pc.h2.opened_ms);
      fs_ev_end(&ev);
    }
    set_up(1, NULL);
  }
  dispatch_queue();
}

static void on_ping_ack(upconn *u) {
  fs_event ev;
  fs_env.stats.ping_rtt_us = (uv_hrtime() / 1000) - u->ping_t0;
  u->ping_t0 = 0;
  u->ping_ack_ms = fs_now_ms();
  if (fs_ev_begin(&ev, FS_LOG_DEBUG, "upstream.ping")) {
    fs_ev_str(&ev, "upstream", U.name);
    fs_ev_num(&ev, "rtt_ms", (double)fs_env.stats.ping_rtt_us / 1000.0, 3);
    fs_ev_end(&ev);
  }
  /* Answered: the next PING is due keepalive-time after this ACK, not after
   * the look the PING's timeout had scheduled. */
  if (U.o.keepalive && u->ready) conn_timer(&u->pc.h2);
}

static void on_goaway(upconn *u, const nghttp2_frame *frame) {
  int should_connect;
  if (U.o.keepalive && frame->goaway.error_code == NGHTTP2_ENHANCE_YOUR_CALM && frame->goaway.opaque_data_len == 14 &&
      !memcmp(frame->goaway.opaque_data, "too_many_pings", 14)) {
    fs_event ev;
    U.ka_time_ms = fs_policy_keepalive_backoff(U.ka_time_ms);
    if (fs_ev_begin(&ev, FS_LOG_WARN, "upstream.too_many_pings")) {
      fs_ev_str(&ev, "upstream", U.name);
      fs_ev_num(&ev, "keepalive_time_s", (double)U.ka_time_ms / 1000.0, 3);
      fs_ev_end(&ev);
    }
  }
  fs_pconn_note_goaway(&u->pc, frame);
  if (u->goaway) return;
  u->goaway = 1;
  snprintf(U.error, sizeof(U.error), "%s", u->pc.h2.close_reason);
  /* The upstream is going away: health says so at once, and a new
   * connection is tried now for the calls to come. */
  if (U.up && !any_ready()) set_up(0, u->pc.h2.close_reason);
  if (!pick(&should_connect) && should_connect) connect_now();
  if (!fs_list_empty(&U.queue)) dispatch_queue();
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *ud) {
  upconn *u = upconn_of(ud);
  fs_call *c;
  switch (frame->hd.type) {
  case NGHTTP2_SETTINGS:
    if (!(frame->hd.flags & NGHTTP2_FLAG_ACK) && !u->ready) on_settings(u);
    return 0;
  case NGHTTP2_PING:
    if ((frame->hd.flags & NGHTTP2_FLAG_ACK) && u->ping_t0) on_ping_ack(u);
    return 0;
  case NGHTTP2_GOAWAY:
    on_goaway(u, frame);
    return 0;
  case NGHTTP2_HEADERS:
  case NGHTTP2_DATA:
    break;
  default:
    return 0;
  }
  if (!(c = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id))) return 0;
  if (frame->hd.type == NGHTTP2_HEADERS) {
    if (frame->headers.cat == NGHTTP2_HCAT_RESPONSE) {
      on_response_headers(c, frame);
      return 0;
    }
    if (frame->headers.cat == NGHTTP2_HCAT_HEADERS && fs_call_recv_trailers(c, FS_UP) < 0) return 0;
  }
  if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) fs_call_recv_end(c, FS_UP);
  return 0;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data, size_t len, void *ud) {
  fs_call *c = nghttp2_session_get_stream_user_data(s, sid);
  int rv;
  (void)flags;
  /* Connection credit at once: one slow client never stalls the shared
   * connection (stream windows bound the memory). */
  if ((rv = nghttp2_session_consume_connection(s, len)) != 0) {
    fs_pconn_broken(ud, "returning connection credit", rv);
    return 0;
  }
  if (c) fs_call_recv_data(c, FS_UP, data, len);
  return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t sid, uint32_t code, void *ud) {
  fs_call *c = nghttp2_session_get_stream_user_data(s, sid);
  (void)ud;
  if (!c) return 0;
  if (code == NGHTTP2_REFUSED_STREAM && !c->fl[FS_UP].eof && may_retry(c, 1)) {
    /* Refused (or above a GOAWAY's last-stream-id): never processed. */
    fs_call_detach_keep(c, FS_UP);
    retry(c, "upstream refused the stream");
    fs_call_maybe_free(c);
    return 0;
  }
  fs_call_detach(c, FS_UP);
  if (c->leg[FS_DOWN].conn && !c->fl[FS_UP].eof) {
    /* The upstream reset the stream: pass the reset on. */
    if (!c->finished) {
      char msg[96];
      int status = code == NGHTTP2_REFUSED_STREAM ? FS_GRPC_UNAVAILABLE : FS_GRPC_CANCELLED;
      snprintf(msg, sizeof(msg), "upstream reset the stream (%s)", nghttp2_http2_strerror(code));
      c->finished = 1;
      fs_call_end(c, status);
      fs_call_log_error(c, status, msg, strlen(msg));
    }
    fs_call_rst(c, FS_DOWN, code ? code : NGHTTP2_INTERNAL_ERROR);
  }
  fs_call_maybe_free(c);
  return 0;
}

static int on_frame_send(nghttp2_session *s, const nghttp2_frame *frame, void *ud) {
  (void)s;
  if (frame->hd.type == NGHTTP2_GOAWAY) fs_pconn_note_sent_goaway(ud, frame);
  return 0;
}

static int send_data(nghttp2_session *s, nghttp2_frame *frame, const uint8_t *framehd, size_t length,
                     nghttp2_data_source *src, void *ud) {
  (void)s;
  return fs_call_send_data(src->ptr, FS_UP, ud, frame, framehd, length);
}

/* --- connections ------------------------------------------------------------------- */

static int conn_ready(fs_h2conn *h) {
  upconn *u = upconn_of(h);
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, fs_env.cfg->stream_window},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, fs_env.cfg->max_header_list_size},
  };
  if (nghttp2_session_client_new3(&h->session, U.cbs, u, U.opt, fs_h2mem()) != 0 ||
      nghttp2_submit_settings(h->session, NGHTTP2_FLAG_NONE, iv, 3) != 0 ||
      /* Stream windows bound memory; the connection window only must not
       * get in the way (see on_data_chunk). */
      nghttp2_session_set_local_window_size(h->session, NGHTTP2_FLAG_NONE, 0, 1 << 30) != 0) {
    snprintf(h->close_reason, sizeof(h->close_reason), "out of memory");
    return -1;
  }
  fs_h2conn_mark(h);
  return 0;
}

static void conn_closing(fs_h2conn *h, const char *reason) {
  upconn *u = upconn_of(h);
  int was_ready = u->ready;
  fs_list_node *n;
  if (!u->ready) U.nconnecting--;
  u->ready = 0;
  snprintf(U.error, sizeof(U.error), "%s", reason);
  while ((n = fs_list_first(&u->pc.calls))) {
    fs_call *c = fs_list_entry(n, fs_call, leg[FS_UP].node);
    if (!c->fl[FS_UP].eof && may_retry(c, 0)) { /* side-effect free: repeat it */
      char why[200];
      fs_call_detach_keep(c, FS_UP);
      snprintf(why, sizeof(why), "connection lost (%s)", reason);
      retry(c, why);
      fs_call_maybe_free(c);
      continue;
    }
    fs_call_detach(c, FS_UP);
    if (!c->fl[FS_UP].eof) {
      fs_env.stats.calls_failed_down++;
      fs_call_fail(c, FS_GRPC_UNAVAILABLE, "flower-sidecar: upstream %s connection lost (%s)", U.name, reason);
    }
    fs_call_maybe_free(c);
  }
  if (!was_ready) fs_env.stats.upstream_failures++;
}

static void conn_freed(fs_h2conn *h) {
  upconn *u = upconn_of(h);
  fs_list_remove(&u->node);
  U.nconns--;
  free(u);
  if (U.up && !any_ready()) set_up(0, U.error);
  schedule_reconnect(); /* first: failed calls say when the next attempt is */
  if (U.nconnecting == 0 && !any_ready()) fail_queue(U.error, 0);
  else dispatch_queue();
  if (U.o.on_maybe_idle) U.o.on_maybe_idle();
}

static void send_ping(upconn *u) {
  int rv = nghttp2_submit_ping(u->pc.h2.session, NGHTTP2_FLAG_NONE, NULL);
  if (rv != 0) {
    fs_pconn_broken(&u->pc, "sending a PING", rv);
    return;
  }
  /* Time the oldest outstanding PING: its ACK comes first. */
  if (!u->ping_t0) u->ping_t0 = uv_hrtime() / 1000;
  fs_env.stats.pings++;
  fs_h2conn_mark(&u->pc.h2);
}

/* Watched calls that stall probe their connection with a PING and end
 * UNAVAILABLE (which the SuperNode retries, unlike DEADLINE_EXCEEDED) when
 * it does not answer in time; keepalive then judges the connection
 * (policy.h, fs_policy_stall).  Returns the delay before the next look, at
 * most |next| (0: none). */
static uint64_t check_stalled_calls(upconn *u, uint64_t next) {
  uint64_t now = fs_now_ms(), at = 0, ka_next;
  fs_list_node *n, *tmp;
  fs_list_for_each_safe(n, tmp, &u->pc.calls) {
    fs_call *c = fs_list_entry(n, fs_call, leg[FS_UP].node);
    fs_stall_verdict v;
    if (!stall_watched(c) || c->finished || c->stall_done) continue;
    v = fs_policy_stall(now, c->t_sent, c->deadline, c->probe_ms, u->ping_ack_ms, &at);
    if (v == FS_STALL_PROBE) {
      c->probe_ms = now;
      if (!u->ping_t0 && fs_keepalive_probe(&u->ka, now, u->pc.h2.last_rx_ms, &ka_next)) send_ping(u);
      v = fs_policy_stall(now, c->t_sent, c->deadline, c->probe_ms, u->ping_ack_ms, &at);
    }
    switch (v) {
    case FS_STALL_WAIT:
      if (!next || at - now < next) next = at - now;
      break;
    case FS_STALL_ALIVE: /* the connection answered: a slow call */
      c->stall_done = 1;
      break;
    case FS_STALL_FAIL:
      c->stall_done = 1;
      fs_env.stats.calls_failed_down++;
      fs_call_fail(c, FS_GRPC_UNAVAILABLE,
                   "flower-sidecar: upstream %s did not answer a PING within %.1f s, the call's deadline is near",
                   U.name, (double)(now - c->probe_ms) / 1000.0);
      break;
    case FS_STALL_PROBE:
      break;
    }
  }
  return next;
}

static void conn_timer(fs_h2conn *h) {
  upconn *u = upconn_of(h);
  char why[96];
  uint64_t next = 0;
  if (!u->ready) {
    snprintf(why, sizeof(why), "no HTTP/2 SETTINGS within %gs", fs_env.cfg->connect_timeout_s);
    fs_h2conn_close(h, why);
    return;
  }
  if (U.o.keepalive) {
    switch (fs_keepalive_check(&u->ka, fs_now_ms(), h->last_rx_ms, u->pc.nstreams > 0, &next)) {
    case FS_KA_DEAD:
      snprintf(why, sizeof(why), "keepalive: no PING ACK within %gs", fs_env.cfg->keepalive_timeout_s);
      fs_h2conn_close(h, why);
      return;
    case FS_KA_PING:
      send_ping(u);
      break;
    case FS_KA_WAIT:
      break;
    }
  }
  if (U.o.stall_probe) next = check_stalled_calls(u, next);
  fs_h2conn_set_timer(h, next);
}

static const fs_h2conn_ops conn_ops = {conn_ready, NULL, conn_closing, conn_freed, conn_timer, NULL};

static void on_connected(uv_connect_t *req, int status) {
  upconn *u = req->data;
  const char *name = fs_env.cfg->tls_server_name ? fs_env.cfg->tls_server_name : U.host;
  if (u->pc.h2.closing) return;
  if (status < 0) {
    fs_h2conn_close(&u->pc.h2, uv_strerror(status));
    return;
  }
  if (U.o.keepalive) {
    /* Unacknowledged bytes for longer than the keepalive timeout: the
     * kernel gives up too (a stalled write would otherwise hide it). */
    uv_os_fd_t fd;
    unsigned int ms = (unsigned int)(fs_env.cfg->keepalive_timeout_s * 1000);
    if (uv_fileno((uv_handle_t *)&u->pc.h2.tcp, &fd) != 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof(ms)) != 0)
      report("cannot set TCP_USER_TIMEOUT (keepalive PINGs still watch the connection)", strerror(errno));
  }
  fs_h2conn_start(&u->pc.h2, U.o.tls, 0, name, name);
}

static void connect_to(const struct sockaddr *sa) {
  upconn *u = calloc(1, sizeof(*u));
  int rv;
  if (!u) return;
  if (fs_h2conn_init(&u->pc.h2, fs_env.loop, &conn_ops) < 0) {
    free(u);
    return;
  }
  fs_pconn_init(&u->pc, FS_UP);
  fs_list_push_front(&U.conns, &u->node);
  U.nconns++;
  U.nconnecting++;
  fs_env.stats.upstream_connects++;
  snprintf(u->pc.h2.peer, sizeof(u->pc.h2.peer), "%s", U.name);
  fs_h2conn_set_timer(&u->pc.h2, (uint64_t)(fs_env.cfg->connect_timeout_s * 1000));
  u->creq.data = u;
  if ((rv = uv_tcp_connect(&u->creq, &u->pc.h2.tcp, sa, on_connected)) < 0) fs_h2conn_close(&u->pc.h2, uv_strerror(rv));
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  (void)req;
  U.resolving = 0;
  if (status < 0 || !res) {
    snprintf(U.error, sizeof(U.error), "cannot resolve %s: %s", U.host, uv_strerror(status));
    if (U.up) set_up(0, U.error);
    schedule_reconnect();
    if (!U.nconnecting) fail_queue(U.error, 0);
    if (U.o.on_maybe_idle) U.o.on_maybe_idle();
  } else if (!fs_env.draining) {
    memcpy(&U.addr, res->ai_addr, res->ai_addrlen);
    connect_to(res->ai_addr);
  }
  uv_freeaddrinfo(res);
}

static void connect_now(void) {
  if (fs_env.draining || U.resolving) return;
  if (U.addr_ok) {
    connect_to((const struct sockaddr *)&U.addr);
  } else {
    char port[8];
    struct addrinfo hints;
    int rv;
    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    snprintf(port, sizeof(port), "%d", U.port);
    if ((rv = uv_getaddrinfo(fs_env.loop, &U.gai, on_resolved, U.host, port, &hints)) == 0) U.resolving = 1;
    else {
      snprintf(U.error, sizeof(U.error), "cannot resolve %s: %s", U.host, uv_strerror(rv));
      schedule_reconnect();
    }
  }
}

static void on_reconnect_timer(uv_timer_t *t) {
  (void)t;
  if (U.nconns == 0) connect_now();
}

static void schedule_reconnect(void) {
  uint64_t delay;
  fs_event ev;
  int rv;
  if (fs_env.draining || U.nconns > 0 || U.resolving || uv_is_active((uv_handle_t *)&U.reconnect_timer)) return;
  delay = fs_backoff_next(&U.backoff);
  if (delay > 0 && fs_ev_begin(&ev, FS_LOG_INFO, "upstream.backoff")) {
    fs_ev_str(&ev, "upstream", U.name);
    fs_ev_u64(&ev, "attempt", U.backoff.attempt);
    fs_ev_u64(&ev, "delay_ms", delay);
    fs_ev_str(&ev, "reason", U.error);
    fs_ev_end(&ev);
  }
  if ((rv = uv_timer_start(&U.reconnect_timer, on_reconnect_timer, delay, 0)) < 0)
    report("cannot arm the reconnect timer", uv_strerror(rv));
}

/* --- the pool's life --------------------------------------------------------------- */

int fs_uppool_start(const fs_uppool_options *o, char *err, size_t errlen) {
  const fs_config *cfg = fs_env.cfg;
  memset(&U, 0, sizeof(U));
  U.o = *o;
  fs_list_init(&U.conns);
  fs_list_init(&U.queue);
  fs_hostport_split(cfg->upstream, U.host, sizeof(U.host), &U.port);
  snprintf(U.name, sizeof(U.name), strchr(U.host, ':') ? "[%s]:%d" : "%s:%d", U.host, U.port);
  if (uv_ip4_addr(U.host, U.port, (struct sockaddr_in *)&U.addr) == 0 ||
      uv_ip6_addr(U.host, U.port, (struct sockaddr_in6 *)&U.addr) == 0)
    U.addr_ok = 1;
  snprintf(U.error, sizeof(U.error), "not connected yet");
  fs_backoff_init(&U.backoff, (uint64_t)(cfg->backoff_initial_s * 1000), (uint64_t)(cfg->backoff_max_s * 1000),
                  (uint64_t)uv_hrtime() ^ (uint64_t)getpid());
  U.ka_time_ms = (uint64_t)(cfg->keepalive_time_s * 1000);
  if (nghttp2_session_callbacks_new(&U.cbs) != 0 || nghttp2_option_new(&U.opt) != 0) {
    nghttp2_session_callbacks_del(U.cbs);
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  fs_h2conn_set_callbacks(U.cbs);
  nghttp2_session_callbacks_set_on_header_callback2(U.cbs, on_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(U.cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(U.cbs, on_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(U.cbs, on_stream_close);
  nghttp2_session_callbacks_set_on_frame_send_callback(U.cbs, on_frame_send);
  nghttp2_session_callbacks_set_send_data_callback(U.cbs, send_data);
  nghttp2_option_set_no_auto_window_update(U.opt, 1);
  /* Timers on a live loop cannot fail to initialise (libuv). */
  (void)uv_timer_init(fs_env.loop, &U.reconnect_timer);
  (void)uv_timer_init(fs_env.loop, &U.hold_timer);
  connect_now();
  return 0;
}

void fs_uppool_drain(void) { uv_timer_stop(&U.reconnect_timer); }

void fs_uppool_close_all(void) {
  fs_list_node *n, *tmp;
  fs_list_for_each_safe(n, tmp, &U.conns) {
    upconn *u = fs_list_entry(n, upconn, node);
    fs_h2conn_close(&u->pc.h2, "shutting down");
  }
}

int fs_uppool_idle(void) {
  if (U.nconns > 0) return 0;
  if (U.resolving) {
    (void)uv_cancel((uv_req_t *)&U.gai); /* on_resolved follows either way */
    return 0;
  }
  return 1;
}

void fs_uppool_stop(void) {
  U.stopped = 1;
  fail_queue("shutting down", 1);
  uv_close((uv_handle_t *)&U.reconnect_timer, NULL);
  uv_close((uv_handle_t *)&U.hold_timer, NULL);
  nghttp2_session_callbacks_del(U.cbs);
  nghttp2_option_del(U.opt);
  SSL_CTX_free(U.o.tls);
}
