/* backoff: see backoff.h. */
#include "backoff.h"

void fs_backoff_init(fs_backoff *b, uint64_t initial_ms, uint64_t max_ms, uint64_t seed) {
  b->initial_ms = initial_ms;
  b->max_ms = max_ms < initial_ms ? initial_ms : max_ms;
  /* splitmix64: nearby seeds (pids, clocks) still give unrelated schedules. */
  seed += 0x9e3779b97f4a7c15ull;
  seed = (seed ^ (seed >> 30)) * 0xbf58476d1ce4e5b9ull;
  seed = (seed ^ (seed >> 27)) * 0x94d049bb133111ebull;
  seed ^= seed >> 31;
  b->rng = seed ? seed : 1;
  fs_backoff_reset(b);
}

void fs_backoff_reset(fs_backoff *b) {
  b->current_ms = (double)b->initial_ms;
  b->attempt = 0;
}

/* Uniform in [0, 1). */
static double uniform(fs_backoff *b) {
  uint64_t x = b->rng;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  b->rng = x;
  return (double)(x >> 11) / 9007199254740992.0;
}

uint64_t fs_backoff_next(fs_backoff *b) {
  double d;
  if (b->attempt++ == 0) return 0;
  d = b->current_ms * (1.0 - FS_BACKOFF_JITTER + 2.0 * FS_BACKOFF_JITTER * uniform(b));
  if (d > (double)b->max_ms) d = (double)b->max_ms;
  b->current_ms *= FS_BACKOFF_MULTIPLIER;
  if (b->current_ms > (double)b->max_ms) b->current_ms = (double)b->max_ms;
  return (uint64_t)(d + 0.5);
}
