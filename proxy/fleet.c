/* fleet: see fleet.h. */
#include "fleet.h"

#include <string.h>

static const char *const names[FS_FLEET_METHODS] = {
    "other",
    "RegisterNode",
    "ActivateNode",
    "DeactivateNode",
    "UnregisterNode",
    "SendNodeHeartbeat",
    "PullMessages",
    "PushMessages",
    "GetRun",
    "GetFab",
    "PushObject",
    "PullObject",
    "ConfirmMessageReceived",
};

#define PREFIX     "/flwr.proto.Fleet/"
#define PREFIX_LEN (sizeof(PREFIX) - 1)

fs_fleet_method fs_fleet_method_of(const uint8_t *path, size_t len) {
  int m;
  if (len <= PREFIX_LEN || memcmp(path, PREFIX, PREFIX_LEN) != 0) return FS_FLEET_NONE;
  path += PREFIX_LEN;
  len -= PREFIX_LEN;
  for (m = 1; m < FS_FLEET_METHODS; m++)
    if (strlen(names[m]) == len && memcmp(names[m], path, len) == 0) return (fs_fleet_method)m;
  return FS_FLEET_NONE;
}

const char *fs_fleet_method_name(fs_fleet_method m) {
  return m > FS_FLEET_NONE && m < FS_FLEET_METHODS ? names[m] : names[0];
}

int fs_fleet_repeatable(fs_fleet_method m) {
  return m == FS_FLEET_GET_RUN || m == FS_FLEET_GET_FAB || m == FS_FLEET_PULL_OBJECT || m == FS_FLEET_PUSH_OBJECT;
}

static int varint(const uint8_t **p, const uint8_t *end, uint64_t *out) {
  uint64_t v = 0;
  int shift;
  for (shift = 0; shift < 64 && *p < end; shift += 7) {
    uint8_t b = *(*p)++;
    v |= (uint64_t)(b & 0x7f) << shift;
    if (!(b & 0x80)) {
      *out = v;
      return 0;
    }
  }
  return -1;
}

int fs_pb_next(const uint8_t **p, const uint8_t *end, fs_pb_field *f) {
  uint64_t key;
  if (*p >= end) return 0;
  if (varint(p, end, &key) < 0 || (key >> 3) == 0 || (key >> 3) > 0x1fffffff) return -1;
  memset(f, 0, sizeof(*f));
  f->num = (uint32_t)(key >> 3);
  f->wire = (uint8_t)(key & 7);
  switch (f->wire) {
  case 0:
    return varint(p, end, &f->value) < 0 ? -1 : 1;
  case 1:
  case 5: {
    size_t n = f->wire == 1 ? 8 : 4, i;
    if ((size_t)(end - *p) < n) return -1;
    for (i = 0; i < n; i++) f->value |= (uint64_t)(*p)[i] << (8 * i);
    *p += n;
    return 1;
  }
  case 2:
    if (varint(p, end, &f->declared) < 0) return -1;
    f->data = *p;
    f->len = (size_t)(end - *p) < f->declared ? (size_t)(end - *p) : (size_t)f->declared;
    *p += f->len;
    return 1;
  default:
    return -1;
  }
}

int fs_fleet_object_header(const uint8_t *data, size_t len, char *type, size_t typecap, uint64_t *body_len) {
  const uint8_t *nul = memchr(data, '\0', len < 65536 ? len : 65536), *sp, *last;
  size_t tl;
  uint64_t v = 0;
  if (!nul || !(sp = memchr(data, ' ', (size_t)(nul - data))) || sp == data) return -1;
  for (last = nul; last > sp && last[-1] != ' '; last--) {}
  if (last == nul || last == sp + 0) return -1;
  for (const uint8_t *q = last; q < nul; q++) {
    if (*q < '0' || *q > '9' || v > (UINT64_MAX - 9) / 10) return -1;
    v = v * 10 + (uint64_t)(*q - '0');
  }
  tl = (size_t)(sp - data);
  if (tl >= typecap) tl = typecap - 1;
  memcpy(type, data, tl);
  type[tl] = '\0';
  *body_len = v;
  return (int)(nul - data) + 1;
}
