/*
 * admin: the admin listener (--admin, default 127.0.0.1:9099): gRPC
 * grpc.health.v1.Health (Check, Watch) over h2c and HTTP/1.1 GET /healthz on
 * the same port.  The verdict is health.h's, from the proxy's state.
 */
#ifndef FS_ADMIN_H
#define FS_ADMIN_H

#include <uv.h>

#include "config.h"

/* Listens on cfg->admin.  Returns 0, or -1 with a one-line reason. */
int fs_admin_start(uv_loop_t *loop, const fs_config *cfg, char *err, size_t errlen);

/* Re-evaluates health; on a change logs health.change and notifies every
 * Watch stream at once.  Call whenever the proxy's state changes. */
void fs_admin_update(void);

/* Registers |cb|, called after each health change with the new verdict's
 * name ("SERVING", "NOT_SERVING") and its reason (valid during the call). */
void fs_admin_on_change(void (*cb)(const char *verdict, const char *reason));

/* The current verdict's name and reason, as on_change would give them;
 * |reason| gets at most |reasonlen| - 1 bytes. */
const char *fs_admin_verdict(char *reason, size_t reasonlen);

/* Closes the listener and every admin connection; |on_closed| runs when
 * all are freed. */
void fs_admin_stop(void (*on_closed)(void));

#endif
