/* grpc: see grpc.h. */
#include "grpc.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

static const char *const status_names[FS_GRPC_NSTATUS] = {
    "OK",        "CANCELLED",       "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS",  "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED",   "OUT_OF_RANGE",    "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
    "DATA_LOSS", "UNAUTHENTICATED",
};

const char *fs_grpc_status_name(int code) {
  return code >= 0 && code < FS_GRPC_NSTATUS ? status_names[code] : status_names[FS_GRPC_UNKNOWN];
}

int fs_grpc_status_parse(const uint8_t *v, size_t len) {
  int code = 0;
  size_t i;
  if (len == 0 || len > 2) return FS_GRPC_UNKNOWN;
  for (i = 0; i < len; i++) {
    if (v[i] < '0' || v[i] > '9') return FS_GRPC_UNKNOWN;
    code = code * 10 + (v[i] - '0');
  }
  return code < FS_GRPC_NSTATUS ? code : FS_GRPC_UNKNOWN;
}

uint32_t fs_grpc_prefix_len(const uint8_t *p) {
  return (uint32_t)p[1] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 8 | (uint32_t)p[4];
}

void fs_grpc_prefix_put(uint8_t *p, uint32_t len) {
  p[0] = 0;
  p[1] = (uint8_t)(len >> 24);
  p[2] = (uint8_t)(len >> 16);
  p[3] = (uint8_t)(len >> 8);
  p[4] = (uint8_t)len;
}

int fs_grpc_timeout_ms(const uint8_t *v, size_t len, uint64_t *ms) {
  uint64_t n = 0, per_unit_ns;
  size_t i;
  if (len < 2 || len > 9) return -1;
  for (i = 0; i + 1 < len; i++) {
    if (v[i] < '0' || v[i] > '9') return -1;
    n = n * 10 + (uint64_t)(v[i] - '0');
  }
  switch (v[len - 1]) {
  case 'H':
    per_unit_ns = 3600000000000ull;
    break;
  case 'M':
    per_unit_ns = 60000000000ull;
    break;
  case 'S':
    per_unit_ns = 1000000000ull;
    break;
  case 'm':
    per_unit_ns = 1000000ull;
    break;
  case 'u':
    per_unit_ns = 1000ull;
    break;
  case 'n':
    per_unit_ns = 1ull;
    break;
  default:
    return -1;
  }
  /* 8 digits of hours fit: 99999999 * 3.6e12 ns overflows, so work in ms. */
  if (per_unit_ns >= 1000000ull) *ms = n * (per_unit_ns / 1000000ull);
  else *ms = (n * per_unit_ns + 999999ull) / 1000000ull;
  return 0;
}

size_t fs_grpc_timeout_format(char *out, size_t cap, uint64_t ms) {
  char tmp[32];
  int n = ms <= 99999999u ? snprintf(tmp, sizeof(tmp), "%" PRIu64 "m", ms)
                          : snprintf(tmp, sizeof(tmp), "%" PRIu64 "S", ms / 1000 + (ms % 1000 != 0));
  /* The spec allows at most 8 digits; a deadline that long is no deadline. */
  if (n < 0 || n > 9 || (size_t)n >= cap) return 0;
  memcpy(out, tmp, (size_t)n + 1);
  return (size_t)n;
}

size_t fs_grpc_message_encode(char *out, size_t cap, const char *msg) {
  static const char hex[] = "0123456789ABCDEF";
  size_t o = 0;
  if (cap == 0) return 0;
  for (; *msg; msg++) {
    unsigned char c = (unsigned char)*msg;
    int escape = c < 0x20 || c > 0x7e || c == '%';
    if (o + (escape ? 3 : 1) >= cap) break;
    if (escape) {
      out[o++] = '%';
      out[o++] = hex[c >> 4];
      out[o++] = hex[c & 15];
    } else {
      out[o++] = (char)c;
    }
  }
  out[o] = '\0';
  return o;
}

static nghttp2_nv nv_of(const char *name, const char *value, size_t valuelen) {
  nghttp2_nv nv = {(uint8_t *)name, (uint8_t *)value, strlen(name), valuelen, NGHTTP2_NV_FLAG_NONE};
  return nv;
}

void fs_grpc_reply_init(fs_grpc_reply *r, fs_grpc_status status, const char *msg, int trailers_only) {
  int sl = snprintf(r->status, sizeof(r->status), "%d", (int)status);
  size_t ml = fs_grpc_message_encode(r->message, sizeof(r->message), msg ? msg : "");
  r->n = 0;
  if (trailers_only) {
    r->nv[r->n++] = nv_of(":status", "200", 3);
    r->nv[r->n++] = nv_of("content-type", "application/grpc", 16);
  }
  r->nv[r->n++] = nv_of("grpc-status", r->status, (size_t)sl);
  if (ml) r->nv[r->n++] = nv_of("grpc-message", r->message, ml);
}
