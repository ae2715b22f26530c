/*
 * backoff: reconnect delays after gRPC's connection-backoff document.
 *
 * After a drop: one immediate attempt, then delays starting at |initial|,
 * each x1.6, jittered by +-20%, never above |max|.  Reset when a connection
 * is established (its SETTINGS arrived).  Pure: the caller supplies the seed
 * so the schedule is reproducible in tests.
 */
#ifndef FS_BACKOFF_H
#define FS_BACKOFF_H

#include <stdint.h>

#define FS_BACKOFF_MULTIPLIER 1.6
#define FS_BACKOFF_JITTER     0.2

typedef struct fs_backoff {
  uint64_t initial_ms, max_ms;
  double current_ms; /* the un-jittered delay the next wait is based on */
  uint32_t attempt;  /* attempts made since the last reset */
  uint64_t rng;      /* xorshift64 state */
} fs_backoff;

void fs_backoff_init(fs_backoff *b, uint64_t initial_ms, uint64_t max_ms, uint64_t seed);

/* Returns the delay in ms before the next attempt and advances the
 * schedule: 0 for the first attempt after a reset. */
uint64_t fs_backoff_next(fs_backoff *b);

void fs_backoff_reset(fs_backoff *b);

#endif
