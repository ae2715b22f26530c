/*
 * bench/idle.c: opens N idle TLS + HTTP/2 connections and holds them.
 *
 *   idle HOST PORT N [SETUP_TIMEOUT_S]
 *
 * Each connection: TCP connect, TLS 1.3 handshake (TLS_AES_128_GCM_SHA256,
 * ALPN h2, no certificate check), the client preface and an empty SETTINGS,
 * then the server's SETTINGS is acknowledged.  A connection is ready once
 * the server has sent its own SETTINGS and acknowledged ours: the proxy has
 * set up its HTTP/2 session by then.  At most 256 connections are being set
 * up at a time.  When every connection is ready, failed, or the setup time
 * is up, one line goes to stdout:
 *   READY ok=N failed=F ms=T
 * and the connections stay open (anything the server sends is read and
 * dropped; a second SETTINGS is acknowledged) until stdin reaches EOF.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { ST_CONNECTING, ST_HANDSHAKE, ST_H2, ST_READY, ST_DEAD };

typedef struct conn {
  int fd, state;
  SSL *ssl;
  uint8_t fh[9];
  uint32_t fh_got, skip; /* frame header bytes read; payload bytes left to skip */
  uint8_t got_settings, got_ack;
} conn;

static int ep, nready, nfailed, ninprogress;
static SSL_CTX *ctx;

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void set_events(conn *c, uint32_t events) {
  struct epoll_event ev = {.events = events, .data.ptr = c};
  epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void dead(conn *c) {
  if (c->state == ST_DEAD) return;
  if (c->state != ST_READY) {
    nfailed++;
    ninprogress--;
  } else {
    nready--;
    nfailed++;
  }
  c->state = ST_DEAD;
  epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  SSL_free(c->ssl);
  c->ssl = NULL;
}

static void h2_input(conn *c) {
  uint8_t buf[16384];
  for (;;) {
    int n = SSL_read(c->ssl, buf, sizeof(buf)), i = 0;
    if (n <= 0) {
      int e = SSL_get_error(c->ssl, n);
      if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return;
      dead(c);
      return;
    }
    while (i < n) {
      if (c->skip) {
        uint32_t t = c->skip < (uint32_t)(n - i) ? c->skip : (uint32_t)(n - i);
        c->skip -= t;
        i += (int)t;
        continue;
      }
      c->fh[c->fh_got++] = buf[i++];
      if (c->fh_got == 9) {
        uint32_t len = (uint32_t)c->fh[0] << 16 | (uint32_t)c->fh[1] << 8 | c->fh[2];
        uint8_t type = c->fh[3], flags = c->fh[4];
        c->fh_got = 0;
        c->skip = len;
        if (type == 4 && (flags & 1)) c->got_ack = 1;
        if (type == 4 && !(flags & 1)) {
          static const uint8_t ack[9] = {0, 0, 0, 4, 1, 0, 0, 0, 0};
          c->got_settings = 1;
          if (SSL_write(c->ssl, ack, 9) != 9) {
            dead(c);
            return;
          }
        }
        if (type == 7) { /* GOAWAY: the server does not want us */
          dead(c);
          return;
        }
      }
    }
    if (c->state == ST_H2 && c->got_settings && c->got_ack) {
      c->state = ST_READY;
      ninprogress--;
      nready++;
    }
  }
}

static void handshake(conn *c) {
  int r = SSL_do_handshake(c->ssl);
  if (r == 1) {
    static const uint8_t pre[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                                 "\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    const unsigned char *alpn;
    unsigned int alpn_len = 0;
    SSL_get0_alpn_selected(c->ssl, &alpn, &alpn_len);
    if (alpn_len != 2 || memcmp(alpn, "h2", 2) || SSL_write(c->ssl, pre, sizeof(pre) - 1) != (int)sizeof(pre) - 1) {
      dead(c);
      return;
    }
    c->state = ST_H2;
    set_events(c, EPOLLIN);
    h2_input(c);
    return;
  }
  switch (SSL_get_error(c->ssl, r)) {
  case SSL_ERROR_WANT_READ:
    set_events(c, EPOLLIN);
    break;
  case SSL_ERROR_WANT_WRITE:
    set_events(c, EPOLLOUT);
    break;
  default:
    ERR_clear_error();
    dead(c);
  }
}

static int start(conn *c, const struct sockaddr_in *sa) {
  struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
  int one = 1;
  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c->fd < 0) return -1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  ninprogress++;
  c->state = ST_CONNECTING;
  if (connect(c->fd, (const struct sockaddr *)sa, sizeof(*sa)) < 0 && errno != EINPROGRESS) {
    close(c->fd);
    c->state = ST_DEAD;
    ninprogress--;
    nfailed++;
    return 0;
  }
  epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
  return 0;
}

static void on_event(conn *c, uint32_t events) {
  if (c->state == ST_CONNECTING) {
    int err = 0;
    socklen_t el = sizeof(err);
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
    if (err) {
      dead(c);
      return;
    }
    if (!(c->ssl = SSL_new(ctx))) {
      dead(c);
      return;
    }
    SSL_set_fd(c->ssl, c->fd);
    SSL_set_connect_state(c->ssl);
    c->state = ST_HANDSHAKE;
  }
  if (c->state == ST_HANDSHAKE) handshake(c);
  else if (c->state == ST_H2 || c->state == ST_READY) h2_input(c);
  (void)events;
}

int main(int argc, char **argv) {
  struct sockaddr_in sa;
  struct rlimit rl;
  struct epoll_event evs[512], sev;
  conn *conns;
  int n, next = 0, reported = 0, stdin_closed = 0, i;
  double setup_s;
  uint64_t t0, deadline;
  static const unsigned char alpn[] = {2, 'h', '2'};
  if (argc < 4) {
    fprintf(stderr, "usage: idle HOST PORT N [SETUP_TIMEOUT_S]\n");
    return 2;
  }
  n = atoi(argv[3]);
  setup_s = argc > 4 ? atof(argv[4]) : 60;
  memset(&sa, 0, sizeof(sa));
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)atoi(argv[2]));
  if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) return fprintf(stderr, "idle: bad host\n"), 2;
  rl.rlim_cur = rl.rlim_max = (rlim_t)n + 64;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)n + 64) {
    rl.rlim_cur = (rlim_t)n + 64;
    if (rl.rlim_max < rl.rlim_cur) rl.rlim_max = rl.rlim_cur;
    if (setrlimit(RLIMIT_NOFILE, &rl) < 0) perror("idle: setrlimit");
  }
  ctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256");
  SSL_CTX_set_alpn_protos(ctx, alpn, sizeof(alpn));
  SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  conns = calloc((size_t)n, sizeof(*conns));
  ep = epoll_create1(EPOLL_CLOEXEC);
  sev.events = EPOLLIN;
  sev.data.ptr = NULL; /* stdin */
  epoll_ctl(ep, EPOLL_CTL_ADD, 0, &sev);
  t0 = now_ms();
  deadline = t0 + (uint64_t)(setup_s * 1000);
  for (;;) {
    int k;
    while (next < n && ninprogress < 256) start(&conns[next++], &sa);
    if (!reported && ((next == n && ninprogress == 0) || now_ms() >= deadline)) {
      printf("READY ok=%d failed=%d ms=%llu\n", nready, nfailed + (n - next) + ninprogress,
             (unsigned long long)(now_ms() - t0));
      fflush(stdout);
      reported = 1;
      next = n; /* start no more */
      if (stdin_closed) return 0;
    }
    k = epoll_wait(ep, evs, 512, reported ? -1 : 100);
    if (k < 0 && errno == EINTR) continue;
    for (i = 0; i < k; i++) {
      conn *c = evs[i].data.ptr;
      if (!c) {
        char b[256];
        ssize_t r = read(0, b, sizeof(b));
        if (r <= 0) {
          if (reported) return 0;
          /* stdin closed early: report now, then leave */
          epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL);
          stdin_closed = 1;
          deadline = now_ms();
        }
        continue;
      }
      if (c->state != ST_DEAD) on_event(c, evs[i].events);
    }
  }
}
