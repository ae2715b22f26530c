/* Unit tests: a call's legs and flow (call.c), included to reach its
 * statics; nghttp2_submit_trailer is replaced so a test can make it fail. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include <nghttp2/nghttp2.h>

static int trailer_rv;       /* what the replaced nghttp2_submit_trailer returns */
static size_t trailer_count; /* fields it was given */
static int shim_submit_trailer(nghttp2_session *s, int32_t sid, const nghttp2_nv *nv, size_t n) {
  (void)s, (void)sid, (void)nv;
  trailer_count = n;
  return trailer_rv;
}
#define nghttp2_submit_trailer shim_submit_trailer
#include "call.c"
#undef nghttp2_submit_trailer

static fs_config cfg;

static int setup(void **state) {
  (void)state;
  memset(&fs_env, 0, sizeof(fs_env));
  memset(&cfg, 0, sizeof(cfg));
  cfg.stream_window = 65535;
  cfg.max_message_size = 1u << 20;
  cfg.max_header_list_size = 16384;
  cfg.retry_buffer = 1024;
  fs_env.cfg = &cfg;
  fs_env.replay_max = 8 * 1024;
  trailer_rv = 0;
  trailer_count = 0;
  return 0;
}

/* A leg on a connection without a session: enough for the data provider. */
static fs_pconn *fake_conn(int side) {
  fs_pconn *pc = calloc(1, sizeof(*pc));
  fs_pconn_init(pc, side);
  fs_bufq_init(&pc->h2.outq, 1 << 20);
  pc->h2.outq_cap = 1 << 20;
  return pc;
}

static void free_conn(fs_pconn *pc) {
  fs_bufq_reset(&pc->h2.outq);
  free(pc);
}

/* The response's last bytes with trailers: EOF without END_STREAM, the
 * trailers end the stream. */
static void provider_ends_with_trailers(void **state) {
  fs_pconn *d = fake_conn(FS_DOWN);
  fs_call *c = fs_call_new();
  uint32_t flags = 0;
  (void)state;
  fs_call_attach(c, FS_DOWN, d, 1);
  assert_int_equal(fs_bufq_append(&c->fl[FS_UP].data, "hello", 5), 0);
  c->fl[FS_UP].eof = 1;
  c->synth = 1; /* our own trailers: grpc-status and grpc-message */
  c->synth_status = FS_GRPC_UNAVAILABLE;
  snprintf(c->synth_msg, sizeof(c->synth_msg), "down");
  assert_int_equal(read_down(NULL, 1, NULL, 16384, &flags, &(nghttp2_data_source){.ptr = c}, NULL), 5);
  assert_true(flags & NGHTTP2_DATA_FLAG_EOF);
  assert_true(flags & NGHTTP2_DATA_FLAG_NO_END_STREAM);
  assert_int_equal(trailer_count, 2);
  fs_call_detach(c, FS_DOWN);
  fs_call_maybe_free(c);
  free_conn(d);
}

/* The contract defect: if the trailers cannot be submitted, END_STREAM must
 * not be withheld, or the stream never ends.  Before, the provider set
 * NO_END_STREAM whatever nghttp2_submit_trailer returned and the client
 * waited forever; now the stream is reset (TEMPORAL_CALLBACK_FAILURE). */
static void provider_resets_when_trailers_fail(void **state) {
  fs_pconn *d = fake_conn(FS_DOWN);
  fs_call *c = fs_call_new();
  uint32_t flags = 0;
  (void)state;
  fs_call_attach(c, FS_DOWN, d, 1);
  assert_int_equal(fs_bufq_append(&c->fl[FS_UP].data, "hello", 5), 0);
  c->fl[FS_UP].eof = 1;
  c->synth = 1;
  trailer_rv = NGHTTP2_ERR_NOMEM;
  assert_int_equal(read_down(NULL, 1, NULL, 16384, &flags, &(nghttp2_data_source){.ptr = c}, NULL),
                   NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE);
  assert_false(flags & NGHTTP2_DATA_FLAG_NO_END_STREAM);
  fs_call_detach(c, FS_DOWN);
  fs_call_maybe_free(c);
  free_conn(d);
}

