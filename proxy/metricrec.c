/* metricrec: see metricrec.h. */
#include "metricrec.h"

#include <math.h>
#include <string.h>

#include "fleet.h"

static double u64_double(uint64_t bits) {
  double d;
  memcpy(&d, &bits, sizeof(d));
  return d;
}

/* MetricRecordValue: the oneof's member. */
static void read_value(const uint8_t *p, const uint8_t *end, fs_mrec_item *it) {
  fs_pb_field f;
  int rv;
  it->kind = FS_MREC_OTHER;
  while ((rv = fs_pb_next(&p, end, &f)) == 1) {
    if (f.num == 1 && f.wire == 1) { /* double */
      double d = u64_double(f.value);
      it->kind = isfinite(d) ? FS_MREC_SCALAR : FS_MREC_OTHER;
      it->value = d;
    } else if (f.num == 2 && f.wire == 0) { /* sint64, zigzag */
      it->kind = FS_MREC_SCALAR;
      it->value = (double)(int64_t)((f.value >> 1) ^ (~(f.value & 1) + 1));
    } else if (f.num == 3 && f.wire == 0) { /* uint64 */
      it->kind = FS_MREC_SCALAR;
      it->value = (double)f.value;
    } else if (f.num >= 21 && f.num <= 23 && f.wire == 2) {
      it->kind = FS_MREC_LIST;
    } else {
      it->kind = FS_MREC_OTHER; /* a type MetricRecord does not have */
    }
  }
  if (rv < 0) it->kind = FS_MREC_OTHER;
}

int fs_mrec_parse(const uint8_t *body, size_t len, fs_mrec_item *items, size_t cap) {
  const uint8_t *p = body, *end = body + len;
  fs_pb_field f;
  int rv, n = 0;
  if (!body) return len ? -1 : 0;
  while ((rv = fs_pb_next(&p, end, &f)) == 1) {
    const uint8_t *q, *qe;
    fs_pb_field g;
    fs_mrec_item it;
    int has_key = 0, grv;
    if (f.num != 1) continue;
    if (f.wire != 2 || f.len != f.declared) return -1;
    memset(&it, 0, sizeof(it));
    it.kind = FS_MREC_OTHER;
    q = f.data, qe = f.data + f.len;
    while ((grv = fs_pb_next(&q, qe, &g)) == 1) {
      if (g.num == 1 && g.wire == 2) {
        it.key = (const char *)g.data;
        it.key_len = g.len;
        has_key = 1;
      } else if (g.num == 2 && g.wire == 2) {
        read_value(g.data, g.data + g.len, &it);
      }
    }
    if (grv < 0) return -1;
    if (!has_key) it.key = "", it.key_len = 0, it.kind = FS_MREC_OTHER;
    if ((size_t)n < cap) items[n] = it;
    if (n < INT32_MAX) n++;
  }
  return rv < 0 ? -1 : n;
}

int fs_mrec_weight(const fs_mrec_item *items, size_t n, double *w) {
  size_t i, kl = strlen(FS_MREC_WEIGHT_KEY);
  for (i = 0; i < n; i++)
    if (items[i].key_len == kl && !memcmp(items[i].key, FS_MREC_WEIGHT_KEY, kl)) {
      if (items[i].kind != FS_MREC_SCALAR || !(items[i].value >= 0)) return 0;
      *w = items[i].value;
      return 1;
    }
  return 0;
}

void fs_mrec_add(fs_mrec_stat *s, double value, int has_w, double w) {
  if (!s->count || value < s->min) s->min = value;
  if (!s->count || value > s->max) s->max = value;
  s->count++;
  s->sum += value;
  if (has_w) {
    s->weighted++;
    s->wsum += w * value;
    s->wtotal += w;
  }
}

double fs_mrec_mean(const fs_mrec_stat *s, int *weighted) {
  *weighted = 0;
  if (!s->count) return 0;
  if (s->weighted == s->count && s->wtotal > 0) {
    double m = s->wsum / s->wtotal;
    if (isfinite(m)) {
      *weighted = 1;
      return m;
    }
  }
  return s->sum / s->count;
}
