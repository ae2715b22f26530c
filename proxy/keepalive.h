/*
 * keepalive: when to PING the upstream and when to give up on it (gRFC A8,
 * client side), as a pure decision over the time of the last byte received
 * from the upstream and the clock.
 *
 * Any byte from the upstream proves it alive (a PING ACK, a WINDOW_UPDATE,
 * DATA), so a connection that is receiving is never pinged.  The PING goes
 * out |time_ms| after the last byte (not after the owner noticed it), so a
 * dead connection is known at most time_ms + timeout_ms after its last byte.
 * PINGs are sent only while calls are open: a stock gRPC server counts PINGs
 * on an idle connection as abuse (too_many_pings).
 */
#ifndef FS_KEEPALIVE_H
#define FS_KEEPALIVE_H

#include <stdint.h>

typedef struct fs_keepalive {
  uint64_t time_ms;    /* silence before a PING */
  uint64_t timeout_ms; /* wait for any byte after a PING */
  uint64_t last_rx_ms; /* when the last byte arrived (or watching began) */
  uint64_t ping_ms;    /* when the outstanding PING was sent; 0: none */
} fs_keepalive;

typedef enum {
  FS_KA_WAIT = 0, /* nothing to do: look again in *|next_ms| */
  FS_KA_PING,     /* send a PING now, look again in *|next_ms| */
  FS_KA_DEAD      /* no byte within timeout_ms of a PING: close the connection */
} fs_ka_action;

/* Starts watching a connection at |now_ms|. */
void fs_keepalive_init(fs_keepalive *k, uint64_t time_ms, uint64_t timeout_ms, uint64_t now_ms);

/* Decides at |now_ms|, given when the last byte from the upstream arrived
 * (|last_rx_ms|, on the same clock; older values than one seen before are
 * ignored) and whether calls are open.  Sets *|next_ms| (> 0) to the delay
 * before the next look, except for FS_KA_DEAD. */
fs_ka_action fs_keepalive_check(fs_keepalive *k, uint64_t now_ms, uint64_t last_rx_ms, int calls_open,
                                uint64_t *next_ms);

/* A call got no answer and nothing has arrived since it was sent: PING now
 * rather than time_ms after the last byte, so a link that died under a call
 * with a short deadline (a heartbeat) is known within timeout_ms.  Returns 1
 * when the owner must send a PING, 0 when one is already outstanding; sets
 * *|next_ms| (> 0) to the delay before the next look. */
int fs_keepalive_probe(fs_keepalive *k, uint64_t now_ms, uint64_t last_rx_ms, uint64_t *next_ms);

#endif