/* Nothing to send yet and no end: the provider defers and says so. */
static void provider_defers_until_data(void **state) {
  fs_pconn *u = fake_conn(FS_UP);
  fs_call *c = fs_call_new();
  uint32_t flags = 0;
  (void)state;
  fs_call_attach(c, FS_UP, u, 1);
  assert_int_equal(read_up(NULL, 1, NULL, 16384, &flags, &(nghttp2_data_source){.ptr = c}, NULL), NGHTTP2_ERR_DEFERRED);
  assert_true(c->fl[FS_DOWN].deferred);
  fs_call_detach(c, FS_UP);
  fs_call_maybe_free(c);
  free_conn(u);
}

/* Bytes sent upstream are kept for a repeat, counted against the process
 * cap, rewound ahead of what still waits, and released when the call can
 * no longer be repeated. */
static void replay_is_kept_rewound_and_released(void **state) {
  fs_pconn *u = fake_conn(FS_UP);
  fs_call *c = fs_call_new();
  nghttp2_frame frame;
  uint8_t hd[9] = {0};
  char out[64];
  (void)state;
  memset(&frame, 0, sizeof(frame));
  fs_call_attach(c, FS_UP, u, 1);
  assert_int_equal(fs_bufq_append(&c->fl[FS_DOWN].data, "abcdefgh", 8), 0);
  assert_int_equal(fs_call_send_data(c, FS_UP, u, &frame, hd, 5), 0);
  assert_int_equal(u->h2.outq.len, 9 + 5);
  assert_int_equal(c->replay.len, 5);
  assert_int_equal(fs_env.replay_total, 5);
  fs_call_replay_rewind(c);
  assert_int_equal(fs_env.replay_total, 0);
  assert_int_equal(c->fl[FS_DOWN].noack, 5); /* acknowledged the first time */
  assert_int_equal(fs_bufq_copy(&c->fl[FS_DOWN].data, out, sizeof(out)), 8);
  assert_memory_equal(out, "abcdefgh", 8);
  /* Past the per-call buffer: the call stops keeping and lets go. */
  fs_bufq_drop(&c->fl[FS_DOWN].data, 8);
  {
    static char big[2048];
    assert_int_equal(fs_bufq_append(&c->fl[FS_DOWN].data, big, sizeof(big)), 0);
    assert_int_equal(fs_call_send_data(c, FS_UP, u, &frame, hd, sizeof(big)), 0);
  }
  assert_false(c->replay_on);
  assert_int_equal(c->replay.len, 0);
  assert_int_equal(fs_env.replay_total, 0);
  fs_call_detach(c, FS_UP);
  fs_call_maybe_free(c);
  free_conn(u);
}

/* A discarded flow keeps only what a DATA frame was already promised. */
static void discard_keeps_only_promised_bytes(void **state) {
  fs_call *c = fs_call_new();
  (void)state;
  assert_int_equal(fs_bufq_append(&c->fl[FS_DOWN].data, "0123456789", 10), 0);
  c->fl[FS_DOWN].promised = 4;
  fs_call_discard(c, FS_DOWN);
  assert_true(c->fl[FS_DOWN].discard);
  assert_int_equal(c->fl[FS_DOWN].data.len, 4);
  fs_call_maybe_free(c);
}

/* A session call that must not fail closes the connection after its queued
 * bytes, once, saying what failed. */
static void broken_connection_closes_after_flush(void **state) {
  fs_pconn *d = fake_conn(FS_DOWN);
  (void)state;
  fs_pconn_broken(d, "resetting a stream", NGHTTP2_ERR_NOMEM);
  assert_true(d->h2.close_after_flush);
  assert_non_null(strstr(d->h2.close_reason, "resetting a stream failed: "));
  free_conn(d);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup(provider_ends_with_trailers, setup),
      cmocka_unit_test_setup(provider_resets_when_trailers_fail, setup),
      cmocka_unit_test_setup(provider_defers_until_data, setup),
      cmocka_unit_test_setup(replay_is_kept_rewound_and_released, setup),
      cmocka_unit_test_setup(discard_keeps_only_promised_bytes, setup),
      cmocka_unit_test_setup(broken_connection_closes_after_flush, setup),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
