/* health: see health.h. */
#include "health.h"

#include <string.h>

fs_health_status fs_health_eval(const fs_health_inputs *in, const char **reason) {
  if (in->draining) return *reason = "draining", FS_HEALTH_NOT_SERVING;
  if (!in->listening) return *reason = "Fleet listener not accepting", FS_HEALTH_NOT_SERVING;
  if (!in->upstream_up) return *reason = "upstream not connected", FS_HEALTH_NOT_SERVING;
  if (!in->upstream_healthy) return *reason = "SuperLink health not SERVING", FS_HEALTH_NOT_SERVING;
  *reason = "upstream connected";
  return FS_HEALTH_SERVING;
}

int fs_health_known_service(const char *name, size_t len) {
  return len == 0 || (len == 16 && memcmp(name, "flwr.proto.Fleet", 16) == 0);
}

const char *fs_health_status_name(fs_health_status s) {
  switch (s) {
  case FS_HEALTH_SERVING:
    return "SERVING";
  case FS_HEALTH_NOT_SERVING:
    return "NOT_SERVING";
  case FS_HEALTH_SERVICE_UNKNOWN:
    return "SERVICE_UNKNOWN";
  default:
    return "UNKNOWN";
  }
}
