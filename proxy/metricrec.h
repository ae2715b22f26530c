/*
 * metricrec: the numbers in a Flower MetricRecord object's body and their
 * aggregate over the replies of a round, the way FedAvg aggregates them:
 * for each key the count, min, max and the mean weighted by the reply's
 * `num-examples` (README.md, "The federation view").  Pure functions, no
 * allocation.
 *
 * MetricRecord (protobuf): repeated Item items = 1; Item { string key = 1;
 * MetricRecordValue value = 2 }; MetricRecordValue { double = 1;
 * sint64 = 2; uint64 = 3; DoubleList = 21; SintList = 22; UintList = 23 }.
 */
#ifndef FS_METRICREC_H
#define FS_METRICREC_H

#include <stddef.h>
#include <stdint.h>

/* The key FedAvg weighs replies by. */
#define FS_MREC_WEIGHT_KEY "num-examples"
/* Items read from one record at most; more are counted as skipped. */
#define FS_MREC_MAX_ITEMS 64

typedef enum {
  FS_MREC_SCALAR = 0, /* a finite number: |value| */
  FS_MREC_LIST,       /* a list of numbers: not aggregated */
  FS_MREC_OTHER       /* no value, an unknown type, NaN or infinite */
} fs_mrec_kind;

typedef struct fs_mrec_item {
  const char *key; /* points into the body, not NUL-terminated */
  size_t key_len;
  fs_mrec_kind kind;
  double value;
} fs_mrec_item;

/* Reads up to |cap| items of the MetricRecord |body| into |items|.
 * Returns the number of items found (which may exceed |cap|: the rest were
 * not stored), or -1 when the body is not protobuf.  Never reads outside
 * |body|; keys point into it. */
int fs_mrec_parse(const uint8_t *body, size_t len, fs_mrec_item *items, size_t cap);

/* The reply's weight: the value of its scalar FS_MREC_WEIGHT_KEY item when
 * that is finite and >= 0.  Returns 1 and |*w|, or 0 (no usable weight). */
int fs_mrec_weight(const fs_mrec_item *items, size_t n, double *w);

/* One key's aggregate over a round's replies. */
typedef struct fs_mrec_stat {
  uint32_t count;    /* replies that had the key as a number */
  uint32_t weighted; /* of them, replies that also had a weight */
  double min, max;
  double sum;          /* of the values */
  double wsum, wtotal; /* sum of weight x value, sum of the weights */
} fs_mrec_stat;

/* Adds one reply's |value|; |has_w|: it had weight |w|. */
void fs_mrec_add(fs_mrec_stat *s, double value, int has_w, double w);

/* The mean: weighted by the weights when every reply counted had one and
 * their total is > 0 (then |*weighted| = 1), else the plain mean.  0 for
 * an empty aggregate. */
double fs_mrec_mean(const fs_mrec_stat *s, int *weighted);

#endif
