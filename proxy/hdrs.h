/*
 * hdrs: one HTTP/2 header block kept as nghttp2's refcounted buffers (no
 * copy), bounded by the header list limit (RFC 7541 size) and a field
 * count, and turned back into nghttp2_nv entries to forward it.
 */
#ifndef FS_HDRS_H
#define FS_HDRS_H

#include <nghttp2/nghttp2.h>
#include <stdint.h>

/* Fields per header block, at most: bounds the nghttp2_nv arrays on the stack. */
#define FS_HDRS_MAX_FIELDS 256

typedef struct fs_hdrs {
  nghttp2_rcbuf **v; /* name, value, name, value, ... */
  uint32_t n, cap;   /* entries in v */
  uint32_t bytes;    /* RFC 7541 size: name + value + 32 per field */
} fs_hdrs;

/* Releases every field; |h| is then empty (a zeroed fs_hdrs is empty too). */
void fs_hdrs_clear(fs_hdrs *h);

/* Appends a field, taking a reference on |name| and |value|.  Returns 0, or
 * -1 (nothing appended) when the block would exceed |limit| bytes or
 * FS_HDRS_MAX_FIELDS fields, or memory ran out. */
int fs_hdrs_push(fs_hdrs *h, nghttp2_rcbuf *name, nghttp2_rcbuf *value, uint32_t limit);

/* Number of fields. */
static inline size_t fs_hdrs_count(const fs_hdrs *h) { return h->n / 2; }

/* Fills |nv| (room for fs_hdrs_count(h) entries) pointing into |h| (valid
 * while |h| is; nghttp2 copies on submit).  With |scheme|, :scheme is
 * rewritten to it (the upstream hop's).  Returns the number of entries. */
size_t fs_hdrs_nv(const fs_hdrs *h, nghttp2_nv *nv, const char *scheme);

/* The value of the first field named |name|, or a zero-length vector. */
nghttp2_vec fs_hdrs_get(const fs_hdrs *h, const char *name);

#endif
