/*
 * flower-probe: gRPC health probe for OpenNebula READY_SCRIPTs.
 *
 * A drop-in replacement for grpc_health_probe
 * (github.com/grpc-ecosystem/grpc-health-probe) written against gRPC C core.
 * It connects to -addr, waits up to -connect-timeout for the channel to
 * become READY, calls grpc.health.v1.Health/Check for -service with a
 * -rpc-timeout deadline and maps the outcome to an exit code:
 *
 *   0  SERVING ("status: SERVING" on stdout)
 *   1  bad arguments (unknown flag, bad duration, missing -addr, TLS file
 *      flags without -tls, unreadable or unusable certificate files, ...)
 *   2  connection failed or timed out (includes TLS handshake failures)
 *   3  RPC failed or timed out (UNIMPLEMENTED, NOT_FOUND, DEADLINE_EXCEEDED..)
 *   4  answered, but the status is not SERVING (the status name is printed)
 *
 * Flags use Go's flag syntax (-flag value, -flag=value, --flag; booleans only
 * as -flag or -flag=false) with the names, defaults and validation rules of
 * grpc_health_probe; durations are Go durations (500ms, 1.5s, 2m).  Every
 * failure is one line on stderr; when the channel ended in
 * TRANSIENT_FAILURE, core's reason (refused, certificate verify failed, ...)
 * is appended, fetched with one fail-fast call (at most 250 ms more).  gRPC
 * core's own log lines are suppressed unless -v is given or GRPC_VERBOSITY /
 * GRPC_TRACE is set.  Loopback targets never go through $grpc_proxy /
 * $https_proxy / $http_proxy (Go's behaviour; core would proxy them).
 *
 * TLS: -tls with a CA bundle (-tls-ca-cert) or the system roots, optional
 * client certificate (mTLS), -tls-server-name (GRPC_SSL_TARGET_NAME_OVERRIDE_ARG)
 * and -tls-no-verify (experimental grpc_tls_credentials_options API with
 * verify_server_cert off and a no-op verifier).  Certificate files are checked
 * with OpenSSL before gRPC starts, so bad files are argument errors (exit 1)
 * rather than connection failures.
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/log.h>
#include <grpc/support/time.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "godur.h"
#include "health.pb-c.h"

enum {
  EXIT_SERVING = 0,
  EXIT_BAD_ARGS = 1,
  EXIT_CONNECT = 2,
  EXIT_RPC = 3,
  EXIT_UNHEALTHY = 4,
};

#define PROG           "flower-probe"
#define CHECK_METHOD   "/grpc.health.v1.Health/Check"
#define MAX_FILE_BYTES (16 * 1024 * 1024)

struct header {
  char *key;
  char *value;
};

struct opts {
  const char *addr;
  const char *service;
  const char *user_agent;
  int64_t connect_timeout_ns;
  int64_t rpc_timeout_ns;
  bool tls;
  bool tls_no_verify;
  const char *tls_ca_cert;
  const char *tls_client_cert;
  const char *tls_client_key;
  const char *tls_server_name;
  bool verbose;
  bool gzip;
  bool help;
  struct header *headers;
  size_t nheaders;
};

/* PEM material read from the -tls-* files (NULL when not given). */
struct tls_files {
  char *ca_pem;
  char *cert_pem;
  char *key_pem;
};

/* ------------------------------------------------------------------------ */
/* Messages                                                                 */

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
  char line[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  /* one line: flatten any newline a peer put into a status message */
  for (char *p = line; *p; p++)
    if (*p == '\n' || *p == '\r') *p = ' ';
  fprintf(stderr, "%s\n", line);
}

static const char *dur_str(int64_t ns, char *buf) { return go_format_duration(ns, buf); }

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void usage(FILE *f) {
  fputs("Usage of " PROG ":\n"
        "  -addr string\n"
        "    \t(required) tcp host:port to connect\n"
        "  -connect-timeout duration\n"
        "    \ttimeout for establishing connection (default 1s)\n"
        "  -gzip\n"
        "    \tuse gzip compression for the health check request\n"
        "  -h, -help\n"
        "    \tprint this help and exit\n"
        "  -rpc-header value\n"
        "    \tadditional RPC header in 'name: value' format; may be repeated\n"
        "  -rpc-timeout duration\n"
        "    \ttimeout for health check rpc (default 1s)\n"
        "  -service string\n"
        "    \tservice name to check (default \"\")\n"
        "  -tls\n"
        "    \tuse TLS (default: false, INSECURE plaintext transport)\n"
        "  -tls-ca-cert string\n"
        "    \t(with -tls, optional) file containing trusted certificates for verifying server\n"
        "  -tls-client-cert string\n"
        "    \t(with -tls, optional) client certificate for authenticating to the server (requires -tls-client-key)\n"
        "  -tls-client-key string\n"
        "    \t(with -tls) client private key for authenticating to the server (requires -tls-client-cert)\n"
        "  -tls-no-verify\n"
        "    \t(with -tls) don't verify the certificate (INSECURE) presented by the server\n"
        "  -tls-server-name string\n"
        "    \t(with -tls) override the hostname used to verify the server certificate\n"
        "  -user-agent string\n"
        "    \tuser-agent header value of health check requests (default \"" PROG "\")\n"
        "  -v\tverbose logs\n"
        "Exit status: 0 SERVING, 1 bad arguments, 2 connection failed or timed out,\n"
        "3 RPC failed or timed out, 4 answered but not SERVING.\n",
        f);
}

