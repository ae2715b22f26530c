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
  int tls_require_client_cert; /* link: a client certificate signed by the CA is mandatory */
  const char *tls_dir;
  const char *tls_server_name;
  double tls_ca_switch_delay_s; /* link: a changed CA is announced this long before its certificate is used */
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
  double probe_interval_s; /* upstream unreachable: a TCP probe this often (+-20 %) */
  double probe_timeout_s;  /* a probe's, and every attempt's TCP connect, time limit */
  double tls_handshake_timeout_s;
  double idle_timeout_s; /* 0: never */
  double drain_timeout_s;
  uint32_t max_concurrent_streams;
  uint32_t max_calls;  /* calls open at once in the process (policy.h, fs_policy_admit) */
  uint32_t max_buffer; /* the pool stream windows beyond the first block are taken from (fs_budget) */
  uint32_t max_header_list_size;
  uint32_t max_message_size;
  uint32_t stream_window; /* bytes buffered per stream and direction, at most */
  uint32_t conn_window;   /* bytes buffered per downstream connection, at most */
  uint32_t upstream_conns_max;
  uint32_t max_connections; /* client connections at most; 0: RLIMIT_NOFILE less a reserve (downstream.c) */
  double hold_timeout_s;    /* wait-for-ready while the upstream is down; 0: fail at once */
  uint32_t retry_buffer;    /* request bytes kept per call to repeat it safely; 0: no retries */
  /* OneGate (onegate.h): on when an endpoint is known, unless --onegate off */
  int onegate;                  /* FS_ONEGATE_AUTO, _ON, _OFF as given; resolved by fs_config_parse */
  const char *onegate_endpoint; /* "http://host:5030" (no trailing slash needed) */
  const char *onegate_vmid;
  const char *onegate_vmid_from;
  const char *onegate_token_file;
  const char *onegate_role;     /* the OneFlow role of the SuperLink (node: discovery) */
  char advertise[256];          /* link: FL_ENDPOINT to publish; "" = first non-loopback address */
  double onegate_ready_grace_s; /* link: NOT_SERVING this long before FL_READY=NO */
  double onegate_timeout_s;     /* per request */
} fs_config;

enum { FS_ONEGATE_AUTO = 0, FS_ONEGATE_ON, FS_ONEGATE_OFF };

/* Fills |cfg| from |argv| (argv[1] is the role) and the environment.  A
 * variable is read only for a setting that no flag gives, so a flag wins
 * even over an invalid variable.  |cfg| points into |argv| and the
 * environment, which must outlive it.
 * Returns 0 on success; 1 when --help or --version was printed (exit 0);
 * -1 with a one-line message in |err| on bad configuration (exit 2). */
int fs_config_parse(fs_config *cfg, int argc, char **argv, char *err, size_t errlen);

/* Prints the --help text to stdout. */
void fs_config_usage(void);

/* Splits "host:port", "[v6]:port" or ":port" (host "") into |host| and
 * |port|.  Returns 0 or -1. */
int fs_hostport_split(const char *s, char *host, size_t hostlen, int *port);

/* The daemon's version, as --version and sidecar.start print it. */
extern const char fs_version[];

#endif
