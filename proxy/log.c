/* log: see log.h.  Timestamps are RFC 3339 UTC with microseconds. */
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ratelimit.h"

/* Events a remote peer can cause at will (one per connection, call or
 * reset): each kind writes at most FS_LOG_BURST lines at once, then
 * FS_LOG_RATE a second; the next line written says how many were
 * suppressed ("suppressed": N), so a flood cannot fill a disk or a log
 * shipper, and nothing is lost silently. */
static const char *const limited_kinds[] = {"rpc.error",    "conn.open", "conn.close",
                                            "conn.refused", "tls.fail",  "fleet.undecoded"};
#define NLIMITED (sizeof(limited_kinds) / sizeof(limited_kinds[0]))
static fs_ratelimit limits[NLIMITED];
static uint64_t suppressed_total;

static uint64_t mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static struct {
  fs_log_format format;
  fs_log_level min_level;
  const char *role;
  int fd;
  uint64_t dropped;
  time_t cached_sec; /* the formatted seconds part is reused within a second */
  char cached_prefix[32];
} L = {FS_LOG_JSON, FS_LOG_INFO, "link", 1, 0, -1, ""};

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void fs_log_init(fs_log_format format, fs_log_level min_level, const char *role, int fd) {
  struct stat st;
  L.format = format;
  L.min_level = min_level;
  L.role = role;
  L.fd = fd;
  {
    size_t i;
    uint64_t now = mono_ms();
    for (i = 0; i < NLIMITED; i++) fs_ratelimit_init(&limits[i], FS_LOG_RATE, FS_LOG_BURST, now);
    suppressed_total = 0;
  }
  /* Pipes and sockets could block the loop when the reader stalls: make them
   * non-blocking and drop instead.  Regular files and ttys do not stall. */
  if (fstat(fd, &st) == 0 && (S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode))) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) (void)fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  }
}

uint64_t fs_log_suppressed(void) { return suppressed_total; }

uint64_t fs_log_dropped(void) { return L.dropped; }

int fs_log_parse_level(const char *s, fs_log_level *out) {
  if (!strcasecmp(s, "debug")) *out = FS_LOG_DEBUG;
  else if (!strcasecmp(s, "info")) *out = FS_LOG_INFO;
  else if (!strcasecmp(s, "warning") || !strcasecmp(s, "warn")) *out = FS_LOG_WARN;
  else if (!strcasecmp(s, "error")) *out = FS_LOG_ERROR;
  else return -1;
  return 0;
}

/* Space kept free at the end of every line for `,"truncated":true}\n`. */
#define TAIL_RESERVE 24

static size_t room(const fs_event *ev) {
  return ev->len + TAIL_RESERVE < sizeof(ev->buf) ? sizeof(ev->buf) - TAIL_RESERVE - ev->len : 0;
}

static void put(fs_event *ev, const char *s, size_t n) {
  memcpy(ev->buf + ev->len, s, n);
  ev->len += n;
}

/* Length of the valid UTF-8 sequence at |s| (at most |n| bytes), 0 if invalid. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
  unsigned c = s[0];
  size_t len, i;
  uint32_t cp;
  if (c < 0x80) return 1;
  if (c >= 0xc2 && c <= 0xdf) len = 2, cp = c & 0x1f;
  else if (c >= 0xe0 && c <= 0xef) len = 3, cp = c & 0x0f;
  else if (c >= 0xf0 && c <= 0xf4) len = 4, cp = c & 0x07;
  else return 0;
  if (len > n) return 0;
  for (i = 1; i < len; i++) {
    if ((s[i] & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (s[i] & 0x3f);
  }
  if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
    return 0;
  return len;
}

size_t fs_json_escape(char *out, size_t cap, size_t *outlen, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  const unsigned char *u = (const unsigned char *)s;
  size_t i = 0, o = *outlen;
  while (i < n) {
    char tmp[8];
    size_t tn, adv;
    unsigned c = u[i];
    if (c == '"' || c == '\\') tmp[0] = '\\', tmp[1] = (char)c, tn = 2, adv = 1;
    else if (c == '\n') memcpy(tmp, "\\n", 2), tn = 2, adv = 1;
    else if (c == '\r') memcpy(tmp, "\\r", 2), tn = 2, adv = 1;
    else if (c == '\t') memcpy(tmp, "\\t", 2), tn = 2, adv = 1;
    else if (c < 0x20 || c == 0x7f) {
      memcpy(tmp, "\\u00", 4);
      tmp[4] = hex[c >> 4], tmp[5] = hex[c & 15], tn = 6, adv = 1;
    } else if (c < 0x80) tmp[0] = (char)c, tn = 1, adv = 1;
    else {
      adv = utf8_seq(u + i, n - i);
      if (adv == 0) memcpy(tmp, "\xef\xbf\xbd", 3), tn = 3, adv = 1; /* U+FFFD */
      else memcpy(tmp, u + i, adv), tn = adv;
    }
    if (o + tn > cap) break;
    memcpy(out + o, tmp, tn);
    o += tn;
    i += adv;
  }
  *outlen = o;
  return i;
}

static void put_timestamp(fs_event *ev) {
  struct timespec ts;
  struct tm tm;
  char frac[32];
  clock_gettime(CLOCK_REALTIME, &ts);
  if (ts.tv_sec != L.cached_sec) {
    gmtime_r(&ts.tv_sec, &tm);
    strftime(L.cached_prefix, sizeof(L.cached_prefix), "%Y-%m-%dT%H:%M:%S", &tm);
    L.cached_sec = ts.tv_sec;
  }
  put(ev, L.cached_prefix, strlen(L.cached_prefix));
  snprintf(frac, sizeof(frac), ".%06ldZ", ts.tv_nsec / 1000);
  put(ev, frac, strlen(frac));
}

