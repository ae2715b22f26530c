/* h2conn: see h2conn.h. */
#include "h2conn.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <string.h>

#include "h2mem.h"

#include "tls.h"

static uv_loop_t *g_loop;
static uv_prepare_t g_flush;
/* Ends each loop pass: connections that used their read slice read again. */
static uv_check_t g_resume;
static fs_list_node g_paused = {&g_paused, &g_paused};
static uint64_t g_pass; /* loop passes so far (counted in g_resume) */
/* Connections marked for a flush before the loop next polls (fs_h2conn.dnode). */
static fs_list_node g_dirty = {&g_dirty, &g_dirty};
/* Reads are processed synchronously, so one buffer serves every socket. */
static uint8_t g_rbuf[64 * 1024];
/* TLS plaintext staging: only the connection being flushed writes to it, and
 * it is empty again when that flush ends, so one buffer serves all. */
static uint8_t g_stage[FS_TLS_RECORD];
static size_t g_stage_len;
static fs_h2conn *g_stage_owner;
static BIO_METHOD *g_bio_method;

uint64_t fs_now_ms(void) { return g_loop ? uv_now(g_loop) : 0; }

/* --- the memory BIO: ciphertext in from rx, out to outq ----------------- */

static int bio_write(BIO *b, const char *data, int len) {
  fs_h2conn *c = BIO_get_data(b);
  BIO_clear_retry_flags(b);
  if (fs_bufq_append(&c->outq, data, (size_t)len) < 0) return -1;
  return len;
}

static int bio_read(BIO *b, char *out, int len) {
  fs_h2conn *c = BIO_get_data(b);
  size_t n = c->rx_len < (size_t)len ? c->rx_len : (size_t)len;
  BIO_clear_retry_flags(b);
  if (n == 0) {
    BIO_set_retry_read(b);
    return -1;
  }
  memcpy(out, c->rx, n);
  c->rx += n;
  c->rx_len -= n;
  return (int)n;
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr) {
  (void)b, (void)num, (void)ptr;
  return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

static int bio_create(BIO *b) {
  BIO_set_init(b, 1);
  return 1;
}

/* --- flushing ------------------------------------------------------------ */

static void dirty_remove(fs_h2conn *c) { fs_list_remove(&c->dnode); }

void fs_h2conn_mark(fs_h2conn *c) {
  if (fs_list_linked(&c->dnode) || c->closing) return;
  fs_list_push_front(&g_dirty, &c->dnode);
}

void fs_h2conn_close_soon(fs_h2conn *c, const char *reason) {
  if (c->closing || c->close_pending) return;
  if (reason != c->close_reason) snprintf(c->close_reason, sizeof(c->close_reason), "%s", reason);
  c->close_pending = 1;
  fs_h2conn_mark(c);
}

static void stage_flush(fs_h2conn *c) {
  if (g_stage_owner != c || g_stage_len == 0) return;
  if (SSL_write(c->ssl, g_stage, (int)g_stage_len) <= 0) {
    /* Only a broken TLS state gets here: the BIO takes everything. */
    g_stage_len = 0;
    g_stage_owner = NULL;
    fs_h2conn_close(c, "TLS write failed");
    return;
  }
  g_stage_len = 0;
  g_stage_owner = NULL;
}

void fs_h2conn_write(fs_h2conn *c, const void *data, size_t len) {
  const uint8_t *p = data;
  if (!c->ssl) {
    if (fs_bufq_append(&c->outq, p, len) < 0) fs_h2conn_close(c, "out of memory");
    return;
  }
  if (g_stage_owner && g_stage_owner != c) stage_flush(g_stage_owner);
  g_stage_owner = c;
  while (len > 0) {
    size_t take = sizeof(g_stage) - g_stage_len;
    if (take > len) take = len;
    memcpy(g_stage + g_stage_len, p, take);
    g_stage_len += take;
    p += take;
    len -= take;
    if (g_stage_len == sizeof(g_stage)) {
      stage_flush(c);
      if (c->closing) return;
      g_stage_owner = c;
    }
  }
}

int fs_h2conn_writable(const fs_h2conn *c) {
  return !c->closing && c->outq.len + (g_stage_owner == c ? g_stage_len : 0) < c->outq_cap;
}

static ssize_t send_cb(nghttp2_session *s, const uint8_t *data, size_t len, int flags, void *ud) {
  fs_h2conn *c = ud;
  (void)s, (void)flags;
  if (!fs_h2conn_writable(c)) return NGHTTP2_ERR_WOULDBLOCK;
  fs_h2conn_write(c, data, len);
  return (ssize_t)len;
}

void fs_h2conn_set_callbacks(nghttp2_session_callbacks *cbs) {
  nghttp2_session_callbacks_set_send_callback(cbs, send_cb);
}

static size_t outq_bufs(fs_h2conn *c, uv_buf_t *bufs, size_t max, size_t *total) {
  size_t n = 0;
  fs_block *b;
  *total = 0;
  for (b = c->outq.head; b && n < max; b = b->next) {
    bufs[n] = uv_buf_init((char *)b->data + b->start, b->end - b->start);
    *total += bufs[n].len;
    n++;
  }
  return n;
}

static void on_write(uv_write_t *req, int status) {
  fs_h2conn *c = req->data;
  fs_bufq_drop(&c->outq, c->inflight);
  c->bytes_out += c->inflight;
  c->inflight = 0;
  if (status < 0) {
    if (status != UV_ECANCELED) fs_h2conn_close(c, uv_strerror(status));
    return;
  }
  fs_h2conn_mark(c);
}

/* At the start: a connection to a non-loopback peer keeps little unsent in
 * the kernel and a shallower queue of its own (pacing.h). */
static void pacing_start(fs_h2conn *c) {
  struct sockaddr_storage peer;
  int plen = sizeof(peer), lowat = FS_PACING_NOTSENT;
  uv_os_fd_t fd;
  if (uv_fileno((uv_handle_t *)&c->tcp, &fd) != 0 ||
      uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&peer, &plen) != 0 ||
      !fs_pacing_wanted((const struct sockaddr *)&peer)) {
    c->pacing_off = 1;
    return;
  }
  /* Best effort: without it the kernel keeps more unsent, as for loopback. */
  (void)setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof(lowat));
  c->outq_cap = FS_PACING_LAN;
}

