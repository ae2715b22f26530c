/*
 * flower-sidecar: entry point.  Parses the configuration (exit 2 on a bad
 * value), sets up logging and TLS for the role, runs the proxy on one libuv
 * loop, and drains on SIGTERM/SIGINT (exit 0).
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include <uv.h>

#include "admin.h"
#include "uphealth.h"
#include "bufq.h"
#include "config.h"
#include "fedstate.h"
#include "h2conn.h"
#include "h2mem.h"
#include "log.h"
#include "observe.h"
#include "onegate.h"
#include "proxy.h"
#include "sdnotify.h"
#include "tls.h"

static fs_config cfg;
static uv_signal_t sig_term, sig_int, sig_hup;
static uv_timer_t fed_tick;

static void on_fed_tick(uv_timer_t *t) { fs_fed_tick(uv_now(t->loop)); }

static void on_onegate_closed(void) { fs_h2conn_global_close(); }

static void on_admin_closed(void) {
  uv_close((uv_handle_t *)&fed_tick, NULL);
  uv_close((uv_handle_t *)&sig_term, NULL);
  uv_close((uv_handle_t *)&sig_int, NULL);
  uv_close((uv_handle_t *)&sig_hup, NULL);
  fs_tls_lifecycle_stop();
  fs_sdnotify_close();
  fs_onegate_stop(on_onegate_closed); /* a FL_READY=NO in flight may finish first */
}

/* The admin port answers NOT_SERVING until the very end of the drain. */
static void on_stopped(void) {
  fs_uphealth_stop();
  fs_admin_stop(on_admin_closed);
}

static void on_signal(uv_signal_t *h, int signum) {
  fs_event ev;
  (void)h;
  if (fs_proxy_draining()) return;
  if (fs_ev_begin(&ev, FS_LOG_INFO, "sidecar.drain")) {
    fs_ev_str(&ev, "signal", signum == SIGTERM ? "SIGTERM" : "SIGINT");
    fs_ev_num(&ev, "drain_timeout_s", cfg.drain_timeout_s, 1);
    fs_ev_end(&ev);
  }
  fs_sdnotify_stopping();
  fs_onegate_drain();
  fs_proxy_drain();
}

/* systemd's ExecReload= sends SIGHUP: certificates and keys are re-read
 * (tls.h; event cert.reload).  Other settings apply at start. */
static void on_hup(uv_signal_t *h, int signum) {
  fs_event ev;
  (void)h, (void)signum;
  if (fs_ev_begin(&ev, FS_LOG_INFO, "sidecar.reload")) {
    fs_ev_str(&ev, "signal", "SIGHUP");
    fs_ev_str(&ev, "reloads",
              cfg.tls ? "certificates and keys (cert.reload follows)"
                      : "nothing: TLS is off; other settings apply at start");
    fs_ev_end(&ev);
  }
  fs_tls_reload();
}

static void on_health_change(const char *verdict, const char *reason) {
  fs_sdnotify_status(verdict, reason);
  fs_onegate_update();
}

static int fatal(const char *what) {
  fs_event ev;
  if (fs_ev_begin(&ev, FS_LOG_ERROR, "sidecar.fail")) {
    fs_ev_str(&ev, "reason", what);
    fs_ev_end(&ev);
  }
  fprintf(stderr, "flower-sidecar: %s\n", what);
  return 1;
}

