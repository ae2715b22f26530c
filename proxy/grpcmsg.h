/*
 * grpcmsg: follows gRPC's length-prefixed messages (1 byte compressed flag,
 * 4 bytes big-endian length, body) across arbitrary DATA chunk boundaries.
 *
 * It never copies or changes the bytes: it reports where messages start and
 * end so the proxy can enforce the message size limit and observers can read
 * a bounded prefix of each message.
 */
#ifndef FS_GRPCMSG_H
#define FS_GRPCMSG_H

#include <stddef.h>
#include <stdint.h>

typedef struct fs_grpcmsg_cb {
  /* A message header was read.  Return nonzero to stop (the feed returns
   * FS_GRPCMSG_STOPPED). */
  int (*begin)(void *ud, uint8_t flags, uint32_t length);
  /* |n| body bytes of the current message. */
  void (*body)(void *ud, const uint8_t *p, size_t n);
  /* The current message is complete. */
  void (*end)(void *ud);
} fs_grpcmsg_cb;

typedef struct fs_grpcmsg {
  uint8_t hdr[5];
  uint8_t hdr_len;    /* header bytes collected so far */
  uint32_t remaining; /* body bytes still to come for the current message */
  uint32_t max_len;   /* larger messages are refused */
  uint64_t messages;  /* messages begun */
} fs_grpcmsg;

#define FS_GRPCMSG_TOO_BIG (-1)
#define FS_GRPCMSG_STOPPED (-2)

void fs_grpcmsg_init(fs_grpcmsg *m, uint32_t max_len);

/* Feeds |n| bytes.  |cb| may be NULL.  Returns 0, FS_GRPCMSG_TOO_BIG when a
 * header announces more than max_len (the splitter then refuses further
 * input with the same error), or FS_GRPCMSG_STOPPED. */
int fs_grpcmsg_feed(fs_grpcmsg *m, const uint8_t *p, size_t n, const fs_grpcmsg_cb *cb, void *ud);

/* Nonzero when the stream ended exactly on a message boundary. */
int fs_grpcmsg_at_boundary(const fs_grpcmsg *m);

#endif
