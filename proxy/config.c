/* config: see config.h. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#ifndef FS_VERSION
#define FS_VERSION "unknown" /* the Makefile passes debian/changelog's */
#endif

const char fs_version[] = FS_VERSION;

enum {
  OPT_LISTEN = 256,
  OPT_UPSTREAM,
  OPT_ADMIN,
  OPT_TLS,
  OPT_NO_TLS,
  OPT_TLS_CA,
  OPT_TLS_CERT,
  OPT_TLS_KEY,
  OPT_TLS_DIR,
  OPT_TLS_REQUIRE_CLIENT_CERT,
  OPT_TLS_SAN,
  OPT_TLS_SERVER_NAME,
  OPT_TLS_CA_SWITCH_DELAY,
  OPT_LOG_FORMAT,
  OPT_LOG_LEVEL,
  OPT_LOG_FILE,
  OPT_METRICS,
  OPT_NO_METRICS,
  OPT_OBSERVE,
  OPT_NO_OBSERVE,
  OPT_KA_TIME,
  OPT_KA_TIMEOUT,
  OPT_BO_INITIAL,
  OPT_BO_MAX,
  OPT_CONNECT_TIMEOUT,
  OPT_PROBE_INTERVAL,
  OPT_PROBE_TIMEOUT,
  OPT_HANDSHAKE_TIMEOUT,
  OPT_IDLE_TIMEOUT,
  OPT_DRAIN_TIMEOUT,
  OPT_MAX_STREAMS,
  OPT_MAX_CALLS,
  OPT_MAX_BUFFER,
  OPT_MAX_HEADER_LIST,
  OPT_MAX_MESSAGE,
  OPT_STREAM_WINDOW,
  OPT_CONN_WINDOW,
  OPT_UPSTREAM_CONNS,
  OPT_MAX_CONNECTIONS,
  OPT_HOLD_TIMEOUT,
  OPT_RETRY_BUFFER,
  OPT_UPSTREAM_HEALTH,
  OPT_ONEGATE,
  OPT_ONEGATE_ENDPOINT,
  OPT_ONEGATE_VMID,
  OPT_ONEGATE_TOKEN_FILE,
  OPT_ONEGATE_ROLE,
  OPT_ADVERTISE,
  OPT_ONEGATE_READY_GRACE,
  OPT_ONEGATE_TIMEOUT,
  OPT_HELP,
  OPT_VERSION
};

static const struct option long_opts[] = {{"listen", required_argument, 0, OPT_LISTEN},
                                          {"upstream", required_argument, 0, OPT_UPSTREAM},
                                          {"admin", required_argument, 0, OPT_ADMIN},
                                          {"tls", no_argument, 0, OPT_TLS},
                                          {"no-tls", no_argument, 0, OPT_NO_TLS},
                                          {"tls-ca", required_argument, 0, OPT_TLS_CA},
                                          {"tls-cert", required_argument, 0, OPT_TLS_CERT},
                                          {"tls-key", required_argument, 0, OPT_TLS_KEY},
                                          {"tls-dir", required_argument, 0, OPT_TLS_DIR},
                                          {"tls-require-client-cert", no_argument, 0, OPT_TLS_REQUIRE_CLIENT_CERT},
                                          {"tls-san", required_argument, 0, OPT_TLS_SAN},
                                          {"tls-server-name", required_argument, 0, OPT_TLS_SERVER_NAME},
                                          {"tls-ca-switch-delay", required_argument, 0, OPT_TLS_CA_SWITCH_DELAY},
                                          {"log-format", required_argument, 0, OPT_LOG_FORMAT},
                                          {"log-level", required_argument, 0, OPT_LOG_LEVEL},
                                          {"log-file", required_argument, 0, OPT_LOG_FILE},
                                          {"metrics", no_argument, 0, OPT_METRICS},
                                          {"no-metrics", no_argument, 0, OPT_NO_METRICS},
                                          {"observe", no_argument, 0, OPT_OBSERVE},
                                          {"no-observe", no_argument, 0, OPT_NO_OBSERVE},
                                          {"keepalive-time", required_argument, 0, OPT_KA_TIME},
                                          {"keepalive-timeout", required_argument, 0, OPT_KA_TIMEOUT},
                                          {"backoff-initial", required_argument, 0, OPT_BO_INITIAL},
                                          {"backoff-max", required_argument, 0, OPT_BO_MAX},
                                          {"connect-timeout", required_argument, 0, OPT_CONNECT_TIMEOUT},
                                          {"probe-interval", required_argument, 0, OPT_PROBE_INTERVAL},
                                          {"probe-timeout", required_argument, 0, OPT_PROBE_TIMEOUT},
                                          {"tls-handshake-timeout", required_argument, 0, OPT_HANDSHAKE_TIMEOUT},
                                          {"idle-timeout", required_argument, 0, OPT_IDLE_TIMEOUT},
                                          {"drain-timeout", required_argument, 0, OPT_DRAIN_TIMEOUT},
                                          {"max-concurrent-streams", required_argument, 0, OPT_MAX_STREAMS},
                                          {"max-calls", required_argument, 0, OPT_MAX_CALLS},
                                          {"max-buffer", required_argument, 0, OPT_MAX_BUFFER},
                                          {"max-header-list-size", required_argument, 0, OPT_MAX_HEADER_LIST},
                                          {"max-message-size", required_argument, 0, OPT_MAX_MESSAGE},
                                          {"stream-window", required_argument, 0, OPT_STREAM_WINDOW},
                                          {"conn-window", required_argument, 0, OPT_CONN_WINDOW},
                                          {"upstream-conns", required_argument, 0, OPT_UPSTREAM_CONNS},
                                          {"max-connections", required_argument, 0, OPT_MAX_CONNECTIONS},
                                          {"hold-timeout", required_argument, 0, OPT_HOLD_TIMEOUT},
                                          {"upstream-health", required_argument, 0, OPT_UPSTREAM_HEALTH},
                                          {"retry-buffer", required_argument, 0, OPT_RETRY_BUFFER},
                                          {"onegate", required_argument, 0, OPT_ONEGATE},
                                          {"onegate-endpoint", required_argument, 0, OPT_ONEGATE_ENDPOINT},
                                          {"onegate-vmid", required_argument, 0, OPT_ONEGATE_VMID},
                                          {"onegate-token-file", required_argument, 0, OPT_ONEGATE_TOKEN_FILE},
                                          {"onegate-role", required_argument, 0, OPT_ONEGATE_ROLE},
                                          {"advertise", required_argument, 0, OPT_ADVERTISE},
                                          {"onegate-ready-grace", required_argument, 0, OPT_ONEGATE_READY_GRACE},
                                          {"onegate-timeout", required_argument, 0, OPT_ONEGATE_TIMEOUT},
                                          {"help", no_argument, 0, OPT_HELP},
                                          {"version", no_argument, 0, OPT_VERSION},
                                          {0, 0, 0, 0}};

