/* hdrs: see hdrs.h. */
#include "hdrs.h"

#include <stdlib.h>
#include <string.h>

void fs_hdrs_clear(fs_hdrs *h) {
  uint32_t i;
  for (i = 0; i < h->n; i++) nghttp2_rcbuf_decref(h->v[i]);
  free(h->v);
  memset(h, 0, sizeof(*h));
}

int fs_hdrs_push(fs_hdrs *h, nghttp2_rcbuf *name, nghttp2_rcbuf *value, uint32_t limit) {
  size_t add = nghttp2_rcbuf_get_buf(name).len + nghttp2_rcbuf_get_buf(value).len + 32;
  if (h->bytes + add > limit || h->n >= 2 * FS_HDRS_MAX_FIELDS) return -1;
  if (h->n + 2 > h->cap) {
    uint32_t cap = h->cap ? h->cap * 2 : 16;
    nghttp2_rcbuf **v = realloc(h->v, cap * sizeof(*v));
    if (!v) return -1;
    h->v = v;
    h->cap = cap;
  }
  nghttp2_rcbuf_incref(name);
  nghttp2_rcbuf_incref(value);
  h->v[h->n++] = name;
  h->v[h->n++] = value;
  h->bytes += (uint32_t)add;
  return 0;
}

size_t fs_hdrs_nv(const fs_hdrs *h, nghttp2_nv *nv, const char *scheme) {
  uint32_t i;
  size_t n = 0;
  for (i = 0; i < h->n; i += 2) {
    nghttp2_vec name = nghttp2_rcbuf_get_buf(h->v[i]), value = nghttp2_rcbuf_get_buf(h->v[i + 1]);
    nv[n].name = name.base;
    nv[n].namelen = name.len;
    nv[n].value = value.base;
    nv[n].valuelen = value.len;
    if (scheme && name.len == 7 && !memcmp(name.base, ":scheme", 7)) {
      nv[n].value = (uint8_t *)scheme;
      nv[n].valuelen = strlen(scheme);
    }
    nv[n].flags = NGHTTP2_NV_FLAG_NONE;
    n++;
  }
  return n;
}

nghttp2_vec fs_hdrs_get(const fs_hdrs *h, const char *name) {
  uint32_t i;
  size_t nl = strlen(name);
  nghttp2_vec none = {NULL, 0};
  for (i = 0; i < h->n; i += 2) {
    nghttp2_vec k = nghttp2_rcbuf_get_buf(h->v[i]);
    if (k.len == nl && !memcmp(k.base, name, nl)) return nghttp2_rcbuf_get_buf(h->v[i + 1]);
  }
  return none;
}
