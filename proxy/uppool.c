/* uppool: the connections of the upstream side (see uppool.h, upconn.h);
 * the calls on them live in upcall.c. */
#include "upconn.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backoff.h"
#include "fleet.h"
#include "h2mem.h"
#include "keepalive.h"
#include "log.h"
#include "policy.h"

/* --upstream-conns is at most this (config.c). */
#define MAX_CONNS 64

static struct {
  fs_uppool_options o;
  fs_list_node conns; /* fs_upconn.node, newest first */
  uint32_t nconns, nconnecting;
  uint8_t up, resolving, stopped;
  uint8_t down_planned; /* the last loss was announced (GOAWAY NO_ERROR) */
  uint8_t targeted;     /* an upstream address is known (node: OneGate may give it later) */
  uint8_t unreachable;  /* the last attempt did not reach the upstream: probing (policy.h) */
  uint8_t resolved;     /* U.addr holds an address to probe */
  uv_timer_t probe_timer;
  uint64_t rng; /* xorshift64, for probe jitter */
  uint64_t down_since_ms;
  unsigned failed_in_a_row; /* attempts and probes since the last SETTINGS */
  char host[256];
  int port;
  char name[300]; /* "host:port" or "[v6]:port", for events and messages */
  struct sockaddr_storage addr;
  int addr_ok;
  uv_getaddrinfo_t gai;
  fs_backoff backoff;
  uv_timer_t reconnect_timer;
  uint64_t ka_time_ms; /* doubled after GOAWAY too_many_pings */
  char error[400];
  nghttp2_session_callbacks *cbs;
  nghttp2_option *opt;
} U;

static void schedule_reconnect(void);
static void stop_probing(void);
static void conn_timer(fs_h2conn *h);

static fs_upconn *upconn_of(void *p) { return (fs_upconn *)p; }

/* Something that cannot fail in practice did (a timer, a socket option):
 * say so, the data path goes on. */
void fs_uppool_report(const char *what, const char *why) {
  fs_event ev;
  if (!fs_ev_begin(&ev, FS_LOG_ERROR, "sidecar.error")) return;
  fs_ev_str(&ev, "reason", what);
  fs_ev_str(&ev, "error", why);
  fs_ev_end(&ev);
}

int fs_uppool_up(void) { return U.up; }
int fs_uppool_down_planned(void) { return !U.up && U.down_planned; }
const char *fs_uppool_name(void) { return U.name; }
const fs_uppool_options *fs_uppool_options_get(void) { return &U.o; }
int fs_uppool_backing_off(void) { return uv_is_active((uv_handle_t *)&U.reconnect_timer) || fs_uppool_probing(); }
void fs_uppool_stop_backoff(void) { uv_timer_stop(&U.reconnect_timer); }
const char *fs_uppool_error(void) { return U.error; }

/* |planned|: the upstream said it is going away (GOAWAY NO_ERROR) or we
 * drain; logged at info, as operators alert on warn. */
static void set_up(int up, const char *reason, int planned) {
  fs_event ev;
  if (U.up == up) return;
  U.up = (uint8_t)up;
  U.down_planned = (uint8_t)(!up && planned);
  if (!up) U.down_since_ms = fs_now_ms();
  else if (U.down_since_ms) {
    fs_env.stats.outages++;
    fs_env.stats.outage_ms += fs_now_ms() - U.down_since_ms;
    U.down_since_ms = 0;
  }
  if (!up && fs_ev_begin(&ev, planned || fs_env.draining ? FS_LOG_INFO : FS_LOG_WARN, "upstream.down")) {
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
    fs_upconn *u = fs_list_entry(n, fs_upconn, node);
    if (u->ready && !u->goaway && !u->pc.h2.closing) return 1;
  }
  return 0;
}

