/* h2mem: see h2mem.h. */
#include "h2mem.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Slots made writable at a time: few mprotect calls, little commit charge. */
#define COMMIT_STEP 64

typedef struct slot_class {
  uint8_t *base;      /* reserved range, NULL when not reserved */
  size_t slot_size;   /* bytes, a multiple of the page size */
  size_t max_slots;   /* slots the range holds */
  size_t committed;   /* slots [0, committed) are read-write */
  size_t bumped;      /* slots [0, bumped) have been handed out at least once */
  uint32_t *free_idx; /* stack of free slot indexes below |bumped| */
  size_t nfree, free_cap;
  size_t in_use;
} slot_class;

static slot_class g_small, g_big;
static size_t g_fallback;
static int g_reserved;

static int class_reserve(slot_class *k, size_t slot_size, size_t max_slots) {
  void *p = mmap(NULL, slot_size * max_slots, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return -1;
  memset(k, 0, sizeof(*k));
  k->base = p;
  k->slot_size = slot_size;
  k->max_slots = max_slots;
  return 0;
}

static void reserve_once(void) {
  long page;
  if (g_reserved) return;
  g_reserved = 1;
  page = sysconf(_SC_PAGESIZE);
  if (page <= 0 || (size_t)page > FS_H2MEM_MIN) return; /* every request falls back to malloc */
  (void)class_reserve(&g_small, (size_t)page, FS_H2MEM_SMALL_SLOTS);
  (void)class_reserve(&g_big, (size_t)page * FS_H2MEM_BIG_PAGES, FS_H2MEM_BIG_SLOTS);
}

static int class_owns(const slot_class *k, const void *p) {
  const uint8_t *b = p;
  return k->base && b >= k->base && b < k->base + k->slot_size * k->max_slots;
}

/* Returns a zeroed, non-resident slot, or NULL when the class cannot serve. */
static void *class_take(slot_class *k) {
  size_t idx;
  if (!k->base) return NULL;
  if (k->nfree > 0) {
    idx = k->free_idx[--k->nfree];
  } else {
    if (k->bumped == k->max_slots) return NULL;
    if (k->bumped == k->committed) {
      size_t grow = k->max_slots - k->committed < COMMIT_STEP ? k->max_slots - k->committed : COMMIT_STEP;
      if (mprotect(k->base + k->committed * k->slot_size, grow * k->slot_size, PROT_READ | PROT_WRITE) != 0)
        return NULL;
      k->committed += grow;
    }
    /* The free stack can hold every slot handed out, so a free never has to
     * allocate (and so never fails). */
    if (k->bumped == k->free_cap) {
      size_t cap = k->free_cap ? k->free_cap * 2 : COMMIT_STEP;
      uint32_t *s = realloc(k->free_idx, cap * sizeof(*s));
      if (!s) return NULL;
      k->free_idx = s;
      k->free_cap = cap;
    }
    idx = k->bumped++;
  }
  k->in_use++;
  return k->base + idx * k->slot_size;
}

static void class_give_back(slot_class *k, void *p) {
  size_t idx = (size_t)((uint8_t *)p - k->base) / k->slot_size;
  /* Zero-filled on the next touch: the next user gets calloc semantics free,
   * and the pages stop counting now. */
  (void)madvise(k->base + idx * k->slot_size, k->slot_size, MADV_DONTNEED);
  k->free_idx[k->nfree++] = (uint32_t)idx;
  k->in_use--;
}

/* The range is reserved by fs_h2mem(), the only way to this allocator; an
 * unreserved class has slot_size 0 and serves nothing. */
static slot_class *class_for(size_t size) {
  if (size < FS_H2MEM_MIN) return NULL;
  if (size <= g_small.slot_size) return &g_small;
  if (size <= g_big.slot_size) return &g_big;
  return NULL;
}

static slot_class *owner_of(const void *p) {
  if (!p) return NULL;
  if (class_owns(&g_small, p)) return &g_small;
  if (class_owns(&g_big, p)) return &g_big;
  return NULL;
}

static void *big_alloc(size_t size, int zero) {
  slot_class *k = class_for(size);
  void *p = k ? class_take(k) : NULL;
  if (p) return p;
  if (size >= FS_H2MEM_MIN) g_fallback++;
  return zero ? calloc(1, size) : malloc(size);
}

static void *mem_malloc(size_t size, void *ud) {
  (void)ud;
  return big_alloc(size, 0);
}

static void mem_free(void *p, void *ud) {
  slot_class *k = owner_of(p);
  (void)ud;
  if (k) class_give_back(k, p);
  else free(p);
}

static void *mem_calloc(size_t n, size_t size, void *ud) {
  (void)ud;
  if (size && n > SIZE_MAX / size) return NULL;
  return big_alloc(n * size, 1);
}

static void *mem_realloc(void *p, size_t size, void *ud) {
  slot_class *k = owner_of(p);
  void *q;
  (void)ud;
  if (!p) return big_alloc(size, 0); /* nghttp2_buf_reserve() allocates this way */
  if (!k) return realloc(p, size);   /* a malloc block stays one */
  if (size <= k->slot_size) return p;
  if (!(q = big_alloc(size, 0))) return NULL;
  memcpy(q, p, k->slot_size);
  class_give_back(k, p);
  return q;
}

static nghttp2_mem g_mem = {NULL, mem_malloc, mem_free, mem_calloc, mem_realloc};

nghttp2_mem *fs_h2mem(void) {
  reserve_once();
  return &g_mem;
}

void fs_h2mem_get_stats(fs_h2mem_stats *out) {
  out->slots_in_use = g_small.in_use + g_big.in_use;
  out->fallback_allocs = g_fallback;
}

static long rss_in(FILE *f, const slot_class *k) {
  char line[512];
  unsigned long lo, hi, klo = (unsigned long)k->base, khi = klo + k->slot_size * k->max_slots;
  long kb, total = 0;
  int inside = 0;
  char perms[8];
  if (!k->base) return 0;
  rewind(f);
  while (fgets(line, sizeof(line), f)) {
    if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) == 3) inside = lo < khi && hi > klo;
    else if (inside && sscanf(line, "Rss: %ld kB", &kb) == 1) total += kb;
  }
  return total * 1024;
}

long fs_h2mem_resident_bytes(void) {
  FILE *f = fopen("/proc/self/smaps", "r");
  long r;
  if (!f) return -1;
  r = rss_in(f, &g_small) + rss_in(f, &g_big);
  fclose(f);
  return r;
}

static void class_release(slot_class *k) {
  if (k->base) munmap(k->base, k->slot_size * k->max_slots);
  free(k->free_idx);
  memset(k, 0, sizeof(*k));
}

void fs_h2mem_global_free(void) {
  class_release(&g_small);
  class_release(&g_big);
  g_reserved = 0;
  g_fallback = 0;
}