/* ------------------------------------------------------------------------ */
/* Command line (Go "flag" package semantics)                               */

enum flag_kind { F_STRING, F_BOOL, F_DURATION, F_HEADER };

struct flag_def {
  const char *name;
  enum flag_kind kind;
  void *dst;
};

static void free_headers(struct opts *o) {
  for (size_t i = 0; i < o->nheaders; i++) {
    free(o->headers[i].key);
    free(o->headers[i].value);
  }
  free(o->headers);
  o->headers = NULL;
  o->nheaders = 0;
}

/* -rpc-header "name: value": split at the first ':', trim the name, drop the
 * value's leading white space (as grpc_health_probe does), lowercase the
 * name (as Go's metadata package does) and check both against HTTP/2 rules
 * so gRPC core will not reject the call later. */
static int add_header(struct opts *o, const char *arg, char *err, size_t errlen) {
  const char *colon = strchr(arg, ':');
  if (!colon) {
    snprintf(err, errlen, "invalid RPC header, expected 'key: value', got \"%s\"", arg);
    return -1;
  }
  const char *k = arg, *kend = colon;
  while (k < kend && isspace((unsigned char)*k)) k++;
  while (kend > k && isspace((unsigned char)kend[-1])) kend--;
  const char *v = colon + 1;
  while (*v && isspace((unsigned char)*v)) v++;
  if (k == kend) {
    snprintf(err, errlen, "invalid RPC header, empty name in \"%s\"", arg);
    return -1;
  }
  char *key = strndup(k, (size_t)(kend - k));
  char *value = strdup(v);
  struct header *nh = realloc(o->headers, (o->nheaders + 1) * sizeof *nh);
  if (!key || !value || !nh) {
    free(key);
    free(value);
    if (nh) o->headers = nh;
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  o->headers = nh;
  for (char *p = key; *p; p++) *p = (char)tolower((unsigned char)*p);
  size_t klen = strlen(key);
  bool bin = klen > 4 && strcmp(key + klen - 4, "-bin") == 0;
  if (!grpc_header_key_is_legal(grpc_slice_from_static_buffer(key, klen))) {
    snprintf(err, errlen, "invalid RPC header name \"%s\" (allowed: a-z 0-9 - _ .)", key);
    free(key);
    free(value);
    return -1;
  }
  if (!bin && !grpc_header_nonbin_value_is_legal(grpc_slice_from_static_buffer(value, strlen(value)))) {
    snprintf(err, errlen, "invalid RPC header value for \"%s\" (printable ASCII only)", key);
    free(key);
    free(value);
    return -1;
  }
  o->headers[o->nheaders].key = key;
  o->headers[o->nheaders].value = value;
  o->nheaders++;
  return 0;
}

static int set_flag(struct opts *o, const struct flag_def *f, const char *value, char *err, size_t errlen) {
  char derr[256];
  switch (f->kind) {
  case F_STRING:
    *(const char **)f->dst = value;
    return 0;
  case F_BOOL:
    if (go_parse_bool(value, (bool *)f->dst) != 0) {
      snprintf(err, errlen, "invalid boolean value \"%s\" for -%s", value, f->name);
      return -1;
    }
    return 0;
  case F_DURATION:
    if (go_parse_duration(value, (int64_t *)f->dst, derr, sizeof derr) != 0) {
      snprintf(err, errlen, "invalid value \"%s\" for flag -%s: %s", value, f->name, derr);
      return -1;
    }
    return 0;
  case F_HEADER:
    if (add_header(o, value, derr, sizeof derr) != 0) {
      snprintf(err, errlen, "invalid value \"%s\" for flag -%s: %s", value, f->name, derr);
      return -1;
    }
    return 0;
  }
  return -1;
}

/* Returns 0, or -1 with a message in err. */
static int parse_flags(int argc, char **argv, struct opts *o, char *err, size_t errlen) {
  const struct flag_def defs[] = {
      {"addr", F_STRING, &o->addr},
      {"service", F_STRING, &o->service},
      {"user-agent", F_STRING, &o->user_agent},
      {"connect-timeout", F_DURATION, &o->connect_timeout_ns},
      {"rpc-timeout", F_DURATION, &o->rpc_timeout_ns},
      {"rpc-header", F_HEADER, NULL},
      {"tls", F_BOOL, &o->tls},
      {"tls-no-verify", F_BOOL, &o->tls_no_verify},
      {"tls-ca-cert", F_STRING, &o->tls_ca_cert},
      {"tls-client-cert", F_STRING, &o->tls_client_cert},
      {"tls-client-key", F_STRING, &o->tls_client_key},
      {"tls-server-name", F_STRING, &o->tls_server_name},
      {"v", F_BOOL, &o->verbose},
      {"gzip", F_BOOL, &o->gzip},
      {"h", F_BOOL, &o->help},
      {"help", F_BOOL, &o->help},
  };
  int i = 1;

  while (i < argc) {
    const char *arg = argv[i];
    if (strlen(arg) < 2 || arg[0] != '-') break; /* first non-flag argument */
    size_t minuses = 1;
    if (arg[1] == '-') {
      minuses = 2;
      if (arg[2] == '\0') { /* "--" ends the flags */
        i++;
        break;
      }
    }
    const char *name = arg + minuses;
    if (*name == '-' || *name == '=') {
      snprintf(err, errlen, "bad flag syntax: %s", arg);
      return -1;
    }
    i++;
    const char *eq = strchr(name, '=');
    size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
    const char *value = eq ? eq + 1 : NULL;

    const struct flag_def *f = NULL;
    for (size_t j = 0; j < sizeof defs / sizeof defs[0]; j++) {
      if (strlen(defs[j].name) == nlen && memcmp(defs[j].name, name, nlen) == 0) {
        f = &defs[j];
        break;
      }
    }
    if (!f) {
      snprintf(err, errlen, "flag provided but not defined: -%.*s", (int)nlen, name);
      return -1;
    }
    if (f->kind == F_BOOL) {
      if (!value) value = "true";
    } else if (!value) {
      if (i >= argc) {
        snprintf(err, errlen, "flag needs an argument: -%s", f->name);
        return -1;
      }
      value = argv[i++];
    }
    if (set_flag(o, f, value, err, errlen) != 0) return -1;
  }
  if (o->help) return 0;
  if (i < argc) {
    /* grpc_health_probe silently ignores these; a READY_SCRIPT typo such
     * as "-tls true -addr x" would then probe without -addr. */
    snprintf(err, errlen,
             "unexpected argument \"%s\" (flags must come first; "
             "boolean flags take -flag=false, not -flag false)",
             argv[i]);
    return -1;
  }
  return 0;
}

static int fail(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(char *err, size_t errlen, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
  return -1;
}

static bool given(const char *s) { return s && *s; }

/* grpc_health_probe's checks, in its order (plus -tls-client-key). */
static int validate(const struct opts *o, char *err, size_t errlen) {
  char d[GO_DURATION_BUFSZ];
  if (!given(o->addr)) return fail(err, errlen, "-addr not specified");
  if (o->connect_timeout_ns <= 0)
    return fail(err, errlen, "-connect-timeout must be greater than zero (specified: %s)",
                dur_str(o->connect_timeout_ns, d));
  if (o->rpc_timeout_ns <= 0)
    return fail(err, errlen, "-rpc-timeout must be greater than zero (specified: %s)", dur_str(o->rpc_timeout_ns, d));
  if (!o->tls && o->tls_no_verify) return fail(err, errlen, "specified -tls-no-verify without specifying -tls");
  if (!o->tls && given(o->tls_ca_cert)) return fail(err, errlen, "specified -tls-ca-cert without specifying -tls");
  if (!o->tls && given(o->tls_client_cert))
    return fail(err, errlen, "specified -tls-client-cert without specifying -tls");
  if (!o->tls && given(o->tls_client_key))
    return fail(err, errlen, "specified -tls-client-key without specifying -tls");
  if (!o->tls && given(o->tls_server_name))
    return fail(err, errlen, "specified -tls-server-name without specifying -tls");
  if (given(o->tls_client_cert) && !given(o->tls_client_key))
    return fail(err, errlen, "specified -tls-client-cert without specifying -tls-client-key");
  if (!given(o->tls_client_cert) && given(o->tls_client_key))
    return fail(err, errlen, "specified -tls-client-key without specifying -tls-client-cert");
  if (o->tls_no_verify && given(o->tls_ca_cert))
    return fail(err, errlen, "cannot specify -tls-ca-cert with -tls-no-verify (CA cert would not be used)");
  if (o->tls_no_verify && given(o->tls_server_name))
    return fail(err, errlen,
                "cannot specify -tls-server-name with -tls-no-verify "
                "(server name would not be used)");
  return 0;
}

/* ------------------------------------------------------------------------ */
/* TLS files                                                                */

static char *read_file(const char *path, char *err, size_t errlen) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    snprintf(err, errlen, "open %s: %s", path, strerror(errno));
    return NULL;
  }
  size_t cap = 4096, len = 0;
  char *buf = malloc(cap);
  while (buf) {
    if (len + 1 >= cap) {
      if (cap >= MAX_FILE_BYTES) {
        snprintf(err, errlen, "read %s: file too large", path);
        free(buf);
        buf = NULL;
        break;
      }
      char *nb = realloc(buf, cap * 2);
      if (!nb) {
        free(buf);
        buf = NULL;
        break;
      }
      buf = nb;
      cap *= 2;
    }
    size_t n = fread(buf + len, 1, cap - len - 1, f);
    len += n;
    if (n == 0) {
      if (ferror(f)) {
        snprintf(err, errlen, "read %s: %s", path, strerror(errno));
        free(buf);
        buf = NULL;
      }
      break;
    }
  }
  if (!buf && !*err) snprintf(err, errlen, "read %s: out of memory", path);
  fclose(f);
  if (buf) {
    buf[len] = '\0';
    if (strlen(buf) != len) {
      snprintf(err, errlen, "%s: not a PEM file (contains NUL bytes)", path);
      free(buf);
      return NULL;
    }
  }
  return buf;
}