void fs_config_usage(void) {
  fputs("usage: flower-sidecar link|node [flags]\n"
        "\n"
        "  link   beside the SuperLink: TLS on --listen, h2c to the SuperLink on --upstream\n"
        "  node   beside a SuperNode: h2c on --listen, one TLS connection to --upstream\n"
        "\n"
        "Addresses (variable in brackets; a flag wins over its variable):\n"
        "  --listen HOST:PORT            [FL_FLEET_API_ADDRESS, link only] Fleet API listener\n"
        "                                (link 0.0.0.0:9092, node 127.0.0.1:9092)\n"
        "  --upstream HOST:PORT          [FL_SUPERLINK_ADDRESS] upstream (link 127.0.0.1:9192; node: required)\n"
        "  --admin HOST:PORT             [FL_SIDECAR_ADMIN] admin listener (127.0.0.1:9099): gRPC health,\n"
        "                                GET /healthz, /metrics, / (federation page), /v1/federation\n"
        "                                (JSON); the page and JSON show node ids, addresses and training\n"
        "                                metrics to anyone who can reach the port: keep it on loopback\n"
        "  --upstream-health IP:PORT     also require the SuperLink's own grpc.health.v1 server (its\n"
        "                                --health-server-address) to answer SERVING (off)\n"
        "TLS:\n"
        "  --tls / --no-tls              [FL_TLS_ENABLED=YES|NO] TLS on the listener (link) or upstream (node)\n"
        "  --tls-cert PEM, --tls-key PEM [FL_SSL_CERTFILE, FL_SSL_KEYFILE] certificate and key: a path or\n"
        "                                base64-encoded PEM (link: server certificate; node: client certificate)\n"
        "  --tls-ca PEM                  [FL_SSL_CA_CERTFILE] CA bundle. node: verifies the upstream (else the\n"
        "                                system store). link: as Flower's --ssl-ca-certfile, the CA of the\n"
        "                                server certificate: sent in the chain; a client certificate that is\n"
        "                                presented is verified against it, none is required\n"
        "  --tls-require-client-cert     [FL_SIDECAR_REQUIRE_CLIENT_CERT=YES|NO] link: mandatory mTLS, client\n"
        "                                certificates signed by --tls-ca (or the auto-generated CA) (NO)\n"
        "  --tls-dir DIR                 [FL_SIDECAR_TLS_DIR] link: where an auto-generated CA and server\n"
        "                                certificate are kept (/var/lib/flower-sidecar/tls)\n"
        "  --tls-san NAME|IP             extra subject alternative name for the auto-generated certificate\n"
        "                                (repeatable)\n"
        "  --tls-server-name NAME        node: name to verify the upstream certificate against\n"
        "  --tls-ca-switch-delay S       link: when the CA changes (renewal, SIGHUP), announce it and use the\n"
        "                                certificate it signs S seconds later (10)\n"
        "  SIGHUP re-reads certificates and keys (or renews the auto-generated ones when due); the\n"
        "  auto-generated server certificate is renewed while running with a third of its life left\n"
        "Limits (sizes in bytes, K/M/G suffixes allowed; times in seconds):\n"
        "  --max-concurrent-streams N    per downstream connection (1000)\n"
        "  --max-calls N                 calls open at once in the process (4096); beyond it the call idle\n"
        "                                longest (2 s or more) ends RESOURCE_EXHAUSTED, else REFUSED_STREAM\n"
        "  --max-buffer N                bytes for stream windows beyond the first 16K, all calls (64M): bounds\n"
        "                                buffers to --max-calls x 2 x 16K + N; spent, calls go on more slowly\n"
        "  --max-header-list-size N      request/response header block size (8192)\n"
        "  --max-message-size N          largest gRPC message either way (2147483647)\n"
        "  --stream-window N             bytes buffered per stream and direction (262144)\n"
        "  --conn-window N               bytes buffered per downstream connection (1048576)\n"
        "  --upstream-conns N            upstream HTTP/2 connections at most (link 8, node 1)\n"
        "  --max-connections N           client connections at most; 0 = the open-file limit less 128 kept for\n"
        "                                the admin port, upstream and logs (0)\n"
        "  --tls-handshake-timeout S     (10)\n"
        "  --idle-timeout S              close a downstream connection without calls for S; 0 = never (3600)\n"
        "  --connect-timeout S           upstream connect + HTTP/2 SETTINGS, per attempt (link 5, node 20)\n"
        "  --probe-interval S            while the upstream is unreachable (SYN unanswered, no route, refused):\n"
        "                                a bare TCP connect this often, +-20 %; the moment one connects the\n"
        "                                real attempt follows (1)\n"
        "  --probe-timeout S             a probe's time limit, and the TCP connect phase of every attempt\n"
        "                                (1; raise it on links whose round trip nears 1 s); the backoff\n"
        "                                governs only attempts that reached the upstream\n"
        "  --drain-timeout S             on SIGTERM/SIGINT, time for in-flight calls (10)\n"
        "  --keepalive-time S            [FL_GRPC_KEEPALIVE_TIME] node: PING after S of upstream silence\n"
        "                                while calls are open (30; doubled after GOAWAY too_many_pings)\n"
        "  --keepalive-timeout S         [FL_GRPC_KEEPALIVE_TIMEOUT] node: no byte within S of a PING: the\n"
        "                                connection is dead (10; also TCP_USER_TIMEOUT)\n"
        "  --hold-timeout S              a call arriving while the upstream is down waits for it up to S\n"
        "                                (and its grpc-timeout), then ends UNAVAILABLE; 0..300 (link 0, node 20)\n"
        "  --retry-buffer N              node: request bytes kept per call so it can be repeated when that is\n"
        "                                safe (upstream refused the stream, or a side-effect-free method lost\n"
        "                                with its connection); 0 = never repeat (link 0, node 8M)\n"
        "  --backoff-initial S           [FL_EDGE_BACKOFF_INITIAL] reconnect delay (link 1, node 10)\n"
        "  --backoff-max S               [FL_EDGE_BACKOFF_MAX] reconnect delay cap (link 30, node 300)\n"
        "OneGate (publication and discovery; see README, Deployment):\n"
        "  --onegate auto|on|off         auto: on when an endpoint is known (auto)\n"
        "  --onegate-endpoint URL        [ONEGATE_ENDPOINT] e.g. http://192.168.0.1:5030\n"
        "  --onegate-vmid N              [VMID] this VM's ID\n"
        "  --onegate-token-file PATH     [ONEGATE_TOKEN_FILE] ($CREDENTIALS_DIRECTORY/onegate-token under\n"
        "                                systemd, else /run/one-context/token.txt); never logged\n"
        "  --onegate-role NAME           node: the OneFlow role of the SuperLink (superlink)\n"
        "  --advertise HOST:PORT         link: FL_ENDPOINT to publish (first non-loopback address of the\n"
        "                                host, and the --listen port)\n"
        "  --onegate-ready-grace S       link: NOT_SERVING this long before FL_READY=NO (30)\n"
        "  --onegate-timeout S           per OneGate request (10)\n"
        "  node: without --upstream, the SuperLink's endpoint and CA are discovered via OneGate\n"
        "Logging:\n"
        "  --log-format json|text        [FL_LOG_FORMAT] (json)\n"
        "  --log-level LEVEL             [FL_LOG_LEVEL] DEBUG, INFO, WARNING, ERROR (INFO)\n"
        "  --log-file PATH               append events to PATH instead of stdout\n"
        "  --metrics / --no-metrics      [FL_METRICS_ENABLED] serve /metrics on the admin port (YES)\n"
        "                                (incl. grpc_server_handled_total, grpc_server_handling_seconds,\n"
        "                                build_info, certificate notAfter)\n"
        "  --observe / --no-observe      decode Fleet calls into node/message/round/run events and the\n"
        "                                federation view; caps: 16384 nodes, 8 runs, 2048 rounds per run,\n"
        "                                4096 in all, 8 metric keys per run (on)\n"
        "  --help, --version\n"
        "\n"
        "Exit status: 0 clean shutdown, 1 runtime failure, 2 bad configuration.\n",
        stdout);
}

