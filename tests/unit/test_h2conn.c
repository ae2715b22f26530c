/* Unit tests: h2conn's set-up contract (h2conn.h, fs_h2conn_init): an error
 * leaves nothing registered and fires no callback, so the caller's free()
 * right after it is correct; a success ends only through on_closing and
 * on_freed.  Includes the .c with uv_tcp_init() and uv_timer_init() replaced,
 * to make either fail on demand. */
#include <errno.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
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

/* --- read slices: one peer's burst does not hold the loop ------------------ */

typedef struct reader {
  owner o;
  size_t got;
  int signal_fd;          /* >= 0: the first read writes a byte to it */
  size_t got_at_signal;   /* what this one had read when it wrote that byte */
  struct reader *other;   /* the flooding connection, seen from the quiet one */
  size_t other_got_first; /* what |other| had read when this one first read */
  int got_any;
} reader;

static void r_raw(fs_h2conn *h, const uint8_t *data, size_t len) {
  reader *r = (reader *)h;
  (void)data;
  if (!r->got_any && r->other) r->other_got_first = r->other->got;
  r->got_any = 1;
  r->got += len;
  if (r->signal_fd >= 0) {
    assert_int_equal(send(r->signal_fd, "q", 1, 0), 1);
    r->signal_fd = -1;
    r->got_at_signal = r->got;
  }
}

static const fs_h2conn_ops raw_ops = {
    .on_ready = o_ready, .on_closing = o_closing, .on_freed = o_freed, .on_raw = r_raw};

/* A connected loopback TCP pair: |*client| a plain socket, |r| set up on the
 * accepted end, whose receive buffer is asked to be 4 MiB (the kernel caps
 * it at net.core.rmem_max, 2 x 208 KiB by default, unless we are root). */
static void tcp_pair(reader *r, int *client) {
  struct sockaddr_in a;
  socklen_t alen = sizeof(a);
  int l = socket(AF_INET, SOCK_STREAM, 0), s, big = 4 << 20;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  assert_true(l >= 0);
  if (setsockopt(l, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big)) < 0)
    assert_int_equal(setsockopt(l, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big)), 0);
  assert_int_equal(bind(l, (struct sockaddr *)&a, sizeof(a)), 0);
  assert_int_equal(listen(l, 1), 0);
  assert_int_equal(getsockname(l, (struct sockaddr *)&a, &alen), 0);
  *client = socket(AF_INET, SOCK_STREAM, 0);
  assert_int_equal(connect(*client, (struct sockaddr *)&a, sizeof(a)), 0);
  s = accept(l, NULL, NULL);
  assert_true(s >= 0);
  close(l);
  r->signal_fd = -1;
  assert_int_equal(fs_h2conn_init(&r->o.h2, &loop, &raw_ops), 0);
  assert_int_equal(uv_tcp_open(&r->o.h2.tcp, s), 0);
  assert_int_equal(fs_h2conn_start(&r->o.h2, NULL, 1, NULL, NULL), 0);
}

/* Writes until the socket buffers are full: what the peer has queued. */
static size_t fill(int fd) {
  static char chunk[65536];
  size_t total = 0;
  ssize_t n;
  memset(chunk, 'x', sizeof(chunk));
  while (total < 64u << 20 && (n = send(fd, chunk, sizeof(chunk), MSG_DONTWAIT)) > 0) total += (size_t)n;
  return total;
}

/* Bytes waiting in |r|'s receive queue. */
static size_t inq(reader *r) {
  uv_os_fd_t fd;
  int n = 0;
  assert_int_equal(uv_fileno((uv_handle_t *)&r->o.h2.tcp, &fd), 0);
  assert_int_equal(ioctl(fd, SIOCINQ, &n), 0);
  return (size_t)n;
}

/* One connection has a burst waiting; while its first read is processed,
 * another connection's byte arrives.  Before, libuv went on reading the
 * first (up to 32 x 64 KiB, the whole burst here) before polling again; now
 * the first stops at its slice, the second is read in the next pass, and the
 * first still gets all of its bytes, over several passes. */