static int no_passphrase(char *buf, int size, int rwflag, void *u) {
  (void)buf, (void)size, (void)rwflag, (void)u;
  return 0; /* never prompt; encrypted keys are unusable here */
}

static void openssl_reason(char *out, size_t outlen) {
  unsigned long e = ERR_peek_last_error();
  if (e) ERR_error_string_n(e, out, outlen);
  else snprintf(out, outlen, "no PEM data found");
  ERR_clear_error();
}

static int count_certs(const char *pem) {
  BIO *b = BIO_new_mem_buf(pem, -1);
  int n = 0;
  X509 *x;
  if (!b) return 0;
  while ((x = PEM_read_bio_X509(b, NULL, NULL, NULL)) != NULL) {
    n++;
    X509_free(x);
  }
  ERR_clear_error();
  BIO_free(b);
  return n;
}

static int check_key_pair(const struct opts *o, const char *cert_pem, const char *key_pem, char *err, size_t errlen) {
  char why[256];
  int rc = -1;
  BIO *cb = BIO_new_mem_buf(cert_pem, -1);
  BIO *kb = BIO_new_mem_buf(key_pem, -1);
  X509 *leaf = cb ? PEM_read_bio_X509(cb, NULL, NULL, NULL) : NULL;
  EVP_PKEY *key = NULL;

  if (!leaf) {
    openssl_reason(why, sizeof why);
    snprintf(err, errlen, "no certificate found in %s (%s)", o->tls_client_cert, why);
    goto out;
  }
  key = kb ? PEM_read_bio_PrivateKey(kb, NULL, no_passphrase, NULL) : NULL;
  if (!key) {
    openssl_reason(why, sizeof why);
    snprintf(err, errlen, "no usable private key found in %s (%s; encrypted keys are not supported)", o->tls_client_key,
             why);
    goto out;
  }
  if (X509_check_private_key(leaf, key) != 1) {
    ERR_clear_error();
    snprintf(err, errlen, "private key %s does not match certificate %s", o->tls_client_key, o->tls_client_cert);
    goto out;
  }
  rc = 0;
out:
  EVP_PKEY_free(key);
  X509_free(leaf);
  BIO_free(kb);
  BIO_free(cb);
  return rc;
}

