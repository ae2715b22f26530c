/* Unit tests: h2conn's set-up contract (h2conn.h, fs_h2conn_init): an error
 * leaves nothing registered and fires no callback, so the caller's free()
 * right after it is correct; a success ends only through on_closing and
 * on_freed.  Includes the .c with uv_tcp_init() and uv_timer_init() replaced,
 * to make either fail on demand. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <uv.h>

static int fail_tcp_init, fail_timer_init;

static int shim_uv_tcp_init(uv_loop_t *loop, uv_tcp_t *h) {
  return fail_tcp_init ? UV_ENOMEM : uv_tcp_init(loop, h); /* libuv's own failure registers nothing either */
}

static int shim_uv_timer_init(uv_loop_t *loop, uv_timer_t *h) {
  return fail_timer_init ? UV_ENOMEM : uv_timer_init(loop, h);
}

#define uv_tcp_init   shim_uv_tcp_init
#define uv_timer_init shim_uv_timer_init
#include "h2conn.c"
#undef uv_tcp_init
#undef uv_timer_init

/* An owner like the proxy's: frees itself in on_freed, and after an error
 * from fs_h2conn_init() the caller frees it.  That free is only recorded
 * (the memory stays until the test ends), so a callback arriving after it is
 * reported as a failed assertion, not as a crash. */
typedef struct owner {
  fs_h2conn h2;
  int caller_freed; /* the caller freed it after fs_h2conn_init() failed */
  int closing_calls, freed_calls, freed_after_caller_free;
  char reason[160];
} owner;

static void o_closing(fs_h2conn *h, const char *reason) {
  owner *o = (owner *)h;
  o->closing_calls++;
  snprintf(o->reason, sizeof(o->reason), "%s", reason);
}

static void o_freed(fs_h2conn *h) {
  owner *o = (owner *)h;
  o->freed_calls++;
  if (o->caller_freed) o->freed_after_caller_free++;
}

static int o_ready(fs_h2conn *h) { return -1; }

static const fs_h2conn_ops ops = {.on_ready = o_ready, .on_closing = o_closing, .on_freed = o_freed};

static uv_loop_t loop;

static int setup(void **state) {
  (void)state;
  fail_tcp_init = fail_timer_init = 0;
  assert_int_equal(uv_loop_init(&loop), 0);
  assert_int_equal(fs_h2conn_global_init(&loop), 0);
  return 0;
}

static int teardown(void **state) {
  (void)state;
  fail_tcp_init = fail_timer_init = 0;
  fs_h2conn_global_close();
  assert_int_equal(uv_run(&loop, UV_RUN_DEFAULT), 0);
  /* Nothing of any connection is left registered with the loop. */
  assert_int_equal(uv_loop_close(&loop), 0);
  return 0;
}

/* A few iterations: flushes (prepare) and close callbacks run. */
static void spin(void) {
  int i;
  for (i = 0; i < 4; i++) uv_run(&loop, UV_RUN_NOWAIT);
}

/* What every caller does (proxy.c on_accept/up_connect_to, admin.c,
 * uphealth.c): init, and free at once on an error. */
static int caller_init(owner *o) {
  int rv = fs_h2conn_init(&o->h2, &loop, &ops);
  if (rv < 0) o->caller_freed = 1;
  return rv;
}

/* The TCP handle is set up, the timer is not.  Before, fs_h2conn_init()
 * returned the error after closing the TCP handle, whose close callback
 * then ran on_freed for an object the caller had already freed. */
static void timer_failure_never_calls_back_into_a_freed_object(void **state) {
  owner *o = calloc(1, sizeof(*o));
  int rv;
  (void)state;
  fail_timer_init = 1;
  rv = caller_init(o);
  spin();
  assert_int_equal(o->freed_after_caller_free, 0);
  if (rv < 0) {
    assert_int_equal(o->closing_calls, 0);
    assert_int_equal(o->freed_calls, 0);
  } else {
    /* Registered: it ended through the usual close, with a reason. */
    assert_int_equal(o->closing_calls, 1);
    assert_int_equal(o->freed_calls, 1);
    assert_non_null(strstr(o->reason, "cannot create a timer"));
  }
  free(o);
}

/* No callback runs inside fs_h2conn_init(), so the owner can link the
 * object first; fs_h2conn_set_timer() on the timerless connection does
 * nothing and fs_h2conn_start() closes it and says so. */
static void timer_failure_closes_in_start(void **state) {
  owner *o = calloc(1, sizeof(*o));
  (void)state;
  fail_timer_init = 1;
  assert_int_equal(caller_init(o), 0);
  assert_int_equal(o->closing_calls, 0);
  fs_h2conn_set_timer(&o->h2, 1000);
  assert_int_equal(fs_h2conn_start(&o->h2, NULL, 1, NULL, NULL), -1);
  assert_int_equal(o->closing_calls, 1);
  assert_non_null(strstr(o->reason, "cannot create a timer"));
  assert_int_equal(o->freed_calls, 0); /* after the close callbacks */
  spin();
  assert_int_equal(o->closing_calls, 1);
  assert_int_equal(o->freed_calls, 1);
  free(o);
}

/* The first handle fails: nothing registered, nothing fires, free() is
 * right (teardown's uv_loop_close() sees no handle left). */
static void tcp_failure_leaves_nothing(void **state) {
  owner *o = calloc(1, sizeof(*o));
  (void)state;
  fail_tcp_init = 1;
  assert_int_equal(caller_init(o), UV_ENOMEM);
  spin();
  assert_int_equal(o->closing_calls, 0);
  assert_int_equal(o->freed_calls, 0);
  free(o);
}

/* The ordinary life: init, close, on_closing once, on_freed once after both
 * handles' close callbacks. */
static void close_calls_back_once_each(void **state) {
  owner *o = calloc(1, sizeof(*o));
  (void)state;
  assert_int_equal(caller_init(o), 0);
  assert_int_equal(o->h2.open_handles, 2);
  fs_h2conn_set_timer(&o->h2, 60000);
  fs_h2conn_close(&o->h2, "done");
  fs_h2conn_close(&o->h2, "again"); /* idempotent */
  assert_int_equal(o->closing_calls, 1);
  assert_string_equal(o->reason, "done");
  assert_int_equal(o->freed_calls, 0);
  spin();
  assert_int_equal(o->freed_calls, 1);
  free(o);
}

/* fs_h2conn_close_soon: nothing now (the caller may be inside an nghttp2
 * callback), the close with its reason at the next flush, once. */
static void close_soon_closes_at_the_next_flush(void **state) {
  owner *o = calloc(1, sizeof(*o));
  (void)state;
  assert_int_equal(caller_init(o), 0);
  fs_h2conn_close_soon(&o->h2, "admin: cannot submit a response");
  fs_h2conn_close_soon(&o->h2, "second reason"); /* the first one stands */
  assert_int_equal(o->closing_calls, 0);
  assert_false(o->h2.closing);
  spin();
  assert_int_equal(o->closing_calls, 1);
  assert_string_equal(o->reason, "admin: cannot submit a response");
  assert_int_equal(o->freed_calls, 1);
  free(o);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(timer_failure_never_calls_back_into_a_freed_object, setup, teardown),
      cmocka_unit_test_setup_teardown(timer_failure_closes_in_start, setup, teardown),
      cmocka_unit_test_setup_teardown(tcp_failure_leaves_nothing, setup, teardown),
      cmocka_unit_test_setup_teardown(close_calls_back_once_each, setup, teardown),
      cmocka_unit_test_setup_teardown(close_soon_closes_at_the_next_flush, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
