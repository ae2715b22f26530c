/* config: see config.h. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

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
  OPT_TLS_SAN,
  OPT_TLS_SERVER_NAME,
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
  OPT_HANDSHAKE_TIMEOUT,
  OPT_IDLE_TIMEOUT,
  OPT_DRAIN_TIMEOUT,
  OPT_MAX_STREAMS,
  OPT_MAX_HEADER_LIST,
  OPT_MAX_MESSAGE,
  OPT_STREAM_WINDOW,
  OPT_CONN_WINDOW,
  OPT_UPSTREAM_CONNS,
  OPT_MAX_CONNECTIONS,
  OPT_HOLD_TIMEOUT,
  OPT_RETRY_BUFFER,
  OPT_UPSTREAM_HEALTH,
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
                                          {"tls-san", required_argument, 0, OPT_TLS_SAN},
                                          {"tls-server-name", required_argument, 0, OPT_TLS_SERVER_NAME},
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
                                          {"tls-handshake-timeout", required_argument, 0, OPT_HANDSHAKE_TIMEOUT},
                                          {"idle-timeout", required_argument, 0, OPT_IDLE_TIMEOUT},
                                          {"drain-timeout", required_argument, 0, OPT_DRAIN_TIMEOUT},
                                          {"max-concurrent-streams", required_argument, 0, OPT_MAX_STREAMS},
                                          {"max-header-list-size", required_argument, 0, OPT_MAX_HEADER_LIST},
                                          {"max-message-size", required_argument, 0, OPT_MAX_MESSAGE},
                                          {"stream-window", required_argument, 0, OPT_STREAM_WINDOW},
                                          {"conn-window", required_argument, 0, OPT_CONN_WINDOW},
                                          {"upstream-conns", required_argument, 0, OPT_UPSTREAM_CONNS},
                                          {"max-connections", required_argument, 0, OPT_MAX_CONNECTIONS},
                                          {"hold-timeout", required_argument, 0, OPT_HOLD_TIMEOUT},
                                          {"upstream-health", required_argument, 0, OPT_UPSTREAM_HEALTH},
                                          {"retry-buffer", required_argument, 0, OPT_RETRY_BUFFER},
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
        "  --listen HOST:PORT            Fleet API listener (link 0.0.0.0:9092, node 127.0.0.1:9092)\n"
        "  --upstream HOST:PORT          [FL_SUPERLINK_ADDRESS] upstream (link 127.0.0.1:9192; node: required)\n"
        "  --admin HOST:PORT             admin listener (127.0.0.1:9099): gRPC health, GET /healthz,\n"
        "                                /metrics, / (federation page) and /v1/federation (JSON); the page\n"
        "                                and JSON show node ids, addresses and training metrics to anyone\n"
        "                                who can reach the port: keep it on loopback\n"
        "  --upstream-health IP:PORT     also require the SuperLink's own grpc.health.v1 server (its\n"
        "                                --health-server-address) to answer SERVING (off)\n"
        "TLS:\n"
        "  --tls / --no-tls              [FL_TLS_ENABLED=YES|NO] TLS on the listener (link) or upstream (node)\n"
        "  --tls-cert PEM, --tls-key PEM [FL_SSL_CERTFILE, FL_SSL_KEYFILE] certificate and key: a path or\n"
        "                                base64-encoded PEM (link: server certificate; node: client certificate)\n"
        "  --tls-ca PEM                  [FL_SSL_CA_CERTFILE] CA bundle (node: verifies the upstream;\n"
        "                                link: requires and verifies client certificates)\n"
        "  --tls-dir DIR                 link: where an auto-generated CA and server certificate are kept\n"
        "                                (/var/lib/flower-sidecar/tls)\n"
        "  --tls-san NAME|IP             extra subject alternative name for the auto-generated certificate\n"
        "                                (repeatable)\n"
        "  --tls-server-name NAME        node: name to verify the upstream certificate against\n"
        "Limits (sizes in bytes, K/M/G suffixes allowed; times in seconds):\n"
        "  --max-concurrent-streams N    per downstream connection (1000)\n"
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
  case OPT_RETRY_BUFFER:
    return parse_size(v, 0, 64u << 20, &c->retry_buffer) ? fail(err, errlen, what, v, "expected bytes in [0, 64M]") : 0;
  }
  return fail(err, errlen, what, v ? v : "", "unknown setting");
}

static const struct {
  const char *var;
  int opt;
} env_map[] = {
    {"FL_TLS_ENABLED", OPT_TLS},
    {"FL_SSL_CA_CERTFILE", OPT_TLS_CA},
    {"FL_SSL_CERTFILE", OPT_TLS_CERT},
    {"FL_SSL_KEYFILE", OPT_TLS_KEY},
    {"FL_SUPERLINK_ADDRESS", OPT_UPSTREAM},
    {"FL_LOG_FORMAT", OPT_LOG_FORMAT},
    {"FL_LOG_LEVEL", OPT_LOG_LEVEL},
    {"FL_METRICS_ENABLED", OPT_METRICS},
    {"FL_GRPC_KEEPALIVE_TIME", OPT_KA_TIME},
    {"FL_GRPC_KEEPALIVE_TIMEOUT", OPT_KA_TIMEOUT},
    {"FL_EDGE_BACKOFF_INITIAL", OPT_BO_INITIAL},
    {"FL_EDGE_BACKOFF_MAX", OPT_BO_MAX},
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
  c->idle_timeout_s = 3600;
  c->drain_timeout_s = 10;
  c->max_concurrent_streams = 1000;
  c->max_header_list_size = 8192;
  c->max_message_size = 2147483647u;
  c->stream_window = 256 * 1024;
  c->conn_window = 1024 * 1024;
  c->upstream_conns_max = node ? 1 : 8;
  c->hold_timeout_s = node ? 20 : 0;
  c->retry_buffer = node ? 8u << 20 : 0;
}

int fs_config_parse(fs_config *c, int argc, char **argv, char *err, size_t errlen) {
  size_t i;
  int opt;
  memset(c, 0, sizeof(*c));
  if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) return fs_config_usage(), 1;
  if (argc >= 2 && !strcmp(argv[1], "--version")) return puts("flower-sidecar " FS_VERSION), 1;
  if (argc < 2) return snprintf(err, errlen, "missing role: expected 'link' or 'node' (see --help)"), -1;
  if (!strcmp(argv[1], "link")) c->role = FS_ROLE_LINK;
  else if (!strcmp(argv[1], "node")) c->role = FS_ROLE_NODE;
  else return fail(err, errlen, "role", argv[1], "expected link or node");
  c->role_name = argv[1];
  set_defaults(c);

  for (i = 0; i < sizeof(env_map) / sizeof(env_map[0]); i++) {
    const char *v = getenv(env_map[i].var);
    if (v && *v && apply(c, env_map[i].opt, v, env_map[i].var, err, errlen) < 0) return -1;
  }

  optind = 2;
  opterr = 0;
  while ((opt = getopt_long(argc, argv, ":", long_opts, NULL)) != -1) {
    char what[64];
    const struct option *o;
    if (opt == '?') return fail(err, errlen, "flag", argv[optind - 1], "unknown; see --help");
    if (opt == ':') return fail(err, errlen, "flag", argv[optind - 1], "needs a value");
    if (opt == OPT_HELP) return fs_config_usage(), 1;
    if (opt == OPT_VERSION) return puts("flower-sidecar " FS_VERSION), 1;
    for (o = long_opts; o->name && o->val != opt; o++) {}
    snprintf(what, sizeof(what), "--%s", o->name);
    /* Remember flag names for messages: they must outlive this loop. */
    if (apply(c, opt, optarg,
              o->name ? (opt == OPT_TLS_CA     ? "--tls-ca"
                         : opt == OPT_TLS_CERT ? "--tls-cert"
                         : opt == OPT_TLS_KEY  ? "--tls-key"
                                               : what)
                      : what,
              err, errlen) < 0)
      return -1;
  }
  if (optind < argc) return fail(err, errlen, "argument", argv[optind], "unexpected; see --help");

  if (c->role == FS_ROLE_NODE && !c->upstream[0])
    return snprintf(err, errlen,
                    "missing --upstream (or FL_SUPERLINK_ADDRESS): the node role needs the SuperLink's HOST:PORT"),
           -1;
  if (!c->tls_cert != !c->tls_key)
    return snprintf(err, errlen, "invalid %s: '%s' (%s needs %s too)", c->tls_cert ? c->tls_cert_from : c->tls_key_from,
                    c->tls_cert ? c->tls_cert : c->tls_key, c->tls_cert ? "a certificate" : "a key",
                    c->tls_cert ? "a key (--tls-key or FL_SSL_KEYFILE)"
                                : "a certificate (--tls-cert or FL_SSL_CERTFILE)"),
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
