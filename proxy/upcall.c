/* upcall: the calls' side of the upstream (see upconn.h and uppool.h):
 * sending a call, the hold queue, safe repeats, the stall probe, and the
 * response, trailers and resets that come back. */
#include <stdio.h>
#include <string.h>

#include "fleet.h"
#include "log.h"
#include "policy.h"
#include "upconn.h"

static struct {
  fs_list_node queue; /* fs_call.qnode, oldest first: calls waiting for a connection */
  uv_timer_t hold_timer;
} Q;

static void on_hold_timer(uv_timer_t *t);

static int stall_watched(const fs_call *c) {
  return fs_policy_stall_watched(fs_uppool_options_get()->stall_probe, c->deadline != 0, c->up_headers,
                                 c->method == FS_FLEET_SEND_NODE_HEARTBEAT ||
                                     fs_fleet_repeatable((fs_fleet_method)c->method));
}

/* Submits the call's request on |u|; only from |u|'s flush
 * (fs_upcall_flush), which writes it right after. */
static void submit(fs_call *c, fs_upconn *u) {
  nghttp2_data_provider prd = fs_call_provider(c, FS_UP);
  nghttp2_nv nv[fs_hdrs_count(&c->head[FS_DOWN]) + 1];
  size_t n = fs_hdrs_nv(&c->head[FS_DOWN], nv, fs_uppool_options_get()->tls ? "https" : "http");
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
  {
    /* What goes upstream must fit the upstream's header list limit as well
     * as ours: a request above it would make a gRPC server end the whole
     * shared connection (every client's calls), not just this call. */
    uint32_t theirs = nghttp2_session_get_remote_settings(u->pc.h2.session, NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE);
    uint32_t limit = theirs < fs_env.cfg->max_header_list_size ? theirs : fs_env.cfg->max_header_list_size;
    size_t i, size = 0;
    for (i = 0; i < n; i++) size += nv[i].namelen + nv[i].valuelen + 32;
    if (size > limit) {
      fs_call_fail(c, FS_GRPC_RESOURCE_EXHAUSTED,
                   "flower-sidecar: request headers (%zu bytes) exceed the upstream's limit of %u bytes "
                   "(--max-header-list-size %u)",
                   size, limit, fs_env.cfg->max_header_list_size);
      return;
    }
  }
  no_body = c->fl[FS_DOWN].eof && c->fl[FS_DOWN].data.len == 0 && !c->fl[FS_DOWN].trailers.n;
  sid = nghttp2_submit_request(u->pc.h2.session, NULL, nv, n, no_body ? NULL : &prd, c);
  if (!c->replay_on) fs_hdrs_clear(&c->head[FS_DOWN]); /* else kept to repeat the call */
  if (sid < 0) {
    fs_call_fail(c, FS_GRPC_UNAVAILABLE, "flower-sidecar: upstream %s cannot take the call (%s)", fs_uppool_name(),
                 nghttp2_strerror(sid));
    return;
  }
  c->leg[FS_UP].sid = sid;
  c->t_sent = now;
  c->probe_ms = 0;
  c->stall_done = 0;
  /* No mark: this runs inside |u|'s flush, which sends the request next. */
  if (stall_watched(c)) { /* look at it halfway to its deadline (conn_timer) */
    uint64_t due = fs_policy_stall_probe_at(c->t_sent, c->deadline);
    fs_upconn_timer_within(u, due > now ? due - now : 1);
  }
}

/* Gives the call to |u|: its request is submitted at |u|'s flush, so a
 * client that resets it before then never reaches the upstream. */
static void give(fs_call *c, fs_upconn *u) {
  fs_call_attach(c, FS_UP, &u->pc, 0);
  fs_list_push_back(&u->unsent, &c->qnode);
  fs_h2conn_mark(&u->pc.h2);
}