static void free_tls_files(struct tls_files *t) {
  free(t->ca_pem);
  free(t->cert_pem);
  if (t->key_pem) {
    OPENSSL_cleanse(t->key_pem, strlen(t->key_pem));
    free(t->key_pem);
  }
  memset(t, 0, sizeof *t);
}

/* Reads and checks the -tls-* files; on failure writes a message. */
static int load_tls_files(const struct opts *o, struct tls_files *t, char *err, size_t errlen) {
  char why[512] = "";
  if (given(o->tls_client_cert)) {
    t->cert_pem = read_file(o->tls_client_cert, why, sizeof why);
    if (t->cert_pem) t->key_pem = read_file(o->tls_client_key, why, sizeof why);
    if (!t->cert_pem || !t->key_pem || check_key_pair(o, t->cert_pem, t->key_pem, why, sizeof why) != 0) {
      snprintf(err, errlen, "failed to load tls client cert/key pair: %s", why);
      return -1;
    }
  }
  if (given(o->tls_ca_cert)) {
    t->ca_pem = read_file(o->tls_ca_cert, why, sizeof why);
    if (!t->ca_pem) {
      snprintf(err, errlen, "failed to load root CA certificates from file (%s): %s", o->tls_ca_cert, why);
      return -1;
    }
    if (count_certs(t->ca_pem) == 0) {
      snprintf(err, errlen, "no root CA certs parsed from file %s", o->tls_ca_cert);
      return -1;
    }
  }
  return 0;
}

/* ------------------------------------------------------------------------ */
/* gRPC                                                                     */

static bool g_core_logs;