static int fail(char *err, size_t errlen, const char *what, const char *value, const char *why) {
  snprintf(err, errlen, "invalid %s: '%s' (%s)", what, value, why);
  return -1;
}

static int parse_bool(const char *s, int *out) {
  static const char *const yes[] = {"yes", "true", "on", "1"}, *const no[] = {"no", "false", "off", "0"};
  size_t i;
  for (i = 0; i < 4; i++) {
    if (!strcasecmp(s, yes[i])) return *out = 1, 0;
    if (!strcasecmp(s, no[i])) return *out = 0, 0;
  }
  return -1;
}

static int parse_seconds(const char *s, double lo, double hi, double *out) {
  char *end;
  double v;
  errno = 0;
  v = strtod(s, &end);
  if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi) return -1;
  *out = v;
  return 0;
}

static int parse_size(const char *s, uint64_t lo, uint64_t hi, uint32_t *out) {
  char *end;
  unsigned long long v;
  if (*s == '-' || *s == '+') return -1;
  errno = 0;
  v = strtoull(s, &end, 10);
  if (errno || end == s) return -1;
  if (*end == 'K' || *end == 'k') v <<= 10, end++;
  else if (*end == 'M' || *end == 'm') v <<= 20, end++;
  else if (*end == 'G' || *end == 'g') v <<= 30, end++;
  if (*end || v < lo || v > hi) return -1;
  *out = (uint32_t)v;
  return 0;
}

