/*
 * ratelimit: a token bucket (pure: the caller passes the clock).  Used
 * where a peer could make the sidecar do something without bound (write
 * log lines, for instance): |burst| at once, then |rate_per_s| per second;
 * what is refused is counted so it can be reported, never lost silently.
 */
#ifndef FS_RATELIMIT_H
#define FS_RATELIMIT_H

#include <stdint.h>

typedef struct fs_ratelimit {
  uint64_t milli_tokens; /* tokens x 1000 */
  uint64_t last_ms;      /* clock of the last refill */
  uint32_t rate_per_s, burst;
  uint64_t refused; /* since the last fs_ratelimit_refused_take() */
} fs_ratelimit;

/* A full bucket at |now_ms|.  |rate_per_s| and |burst| > 0. */
void fs_ratelimit_init(fs_ratelimit *r, uint32_t rate_per_s, uint32_t burst, uint64_t now_ms);

/* Takes one token at |now_ms| (a clock that never goes back).  Returns 1
 * when allowed, 0 when refused (counted). */
int fs_ratelimit_take(fs_ratelimit *r, uint64_t now_ms);

/* The number refused since the last call; resets it. */
uint64_t fs_ratelimit_refused_take(fs_ratelimit *r);

#endif