/* Sizes the queue ahead of the socket to the link (pacing.h), at most every
 * FS_PACING_RECHECK_MS: one getsockopt, and the round trip of a loaded slow
 * link grows with its queue, so it is looked at again while data flows. */
static void pace(fs_h2conn *c) {
  struct tcp_info ti;
  socklen_t len = sizeof(ti);
  uv_os_fd_t fd;
  uint64_t now = uv_now(c->tcp.loop);
  if (c->pacing_off || now - c->paced_ms < FS_PACING_RECHECK_MS) return;
  c->paced_ms = now;
  if (uv_fileno((uv_handle_t *)&c->tcp, &fd) == 0 && getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) == 0)
    c->outq_cap = fs_pacing_cap(ti.tcpi_rtt, ti.tcpi_snd_cwnd, ti.tcpi_snd_mss);
}

static void start_write(fs_h2conn *c) {
  uv_buf_t bufs[32];
  size_t n, total;
  int w;
  if (c->inflight || c->outq.len == 0 || c->closing) return;
  pace(c);
  n = outq_bufs(c, bufs, 32, &total);
  w = uv_try_write((uv_stream_t *)&c->tcp, bufs, (unsigned)n);
  if (w == UV_EAGAIN || w == UV_ENOSYS) w = 0;
  if (w < 0) {
    fs_h2conn_close(c, uv_strerror(w));
    return;
  }
  fs_bufq_drop(&c->outq, (size_t)w);
  c->bytes_out += (uint64_t)w;
  if (c->outq.len == 0) return;
  n = outq_bufs(c, bufs, 32, &total);
  c->wreq.data = c;
  if ((w = uv_write(&c->wreq, (uv_stream_t *)&c->tcp, bufs, (unsigned)n, on_write)) < 0) {
    fs_h2conn_close(c, uv_strerror(w));
    return;
  }
  c->inflight = total;
}