/* A connection that can take a new stream now, or NULL (policy.h). */
fs_upconn *fs_uppool_pick(int *should_connect) {
  fs_upconn_view v[MAX_CONNS];
  fs_upconn *by_index[MAX_CONNS];
  size_t n = 0;
  int i;
  fs_list_node *node;
  fs_list_for_each(node, &U.conns) {
    fs_upconn *u = fs_list_entry(node, fs_upconn, node);
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
void fs_uppool_next_attempt(char *out, size_t len) {
  if (U.nconnecting > 0 || U.resolving) snprintf(out, len, "a connection attempt is in progress");
  else if (uv_is_active((uv_handle_t *)&U.reconnect_timer))
    snprintf(out, len, "next attempt in %.1f s", (double)uv_timer_get_due_in(&U.reconnect_timer) / 1000.0);
  else if (fs_uppool_probing()) snprintf(out, len, "link down, probing every %g s", fs_env.cfg->probe_interval_s);
  else if (fs_env.draining || U.stopped) snprintf(out, len, "no further attempt (shutting down)");
  else snprintf(out, len, "reconnecting");
}

void fs_upconn_timer_within(fs_upconn *u, uint64_t in) {
  if (!uv_is_active((uv_handle_t *)&u->pc.h2.timer) || uv_timer_get_due_in(&u->pc.h2.timer) > in)
    fs_h2conn_set_timer(&u->pc.h2, in);
}

/* --- nghttp2 callbacks of upstream sessions -------------------------------------- */

static void on_settings(fs_upconn *u) {
  fs_event ev;
  u->ready = 1;
  u->was_ready = 1;
  U.unreachable = 0;
  U.failed_in_a_row = 0;
  stop_probing();
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
    set_up(1, NULL, 0);
  }
  fs_upcall_dispatch();
}

static void on_ping_ack(fs_upconn *u) {
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

static void on_goaway(fs_upconn *u, const nghttp2_frame *frame) {
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
  if (U.up && !any_ready()) set_up(0, u->pc.h2.close_reason, frame->goaway.error_code == NGHTTP2_NO_ERROR);
  if (!fs_uppool_pick(&should_connect) && should_connect) fs_uppool_connect_now();
  if (fs_upcall_waiting()) fs_upcall_dispatch();
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *ud) {
  fs_upconn *u = upconn_of(ud);
  switch (frame->hd.type) {
  case NGHTTP2_SETTINGS:
    if (!(frame->hd.flags & NGHTTP2_FLAG_ACK) && !u->ready) on_settings(u);
    break;
  case NGHTTP2_PING:
    if ((frame->hd.flags & NGHTTP2_FLAG_ACK) && u->ping_t0) on_ping_ack(u);
    break;
  case NGHTTP2_GOAWAY:
    on_goaway(u, frame);
    break;
  case NGHTTP2_HEADERS:
  case NGHTTP2_DATA:
    fs_upcall_frame_recv(s, frame);
    break;
  }
  return 0;
}

static int on_frame_send(nghttp2_session *s, const nghttp2_frame *frame, void *ud) {
  (void)s;
  if (frame->hd.type == NGHTTP2_GOAWAY) fs_pconn_note_sent_goaway(ud, frame);
  return 0;
}

/* --- connections ------------------------------------------------------------------- */

static int conn_ready(fs_h2conn *h) {
  nghttp2_settings_entry iv[] = {
      {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
      /* A response may fill a whole stream window only once its client
       * takes bytes (call.c, fs_call_send_data): a client that reads
       * nothing holds at most one buffer block per call. */
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, FS_CALL_FIRST_WINDOW},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, fs_env.cfg->max_header_list_size},
  };
  if (fs_h2conn_session_new(h, 0, U.cbs, U.opt) != 0 ||
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
  fs_upconn *u = upconn_of(h);
  if (!u->ready) U.nconnecting--;
  u->ready = 0;
  snprintf(U.error, sizeof(U.error), "%s", reason);
  fs_upcall_conn_lost(u, reason);
}

static void conn_freed(fs_h2conn *h) {
  fs_upconn *u = upconn_of(h);
  if (!u->was_ready) U.unreachable = u->unreached, U.failed_in_a_row++; /* how it failed decides what follows */
  else U.unreachable = 0; /* a lost connection: one immediate attempt first */
  fs_list_remove(&u->node);
  U.nconns--;
  free(u);
  if (U.up && !any_ready()) set_up(0, U.error, 0);
  schedule_reconnect(); /* first: failed calls say when the next attempt is */
  if (U.nconnecting == 0 && !any_ready()) fs_upcall_fail_waiting(U.error, 0);
  else fs_upcall_dispatch();
  if (U.o.on_maybe_idle) U.o.on_maybe_idle();
}

void fs_upconn_ping(fs_upconn *u) {
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

static void conn_timer(fs_h2conn *h) {
  fs_upconn *u = upconn_of(h);
  char why[96];
  uint64_t next = 0;
  if (!u->ready && !u->tcp_ok) {
    u->unreached = fs_policy_attempt_class(0, 0) == FS_ATTEMPT_UNREACHED;
    snprintf(why, sizeof(why), "TCP connect timed out after %gs",
             fs_env.cfg->probe_timeout_s < fs_env.cfg->connect_timeout_s ? fs_env.cfg->probe_timeout_s
                                                                         : fs_env.cfg->connect_timeout_s);
    fs_h2conn_close(h, why);
    return;
  }
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
      fs_upconn_ping(u);
      break;
    case FS_KA_WAIT:
      break;
    }
  }
  if (U.o.stall_probe) next = fs_upcall_check_stalled(u, next);
  fs_h2conn_set_timer(h, next);
}

static void conn_flush(fs_h2conn *h) { fs_upcall_flush(upconn_of(h)); }

static const fs_h2conn_ops conn_ops = {.on_ready = conn_ready,
                                       .on_closing = conn_closing,
                                       .on_freed = conn_freed,
                                       .on_timer = conn_timer,
                                       .on_flush = conn_flush};

static void on_connected(uv_connect_t *req, int status) {
  fs_upconn *u = req->data;
  const char *name = fs_env.cfg->tls_server_name ? fs_env.cfg->tls_server_name : U.host;
  if (u->pc.h2.closing) return;
  if (status < 0) {
    u->unreached = fs_policy_attempt_class(0, status) == FS_ATTEMPT_UNREACHED;
    fs_h2conn_close(&u->pc.h2, uv_strerror(status));
    return;
  }
  u->tcp_ok = 1;
  fs_h2conn_set_timer(&u->pc.h2, (uint64_t)(fs_env.cfg->connect_timeout_s * 1000)); /* TLS and SETTINGS */
  if (U.o.keepalive) {
    /* Unacknowledged bytes for longer than the keepalive timeout: the
     * kernel gives up too (a stalled write would otherwise hide it). */
    uv_os_fd_t fd;
    unsigned int ms = (unsigned int)(fs_env.cfg->keepalive_timeout_s * 1000);
    if (uv_fileno((uv_handle_t *)&u->pc.h2.tcp, &fd) != 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof(ms)) != 0)
      fs_uppool_report("cannot set TCP_USER_TIMEOUT (keepalive PINGs still watch the connection)", strerror(errno));
  }
  fs_h2conn_start(&u->pc.h2, U.o.tls, 0, name, name);
}

