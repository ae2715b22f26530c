/* tls: see tls.h. */
#include "tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "renew.h"

static int alpn_refused_idx = -1;

const char *fs_tls_error_string(const char *fallback) {
  static char buf[256];
  unsigned long e = ERR_peek_last_error();
  if (!e) return fallback;
  ERR_error_string_n(e, buf, sizeof(buf));
  ERR_clear_error();
  return buf;
}

int fs_tls_alpn_refused(const SSL *ssl) {
  return alpn_refused_idx >= 0 && SSL_get_ex_data(ssl, alpn_refused_idx) != NULL;
}

static int read_file(const char *path, char **out, size_t *outlen) {
  FILE *f = fopen(path, "rb");
  char *buf = NULL;
  size_t len = 0, cap = 0, n;
  if (!f) return -1;
  do {
    if (len + 4096 + 1 > cap) {
      char *nb;
      cap = cap ? cap * 2 : 8192;
      if (cap > (16u << 20) || !(nb = realloc(buf, cap))) {
        free(buf);
        fclose(f);
        errno = EFBIG;
        return -1;
      }
      buf = nb;
    }
    n = fread(buf + len, 1, 4096, f);
    len += n;
  } while (n > 0);
  fclose(f);
  buf[len] = '\0';
  *out = buf;
  *outlen = len;
  return 0;
}

int fs_tls_read_pem(const char *value, char **pem, size_t *len, const char **source, char *err, size_t errlen) {
  struct stat st;
  if (stat(value, &st) == 0) {
    if (read_file(value, pem, len) < 0) {
      snprintf(err, errlen, "cannot read %s: %s", value, strerror(errno));
      return -1;
    }
    *source = "file";
  } else {
    /* Not a file: base64 of a PEM (OpenNebula text64 inputs). */
    size_t vl = strlen(value), i, j = 0;
    char *clean = malloc(vl + 1);
    unsigned char *dec;
    int n;
    if (!clean) return snprintf(err, errlen, "out of memory"), -1;
    for (i = 0; i < vl; i++)
      if (value[i] != '\n' && value[i] != '\r' && value[i] != ' ') clean[j++] = value[i];
    clean[j] = '\0';
    dec = malloc(j / 4 * 3 + 4);
    n = (j % 4 == 0 && dec) ? EVP_DecodeBlock(dec, (unsigned char *)clean, (int)j) : -1;
    free(clean);
    if (n < 0 || !memmem(dec, (size_t)n, "-----BEGIN ", 11)) {
      free(dec);
      snprintf(err, errlen, "neither a readable file nor base64-encoded PEM");
      return -1;
    }
    dec[n] = '\0'; /* EVP_DecodeBlock keeps padding zeros: PEM parsing stops at them */
    *pem = (char *)dec;
    *len = strlen((char *)dec);
    *source = "base64";
  }
  return 0;
}

static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                       unsigned int inlen, void *arg) {
  unsigned int i = 0;
  (void)arg;
  while (i < inlen) {
    unsigned int l = in[i];
    if (i + 1 + l > inlen) break;
    if (l == 2 && memcmp(in + i + 1, "h2", 2) == 0) {
      *out = in + i + 1;
      *outlen = 2;
      return SSL_TLSEXT_ERR_OK;
    }
    i += 1 + l;
  }
  SSL_set_ex_data(ssl, alpn_refused_idx, (void *)1);
  return SSL_TLSEXT_ERR_ALERT_FATAL;
}

/* --- auto-generated certificates ------------------------------------- */

/* Lifetimes of new auto-generated certificates (seconds): renew.h's, or
 * the test-only FS_TEST_CERT_LIFETIME_S / FS_TEST_CA_LIFETIME_S. */
static int64_t server_life_s = FS_RENEW_SERVER_LIFETIME_S, ca_life_s = FS_RENEW_CA_LIFETIME_S;

static int64_t time_of(const ASN1_TIME *t) {
  struct tm tm;
  if (!t || !ASN1_TIME_to_tm(t, &tm)) return 0;
  return (int64_t)timegm(&tm);
}

/* RFC 3339 UTC, seconds: "2027-03-01T12:00:00Z". */
static void fmt_time(int64_t t, char *buf, size_t len) {
  time_t tt = (time_t)t;
  struct tm tm;
  if (!gmtime_r(&tt, &tm) || !strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm)) snprintf(buf, len, "unknown");
}

static int add_ext(X509 *x, X509V3_CTX *ctx, int nid, const char *value) {
  X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, ctx, nid, value);
  int ok;
  if (!ext) return -1;
  ok = X509_add_ext(x, ext, -1);
  X509_EXTENSION_free(ext);
  return ok ? 0 : -1;
}

/* A certificate for |key| signed by |signer_key| (|issuer| NULL: a
 * self-signed CA), valid from |not_before| to |not_after|. */
static X509 *make_cert(EVP_PKEY *key, EVP_PKEY *signer_key, X509 *issuer, const char *cn, const char *san,
                       int64_t not_before, int64_t not_after) {
  X509 *x = X509_new();
  X509_NAME *name;
  X509V3_CTX ctx;
  BIGNUM *bn = BN_new();
  int is_ca = issuer == NULL;
  if (!x || !bn || !BN_rand(bn, 127, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) ||
      !BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) || !X509_set_version(x, 2) ||
      !ASN1_TIME_set(X509_getm_notBefore(x), (time_t)not_before) ||
      !ASN1_TIME_set(X509_getm_notAfter(x), (time_t)not_after) || !X509_set_pubkey(x, key))
    goto fail;
  name = X509_get_subject_name(x);
  X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, (const unsigned char *)"flower-sidecar", -1, -1, 0);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
  if (!X509_set_issuer_name(x, is_ca ? name : X509_get_subject_name(issuer))) goto fail;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, is_ca ? x : issuer, x, NULL, NULL, 0);
  if (add_ext(x, &ctx, NID_basic_constraints, is_ca ? "critical,CA:TRUE,pathlen:0" : "critical,CA:FALSE") ||
      add_ext(x, &ctx, NID_key_usage, is_ca ? "critical,keyCertSign,cRLSign" : "critical,digitalSignature") ||
      add_ext(x, &ctx, NID_subject_key_identifier, "hash") ||
      (!is_ca && (add_ext(x, &ctx, NID_authority_key_identifier, "keyid:always") ||
                  add_ext(x, &ctx, NID_ext_key_usage, "serverAuth") || add_ext(x, &ctx, NID_subject_alt_name, san))))
    goto fail;
  if (!X509_sign(x, signer_key, EVP_sha256())) goto fail;
  BN_free(bn);
  return x;