static void flush(fs_h2conn *c) {
  int pass;
  if (c->close_pending) {
    fs_h2conn_close(c, c->close_reason);
    return;
  }
  if (c->ops->on_flush && c->session && c->tls_ready) {
    c->ops->on_flush(c);
    if (c->closing) return;
  }
  /* nghttp2 stops at the output high-water mark; when the socket then takes
   * everything at once, nothing else would wake this connection: go on while
   * there is progress and more to send. */
  for (pass = 0;; pass++) {
    uint64_t sent_before = c->bytes_out;
    if (c->session && c->tls_ready) {
      int rv = nghttp2_session_send(c->session);
      if (rv != 0) {
        fs_h2conn_close(c, nghttp2_strerror(rv));
        return;
      }
    }
    if (c->ssl) stage_flush(c);
    if (c->closing) return;
    start_write(c);
    if (c->closing) return;
    /* With the queue empty here, progress means the socket took bytes this
     * pass; a pass that only drained a full queue (nghttp2 said WOULDBLOCK
     * at once) must be followed by one that lets nghttp2 write, or nothing
     * wakes us. */
    if (c->inflight || c->outq.len || !c->session || !c->tls_ready || !nghttp2_session_want_write(c->session) ||
        c->bytes_out == sent_before)
      break;
    if (pass == 64) { /* let other connections have a turn */
      fs_h2conn_mark(c);
      return;
    }
  }
  if (c->close_after_flush && c->outq.len == 0) {
    fs_h2conn_close(c, c->close_reason[0] ? c->close_reason : "done");
    return;
  }
  /* Both sides are done (GOAWAY exchanged, streams finished): close once
   * every byte has left. */
  if (c->session && c->tls_ready && !nghttp2_session_want_read(c->session) && !nghttp2_session_want_write(c->session) &&
      c->outq.len == 0)
    fs_h2conn_close(c, c->close_reason[0] ? c->close_reason : "session finished");
}

static void on_prepare(uv_prepare_t *h) {
  fs_list_node *n;
  (void)h;
  while ((n = fs_list_first(&g_dirty)) != NULL) {
    fs_h2conn *c = fs_list_entry(n, fs_h2conn, dnode);
    dirty_remove(c);
    flush(c);
  }
}

/* --- read slices ----------------------------------------------------------- */

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* |c| read its slice: no more until this pass ends. */
static void slice_pause(fs_h2conn *c) {
  (void)uv_read_stop((uv_stream_t *)&c->tcp); /* always 0 */
  fs_list_push_back(&g_paused, &c->pnode);
}

/* The end of a pass (after the poll phase): paused connections read again,
 * and their next read is in a new pass. */
static void on_check(uv_check_t *h) {
  fs_list_node *n;
  int rv;
  (void)h;
  g_pass++;
  while ((n = fs_list_first(&g_paused)) != NULL) {
    fs_h2conn *c = fs_list_entry(n, fs_h2conn, pnode);
    fs_list_remove(n);
    if (c->closing) continue;
    if ((rv = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read)) < 0) fs_h2conn_close(c, uv_strerror(rv));
  }
}

int fs_h2conn_global_init(uv_loop_t *loop) {
  int rv;
  g_loop = loop;
  if (!g_bio_method) {
    int idx = BIO_get_new_index();
    if (idx == -1 || !(g_bio_method = BIO_meth_new(idx | BIO_TYPE_SOURCE_SINK, "fs_h2conn")) ||
        BIO_meth_set_write(g_bio_method, bio_write) != 1 || BIO_meth_set_read(g_bio_method, bio_read) != 1 ||
        BIO_meth_set_ctrl(g_bio_method, bio_ctrl) != 1 || BIO_meth_set_create(g_bio_method, bio_create) != 1) {
      BIO_meth_free(g_bio_method);
      g_bio_method = NULL;
      ERR_clear_error();
      return UV_ENOMEM;
    }
  }
  if ((rv = uv_prepare_init(loop, &g_flush)) < 0) return rv;
  if ((rv = uv_prepare_start(&g_flush, on_prepare)) < 0) {
    uv_close((uv_handle_t *)&g_flush, NULL); /* static: nothing to free */
    return rv;
  }
  if ((rv = uv_check_init(loop, &g_resume)) == 0 && (rv = uv_check_start(&g_resume, on_check)) < 0)
    uv_close((uv_handle_t *)&g_resume, NULL);
  if (rv < 0) {
    (void)uv_prepare_stop(&g_flush); /* always 0 */
    uv_close((uv_handle_t *)&g_flush, NULL);
    return rv;
  }
  return 0;
}