static void a_burst_waits_its_turn(void **state) {
  reader *flood = calloc(1, sizeof(*flood)), *quiet = calloc(1, sizeof(*quiet));
  int cf, cq, i;
  size_t queued, waiting;
  (void)state;
  tcp_pair(flood, &cf);
  tcp_pair(quiet, &cq);
  quiet->other = flood;
  queued = fill(cf);
  waiting = inq(flood);
  /* the test means something only if the burst waiting is several slices */
  assert_true(waiting >= 3 * FS_READ_SLICE);
  flood->signal_fd = cq;
  for (i = 0; i < 100000 && (!quiet->got_any || flood->got < queued); i++) uv_run(&loop, UV_RUN_ONCE);
  assert_true(quiet->got_any);
  assert_int_equal(flood->got, queued);
  print_message("burst: %zu bytes queued, %zu waiting to be read; after the quiet connection's byte arrived the burst "
                "read %zu more before it (slice %d)\n",
                queued, waiting, quiet->other_got_first - flood->got_at_signal, FS_READ_SLICE);
  /* the rest of its slice in this pass, and a slice in the next if it is polled first */
  assert_true(quiet->other_got_first - flood->got_at_signal <= 2 * FS_READ_SLICE);
  fs_h2conn_close(&flood->o.h2, "done");
  fs_h2conn_close(&quiet->o.h2, "done");
  spin();
  assert_int_equal(flood->o.freed_calls, 1);
  assert_int_equal(quiet->o.freed_calls, 1);
  close(cf);
  close(cq);
  free(flood);
  free(quiet);
}

/* A connection closed while it waits for the next pass leaves the paused
 * list: the pass's end never touches it (ASan would see the freed memory).
 * The test's check handle, started after h2conn's, runs before it (libuv
 * runs check handles last started first) and closes the paused connection. */
static reader *g_victim;
static int g_closed_paused;

static void close_if_paused(uv_check_t *h) {
  (void)h;
  if (g_victim && !g_victim->o.h2.closing && fs_list_linked(&g_victim->o.h2.pnode)) {
    fs_h2conn_close(&g_victim->o.h2, "closed while paused");
    g_closed_paused = !fs_list_linked(&g_victim->o.h2.pnode);
  }
}

static void closed_while_paused(void **state) {
  reader *flood = calloc(1, sizeof(*flood));
  uv_check_t chk;
  int cf, i;
  (void)state;
  tcp_pair(flood, &cf);
  (void)fill(cf);
  g_victim = flood;
  g_closed_paused = 0;
  assert_int_equal(uv_check_init(&loop, &chk), 0);
  assert_int_equal(uv_check_start(&chk, close_if_paused), 0);
  for (i = 0; i < 1000 && !flood->o.h2.closing; i++) uv_run(&loop, UV_RUN_NOWAIT);
  uv_close((uv_handle_t *)&chk, NULL);
  spin();
  g_victim = NULL;
  close(cf);
  assert_int_equal(g_closed_paused, 1);
  assert_string_equal(flood->o.reason, "closed while paused");
  assert_int_equal(flood->o.freed_calls, 1);
  free(flood);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(timer_failure_never_calls_back_into_a_freed_object, setup, teardown),
      cmocka_unit_test_setup_teardown(timer_failure_closes_in_start, setup, teardown),
      cmocka_unit_test_setup_teardown(tcp_failure_leaves_nothing, setup, teardown),
      cmocka_unit_test_setup_teardown(close_calls_back_once_each, setup, teardown),
      cmocka_unit_test_setup_teardown(close_soon_closes_at_the_next_flush, setup, teardown),
      cmocka_unit_test_setup_teardown(a_burst_waits_its_turn, setup, teardown),
      cmocka_unit_test_setup_teardown(closed_while_paused, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
