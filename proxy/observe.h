/*
 * observe: turns the Fleet API calls the sidecar carries into events
 * (README.md, "Events": node.*, message.*, run.fetch, fab.fetch, object.*).
 *
 * It reads the bytes exactly as they are forwarded and never changes them.
 * Every Fleet method is unary, so only the first gRPC message of each
 * direction is decoded; of it at most FS_OBS_PREFIX bytes are kept (an
 * object's content is counted, not copied).  A message it cannot decode
 * (corrupt, compressed, cut) gives at most a debug event.
 */
#ifndef FS_OBSERVE_H
#define FS_OBSERVE_H

#include <stddef.h>
#include <stdint.h>

#include "fleet.h"

#define FS_OBS_PREFIX (64 * 1024)

typedef struct fs_obs fs_obs;

/* Starts observing a call to |path|.  Returns NULL (and costs nothing more)
 * when |path| is not a Fleet method or memory is short.  |peer| is copied. */
fs_obs *fs_obs_start(const uint8_t *path, size_t len, const char *peer);

/* DATA of the request (|dir| 0) or the response (|dir| 1), as forwarded. */
void fs_obs_data(fs_obs *o, int dir, const uint8_t *p, size_t n);

/* The call ended with |grpc_status| (-1 when it was reset).  Emits the
 * call's events when the status is OK, then frees |o|. */
void fs_obs_finish(fs_obs *o, int grpc_status);

fs_fleet_method fs_obs_method(const fs_obs *o);

/* The node a call is about (its request's `Node node = 1` or `node_id`; for
 * RegisterNode and ActivateNode the id in the answer),
 * read from as much of it as was kept; 0 when unknown or |o| is NULL. */
uint64_t fs_obs_node_id(const fs_obs *o);

/* The clock fedstate is fed with (ms). */
void fs_obs_set_clock(uint64_t (*now_ms)(void));

#endif