static void connect_to(const struct sockaddr *sa) {
  fs_upconn *u = calloc(1, sizeof(*u));
  int rv;
  if (!u) return;
  if (fs_h2conn_init(&u->pc.h2, fs_env.loop, &conn_ops) < 0) {
    free(u);
    return;
  }
  fs_pconn_init(&u->pc, FS_UP);
  fs_list_init(&u->unsent);
  fs_list_push_front(&U.conns, &u->node);
  U.nconns++;
  U.nconnecting++;
  fs_env.stats.upstream_connects++;
  snprintf(u->pc.h2.peer, sizeof(u->pc.h2.peer), "%s", U.name);
  /* The TCP phase first: an unanswered SYN is known after --probe-timeout,
   * not after the whole --connect-timeout of SYN retransmissions. */
  fs_h2conn_set_timer(&u->pc.h2, (uint64_t)((fs_env.cfg->probe_timeout_s < fs_env.cfg->connect_timeout_s
                                                 ? fs_env.cfg->probe_timeout_s
                                                 : fs_env.cfg->connect_timeout_s) *
                                            1000));
  u->creq.data = u;
  if ((rv = uv_tcp_connect(&u->creq, &u->pc.h2.tcp, sa, on_connected)) < 0) fs_h2conn_close(&u->pc.h2, uv_strerror(rv));
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  (void)req;
  U.resolving = 0;
  if (status < 0 || !res) {
    snprintf(U.error, sizeof(U.error), "cannot resolve %s: %s", U.host, uv_strerror(status));
    if (U.up) set_up(0, U.error, 0);
    schedule_reconnect();
    if (!U.nconnecting) fs_upcall_fail_waiting(U.error, 0);
    if (U.o.on_maybe_idle) U.o.on_maybe_idle();
  } else if (!fs_env.draining) {
    memcpy(&U.addr, res->ai_addr, res->ai_addrlen);
    U.resolved = 1;
    connect_to(res->ai_addr);
  }
  uv_freeaddrinfo(res);
}