int fs_hostport_split(const char *s, char *host, size_t hostlen, int *port) {
  const char *colon, *hs = s, *he;
  char *end;
  long p;
  if (s[0] == '[') {
    he = strchr(s, ']');
    if (!he || he[1] != ':') return -1;
    hs = s + 1;
    colon = he + 1;
  } else {
    colon = strrchr(s, ':');
    if (!colon || memchr(s, ':', (size_t)(colon - s))) return -1; /* bare IPv6 needs [] */
    he = colon;
  }
  if ((size_t)(he - hs) >= hostlen) return -1;
  memcpy(host, hs, (size_t)(he - hs));
  host[he - hs] = '\0';
  errno = 0;
  p = strtol(colon + 1, &end, 10);
  if (errno || end == colon + 1 || *end || p < 1 || p > 65535) return -1;
  *port = (int)p;
  return 0;
}

static int set_addr(char *dst, size_t dstlen, const char *v, const char *what, char *err, size_t errlen) {
  char host[256];
  int port;
  if (strlen(v) >= dstlen || fs_hostport_split(v, host, sizeof(host), &port) < 0)
    return fail(err, errlen, what, v, "expected HOST:PORT");
  strcpy(dst, v);
  return 0;
}

/* One setting from a flag or a variable; |what| names it in messages. */
static int apply(fs_config *c, int opt, const char *v, const char *what, char *err, size_t errlen) {
  switch (opt) {
  case OPT_LISTEN:
    return set_addr(c->listen, sizeof(c->listen), v, what, err, errlen);
  case OPT_UPSTREAM:
    return set_addr(c->upstream, sizeof(c->upstream), v, what, err, errlen);
  case OPT_ADMIN:
    return set_addr(c->admin, sizeof(c->admin), v, what, err, errlen);
  case OPT_UPSTREAM_HEALTH:
    return set_addr(c->upstream_health, sizeof(c->upstream_health), v, what, err, errlen);
  case OPT_TLS:
    if (!v) return c->tls = 1, 0;
    if (parse_bool(v, &c->tls) < 0) return fail(err, errlen, what, v, "expected YES or NO");
    return 0;
  case OPT_NO_TLS:
    c->tls = 0;
    return 0;
  case OPT_METRICS:
    if (!v) return c->metrics = 1, 0;
    if (parse_bool(v, &c->metrics) < 0) return fail(err, errlen, what, v, "expected YES or NO");
    return 0;
  case OPT_NO_METRICS:
    c->metrics = 0;
    return 0;
  case OPT_OBSERVE:
    c->observe = 1;
    return 0;
  case OPT_NO_OBSERVE:
    c->observe = 0;
    return 0;
  case OPT_TLS_CA:
    c->tls_ca = v, c->tls_ca_from = what;
    return *v ? 0 : fail(err, errlen, what, v, "empty");
  case OPT_TLS_CERT:
    c->tls_cert = v, c->tls_cert_from = what;
    return *v ? 0 : fail(err, errlen, what, v, "empty");
  case OPT_TLS_KEY:
    c->tls_key = v, c->tls_key_from = what;
    return *v ? 0 : fail(err, errlen, what, v, "empty");
  case OPT_TLS_REQUIRE_CLIENT_CERT:
    if (!v) return c->tls_require_client_cert = 1, 0;
    if (parse_bool(v, &c->tls_require_client_cert) < 0) return fail(err, errlen, what, v, "expected YES or NO");
    return 0;
  case OPT_TLS_DIR:
    c->tls_dir = v;
    return *v ? 0 : fail(err, errlen, what, v, "empty");
  case OPT_TLS_SERVER_NAME:
    c->tls_server_name = v;
    return *v ? 0 : fail(err, errlen, what, v, "empty");
  case OPT_TLS_SAN:
    if (!*v || strlen(v) > 253 || strpbrk(v, ", \t"))
      return fail(err, errlen, what, v, "expected one DNS name or IP address");
    if (c->n_tls_sans == FS_MAX_SANS) return fail(err, errlen, what, v, "at most 16 extra names");
    c->tls_sans[c->n_tls_sans++] = v;
    return 0;
  case OPT_TLS_CA_SWITCH_DELAY:
    return parse_seconds(v, 0, 3600, &c->tls_ca_switch_delay_s)
               ? fail(err, errlen, what, v, "expected seconds in [0, 3600]")
               : 0;
  case OPT_LOG_FORMAT:
    if (!strcasecmp(v, "json")) c->log_format = FS_LOG_JSON;
    else if (!strcasecmp(v, "text")) c->log_format = FS_LOG_TEXT;
    else return fail(err, errlen, what, v, "expected json or text");
    return 0;
  case OPT_LOG_LEVEL:
    if (fs_log_parse_level(v, &c->log_level) < 0)
      return fail(err, errlen, what, v, "expected DEBUG, INFO, WARNING or ERROR");
    return 0;
  case OPT_LOG_FILE:
    c->log_file = v;
    return *v ? 0 : fail(err, errlen, what, v, "empty");
  case OPT_KA_TIME:
    return parse_seconds(v, 1, 86400, &c->keepalive_time_s)
               ? fail(err, errlen, what, v, "expected seconds in [1, 86400]")
               : 0;
  case OPT_KA_TIMEOUT:
    return parse_seconds(v, 1, 3600, &c->keepalive_timeout_s)
               ? fail(err, errlen, what, v, "expected seconds in [1, 3600]")
               : 0;
  case OPT_BO_INITIAL:
    return parse_seconds(v, 0.01, 3600, &c->backoff_initial_s)
               ? fail(err, errlen, what, v, "expected seconds in [0.01, 3600]")
               : 0;
  case OPT_BO_MAX:
    return parse_seconds(v, 0.01, 86400, &c->backoff_max_s)
               ? fail(err, errlen, what, v, "expected seconds in [0.01, 86400]")
               : 0;
  case OPT_CONNECT_TIMEOUT:
    return parse_seconds(v, 0.1, 600, &c->connect_timeout_s)
               ? fail(err, errlen, what, v, "expected seconds in [0.1, 600]")
               : 0;
  case OPT_PROBE_INTERVAL:
    return parse_seconds(v, 0.1, 60, &c->probe_interval_s) ? fail(err, errlen, what, v, "expected seconds in [0.1, 60]")
                                                           : 0;
  case OPT_PROBE_TIMEOUT:
    return parse_seconds(v, 0.1, 60, &c->probe_timeout_s) ? fail(err, errlen, what, v, "expected seconds in [0.1, 60]")
                                                          : 0;
  case OPT_HANDSHAKE_TIMEOUT:
    return parse_seconds(v, 0.1, 600, &c->tls_handshake_timeout_s)
               ? fail(err, errlen, what, v, "expected seconds in [0.1, 600]")
               : 0;
  case OPT_IDLE_TIMEOUT:
    return parse_seconds(v, 0, 604800, &c->idle_timeout_s)
               ? fail(err, errlen, what, v, "expected seconds in [0, 604800]")
               : 0;
  case OPT_DRAIN_TIMEOUT:
    return parse_seconds(v, 0, 3600, &c->drain_timeout_s) ? fail(err, errlen, what, v, "expected seconds in [0, 3600]")
                                                          : 0;
  case OPT_MAX_STREAMS:
    return parse_size(v, 1, 100000, &c->max_concurrent_streams)
               ? fail(err, errlen, what, v, "expected a count in [1, 100000]")
               : 0;
  case OPT_MAX_CALLS:
    return parse_size(v, 1, 1000000, &c->max_calls) ? fail(err, errlen, what, v, "expected a count in [1, 1000000]")
                                                    : 0;
  case OPT_MAX_BUFFER:
    return parse_size(v, 0, 4095u << 20, &c->max_buffer) ? fail(err, errlen, what, v, "expected bytes in [0, 4095M]")
                                                         : 0;
  case OPT_MAX_HEADER_LIST:
    return parse_size(v, 1024, 1 << 20, &c->max_header_list_size)
               ? fail(err, errlen, what, v, "expected bytes in [1K, 1M]")
               : 0;
  case OPT_MAX_MESSAGE:
    return parse_size(v, 0, 2147483647, &c->max_message_size)
               ? fail(err, errlen, what, v, "expected bytes in [0, 2147483647]")
               : 0;
  case OPT_STREAM_WINDOW:
    return parse_size(v, 16384, 1u << 30, &c->stream_window) ? fail(err, errlen, what, v, "expected bytes in [16K, 1G]")
                                                             : 0;
  case OPT_CONN_WINDOW:
    return parse_size(v, 65535, 1u << 30, &c->conn_window) ? fail(err, errlen, what, v, "expected bytes in [64K, 1G]")
                                                           : 0;
  case OPT_MAX_CONNECTIONS:
    return parse_size(v, 0, 10000000, &c->max_connections)
               ? fail(err, errlen, what, v, "expected a count in [0, 10000000]")
               : 0;
  case OPT_UPSTREAM_CONNS:
    return parse_size(v, 1, 64, &c->upstream_conns_max) ? fail(err, errlen, what, v, "expected a count in [1, 64]") : 0;
  case OPT_HOLD_TIMEOUT: /* the SuperLink refuses requests signed more than ~300 s ago */
    return parse_seconds(v, 0, 300, &c->hold_timeout_s) ? fail(err, errlen, what, v, "expected seconds in [0, 300]")
                                                        : 0;
  case OPT_ONEGATE:
    if (!strcasecmp(v, "auto")) c->onegate = FS_ONEGATE_AUTO;
    else if (!strcasecmp(v, "on") || !strcasecmp(v, "yes")) c->onegate = FS_ONEGATE_ON;
    else if (!strcasecmp(v, "off") || !strcasecmp(v, "no")) c->onegate = FS_ONEGATE_OFF;
    else return fail(err, errlen, what, v, "expected auto, on or off");
    return 0;
  case OPT_ONEGATE_ENDPOINT:
    if (strncmp(v, "http://", 7) && strncmp(v, "https://", 8))
      return fail(err, errlen, what, v, "expected an http:// or https:// URL");
    if (strlen(v) > 200 || strpbrk(v, " \t\r\n")) return fail(err, errlen, what, v, "expected a URL");
    c->onegate_endpoint = v;
    return 0;
  case OPT_ONEGATE_VMID: /* checked once OneGate is known to be used: VMID is a common name */
    c->onegate_vmid = v, c->onegate_vmid_from = what;
    return 0;
  case OPT_ONEGATE_TOKEN_FILE:
    c->onegate_token_file = v;
    return *v ? 0 : fail(err, errlen, what, v, "empty");
  case OPT_ONEGATE_ROLE:
    if (!*v || strlen(v) > 128 || strpbrk(v, "\"\\\r\n")) return fail(err, errlen, what, v, "expected a role name");
    c->onegate_role = v;
    return 0;
  case OPT_ADVERTISE:
    return set_addr(c->advertise, sizeof(c->advertise), v, what, err, errlen);
  case OPT_ONEGATE_READY_GRACE:
    return parse_seconds(v, 0, 3600, &c->onegate_ready_grace_s)
               ? fail(err, errlen, what, v, "expected seconds in [0, 3600]")
               : 0;
  case OPT_ONEGATE_TIMEOUT:
    return parse_seconds(v, 0.1, 300, &c->onegate_timeout_s)
               ? fail(err, errlen, what, v, "expected seconds in [0.1, 300]")
               : 0;
  case OPT_RETRY_BUFFER:
    return parse_size(v, 0, 64u << 20, &c->retry_buffer) ? fail(err, errlen, what, v, "expected bytes in [0, 64M]") : 0;
  }
  return fail(err, errlen, what, v ? v : "", "unknown setting");
}