fail:
  BN_free(bn);
  X509_free(x);
  return NULL;
}

/* |x| or |key| as PEM text (caller frees), or NULL. */
static char *to_pem(X509 *x, EVP_PKEY *key) {
  BIO *b = BIO_new(BIO_s_mem());
  char *data, *out = NULL;
  long n;
  if (!b) return NULL;
  if (x ? PEM_write_bio_X509(b, x) : PEM_write_bio_PrivateKey(b, key, NULL, NULL, 0, NULL, NULL)) {
    n = BIO_get_mem_data(b, &data);
    if (n > 0 && (out = malloc((size_t)n + 1))) {
      memcpy(out, data, (size_t)n);
      out[n] = '\0';
    }
  }
  BIO_free(b);
  return out;
}

/* Writes |text| to |path| atomically (a temporary file renamed over it). */
static int write_text(const char *path, const char *text, mode_t mode) {
  char tmp[4200];
  size_t len = strlen(text);
  int fd, ok;
  snprintf(tmp, sizeof(tmp), "%s.tmp%ld", path, (long)getpid());
  fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) return -1;
  ok = write(fd, text, len) == (ssize_t)len;
  if (close(fd) != 0 || !ok || rename(tmp, path) != 0) {
    int e = errno ? errno : EIO;
    unlink(tmp);
    errno = e;
    return -1;
  }
  return 0;
}

static X509 *load_cert_file(const char *path) {
  FILE *f = fopen(path, "r");
  X509 *x;
  if (!f) return NULL;
  x = PEM_read_X509(f, NULL, NULL, NULL);
  fclose(f);
  return x;
}

static EVP_PKEY *load_key_file(const char *path) {
  FILE *f = fopen(path, "r");
  EVP_PKEY *k;
  if (!f) return NULL;
  k = PEM_read_PrivateKey(f, NULL, NULL, NULL);
  fclose(f);
  return k;
}
static int is_ip(const char *s) {
  unsigned char b[16];
  return inet_pton(AF_INET, s, b) == 1 || inet_pton(AF_INET6, s, b) == 1;
}

/* The SAN names the server certificate must cover, "DNS:a,IP:b,..." in |san|
 * and one per entry in |names| (for checking an existing certificate). */
static int collect_sans(const fs_config *cfg, char *san, size_t sanlen, char names[][256], int maxnames) {
  char host[256];
  struct ifaddrs *ifa, *i;
  int n = 0, k;
  size_t used = 0;
  san[0] = '\0';
#define ADD_NAME(s)                                                                                                    \
  do {                                                                                                                 \
    int dup_ = 0, j_;                                                                                                  \
    for (j_ = 0; j_ < n; j_++) dup_ |= !strcmp(names[j_], (s));                                                        \
    if (!dup_ && n < maxnames && strlen(s) < 256) {                                                                    \
      strcpy(names[n++], (s));                                                                                         \
      used += (size_t)snprintf(san + used, used < sanlen ? sanlen - used : 0, "%s%s:%s", used ? "," : "",              \
                               is_ip(s) ? "IP" : "DNS", (s));                                                          \
    }                                                                                                                  \
  } while (0)
  if (gethostname(host, sizeof(host)) == 0 && host[0]) {
    host[sizeof(host) - 1] = '\0';
    ADD_NAME(host);
  }
  ADD_NAME("localhost");
  ADD_NAME("127.0.0.1");
  ADD_NAME("::1");
  if (getifaddrs(&ifa) == 0) {
    for (i = ifa; i; i = i->ifa_next) {
      char a[INET6_ADDRSTRLEN];
      if (!i->ifa_addr || (i->ifa_flags & IFF_LOOPBACK)) continue;
      if (i->ifa_addr->sa_family == AF_INET) {
        inet_ntop(AF_INET, &((struct sockaddr_in *)i->ifa_addr)->sin_addr, a, sizeof(a));
      } else if (i->ifa_addr->sa_family == AF_INET6) {
        struct in6_addr *a6 = &((struct sockaddr_in6 *)i->ifa_addr)->sin6_addr;
        if (IN6_IS_ADDR_LINKLOCAL(a6)) continue; /* needs a zone id: useless in a certificate */
        inet_ntop(AF_INET6, a6, a, sizeof(a));
      } else {
        continue;
      }
      ADD_NAME(a);
    }
    freeifaddrs(ifa);
  }
  for (k = 0; k < cfg->n_tls_sans; k++) {
    const char *extra = cfg->tls_sans[k];
    ADD_NAME(extra);
  }
#undef ADD_NAME
  return n;
}

/* What --tls-dir holds or must hold: the PEM texts of the CA and the server
 * certificate, which of them are new (not written yet), and why. */