void fs_uppool_connect_now(void) {
  if (fs_env.draining || U.resolving || !U.targeted) return;
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
  if (U.nconns == 0) fs_uppool_connect_now();
}

/* --- probing an unreachable upstream (policy.h, "reaching the upstream again") ------- */

/* A probe starts every --probe-interval (+-20 %) whatever the ones before
 * became: with --probe-timeout at most the interval, one SYN per interval,
 * and a return is seen within one interval, not one timeout + interval. */
#define MAX_PROBES 4

typedef struct probe {
  uv_tcp_t tcp;
  uv_connect_t req;
  uv_timer_t timer;
  int open; /* handles not closed yet */
} probe;

static probe *probes[MAX_PROBES];

static uint64_t next_rand(void) {
  U.rng ^= U.rng << 13, U.rng ^= U.rng >> 7, U.rng ^= U.rng << 17;
  return U.rng;
}

static void probe_freed(uv_handle_t *h) {
  probe *p = h->data;
  if (--p->open == 0) free(p);
}

/* Takes |p| out of the probes in flight and closes it.  Returns 0, or -1
 * when it was no longer in flight (its other callback came first). */
static int probe_close(probe *p) {
  int i;
  for (i = 0; i < MAX_PROBES && probes[i] != p; i++) {}
  if (i == MAX_PROBES) return -1;
  probes[i] = NULL;
  uv_close((uv_handle_t *)&p->timer, probe_freed);
  uv_close((uv_handle_t *)&p->tcp, probe_freed); /* a pending connect ends UV_ECANCELED first */
  return 0;
}

static void stop_probing(void) {
  int i;
  uv_timer_stop(&U.probe_timer);
  for (i = 0; i < MAX_PROBES; i++)
    if (probes[i]) (void)probe_close(probes[i]);
}

static void probe_done(probe *p, int status) {
  fs_event ev;
  if (probe_close(p) < 0) return;
  if (fs_ev_begin(&ev, FS_LOG_DEBUG, "upstream.probe")) {
    fs_ev_str(&ev, "upstream", U.name);
    fs_ev_str(&ev, "result", status == 0 ? "connected" : uv_strerror(status));
    fs_ev_end(&ev);
  }
  if (status != 0) U.failed_in_a_row++;
  if (status != 0 || fs_env.draining || U.stopped) return; /* the next probe is due anyway */
  stop_probing();
  if (fs_ev_begin(&ev, FS_LOG_INFO, "upstream.reachable")) {
    fs_ev_str(&ev, "upstream", U.name);
    if (U.down_since_ms) fs_ev_u64(&ev, "outage_ms", fs_now_ms() - U.down_since_ms);
    fs_ev_end(&ev);
  }
  /* The real attempt at once: the probes' own jitter spreads a crowd. */
  U.unreachable = 0;
  fs_uppool_connect_now();
}

static void on_probe_connected(uv_connect_t *req, int status) { probe_done(req->data, status); }

static void on_probe_timeout(uv_timer_t *t) { probe_done(t->data, UV_ETIMEDOUT); }

