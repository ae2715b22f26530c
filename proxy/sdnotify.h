/*
 * sdnotify: tells systemd (Type=notify units) what the daemon is doing,
 * with libsystemd's sd_notify.  Without NOTIFY_SOCKET every call does
 * nothing, so the daemon behaves the same outside systemd.
 *
 *   READY=1      once the Fleet listener and the admin port are bound
 *   STATUS=...   the health verdict and its reason, whenever it changes
 *   STOPPING=1   when the drain starts
 *   WATCHDOG=1   every WatchdogSec/2, from a loop timer: a stuck loop
 *                stops them and systemd restarts the unit
 */
#ifndef FS_SDNOTIFY_H
#define FS_SDNOTIFY_H

#include <uv.h>

/* Starts the watchdog timer on |loop| when systemd asked for one
 * (WATCHDOG_USEC for this PID).  Returns 0, or a negative libuv/errno
 * value when the timer cannot start (nothing is left registered then). */
int fs_sdnotify_init(uv_loop_t *loop);

/* READY=1 with the first STATUS=. */
void fs_sdnotify_ready(const char *verdict, const char *reason);

/* STATUS=<verdict>: <reason>, when it differs from the last one sent. */
void fs_sdnotify_status(const char *verdict, const char *reason);

/* STOPPING=1 and a STATUS saying so. */
void fs_sdnotify_stopping(void);

/* Closes the watchdog timer, if any (safe to call more than once). */
void fs_sdnotify_close(void);

/* The watchdog interval in ms (0: none), for tests and the start event. */
uint64_t fs_sdnotify_watchdog_ms(void);

#endif
