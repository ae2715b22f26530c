/* net: see net.h. */
#include "net.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

#include "config.h"

int fs_net_listen(uv_loop_t *loop, uv_tcp_t *tcp, const char *addr, const char *default_host, const char *flag,
                  int backlog, uv_connection_cb on_conn, int *opened, char *err, size_t errlen) {
  char host[256];
  int port, rv;
  struct sockaddr_storage ss;
  *opened = 0;
  if (fs_hostport_split(addr, host, sizeof(host), &port) < 0) {
    snprintf(err, errlen, "invalid %s: '%s'", flag, addr);
    return -1;
  }
  if (!host[0]) snprintf(host, sizeof(host), "%s", default_host);
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)&ss) != 0 &&
      uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss) != 0) {
    snprintf(err, errlen, "invalid %s: '%s' (not a numeric IP address)", flag, addr);
    return -1;
  }
  if ((rv = uv_tcp_init(loop, tcp)) < 0) {
    snprintf(err, errlen, "cannot listen on %s %s: %s", flag, addr, uv_strerror(rv));
    return -1;
  }
  *opened = 1;
  if ((rv = uv_tcp_bind(tcp, (struct sockaddr *)&ss, 0)) < 0 ||
      (rv = uv_listen((uv_stream_t *)tcp, backlog, on_conn)) < 0) {
    snprintf(err, errlen, "cannot listen on %s %s: %s", flag, addr, uv_strerror(rv));
    return -1;
  }
  return 0;
}

void fs_net_peer_name(uv_tcp_t *t, char *out, size_t len) {
  struct sockaddr_storage ss;
  int sl = sizeof(ss);
  char host[INET6_ADDRSTRLEN] = "?";
  out[0] = '\0';
  if (uv_tcp_getpeername(t, (struct sockaddr *)&ss, &sl) < 0) return;
  if (ss.ss_family == AF_INET6) {
    if (uv_ip6_name((struct sockaddr_in6 *)&ss, host, sizeof(host)) != 0) snprintf(host, sizeof(host), "?");
    snprintf(out, len, "[%s]:%d", host, ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
  } else {
    if (uv_ip4_name((struct sockaddr_in *)&ss, host, sizeof(host)) != 0) snprintf(host, sizeof(host), "?");
    snprintf(out, len, "%s:%d", host, ntohs(((struct sockaddr_in *)&ss)->sin_port));
  }
}
