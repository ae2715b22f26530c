/* sdnotify: see sdnotify.h. */
#include "sdnotify.h"

#include <stdio.h>
#include <string.h>
#include <systemd/sd-daemon.h>

#include "log.h"

static struct {
  uv_timer_t watchdog;
  int timer_live;
  uint64_t watchdog_ms;
  int ready;
  char last_status[512];
} S;

/* sd_notify's errors are not the daemon's: systemd may be gone while we
 * drain.  They are logged once, at debug. */
static void notify(const char *msg) {
  static int warned;
  int r = sd_notify(0, msg);
  fs_event ev;
  if (r >= 0 || warned) return;
  warned = 1;
  if (fs_ev_begin(&ev, FS_LOG_DEBUG, "sdnotify.error")) {
    fs_ev_str(&ev, "reason", strerror(-r));
    fs_ev_end(&ev);
  }
}

static void on_watchdog(uv_timer_t *t) {
  (void)t;
  notify("WATCHDOG=1");
}

int fs_sdnotify_init(uv_loop_t *loop) {
  uint64_t usec = 0;
  int r;
  if (sd_watchdog_enabled(0, &usec) <= 0 || usec == 0) return 0;
  r = uv_timer_init(loop, &S.watchdog);
  if (r < 0) return r;
  S.watchdog_ms = usec / 2000 ? usec / 2000 : 1;
  r = uv_timer_start(&S.watchdog, on_watchdog, S.watchdog_ms, S.watchdog_ms);
  if (r < 0) {
    uv_close((uv_handle_t *)&S.watchdog, NULL);
    S.watchdog_ms = 0;
    return r;
  }
  uv_unref((uv_handle_t *)&S.watchdog); /* the loop ends when the daemon's work does */
  S.timer_live = 1;
  return 0;
}

uint64_t fs_sdnotify_watchdog_ms(void) { return S.watchdog_ms; }

/* "STATUS=" text on one line: systemd shows it in `systemctl status`. */
static void format_status(char *out, size_t outlen, const char *verdict, const char *reason) {
  char *p;
  snprintf(out, outlen, "STATUS=%s%s%s", verdict, reason && *reason ? ": " : "", reason ? reason : "");
  for (p = out; *p; p++)
    if (*p == '\n' || *p == '\r') *p = ' ';
}

void fs_sdnotify_ready(const char *verdict, const char *reason) {
  char msg[sizeof(S.last_status) + 16];
  format_status(S.last_status, sizeof(S.last_status), verdict, reason);
  snprintf(msg, sizeof(msg), "READY=1\n%s", S.last_status);
  S.ready = 1;
  notify(msg);
}

void fs_sdnotify_status(const char *verdict, const char *reason) {
  char status[sizeof(S.last_status)];
  if (!S.ready) return; /* the first STATUS goes with READY=1 */
  format_status(status, sizeof(status), verdict, reason);
  if (!strcmp(status, S.last_status)) return;
  memcpy(S.last_status, status, sizeof(status));
  notify(status);
}

void fs_sdnotify_stopping(void) {
  snprintf(S.last_status, sizeof(S.last_status), "STATUS=draining");
  notify("STOPPING=1\nSTATUS=draining");
}

void fs_sdnotify_close(void) {
  if (!S.timer_live) return;
  S.timer_live = 0;
  uv_close((uv_handle_t *)&S.watchdog, NULL);
}
