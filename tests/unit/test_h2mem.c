/* Unit tests: h2mem, the page-slot allocator behind every nghttp2 session.
 * Includes the .c to reach the slot classes (their limits, their ranges). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "h2mem.c"

static size_t page_size(void) { return (size_t)sysconf(_SC_PAGESIZE); }

/* Pages of [p, p + len) that are resident. */
static size_t resident_pages(const void *p, size_t len) {
  size_t n = (len + page_size() - 1) / page_size(), i, r = 0;
  unsigned char *vec = calloc(n, 1);
  assert_int_equal(mincore((void *)p, n * page_size(), vec), 0);
  for (i = 0; i < n; i++) r += vec[i] & 1;
  free(vec);
  return r;
}

static int teardown(void **state) {
  (void)state;
  fs_h2mem_global_free();
  return 0;
}

static void big_block_costs_only_the_pages_written(void **state) {
  nghttp2_mem *m = fs_h2mem();
  uint8_t *p = m->malloc(16394, m->mem_user_data);
  (void)state;
  assert_non_null(p);
  assert_ptr_equal(owner_of(p), &g_big);
  assert_int_equal(resident_pages(p, 16394), 0);
  memset(p, 0xab, 100);
  assert_int_equal(resident_pages(p, 16394), 1);
  memset(p + 16394 - 10, 0xcd, 10); /* the last bytes asked for are usable */
  assert_int_equal(resident_pages(p, 16394), 2);
  assert_int_equal(fs_h2mem_resident_bytes(), 2 * (long)page_size());
  m->free(p, m->mem_user_data);
  assert_int_equal(resident_pages(p, 16394), 0);
  assert_int_equal(fs_h2mem_resident_bytes(), 0);
}

static void freed_slot_comes_back_zeroed(void **state) {
  nghttp2_mem *m = fs_h2mem();
  uint8_t *p = m->malloc(5000, m->mem_user_data), *q, zero[5000] = {0};
  (void)state;
  memset(p, 0x5a, 5000);
  m->free(p, m->mem_user_data);
  q = m->calloc(1, 5000, m->mem_user_data);
  assert_ptr_equal(q, p); /* the freed slot is reused first */
  assert_memory_equal(q, zero, sizeof(zero));
  m->free(q, m->mem_user_data);
}

static void small_blocks_stay_with_malloc(void **state) {
  nghttp2_mem *m = fs_h2mem();
  void *p = m->malloc(FS_H2MEM_MIN - 1, m->mem_user_data), *q = m->malloc(FS_H2MEM_MIN, m->mem_user_data);
  (void)state;
  assert_null(owner_of(p));
  assert_ptr_equal(owner_of(q), &g_small);
  m->free(p, m->mem_user_data);
  m->free(q, m->mem_user_data);
  m->free(NULL, m->mem_user_data);
}

static void realloc_keeps_the_bytes(void **state) {
  nghttp2_mem *m = fs_h2mem();
  uint8_t *p = m->malloc(4096, m->mem_user_data), *q, *r;
  size_t i;
  (void)state;
  for (i = 0; i < 4096; i++) p[i] = (uint8_t)(i * 13);
  q = m->realloc(p, 3000, m->mem_user_data);
  assert_ptr_equal(q, p); /* shrinking inside the slot moves nothing */
  r = m->realloc(q, 20000, m->mem_user_data);
  assert_ptr_equal(owner_of(r), &g_big);
  for (i = 0; i < 4096; i++) assert_int_equal(r[i], (uint8_t)(i * 13));
  assert_int_equal(g_small.in_use, 0);
  r = m->realloc(r, 100000, m->mem_user_data); /* beyond a big slot: malloc */
  assert_null(owner_of(r));
  for (i = 0; i < 4096; i++) assert_int_equal(r[i], (uint8_t)(i * 13));
  assert_int_equal(g_big.in_use, 0);
  m->free(r, m->mem_user_data);
}

static void realloc_of_null_allocates_from_slots(void **state) {
  nghttp2_mem *m = fs_h2mem();
  void *p = m->realloc(NULL, 16394, m->mem_user_data);
  (void)state;
  assert_ptr_equal(owner_of(p), &g_big);
  m->free(p, m->mem_user_data);
}

static void exhausted_range_falls_back_to_malloc(void **state) {
  nghttp2_mem *m;
  void *p[4];
  fs_h2mem_stats st;
  int i;
  (void)state;
  fs_h2mem_global_free();
  g_reserved = 1;
  assert_int_equal(class_reserve(&g_big, page_size() * FS_H2MEM_BIG_PAGES, 3), 0);
  m = fs_h2mem();
  for (i = 0; i < 4; i++) {
    p[i] = m->malloc(16394, m->mem_user_data);
    assert_non_null(p[i]);
    memset(p[i], i, 16394);
  }
  assert_ptr_equal(owner_of(p[2]), &g_big);
  assert_null(owner_of(p[3]));
  fs_h2mem_get_stats(&st);
  assert_int_equal(st.slots_in_use, 3);
  assert_int_equal(st.fallback_allocs, 1);
  for (i = 0; i < 4; i++) m->free(p[i], m->mem_user_data);
  fs_h2mem_get_stats(&st);
  assert_int_equal(st.slots_in_use, 0);
}

