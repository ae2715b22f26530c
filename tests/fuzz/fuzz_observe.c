/*
 * libFuzzer target: the Fleet observer (observe.c + fedstate.c + fleet.c),
 * the gRPC message splitter (grpcmsg.c), fs_fed_parse_server_round and the
 * event logger's escaping (log.c), fed with arbitrary bytes.
 *
 *   clang -fsanitize=fuzzer,address,undefined ... (see `make fuzz`)
 *
 * An input is a sequence of calls, so that fedstate sees a dispatch, the
 * ConfigRecord pull, the confirm and the reply of one instruction in one
 * input (the seed corpus, tests/fuzz/gen_corpus.py, is built that way):
 *
 *   record := sel:1 chunk:1 req_len:3 (LE) req resp_len:3 (LE) resp
 *
 *   sel    bits 0-3: the method (0 = not a Fleet path, 1..12 = the Fleet
 *          methods, 13..15 = methods 1..3 again); bit 4: the call ends
 *          with a non-OK status; bit 5: the call is reset (status -1);
 *          bits 6-7: clock advance before the call (0, 1 s, 10 s, 100 s)
 *   chunk  how the bytes are cut into DATA chunks: 0 = one chunk per
 *          direction, else chunks of `chunk` bytes (1 = byte by byte), the
 *          two directions interleaved
 *   req, resp  the DATA of each direction as forwarded (gRPC framing
 *          included, so framing is fuzzed too); lengths are clamped to
 *          what the input holds
 *
 * fs_fed_tick runs after every call that moved the clock, and once more an
 * hour later at the end of the input.  Every event line the logger writes
 * is checked: one whole line, at most 4096 bytes, a flat JSON object of
 * strings/numbers/booleans, valid UTF-8 (by this file's own RFC 3629
 * checker, not a copy of log.c's, so a bug there is caught), no raw control
 * characters.  A violation aborts (a crash for libFuzzer).
 *
 * The whole input also goes through fs_grpcmsg_feed (with a size limit
 * taken from it) and fs_fed_parse_server_round, whose own invariants are
 * checked.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fedstate.h"
#include "fleet.h"
#include "grpcmsg.h"
#include "log.h"
#include "observe.h"

static int rfd = -1, wfd = -1;
static uint64_t clock_now = 1000000;
static uint64_t fake_clock(void) { return clock_now; }

static const char *const paths[FS_FLEET_METHODS] = {
    "/test.Echo/Unary",
    "/flwr.proto.Fleet/RegisterNode",
    "/flwr.proto.Fleet/ActivateNode",
    "/flwr.proto.Fleet/DeactivateNode",
    "/flwr.proto.Fleet/UnregisterNode",
    "/flwr.proto.Fleet/SendNodeHeartbeat",
    "/flwr.proto.Fleet/PullMessages",
    "/flwr.proto.Fleet/PushMessages",
    "/flwr.proto.Fleet/GetRun",
    "/flwr.proto.Fleet/GetFab",
    "/flwr.proto.Fleet/PushObject",
    "/flwr.proto.Fleet/PullObject",
    "/flwr.proto.Fleet/ConfirmMessageReceived",
};

static void rfc3629_selftest(void);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  int p[2];
  (void)argc, (void)argv;
  if (pipe2(p, O_CLOEXEC) < 0) abort();
  rfd = p[0], wfd = p[1];
  (void)fcntl(wfd, F_SETPIPE_SZ, 1 << 20);
  (void)fcntl(rfd, F_SETFL, O_NONBLOCK);
  fs_log_init(FS_LOG_JSON, FS_LOG_DEBUG, "link", wfd); /* sets O_NONBLOCK on wfd */
  fs_obs_set_clock(fake_clock);
  rfc3629_selftest();
  return 0;
}

/* --- checking event lines ------------------------------------------------------ */