void fs_h2conn_global_close(void) {
  (void)uv_prepare_stop(&g_flush); /* always 0 */
  uv_close((uv_handle_t *)&g_flush, NULL);
  (void)uv_check_stop(&g_resume); /* always 0 */
  uv_close((uv_handle_t *)&g_resume, NULL);
  BIO_meth_free(g_bio_method);
  g_bio_method = NULL;
}

/* --- reading --------------------------------------------------------------- */

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  (void)h, (void)hint;
  *buf = uv_buf_init((char *)g_rbuf, sizeof(g_rbuf));
}

static void feed_h2(fs_h2conn *c, const uint8_t *p, size_t n) {
  ssize_t rv = nghttp2_session_mem_recv(c->session, p, n);
  if (rv == NGHTTP2_ERR_CALLBACK_FAILURE && c->close_reason[0]) {
    /* The owner ended the session on purpose (and said why): the GOAWAY it
     * queued goes out, best effort, before the close. */
    (void)nghttp2_session_send(c->session);
    fs_h2conn_close(c, c->close_reason);
    return;
  }
  /* No callback returns NGHTTP2_ERR_PAUSE, so nghttp2 takes all of it or
   * fails; bytes left behind would be lost. */
  if (rv >= 0 && (size_t)rv != n) {
    fs_h2conn_close(c, "HTTP/2 input not consumed");
    return;
  }
  if (rv < 0) {
    char why[160];
    snprintf(why, sizeof(why), "%s",
             rv == NGHTTP2_ERR_BAD_CLIENT_MAGIC ? "not HTTP/2: bad connection preface" : nghttp2_strerror((int)rv));
    fs_h2conn_close(c, why);
  }
}

static int become_ready(fs_h2conn *c) {
  c->tls_ready = 1;
  if (c->ops->on_ready(c) < 0) {
    fs_h2conn_close(c, c->close_reason[0] ? c->close_reason : "setup failed");
    return -1;
  }
  return 0;
}

/* Reports a failed handshake once, then closes. */
static void tls_fail(fs_h2conn *c, const char *why) {
  if (!c->tls_fail_reported && c->ops->on_tls_fail) c->ops->on_tls_fail(c, why);
  c->tls_fail_reported = 1;
  fs_h2conn_close(c, why);
}

/* Advances the handshake and decrypts whatever arrived. */
static void tls_input(fs_h2conn *c) {
  uint8_t plain[FS_TLS_RECORD];
  if (!c->tls_ready) {
    int r = SSL_do_handshake(c->ssl), e;
    if (r != 1) {
      e = SSL_get_error(c->ssl, r);
      if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        fs_h2conn_mark(c);
        return;
      }
      {
        char why[200];
        long vr = SSL_get_verify_result(c->ssl);
        if (fs_tls_alpn_refused(c->ssl)) snprintf(why, sizeof(why), "client did not offer ALPN h2");
        else if (vr != X509_V_OK)
          snprintf(why, sizeof(why), "certificate verify failed: %s", X509_verify_cert_error_string(vr));
        else if (e == SSL_ERROR_SYSCALL || (e == SSL_ERROR_SSL && ERR_peek_last_error() == 0))
          snprintf(why, sizeof(why), "peer closed");
        else snprintf(why, sizeof(why), "%s", fs_tls_error_string("TLS error"));
        ERR_clear_error();
        tls_fail(c, why);
        return;
      }
    }
    {
      const unsigned char *alpn = NULL;
      unsigned int alpn_len = 0;
      SSL_get0_alpn_selected(c->ssl, &alpn, &alpn_len);
      if (alpn_len != 2 || memcmp(alpn, "h2", 2) != 0) {
        /* A client sending no ALPN extension never reaches the select callback. */
        tls_fail(c, SSL_is_server(c->ssl) ? "client did not offer ALPN h2" : "server did not select ALPN h2");
        return;
      }
    }
    if (become_ready(c) < 0) return;
  }
  for (;;) {
    int n = SSL_read(c->ssl, plain, sizeof(plain)), e;
    if (n > 0) {
      feed_h2(c, plain, (size_t)n);
      if (c->closing) return;
      continue;
    }
    e = SSL_get_error(c->ssl, n);
    if (e == SSL_ERROR_WANT_READ) break;
    ERR_clear_error();
    fs_h2conn_close(c, e == SSL_ERROR_ZERO_RETURN ? "peer closed" : "TLS error while reading");
    return;
  }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  fs_h2conn *c = s->data;
  if (nread == 0 || c->closing || c->close_pending) return;
  if (nread < 0) {
    fs_h2conn_close(c, nread == UV_EOF ? "peer closed" : uv_strerror((int)nread));
    return;
  }
  c->bytes_in += (uint64_t)nread;
  c->last_rx_ms = uv_now(s->loop);
  if (c->slice_pass != g_pass) c->slice_pass = g_pass, c->slice_bytes = 0;
  c->slice_bytes += (size_t)nread;
  if (c->ssl) {
    c->rx = (const uint8_t *)buf->base;
    c->rx_len = (size_t)nread;
    tls_input(c);
    c->rx_len = 0;
  } else if (!c->tls_ready && c->ops->on_raw) {
    c->ops->on_raw(c, (const uint8_t *)buf->base, (size_t)nread);
  } else {
    feed_h2(c, (const uint8_t *)buf->base, (size_t)nread);
  }
  if (c->closing) return;
  fs_h2conn_mark(c);
  if (c->slice_bytes >= FS_READ_SLICE && !c->close_pending) slice_pause(c);
}

