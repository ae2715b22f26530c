/*
 * bench/backend.c: the benchmark's gRPC backend.  h2c (prior knowledge),
 * nghttp2 + epoll, one thread, no TLS: it stands in for the SuperLink and
 * must cost as little as possible, since it shares a CPU with the load
 * generator.
 *
 *   backend PORT STATSFILE [grpcio]
 *
 * By default it announces SETTINGS_MAX_CONCURRENT_STREAMS 1000 and a 4 MiB
 * stream window.  With "grpcio" it announces what a python3-grpcio 1.51
 * server does (seen on the wire): no stream limit, INITIAL_WINDOW_SIZE and
 * MAX_FRAME_SIZE 4194303, MAX_HEADER_LIST_SIZE 8192.  bench/attacks uses
 * that: how a proxy spreads a burst over upstream connections depends on
 * the upstream's stream limit.
 *
 * Methods (all unary; any other path gets Trailers-Only UNIMPLEMENTED):
 *   /bench.B/Echo  answers with the request message, byte for byte.
 *   /bench.B/Size  the request payload starts with protobuf field 1 (varint):
 *                  the response payload size; the rest (e.g. field 2 padding,
 *                  for uploads) is counted and dropped, never buffered.
 *   /bench.B/Fail  Trailers-Only FAILED_PRECONDITION "bench: failed as asked".
 *   /flwr.proto.Fleet/<any>  like Echo (to time the sidecar's Fleet observer).
 * A request header "bench-trailer: V" comes back as a response trailer.
 *
 * Success counters live in STATSFILE (mmap'ed, struct bench_stats below), so
 * the harness reads them at any time without talking to the process.  A call
 * counts as ok only when its request was one well-formed gRPC message, the
 * answer carried grpc-status 0, and the stream closed with NO_ERROR.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

struct bench_stats {
  uint64_t magic; /* 0x424e4348 once ready */
  uint64_t ok, ok_echo, ok_size;
  uint64_t failed_asked; /* /bench.B/Fail answered */
  uint64_t bad;          /* answered with an error status (malformed, unknown) */
  uint64_t reset;        /* streams that ended without a clean close */
  uint64_t req_bytes, resp_bytes;
  uint64_t conns_total, conns_open, streams_open;
  uint64_t streams_total; /* request streams ever opened (bench/attacks: requests that got through) */
};

enum { M_ECHO = 1, M_SIZE, M_FAIL, M_OTHER };
#define ECHO_MAX (256u << 20)
#define OUT_HIGH (256 * 1024)

typedef struct stream {
  int32_t id;
  int method;
  uint8_t hdr[5];
  uint32_t hdr_got;
  uint64_t msg_len, msg_got; /* of the current message's payload */
  int nmsgs;
  int bad;
  /* Size: varint parse of field 1 */
  uint8_t tag_seen, varint_done;
  uint32_t varint_shift;
  uint64_t want;
  uint8_t *echo; /* Echo: the payload */
  /* response */
  uint8_t rhdr[5];
  uint64_t rlen, roff; /* payload length, bytes of (header + payload) sent */
  int status;
  char trailer[128];
  size_t trailer_len;
  int answered;
} stream;

typedef struct conn {
  int fd;
  nghttp2_session *s;
  uint8_t *out;
  size_t out_len, out_off, out_cap;
  int want_out;
} conn;

static struct bench_stats *S;
static int ep;
static int grpcio_settings; /* announce what a grpcio server does */
static uint8_t rbuf[256 * 1024];
static uint8_t zeros[64 * 1024];

static void die(const char *what) {
  perror(what);
  exit(1);
}

static nghttp2_nv mknv(const char *n, const char *v, size_t vl) {
  nghttp2_nv nv = {(uint8_t *)n, (uint8_t *)v, strlen(n), vl, NGHTTP2_NV_FLAG_NO_COPY_NAME};
  return nv;
}

