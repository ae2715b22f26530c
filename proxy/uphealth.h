/*
 * uphealth: `--upstream-health ADDR` (link role): asks the SuperLink's own
 * grpc.health.v1 server (`flower-superlink --health-server-address`) every
 * 500 ms, over h2c, and remembers whether it answered SERVING.  The
 * sidecar's own health then requires it too.
 *
 * One connection, one Check in flight at a time; a Check still unanswered
 * 1 s after it was sent (seen at the next 500 ms tick) closes the
 * connection, which is reopened at the tick after.  A refused connection, a
 * timeout, a non-OK status or any other answer than SERVING counts as not
 * serving.
 */
#ifndef FS_UPHEALTH_H
#define FS_UPHEALTH_H

#include <uv.h>

/* Starts checking |addr| ("host:port", numeric host).  |on_change| runs
 * whenever the answer changes.  Returns 0, or -1 with a one-line reason in
 * |err|. */
int fs_uphealth_start(uv_loop_t *loop, const char *addr, void (*on_change)(void), char *err, size_t errlen);

/* Nonzero when not configured, or the last Check answered SERVING. */
int fs_uphealth_ok(void);

/* Why the last Check did not count as SERVING ("" when it did). */
const char *fs_uphealth_reason(void);

/* Closes the connection and the timer (shutdown). */
void fs_uphealth_stop(void);

#endif