static void start_probe(void) {
  probe *p;
  int rv, i;
  for (i = 0; i < MAX_PROBES && probes[i]; i++) {}
  if (i == MAX_PROBES || fs_env.draining || U.stopped || U.nconns > 0 || U.resolving) return;
  if (!(p = calloc(1, sizeof(*p)))) return;
  (void)uv_timer_init(fs_env.loop, &p->timer); /* cannot fail on a live loop */
  p->timer.data = p->tcp.data = p->req.data = p;
  p->open = 1;
  if ((rv = uv_tcp_init(fs_env.loop, &p->tcp)) < 0) {
    uv_close((uv_handle_t *)&p->timer, probe_freed);
    fs_uppool_report("cannot open a probe socket", uv_strerror(rv));
    return;
  }
  p->open = 2;
  probes[i] = p;
  fs_env.stats.probes++;
  if ((rv = uv_tcp_connect(&p->req, &p->tcp, (const struct sockaddr *)&U.addr, on_probe_connected)) < 0 ||
      (rv = uv_timer_start(&p->timer, on_probe_timeout, (uint64_t)(fs_env.cfg->probe_timeout_s * 1000), 0)) < 0)
    probe_done(p, rv);
}

static void schedule_probe(void);

static void on_probe_timer(uv_timer_t *t) {
  (void)t;
  if (!U.resolved) { /* nothing to probe: a real attempt resolves the name */
    U.unreachable = 0;
    fs_uppool_connect_now();
    return;
  }
  start_probe();
  schedule_probe();
}

static void schedule_probe(void) {
  int rv;
  if (fs_env.draining || U.stopped || uv_is_active((uv_handle_t *)&U.probe_timer)) return;
  rv = uv_timer_start(&U.probe_timer, on_probe_timer,
                      fs_policy_probe_delay((uint64_t)(fs_env.cfg->probe_interval_s * 1000), next_rand()), 0);
  if (rv < 0) fs_uppool_report("cannot arm the probe timer", uv_strerror(rv));
}

int fs_uppool_probing(void) { return U.unreachable && uv_is_active((uv_handle_t *)&U.probe_timer); }

static void schedule_reconnect(void) {
  uint64_t delay;
  fs_event ev;
  int rv;
  if (fs_env.draining || !U.targeted || U.nconns > 0 || U.resolving || uv_is_active((uv_handle_t *)&U.reconnect_timer))
    return;
  if (U.unreachable) { /* nothing reached the upstream: probe, the backoff is for attempts that did */
    schedule_probe();
    return;
  }
  delay = fs_backoff_next(&U.backoff);
  if (delay > 0 && fs_ev_begin(&ev, FS_LOG_INFO, "upstream.backoff")) {
    fs_ev_str(&ev, "upstream", U.name);
    fs_ev_u64(&ev, "attempt", U.backoff.attempt);
    fs_ev_u64(&ev, "delay_ms", delay);
    fs_ev_str(&ev, "reason", U.error);
    fs_ev_end(&ev);
  }
  if ((rv = uv_timer_start(&U.reconnect_timer, on_reconnect_timer, delay, 0)) < 0)
    fs_uppool_report("cannot arm the reconnect timer", uv_strerror(rv));
}

/* --- the pool's life --------------------------------------------------------------- */

/* Points the pool at |hostport|.  Returns 0, or -1 (nothing changed) when
 * it is not HOST:PORT ("" before OneGate discovery). */
static int set_target(const char *hostport) {
  char host[sizeof(U.host)];
  int port;
  if (!hostport[0] || fs_hostport_split(hostport, host, sizeof(host), &port) < 0) return -1;
  memcpy(U.host, host, sizeof(host));
  U.port = port;
  snprintf(U.name, sizeof(U.name), strchr(U.host, ':') ? "[%s]:%d" : "%s:%d", U.host, U.port);
  U.addr_ok = uv_ip4_addr(U.host, U.port, (struct sockaddr_in *)&U.addr) == 0 ||
              uv_ip6_addr(U.host, U.port, (struct sockaddr_in6 *)&U.addr) == 0;
  U.resolved = U.addr_ok;
  U.unreachable = 0;
  U.targeted = 1;
  return 0;
}

int fs_uppool_retarget(const char *hostport, SSL_CTX *tls, char *err, size_t errlen) {
  fs_list_node *n, *tmp;
  if (set_target(hostport) < 0) {
    SSL_CTX_free(tls);
    snprintf(err, errlen, "invalid upstream '%.200s' (expected HOST:PORT)", hostport);
    return -1;
  }
  SSL_CTX_free(U.o.tls);
  U.o.tls = tls;
  stop_probing();
  U.failed_in_a_row = 0;
  fs_backoff_reset(&U.backoff);
  uv_timer_stop(&U.reconnect_timer);
  snprintf(U.error, sizeof(U.error), "not connected yet");
  fs_list_for_each_safe(n, tmp, &U.conns) {
    fs_upconn *u = fs_list_entry(n, fs_upconn, node);
    fs_h2conn_close(&u->pc.h2, "the upstream moved (OneGate)");
  }
  fs_uppool_connect_now();
  return 0;
}