static ssize_t discard_send(nghttp2_session *s, const uint8_t *d, size_t n, int f, void *u) {
  (void)s, (void)d, (void)f, (void)u;
  return (ssize_t)n;
}

/* Whether this kernel gives a page that is only read a page of its own.
 * Linux normally maps its shared zero page, which RSS does not count; some
 * kernels do not (a PVM guest booted with pvm_no_zero_page=1, where the
 * read pages show in Rss, Anonymous and Private_Dirty, each with its own
 * frame).  Probed on one fresh private anonymous page, read once and never
 * written, between two PROT_NONE pages so that its VMA merges with no
 * other. */
static int kernel_backs_reads_with_own_pages(void) {
  size_t pg = page_size();
  uint8_t *p = mmap(NULL, 3 * pg, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  slot_class probe;
  volatile uint8_t sink;
  FILE *f;
  long rss;
  assert_true(p != MAP_FAILED);
  assert_int_equal(mprotect(p + pg, pg, PROT_READ | PROT_WRITE), 0);
  sink = p[pg];
  (void)sink;
  memset(&probe, 0, sizeof(probe));
  probe.base = p + pg;
  probe.slot_size = pg;
  probe.max_slots = 1;
  assert_non_null(f = fopen("/proc/self/smaps", "r"));
  rss = rss_in(f, &probe);
  fclose(f);
  munmap(p, 3 * pg);
  print_message("a page only read is %sresident on this kernel\n", rss > 0 ? "" : "not ");
  return rss > 0;
}

/* The reason the module exists: an idle server session (preface and SETTINGS
 * exchanged) keeps only the pages it touched resident, as RSS counts them
 * (with malloc: all 20 kB of its big blocks), and deleting it hands every
 * slot back.  It writes one page (the start of its 16 KiB frame buffer) and
 * reads one more (the 4 KiB stream table, looked up but empty): with the
 * zero page that is 1 page per session, without it 2.  A module that
 * dirtied whole slots would show 6. */
static void idle_nghttp2_session_keeps_only_pages_it_touched(void **state) {
  static const uint8_t preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
  nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 100},
                                 {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20}};
  nghttp2_session_callbacks *cbs;
  nghttp2_session *s[8];
  fs_h2mem_stats st;
  size_t per_session = kernel_backs_reads_with_own_pages() ? 2 : 1;
  int i;
  (void)state;
  assert_int_equal(nghttp2_session_callbacks_new(&cbs), 0);
  nghttp2_session_callbacks_set_send_callback(cbs, discard_send);
  for (i = 0; i < 8; i++) {
    assert_int_equal(nghttp2_session_server_new3(&s[i], cbs, NULL, NULL, fs_h2mem()), 0);
    assert_int_equal(nghttp2_submit_settings(s[i], NGHTTP2_FLAG_NONE, iv, 2), 0);
    assert_int_equal(nghttp2_session_mem_recv(s[i], preface, sizeof(preface) - 1), (ssize_t)sizeof(preface) - 1);
    assert_int_equal(nghttp2_session_send(s[i]), 0);
  }
  fs_h2mem_get_stats(&st);
  assert_true(g_big.in_use >= 8); /* the 16 KiB frame buffers */
  assert_int_equal(st.fallback_allocs, 0);
  assert_true(fs_h2mem_resident_bytes() >= 0);
  assert_true((size_t)fs_h2mem_resident_bytes() <= 8 * per_session * page_size());
  for (i = 0; i < 8; i++) nghttp2_session_del(s[i]);
  fs_h2mem_get_stats(&st);
  assert_int_equal(st.slots_in_use, 0);
  assert_int_equal(fs_h2mem_resident_bytes(), 0);
  nghttp2_session_callbacks_del(cbs);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_teardown(big_block_costs_only_the_pages_written, teardown),
      cmocka_unit_test_teardown(freed_slot_comes_back_zeroed, teardown),
      cmocka_unit_test_teardown(small_blocks_stay_with_malloc, teardown),
      cmocka_unit_test_teardown(realloc_keeps_the_bytes, teardown),
      cmocka_unit_test_teardown(realloc_of_null_allocates_from_slots, teardown),
      cmocka_unit_test_teardown(exhausted_range_falls_back_to_malloc, teardown),
      cmocka_unit_test_teardown(idle_nghttp2_session_keeps_only_pages_it_touched, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