void fs_upcall_flush(fs_upconn *u) {
  fs_list_node *n;
  while ((n = fs_list_first(&u->unsent))) {
    fs_call *c = fs_list_entry(n, fs_call, qnode);
    fs_list_remove(n);
    submit(c, u);
  }
}

/* Arms the hold timer for |until| unless it fires earlier already. */
static void hold_timer_arm(uint64_t until) {
  uint64_t now = fs_now_ms(), delay = until > now ? until - now : 0;
  int rv;
  if (uv_is_active((uv_handle_t *)&Q.hold_timer) && uv_timer_get_due_in(&Q.hold_timer) <= delay) return;
  if ((rv = uv_timer_start(&Q.hold_timer, on_hold_timer, delay, 0)) < 0)
    fs_uppool_report("cannot arm the hold timer", uv_strerror(rv));
}

static void route(fs_call *c) {
  int should_connect = 0;
  fs_upconn *u = fs_uppool_pick(&should_connect);
  if (u) {
    give(c, u);
    return;
  }
  fs_list_push_back(&Q.queue, &c->qnode);
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
  if (should_connect && (!c->hold_until || !fs_uppool_backing_off())) {
    fs_uppool_stop_backoff();
    fs_uppool_connect_now();
  }
}

void fs_uppool_route(fs_call *c) {
  const fs_config *cfg = fs_env.cfg;
  /* The deadline matters to holding and to the stall probe (which works
   * with --hold-timeout 0 too). */
  if (cfg->hold_timeout_s > 0 || fs_uppool_options_get()->stall_probe) {
    nghttp2_vec to = fs_hdrs_get(&c->head[FS_DOWN], "grpc-timeout");
    uint64_t ms = 0;
    int has_deadline = to.len && fs_grpc_timeout_ms(to.base, to.len, &ms) == 0;
    if (cfg->hold_timeout_s > 0)
      c->hold_until = c->t_start + fs_policy_hold_ms((uint64_t)(cfg->hold_timeout_s * 1000), has_deadline, ms);
    if (has_deadline) c->deadline = c->t_start + (ms ? ms : 1);
  }
  route(c);
}

void fs_upcall_dispatch(void) {
  fs_list_node *n;
  while ((n = fs_list_first(&Q.queue))) {
    int should_connect;
    fs_upconn *u = fs_uppool_pick(&should_connect);
    fs_call *c = fs_list_entry(n, fs_call, qnode);
    if (!u) {
      if (should_connect) fs_uppool_connect_now();
      return;
    }
    fs_list_remove(&c->qnode);
    give(c, u);
  }
}

/* Ends the waiting calls that may not wait longer: every one when |all|,
 * else those without a hold or whose hold is over.  The others keep
 * waiting (the hold timer is re-armed for them). */
void fs_upcall_fail_waiting(const char *why, int all) {
  uint64_t now = fs_now_ms(), next = 0;
  char when[64];
  fs_list_node *n, *tmp;
  fs_uppool_next_attempt(when, sizeof(when));
  fs_list_for_each_safe(n, tmp, &Q.queue) {
    fs_call *c = fs_list_entry(n, fs_call, qnode);
    if (!all && c->hold_until > now) {
      if (!next || c->hold_until < next) next = c->hold_until;
      continue;
    }
    fs_list_remove(&c->qnode);
    fs_env.stats.calls_failed_down++;
    if (c->hold_until)
      fs_call_fail(c, FS_GRPC_UNAVAILABLE, "flower-sidecar: upstream %s unreachable (%s); waited %.1f s, %s",
                   fs_uppool_name(), why, (double)(now - c->t_start) / 1000.0, when);
    else
      fs_call_fail(c, FS_GRPC_UNAVAILABLE, "flower-sidecar: upstream %s unreachable (%s); %s", fs_uppool_name(), why,
                   when);
    fs_call_maybe_free(c);
  }
  if (next) hold_timer_arm(next);
}