static ssize_t resp_read(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t len, uint32_t *flags,
                         nghttp2_data_source *src, void *ud) {
  stream *st = src->ptr;
  uint64_t total = st->rlen + 5, left = total - st->roff;
  size_t n = left < len ? (size_t)left : len, done = 0;
  (void)ud;
  while (done < n) {
    uint64_t o = st->roff + done;
    size_t take;
    if (o < 5) {
      take = 5 - (size_t)o;
      if (take > n - done) take = n - done;
      memcpy(buf + done, st->rhdr + o, take);
    } else if (st->echo) {
      take = n - done;
      memcpy(buf + done, st->echo + (o - 5), take);
    } else {
      take = n - done;
      if (take > sizeof(zeros)) take = sizeof(zeros);
      memcpy(buf + done, zeros, take);
    }
    done += take;
  }
  st->roff += n;
  S->resp_bytes += n;
  if (st->roff == total) {
    nghttp2_nv tr[2];
    size_t ntr = 0;
    *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
    tr[ntr++] = mknv("grpc-status", "0", 1);
    if (st->trailer_len) tr[ntr++] = mknv("bench-trailer", st->trailer, st->trailer_len);
    nghttp2_submit_trailer(s, sid, tr, ntr);
  }
  return (ssize_t)n;
}

static void answer_error(nghttp2_session *s, stream *st, int code, const char *msg) {
  char c[8];
  nghttp2_nv nv[4];
  int n = snprintf(c, sizeof(c), "%d", code);
  nv[0] = mknv(":status", "200", 3);
  nv[1] = mknv("content-type", "application/grpc", 16);
  nv[2] = mknv("grpc-status", c, (size_t)n);
  nv[3] = mknv("grpc-message", msg, strlen(msg));
  st->status = code;
  st->answered = 1;
  if (st->method == M_FAIL && code == 9) S->failed_asked++;
  else S->bad++;
  nghttp2_submit_response(s, st->id, nv, 4, NULL);
}

static void answer(nghttp2_session *s, stream *st) {
  nghttp2_nv nv[2];
  nghttp2_data_provider prd;
  if (st->method == M_FAIL) return answer_error(s, st, 9, "bench: failed as asked");
  if (st->method == M_OTHER) return answer_error(s, st, 12, "bench: unknown method");
  if (st->bad || st->nmsgs != 1 || st->hdr_got != 0) return answer_error(s, st, 3, "bench: malformed request");
  if (st->method == M_SIZE && !st->varint_done) return answer_error(s, st, 3, "bench: Size needs field 1");
  st->rlen = st->method == M_ECHO ? st->msg_len : st->want;
  st->rhdr[0] = 0;
  st->rhdr[1] = (uint8_t)(st->rlen >> 24);
  st->rhdr[2] = (uint8_t)(st->rlen >> 16);
  st->rhdr[3] = (uint8_t)(st->rlen >> 8);
  st->rhdr[4] = (uint8_t)st->rlen;
  st->status = 0;
  st->answered = 1;
  nv[0] = mknv(":status", "200", 3);
  nv[1] = mknv("content-type", "application/grpc", 16);
  prd.source.ptr = st;
  prd.read_callback = resp_read;
  nghttp2_submit_response(s, st->id, nv, 2, &prd);
}