unsigned fs_uppool_failures(void) { return U.up ? 0 : U.failed_in_a_row; }

int fs_uppool_start(const fs_uppool_options *o, char *err, size_t errlen) {
  const fs_config *cfg = fs_env.cfg;
  int rv;
  memset(&U, 0, sizeof(U));
  U.o = *o;
  fs_list_init(&U.conns);
  if (set_target(cfg->upstream) == 0) snprintf(U.error, sizeof(U.error), "not connected yet");
  else snprintf(U.error, sizeof(U.error), "discovering the SuperLink via OneGate");
  fs_backoff_init(&U.backoff, (uint64_t)(cfg->backoff_initial_s * 1000), (uint64_t)(cfg->backoff_max_s * 1000),
                  (uint64_t)uv_hrtime() ^ (uint64_t)getpid());
  U.ka_time_ms = (uint64_t)(cfg->keepalive_time_s * 1000);
  if (nghttp2_session_callbacks_new(&U.cbs) != 0 || nghttp2_option_new(&U.opt) != 0) {
    nghttp2_session_callbacks_del(U.cbs);
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  fs_h2conn_set_callbacks(U.cbs);
  nghttp2_session_callbacks_set_on_frame_recv_callback(U.cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_frame_send_callback(U.cbs, on_frame_send);
  fs_upcall_set_callbacks(U.cbs);
  nghttp2_option_set_no_auto_window_update(U.opt, 1);
  /* Timers on a live loop cannot fail to initialise (libuv). */
  (void)uv_timer_init(fs_env.loop, &U.reconnect_timer);
  (void)uv_timer_init(fs_env.loop, &U.probe_timer);
  U.rng = (uv_hrtime() ^ ((uint64_t)getpid() << 32)) | 1;
  if ((rv = fs_upcall_start()) < 0) {
    snprintf(err, errlen, "cannot start the hold timer: %s", uv_strerror(rv));
    return -1;
  }
  fs_uppool_connect_now();
  return 0;
}

void fs_uppool_drain(void) {
  uv_timer_stop(&U.reconnect_timer);
  stop_probing();
}

void fs_uppool_close_all(void) {
  fs_list_node *n, *tmp;
  fs_list_for_each_safe(n, tmp, &U.conns) {
    fs_upconn *u = fs_list_entry(n, fs_upconn, node);
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

void fs_uppool_set_tls(SSL_CTX *tls) {
  SSL_CTX *old = U.o.tls;
  if (!old || U.stopped) {
    SSL_CTX_free(tls);
    return;
  }
  U.o.tls = tls;
  SSL_CTX_free(old); /* connections hold their own reference (SSL_new) */
}

int fs_uppool_peer_not_after(int64_t *not_after) {
  fs_list_node *n;
  fs_upconn *best = NULL;
  /* Newest first in the list: the last ready one is the oldest. */
  fs_list_for_each(n, &U.conns) {
    fs_upconn *u = fs_list_entry(n, fs_upconn, node);
    if (u->ready && u->pc.h2.ssl && !u->pc.h2.closing) best = u;
  }
  if (best) {
    X509 *x = SSL_get0_peer_certificate(best->pc.h2.ssl);
    struct tm tm;
    if (x && ASN1_TIME_to_tm(X509_get0_notAfter(x), &tm)) {
      *not_after = (int64_t)timegm(&tm);
      return 0;
    }
  }
  return -1;
}

void fs_uppool_stop(void) {
  U.stopped = 1;
  fs_upcall_stop();
  uv_close((uv_handle_t *)&U.reconnect_timer, NULL);
  stop_probing();
  uv_close((uv_handle_t *)&U.probe_timer, NULL);
  nghttp2_session_callbacks_del(U.cbs);
  nghttp2_option_del(U.opt);
  SSL_CTX_free(U.o.tls);
  U.o.tls = NULL;
}
