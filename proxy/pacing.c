/* pacing: see pacing.h. */
#include "pacing.h"

#include <netinet/in.h>
#include <string.h>

int fs_pacing_wanted(const struct sockaddr *peer) {
  if (peer->sa_family == AF_INET) {
    const struct sockaddr_in *a = (const struct sockaddr_in *)peer;
    return (ntohl(a->sin_addr.s_addr) >> 24) != 127;
  }
  if (peer->sa_family == AF_INET6) {
    const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)peer;
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (IN6_IS_ADDR_LOOPBACK(&a->sin6_addr)) return 0;
    if (!memcmp(a->sin6_addr.s6_addr, mapped, 12)) return a->sin6_addr.s6_addr[12] != 127;
    return 1;
  }
  return 0; /* not TCP over IP: nothing to pace */
}

int fs_pacing_is_wan(uint32_t rtt_us) { return rtt_us >= FS_PACING_WAN_RTT_US; }

size_t fs_pacing_cap(uint32_t rtt_us, uint32_t cwnd, uint32_t mss) {
  uint64_t window;
  if (!fs_pacing_is_wan(rtt_us) || cwnd == 0 || mss == 0) return FS_PACING_LAN;
  window = (uint64_t)cwnd * mss;
  if (window < FS_PACING_MIN) return FS_PACING_MIN;
  if (window > FS_PACING_LAN) return FS_PACING_LAN;
  return (size_t)window;
}
