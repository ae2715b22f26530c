/*
 * fleet: what the sidecar knows about Flower's Fleet API on the wire
 * (../shared/fleet-api.md): the methods and their side effects, a protobuf
 * field walker that works on a truncated prefix (for messages too large to
 * keep), and the header line of Flower's objects.  Pure functions.
 */
#ifndef FS_FLEET_H
#define FS_FLEET_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
  FS_FLEET_NONE = 0, /* not a Fleet method */
  FS_FLEET_REGISTER_NODE,
  FS_FLEET_ACTIVATE_NODE,
  FS_FLEET_DEACTIVATE_NODE,
  FS_FLEET_UNREGISTER_NODE,
  FS_FLEET_SEND_NODE_HEARTBEAT,
  FS_FLEET_PULL_MESSAGES,
  FS_FLEET_PUSH_MESSAGES,
  FS_FLEET_GET_RUN,
  FS_FLEET_GET_FAB,
  FS_FLEET_PUSH_OBJECT,
  FS_FLEET_PULL_OBJECT,
  FS_FLEET_CONFIRM_MESSAGE_RECEIVED,
  FS_FLEET_METHODS
} fs_fleet_method;

/* The method of a request :path ("/flwr.proto.Fleet/PullMessages"), or
 * FS_FLEET_NONE. */
fs_fleet_method fs_fleet_method_of(const uint8_t *path, size_t len);

/* "PullMessages" etc.; "other" for FS_FLEET_NONE. */
const char *fs_fleet_method_name(fs_fleet_method m);

/* Nonzero when repeating the call cannot change the SuperLink's state:
 * GetRun, GetFab, PullObject (no side effects) and PushObject
 * (content-addressed: same id, same bytes). */
int fs_fleet_repeatable(fs_fleet_method m);

/* One protobuf field. */
typedef struct fs_pb_field {
  uint32_t num;
  uint8_t wire;        /* 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32 */
  uint64_t value;      /* varint, fixed32 or fixed64 value */
  const uint8_t *data; /* length-delimited: the bytes available */
  size_t len;          /* bytes available at data */
  uint64_t declared;   /* length-delimited: the length the field declares */
} fs_pb_field;

/* Reads the field at |*p| (before |end|) and advances |*p|.  A
 * length-delimited field cut by |end| is returned with len < declared and
 * |*p| = end.  Returns 1 for a field, 0 at end, -1 when malformed (bad
 * varint, group wire types, field number 0). */
int fs_pb_next(const uint8_t **p, const uint8_t *end, fs_pb_field *f);

/* Parses a Flower object's header "<Type> <children> <body-length>\0".
 * Copies the type (NUL-terminated, cut to |typecap|) and returns the header
 * length including the NUL, or -1 when |data| does not start with one. */
int fs_fleet_object_header(const uint8_t *data, size_t len, char *type, size_t typecap, uint64_t *body_len);

#endif
