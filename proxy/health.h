/*
 * health: the verdict served by grpc.health.v1 and /healthz (README.md,
 * "Health, the admin port and `flower-probe`").  Pure: inputs in, status
 * and reason out.
 */
#ifndef FS_HEALTH_H
#define FS_HEALTH_H

#include <stddef.h>

/* grpc.health.v1.HealthCheckResponse.ServingStatus */
typedef enum {
  FS_HEALTH_UNKNOWN = 0,
  FS_HEALTH_SERVING = 1,
  FS_HEALTH_NOT_SERVING = 2,
  FS_HEALTH_SERVICE_UNKNOWN = 3
} fs_health_status;

typedef struct fs_health_inputs {
  int listening;        /* the Fleet listener accepts connections */
  int upstream_up;      /* an upstream HTTP/2 connection got its SETTINGS */
  int draining;         /* SIGTERM/SIGINT received */
  int upstream_healthy; /* --upstream-health answered SERVING (1 when not configured) */
} fs_health_inputs;

/* SERVING exactly when listening, upstream up (and healthy, when asked) and
 * not draining; otherwise
 * NOT_SERVING with |*reason| naming the first unmet condition (a static
 * string). */
fs_health_status fs_health_eval(const fs_health_inputs *in, const char **reason);

/* Nonzero for the service names the sidecar answers for: "" and
 * "flwr.proto.Fleet". */
int fs_health_known_service(const char *name, size_t len);

const char *fs_health_status_name(fs_health_status s);

#endif
