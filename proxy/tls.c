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

static int add_ext(X509 *x, X509V3_CTX *ctx, int nid, const char *value) {
  X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, ctx, nid, value);
  int ok;
  if (!ext) return -1;
  ok = X509_add_ext(x, ext, -1);
  X509_EXTENSION_free(ext);
  return ok ? 0 : -1;
}

static X509 *make_cert(EVP_PKEY *key, EVP_PKEY *signer_key, X509 *issuer, const char *cn, const char *san, long days) {
  X509 *x = X509_new();
  X509_NAME *name;
  X509V3_CTX ctx;
  BIGNUM *bn = BN_new();
  int is_ca = issuer == NULL;
  if (!x || !bn || !BN_rand(bn, 127, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) ||
      !BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) || !X509_set_version(x, 2) ||
      !X509_gmtime_adj(X509_getm_notBefore(x), -3600) || !X509_gmtime_adj(X509_getm_notAfter(x), days * 86400L) ||
      !X509_set_pubkey(x, key))
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

/* Writes |x| or |key| to |path| atomically; keys get mode 0600. */
static int write_pem(const char *path, X509 *x, EVP_PKEY *key) {
  char tmp[4096];
  int fd, ok;
  FILE *f;
  snprintf(tmp, sizeof(tmp), "%s.tmp%ld", path, (long)getpid());
  fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, key ? 0600 : 0644);
  if (fd < 0 || !(f = fdopen(fd, "w"))) {
    if (fd >= 0) close(fd);
    return -1;
  }
  ok = x ? PEM_write_X509(f, x) : PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL);
  if (fclose(f) != 0 || !ok || rename(tmp, path) != 0) {
    unlink(tmp);
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

/* Nonzero when |x| is valid for 30 more days and covers every name. */
static int cert_still_good(X509 *x, char names[][256], int n) {
  int i;
  if (X509_cmp_time(X509_get0_notAfter(x), &(time_t){time(NULL) + 30 * 86400}) <= 0) return 0;
  for (i = 0; i < n; i++) {
    int ok = is_ip(names[i]) ? X509_check_ip_asc(x, names[i], 0) : X509_check_host(x, names[i], 0, 0, NULL);
    if (ok != 1) return 0;
  }
  return 1;
}

/* Makes sure tls_dir holds ca.pem/ca.key and a server.pem/server.key that
 * is signed by that CA, current, and covers every name.  Fills the paths. */
static int ensure_autogen(const fs_config *cfg, char *cert_path, char *key_path, char *ca_path, int *generated,
                          char *err, size_t errlen) {
  char ca_key_path[4096], san[4096], names[64][256];
  X509 *ca = NULL, *srv = NULL;
  EVP_PKEY *ca_key = NULL, *srv_key = NULL;
  int n, rc = -1;
  const char *d = cfg->tls_dir;
  *generated = 0;
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
  snprintf(ca_path, 4096, "%s/ca.pem", d);
  snprintf(ca_key_path, sizeof(ca_key_path), "%s/ca.key", d);
  snprintf(cert_path, 4096, "%s/server.pem", d);
  snprintf(key_path, 4096, "%s/server.key", d);
  n = collect_sans(cfg, san, sizeof(san), names, 64);

  ca = load_cert_file(ca_path);
  ca_key = load_key_file(ca_key_path);
  if (!ca || !ca_key || X509_check_private_key(ca, ca_key) != 1) {
    X509_free(ca);
    EVP_PKEY_free(ca_key);
    ca = NULL;
    if (!(ca_key = EVP_EC_gen("P-256")) || !(ca = make_cert(ca_key, ca_key, NULL, "flower-sidecar CA", NULL, 3650)) ||
        write_pem(ca_key_path, NULL, ca_key) || write_pem(ca_path, ca, NULL)) {
      snprintf(err, errlen, "cannot create a CA in %s: %s", d,
               errno ? strerror(errno) : fs_tls_error_string("openssl error"));
      goto out;
    }
    unlink(cert_path); /* a new CA invalidates the old server certificate */
    *generated = 1;
  }
  srv = load_cert_file(cert_path);
  srv_key = load_key_file(key_path);
  if (!srv || !srv_key || X509_check_private_key(srv, srv_key) != 1 || X509_check_issued(ca, srv) != X509_V_OK ||
      !cert_still_good(srv, names, n)) {
    X509_free(srv);
    EVP_PKEY_free(srv_key);
    srv = NULL;
    if (!(srv_key = EVP_EC_gen("P-256")) || !(srv = make_cert(srv_key, ca_key, ca, names[0], san, 825)) ||
        write_pem(key_path, NULL, srv_key) || write_pem(cert_path, srv, NULL)) {
      snprintf(err, errlen, "cannot create a server certificate in %s: %s", d,
               errno ? strerror(errno) : fs_tls_error_string("openssl error"));
      goto out;
    }
    *generated = 1;
  }
  rc = 0;
out:
  X509_free(ca);
  X509_free(srv);
  EVP_PKEY_free(ca_key);
  EVP_PKEY_free(srv_key);
  return rc;
}

/* --- contexts ----------------------------------------------------------- */

static int64_t not_after[2];

int64_t fs_tls_cert_not_after(int client) { return not_after[client ? 1 : 0]; }

/* Remembers the notAfter of the certificate |ctx| presents. */
static void note_not_after(SSL_CTX *ctx, int client) {
  X509 *x = SSL_CTX_get0_certificate(ctx);
  const ASN1_TIME *t = x ? X509_get0_notAfter(x) : NULL;
  struct tm tm;
  time_t v;
  not_after[client] = 0;
  memset(&tm, 0, sizeof(tm));
  if (!t || ASN1_TIME_to_tm(t, &tm) != 1 || (v = timegm(&tm)) == (time_t)-1) return;
  not_after[client] = (int64_t)v;
}

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

static int use_ca(SSL_CTX *ctx, const char *ca_pem) {
  BIO *b = BIO_new_mem_buf(ca_pem, -1);
  STACK_OF(X509_INFO) *infos = b ? PEM_X509_INFO_read_bio(b, NULL, NULL, NULL) : NULL;
  X509_STORE *store = SSL_CTX_get_cert_store(ctx);
  int i, n = 0;
  BIO_free(b);
  if (!infos) return -1;
  for (i = 0; i < sk_X509_INFO_num(infos); i++) {
    X509_INFO *xi = sk_X509_INFO_value(infos, i);
    if (xi->x509 && X509_STORE_add_cert(store, xi->x509)) n++;
  }
  sk_X509_INFO_pop_free(infos, X509_INFO_free);
  return n > 0 ? 0 : -1;
}

/* Loads a flag's PEM value into |*pem|, with the error naming the flag.
 * The value of a |secret| setting (a private key) is shown only when it
 * is a path: base64 of a key, even a malformed one, holds the key. */
static int load_setting(const char *value, const char *from, int secret, char **pem, const char **source, char *err,
                        size_t errlen) {
  char why[256];
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

SSL_CTX *fs_tls_server_ctx(const fs_config *cfg, char *err, size_t errlen) {
  SSL_CTX *ctx = base_ctx(TLS_server_method());
  char *cert = NULL, *key = NULL, *ca = NULL;
  const char *cert_src = NULL, *key_src = NULL, *ca_src = NULL;
  char cert_path[4096] = "", key_path[4096], ca_path[4096] = "";
  int generated = 0;
  fs_event ev;
  if (!ctx) return snprintf(err, errlen, "SSL_CTX_new: %s", fs_tls_error_string("failed")), NULL;
  SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL);
  /* SuperNodes hold one connection for their life and gRPC clients do not
   * resume sessions by default: tickets and a session cache would cost CPU
   * on every handshake and memory on every connection for nothing. */
  SSL_CTX_set_num_tickets(ctx, 0);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  if (cfg->tls_cert) {
    if (load_setting(cfg->tls_cert, cfg->tls_cert_from, 0, &cert, &cert_src, err, errlen) ||
        load_setting(cfg->tls_key, cfg->tls_key_from, 1, &key, &key_src, err, errlen))
      goto fail;
  } else {
    size_t len;
    if (ensure_autogen(cfg, cert_path, key_path, ca_path, &generated, err, errlen) < 0) goto fail;
    if (fs_tls_read_pem(cert_path, &cert, &len, &cert_src, err, errlen) ||
        fs_tls_read_pem(key_path, &key, &len, &key_src, err, errlen))
      goto fail;
  }
  {
    char why[256];
    if (use_pem_pair(ctx, cert, key, why, sizeof(why)) < 0) {
      snprintf(err, errlen, "invalid %s: %s", cfg->tls_cert ? cfg->tls_cert_from : cert_path, why);
      goto fail;
    }
  }
  if (cfg->tls_ca) {
    if (load_setting(cfg->tls_ca, cfg->tls_ca_from, 0, &ca, &ca_src, err, errlen)) goto fail;
    if (use_ca(ctx, ca) < 0) {
      snprintf(err, errlen, "invalid %s: no PEM certificate in it", cfg->tls_ca_from);
      goto fail;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
  }
  note_not_after(ctx, 0);
  if (fs_ev_begin(&ev, FS_LOG_INFO, "tls.ready")) {
    if (cfg->tls_cert) {
      char v[300];
      snprintf(v, sizeof(v), "%s from %s", cert_src, cfg->tls_cert_from);
      fs_ev_str(&ev, "cert", !strcmp(cert_src, "file") ? cfg->tls_cert : v);
      snprintf(v, sizeof(v), "%s from %s", key_src, cfg->tls_key_from);
      fs_ev_str(&ev, "key", !strcmp(key_src, "file") ? cfg->tls_key : v);
    } else {
      fs_ev_str(&ev, "cert", cert_path);
      fs_ev_str(&ev, "ca", ca_path);
      fs_ev_bool(&ev, "generated", generated);
    }
    if (cfg->tls_ca) fs_ev_str(&ev, "client_ca", !strcmp(ca_src, "file") ? cfg->tls_ca : "base64");
    fs_ev_end(&ev);
  }
  free(cert);
  free(key);
  free(ca);
  return ctx;
fail:
  free(cert);
  free(key);
  free(ca);
  SSL_CTX_free(ctx);
  return NULL;
}

SSL_CTX *fs_tls_client_ctx(const fs_config *cfg, char *err, size_t errlen) {
  SSL_CTX *ctx = base_ctx(TLS_client_method());
  char *ca = NULL, *cert = NULL, *key = NULL;
  const char *src;
  static const unsigned char alpn[] = {2, 'h', '2'};
  if (!ctx) return snprintf(err, errlen, "SSL_CTX_new: %s", fs_tls_error_string("failed")), NULL;
  SSL_CTX_set_alpn_protos(ctx, alpn, sizeof(alpn));
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
  if (cfg->tls_ca) {
    if (load_setting(cfg->tls_ca, cfg->tls_ca_from, 0, &ca, &src, err, errlen)) goto fail;
    if (use_ca(ctx, ca) < 0) {
      snprintf(err, errlen, "invalid %s: no PEM certificate in it", cfg->tls_ca_from);
      goto fail;
    }
  } else if (!SSL_CTX_set_default_verify_paths(ctx)) {
    snprintf(err, errlen, "no --tls-ca given and the system CA store cannot be loaded");
    goto fail;
  }
  if (cfg->tls_cert) {
    if (load_setting(cfg->tls_cert, cfg->tls_cert_from, 0, &cert, &src, err, errlen) ||
        load_setting(cfg->tls_key, cfg->tls_key_from, 1, &key, &src, err, errlen))
      goto fail;
    if (use_pem_pair(ctx, cert, key, err, errlen) < 0) goto fail;
  }
  note_not_after(ctx, 1);
  free(ca);
  free(cert);
  free(key);
  return ctx;
fail:
  free(ca);
  free(cert);
  free(key);
  SSL_CTX_free(ctx);
  return NULL;
}