/* --- lifecycle ---------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h);

static void on_timer(uv_timer_t *t) {
  fs_h2conn *c = t->data;
  if (!c->closing && c->ops->on_timer) c->ops->on_timer(c);
}

void fs_h2conn_set_timer(fs_h2conn *c, uint64_t ms) {
  int rv;
  if (c->closing || !c->timer_open) return;
  if (ms == 0) {
    (void)uv_timer_stop(&c->timer); /* always 0 */
    return;
  }
  /* Fails only for a closing handle: without its timer the connection
   * would have no deadline, so it ends. */
  if ((rv = uv_timer_start(&c->timer, on_timer, ms, 0)) < 0) {
    char why[120];
    snprintf(why, sizeof(why), "cannot start a timer: %s", uv_strerror(rv));
    fs_h2conn_close_soon(c, why);
  }
}

int fs_h2conn_init(fs_h2conn *c, uv_loop_t *loop, const fs_h2conn_ops *ops) {
  int rv;
  memset(c, 0, sizeof(*c));
  c->ops = ops;
  c->outq_cap = FS_PACING_DEEP;
  fs_bufq_init(&c->outq, 0);
  /* A uv_tcp_init() that fails has registered nothing with the loop: |c| is
   * still the caller's to free, and no callback will come. */
  if ((rv = uv_tcp_init(loop, &c->tcp)) < 0) return rv;
  c->tcp.data = c;
  c->open_handles = 1;
  c->opened_ms = uv_now(loop);
  /* From here the loop refers to |c| until the TCP handle's close callback,
   * so an error can no longer be returned (the caller would free |c| under
   * the loop).  A timer that cannot be created closes the connection from
   * the next flush instead, once the owner has linked it (h2conn.h). */
  if ((rv = uv_timer_init(loop, &c->timer)) < 0) {
    char why[120];
    snprintf(why, sizeof(why), "cannot create a timer: %s", uv_strerror(rv));
    fs_h2conn_close_soon(c, why);
    return 0;
  }
  c->timer.data = c;
  c->timer_open = 1;
  c->open_handles = 2;
  return 0;
}

static int ops_has_raw(const fs_h2conn *c) { return c->ops->on_raw != NULL; }