static void feed(stream *st, const uint8_t *p, size_t n) {
  while (n > 0) {
    if (st->hdr_got < 5) {
      st->hdr[st->hdr_got++] = *p++;
      n--;
      if (st->hdr_got == 5) {
        st->msg_len = (uint64_t)st->hdr[1] << 24 | (uint64_t)st->hdr[2] << 16 | (uint64_t)st->hdr[3] << 8 | st->hdr[4];
        st->msg_got = 0;
        st->nmsgs++;
        if (st->hdr[0] != 0 || st->nmsgs > 1) st->bad = 1;
        if (st->method == M_ECHO && !st->bad) {
          if (st->msg_len > ECHO_MAX || !(st->echo = malloc(st->msg_len ? st->msg_len : 1))) st->bad = 1;
        }
        if (st->msg_len == 0) st->hdr_got = 0;
      }
      continue;
    }
    {
      uint64_t left = st->msg_len - st->msg_got;
      size_t take = left < n ? (size_t)left : n, i = 0;
      if (st->bad) {
        /* drop */
      } else if (st->method == M_ECHO) {
        memcpy(st->echo + st->msg_got, p, take);
      } else if (st->method == M_SIZE) {
        for (i = 0; i < take && !st->varint_done; i++) {
          uint8_t b = p[i];
          if (!st->tag_seen) {
            if (st->msg_got + i != 0 || b != 0x08) {
              st->bad = 1;
              break;
            }
            st->tag_seen = 1;
            continue;
          }
          if (st->varint_shift > 56) {
            st->bad = 1;
            break;
          }
          st->want |= (uint64_t)(b & 0x7f) << st->varint_shift;
          st->varint_shift += 7;
          if (!(b & 0x80)) {
            st->varint_done = 1;
            if (st->want > 0xffffffffull) st->bad = 1;
          }
        }
      }
      st->msg_got += take;
      p += take;
      n -= take;
      if (st->msg_got == st->msg_len) st->hdr_got = 0; /* next message header */
    }
  }
}

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *f, void *ud) {
  stream *st;
  (void)ud;
  if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  if (!(st = calloc(1, sizeof(*st)))) return NGHTTP2_ERR_CALLBACK_FAILURE;
  st->id = f->hd.stream_id;
  st->method = M_OTHER;
  S->streams_open++;
  S->streams_total++;
  nghttp2_session_set_stream_user_data(s, st->id, st);
  return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen, uint8_t flags, void *ud) {
  stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
  (void)flags, (void)ud;
  if (!st || f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  if (namelen == 5 && !memcmp(name, ":path", 5)) {
    if (valuelen == 13 && !memcmp(value, "/bench.B/Echo", 13)) st->method = M_ECHO;
    else if (valuelen == 13 && !memcmp(value, "/bench.B/Size", 13)) st->method = M_SIZE;
    else if (valuelen == 13 && !memcmp(value, "/bench.B/Fail", 13)) st->method = M_FAIL;
    /* Fleet paths are echoed: lets the bench time the sidecar's observer. */
    else if (valuelen > 18 && !memcmp(value, "/flwr.proto.Fleet/", 18)) st->method = M_ECHO;
  } else if (namelen == 13 && !memcmp(name, "bench-trailer", 13) && valuelen < sizeof(st->trailer)) {
    memcpy(st->trailer, value, valuelen);
    st->trailer_len = valuelen;
  }
  return 0;
}

static int on_data(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data, size_t len, void *ud) {
  stream *st = nghttp2_session_get_stream_user_data(s, sid);
  (void)flags, (void)ud;
  S->req_bytes += len;
  if (st && !st->answered) feed(st, data, len);
  return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *ud) {
  stream *st;
  (void)ud;
  if ((f->hd.type != NGHTTP2_HEADERS && f->hd.type != NGHTTP2_DATA) || !(f->hd.flags & NGHTTP2_FLAG_END_STREAM))
    return 0;
  st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
  if (st && !st->answered) answer(s, st);
  return 0;
}

static int on_close(nghttp2_session *s, int32_t sid, uint32_t code, void *ud) {
  stream *st = nghttp2_session_get_stream_user_data(s, sid);
  (void)ud;
  if (!st) return 0;
  if (code == NGHTTP2_NO_ERROR && st->answered && st->status == 0 && st->roff == st->rlen + 5) {
    S->ok++;
    if (st->method == M_ECHO) S->ok_echo++;
    else S->ok_size++;
  } else if (code != NGHTTP2_NO_ERROR || !st->answered) {
    S->reset++;
  }
  S->streams_open--;
  free(st->echo);
  free(st);
  return 0;
}

static nghttp2_session_callbacks *cbs;

static void conn_close(conn *c) {
  epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  nghttp2_session_del(c->s);
  free(c->out);
  free(c);
  S->conns_open--;
}

/* Sends what nghttp2 has, aggregated; returns -1 when |c| is gone. */
static int conn_flush(conn *c) {
  for (;;) {
    while (c->out_off < c->out_len) {
      ssize_t w = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0 && errno == EAGAIN) goto blocked;
      if (w <= 0) return conn_close(c), -1;
      c->out_off += (size_t)w;
    }
    c->out_off = c->out_len = 0;
    for (;;) {
      const uint8_t *p;
      ssize_t n = nghttp2_session_mem_send(c->s, &p);
      if (n < 0) return conn_close(c), -1;
      if (n == 0) break;
      if (c->out_len + (size_t)n > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 65536;
        while (cap < c->out_len + (size_t)n) cap *= 2;
        if (!(c->out = realloc(c->out, cap))) die("realloc");
        c->out_cap = cap;
      }
      memcpy(c->out + c->out_len, p, (size_t)n);
      c->out_len += (size_t)n;
      if (c->out_len >= OUT_HIGH) break;
    }
    if (c->out_len == 0) break;
  }
  if (c->want_out) {
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = 0;
  }
  if (!nghttp2_session_want_read(c->s) && !nghttp2_session_want_write(c->s)) return conn_close(c), -1;
  return 0;
blocked:
  if (!c->want_out) {
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = 1;
  }
  return 0;
}