static void core_log(gpr_log_func_args *a) {
  if (!g_core_logs) return;
  const char *file = strrchr(a->file, '/');
  fprintf(stderr, "grpc %s %s:%d] %s\n", gpr_log_severity_string(a->severity), file ? file + 1 : a->file, a->line,
          a->message);
}

static grpc_channel_credentials *make_credentials(const struct opts *o, const struct tls_files *t) {
  if (!o->tls) return grpc_insecure_credentials_create();

  if (!o->tls_no_verify) {
    grpc_ssl_pem_key_cert_pair kp = {t->key_pem, t->cert_pem};
    /* NULL roots: GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, else the system
     * trust store, else gRPC's bundled roots. */
    return grpc_ssl_credentials_create_ex(t->ca_pem, t->cert_pem ? &kp : NULL, NULL, NULL);
  }

  /* -tls-no-verify: neither the chain nor the host name is checked. */
  grpc_tls_credentials_options *to = grpc_tls_credentials_options_create();
  grpc_tls_credentials_options_set_verify_server_cert(to, 0);
  grpc_tls_certificate_verifier *v = grpc_tls_certificate_verifier_no_op_create();
  grpc_tls_credentials_options_set_certificate_verifier(to, v);
  grpc_tls_certificate_verifier_release(v);
  grpc_tls_credentials_options_set_check_call_host(to, 0);
  if (t->cert_pem) {
    grpc_tls_identity_pairs *pairs = grpc_tls_identity_pairs_create();
    grpc_tls_identity_pairs_add_pair(pairs, t->key_pem, t->cert_pem);
    grpc_tls_certificate_provider *p = grpc_tls_certificate_provider_static_data_create(NULL, pairs);
    grpc_tls_credentials_options_set_certificate_provider(to, p);
    grpc_tls_certificate_provider_release(p);
    grpc_tls_credentials_options_watch_identity_key_cert_pairs(to);
  }
  return grpc_tls_credentials_create(to);
}

static const char *state_name(grpc_connectivity_state s) {
  switch (s) {
  case GRPC_CHANNEL_IDLE:
    return "IDLE";
  case GRPC_CHANNEL_CONNECTING:
    return "CONNECTING";
  case GRPC_CHANNEL_READY:
    return "READY";
  case GRPC_CHANNEL_TRANSIENT_FAILURE:
    return "TRANSIENT_FAILURE";
  case GRPC_CHANNEL_SHUTDOWN:
    return "SHUTDOWN";
  }
  return "?";
}

/* Go's codes.Code.String(), for messages shaped like grpc_health_probe's. */
static const char *code_name(grpc_status_code c) {
  static const char *const names[] = {
      "OK",       "Canceled",        "Unknown",          "InvalidArgument",   "DeadlineExceeded",
      "NotFound", "AlreadyExists",   "PermissionDenied", "ResourceExhausted", "FailedPrecondition",
      "Aborted",  "OutOfRange",      "Unimplemented",    "Internal",          "Unavailable",
      "DataLoss", "Unauthenticated",
  };
  if ((unsigned)c < sizeof names / sizeof names[0]) return names[c];
  return "Code(?)";
}

/* True when the target names this host (localhost, 127/8, ::1, a unix
 * socket).  gRPC core would send even those through $grpc_proxy,
 * $https_proxy or $http_proxy; grpc_health_probe (Go) never proxies
 * loopback, and a READY_SCRIPT must not depend on the VM's proxy settings. */
static bool is_loopback_target(const char *target) {
  const char *t = target;
  char host[256];

  if (strncmp(t, "unix:", 5) == 0 || strncmp(t, "unix-abstract:", 14) == 0) return true;
  if (strncmp(t, "dns:", 4) == 0) {
    t += 4;
    if (t[0] == '/' && t[1] == '/') { /* dns://authority/host:port */
      t = strchr(t + 2, '/');
      if (!t) return false;
      t++;
    }
  } else if (strncmp(t, "ipv4:", 5) == 0 || strncmp(t, "ipv6:", 5) == 0) {
    t += 5;
  }
  const char *start = t, *end;
  if (*t == '[') {
    start = t + 1;
    end = strchr(start, ']');
    if (!end) return false;
  } else {
    const char *first = strchr(t, ':'), *last = strrchr(t, ':');
    end = first && first == last ? first : t + strlen(t); /* several ':' = bare IPv6 */
    const char *comma = strchr(t, ',');
    if (comma && comma < end) end = comma;
  }
  size_t n = (size_t)(end - start);
  if (n == 0 || n >= sizeof host) return false;
  memcpy(host, start, n);
  host[n] = '\0';
  if (strcasecmp(host, "localhost") == 0) return true;
  struct in_addr a4;
  if (inet_pton(AF_INET, host, &a4) == 1) return (ntohl(a4.s_addr) >> 24) == 127;
  struct in6_addr a6;
  if (inet_pton(AF_INET6, host, &a6) == 1)
    return IN6_IS_ADDR_LOOPBACK(&a6) || (IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127);
  return false;
}