typedef struct autogen {
  char dir_ca[4096], dir_ca_key[4096], dir_cert[4096], dir_key[4096];
  char *ca_pem, *ca_key_pem, *cert_pem, *key_pem;
  int new_ca, new_cert;
  int64_t ca_not_after, not_after;
  char ca_why[160], cert_why[400];
} autogen;

static void autogen_free(autogen *a) {
  if (a->ca_key_pem) OPENSSL_cleanse(a->ca_key_pem, strlen(a->ca_key_pem));
  if (a->key_pem) OPENSSL_cleanse(a->key_pem, strlen(a->key_pem));
  free(a->ca_pem);
  free(a->ca_key_pem);
  free(a->cert_pem);
  free(a->key_pem);
  a->ca_pem = a->ca_key_pem = a->cert_pem = a->key_pem = NULL;
}

static int make_dir(const char *d, char *err, size_t errlen) {
  if (mkdir(d, 0755) < 0 && errno != EEXIST) {
    /* Create parents too: /var/lib/flower-sidecar/tls on a fresh VM. */
    char tmp[4096], *p;
    snprintf(tmp, sizeof(tmp), "%s", d);
    for (p = tmp + 1; *p; p++)
      if (*p == '/') {
        *p = '\0';
        mkdir(tmp, 0755);
        *p = '/';
      }
    if (mkdir(d, 0755) < 0 && errno != EEXIST) {
      snprintf(err, errlen, "cannot create --tls-dir %s: %s", d, strerror(errno));
      return -1;
    }
  }
  return 0;
}

/* Reads cfg->tls_dir and decides, at |now|, what must be renewed (renew.h:
 * a missing, unusable or mismatched file, less than a third of the
 * lifetime left, a name of the host not covered); generates the new
 * certificates in memory.  Writes nothing (autogen_write).  Returns 0, or
 * -1 with a reason in |err|. */
static int autogen_plan(const fs_config *cfg, int64_t now, autogen *a, char *err, size_t errlen) {
  char san[4096], names[64][256];
  X509 *ca = NULL, *srv = NULL;
  EVP_PKEY *ca_key = NULL, *srv_key = NULL;
  int n, i, rc = -1;
  const char *d = cfg->tls_dir;
  memset(a, 0, sizeof(*a));
  if (make_dir(d, err, errlen) < 0) return -1;
  snprintf(a->dir_ca, sizeof(a->dir_ca), "%s/ca.pem", d);
  snprintf(a->dir_ca_key, sizeof(a->dir_ca_key), "%s/ca.key", d);
  snprintf(a->dir_cert, sizeof(a->dir_cert), "%s/server.pem", d);
  snprintf(a->dir_key, sizeof(a->dir_key), "%s/server.key", d);
  n = collect_sans(cfg, san, sizeof(san), names, 64);

  ca = load_cert_file(a->dir_ca);
  ca_key = load_key_file(a->dir_ca_key);
  if (!ca || !ca_key || X509_check_private_key(ca, ca_key) != 1)
    snprintf(a->ca_why, sizeof(a->ca_why), "no usable CA and key in %s", d);
  else if (fs_renew_due(now, time_of(X509_get0_notBefore(ca)), time_of(X509_get0_notAfter(ca))))
    snprintf(a->ca_why, sizeof(a->ca_why), "less than a third of its lifetime left");
  ERR_clear_error();
  if (a->ca_why[0]) {
    X509_free(ca);
    EVP_PKEY_free(ca_key);
    ca = NULL;
    if (!(ca_key = EVP_EC_gen("P-256")) || !(ca = make_cert(ca_key, ca_key, NULL, "flower-sidecar CA", NULL,
                                                            now - fs_renew_backdate_s(ca_life_s), now + ca_life_s))) {
      snprintf(err, errlen, "cannot create a CA: %s", fs_tls_error_string("openssl error"));
      goto out;
    }
    a->new_ca = 1;
  }
  a->ca_not_after = time_of(X509_get0_notAfter(ca));

  if (a->new_ca) {
    snprintf(a->cert_why, sizeof(a->cert_why), "signed by the new CA");
  } else {
    srv = load_cert_file(a->dir_cert);
    srv_key = load_key_file(a->dir_key);
    if (!srv || !srv_key || X509_check_private_key(srv, srv_key) != 1)
      snprintf(a->cert_why, sizeof(a->cert_why), "no usable certificate and key in %s", d);
    else if (X509_check_issued(ca, srv) != X509_V_OK)
      snprintf(a->cert_why, sizeof(a->cert_why), "not signed by the CA in %s", d);
    else if (fs_renew_due(now, time_of(X509_get0_notBefore(srv)), time_of(X509_get0_notAfter(srv))))
      snprintf(a->cert_why, sizeof(a->cert_why), "less than a third of its lifetime left");
    for (i = 0; !a->cert_why[0] && i < n; i++) {
      int ok = is_ip(names[i]) ? X509_check_ip_asc(srv, names[i], 0) : X509_check_host(srv, names[i], 0, 0, NULL);
      if (ok != 1) snprintf(a->cert_why, sizeof(a->cert_why), "does not cover %.255s", names[i]);
    }
    ERR_clear_error();
  }
  if (a->cert_why[0]) {
    X509_free(srv);
    EVP_PKEY_free(srv_key);
    srv = NULL;
    if (!(srv_key = EVP_EC_gen("P-256")) ||
        !(srv = make_cert(srv_key, ca_key, ca, names[0], san, now - fs_renew_backdate_s(server_life_s),
                          fs_renew_server_not_after(now, server_life_s, a->ca_not_after)))) {
      snprintf(err, errlen, "cannot create a server certificate: %s", fs_tls_error_string("openssl error"));
      goto out;
    }
    a->new_cert = 1;
  }
  a->not_after = time_of(X509_get0_notAfter(srv));
  if (!(a->ca_pem = to_pem(ca, NULL)) || !(a->ca_key_pem = to_pem(NULL, ca_key)) ||
      !(a->cert_pem = to_pem(srv, NULL)) || !(a->key_pem = to_pem(NULL, srv_key))) {
    snprintf(err, errlen, "out of memory");
    goto out;
  }
  rc = 0;
out:
  if (rc < 0) autogen_free(a);
  X509_free(ca);
  X509_free(srv);
  EVP_PKEY_free(ca_key);
  EVP_PKEY_free(srv_key);
  return rc;
}

