/*
 * bufq: a byte queue made of fixed-size blocks, with a hard cap.
 *
 * Used for DATA waiting to be forwarded and for bytes waiting for a socket.
 * Blocks come from a process-wide free list (bounded), so steady-state
 * traffic does no malloc per frame.  An empty queue holds no memory, which
 * keeps idle connections small.
 */
#ifndef FS_BUFQ_H
#define FS_BUFQ_H

#include <stddef.h>
#include <stdint.h>

#define FS_BLOCK_SIZE (16384 - 32)

typedef struct fs_block {
  struct fs_block *next;
  uint32_t start, end; /* valid bytes are data[start, end) */
  uint8_t data[FS_BLOCK_SIZE];
} fs_block;

typedef struct fs_bufq {
  fs_block *head, *tail;
  size_t len; /* bytes queued */
  size_t cap; /* appends beyond this fail; 0 = no cap */
} fs_bufq;

void fs_bufq_init(fs_bufq *q, size_t cap);

/* Appends |n| bytes of |data| (copied).  Returns 0, or -1 when the cap would
 * be exceeded or a block cannot be allocated; then nothing is appended and
 * |q| is as it was (all or nothing). */
int fs_bufq_append(fs_bufq *q, const void *data, size_t n);

/* Copies up to |n| bytes from the front into |out| without removing them.
 * Returns the number copied. */
size_t fs_bufq_copy(const fs_bufq *q, void *out, size_t n);

/* Removes |n| bytes from the front; |n| above q->len removes everything.
 * Blocks emptied go back to the free list. */
void fs_bufq_drop(fs_bufq *q, size_t n);

/* Keeps the first |n| bytes and gives the blocks of the rest back; |n| at or
 * above q->len changes nothing.  The cap stays. */
void fs_bufq_keep(fs_bufq *q, size_t n);

/* Moves every byte of |front| ahead of |q|'s (no copy); |front| is left
 * empty.  A capped |q|'s cap grows by what was moved (an uncapped one stays
 * uncapped), so room for appends is unchanged. */
void fs_bufq_prepend(fs_bufq *q, fs_bufq *front);

/* Empties |q|: every block goes back to the free list (or to free() when
 * the list is full).  The cap stays. */
void fs_bufq_reset(fs_bufq *q);

/* Frees the blocks kept for reuse (at exit, so leak checkers stay quiet). */
void fs_bufq_global_free(void);

/* Blocks kept on the free list across all queues, at most. */
#define FS_BLOCK_FREELIST_MAX 512

#endif
