/*
 * pacing: how many bytes a connection may hold serialized ahead of its
 * socket, from the kernel's view of the TCP connection.
 *
 * Whatever is already serialized (TLS records in the output queue, unsent
 * bytes in the kernel's send buffer) goes out before anything nghttp2 writes
 * next: a PING ACK, a heartbeat's HEADERS, a small call's answer.  To a
 * loopback peer that queue drains in microseconds and large writes save
 * CPU, so it may be deep (FS_PACING_DEEP).  Any other connection asks the
 * kernel to keep at most FS_PACING_NOTSENT unsent bytes (TCP_NOTSENT_LOWAT,
 * from the start) and queues at most FS_PACING_LAN in user space;
 * once its round trip is long (a WAN link, or a slow one whose queue has
 * filled) about one congestion window, at least one TLS record.  nghttp2's
 * own ordering (control frames and new streams' HEADERS before queued
 * DATA) then decides what goes next, and less of a heartbeat's 5 s deadline
 * is spent behind model data on a slow edge uplink (the link's own queue
 * and the bytes in flight still come first).  Pure: the owner reads the
 * peer's address and TCP_INFO.
 */
#ifndef FS_PACING_H
#define FS_PACING_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* Deep queue: loopback peers. */
#define FS_PACING_DEEP (256 * 1024)
/* Other peers while their round trip is short, or nothing is known. */
#define FS_PACING_LAN (64 * 1024)
/* At least one full TLS record and its overhead. */
#define FS_PACING_MIN (16 * 1024 + 64)
/* A round trip at or above this is a WAN link (smoothed RTT, µs). */
#define FS_PACING_WAN_RTT_US 10000u
/* How often a connection that is writing looks at TCP_INFO again. */
#define FS_PACING_RECHECK_MS 250
/* TCP_NOTSENT_LOWAT for connections to non-loopback peers. */
#define FS_PACING_NOTSENT (16 * 1024)

/* The cap on bytes serialized ahead of the socket of a connection to a
 * non-loopback peer whose smoothed round trip is |rtt_us| with a congestion
 * window of |cwnd| segments of |mss| bytes: FS_PACING_LAN below
 * FS_PACING_WAN_RTT_US (or when |mss| or |cwnd| is 0: nothing known), else
 * cwnd * mss clamped to [FS_PACING_MIN, FS_PACING_LAN]. */
size_t fs_pacing_cap(uint32_t rtt_us, uint32_t cwnd, uint32_t mss);

/* Nonzero when a connection to |peer| may be paced at all: not to a
 * loopback address (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104), whose smoothed
 * round trip delayed ACKs can push past FS_PACING_WAN_RTT_US while a
 * reader is slow, where pacing would only cost CPU. */
int fs_pacing_wanted(const struct sockaddr *peer);

/* Nonzero when a connection with round trip |rtt_us| is paced as a WAN link. */
int fs_pacing_is_wan(uint32_t rtt_us);

#endif
