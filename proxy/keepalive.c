/* keepalive: see keepalive.h. */
#include "keepalive.h"

void fs_keepalive_init(fs_keepalive *k, uint64_t time_ms, uint64_t timeout_ms, uint64_t now_ms) {
  k->time_ms = time_ms ? time_ms : 1;
  k->timeout_ms = timeout_ms ? timeout_ms : 1;
  k->last_rx_ms = now_ms;
  k->ping_ms = 0;
}

/* Takes in the time of the last byte received.  A byte in the outstanding
 * PING's own millisecond or later answers it: a PING is sent only after
 * time_ms (>= 1) of silence or for a probe, so earlier bytes are older. */
static void note_rx(fs_keepalive *k, uint64_t last_rx_ms) {
  if (last_rx_ms > k->last_rx_ms) k->last_rx_ms = last_rx_ms;
  if (k->ping_ms && k->last_rx_ms >= k->ping_ms) k->ping_ms = 0;
}

int fs_keepalive_probe(fs_keepalive *k, uint64_t now, uint64_t last_rx_ms, uint64_t *next_ms) {
  note_rx(k, last_rx_ms);
  if (k->ping_ms) {
    *next_ms = k->ping_ms + k->timeout_ms > now ? k->ping_ms + k->timeout_ms - now : 1;
    return 0;
  }
  k->ping_ms = now ? now : 1;
  *next_ms = k->timeout_ms;
  return 1;
}

fs_ka_action fs_keepalive_check(fs_keepalive *k, uint64_t now, uint64_t last_rx_ms, int calls_open, uint64_t *next_ms) {
  note_rx(k, last_rx_ms);
  if (k->ping_ms) {
    if (now - k->ping_ms >= k->timeout_ms) return FS_KA_DEAD;
    *next_ms = k->ping_ms + k->timeout_ms - now;
    return FS_KA_WAIT;
  }
  if (now < k->last_rx_ms + k->time_ms) {
    *next_ms = k->last_rx_ms + k->time_ms - now;
    return FS_KA_WAIT;
  }
  if (!calls_open) { /* idle: a PING now would be abuse; look again later */
    *next_ms = k->time_ms;
    return FS_KA_WAIT;
  }
  k->ping_ms = now ? now : 1;
  *next_ms = k->timeout_ms;
  return FS_KA_PING;
}
