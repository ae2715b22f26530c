/*
 * config: the daemon's settings from flags and the OpenNebula
 * contextualization variables (README.md, "Flags").
 *
 * A flag wins over a variable; an invalid value is an error naming the flag
 * or variable and the value, never a silent default.
 */
#ifndef FS_CONFIG_H
#define FS_CONFIG_H

#ifndef FS_VERSION
#define FS_VERSION "0.1.0"
#endif

#include <stddef.h>
#include <stdint.h>

#include "log.h"

typedef enum { FS_ROLE_LINK = 0, FS_ROLE_NODE } fs_role;

#define FS_MAX_SANS 16

typedef struct fs_config {
  fs_role role;
  const char *role_name;
  char listen[256];
  char upstream[256];
  char admin[256];
  char upstream_health[256]; /* the SuperLink's own health server, "" = not asked */
  int tls;                   /* link: TLS on the listener; node: TLS to the upstream */
  const char *tls_ca;        /* path or base64 PEM, or NULL */
  const char *tls_cert;
  const char *tls_key;
  const char *tls_ca_from; /* "--tls-ca" or "FL_SSL_CA_CERTFILE": for messages */
  const char *tls_cert_from;
  const char *tls_key_from;
  const char *tls_dir;
  const char *tls_server_name;
  const char *tls_sans[FS_MAX_SANS];
  int n_tls_sans;
  fs_log_format log_format;
  fs_log_level log_level;
  const char *log_file;
  int metrics;
  int observe; /* decode Fleet calls into events */
  double keepalive_time_s;
  double keepalive_timeout_s;
  double backoff_initial_s;
  double backoff_max_s;
  double connect_timeout_s;
  double tls_handshake_timeout_s;
  double idle_timeout_s; /* 0: never */
  double drain_timeout_s;
  uint32_t max_concurrent_streams;
  uint32_t max_header_list_size;
  uint32_t max_message_size;
  uint32_t stream_window; /* bytes buffered per stream and direction, at most */
  uint32_t conn_window;   /* bytes buffered per downstream connection, at most */
  uint32_t upstream_conns_max;
  uint32_t max_connections; /* client connections at most; 0: RLIMIT_NOFILE less a reserve (downstream.c) */
  double hold_timeout_s;    /* wait-for-ready while the upstream is down; 0: fail at once */
  uint32_t retry_buffer;    /* request bytes kept per call to repeat it safely; 0: no retries */
} fs_config;

/* Fills |cfg| from |argv| (argv[1] is the role) and the environment.
 * Returns 0 on success; 1 when --help or --version was printed (exit 0);
 * -1 with a one-line message in |err| on bad configuration (exit 2). */
int fs_config_parse(fs_config *cfg, int argc, char **argv, char *err, size_t errlen);

/* Prints the --help text to stdout. */
void fs_config_usage(void);

/* Splits "host:port", "[v6]:port" or ":port" (host "") into |host| and
 * |port|.  Returns 0 or -1. */
int fs_hostport_split(const char *s, char *host, size_t hostlen, int *port);

#endif
