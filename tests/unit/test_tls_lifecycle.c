/* Unit tests: the CA change contract of tls.h.  A renewed CA reaches the
 * fs_tls_on_ca_change() callback before any context signed by it is handed
 * to the listener; the switch follows --tls-ca-switch-delay later or at
 * fs_tls_ca_published(); established references are managed by OpenSSL's
 * refcount (ASan checks nothing leaks). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "../../proxy/tls.c"

static struct {
  int installs, calls, installs_at_call;
  char *seen_ca, *current_at_call;
  SSL_CTX *installed;
} S;

static void install_cb(SSL_CTX *ctx) {
  S.installs++;
  SSL_CTX_free(S.installed); /* as the listener does: drops its reference to the old one */
  S.installed = ctx;
}

static int not_draining(void) { return 0; }

static void on_ca(const char *pem, void *arg) {
  assert_ptr_equal(arg, &S);
  S.calls++;
  S.installs_at_call = S.installs;
  free(S.seen_ca);
  S.seen_ca = strdup(pem);
  free(S.current_at_call);
  S.current_at_call = fs_tls_current_ca_pem();
}

static char *slurp(const char *path) {
  char *pem;
  size_t len;
  const char *src;
  char err[256];
  return fs_tls_read_pem(path, &pem, &len, &src, err, sizeof(err)) == 0 ? pem : NULL;
}

static void run_case(int published) {
  char dir[] = "/tmp/fs-tls-unit-XXXXXX", path[256];
  fs_config cfg;
  char err[512], *old_ca, *new_ca, *now_ca;
  SSL_CTX *ctx;
  uv_loop_t loop;
  int i;
  memset(&S, 0, sizeof(S));
  memset(&cfg, 0, sizeof(cfg));
  assert_non_null(mkdtemp(dir));
  cfg.role = FS_ROLE_LINK;
  cfg.tls = 1;
  cfg.tls_dir = dir;
  cfg.tls_ca_switch_delay_s = published ? 3600 : 0.05;
  fs_log_init(FS_LOG_JSON, FS_LOG_ERROR, "link", 1);
  assert_int_equal(uv_loop_init(&loop), 0);
  ctx = fs_tls_server_ctx(&cfg, err, sizeof(err));
  assert_non_null(ctx);
  S.installed = ctx;
  assert_int_equal(fs_tls_lifecycle_start(&loop, install_cb, not_draining), 0);
  fs_tls_on_ca_change(on_ca, &S);
  old_ca = fs_tls_current_ca_pem();
  assert_non_null(old_ca);

  /* The CA files disappear: SIGHUP makes a new CA and announces it. */
  snprintf(path, sizeof(path), "%s/ca.pem", dir);
  assert_int_equal(unlink(path), 0);
  fs_tls_reload();
  assert_int_equal(S.calls, 1);
  assert_int_equal(S.installs_at_call, 0); /* announced before anything signed by it is used */
  assert_string_equal(S.current_at_call, old_ca);
  new_ca = slurp(path);
  assert_non_null(new_ca);
  assert_string_equal(S.seen_ca, new_ca);
  assert_string_not_equal(new_ca, old_ca);
  assert_int_equal(S.installs, 0);

  /* A second SIGHUP while the switch is pending changes nothing. */
  fs_tls_reload();
  assert_int_equal(S.calls, 1);
  assert_int_equal(S.installs, 0);

  if (published) fs_tls_ca_published();
  else /* the switch timer, within 2 s */
    for (i = 0; i < 200 && S.installs == 0; i++) {
      usleep(10000);
      uv_run(&loop, UV_RUN_NOWAIT);
    }
  assert_int_equal(S.installs, 1);
  now_ca = fs_tls_current_ca_pem();
  assert_string_equal(now_ca, new_ca);

  /* Nothing due: SIGHUP installs the same CA again, no announcement. */
  fs_tls_reload();
  assert_int_equal(S.calls, 1);
  assert_int_equal(S.installs, 2);

  fs_tls_on_ca_change(NULL, NULL);
  fs_tls_lifecycle_stop();
  uv_run(&loop, UV_RUN_DEFAULT); /* the timers' close callbacks */
  assert_int_equal(uv_loop_close(&loop), 0);
  SSL_CTX_free(S.installed);
  free(S.seen_ca);
  free(S.current_at_call);
  free(old_ca);
  free(new_ca);
  free(now_ca);
  (void)!system((snprintf(path, sizeof(path), "rm -rf %s", dir), path));
}

static void ca_change_announced_then_switched_after_delay(void **state) {
  (void)state;
  run_case(0);
}

static void ca_change_switched_when_published(void **state) {
  (void)state;
  run_case(1);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(ca_change_announced_then_switched_after_delay),
      cmocka_unit_test(ca_change_switched_when_published),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
