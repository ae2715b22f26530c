/*
 * net: the socket chores both listeners share (the Fleet port in
 * downstream.c, the admin port in admin.c): parsing HOST:PORT into an
 * address, binding and listening, naming a peer for events.
 */
#ifndef FS_NET_H
#define FS_NET_H

#include <stddef.h>
#include <uv.h>

/* Listens on |addr| ("HOST:PORT", "[v6]:PORT", ":PORT" = |default_host|)
 * with |tcp| on |loop|, calling |on_conn| for each connection.  |flag|
 * names the setting in messages ("--listen").  Returns 0, or -1 with a
 * one-line reason in |err|.  *|opened| says whether |tcp| was initialised
 * (then the caller must uv_close it, error or not). */
int fs_net_listen(uv_loop_t *loop, uv_tcp_t *tcp, const char *addr, const char *default_host, const char *flag,
                  int backlog, uv_connection_cb on_conn, int *opened, char *err, size_t errlen);

/* Writes "ip:port" or "[ip6]:port" of |t|'s peer to |out| ("" when
 * unknown). */
void fs_net_peer_name(uv_tcp_t *t, char *out, size_t len);

#endif