int fs_h2conn_start(fs_h2conn *c, SSL_CTX *ctx, int server, const char *sni, const char *verify_name) {
  int rv;
  if (c->close_pending) {
    fs_h2conn_close(c, c->close_reason);
    return -1;
  }
  c->connected = 1;
  (void)uv_tcp_nodelay(&c->tcp, 1); /* best effort: without it only latency suffers */
  pacing_start(c);
  if (ctx) {
    BIO *bio;
    if (!(c->ssl = SSL_new(ctx)) || !(bio = BIO_new(g_bio_method))) {
      fs_h2conn_close(c, "out of memory");
      return -1;
    }
    BIO_set_data(bio, c);
    SSL_set_bio(c->ssl, bio, bio);
    if (server) {
      SSL_set_accept_state(c->ssl);
    } else {
      SSL_set_connect_state(c->ssl);
      unsigned char ipbuf[16];
      /* SNI carries host names only (RFC 6066 3). */
      if (sni && inet_pton(AF_INET, sni, ipbuf) != 1 && inet_pton(AF_INET6, sni, ipbuf) != 1 &&
          SSL_set_tlsext_host_name(c->ssl, sni) != 1) {
        ERR_clear_error();
        fs_h2conn_close(c, "cannot send this server name (SNI)");
        return -1;
      }
      if (verify_name) {
        /* Unchecked, a failure here would verify the chain but not the name. */
        X509_VERIFY_PARAM *vp = SSL_get0_param(c->ssl);
        int ok = inet_pton(AF_INET, verify_name, ipbuf) == 1 || inet_pton(AF_INET6, verify_name, ipbuf) == 1
                     ? X509_VERIFY_PARAM_set1_ip_asc(vp, verify_name)
                     : X509_VERIFY_PARAM_set1_host(vp, verify_name, 0);
        if (ok != 1) {
          ERR_clear_error();
          fs_h2conn_close(c, "cannot set the name the certificate must match");
          return -1;
        }
      }
    }
  }
  if ((rv = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read)) < 0) {
    fs_h2conn_close(c, uv_strerror(rv));
    return -1;
  }
  if (!ctx) return ops_has_raw(c) ? 0 : become_ready(c);
  if (!server) tls_input(c); /* sends the ClientHello */
  return c->closing ? -1 : 0;
}

int fs_h2conn_begin_h2(fs_h2conn *c, const uint8_t *pending, size_t len) {
  if (become_ready(c) < 0) return -1;
  if (len) feed_h2(c, pending, len);
  return c->closing ? -1 : 0;
}

void fs_h2conn_close_after_flush(fs_h2conn *c) {
  c->close_after_flush = 1;
  fs_h2conn_mark(c);
}

static void on_handle_closed(uv_handle_t *h) {
  fs_h2conn *c = h->data;
  if (--c->open_handles > 0) return;
  nghttp2_session_del(c->session);
  c->session = NULL;
  SSL_free(c->ssl);
  c->ssl = NULL;
  fs_bufq_reset(&c->outq);
  c->ops->on_freed(c);
}

void fs_h2conn_close(fs_h2conn *c, const char *reason) {
  if (c->closing) return;
  if (!c->close_reason[0] || reason != c->close_reason)
    snprintf(c->close_reason, sizeof(c->close_reason), "%s", reason);
  /* Best effort: a TLS alert or GOAWAY already queued still goes out. */
  if (c->ssl && g_stage_owner == c) stage_flush(c);
  c->closing = 1;
  dirty_remove(c);
  fs_list_remove(&c->pnode);
  if (c->connected && !c->inflight && c->outq.len) {
    uv_buf_t bufs[8];
    size_t total;
    (void)uv_try_write((uv_stream_t *)&c->tcp, bufs, (unsigned)outq_bufs(c, bufs, 8, &total));
  }
  if (g_stage_owner == c) g_stage_owner = NULL, g_stage_len = 0;
  /* A port probe (connect, then close without a byte, like `nc -z`) is not
   * a TLS failure. */
  if (c->ssl && c->connected && !c->tls_ready && !c->tls_fail_reported && c->bytes_in > 0 && c->ops->on_tls_fail) {
    /* e.g. a client that does not trust our certificate just hangs up. */
    char why[200];
    snprintf(why, sizeof(why), "%s during the TLS handshake", c->close_reason);
    c->tls_fail_reported = 1;
    c->ops->on_tls_fail(c, why);
  }
  c->ops->on_closing(c, c->close_reason);
  if (c->connected) (void)uv_read_stop((uv_stream_t *)&c->tcp); /* always 0 */
  uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
  if (c->timer_open) uv_close((uv_handle_t *)&c->timer, on_handle_closed); /* stops it */
}

int fs_h2conn_session_new(fs_h2conn *c, int server, const nghttp2_session_callbacks *cbs, const nghttp2_option *opt) {
  int rv = server ? nghttp2_session_server_new3(&c->session, cbs, c, opt, fs_h2mem())
                  : nghttp2_session_client_new3(&c->session, cbs, c, opt, fs_h2mem());
  if (rv != 0) c->session = NULL;
  return rv;
}
