/*
 * bench/hsbench.c: the CPU cost of one TLS 1.3 handshake in OpenSSL, with
 * no network and no proxy: a client and a server SSL joined by a BIO pair,
 * the same certificate and settings the proxies use (TLS_AES_128_GCM_SHA256,
 * X25519, ECDSA P-256, ALPN h2, two session tickets as OpenSSL sends by
 * default).  Prints the server side's and the client side's CPU time per
 * handshake, including SSL_new/SSL_free.
 *
 * Then the memory floor of an idle connection for a proxy built on OpenSSL
 * and nghttp2, as heap bytes in use (mallinfo2) per connection:
 *   ssl_kB  a server SSL kept after its handshake (SSL_MODE_RELEASE_BUFFERS,
 *           as the sidecar sets it);
 *   h2_kB   an nghttp2 server session that has read a client preface and
 *           SETTINGS and sent its own SETTINGS (no stream open);
 *   h2_slots_kB  the same session on the sidecar's allocator (proxy/h2mem.c):
 *           heap in use plus the slot pages resident (RSS, from smaps).
 *
 *   hsbench CERT KEY N
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../proxy/h2mem.c"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static ssize_t h2_send(nghttp2_session *s, const uint8_t *d, size_t n, int f, void *u) {
  (void)s, (void)d, (void)f, (void)u;
  return (ssize_t)n;
}

static int handshake_pair(SSL_CTX *sctx, SSL_CTX *cctx, SSL **sp) {
  BIO *bs, *bc;
  SSL *s = SSL_new(sctx), *c = SSL_new(cctx);
  int sd = 0, cd = 0, rounds = 0;
  unsigned char junk[4096];
  BIO_new_bio_pair(&bs, 0, &bc, 0);
  SSL_set_bio(s, bs, bs);
  SSL_set_bio(c, bc, bc);
  SSL_set_accept_state(s);
  SSL_set_connect_state(c);
  while ((!sd || !cd) && rounds++ < 20) {
    if (SSL_do_handshake(c) == 1) cd = 1;
    if (SSL_do_handshake(s) == 1) sd = 1;
  }
  (void)SSL_read(c, junk, sizeof(junk));
  (void)SSL_read(s, junk, sizeof(junk)); /* as a proxy does: read until WANT_READ */
  SSL_free(c);
  /* The BIO pair holds a 17 KiB buffer a proxy's socket BIO does not have. */
  {
    BIO *nb = BIO_new(BIO_s_null());
    SSL_set_bio(s, nb, nb);
  }
  *sp = s;
  return sd && cd ? 0 : -1;
}

static int alpn_cb(SSL *s, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                   unsigned int inlen, void *arg) {
  (void)s, (void)arg, (void)inlen;
  *out = in + 1;
  *outlen = in[0];
  return SSL_TLSEXT_ERR_OK;
}