/* The variables, and the setting each gives.  |link_only|: the node role
 * ignores it (FL_FLEET_API_ADDRESS is the SuperLink's own listener). */
static const struct {
  const char *var;
  int opt;
  int link_only;
} env_map[] = {
    {"FL_FLEET_API_ADDRESS", OPT_LISTEN, 1},
    {"FL_SIDECAR_ADMIN", OPT_ADMIN, 0},
    {"FL_SIDECAR_TLS_DIR", OPT_TLS_DIR, 0},
    {"FL_SIDECAR_REQUIRE_CLIENT_CERT", OPT_TLS_REQUIRE_CLIENT_CERT, 1},
    {"FL_TLS_ENABLED", OPT_TLS, 0},
    {"FL_SSL_CA_CERTFILE", OPT_TLS_CA, 0},
    {"FL_SSL_CERTFILE", OPT_TLS_CERT, 0},
    {"FL_SSL_KEYFILE", OPT_TLS_KEY, 0},
    {"FL_SUPERLINK_ADDRESS", OPT_UPSTREAM, 0},
    {"FL_LOG_FORMAT", OPT_LOG_FORMAT, 0},
    {"FL_LOG_LEVEL", OPT_LOG_LEVEL, 0},
    {"FL_METRICS_ENABLED", OPT_METRICS, 0},
    {"FL_GRPC_KEEPALIVE_TIME", OPT_KA_TIME, 0},
    {"FL_GRPC_KEEPALIVE_TIMEOUT", OPT_KA_TIMEOUT, 0},
    {"FL_EDGE_BACKOFF_INITIAL", OPT_BO_INITIAL, 0},
    {"FL_EDGE_BACKOFF_MAX", OPT_BO_MAX, 0},
    {"ONEGATE_ENDPOINT", OPT_ONEGATE_ENDPOINT, 0},
    {"VMID", OPT_ONEGATE_VMID, 0},
    {"ONEGATE_TOKEN_FILE", OPT_ONEGATE_TOKEN_FILE, 0},
};