static gpr_timespec deadline_in(int64_t ns) {
  return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_nanos(ns, GPR_TIMESPAN));
}

/* Waits until the channel is READY or the deadline passes.  Returns the last
 * state seen. */
static grpc_connectivity_state wait_ready(grpc_channel *ch, grpc_completion_queue *cq, gpr_timespec deadline) {
  int tag;
  grpc_connectivity_state st = grpc_channel_check_connectivity_state(ch, 1);
  while (st != GRPC_CHANNEL_READY && st != GRPC_CHANNEL_SHUTDOWN) {
    grpc_channel_watch_connectivity_state(ch, st, deadline, cq, &tag);
    /* the watch always completes, at the latest at the deadline */
    grpc_event ev = grpc_completion_queue_pluck(cq, &tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    st = grpc_channel_check_connectivity_state(ch, 1);
    if (ev.type != GRPC_OP_COMPLETE || !ev.success) break; /* deadline */
  }
  return st;
}

struct call_result {
  bool completed; /* batch finished */
  grpc_status_code status;
  char *details; /* status message (malloc'd) */
  char *debug;   /* core's error string (gpr_malloc'd) */
  grpc_byte_buffer *response;
};

static void free_call_result(struct call_result *r) {
  free(r->details);
  if (r->debug) gpr_free(r->debug);
  if (r->response) grpc_byte_buffer_destroy(r->response);
  memset(r, 0, sizeof *r);
}

/* One unary Health/Check call; fills r.  wait_for_ready=false (fail fast),
 * as grpc-go's default. */
static void health_check_call(grpc_channel *ch, grpc_completion_queue *cq, const struct opts *o, int64_t timeout_ns,
                              struct call_result *r) {
  memset(r, 0, sizeof *r);
  r->status = GRPC_STATUS_UNKNOWN;

  Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
  req.service = (char *)(o->service ? o->service : "");
  size_t reqlen = grpc__health__v1__health_check_request__get_packed_size(&req);
  grpc_slice reqslice = grpc_slice_malloc(reqlen);
  grpc__health__v1__health_check_request__pack(&req, GRPC_SLICE_START_PTR(reqslice));
  grpc_byte_buffer *reqbuf = grpc_raw_byte_buffer_create(&reqslice, 1);
  grpc_slice_unref(reqslice);

  grpc_metadata *md = NULL;
  if (o->nheaders) {
    md = calloc(o->nheaders, sizeof *md);
    if (!md) {
      r->details = strdup("out of memory");
      grpc_byte_buffer_destroy(reqbuf);
      return;
    }
    for (size_t i = 0; i < o->nheaders; i++) {
      md[i].key = grpc_slice_from_copied_string(o->headers[i].key);
      md[i].value = grpc_slice_from_copied_string(o->headers[i].value);
    }
  }

  gpr_timespec deadline = deadline_in(timeout_ns);
  grpc_slice method = grpc_slice_from_static_string(CHECK_METHOD);
  grpc_call *call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method, NULL, deadline, NULL);

  grpc_metadata_array initial_md, trailing_md;
  grpc_metadata_array_init(&initial_md);
  grpc_metadata_array_init(&trailing_md);
  grpc_slice details = grpc_empty_slice();
  const char *debug = NULL;

  grpc_op ops[6];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].data.send_initial_metadata.count = o->nheaders;
  ops[0].data.send_initial_metadata.metadata = md;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = reqbuf;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &initial_md;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &r->response;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.trailing_metadata = &trailing_md;
  ops[5].data.recv_status_on_client.status = &r->status;
  ops[5].data.recv_status_on_client.status_details = &details;
  ops[5].data.recv_status_on_client.error_string = &debug;

  int tag;
  grpc_call_error ce = grpc_call_start_batch(call, ops, 6, &tag, NULL);
  if (ce != GRPC_CALL_OK) {
    char buf[128];
    snprintf(buf, sizeof buf, "grpc_call_start_batch failed (%d)", (int)ce);
    r->details = strdup(buf);
  } else {
    /* The call's deadline bounds the batch; the extra second only guards
     * against a core bug.  If it ever fires, cancel and collect. */
    gpr_timespec guard = gpr_time_add(deadline, gpr_time_from_seconds(1, GPR_TIMESPAN));
    grpc_event ev = grpc_completion_queue_pluck(cq, &tag, guard, NULL);
    if (ev.type == GRPC_QUEUE_TIMEOUT) {
      grpc_call_cancel(call, NULL);
      ev = grpc_completion_queue_pluck(cq, &tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    }
    r->completed = ev.type == GRPC_OP_COMPLETE;
    char *gdetails = grpc_slice_to_c_string(details);
    r->details = strdup(gdetails ? gdetails : "");
    gpr_free(gdetails);
    r->debug = (char *)debug;
  }

  grpc_slice_unref(details);
  grpc_metadata_array_destroy(&initial_md);
  grpc_metadata_array_destroy(&trailing_md);
  grpc_call_unref(call);
  grpc_byte_buffer_destroy(reqbuf);
  for (size_t i = 0; i < o->nheaders; i++) {
    grpc_slice_unref(md[i].key);
    grpc_slice_unref(md[i].value);
  }
  free(md);
}