/* Writes what autogen_plan() made new to --tls-dir (keys mode 0600). */
static int autogen_write(const autogen *a, const char *dir, char *err, size_t errlen) {
  const char *which = NULL;
  errno = 0;
  if (a->new_ca && (write_text(a->dir_ca_key, a->ca_key_pem, 0600) < 0 || write_text(a->dir_ca, a->ca_pem, 0644) < 0))
    which = "a CA";
  else if (a->new_cert &&
           (write_text(a->dir_key, a->key_pem, 0600) < 0 || write_text(a->dir_cert, a->cert_pem, 0644) < 0))
    which = "a server certificate";
  if (!which) return 0;
  snprintf(err, errlen, "cannot write %s to %s: %s", which, dir, strerror(errno ? errno : EIO));
  return -1;
}

/* --- the certificate lifecycle: state ------------------------------------- */

static struct {
  const fs_config *cfg;
  int link;                      /* a listener context was built (link role with TLS) */
  int auto_certs;                /* ... from the auto-generated certificates */
  char *ca_pem;                  /* the CA of the server certificate in use (link), or NULL */
  int64_t not_before, not_after; /* of the server certificate in use (link); 0: none */
  void (*on_ca_change)(const char *ca_pem, void *arg);
  void *ca_arg;
  void (*install)(SSL_CTX *ctx);
  uv_loop_t *loop;
  uv_timer_t renew_timer, switch_timer;
  int timers; /* both timers initialised */
  int (*draining)(void);
  /* A new CA is being announced: its context waits for the switch. */
  SSL_CTX *pending;
  char *pending_ca_pem;
  int64_t pending_not_after;
  char pending_files[600];
  const char *pending_trigger;
} T;

/* The validity of |ctx|'s certificate; 0s without one. */
static void ctx_times(SSL_CTX *ctx, int64_t *nb, int64_t *na) {
  X509 *x = SSL_CTX_get0_certificate(ctx);
  *nb = x ? time_of(X509_get0_notBefore(x)) : 0;
  *na = x ? time_of(X509_get0_notAfter(x)) : 0;
}

/* The validity of the first certificate in |pem|: 0, or -1 without one. */
static int pem_times(const char *pem, int64_t *nb, int64_t *na) {
  BIO *b = pem ? BIO_new_mem_buf(pem, -1) : NULL;
  X509 *x = b ? PEM_read_bio_X509(b, NULL, NULL, NULL) : NULL;
  BIO_free(b);
  ERR_clear_error();
  if (!x) return -1;
  *nb = time_of(X509_get0_notBefore(x));
  *na = time_of(X509_get0_notAfter(x));
  X509_free(x);
  return 0;
}

static int fs_tls_draining(void) { return T.draining && T.draining(); }

/* Parses a test-only lifetime variable: 0 when unset, -1 when invalid. */
static int64_t test_lifetime(const char *var) {
  const char *v = getenv(var);
  char *end;
  long long n;
  if (!v || !*v) return 0;
  errno = 0;
  n = strtoll(v, &end, 10);
  return errno || *end || n < 2 || n > FS_RENEW_CA_LIFETIME_S ? -1 : (int64_t)n;
}

/* --- contexts ------------------------------------------------------------- */

static SSL_CTX *base_ctx(const SSL_METHOD *m) {
  SSL_CTX *ctx = SSL_CTX_new(m);
  if (!ctx) return NULL;
  if (alpn_refused_idx < 0) alpn_refused_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
  /* Idle connections give their 2 x ~17 KiB record buffers back. */
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  /* HTTP/2 requires these TLS 1.2 suites (RFC 7540 9.2.2: ECDHE + AEAD). */
  SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM:ECDHE+CHACHA20");
  return ctx;
}

static int use_pem_pair(SSL_CTX *ctx, const char *cert_pem, const char *key_pem, char *err, size_t errlen) {
  BIO *b = BIO_new_mem_buf(cert_pem, -1);
  X509 *x = b ? PEM_read_bio_X509(b, NULL, NULL, NULL) : NULL;
  EVP_PKEY *k;
  int ok = 0;
  if (!x) {
    snprintf(err, errlen, "no PEM certificate found (%s)", fs_tls_error_string("parse error"));
    BIO_free(b);
    return -1;
  }
  ok = SSL_CTX_use_certificate(ctx, x);
  X509_free(x);
  /* The rest of the file is the chain. */
  while (ok && (x = PEM_read_bio_X509(b, NULL, NULL, NULL)) != NULL)
    if (!SSL_CTX_add0_chain_cert(ctx, x)) X509_free(x), ok = 0;
  ERR_clear_error();
  BIO_free(b);
  b = BIO_new_mem_buf(key_pem, -1);
  k = b ? PEM_read_bio_PrivateKey(b, NULL, NULL, NULL) : NULL;
  BIO_free(b);
  if (!ok || !k) {
    EVP_PKEY_free(k);
    snprintf(err, errlen, "no PEM private key found (%s)", fs_tls_error_string("parse error"));
    return -1;
  }
  ok = SSL_CTX_use_PrivateKey(ctx, k) && SSL_CTX_check_private_key(ctx);
  EVP_PKEY_free(k);
  if (!ok) {
    snprintf(err, errlen, "the private key does not match the certificate");
    return -1;
  }
  return 0;
}

