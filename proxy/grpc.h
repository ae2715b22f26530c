/*
 * grpc: the facts of gRPC over HTTP/2 that every part of the sidecar uses
 * (doc/PROTOCOL-HTTP2.md in github.com/grpc/grpc): status codes, the 5-byte message prefix,
 * the grpc-status, grpc-timeout and grpc-message header values, and the
 * header blocks the sidecar sends when it answers a call itself.
 *
 * Pure functions; nothing here allocates.
 */
#ifndef FS_GRPC_H
#define FS_GRPC_H

#include <nghttp2/nghttp2.h>
#include <stddef.h>
#include <stdint.h>

typedef enum fs_grpc_status {
  FS_GRPC_OK = 0,
  FS_GRPC_CANCELLED = 1,
  FS_GRPC_UNKNOWN = 2,
  FS_GRPC_INVALID_ARGUMENT = 3,
  FS_GRPC_DEADLINE_EXCEEDED = 4,
  FS_GRPC_NOT_FOUND = 5,
  FS_GRPC_ALREADY_EXISTS = 6,
  FS_GRPC_PERMISSION_DENIED = 7,
  FS_GRPC_RESOURCE_EXHAUSTED = 8,
  FS_GRPC_FAILED_PRECONDITION = 9,
  FS_GRPC_ABORTED = 10,
  FS_GRPC_OUT_OF_RANGE = 11,
  FS_GRPC_UNIMPLEMENTED = 12,
  FS_GRPC_INTERNAL = 13,
  FS_GRPC_UNAVAILABLE = 14,
  FS_GRPC_DATA_LOSS = 15,
  FS_GRPC_UNAUTHENTICATED = 16,
  FS_GRPC_NSTATUS = 17
} fs_grpc_status;

/* The canonical name ("UNAVAILABLE"), or "UNKNOWN" for a code outside 0..16. */
const char *fs_grpc_status_name(int code);

/* Parses a grpc-status value (decimal digits).  Returns the code, or
 * FS_GRPC_UNKNOWN when |v| is empty, not all digits, or above 16 (a peer's
 * nonsense is an unknown error, never OK). */
int fs_grpc_status_parse(const uint8_t *v, size_t len);

/* A message on the wire: 1 byte flags (bit 0: compressed), 4 bytes
 * big-endian length, the body. */
#define FS_GRPC_PREFIX_LEN 5

/* The body length announced by the prefix at |p| (FS_GRPC_PREFIX_LEN bytes). */
uint32_t fs_grpc_prefix_len(const uint8_t *p);

/* Writes a prefix for an uncompressed body of |len| bytes to |p|. */
void fs_grpc_prefix_put(uint8_t *p, uint32_t len);

/* Parses a grpc-timeout value (1-8 digits and a unit H M S m u n).
 * Returns 0 with *|ms| (rounded up to whole ms), or -1 when malformed. */
int fs_grpc_timeout_ms(const uint8_t *v, size_t len, uint64_t *ms);

/* Formats |ms| as a grpc-timeout value ("2500m", or whole seconds rounded
 * up when the milliseconds need more than 8 digits).  Returns the length,
 * or 0 when |cap| is too small (|out| is then left as it was). */
size_t fs_grpc_timeout_format(char *out, size_t cap, uint64_t ms);

/* Percent-encodes |msg| for grpc-message (bytes outside 0x20..0x7E and
 * '%').  Writes at most |cap| - 1 bytes and a NUL (|cap| > 0); a message
 * that does not fit is cut at a whole character.  Returns the length. */
size_t fs_grpc_message_encode(char *out, size_t cap, const char *msg);

/* A status the sidecar sends itself: as a Trailers-Only response (nothing
 * was sent on the stream yet: :status, content-type, grpc-status,
 * grpc-message) or as trailers after a response already started. */
typedef struct fs_grpc_reply {
  nghttp2_nv nv[4];
  size_t n;
  char status[4];
  char message[720];
} fs_grpc_reply;

/* Fills |r| for |status| and |msg| (plain text; encoded here).  With
 * |trailers_only|, r->nv is the whole response header block, else the
 * trailer block.  r->nv points into |r|: valid while |r| is. */
void fs_grpc_reply_init(fs_grpc_reply *r, fs_grpc_status status, const char *msg, int trailers_only);

#endif