static const char *serving_status_name(int s, char *buf, size_t len) {
  switch (s) {
  case GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__UNKNOWN:
    return "UNKNOWN";
  case GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING:
    return "SERVING";
  case GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING:
    return "NOT_SERVING";
  case GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN:
    return "SERVICE_UNKNOWN";
  }
  snprintf(buf, len, "%d", s); /* Go prints unknown enum values as numbers */
  return buf;
}

/* Decodes the response; returns the serving status or -1. */
static int decode_response(grpc_byte_buffer *bb) {
  grpc_byte_buffer_reader rd;
  if (!grpc_byte_buffer_reader_init(&rd, bb)) return -1;
  grpc_slice s = grpc_byte_buffer_reader_readall(&rd);
  grpc_byte_buffer_reader_destroy(&rd);
  Grpc__Health__V1__HealthCheckResponse *resp =
      grpc__health__v1__health_check_response__unpack(NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
  grpc_slice_unref(s);
  if (!resp) return -1;
  int st = (int)resp->status;
  grpc__health__v1__health_check_response__free_unpacked(resp, NULL);
  return st < 0 ? -1 : st;
}

/* After a connect timeout in TRANSIENT_FAILURE, a fail-fast call returns at
 * once with core's reason (refused, TLS verification error, ...). */
static char *failure_reason(grpc_channel *ch, grpc_completion_queue *cq, const struct opts *o) {
  struct call_result r;
  health_check_call(ch, cq, o, 250 * 1000000LL, &r);
  char *reason = NULL;
  if (r.completed && r.status == GRPC_STATUS_UNAVAILABLE && r.details && *r.details) {
    reason = r.details;
    r.details = NULL;
  }
  free_call_result(&r);
  return reason;
}

static int probe(const struct opts *o, const struct tls_files *t) {
  char d1[GO_DURATION_BUFSZ], d2[GO_DURATION_BUFSZ];
  int rc;
  const char *target = o->addr;
  char *owned_target = NULL;

  /* Go dials ":port" on the local host; gRPC core's DNS resolver needs a
   * host name. */
  if (target[0] == ':') {
    size_t n = strlen(target) + sizeof "localhost";
    owned_target = malloc(n);
    if (!owned_target) {
      say("error: out of memory");
      return EXIT_CONNECT;
    }
    snprintf(owned_target, n, "localhost%s", target);
    target = owned_target;
  }

  grpc_channel_credentials *creds = make_credentials(o, t);
  grpc_arg args[5];
  size_t nargs = 0;
  memset(args, 0, sizeof args);
  args[nargs].type = GRPC_ARG_STRING;
  args[nargs].key = (char *)GRPC_ARG_PRIMARY_USER_AGENT_STRING;
  args[nargs++].value.string = (char *)o->user_agent;
  args[nargs].type = GRPC_ARG_INTEGER;
  args[nargs].key = (char *)GRPC_ARG_SERVICE_CONFIG_DISABLE_RESOLUTION;
  args[nargs++].value.integer = 1;
  if (o->tls && given(o->tls_server_name)) {
    args[nargs].type = GRPC_ARG_STRING;
    args[nargs].key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
    args[nargs++].value.string = (char *)o->tls_server_name;
  }
  if (o->gzip) {
    args[nargs].type = GRPC_ARG_INTEGER;
    args[nargs].key = (char *)GRPC_COMPRESSION_CHANNEL_DEFAULT_ALGORITHM;
    args[nargs++].value.integer = GRPC_COMPRESS_GZIP;
  }
  if (is_loopback_target(target)) {
    args[nargs].type = GRPC_ARG_INTEGER;
    args[nargs].key = (char *)GRPC_ARG_ENABLE_HTTP_PROXY;
    args[nargs++].value.integer = 0;
  }
  grpc_channel_args chargs = {nargs, args};

  grpc_channel *ch = grpc_channel_create(target, creds, &chargs);
  grpc_channel_credentials_release(creds);
  grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);

  if (o->verbose) say("establishing connection");
  int64_t t0 = now_ns();
  grpc_connectivity_state st = wait_ready(ch, cq, deadline_in(o->connect_timeout_ns));
  int64_t conn_ns = now_ns() - t0;

  if (st != GRPC_CHANNEL_READY) {
    char *reason = st == GRPC_CHANNEL_TRANSIENT_FAILURE ? failure_reason(ch, cq, o) : NULL;
    if (st == GRPC_CHANNEL_SHUTDOWN) say("error: failed to connect service at \"%s\": channel shut down", o->addr);
    else if (reason)
      say("timeout: failed to connect service \"%s\" within %s: %s", o->addr, dur_str(o->connect_timeout_ns, d1),
          reason);
    else
      say("timeout: failed to connect service \"%s\" within %s (channel %s)", o->addr,
          dur_str(o->connect_timeout_ns, d1), state_name(st));
    free(reason);
    rc = EXIT_CONNECT;
    goto out;
  }
  if (o->verbose) say("connection established (took %s)", dur_str(conn_ns, d1));

  struct call_result r;
  int64_t t1 = now_ns();
  health_check_call(ch, cq, o, o->rpc_timeout_ns, &r);
  int64_t rpc_ns = now_ns() - t1;

  if (!r.completed || r.status != GRPC_STATUS_OK) {
    const char *msg = r.details ? r.details : "";
    if (r.status == GRPC_STATUS_UNIMPLEMENTED)
      say("error: this server does not implement the grpc health protocol "
          "(grpc.health.v1.Health): %s",
          msg);
    else if (r.status == GRPC_STATUS_DEADLINE_EXCEEDED)
      say("timeout: health rpc did not complete within %s", dur_str(o->rpc_timeout_ns, d1));
    else say("error: health rpc failed: rpc error: code = %s desc = %s", code_name(r.status), msg);
    if (o->verbose && r.debug) say("rpc debug error: %s", r.debug);
    rc = EXIT_RPC;
  } else if (!r.response) {
    say("error: health rpc failed: server finished the call with OK but sent no response");
    rc = EXIT_RPC;
  } else {
    int hs = decode_response(r.response);
    char nbuf[24];
    if (hs < 0) {
      say("error: health rpc failed: cannot decode HealthCheckResponse (%zu bytes)",
          grpc_byte_buffer_length(r.response));
      rc = EXIT_RPC;
    } else if (hs != GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING) {
      say("service unhealthy (responded with \"%s\")", serving_status_name(hs, nbuf, sizeof nbuf));
      rc = EXIT_UNHEALTHY;
    } else {
      if (o->verbose) say("time elapsed: connect=%s rpc=%s", dur_str(conn_ns, d1), dur_str(rpc_ns, d2));
      printf("status: %s\n", serving_status_name(hs, nbuf, sizeof nbuf));
      fflush(stdout);
      rc = EXIT_SERVING;
    }
  }
  free_call_result(&r);

out:
  grpc_channel_destroy(ch);
  grpc_completion_queue_shutdown(cq);
  for (;;) {
    grpc_event ev = grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
  }
  grpc_completion_queue_destroy(cq);
  free(owned_target);
  return rc;
}

