/* grpcmsg: see grpcmsg.h. */
#include "grpcmsg.h"

void fs_grpcmsg_init(fs_grpcmsg *m, uint32_t max_len) {
  m->hdr_len = 0;
  m->remaining = 0;
  m->max_len = max_len;
  m->messages = 0;
}

int fs_grpcmsg_at_boundary(const fs_grpcmsg *m) { return m->hdr_len == 0 && m->remaining == 0; }

int fs_grpcmsg_feed(fs_grpcmsg *m, const uint8_t *p, size_t n, const fs_grpcmsg_cb *cb, void *ud) {
  if (m->hdr_len == 0xff) return FS_GRPCMSG_TOO_BIG;
  while (n > 0) {
    if (m->remaining == 0 && m->hdr_len < 5) {
      m->hdr[m->hdr_len++] = *p++;
      n--;
      if (m->hdr_len < 5) continue;
      m->remaining = (uint32_t)m->hdr[1] << 24 | (uint32_t)m->hdr[2] << 16 | (uint32_t)m->hdr[3] << 8 | m->hdr[4];
      if (m->remaining > m->max_len) {
        m->hdr_len = 0xff;
        return FS_GRPCMSG_TOO_BIG;
      }
      m->messages++;
      if (cb && cb->begin && cb->begin(ud, m->hdr[0], m->remaining)) return FS_GRPCMSG_STOPPED;
      if (m->remaining == 0) {
        m->hdr_len = 0;
        if (cb && cb->end) cb->end(ud);
      }
      continue;
    }
    {
      size_t take = n < m->remaining ? n : m->remaining;
      if (cb && cb->body) cb->body(ud, p, take);
      p += take;
      n -= take;
      m->remaining -= (uint32_t)take;
      if (m->remaining == 0) {
        m->hdr_len = 0;
        if (cb && cb->end) cb->end(ud);
      }
    }
  }
  return 0;
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

uint64_t fs_grpc_hold_ms(uint64_t hold_ms, int has_deadline, uint64_t deadline_ms) {
  if (has_deadline) {
    uint64_t margin = deadline_ms / 10 < 200 ? deadline_ms / 10 : 200;
    if (deadline_ms - margin < hold_ms) hold_ms = deadline_ms - margin;
  }
  return hold_ms ? hold_ms : 1;
}
