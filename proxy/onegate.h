/*
 * onegate: the daemon's OneGate client (../shared/onegate.md), on the
 * libuv loop through libcurl's multi interface: never blocks the data
 * path, every request has a timeout, failures retry with the role's
 * backoff (x1.6, jitter), and nothing here changes health.
 *
 *   link: PUT /vm with FL_ENDPOINT, FL_ROLE=superlink, FL_CA_CERT (with
 *         TLS) and FL_READY (NO at start, YES once SERVING, NO again after
 *         --onegate-ready-grace of NOT_SERVING or when draining), again
 *         whenever a value changes.
 *   node: without --upstream, GET /service until the SuperLink's role has a
 *         ready VM, then points the upstream pool at its FL_ENDPOINT with
 *         its FL_CA_CERT (unless --tls-ca pins one); discovers again when
 *         that upstream stays unreachable for 3 attempts or fails TLS
 *         verification; publishes FL_NODE_READY=YES once up.
 *
 * The token (a secret) is read from --onegate-token-file and never logged.
 */
#ifndef FS_ONEGATE_H
#define FS_ONEGATE_H

#include <stdint.h>
#include <uv.h>

#include "config.h"

/* Retargets the upstream (node role): |endpoint| HOST:PORT and the CA as
 * base64 PEM (|ca_b64|, "" to keep the configured trust).  Returns 0 or -1
 * with a reason.  Set by main.c: the proxy owns the upstream. */
typedef int (*fs_onegate_retarget_fn)(const char *endpoint, const char *ca_b64, char *err, size_t errlen);

/* Starts the client when cfg->onegate is FS_ONEGATE_ON (else returns 0 and
 * does nothing).  Returns 0, or -1 with a reason (curl cannot start). */
int fs_onegate_start(uv_loop_t *loop, const fs_config *cfg, fs_onegate_retarget_fn retarget, char *err, size_t errlen);

/* The health verdict or upstream state changed: re-evaluates what to
 * publish (and, node, whether to discover again). */
void fs_onegate_update(void);

/* The daemon drains: publishes FL_READY=NO (link) / FL_NODE_READY=NO. */
void fs_onegate_drain(void);

/* Closes every handle; a request in flight is abandoned.  |on_closed|
 * runs once all are closed (at once when the client never started). */
void fs_onegate_stop(void (*on_closed)(void));

/* Nonzero while the node waits for its first discovery. */
int fs_onegate_discovering(void);

typedef struct fs_onegate_stats {
  uint64_t publish_ok, publish_failed, discover_ok, discover_failed;
} fs_onegate_stats;
const fs_onegate_stats *fs_onegate_get_stats(void);

#endif