int main(int argc, char **argv) {
  char err[512] = "";
  int rc, log_fd = 1;
  SSL_CTX *down_ctx = NULL, *up_ctx = NULL;
  uv_loop_t *loop = uv_default_loop();
  fs_event ev;

  rc = fs_config_parse(&cfg, argc, argv, err, sizeof(err));
  if (rc > 0) return 0;
  if (rc < 0) {
    fprintf(stderr, "flower-sidecar: %s\n", err);
    return 2;
  }
  if (cfg.log_file && (log_fd = open(cfg.log_file, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644)) < 0) {
    fprintf(stderr, "flower-sidecar: invalid --log-file: '%s' (%s)\n", cfg.log_file, strerror(errno));
    return 2;
  }
  fs_log_init(cfg.log_format, cfg.log_level, cfg.role_name, log_fd);
  signal(SIGPIPE, SIG_IGN);
  {
    /* Every SuperNode holds a connection: use all descriptors allowed. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
      rl.rlim_cur = rl.rlim_max;
      setrlimit(RLIMIT_NOFILE, &rl);
    }
  }

  if (cfg.role == FS_ROLE_LINK && cfg.tls) down_ctx = fs_tls_server_ctx(&cfg, err, sizeof(err));
  if (cfg.role == FS_ROLE_NODE && cfg.tls) up_ctx = fs_tls_client_ctx(&cfg, err, sizeof(err));
  if (cfg.tls && !down_ctx && !up_ctx) {
    /* Bad certificate settings are configuration errors: exit 2. */
    fatal(err);
    return 2;
  }

  if (fs_ev_begin(&ev, FS_LOG_INFO, "sidecar.start")) {
    fs_ev_str(&ev, "version", fs_version);
    fs_ev_str(&ev, "listen", cfg.listen);
    fs_ev_str(&ev, "upstream", cfg.upstream[0] ? cfg.upstream : "(OneGate discovery)");
    fs_ev_str(&ev, "admin", cfg.admin);
    fs_ev_str(&ev, "onegate", cfg.onegate == FS_ONEGATE_ON ? cfg.onegate_endpoint : "off");
    fs_ev_str(&ev, "tls", cfg.tls ? (cfg.role == FS_ROLE_LINK ? "listener" : "upstream") : "off");
    fs_ev_u64(&ev, "pid", (uint64_t)getpid());
    fs_ev_end(&ev);
  }
  if (uv_signal_init(loop, &sig_term) < 0 || uv_signal_init(loop, &sig_int) < 0 || uv_signal_init(loop, &sig_hup) < 0 ||
      uv_signal_start(&sig_term, on_signal, SIGTERM) < 0 || uv_signal_start(&sig_int, on_signal, SIGINT) < 0 ||
      uv_signal_start(&sig_hup, on_hup, SIGHUP) < 0)
    return fatal("cannot install the signal handlers");
  if (fs_sdnotify_init(loop) < 0) return fatal("cannot start the systemd watchdog timer");

  if (fs_h2conn_global_init(loop) < 0) return fatal("cannot start the event loop");
  fs_fed_reset();
  fs_obs_set_clock(fs_now_ms);
  if (uv_timer_init(loop, &fed_tick) < 0 || uv_timer_start(&fed_tick, on_fed_tick, 1000, 1000) < 0)
    return fatal("cannot start the federation timer");
  /* The proxy first (it only starts connecting), so the admin port's first
   * verdict already names the real reason. */
  if (fs_proxy_start(loop, &cfg, down_ctx, up_ctx, on_stopped, err, sizeof(err)) < 0) return fatal(err);
  if (fs_tls_lifecycle_start(loop, fs_proxy_set_tls, fs_proxy_draining) < 0)
    return fatal("cannot start the certificate renewal timer");
  if (cfg.upstream_health[0] && fs_uphealth_start(loop, cfg.upstream_health, fs_admin_update, err, sizeof(err)) < 0)
    return fatal(err);
  if (fs_admin_start(loop, &cfg, err, sizeof(err)) < 0) return fatal(err);
  fs_proxy_on_state_change(fs_admin_update);
  fs_admin_on_change(on_health_change);
  if (fs_onegate_start(loop, &cfg, fs_proxy_retarget, err, sizeof(err)) < 0) return fatal(err);
  {
    char why[600];
    const char *verdict = fs_admin_verdict(why, sizeof(why));
    fs_sdnotify_ready(verdict, why);
  }
  uv_run(loop, UV_RUN_DEFAULT);
  fs_bufq_global_free();
  fs_h2mem_global_free();
  fs_fed_reset();
  if (fs_ev_begin(&ev, FS_LOG_INFO, "sidecar.stop")) {
    fs_ev_u64(&ev, "dropped_lines", fs_log_dropped());
    fs_ev_u64(&ev, "suppressed_lines", fs_log_suppressed());
    fs_ev_end(&ev);
  }
  uv_loop_close(loop);
  return 0;
}