int fs_ev_begin(fs_event *ev, fs_log_level level, const char *name) {
  fs_ratelimit *limit = NULL;
  size_t i;
  if (level < L.min_level) return 0;
  for (i = 0; i < NLIMITED; i++)
    if (!strcmp(name, limited_kinds[i])) {
      limit = &limits[i];
      if (!fs_ratelimit_take(limit, mono_ms())) {
        suppressed_total++;
        return 0;
      }
      break;
    }
  ev->len = 0;
  ev->truncated = 0;
  ev->level = level;
  if (L.format == FS_LOG_JSON) {
    put(ev, "{\"ts\":\"", 7);
    put_timestamp(ev);
    put(ev, "\",\"level\":\"", 11);
    put(ev, level_names[level], strlen(level_names[level]));
    put(ev, "\",\"event\":\"", 11);
    fs_json_escape(ev->buf, 256, &ev->len, name, strlen(name));
    put(ev, "\",\"role\":\"", 10);
    put(ev, L.role, strlen(L.role));
    put(ev, "\"", 1);
  } else {
    char lvl[8];
    put_timestamp(ev);
    snprintf(lvl, sizeof(lvl), " %-5s ", level_names[level]);
    put(ev, lvl, strlen(lvl));
    fs_json_escape(ev->buf, 256, &ev->len, name, strlen(name));
  }
  if (limit) {
    uint64_t n = fs_ratelimit_refused_take(limit);
    if (n) fs_ev_u64(ev, "suppressed", n);
  }
  return 1;
}

/* Starts `,"key":` (json) or ` key=` (text); returns 0 when even the key
 * plus a minimal value would not fit. */
static int put_key(fs_event *ev, const char *key, size_t min_value) {
  size_t kl = strlen(key);
  if (room(ev) < kl + 4 + min_value) {
    ev->truncated = 1;
    return 0;
  }
  if (L.format == FS_LOG_JSON) {
    put(ev, ",\"", 2);
    put(ev, key, kl);
    put(ev, "\":", 2);
  } else {
    put(ev, " ", 1);
    put(ev, key, kl);
    put(ev, "=", 1);
  }
  return 1;
}

static int text_needs_quotes(const char *v, size_t n) {
  size_t i;
  if (n == 0) return 1;
  for (i = 0; i < n; i++) {
    unsigned char c = (unsigned char)v[i];
    if (c <= ' ' || c == '"' || c == '=' || c == '\\' || c >= 0x7f) return 1;
  }
  return 0;
}

void fs_ev_strn(fs_event *ev, const char *key, const char *value, size_t n) {
  size_t cap, used;
  int quote = L.format == FS_LOG_JSON || text_needs_quotes(value, n);
  if (!put_key(ev, key, 2 + 3)) return;
  if (quote) put(ev, "\"", 1);
  /* Leave room for the closing quote and the "..." cut mark. */
  cap = ev->len + room(ev) - 4;
  if (cap > ev->len + FS_LOG_VALUE_MAX) cap = ev->len + FS_LOG_VALUE_MAX;
  used = fs_json_escape(ev->buf, cap, &ev->len, value, n);
  if (used < n) {
    put(ev, "...", 3);
    ev->truncated = 1;
  }
  if (quote) put(ev, "\"", 1);
}

void fs_ev_str(fs_event *ev, const char *key, const char *value) {
  if (!value) value = "";
  fs_ev_strn(ev, key, value, strlen(value));
}

static void put_raw_value(fs_event *ev, const char *key, const char *v, int quoted) {
  size_t n = strlen(v);
  if (!put_key(ev, key, n + 2)) return;
  if (quoted) put(ev, "\"", 1);
  put(ev, v, n);
  if (quoted) put(ev, "\"", 1);
}

void fs_ev_id(fs_event *ev, const char *key, uint64_t value) {
  char tmp[24];
  snprintf(tmp, sizeof(tmp), "%" PRIu64, value);
  put_raw_value(ev, key, tmp, L.format == FS_LOG_JSON);
}

void fs_ev_u64(fs_event *ev, const char *key, uint64_t value) {
  char tmp[24];
  snprintf(tmp, sizeof(tmp), "%" PRIu64, value);
  put_raw_value(ev, key, tmp, 0);
}

void fs_ev_i64(fs_event *ev, const char *key, int64_t value) {
  char tmp[24];
  snprintf(tmp, sizeof(tmp), "%" PRId64, value);
  put_raw_value(ev, key, tmp, 0);
}

void fs_ev_num(fs_event *ev, const char *key, double value, int decimals) {
  char tmp[48];
  if (value != value || value > 1e300 || value < -1e300) value = 0; /* JSON has no NaN/inf */
  snprintf(tmp, sizeof(tmp), "%.*f", decimals, value);
  put_raw_value(ev, key, tmp, 0);
}

void fs_ev_bool(fs_event *ev, const char *key, int value) { put_raw_value(ev, key, value ? "true" : "false", 0); }

int fs_ev_end(fs_event *ev) {
  ssize_t w;
  if (ev->truncated) {
    if (L.format == FS_LOG_JSON) put(ev, ",\"truncated\":true", 17);
    else put(ev, " truncated=true", 15);
  }
  if (L.format == FS_LOG_JSON) put(ev, "}", 1);
  put(ev, "\n", 1);
  do {
    w = write(L.fd, ev->buf, ev->len);
  } while (w < 0 && errno == EINTR);
  if (w != (ssize_t)ev->len) {
    L.dropped++;
    return -1;
  }
  return 0;
}