static void set_defaults(fs_config *c) {
  int node = c->role == FS_ROLE_NODE;
  strcpy(c->listen, node ? "127.0.0.1:9092" : "0.0.0.0:9092");
  strcpy(c->upstream, node ? "" : "127.0.0.1:9192");
  strcpy(c->admin, "127.0.0.1:9099");
  c->tls = 1;
  c->tls_dir = "/var/lib/flower-sidecar/tls";
  c->log_format = FS_LOG_JSON;
  c->log_level = FS_LOG_INFO;
  c->metrics = 1;
  c->observe = 1;
  c->keepalive_time_s = 30;
  c->keepalive_timeout_s = 10;
  c->backoff_initial_s = node ? 10 : 1;
  c->backoff_max_s = node ? 300 : 30;
  c->connect_timeout_s = node ? 20 : 5;
  c->tls_handshake_timeout_s = 10;
  c->probe_interval_s = 1;
  c->probe_timeout_s = 1;
  c->idle_timeout_s = 3600;
  c->drain_timeout_s = 10;
  c->tls_ca_switch_delay_s = 10;
  c->max_concurrent_streams = 1000;
  c->max_calls = 4096;
  c->max_buffer = 64u << 20;
  c->max_header_list_size = 8192;
  c->max_message_size = 2147483647u;
  c->stream_window = 256 * 1024;
  c->conn_window = 1024 * 1024;
  c->upstream_conns_max = node ? 1 : 8;
  c->hold_timeout_s = node ? 20 : 0;
  c->retry_buffer = node ? 8u << 20 : 0;
  c->onegate_role = "superlink";
  c->onegate_ready_grace_s = 30;
  c->onegate_timeout_s = 10;
}

