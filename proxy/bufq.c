/* bufq: see bufq.h. */
#include "bufq.h"

#include <stdlib.h>
#include <string.h>

static fs_block *freelist;
static size_t nfree;

static fs_block *block_get(void) {
  fs_block *b = freelist;
  if (b) {
    freelist = b->next;
    nfree--;
  } else if (!(b = malloc(sizeof(*b)))) {
    return NULL;
  }
  b->next = NULL;
  b->start = b->end = 0;
  return b;
}

static void block_put(fs_block *b) {
  if (nfree >= FS_BLOCK_FREELIST_MAX) {
    free(b);
    return;
  }
  b->next = freelist;
  freelist = b;
  nfree++;
}

void fs_bufq_init(fs_bufq *q, size_t cap) {
  q->head = q->tail = NULL;
  q->len = 0;
  q->cap = cap;
}

int fs_bufq_append(fs_bufq *q, const void *data, size_t n) {
  const uint8_t *p = data;
  fs_block *old_tail = q->tail;
  uint32_t old_end = old_tail ? old_tail->end : 0;
  size_t old_len = q->len;
  /* Written so that |n| near SIZE_MAX cannot wrap the sum. */
  if (q->cap && (n > q->cap || q->len > q->cap - n)) return -1;
  while (n > 0) {
    size_t take;
    if (!q->tail || q->tail->end == FS_BLOCK_SIZE) {
      fs_block *b = block_get();
      if (!b) goto rollback;
      if (q->tail) q->tail->next = b;
      else q->head = b;
      q->tail = b;
    }
    take = FS_BLOCK_SIZE - q->tail->end;
    if (take > n) take = n;
    memcpy(q->tail->data + q->tail->end, p, take);
    q->tail->end += (uint32_t)take;
    q->len += take;
    p += take;
    n -= take;
  }
  return 0;

rollback : /* all or nothing: give back the blocks this call added */
{
  fs_block *b = old_tail ? old_tail->next : q->head;
  while (b) {
    fs_block *next = b->next;
    block_put(b);
    b = next;
  }
  if (old_tail) {
    old_tail->next = NULL;
    old_tail->end = old_end;
  } else {
    q->head = NULL;
  }
  q->tail = old_tail;
  q->len = old_len;
}
  return -1;
}

size_t fs_bufq_copy(const fs_bufq *q, void *out, size_t n) {
  uint8_t *o = out;
  size_t done = 0;
  const fs_block *b;
  for (b = q->head; b && done < n; b = b->next) {
    size_t avail = b->end - b->start;
    if (avail > n - done) avail = n - done;
    memcpy(o + done, b->data + b->start, avail);
    done += avail;
  }
  return done;
}

void fs_bufq_drop(fs_bufq *q, size_t n) {
  if (n > q->len) n = q->len;
  q->len -= n;
  while (n > 0 && q->head) {
    fs_block *b = q->head;
    size_t avail = b->end - b->start;
    if (n < avail) {
      b->start += (uint32_t)n;
      return;
    }
    n -= avail;
    q->head = b->next;
    if (!q->head) q->tail = NULL;
    block_put(b);
  }
  if (q->len == 0 && q->head) { /* an emptied tail block: give it back */
    fs_bufq_reset(q);
  }
}

void fs_bufq_keep(fs_bufq *q, size_t n) {
  fs_block *b = q->head, *rest;
  size_t seen = 0;
  if (n >= q->len) return;
  if (n == 0) {
    fs_bufq_reset(q);
    return;
  }
  while (seen + (b->end - b->start) < n) {
    seen += b->end - b->start;
    b = b->next;
  }
  b->end = b->start + (uint32_t)(n - seen);
  rest = b->next;
  b->next = NULL;
  q->tail = b;
  q->len = n;
  while (rest) {
    fs_block *next = rest->next;
    block_put(rest);
    rest = next;
  }
}

void fs_bufq_reset(fs_bufq *q) {
  fs_block *b = q->head;
  while (b) {
    fs_block *next = b->next;
    block_put(b);
    b = next;
  }
  q->head = q->tail = NULL;
  q->len = 0;
}

void fs_bufq_global_free(void) {
  while (freelist) {
    fs_block *b = freelist;
    freelist = b->next;
    free(b);
  }
  nfree = 0;
}

void fs_bufq_prepend(fs_bufq *q, fs_bufq *front) {
  if (!front->head) return;
  front->tail->next = q->head;
  if (!q->tail) q->tail = front->tail;
  q->head = front->head;
  q->len += front->len;
  if (q->cap) q->cap += front->len;
  front->head = front->tail = NULL;
  front->len = 0;
}