/* Trusts the certificates of |ca_pem| for verifying peers.  With
 * |serve_in_chain| (the listener), each one that the chain does not hold
 * yet is also sent in it and named in the CertificateRequest, as the CA of
 * the server certificate.  Returns 0, or -1 when |ca_pem| holds no
 * certificate or OpenSSL fails. */
static int use_ca(SSL_CTX *ctx, const char *ca_pem, int serve_in_chain) {
  BIO *b = BIO_new_mem_buf(ca_pem, -1);
  STACK_OF(X509_INFO) *infos = b ? PEM_X509_INFO_read_bio(b, NULL, NULL, NULL) : NULL;
  X509_STORE *store = SSL_CTX_get_cert_store(ctx);
  int i, j, n = 0, ok = 1;
  BIO_free(b);
  if (!infos) return -1;
  for (i = 0; ok && i < sk_X509_INFO_num(infos); i++) {
    X509_INFO *xi = sk_X509_INFO_value(infos, i);
    STACK_OF(X509) *chain = NULL;
    int have = 0;
    if (!xi->x509) continue;
    if (!X509_STORE_add_cert(store, xi->x509)) {
      ok = 0;
      break;
    }
    n++;
    if (!serve_in_chain) continue;
    if (!SSL_CTX_add_client_CA(ctx, xi->x509)) ok = 0;
    if (SSL_CTX_get0_chain_certs(ctx, &chain) && chain)
      for (j = 0; j < sk_X509_num(chain); j++) have |= !X509_cmp(sk_X509_value(chain, j), xi->x509);
    if (!have && !X509_cmp(SSL_CTX_get0_certificate(ctx), xi->x509)) have = 1;
    if (ok && !have && !SSL_CTX_add1_chain_cert(ctx, xi->x509)) ok = 0;
  }
  sk_X509_INFO_pop_free(infos, X509_INFO_free);
  ERR_clear_error();
  return ok && n > 0 ? 0 : -1;
}

/* Loads a flag's PEM value into |*pem|, with the error naming the flag.
 * The value of a |secret| setting (a private key) is shown only when it
 * is a path: base64 of a key, even a malformed one, holds the key. */
static int load_setting(const char *value, const char *from, int secret, char **pem, const char **source, char *err,
                        size_t errlen) {
  char why[512];
  size_t len;
  if (fs_tls_read_pem(value, pem, &len, source, why, sizeof(why)) < 0) {
    if (secret && value[0] != '/')
      snprintf(err, errlen, "invalid %s: a %zu-character value (not shown: it may hold a private key) that is %s", from,
               strlen(value), why);
    else snprintf(err, errlen, "invalid %s: '%.200s' (%s)", from, value, why);
    return -1;
  }
  return 0;
}

/* The listener context from PEM texts: the certificate (and chain) with its
 * key, then the CA (|ca| may be NULL with an operator certificate).  Errors
 * name |cert_from| / |ca_from|; none ever shows key material. */
static SSL_CTX *server_ctx_from(const fs_config *cfg, const char *cert, const char *key, const char *ca,
                                const char *cert_from, const char *ca_from, char *err, size_t errlen) {
  SSL_CTX *ctx = base_ctx(TLS_server_method());
  char why[512];
  if (!ctx) return snprintf(err, errlen, "SSL_CTX_new: %s", fs_tls_error_string("failed")), NULL;
  SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL);
  /* SuperNodes hold one connection for their life and gRPC clients do not
   * resume sessions by default: tickets and a session cache would cost CPU
   * on every handshake and memory on every connection for nothing. */
  SSL_CTX_set_num_tickets(ctx, 0);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  if (use_pem_pair(ctx, cert, key, why, sizeof(why)) < 0) {
    snprintf(err, errlen, "invalid %s: %s", cert_from, why);
    goto fail;
  }
  /* The CA of the server certificate (Flower's --ssl-ca-certfile): sent in
   * the chain; a client certificate that is presented must chain to it, and
   * one is required only with --tls-require-client-cert. */
  if (ca && use_ca(ctx, ca, 1) < 0) {
    snprintf(err, errlen, "invalid %s: no usable PEM certificate in it (%s)", ca_from,
             fs_tls_error_string("parse error"));
    goto fail;
  }
  if (cfg->tls_require_client_cert) SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
  else if (cfg->tls_ca) SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
  return ctx;
fail:
  SSL_CTX_free(ctx);
  return NULL;
}

/* Names of what a reload reads, for cert.reload's "files": a path, or
 * "base64 from VAR" for a value given inline. */
static void describe(char *out, size_t len, const char *value, const char *from) {
  size_t used = strlen(out);
  struct stat st;
  if (!value) return;
  if (stat(value, &st) == 0) snprintf(out + used, used < len ? len - used : 0, "%s%s", used ? "," : "", value);
  else snprintf(out + used, used < len ? len - used : 0, "%sbase64 from %s", used ? "," : "", from);
}

/* The operator's certificate, key and CA (link), read now.  Fills |*ca_pem|
 * (caller frees; NULL without --tls-ca) and the names read in |files|. */