int main(int argc, char **argv) {
  struct opts o = {
      .service = "",
      .user_agent = PROG,
      .connect_timeout_ns = 1000000000LL,
      .rpc_timeout_ns = 1000000000LL,
  };
  struct tls_files t = {0};
  char err[1024] = "";
  char d1[GO_DURATION_BUFSZ], d2[GO_DURATION_BUFSZ];

  if (parse_flags(argc, argv, &o, err, sizeof err) != 0) {
    say("error: %s (see -h)", err);
    free_headers(&o);
    return EXIT_BAD_ARGS;
  }
  if (o.help) {
    usage(stdout);
    free_headers(&o);
    return EXIT_SERVING;
  }
  if (validate(&o, err, sizeof err) != 0) {
    say("error: %s", err);
    free_headers(&o);
    return EXIT_BAD_ARGS;
  }
  if (o.verbose) {
    say("parsed options:");
    say("> addr=%s conn_timeout=%s rpc_timeout=%s", o.addr, dur_str(o.connect_timeout_ns, d1),
        dur_str(o.rpc_timeout_ns, d2));
    say("> tls=%s", o.tls ? "true" : "false");
    if (o.tls) {
      say("  > no-verify=%s", o.tls_no_verify ? "true" : "false");
      say("  > ca-cert=%s", o.tls_ca_cert ? o.tls_ca_cert : "");
      say("  > client-cert=%s", o.tls_client_cert ? o.tls_client_cert : "");
      say("  > client-key=%s", o.tls_client_key ? o.tls_client_key : "");
      say("  > server-name=%s", o.tls_server_name ? o.tls_server_name : "");
    }
    for (size_t i = 0; i < o.nheaders; i++) say("> rpc-header %s: %s", o.headers[i].key, o.headers[i].value);
  }
  if (o.tls && load_tls_files(&o, &t, err, sizeof err) != 0) {
    say("error: failed to initialize tls credentials: %s", err);
    free_tls_files(&t);
    free_headers(&o);
    return EXIT_BAD_ARGS;
  }

  g_core_logs = o.verbose || getenv("GRPC_VERBOSITY") || getenv("GRPC_TRACE");
  gpr_set_log_function(core_log);
  grpc_init();
  int rc = probe(&o, &t);
  grpc_shutdown();

  free_tls_files(&t);
  free_headers(&o);
  return rc;
}
