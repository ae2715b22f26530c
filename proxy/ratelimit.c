/* ratelimit: see ratelimit.h. */
#include "ratelimit.h"

void fs_ratelimit_init(fs_ratelimit *r, uint32_t rate_per_s, uint32_t burst, uint64_t now_ms) {
  r->rate_per_s = rate_per_s;
  r->burst = burst;
  r->milli_tokens = (uint64_t)burst * 1000;
  r->last_ms = now_ms;
  r->refused = 0;
}

int fs_ratelimit_take(fs_ratelimit *r, uint64_t now_ms) {
  uint64_t cap = (uint64_t)r->burst * 1000;
  if (now_ms > r->last_ms) {
    uint64_t elapsed = now_ms - r->last_ms;
    /* rate tokens per 1000 ms = rate milli-tokens per ms; a long pause
     * simply fills the bucket (no overflow: capped first). */
    uint64_t add = elapsed >= cap ? cap : elapsed * r->rate_per_s;
    r->milli_tokens = r->milli_tokens + add > cap ? cap : r->milli_tokens + add;
    r->last_ms = now_ms;
  }
  if (r->milli_tokens >= 1000) {
    r->milli_tokens -= 1000;
    return 1;
  }
  r->refused++;
  return 0;
}

uint64_t fs_ratelimit_refused_take(fs_ratelimit *r) {
  uint64_t n = r->refused;
  r->refused = 0;
  return n;
}