static SSL_CTX *operator_server_ctx(const fs_config *cfg, char **ca_pem, char *files, size_t fileslen,
                                    const char **cert_src, const char **key_src, const char **ca_src, char *err,
                                    size_t errlen) {
  char *cert = NULL, *key = NULL, *ca = NULL;
  SSL_CTX *ctx = NULL;
  files[0] = '\0';
  describe(files, fileslen, cfg->tls_cert, cfg->tls_cert_from);
  describe(files, fileslen, cfg->tls_key, cfg->tls_key_from);
  describe(files, fileslen, cfg->tls_ca, cfg->tls_ca_from);
  if (!load_setting(cfg->tls_cert, cfg->tls_cert_from, 0, &cert, cert_src, err, errlen) &&
      !load_setting(cfg->tls_key, cfg->tls_key_from, 1, &key, key_src, err, errlen) &&
      (!cfg->tls_ca || !load_setting(cfg->tls_ca, cfg->tls_ca_from, 0, &ca, ca_src, err, errlen)))
    ctx = server_ctx_from(cfg, cert, key, ca, cfg->tls_cert_from, cfg->tls_ca_from, err, errlen);
  if (key) OPENSSL_cleanse(key, strlen(key));
  free(cert);
  free(key);
  if (ctx) *ca_pem = ca;
  else free(ca);
  return ctx;
}

/* The auto-generated certificates' context from a plan. */
static SSL_CTX *auto_server_ctx(const fs_config *cfg, const autogen *a, char *files, size_t fileslen, char *err,
                                size_t errlen) {
  files[0] = '\0';
  describe(files, fileslen, a->dir_cert, "");
  describe(files, fileslen, a->dir_key, "");
  describe(files, fileslen, a->dir_ca, "");
  return server_ctx_from(cfg, a->cert_pem, a->key_pem, a->ca_pem, a->dir_cert, a->dir_ca, err, errlen);
}

SSL_CTX *fs_tls_server_ctx(const fs_config *cfg, char *err, size_t errlen) {
  SSL_CTX *ctx;
  const char *cert_src = NULL, *key_src = NULL, *ca_src = NULL;
  char files[1200];
  char *ca = NULL;
  autogen a;
  int generated = 0;
  int64_t sl = test_lifetime("FS_TEST_CERT_LIFETIME_S"), cl = test_lifetime("FS_TEST_CA_LIFETIME_S");
  fs_event ev;
  if (sl < 0 || cl < 0)
    return snprintf(err, errlen, "invalid %s: expected seconds in [2, %lld] (a test-only setting)",
                    sl < 0 ? "FS_TEST_CERT_LIFETIME_S" : "FS_TEST_CA_LIFETIME_S", (long long)FS_RENEW_CA_LIFETIME_S),
           NULL;
  if (sl) server_life_s = sl, ca_life_s = 3 * sl;
  if (cl) ca_life_s = cl;
  memset(&a, 0, sizeof(a));
  if (cfg->tls_cert) {
    ctx = operator_server_ctx(cfg, &ca, files, sizeof(files), &cert_src, &key_src, &ca_src, err, errlen);
  } else {
    if (autogen_plan(cfg, (int64_t)time(NULL), &a, err, errlen) < 0) return NULL;
    generated = a.new_ca || a.new_cert;
    ctx = autogen_write(&a, cfg->tls_dir, err, errlen) < 0
              ? NULL
              : auto_server_ctx(cfg, &a, files, sizeof(files), err, errlen);
    ca = a.ca_pem;
    a.ca_pem = NULL;
  }
  autogen_free(&a);
  if (!ctx) {
    free(ca);
    return NULL;
  }
  T.cfg = cfg;
  T.link = 1;
  T.auto_certs = !cfg->tls_cert;
  free(T.ca_pem);
  T.ca_pem = ca;
  ctx_times(ctx, &T.not_before, &T.not_after);
  if (fs_ev_begin(&ev, FS_LOG_INFO, "tls.ready")) {
    char na[40];
    if (cfg->tls_cert) {
      char v[300];
      snprintf(v, sizeof(v), "%s from %s", cert_src, cfg->tls_cert_from);
      fs_ev_str(&ev, "cert", !strcmp(cert_src, "file") ? cfg->tls_cert : v);
      snprintf(v, sizeof(v), "%s from %s", key_src, cfg->tls_key_from);
      fs_ev_str(&ev, "key", !strcmp(key_src, "file") ? cfg->tls_key : v);
    } else {
      char p[4200];
      snprintf(p, sizeof(p), "%s/server.pem", cfg->tls_dir);
      fs_ev_str(&ev, "cert", p);
      snprintf(p, sizeof(p), "%s/ca.pem", cfg->tls_dir);
      fs_ev_str(&ev, "ca", p);
      fs_ev_bool(&ev, "generated", generated);
    }
    if (cfg->tls_ca) fs_ev_str(&ev, "ca", !strcmp(ca_src, "file") ? cfg->tls_ca : "base64");
    fs_ev_str(&ev, "client_cert",
              cfg->tls_require_client_cert ? "required"
              : cfg->tls_ca                ? "verified when presented"
                                           : "not asked");
    fmt_time(T.not_after, na, sizeof(na));
    fs_ev_str(&ev, "not_after", na);
    fs_ev_end(&ev);
  }
  return ctx;
}