static void conn_read(conn *c) {
  for (;;) {
    ssize_t n = read(c->fd, rbuf, sizeof(rbuf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) break;
    if (n <= 0) {
      conn_close(c);
      return;
    }
    if (nghttp2_session_mem_recv(c->s, rbuf, (size_t)n) < 0) {
      conn_close(c);
      return;
    }
    if ((size_t)n < sizeof(rbuf)) break;
  }
  conn_flush(c);
}

static void accept_all(int lfd) {
  for (;;) {
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC), one = 1;
    conn *c;
    struct epoll_event ev;
    nghttp2_settings_entry iv[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 1000},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 4194303},
    };
    nghttp2_settings_entry grpcio_iv[] = {
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 4194303},
        {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, 4194303},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, 8192},
    };
    if (fd < 0) return;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (!(c = calloc(1, sizeof(*c)))) die("calloc");
    c->fd = fd;
    if (nghttp2_session_server_new(&c->s, cbs, c) != 0) die("nghttp2_session_server_new");
    if (grpcio_settings) nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, grpcio_iv, 3);
    else nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, iv, 2);
    nghttp2_session_set_local_window_size(c->s, NGHTTP2_FLAG_NONE, 0, 16 << 20);
    ev.events = EPOLLIN;
    ev.data.ptr = c;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    S->conns_total++;
    S->conns_open++;
    conn_flush(c);
  }
}

int main(int argc, char **argv) {
  int lfd, one = 1, sfd;
  struct sockaddr_in sa;
  struct epoll_event lev, evs[256];
  if (argc != 3 && !(argc == 4 && !strcmp(argv[3], "grpcio"))) {
    fprintf(stderr, "usage: backend PORT STATSFILE [grpcio]\n");
    return 2;
  }
  grpcio_settings = argc == 4;
  signal(SIGPIPE, SIG_IGN);
  if ((sfd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0644)) < 0 || ftruncate(sfd, 4096) < 0) die(argv[2]);
  S = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
  if (S == MAP_FAILED) die("mmap");

  nghttp2_session_callbacks_new(&cbs);
  nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_close);

  lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  memset(&sa, 0, sizeof(sa));
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)atoi(argv[1]));
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 4096) < 0) die("bind/listen");
  if ((ep = epoll_create1(EPOLL_CLOEXEC)) < 0) die("epoll_create1");
  lev.events = EPOLLIN;
  lev.data.ptr = NULL;
  epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
  S->magic = 0x424e4348;
  for (;;) {
    int n = epoll_wait(ep, evs, 256, -1), i;
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) die("epoll_wait");
    for (i = 0; i < n; i++) {
      conn *c = evs[i].data.ptr;
      if (!c) {
        accept_all(lfd);
        continue;
      }
      if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) conn_read(c);
      else if (evs[i].events & EPOLLOUT) conn_flush(c);
    }
  }
}
