/* grpcmsg: see grpcmsg.h. */
#include "grpcmsg.h"

#include "grpc.h"

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
    if (m->remaining == 0 && m->hdr_len < FS_GRPC_PREFIX_LEN) {
      m->hdr[m->hdr_len++] = *p++;
      n--;
      if (m->hdr_len < FS_GRPC_PREFIX_LEN) continue;
      m->remaining = fs_grpc_prefix_len(m->hdr);
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
