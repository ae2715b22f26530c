/*
 * h2mem: the nghttp2_mem every HTTP/2 session uses, so that an idle
 * connection costs only the memory it has touched.
 *
 * nghttp2 allocates a 16 KiB frame buffer and a 4 KiB stream table for each
 * session up front.  From malloc those blocks are resident at once (they
 * reuse pages other connections dirtied); an idle connection only ever
 * writes its SETTINGS into the first page of one, and only reads the other
 * (stream lookups in the empty table).  Blocks of FS_H2MEM_MIN bytes or
 * more therefore come from slots of whole pages in one reserved address
 * range: a fresh slot is zero and not resident, pages become resident when
 * touched, and a freed slot gives its pages back to the kernel
 * (MADV_DONTNEED) before it is reused.
 *
 * "Touched" depends on the kernel.  Linux normally maps a page that is only
 * read to its shared zero page, which RSS does not count: an idle session
 * then costs 1 page of slots.  A kernel that does not (seen on a PVM guest
 * booted with pvm_no_zero_page=1: each read fault gets a frame of its own,
 * counted in Rss, Anonymous and Private_Dirty) charges the read stream
 * table page too: 2 pages.  This module cannot avoid that: nghttp2 reads
 * the table, and only a page nobody touches is free.  Transparent huge
 * pages play no part (the range is not madvised, so THP in "madvise" mode
 * leaves it alone).
 *
 * Bounds: the range holds FS_H2MEM_SMALL_SLOTS one-page slots and
 * FS_H2MEM_BIG_SLOTS slots of FS_H2MEM_BIG_PAGES pages; it is reserved without
 * access (no memory, no commit charge) and made writable 64 slots at a
 * time.  A request the slots cannot serve (too big, range exhausted, the
 * reservation refused) goes to malloc, so allocation never fails because of
 * this module.  Smaller blocks always go to malloc.
 *
 * Single-threaded, like the rest of the daemon.
 */
#ifndef FS_H2MEM_H
#define FS_H2MEM_H

#include <nghttp2/nghttp2.h>
#include <stddef.h>

/* Blocks from this size up come from page slots. */
#define FS_H2MEM_MIN 4096
/* Pages per big slot: room for nghttp2's 16 KiB + 10 byte frame buffer. */
#define FS_H2MEM_BIG_PAGES   5
#define FS_H2MEM_SMALL_SLOTS (1u << 20)
#define FS_H2MEM_BIG_SLOTS   (1u << 18)

/* The allocator to pass to nghttp2_session_{server,client}_new3().  Never
 * NULL; the first call reserves the address range. */
nghttp2_mem *fs_h2mem(void);

typedef struct fs_h2mem_stats {
  size_t slots_in_use;    /* blocks currently served from page slots */
  size_t fallback_allocs; /* big blocks that went to malloc instead */
} fs_h2mem_stats;

void fs_h2mem_get_stats(fs_h2mem_stats *out);

/* Bytes of the slot range that are resident, as the kernel counts RSS (the
 * Rss lines of /proc/self/smaps: pages only read count unless they map the
 * shared zero page, see above).  Returns -1 when smaps cannot be read.  For
 * tests and benches. */
long fs_h2mem_resident_bytes(void);

/* Returns the address range.  Call at exit, after every session using it
 * has been deleted. */
void fs_h2mem_global_free(void);

#endif
