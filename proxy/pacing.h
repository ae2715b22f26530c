/*
 * pacing: how many bytes a connection may hold serialized ahead of its
 * socket, from the kernel's view of the TCP connection.
 *
 * Whatever is already serialized (TLS records in the output queue, unsent
 * bytes in the kernel's send buffer) goes out before anything nghttp2 writes
 * next: a PING ACK, a heartbeat's HEADERS, a small call's answer.  On
 * loopback or a LAN that queue drains in microseconds and large writes save
 * CPU, so it may be deep (FS_PACING_DEEP).  On a WAN link whose round trip
 * is long the same queue is seconds of delay, longer than a heartbeat's 5 s
 * deadline on a 1 Mbit/s edge uplink; there the owner keeps about one
 * congestion window in user space (at least one TLS record) and asks the
 * kernel to keep at most FS_PACING_NOTSENT unsent bytes (TCP_NOTSENT_LOWAT),
 * so nghttp2's own ordering (control frames and new streams' HEADERS before
 * queued DATA) decides what goes next.  Pure: the owner reads TCP_INFO.
 */
#ifndef FS_PACING_H
#define FS_PACING_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* Deep queue: loopback, LAN, or no TCP_INFO. */
#define FS_PACING_DEEP (256 * 1024)
/* At least one full TLS record and its overhead. */
#define FS_PACING_MIN (16 * 1024 + 64)
/* A round trip at or above this is a WAN link (smoothed RTT, µs). */
#define FS_PACING_WAN_RTT_US 10000u
/* How often a connection that is writing looks at TCP_INFO again. */
#define FS_PACING_RECHECK_MS 250
/* TCP_NOTSENT_LOWAT for WAN connections. */
#define FS_PACING_NOTSENT (16 * 1024)

/* The cap on bytes serialized ahead of the socket for a connection whose
 * smoothed round trip is |rtt_us| with a congestion window of |cwnd|
 * segments of |mss| bytes: FS_PACING_DEEP below FS_PACING_WAN_RTT_US (or
 * when |mss| or |cwnd| is 0: nothing known), else cwnd * mss clamped to
 * [FS_PACING_MIN, FS_PACING_DEEP]. */
size_t fs_pacing_cap(uint32_t rtt_us, uint32_t cwnd, uint32_t mss);

/* Nonzero when a connection to |peer| may be paced at all: not to a
 * loopback address (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104), whose smoothed
 * round trip delayed ACKs can push past FS_PACING_WAN_RTT_US while a
 * reader is slow, where pacing would only cost CPU. */
int fs_pacing_wanted(const struct sockaddr *peer);

/* Nonzero when a connection with round trip |rtt_us| is paced as a WAN link. */
int fs_pacing_is_wan(uint32_t rtt_us);

#endif
