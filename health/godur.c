/* Go-compatible duration and boolean parsing/printing; see godur.h.
 * Follows Go's time.ParseDuration, time.Duration.String and
 * strconv.ParseBool, including their overflow rules and error texts. */
#include "godur.h"

#include <stdio.h>
#include <string.h>

#define NS_PER_US 1000ULL
#define NS_PER_MS 1000000ULL
#define NS_PER_S  1000000000ULL
#define MAX_MAG   (1ULL << 63) /* |math.MinInt64| */

static const struct {
  const char *name;
  uint64_t ns;
} units[] = {
    {"ns", 1},
    {"us", NS_PER_US},
    {"\xc2\xb5s", NS_PER_US}, /* U+00B5 micro sign */
    {"\xce\xbcs", NS_PER_US}, /* U+03BC Greek small letter mu */
    {"ms", NS_PER_MS},
    {"s", NS_PER_S},
    {"m", 60 * NS_PER_S},
    {"h", 3600 * NS_PER_S},
};

static int dur_error(char *err, size_t errlen, const char *what, const char *orig) {
  if (err && errlen) snprintf(err, errlen, "time: %s \"%s\"", what, orig);
  return -1;
}

int go_parse_duration(const char *orig, int64_t *out, char *err, size_t errlen) {
  const char *s = orig;
  uint64_t d = 0;
  bool neg = false;

  if (*s == '-' || *s == '+') {
    neg = *s == '-';
    s++;
  }
  if (strcmp(s, "0") == 0) {
    *out = 0;
    return 0;
  }
  if (*s == '\0') return dur_error(err, errlen, "invalid duration", orig);

  while (*s) {
    uint64_t v = 0, f = 0;
    double scale = 1;

    if (!(*s == '.' || (*s >= '0' && *s <= '9'))) return dur_error(err, errlen, "invalid duration", orig);

    /* leading integer */
    const char *p = s;
    while (*s >= '0' && *s <= '9') {
      if (v > MAX_MAG / 10) return dur_error(err, errlen, "invalid duration", orig);
      v = v * 10 + (uint64_t)(*s - '0');
      if (v > MAX_MAG) return dur_error(err, errlen, "invalid duration", orig);
      s++;
    }
    bool pre = s != p;
    bool post = false;

    /* fraction */
    if (*s == '.') {
      s++;
      p = s;
      bool overflow = false;
      while (*s >= '0' && *s <= '9') {
        if (!overflow) {
          if (f > (MAX_MAG - 1) / 10) {
            overflow = true;
          } else {
            uint64_t y = f * 10 + (uint64_t)(*s - '0');
            if (y > MAX_MAG) {
              overflow = true;
            } else {
              f = y;
              scale *= 10;
            }
          }
        }
        s++;
      }
      post = s != p;
    }
    if (!pre && !post) return dur_error(err, errlen, "invalid duration", orig);

    /* unit: everything up to the next digit or '.' */
    size_t ulen = 0;
    while (s[ulen] && s[ulen] != '.' && !(s[ulen] >= '0' && s[ulen] <= '9')) ulen++;
    if (ulen == 0) return dur_error(err, errlen, "missing unit in duration", orig);
    uint64_t unit = 0;
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
      if (strlen(units[i].name) == ulen && memcmp(units[i].name, s, ulen) == 0) {
        unit = units[i].ns;
        break;
      }
    }
    if (unit == 0) {
      if (err && errlen) snprintf(err, errlen, "time: unknown unit \"%.*s\" in duration \"%s\"", (int)ulen, s, orig);
      return -1;
    }
    s += ulen;

    if (v > MAX_MAG / unit) return dur_error(err, errlen, "invalid duration", orig);
    v *= unit;
    if (f > 0) {
      v += (uint64_t)((double)f * ((double)unit / scale));
      if (v > MAX_MAG) return dur_error(err, errlen, "invalid duration", orig);
    }
    d += v;
    if (d > MAX_MAG) return dur_error(err, errlen, "invalid duration", orig);
  }
  if (neg) {
    *out = d == MAX_MAG ? INT64_MIN : -(int64_t)d;
    return 0;
  }
  if (d > MAX_MAG - 1) return dur_error(err, errlen, "invalid duration", orig);
  *out = (int64_t)d;
  return 0;
}

/* Writes v/10^prec's fractional digits (without trailing zeros, with the
 * decimal point when any digit is printed) right-aligned ending before
 * buf[w]; returns the new start and stores v/10^prec in *rest. */
static size_t fmt_frac(char *buf, size_t w, uint64_t v, int prec, uint64_t *rest) {
  bool print = false;
  for (int i = 0; i < prec; i++) {
    uint64_t digit = v % 10;
    print = print || digit != 0;
    if (print) buf[--w] = (char)('0' + digit);
    v /= 10;
  }
  if (print) buf[--w] = '.';
  *rest = v;
  return w;
}

static size_t fmt_int(char *buf, size_t w, uint64_t v) {
  if (v == 0) {
    buf[--w] = '0';
    return w;
  }
  while (v > 0) {
    buf[--w] = (char)('0' + v % 10);
    v /= 10;
  }
  return w;
}

char *go_format_duration(int64_t ns, char *out) {
  char buf[GO_DURATION_BUFSZ];
  size_t w = sizeof buf;
  bool neg = ns < 0;
  uint64_t u = neg ? (uint64_t)0 - (uint64_t)ns : (uint64_t)ns;

  buf[--w] = '\0';
  if (u < NS_PER_S) {
    int prec;
    buf[--w] = 's';
    if (u == 0) {
      buf[--w] = '0';
      memmove(out, buf + w, sizeof buf - w);
      return out;
    } else if (u < NS_PER_US) {
      prec = 0;
      buf[--w] = 'n';
    } else if (u < NS_PER_MS) {
      prec = 3;
      buf[--w] = '\xb5'; /* "µ", U+00B5 in UTF-8 */
      buf[--w] = '\xc2';
    } else {
      prec = 6;
      buf[--w] = 'm';
    }
    w = fmt_frac(buf, w, u, prec, &u);
    w = fmt_int(buf, w, u);
  } else {
    buf[--w] = 's';
    w = fmt_frac(buf, w, u, 9, &u);
    w = fmt_int(buf, w, u % 60);
    u /= 60;
    if (u > 0) {
      buf[--w] = 'm';
      w = fmt_int(buf, w, u % 60);
      u /= 60;
      if (u > 0) {
        buf[--w] = 'h';
        w = fmt_int(buf, w, u);
      }
    }
  }
  if (neg) buf[--w] = '-';
  memmove(out, buf + w, sizeof buf - w);
  return out;
}

int go_parse_bool(const char *s, bool *out) {
  static const char *const yes[] = {"1", "t", "T", "TRUE", "true", "True"};
  static const char *const no[] = {"0", "f", "F", "FALSE", "false", "False"};
  for (size_t i = 0; i < sizeof yes / sizeof yes[0]; i++) {
    if (strcmp(s, yes[i]) == 0) {
      *out = true;
      return 0;
    }
    if (strcmp(s, no[i]) == 0) {
      *out = false;
      return 0;
    }
  }
  return -1;
}