/* The upstream context (node); |files| gets what was read. */
static SSL_CTX *client_ctx(const fs_config *cfg, char *files, size_t fileslen, char *err, size_t errlen) {
  SSL_CTX *ctx = base_ctx(TLS_client_method());
  char *ca = NULL, *cert = NULL, *key = NULL;
  const char *src;
  static const unsigned char alpn[] = {2, 'h', '2'};
  files[0] = '\0';
  describe(files, fileslen, cfg->tls_ca, cfg->tls_ca_from);
  describe(files, fileslen, cfg->tls_cert, cfg->tls_cert_from);
  describe(files, fileslen, cfg->tls_key, cfg->tls_key_from);
  if (!cfg->tls_ca) snprintf(files + strlen(files), fileslen - strlen(files), "%ssystem CA store", files[0] ? "," : "");
  if (!ctx) return snprintf(err, errlen, "SSL_CTX_new: %s", fs_tls_error_string("failed")), NULL;
  if (SSL_CTX_set_alpn_protos(ctx, alpn, sizeof(alpn)) != 0) {
    snprintf(err, errlen, "SSL_CTX_set_alpn_protos: %s", fs_tls_error_string("failed"));
    goto fail;
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
  if (cfg->tls_ca) {
    if (load_setting(cfg->tls_ca, cfg->tls_ca_from, 0, &ca, &src, err, errlen)) goto fail;
    if (use_ca(ctx, ca, 0) < 0) {
      snprintf(err, errlen, "invalid %s: no PEM certificate in it", cfg->tls_ca_from);
      goto fail;
    }
  } else if (!SSL_CTX_set_default_verify_paths(ctx)) {
    snprintf(err, errlen, "no --tls-ca given and the system CA store cannot be loaded");
    goto fail;
  }
  if (cfg->tls_cert) {
    char why[512];
    if (load_setting(cfg->tls_cert, cfg->tls_cert_from, 0, &cert, &src, err, errlen) ||
        load_setting(cfg->tls_key, cfg->tls_key_from, 1, &key, &src, err, errlen))
      goto fail;
    if (use_pem_pair(ctx, cert, key, why, sizeof(why)) < 0) {
      snprintf(err, errlen, "invalid %s: %s", cfg->tls_cert_from, why);
      goto fail;
    }
  }
  if (key) OPENSSL_cleanse(key, strlen(key));
  free(ca);
  free(cert);
  free(key);
  return ctx;
fail:
  if (key) OPENSSL_cleanse(key, strlen(key));
  free(ca);
  free(cert);
  free(key);
  SSL_CTX_free(ctx);
  return NULL;
}

SSL_CTX *fs_tls_client_ctx(const fs_config *cfg, char *err, size_t errlen) {
  char files[1200];
  SSL_CTX *ctx = client_ctx(cfg, files, sizeof(files), err, errlen);
  if (ctx) T.cfg = cfg, T.link = 0;
  return ctx;
}

/* --- the certificate lifecycle -------------------------------------------- */

static void log_reload(int ok, const char *trigger, const char *files, const char *reason, int64_t not_after) {
  fs_event ev;
  if (!fs_ev_begin(&ev, ok ? FS_LOG_INFO : FS_LOG_ERROR, "cert.reload")) return;
  fs_ev_str(&ev, "trigger", trigger);
  fs_ev_str(&ev, "files", files);
  fs_ev_bool(&ev, "ok", ok);
  if (reason) fs_ev_str(&ev, "reason", reason);
  if (not_after) {
    char na[40];
    fmt_time(not_after, na, sizeof(na));
    fs_ev_str(&ev, "not_after", na);
  }
  fs_ev_end(&ev);
}

static void log_renew(const char *cert, int64_t not_after, const char *reason, double switch_in_s) {
  fs_event ev;
  char na[40];
  if (!fs_ev_begin(&ev, FS_LOG_INFO, "cert.renew")) return;
  fs_ev_str(&ev, "cert", cert);
  fmt_time(not_after, na, sizeof(na));
  fs_ev_str(&ev, "not_after", na);
  fs_ev_str(&ev, "reason", reason);
  if (switch_in_s >= 0) fs_ev_num(&ev, "switch_in_s", switch_in_s, 3);
  fs_ev_end(&ev);
}

static void arm_renew_timer(void);

/* Hands |ctx| to the listener (new handshakes use it; connections keep
 * theirs) and makes it current. */
static void install(SSL_CTX *ctx, char *ca_pem, const char *trigger, const char *files) {
  int64_t nb, na;
  ctx_times(ctx, &nb, &na);
  if (T.link) {
    free(T.ca_pem);
    T.ca_pem = ca_pem;
    T.not_before = nb;
    T.not_after = na;
  } else {
    free(ca_pem);
  }
  T.install(ctx);
  log_reload(1, trigger, files, NULL, na);
}

static void on_switch(uv_timer_t *t) {
  SSL_CTX *ctx = T.pending;
  char *ca = T.pending_ca_pem;
  (void)t;
  if (!ctx) return;
  uv_timer_stop(&T.switch_timer);
  T.pending = NULL;
  T.pending_ca_pem = NULL;
  install(ctx, ca, T.pending_trigger, T.pending_files);
  arm_renew_timer();
}

/* The CA changes: announce it (cert.renew for the CA, then the callback),
 * and switch after cfg->tls_ca_switch_delay_s or fs_tls_ca_published(). */
static void begin_switch(SSL_CTX *ctx, char *ca_pem, const char *trigger, const char *files, const char *why,
                         int64_t ca_not_after) {
  double delay = T.cfg->tls_ca_switch_delay_s;
  int64_t nb;
  if (!ca_not_after && pem_times(ca_pem, &nb, &ca_not_after) < 0) ca_not_after = 0;
  T.pending = ctx;
  T.pending_ca_pem = ca_pem;
  T.pending_trigger = trigger;
  snprintf(T.pending_files, sizeof(T.pending_files), "%s", files);
  uv_timer_stop(&T.renew_timer);
  log_renew("ca", ca_not_after, why, delay);
  if (T.on_ca_change) T.on_ca_change(ca_pem, T.ca_arg);
  if (T.pending && uv_timer_start(&T.switch_timer, on_switch, (uint64_t)(delay * 1000), 0) < 0) on_switch(NULL);
}

/* A new context for the listener: at once, or after announcing its CA when
 * that changed (and a listener was running with another one). */
static void offer(SSL_CTX *ctx, char *ca_pem, const char *trigger, const char *files, const char *why,
                  int64_t ca_not_after) {
  int ca_changed = T.link && ca_pem && (!T.ca_pem || strcmp(ca_pem, T.ca_pem) != 0);
  if (ca_changed) begin_switch(ctx, ca_pem, trigger, files, why, ca_not_after);
  else install(ctx, ca_pem, trigger, files);
}

/* Looks at the auto-generated certificates now: renews what is due (see
 * renew.h) and installs the result.  |quiet|: nothing to say when nothing
 * changed (the timer). */
static void check_auto(const char *trigger, int quiet) {
  autogen a;
  char err[600], files[1200];
  SSL_CTX *ctx;
  int64_t ca_na = 0;
  if (autogen_plan(T.cfg, (int64_t)time(NULL), &a, err, sizeof(err)) < 0) {
    log_reload(0, trigger, T.cfg->tls_dir, err, 0);
    return;
  }
  if (quiet && !a.new_ca && !a.new_cert) {
    autogen_free(&a);
    return;
  }
  if (autogen_write(&a, T.cfg->tls_dir, err, sizeof(err)) < 0 ||
      !(ctx = auto_server_ctx(T.cfg, &a, files, sizeof(files), err, sizeof(err)))) {
    log_reload(0, trigger, T.cfg->tls_dir, err, 0);
    autogen_free(&a);
    return;
  }
  ca_na = a.ca_not_after;
  /* The order of the events: a new CA (announced), its server certificate,
   * then cert.reload once the listener uses it. */
  if (a.new_cert && !a.new_ca) log_renew("server", a.not_after, a.cert_why, -1);
  offer(ctx, a.ca_pem, trigger, files, a.new_ca ? a.ca_why : "the CA files in --tls-dir changed", ca_na);
  if (a.new_cert && a.new_ca) log_renew("server", a.not_after, a.cert_why, -1);
  a.ca_pem = NULL;
  autogen_free(&a);
}

static void on_renew_timer(uv_timer_t *t) {
  (void)t;
  if (T.pending) return; /* on_switch arms it again */
  check_auto("renewal", 1);
  if (!T.pending) arm_renew_timer();
}

/* Looks again at the renewal point of the server certificate or its CA,
 * whichever comes first, and at least hourly (renew.h). */
static void arm_renew_timer(void) {
  int64_t at[2], nb, na, next;
  int n = 0;
  if (!T.timers || !T.link || !T.auto_certs || fs_tls_draining()) return;
  if (pem_times(T.ca_pem, &nb, &na) == 0) at[n++] = fs_renew_at(nb, na);
  if (T.not_after) at[n++] = fs_renew_at(T.not_before, T.not_after);
  next = fs_renew_next_check_s((int64_t)time(NULL), at, n);
  if (uv_timer_start(&T.renew_timer, on_renew_timer, (uint64_t)next * 1000, 0) < 0) {
    fs_event ev;
    if (fs_ev_begin(&ev, FS_LOG_ERROR, "sidecar.error")) {
      fs_ev_str(&ev, "reason", "cannot arm the certificate renewal timer");
      fs_ev_end(&ev);
    }
  }
}

int fs_tls_lifecycle_start(uv_loop_t *loop, void (*install_ctx)(SSL_CTX *ctx), int (*draining)(void)) {
  if (!T.cfg) return 0; /* no TLS */
  T.loop = loop;
  T.install = install_ctx;
  T.draining = draining;
  if (uv_timer_init(loop, &T.renew_timer) < 0) return -1;
  if (uv_timer_init(loop, &T.switch_timer) < 0) {
    uv_close((uv_handle_t *)&T.renew_timer, NULL);
    return -1;
  }
  T.timers = 1;
  arm_renew_timer();
  return 0;
}

void fs_tls_lifecycle_stop(void) {
  if (T.timers) {
    uv_close((uv_handle_t *)&T.renew_timer, NULL);
    uv_close((uv_handle_t *)&T.switch_timer, NULL);
    T.timers = 0;
  }
  SSL_CTX_free(T.pending);
  free(T.pending_ca_pem);
  free(T.ca_pem);
  T.pending = NULL;
  T.pending_ca_pem = T.ca_pem = NULL;
}

void fs_tls_reload(void) {
  char err[600], files[1200];
  SSL_CTX *ctx;
  if (!T.cfg || !T.timers || fs_tls_draining()) return;
  if (T.pending) {
    char why[200];
    snprintf(why, sizeof(why),
             "a new CA is being announced; the switch to it follows in at most %g s: send SIGHUP again after it",
             T.cfg->tls_ca_switch_delay_s);
    log_reload(0, "SIGHUP", T.pending_files, why, 0);
    return;
  }
  if (!T.link) {
    if (!(ctx = client_ctx(T.cfg, files, sizeof(files), err, sizeof(err)))) log_reload(0, "SIGHUP", files, err, 0);
    else install(ctx, NULL, "SIGHUP", files);
  } else if (T.auto_certs) {
    check_auto("SIGHUP", 0);
    if (!T.pending) arm_renew_timer();
  } else {
    const char *s1, *s2, *s3;
    char *ca = NULL;
    if (!(ctx = operator_server_ctx(T.cfg, &ca, files, sizeof(files), &s1, &s2, &s3, err, sizeof(err))))
      log_reload(0, "SIGHUP", files, err, 0);
    else offer(ctx, ca, "SIGHUP", files, "the operator's CA changed", 0);
  }
}

void fs_tls_on_ca_change(void (*cb)(const char *ca_pem, void *arg), void *arg) {
  T.on_ca_change = cb;
  T.ca_arg = arg;
}

void fs_tls_ca_published(void) {
  if (T.pending) on_switch(NULL);
}

char *fs_tls_current_ca_pem(void) { return T.link && T.ca_pem ? strdup(T.ca_pem) : NULL; }

int fs_tls_server_not_after(int64_t *not_after) {
  if (!T.link || !T.not_after) return -1;
  *not_after = T.not_after;
  return 0;
}