static void on_hold_timer(uv_timer_t *t) {
  (void)t;
  fs_upcall_fail_waiting(fs_uppool_up() ? "no upstream connection could take the call in time" : fs_uppool_error(), 0);
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
                 fs_uppool_name(), reason, (double)(now - c->t_start) / 1000.0);
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

static int send_data(nghttp2_session *s, nghttp2_frame *frame, const uint8_t *framehd, size_t length,
                     nghttp2_data_source *src, void *ud) {
  (void)s;
  return fs_call_send_data(src->ptr, FS_UP, ud, frame, framehd, length);
}

/* Watched calls that stall probe their connection with a PING and end
 * UNAVAILABLE (which the SuperNode retries, unlike DEADLINE_EXCEEDED) when
 * it does not answer in time; keepalive then judges the connection
 * (policy.h, fs_policy_stall).  Returns the delay before the next look, at
 * most |next| (0: none). */
uint64_t fs_upcall_check_stalled(fs_upconn *u, uint64_t next) {
  uint64_t now = fs_now_ms(), at = 0, ka_next;
  fs_list_node *n, *tmp;
  fs_list_for_each_safe(n, tmp, &u->pc.calls) {
    fs_call *c = fs_list_entry(n, fs_call, leg[FS_UP].node);
    fs_stall_verdict v;
    if (!stall_watched(c) || c->finished || c->stall_done || c->leg[FS_UP].sid == 0) continue;
    v = fs_policy_stall(now, c->t_sent, c->deadline, c->probe_ms, u->ping_ack_ms, &at);
    if (v == FS_STALL_PROBE) {
      c->probe_ms = now;
      if (!u->ping_t0 && fs_keepalive_probe(&u->ka, now, u->pc.h2.last_rx_ms, &ka_next)) fs_upconn_ping(u);
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
                   fs_uppool_name(), (double)(now - c->probe_ms) / 1000.0);
      break;
    case FS_STALL_PROBE:
      break;
    }
  }
  return next;
}
/* The HEADERS/DATA part of the upstream sessions' on_frame_recv. */
void fs_upcall_frame_recv(nghttp2_session *s, const nghttp2_frame *frame) {
  fs_call *c = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
  if (!c) return;
  if (frame->hd.type == NGHTTP2_HEADERS) {
    if (frame->headers.cat == NGHTTP2_HCAT_RESPONSE) {
      on_response_headers(c, frame);
      return;
    }
    if (frame->headers.cat == NGHTTP2_HCAT_HEADERS && fs_call_recv_trailers(c, FS_UP) < 0) return;
  }
  if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) fs_call_recv_end(c, FS_UP);
}

void fs_upcall_conn_lost(fs_upconn *u, const char *reason) {
  fs_list_node *n;
  while ((n = fs_list_first(&u->pc.calls))) {
    fs_call *c = fs_list_entry(n, fs_call, leg[FS_UP].node);
    if (c->leg[FS_UP].sid == 0) { /* given to it but never sent: another connection takes it */
      fs_list_remove(&c->qnode);
      fs_call_detach_keep(c, FS_UP);
      route(c);
      continue;
    }
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
      fs_call_fail(c, FS_GRPC_UNAVAILABLE, "flower-sidecar: upstream %s connection lost (%s)", fs_uppool_name(),
                   reason);
    }
    fs_call_maybe_free(c);
  }
}

int fs_upcall_waiting(void) { return !fs_list_empty(&Q.queue); }

void fs_upcall_set_callbacks(nghttp2_session_callbacks *cbs) {
  nghttp2_session_callbacks_set_on_header_callback2(cbs, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
  nghttp2_session_callbacks_set_send_data_callback(cbs, send_data);
}

int fs_upcall_start(void) {
  fs_list_init(&Q.queue);
  return uv_timer_init(fs_env.loop, &Q.hold_timer);
}

void fs_upcall_stop(void) {
  fs_upcall_fail_waiting("shutting down", 1);
  uv_close((uv_handle_t *)&Q.hold_timer, NULL);
}