int main(int argc, char **argv) {
  SSL_CTX *sctx, *cctx;
  int n, i;
  double ts = 0, tc = 0, t;
  static const unsigned char alpn[] = {2, 'h', '2'};
  if (argc != 4) return fprintf(stderr, "usage: hsbench CERT KEY N\n"), 2;
  n = atoi(argv[3]);
  sctx = SSL_CTX_new(TLS_server_method());
  cctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_min_proto_version(sctx, TLS1_3_VERSION);
  SSL_CTX_set_ciphersuites(sctx, "TLS_AES_128_GCM_SHA256");
  SSL_CTX_set_ciphersuites(cctx, "TLS_AES_128_GCM_SHA256");
  SSL_CTX_set_min_proto_version(cctx, TLS1_3_VERSION);
  SSL_CTX_set_alpn_select_cb(sctx, alpn_cb, NULL);
  SSL_CTX_set_alpn_protos(cctx, alpn, sizeof(alpn));
  SSL_CTX_set_session_cache_mode(cctx, SSL_SESS_CACHE_OFF);
  if (SSL_CTX_use_certificate_chain_file(sctx, argv[1]) != 1 ||
      SSL_CTX_use_PrivateKey_file(sctx, argv[2], SSL_FILETYPE_PEM) != 1) {
    ERR_print_errors_fp(stderr);
    return 1;
  }
  for (i = 0; i < n; i++) {
    BIO *bs, *bc;
    SSL *s, *c;
    int sd = 0, cd = 0, rounds = 0;
    unsigned char junk[4096];
    t = now();
    s = SSL_new(sctx);
    ts += now() - t;
    c = SSL_new(cctx);
    BIO_new_bio_pair(&bs, 0, &bc, 0);
    SSL_set_bio(s, bs, bs);
    SSL_set_bio(c, bc, bc);
    SSL_set_accept_state(s);
    SSL_set_connect_state(c);
    while ((!sd || !cd) && rounds++ < 20) {
      int r;
      t = now();
      r = SSL_do_handshake(c);
      tc += now() - t;
      if (r == 1) cd = 1;
      t = now();
      r = SSL_do_handshake(s);
      ts += now() - t;
      if (r == 1) sd = 1;
    }
    /* the client reads the session tickets */
    t = now();
    (void)SSL_read(c, junk, sizeof(junk));
    tc += now() - t;
    if (!sd || !cd) {
      fprintf(stderr, "hsbench: handshake %d did not finish\n", i);
      ERR_print_errors_fp(stderr);
      return 1;
    }
    t = now();
    SSL_free(s);
    ts += now() - t;
    SSL_free(c);
  }
  printf("server_us %.1f\nclient_us %.1f\n", ts / n * 1e6, tc / n * 1e6);
  {
    int m = n < 2000 ? n : 2000;
    SSL **keep = calloc((size_t)m, sizeof(*keep));
    nghttp2_session **hs = calloc((size_t)m, sizeof(*hs));
    nghttp2_session_callbacks *cbs;
    struct mallinfo2 a, b;
    static const uint8_t preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                                     "\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 1000},
                                   {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 262144},
                                   {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, 16384}};
    SSL_CTX_set_mode(sctx, SSL_MODE_RELEASE_BUFFERS);
    malloc_trim(0);
    a = mallinfo2();
    for (i = 0; i < m; i++)
      if (handshake_pair(sctx, cctx, &keep[i]) < 0)
        return fprintf(stderr, "hsbench: the TLS handshake did not complete\n"), 1;
    b = mallinfo2();
    printf("ssl_kB %.1f\n", ((double)b.uordblks - (double)a.uordblks) / m / 1000.0);
    nghttp2_session_callbacks_new(&cbs);
    nghttp2_session_callbacks_set_send_callback(cbs, h2_send);
    a = mallinfo2();
    for (i = 0; i < m; i++) {
      nghttp2_session_server_new(&hs[i], cbs, NULL);
      nghttp2_submit_settings(hs[i], NGHTTP2_FLAG_NONE, iv, 3);
      nghttp2_session_set_local_window_size(hs[i], NGHTTP2_FLAG_NONE, 0, 1 << 20);
      nghttp2_session_mem_recv(hs[i], preface, sizeof(preface) - 1);
      nghttp2_session_send(hs[i]);
    }
    b = mallinfo2();
    printf("h2_kB %.1f\n", ((double)b.uordblks - (double)a.uordblks) / m / 1000.0);
    for (i = 0; i < m; i++) nghttp2_session_del(hs[i]);
    malloc_trim(0);
    a = mallinfo2();
    for (i = 0; i < m; i++) {
      nghttp2_session_server_new3(&hs[i], cbs, NULL, NULL, fs_h2mem());
      nghttp2_submit_settings(hs[i], NGHTTP2_FLAG_NONE, iv, 3);
      nghttp2_session_set_local_window_size(hs[i], NGHTTP2_FLAG_NONE, 0, 1 << 20);
      nghttp2_session_mem_recv(hs[i], preface, sizeof(preface) - 1);
      nghttp2_session_send(hs[i]);
    }
    b = mallinfo2();
    printf("h2_slots_kB %.1f\n",
           (((double)b.uordblks - (double)a.uordblks) + (double)fs_h2mem_resident_bytes()) / m / 1000.0);
  }
  return 0;
}