/* The setting a flag gives: --tls and --no-tls give the same one. */
static int setting_of(int opt) {
  if (opt == OPT_NO_TLS) return OPT_TLS;
  if (opt == OPT_NO_METRICS) return OPT_METRICS;
  if (opt == OPT_NO_OBSERVE) return OPT_OBSERVE;
  return opt;
}

/* The name a flag is called by in messages; static storage, as fs_config
 * keeps some of them (tls_ca_from...). */
static const char *flag_name(int opt) {
  static char names[sizeof(long_opts) / sizeof(long_opts[0])][40];
  size_t i;
  for (i = 0; long_opts[i].name; i++)
    if (long_opts[i].val == opt) {
      if (!names[i][0]) snprintf(names[i], sizeof(names[i]), "--%s", long_opts[i].name);
      return names[i];
    }
  return "flag";
}

int fs_config_parse(fs_config *c, int argc, char **argv, char *err, size_t errlen) {
  size_t i;
  int opt, pass;
  unsigned char given[OPT_VERSION + 1] = {0}; /* settings a flag gives */
  memset(c, 0, sizeof(*c));
  if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) return fs_config_usage(), 1;
  if (argc >= 2 && !strcmp(argv[1], "--version")) return printf("flower-sidecar %s\n", fs_version), 1;
  if (argc < 2) return snprintf(err, errlen, "missing role: expected 'link' or 'node' (see --help)"), -1;
  if (!strcmp(argv[1], "link")) c->role = FS_ROLE_LINK;
  else if (!strcmp(argv[1], "node")) c->role = FS_ROLE_NODE;
  else return fail(err, errlen, "role", argv[1], "expected link or node");
  c->role_name = argv[1];
  set_defaults(c);

  /* Pass 0 checks the flags and notes which settings they give; then the
   * variables fill the rest; pass 1 applies the flags. */
  for (pass = 0; pass < 2; pass++) {
    if (pass == 1)
      for (i = 0; i < sizeof(env_map) / sizeof(env_map[0]); i++) {
        const char *v = getenv(env_map[i].var);
        if (!v || !*v || given[env_map[i].opt] || (env_map[i].link_only && c->role != FS_ROLE_LINK)) continue;
        if (apply(c, env_map[i].opt, v, env_map[i].var, err, errlen) < 0) return -1;
      }
    optind = 0; /* GNU getopt: start over; argv[1], the role, is its argv[0] */
    opterr = 0;
    while ((opt = getopt_long(argc - 1, argv + 1, ":", long_opts, NULL)) != -1) {
      if (opt == '?') return fail(err, errlen, "flag", argv[optind], "unknown; see --help");
      if (opt == ':') return fail(err, errlen, "flag", argv[optind], "needs a value");
      if (opt == OPT_HELP) return fs_config_usage(), 1;
      if (opt == OPT_VERSION) return printf("flower-sidecar %s\n", fs_version), 1;
      if (pass == 0) given[setting_of(opt)] = 1;
      else if (apply(c, opt, optarg, flag_name(opt), err, errlen) < 0) return -1;
    }
  }
  optind++; /* an index into argv + 1 */
  if (optind < argc) return fail(err, errlen, "argument", argv[optind], "unexpected; see --help");

  if (c->onegate == FS_ONEGATE_ON && !c->onegate_endpoint)
    return snprintf(err, errlen, "invalid --onegate: 'on' needs --onegate-endpoint (or ONEGATE_ENDPOINT)"), -1;
  if (c->onegate == FS_ONEGATE_AUTO) c->onegate = c->onegate_endpoint ? FS_ONEGATE_ON : FS_ONEGATE_OFF;
  if (c->onegate == FS_ONEGATE_ON && !c->onegate_vmid)
    return snprintf(err, errlen, "missing --onegate-vmid (or VMID): OneGate needs this VM's ID"), -1;
  if (c->onegate == FS_ONEGATE_ON && (!*c->onegate_vmid || strlen(c->onegate_vmid) > 18 ||
                                      strspn(c->onegate_vmid, "0123456789") != strlen(c->onegate_vmid)))
    return fail(err, errlen, c->onegate_vmid_from, c->onegate_vmid, "expected the VM's numeric ID");
  if (c->role == FS_ROLE_NODE && !c->upstream[0] && c->onegate != FS_ONEGATE_ON)
    return snprintf(err, errlen,
                    "missing --upstream (or FL_SUPERLINK_ADDRESS): the node role needs the SuperLink's HOST:PORT, "
                    "or OneGate (ONEGATE_ENDPOINT and VMID) to discover it"),
           -1;
  if (c->tls_cert && !c->tls_key)
    return snprintf(err, errlen, "invalid %s: '%.200s' (a certificate needs a key too: --tls-key or FL_SSL_KEYFILE)",
                    c->tls_cert_from, c->tls_cert),
           -1;
  if (c->tls_key && !c->tls_cert) /* the value is shown only when it is a path: base64 of a key holds the key */
    return snprintf(err, errlen, "invalid %s: %s (a key needs a certificate too: --tls-cert or FL_SSL_CERTFILE)",
                    c->tls_key_from, c->tls_key[0] == '/' ? c->tls_key : "a value not shown, as it may hold a key"),
           -1;
  if (c->role == FS_ROLE_LINK && c->tls && c->tls_ca && !c->tls_cert)
    return snprintf(err, errlen,
                    "invalid %s: '%.200s' (on the link role it is the CA of the server certificate: give that "
                    "certificate and its key too, or neither to use the auto-generated CA)",
                    c->tls_ca_from, c->tls_ca),
           -1;
  if (c->tls_require_client_cert && c->role != FS_ROLE_LINK)
    return snprintf(err, errlen,
                    "invalid --tls-require-client-cert: the node role presents a client certificate (--tls-cert), "
                    "it does not ask for one"),
           -1;
  if (c->backoff_max_s < c->backoff_initial_s) {
    char v[32];
    snprintf(v, sizeof(v), "%g", c->backoff_max_s);
    return fail(err, errlen, "--backoff-max", v, "below --backoff-initial");
  }
  if (c->conn_window < c->stream_window) {
    char v[32];
    snprintf(v, sizeof(v), "%u", c->conn_window);
    return fail(err, errlen, "--conn-window", v, "below --stream-window");
  }
  return 0;
}