#define CHECK(cond)                                                                                                    \
  do {                                                                                                                 \
    if (!(cond)) {                                                                                                     \
      fprintf(stderr, "fuzz_observe: event line check failed: %s (line %d)\n", #cond, __LINE__);                       \
      abort();                                                                                                         \
    }                                                                                                                  \
  } while (0)

/* The checker's own UTF-8 validator, independent of log.c's (which decodes
 * the code point, then range-checks it): here every well-formed sequence is
 * one row of RFC 3629's section 4 grammar, matched byte range by byte
 * range.  The second byte's range is what excludes overlongs (E0, F0),
 * surrogates U+D800..DFFF (ED) and code points above U+10FFFF (F4); C0,
 * C1 and F5..FF start no row.  Later bytes are plain tails, 80..BF. */
static const struct {
  unsigned char lead_lo, lead_hi, second_lo, second_hi, len;
} rfc3629_rows[] = {
    {0x00, 0x7f, 0x00, 0x00, 1}, /* UTF8-1 */
    {0xc2, 0xdf, 0x80, 0xbf, 2}, /* UTF8-2 */
    {0xe0, 0xe0, 0xa0, 0xbf, 3}, /* UTF8-3: %xE0 %xA0-BF UTF8-tail */
    {0xe1, 0xec, 0x80, 0xbf, 3}, /*         %xE1-EC 2( UTF8-tail ) */
    {0xed, 0xed, 0x80, 0x9f, 3}, /*         %xED %x80-9F UTF8-tail */
    {0xee, 0xef, 0x80, 0xbf, 3}, /*         %xEE-EF 2( UTF8-tail ) */
    {0xf0, 0xf0, 0x90, 0xbf, 4}, /* UTF8-4: %xF0 %x90-BF 2( UTF8-tail ) */
    {0xf1, 0xf3, 0x80, 0xbf, 4}, /*         %xF1-F3 3( UTF8-tail ) */
    {0xf4, 0xf4, 0x80, 0x8f, 4}, /*         %xF4 %x80-8F 2( UTF8-tail ) */
};

/* Bytes of the well-formed character at |s| (|avail| bytes readable), or 0
 * when it is ill-formed or cut short. */
static size_t rfc3629_char(const unsigned char *s, size_t avail) {
  size_t r, k;
  for (r = 0; r < sizeof(rfc3629_rows) / sizeof(rfc3629_rows[0]); r++) {
    if (s[0] < rfc3629_rows[r].lead_lo || s[0] > rfc3629_rows[r].lead_hi) continue;
    if (rfc3629_rows[r].len > avail) return 0; /* truncated */
    if (rfc3629_rows[r].len == 1) return 1;
    if (s[1] < rfc3629_rows[r].second_lo || s[1] > rfc3629_rows[r].second_hi) return 0;
    for (k = 2; k < rfc3629_rows[r].len; k++)
      if (s[k] < 0x80 || s[k] > 0xbf) return 0;
    return rfc3629_rows[r].len;
  }
  return 0;
}

/* The checker is checked before it checks anything: the edges of every
 * RFC 3629 row, and the classic ill-formed cases (Unicode 15, table 3-7
 * and section 3.9's examples). */
static void rfc3629_selftest(void) {
  static const struct {
    const char *bytes;
    size_t n, want;
  } v[] = {
      {"\x00", 1, 1},
      {"\x7f", 1, 1},
      {"\x80", 1, 0}, /* a lone tail */
      {"\xbf", 1, 0},
      {"\xc0\x80", 2, 0}, /* overlong NUL */
      {"\xc1\xbf", 2, 0}, /* overlong U+007F */
      {"\xc2\x80", 2, 2}, /* U+0080 */
      {"\xdf\xbf", 2, 2}, /* U+07FF */
      {"\xc2\x7f", 2, 0}, /* bad tail */
      {"\xc2\xc0", 2, 0},
      {"\xe0\x9f\xbf", 3, 0}, /* overlong U+07FF */
      {"\xe0\xa0\x80", 3, 3}, /* U+0800 */
      {"\xec\xbf\xbf", 3, 3},
      {"\xed\x9f\xbf", 3, 3}, /* U+D7FF */
      {"\xed\xa0\x80", 3, 0}, /* U+D800, a surrogate */
      {"\xed\xbf\xbf", 3, 0}, /* U+DFFF */
      {"\xee\x80\x80", 3, 3}, /* U+E000 */
      {"\xef\xbf\xbf", 3, 3}, /* U+FFFF */
      {"\xe2\x82", 2, 0},     /* truncated U+20AC */
      {"\xe2\x82\xac", 3, 3},
      {"\xe2\x82\x41", 3, 0},
      {"\xf0\x8f\xbf\xbf", 4, 0}, /* overlong U+FFFF */
      {"\xf0\x90\x80\x80", 4, 4}, /* U+10000 */
      {"\xf0\x9f\x98\x80", 4, 4}, /* U+1F600 */
      {"\xf0\x9f\x98", 3, 0},     /* truncated */
      {"\xf3\xbf\xbf\xbf", 4, 4},
      {"\xf4\x8f\xbf\xbf", 4, 4}, /* U+10FFFF */
      {"\xf4\x90\x80\x80", 4, 0}, /* U+110000 */
      {"\xf5\x80\x80\x80", 4, 0},
      {"\xf8\x88\x80\x80\x80", 5, 0}, /* 5-byte forms are gone */
      {"\xfe", 1, 0},
      {"\xff", 1, 0},
  };
  size_t i;
  for (i = 0; i < sizeof(v) / sizeof(v[0]); i++)
    if (rfc3629_char((const unsigned char *)v[i].bytes, v[i].n) != v[i].want) {
      fprintf(stderr, "fuzz_observe: UTF-8 checker self-test failed on vector %zu\n", i);
      abort();
    }
}

/* A JSON string at *p (after the opening quote); advances past the closing one. */
static void check_string(const unsigned char **p, const unsigned char *end) {
  const unsigned char *s = *p;
  while (s < end && *s != '"') {
    if (*s == '\\') {
      CHECK(s + 1 < end);
      if (s[1] == 'u') {
        int i;
        CHECK(s + 6 <= end);
        for (i = 2; i < 6; i++)
          CHECK((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f') || (s[i] >= 'A' && s[i] <= 'F'));
        s += 6;
      } else {
        CHECK(strchr("\"\\/bfnrt", s[1]) != NULL && s[1] != 0);
        s += 2;
      }
    } else {
      size_t l;
      CHECK(*s >= 0x20);
      l = rfc3629_char(s, (size_t)(end - s));
      CHECK(l > 0);
      s += l;
    }
  }
  CHECK(s < end);
  *p = s + 1;
}

static void check_value(const unsigned char **p, const unsigned char *end) {
  const unsigned char *s = *p;
  CHECK(s < end);
  if (*s == '"') {
    s++;
    check_string(&s, end);
  } else if ((size_t)(end - s) >= 4 && !memcmp(s, "true", 4)) {
    s += 4;
  } else if ((size_t)(end - s) >= 5 && !memcmp(s, "false", 5)) {
    s += 5;
  } else {
    /* -?digits(.digits)? : what fs_ev_u64/i64/num write */
    int digits = 0;
    if (*s == '-') s++;
    while (s < end && *s >= '0' && *s <= '9') s++, digits++;
    CHECK(digits > 0);
    if (s < end && *s == '.') {
      s++;
      digits = 0;
      while (s < end && *s >= '0' && *s <= '9') s++, digits++;
      CHECK(digits > 0);
    }
  }
  *p = s;
}

/* One line without its '\n': a flat JSON object with the envelope first. */
static void check_line(const unsigned char *l, size_t n) {
  const unsigned char *p = l, *end = l + n;
  CHECK(n + 1 <= FS_LOG_LINE_MAX);
  CHECK(n > 8 && !memcmp(l, "{\"ts\":\"", 7));
  CHECK(l[n - 1] == '}');
  end = l + n - 1;
  p = l + 1;
  for (;;) {
    CHECK(p < end && *p == '"');
    p++;
    check_string(&p, end);
    CHECK(p < end && *p == ':');
    p++;
    check_value(&p, end);
    if (p == end) break;
    CHECK(*p == ',');
    p++;
  }
}

static void drain_events(void) {
  static unsigned char buf[(1 << 20) + 1];
  size_t have = 0;
  for (;;) {
    ssize_t r = read(rfd, buf + have, sizeof(buf) - 1 - have);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    have += (size_t)r;
    if (have == sizeof(buf) - 1) break;
  }
  {
    size_t i = 0;
    while (i < have) {
      unsigned char *nl = memchr(buf + i, '\n', have - i);
      CHECK(nl != NULL); /* every write is a whole line */
      check_line(buf + i, (size_t)(nl - (buf + i)));
      i = (size_t)(nl - buf) + 1;
    }
  }
}

/* --- the splitter on its own ------------------------------------------------------ */

typedef struct split_rec {
  uint64_t begun, ended, body;
  uint32_t cur_len, cur_seen;
  int in_msg;
} split_rec;

static int s_begin(void *ud, uint8_t flags, uint32_t len) {
  split_rec *r = ud;
  (void)flags;
  CHECK(!r->in_msg);
  r->begun++;
  r->cur_len = len;
  r->cur_seen = 0;
  r->in_msg = 1;
  return 0;
}
static void s_body(void *ud, const uint8_t *p, size_t n) {
  split_rec *r = ud;
  CHECK(r->in_msg && n > 0 && p != NULL);
  CHECK((uint64_t)r->cur_seen + n <= r->cur_len);
  r->cur_seen += (uint32_t)n;
  r->body += n;
}
static void s_end(void *ud) {
  split_rec *r = ud;
  CHECK(r->in_msg && r->cur_seen == r->cur_len);
  r->in_msg = 0;
  r->ended++;
}
static const fs_grpcmsg_cb split_cb = {s_begin, s_body, s_end};

static void fuzz_splitter(const uint8_t *data, size_t size) {
  fs_grpcmsg m;
  split_rec r;
  size_t i, step;
  uint32_t max_len;
  int rv = 0;
  if (size < 2) return;
  max_len = data[0] & 0x80 ? UINT32_MAX : (uint32_t)data[0] << 8 | data[1];
  step = (data[1] % 17) + 1;
  memset(&r, 0, sizeof(r));
  fs_grpcmsg_init(&m, max_len);
  for (i = 0; i < size && rv == 0; i += step) {
    size_t n = size - i < step ? size - i : step;
    rv = fs_grpcmsg_feed(&m, data + i, n, &split_cb, &r);
    CHECK(rv == 0 || rv == FS_GRPCMSG_TOO_BIG);
  }
  CHECK(r.body <= size);
  CHECK(r.ended <= r.begun && r.begun <= r.ended + 1);
  CHECK(m.messages == r.begun);
  if (rv == 0) CHECK(fs_grpcmsg_at_boundary(&m) == (!r.in_msg && m.hdr_len == 0));
  else CHECK(fs_grpcmsg_feed(&m, data, 1, &split_cb, &r) == FS_GRPCMSG_TOO_BIG);
}

/* --- the observer ------------------------------------------------------------------ */

static uint32_t le24(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16; }

static void feed(fs_obs *o, const uint8_t *req, size_t nreq, const uint8_t *resp, size_t nresp, size_t chunk) {
  size_t a = 0, b = 0;
  if (chunk == 0) {
    if (nreq) fs_obs_data(o, 0, req, nreq);
    if (nresp) fs_obs_data(o, 1, resp, nresp);
    return;
  }
  while (a < nreq || b < nresp) { /* interleaved, as on a real stream */
    if (a < nreq) {
      size_t n = nreq - a < chunk ? nreq - a : chunk;
      fs_obs_data(o, 0, req + a, n);
      a += n;
    }
    if (b < nresp) {
      size_t n = nresp - b < chunk ? nresp - b : chunk;
      fs_obs_data(o, 1, resp + b, n);
      b += n;
    }
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const uint8_t *p = data, *end = data + size;
  int calls = 0;
  static const uint64_t advance[4] = {0, 1000, 10000, 100000};

  fs_fed_reset();
  clock_now = 1000000;
  while ((size_t)(end - p) >= 5 && calls++ < 64) {
    uint8_t sel = p[0], chunk = p[1];
    size_t nreq = le24(p + 2), nresp;
    const uint8_t *req, *resp;
    fs_fleet_method m = (fs_fleet_method)((sel & 0x0f) < FS_FLEET_METHODS ? (sel & 0x0f) : (sel & 0x0f) - 12);
    int status = sel & 0x20 ? -1 : sel & 0x10 ? 14 : 0;
    char peer[32];
    fs_obs *o;
    p += 5;
    if (nreq > (size_t)(end - p)) nreq = (size_t)(end - p);
    req = p;
    p += nreq;
    nresp = (size_t)(end - p) >= 3 ? le24(p) : 0;
    p += (size_t)(end - p) >= 3 ? 3 : (size_t)(end - p);
    if (nresp > (size_t)(end - p)) nresp = (size_t)(end - p);
    resp = p;
    p += nresp;

    clock_now += advance[sel >> 6];
    snprintf(peer, sizeof(peer), "127.0.0.1:%d", 40000 + calls);
    o = fs_obs_start((const uint8_t *)paths[m], strlen(paths[m]), peer);
    CHECK((o == NULL) == (m == FS_FLEET_NONE));
    if (o) {
      CHECK(fs_obs_method(o) == m);
      feed(o, req, nreq, resp, nresp, chunk);
      fs_obs_finish(o, status);
    }
    if (sel >> 6) fs_fed_tick(clock_now); /* the tick scans fedstate's tables: only when time moved */
    drain_events();
  }
  /* Whatever is still pending comes out at the 30 s fallback or when nodes
   * go silent. */
  clock_now += 3600 * 1000;
  fs_fed_tick(clock_now);
  {
    uint64_t run;
    (void)fs_fed_nodes_active();
    (void)fs_fed_current_round(&run);
  }
  drain_events();

  fuzz_splitter(data, size);
  {
    int64_t round = 0x5a5a;
    int rv = fs_fed_parse_server_round(data, size, &round);
    CHECK(rv == 0 || (rv == -1 && round == 0x5a5a));
  }
  fs_fed_reset();
  return 0;
}
