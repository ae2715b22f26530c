/* onegate: see onegate.h. */
#include "onegate.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "admin.h"
#include "backoff.h"
#include "log.h"
#include "ogdoc.h"
#include "proxy.h"
#include "tls.h"

#define RESP_MAX         (1u << 20) /* a GET /service answer; larger is refused */
#define BODY_MAX         (FS_OG_CA_MAX + 2048)
#define WATCH_MS         1000 /* node: how often the discovered upstream is checked */
#define REDISCOVER_AFTER 3    /* failed attempts in a row before asking OneGate again */

typedef struct ogreq {
  CURL *easy;
  struct curl_slist *hdrs;
  char *resp;
  size_t resp_len;
  int busy;
  char errbuf[CURL_ERROR_SIZE];
  char url[320];
  char body[BODY_MAX];
  void (*done)(struct ogreq *r, long http_status, const char *why);
} ogreq;

typedef struct sockctx {
  uv_poll_t poll;
  curl_socket_t fd;
} sockctx;

static struct {
  uv_loop_t *loop;
  const fs_config *cfg;
  fs_onegate_retarget_fn retarget;
  CURLM *multi;
  uv_timer_t curl_timer, pub_timer, disc_timer, watch_timer, ready_timer;
  int started, stopping, draining, closing_handles;
  void (*on_closed)(void);
  ogreq pub, disc;
  fs_backoff pub_bo, disc_bo;
  char published[BODY_MAX];
  /* link */
  char endpoint[300];
  char ca_b64[FS_OG_CA_MAX];
  int ever_serving, was_serving;
  uint64_t lost_ms;
  /* node */
  int discovering; /* no target yet */
  int up_once;
  char target[256], target_ca[FS_OG_CA_MAX];
  uint64_t rediscover_not_before;
  int ca_switch_pending; /* a new CA waits for its publication (tls.h) */
  fs_onegate_stats stats;
} G;

const fs_onegate_stats *fs_onegate_get_stats(void) { return &G.stats; }
int fs_onegate_discovering(void) { return G.started && G.discovering; }

static uint64_t now_ms(void) { return uv_now(G.loop); }

/* --- libcurl on libuv ---------------------------------------------------------- */

static void check_done(void);

static void on_poll(uv_poll_t *p, int status, int events) {
  sockctx *c = p->data;
  int flags = 0, running;
  if (status < 0) flags = CURL_CSELECT_ERR;
  if (events & UV_READABLE) flags |= CURL_CSELECT_IN;
  if (events & UV_WRITABLE) flags |= CURL_CSELECT_OUT;
  (void)curl_multi_socket_action(G.multi, c->fd, flags, &running);
  check_done();
}

static void free_sockctx(uv_handle_t *h) { free(h->data); }

static int on_socket(CURL *e, curl_socket_t s, int what, void *userp, void *socketp) {
  sockctx *c = socketp;
  int ev = 0;
  (void)e, (void)userp;
  if (what == CURL_POLL_REMOVE) {
    if (c) {
      (void)uv_poll_stop(&c->poll);
      uv_close((uv_handle_t *)&c->poll, free_sockctx);
      (void)curl_multi_assign(G.multi, s, NULL);
    }
    return 0;
  }
  if (!c) {
    if (!(c = calloc(1, sizeof(*c)))) return -1;
    c->fd = s;
    if (uv_poll_init_socket(G.loop, &c->poll, s) < 0) {
      free(c);
      return -1;
    }
    c->poll.data = c;
    if (curl_multi_assign(G.multi, s, c) != CURLM_OK) {
      uv_close((uv_handle_t *)&c->poll, free_sockctx);
      return -1;
    }
  }
  if (what & CURL_POLL_IN) ev |= UV_READABLE;
  if (what & CURL_POLL_OUT) ev |= UV_WRITABLE;
  return uv_poll_start(&c->poll, ev, on_poll) < 0 ? -1 : 0;
}

static void on_curl_timeout(uv_timer_t *t) {
  int running;
  (void)t;
  (void)curl_multi_socket_action(G.multi, CURL_SOCKET_TIMEOUT, 0, &running);
  check_done();
}

static int on_curl_timer(CURLM *m, long timeout_ms, void *userp) {
  (void)m, (void)userp;
  if (timeout_ms < 0) return uv_timer_stop(&G.curl_timer) < 0 ? -1 : 0;
  return uv_timer_start(&G.curl_timer, on_curl_timeout, (uint64_t)timeout_ms, 0) < 0 ? -1 : 0;
}

static size_t on_body(char *p, size_t size, size_t n, void *arg) {
  ogreq *r = arg;
  size_t len = size * n;
  char *grown;
  if (r->resp_len + len > RESP_MAX) return 0; /* curl fails the transfer: CURLE_WRITE_ERROR */
  if (!(grown = realloc(r->resp, r->resp_len + len + 1))) return 0;
  r->resp = grown;
  memcpy(r->resp + r->resp_len, p, len);
  r->resp_len += len;
  r->resp[r->resp_len] = '\0';
  return len;
}

static void finish(ogreq *r, long status, const char *why) {
  if (r->easy) {
    (void)curl_multi_remove_handle(G.multi, r->easy);
    curl_easy_cleanup(r->easy);
    r->easy = NULL;
  }
  curl_slist_free_all(r->hdrs);
  r->hdrs = NULL;
  r->busy = 0;
  r->done(r, status, why);
  free(r->resp);
  r->resp = NULL;
  r->resp_len = 0;
}

static void maybe_close(void);

static void check_done(void) {
  CURLMsg *m;
  int left;
  while ((m = curl_multi_info_read(G.multi, &left)) != NULL) {
    ogreq *r = NULL;
    long status = 0;
    if (m->msg != CURLMSG_DONE) continue;
    (void)curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
    if (!r) continue;
    if (m->data.result != CURLE_OK) {
      char why[CURL_ERROR_SIZE + 64];
      snprintf(why, sizeof(why), "%s", r->errbuf[0] ? r->errbuf : curl_easy_strerror(m->data.result));
      finish(r, 0, why);
    } else {
      (void)curl_easy_getinfo(m->easy_handle, CURLINFO_RESPONSE_CODE, &status);
      finish(r, status, NULL);
    }
  }
  maybe_close();
}

/* The token, read at each request (OneGate may renew it); never logged. */
static int read_token(char *out, size_t cap, char *why, size_t whylen) {
  const char *path = G.cfg->onegate_token_file;
  char def[4200];
  int fd;
  ssize_t n;
  if (!path) {
    const char *cred = getenv("CREDENTIALS_DIRECTORY");
    if (cred && *cred && strlen(cred) < 4000) {
      snprintf(def, sizeof(def), "%s/onegate-token", cred);
      path = def;
    } else {
      path = "/run/one-context/token.txt";
    }
  }
  if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
    snprintf(why, whylen, "cannot read the OneGate token file %.200s: %s", path, strerror(errno));
    return -1;
  }
  n = read(fd, out, cap - 1);
  close(fd);
  if (n <= 0) {
    snprintf(why, whylen, "the OneGate token file %.200s is empty", path);
    return -1;
  }
  out[n] = '\0';
  out[strcspn(out, "\r\n")] = '\0';
  if (!out[0] || strpbrk(out, " \t")) {
    snprintf(why, whylen, "the OneGate token file %.200s does not hold one token line", path);
    return -1;
  }
  return 0;
}

/* Starts |method| |path| (with |r->body| for PUT).  Returns 0, or -1 with
 * a reason (no request then: the caller retries). */
static int start_request(ogreq *r, const char *method, const char *path, char *why, size_t whylen) {
  char token[1024], hdr[1200];
  size_t elen = strlen(G.cfg->onegate_endpoint);
  long tmo = (long)(G.cfg->onegate_timeout_s * 1000);
  CURLcode rc = CURLE_OK;
  if (read_token(token, sizeof(token), why, whylen) < 0) return -1;
  while (elen && G.cfg->onegate_endpoint[elen - 1] == '/') elen--;
  snprintf(r->url, sizeof(r->url), "%.*s%s", (int)elen, G.cfg->onegate_endpoint, path);
  if (!(r->easy = curl_easy_init())) return snprintf(why, whylen, "curl_easy_init failed"), -1;
  snprintf(hdr, sizeof(hdr), "X-ONEGATE-TOKEN: %s", token);
  r->hdrs = curl_slist_append(r->hdrs, hdr);
  OPENSSL_cleanse(hdr, sizeof(hdr));
  OPENSSL_cleanse(token, sizeof(token));
  snprintf(hdr, sizeof(hdr), "X-ONEGATE-VMID: %s", G.cfg->onegate_vmid);
  r->hdrs = r->hdrs ? curl_slist_append(r->hdrs, hdr) : NULL;
  r->hdrs = r->hdrs ? curl_slist_append(r->hdrs, "Accept: application/json") : NULL;
  r->hdrs = r->hdrs ? curl_slist_append(r->hdrs, "Expect:") : NULL; /* no 100-continue round trip */
  if (!r->hdrs) {
    curl_easy_cleanup(r->easy);
    r->easy = NULL;
    return snprintf(why, whylen, "out of memory"), -1;
  }
  r->errbuf[0] = '\0';
#define SET(opt, val)                                                                                                  \
  if (rc == CURLE_OK) rc = curl_easy_setopt(r->easy, opt, val)
  SET(CURLOPT_URL, r->url);
  SET(CURLOPT_PRIVATE, (char *)r);
  SET(CURLOPT_HTTPHEADER, r->hdrs);
  SET(CURLOPT_WRITEFUNCTION, on_body);
  SET(CURLOPT_WRITEDATA, r);
  SET(CURLOPT_ERRORBUFFER, r->errbuf);
  SET(CURLOPT_NOSIGNAL, 1L);
  SET(CURLOPT_TIMEOUT_MS, tmo);
  SET(CURLOPT_CONNECTTIMEOUT_MS, tmo);
  /* Defence in depth (the endpoint's scheme is checked at start, redirects are
   * off): libcurl before 7.85 lacks the option, which is then not an error. */
  if (rc == CURLE_OK && (rc = curl_easy_setopt(r->easy, CURLOPT_PROTOCOLS_STR, "http,https")) == CURLE_UNKNOWN_OPTION)
    rc = CURLE_OK;
  SET(CURLOPT_FOLLOWLOCATION, 0L);
  if (!strcmp(method, "PUT")) {
    SET(CURLOPT_CUSTOMREQUEST, "PUT");
    SET(CURLOPT_POSTFIELDS, r->body);
    SET(CURLOPT_POSTFIELDSIZE, (long)strlen(r->body));
  }
#undef SET
  if (rc != CURLE_OK || curl_multi_add_handle(G.multi, r->easy) != CURLM_OK) {
    snprintf(why, whylen, "cannot set up the request: %s", curl_easy_strerror(rc));
    curl_easy_cleanup(r->easy);
    r->easy = NULL;
    curl_slist_free_all(r->hdrs);
    r->hdrs = NULL;
    return -1;
  }
  r->busy = 1;
  return 0;
}

/* --- events ---------------------------------------------------------------------- */

static void ca_fingerprint(const char *b64, char *out, size_t outlen) {
  char *pem = NULL, why[128];
  size_t len;
  const char *src;
  BIO *b;
  X509 *x = NULL;
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int mdlen = 0, i;
  snprintf(out, outlen, "none");
  if (!b64[0] || fs_tls_read_pem(b64, &pem, &len, &src, why, sizeof(why)) < 0) return;
  if ((b = BIO_new_mem_buf(pem, (int)len)) != NULL) x = PEM_read_bio_X509(b, NULL, NULL, NULL);
  BIO_free(b);
  free(pem);
  if (!x || !X509_digest(x, EVP_sha256(), md, &mdlen)) {
    X509_free(x);
    snprintf(out, outlen, "unreadable");
    return;
  }
  X509_free(x);
  out[0] = '\0';
  for (i = 0; i < mdlen && (i + 1) * 3 < outlen; i++)
    snprintf(out + i * 3, outlen - i * 3, "%02X%s", md[i], i + 1 < mdlen ? ":" : "");
}

static void log_error(const char *request, long status, const char *why, uint64_t attempt, uint64_t delay,
                      fs_log_level level) {
  fs_event ev;
  if (!fs_ev_begin(&ev, level, "onegate.error")) return;
  fs_ev_str(&ev, "request", request);
  if (status) fs_ev_u64(&ev, "status", (uint64_t)status);
  fs_ev_str(&ev, "reason", why);
  fs_ev_u64(&ev, "attempt", attempt);
  fs_ev_u64(&ev, "delay_ms", delay);
  fs_ev_end(&ev);
}

/* --- publication ------------------------------------------------------------------- */

static void publish_check(void);

static void on_pub_timer(uv_timer_t *t) {
  (void)t;
  publish_check();
}

/* The first non-loopback address of the host, for FL_ENDPOINT. */
static void first_address(char *out, size_t outlen) {
  uv_interface_address_t *ifs;
  int n, i, pass;
  out[0] = '\0';
  if (uv_interface_addresses(&ifs, &n) != 0) return;
  for (pass = 0; pass < 2 && !out[0]; pass++) /* IPv4 first: what the appliances publish */
    for (i = 0; i < n && !out[0]; i++) {
      char ip[64];
      if (ifs[i].is_internal) continue;
      if (pass == 0 && ifs[i].address.address4.sin_family == AF_INET)
        (void)uv_ip4_name(&ifs[i].address.address4, ip, sizeof(ip)), snprintf(out, outlen, "%s", ip);
      else if (pass == 1 && ifs[i].address.address6.sin6_family == AF_INET6 &&
               !IN6_IS_ADDR_LINKLOCAL(&ifs[i].address.address6.sin6_addr))
        (void)uv_ip6_name(&ifs[i].address.address6, ip, sizeof(ip)), snprintf(out, outlen, "[%s]", ip);
    }
  uv_free_interface_addresses(ifs, n);
}

static void link_endpoint(void) {
  char host[256], addr[80];
  int port;
  if (G.cfg->advertise[0]) {
    snprintf(G.endpoint, sizeof(G.endpoint), "%s", G.cfg->advertise);
    return;
  }
  if (fs_hostport_split(G.cfg->listen, host, sizeof(host), &port) < 0) return;
  if (host[0] && strcmp(host, "0.0.0.0") && strcmp(host, "::")) { /* a specific address: that one */
    snprintf(G.endpoint, sizeof(G.endpoint), "%s", G.cfg->listen);
    return;
  }
  first_address(addr, sizeof(addr));
  if (addr[0]) snprintf(G.endpoint, sizeof(G.endpoint), "%s:%d", addr, port);
}

static void set_ca_b64(const char *pem) {
  size_t len = pem ? strlen(pem) : 0;
  G.ca_b64[0] = '\0';
  if (len && 4 * ((len + 2) / 3) < sizeof(G.ca_b64))
    (void)EVP_EncodeBlock((unsigned char *)G.ca_b64, (const unsigned char *)pem, (int)len);
}

/* The CA SuperNodes must trust, as base64 on one line ("" without TLS):
 * the one that signs the listener's certificate now (tls.h). */
static void link_ca(void) {
  char *pem = G.cfg->tls ? fs_tls_current_ca_pem() : NULL;
  set_ca_b64(pem);
  free(pem);
}

/* tls.h: a renewed or replaced CA, announced before a certificate it signs
 * is served: publish it; the switch follows once OneGate has it (pub_done)
 * or after --tls-ca-switch-delay. */
static void on_ca_change(const char *ca_pem, void *arg) {
  (void)arg;
  set_ca_b64(ca_pem);
  G.ca_switch_pending = 1;
  uv_timer_stop(&G.pub_timer); /* now, not after a backoff delay */
  publish_check();
}

/* The attributes this VM should carry now, as a PUT /vm body. */
static int desired(char *body, size_t cap, char *names, size_t names_cap) {
  size_t len = 0;
  int ok = 0;
  body[0] = names[0] = '\0';
  if (G.cfg->role == FS_ROLE_LINK) {
    char why[600];
    uint64_t recheck;
    const char *verdict = fs_admin_verdict(why, sizeof(why));
    int serving = !strcmp(verdict, "SERVING");
    int ready = fs_og_link_ready(serving, G.draining, G.ever_serving, now_ms(), G.lost_ms,
                                 (uint64_t)(G.cfg->onegate_ready_grace_s * 1000), &recheck);
    if (recheck && uv_timer_start(&G.ready_timer, on_pub_timer, recheck + 1, 0) < 0) recheck = 0;
    ok = fs_og_template_add(body, cap, &len, "FL_ROLE", "superlink") == 0 &&
         (!G.endpoint[0] || fs_og_template_add(body, cap, &len, "FL_ENDPOINT", G.endpoint) == 0) &&
         (!G.ca_b64[0] || fs_og_template_add(body, cap, &len, "FL_CA_CERT", G.ca_b64) == 0) &&
         fs_og_template_add(body, cap, &len, "FL_READY", ready ? "YES" : "NO") == 0;
    snprintf(names, names_cap, "FL_ROLE,%s%sFL_READY=%s", G.endpoint[0] ? "FL_ENDPOINT," : "",
             G.ca_b64[0] ? "FL_CA_CERT," : "", ready ? "YES" : "NO");
  } else {
    if (!G.up_once) return 0;
    ok = fs_og_template_add(body, cap, &len, "FL_NODE_READY", G.draining ? "NO" : "YES") == 0;
    snprintf(names, names_cap, "FL_NODE_READY=%s", G.draining ? "NO" : "YES");
  }
  return ok;
}

static void pub_done(ogreq *r, long status, const char *why) {
  fs_event ev;
  char names[128], body[BODY_MAX];
  if (status == 200) {
    G.stats.publish_ok++;
    fs_backoff_reset(&G.pub_bo);
    memcpy(G.published, r->body, sizeof(G.published));
    if (G.ca_switch_pending && G.ca_b64[0] && strstr(r->body, G.ca_b64)) {
      G.ca_switch_pending = 0;
      fs_tls_ca_published(); /* SuperNodes can find the new CA: serve what it signs */
    }
    (void)desired(body, sizeof(body), names, sizeof(names));
    if (fs_ev_begin(&ev, FS_LOG_INFO, "onegate.publish")) {
      char fp[100];
      fs_ev_str(&ev, "attributes", names);
      if (G.cfg->role == FS_ROLE_LINK) {
        fs_ev_str(&ev, "endpoint", G.endpoint);
        ca_fingerprint(G.ca_b64, fp, sizeof(fp));
        fs_ev_str(&ev, "ca_sha256", fp);
      }
      fs_ev_end(&ev);
    }
  } else {
    char msg[400];
    uint64_t delay = fs_backoff_next(&G.pub_bo);
    G.stats.publish_failed++;
    if (status)
      snprintf(msg, sizeof(msg), "PUT /vm answered %ld%s%.200s", status, r->resp ? ": " : "", r->resp ? r->resp : "");
    else snprintf(msg, sizeof(msg), "PUT /vm: %s", why);
    log_error("publish", status, msg, G.pub_bo.attempt, delay, FS_LOG_WARN);
    if (!G.stopping && uv_timer_start(&G.pub_timer, on_pub_timer, delay, 0) < 0) return;
    return;
  }
  publish_check();
}

static void publish_check(void) {
  char names[128], why[300];
  /* While stopping, only the drain's last word (FL_READY=NO) may still go out, once. */
  if (!G.started || (G.stopping && !G.draining) || G.pub.busy || uv_is_active((uv_handle_t *)&G.pub_timer)) return;
  if (!desired(G.pub.body, sizeof(G.pub.body), names, sizeof(names))) return;
  if (!strcmp(G.pub.body, G.published)) return;
  if (start_request(&G.pub, "PUT", "/vm", why, sizeof(why)) < 0) {
    uint64_t delay = fs_backoff_next(&G.pub_bo);
    G.stats.publish_failed++;
    log_error("publish", 0, why, G.pub_bo.attempt, delay, FS_LOG_WARN);
    if (!G.stopping) (void)uv_timer_start(&G.pub_timer, on_pub_timer, delay, 0);
  }
}

/* --- discovery (node) -------------------------------------------------------------- */

static void discover(void);

static void on_disc_timer(uv_timer_t *t) {
  (void)t;
  discover();
}

static void disc_retry(const char *why, long status, fs_log_level level) {
  uint64_t delay = fs_backoff_next(&G.disc_bo);
  if (delay == 0) delay = (uint64_t)(G.cfg->backoff_initial_s * 1000); /* OneGate: no immediate repeat */
  G.stats.discover_failed++;
  log_error("discover", status, why, G.disc_bo.attempt, delay, level);
  if (!G.stopping) (void)uv_timer_start(&G.disc_timer, on_disc_timer, delay, 0);
}

static void disc_done(ogreq *r, long status, const char *why) {
  fs_og_superlink sl;
  char err[400];
  int rc;
  if (status != 200) {
    if (status)
      snprintf(err, sizeof(err), "GET /service answered %ld%s%.200s", status, r->resp ? ": " : "",
               r->resp ? r->resp : "");
    else snprintf(err, sizeof(err), "GET /service: %s", why);
    disc_retry(err, status, FS_LOG_WARN);
    return;
  }
  rc = fs_og_find_superlink(r->resp ? r->resp : "", r->resp_len, G.cfg->onegate_role, &sl, err, sizeof(err));
  if (rc != 0) {
    disc_retry(err, 0, rc > 0 ? FS_LOG_INFO : FS_LOG_WARN); /* not ready yet is expected at boot */
    return;
  }
  G.stats.discover_ok++;
  if (!G.discovering && !strcmp(sl.endpoint, G.target) && !strcmp(sl.ca_b64, G.target_ca)) {
    /* the same SuperLink: it is unreachable, not replaced; ask again later */
    uint64_t delay = fs_backoff_next(&G.disc_bo);
    G.rediscover_not_before = now_ms() + (delay ? delay : (uint64_t)(G.cfg->backoff_initial_s * 1000));
    return;
  }
  {
    fs_event ev;
    char fp[100];
    const char *ca = G.cfg->tls_ca ? "" : sl.ca_b64; /* --tls-ca pins the trust */
    if (G.retarget(sl.endpoint, G.cfg->tls ? ca : "", err, sizeof(err)) < 0) {
      disc_retry(err, 0, FS_LOG_WARN);
      return;
    }
    snprintf(G.target, sizeof(G.target), "%s", sl.endpoint);
    memcpy(G.target_ca, sl.ca_b64, sizeof(G.target_ca));
    G.discovering = 0;
    fs_backoff_reset(&G.disc_bo);
    G.rediscover_not_before = 0;
    if (fs_ev_begin(&ev, FS_LOG_INFO, "onegate.discover")) {
      fs_ev_str(&ev, "endpoint", sl.endpoint);
      fs_ev_str(&ev, "vm_id", sl.vm_id);
      ca_fingerprint(sl.ca_b64, fp, sizeof(fp));
      fs_ev_str(&ev, "ca_sha256", fp);
      fs_ev_str(&ev, "ca", G.cfg->tls_ca ? "pinned by --tls-ca" : sl.ca_b64[0] ? "FL_CA_CERT" : "none published");
      fs_ev_end(&ev);
    }
  }
}

static void discover(void) {
  char why[300];
  if (!G.started || G.stopping || G.disc.busy || uv_is_active((uv_handle_t *)&G.disc_timer)) return;
  if (start_request(&G.disc, "GET", "/service", why, sizeof(why)) < 0) disc_retry(why, 0, FS_LOG_WARN);
}

/* Node: the discovered SuperLink keeps failing: it may have been replaced. */
static void on_watch(uv_timer_t *t) {
  const char *e;
  (void)t;
  if (G.discovering || fs_proxy_upstream_up() || G.draining) return;
  e = fs_proxy_upstream_error();
  if (fs_proxy_upstream_failures() < REDISCOVER_AFTER && !strstr(e, "certificate verify failed")) return;
  if (now_ms() < G.rediscover_not_before) return;
  discover();
}

/* --- life ---------------------------------------------------------------------------- */

int fs_onegate_start(uv_loop_t *loop, const fs_config *cfg, fs_onegate_retarget_fn retarget, char *err, size_t errlen) {
  int rv;
  uint64_t seed = uv_hrtime() ^ (uint64_t)getpid();
  memset(&G, 0, sizeof(G));
  G.loop = loop;
  G.cfg = cfg;
  G.retarget = retarget;
  if (cfg->onegate != FS_ONEGATE_ON) return 0;
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK || !(G.multi = curl_multi_init())) {
    snprintf(err, errlen, "cannot start libcurl for OneGate");
    return -1;
  }
  if (curl_multi_setopt(G.multi, CURLMOPT_SOCKETFUNCTION, on_socket) != CURLM_OK ||
      curl_multi_setopt(G.multi, CURLMOPT_TIMERFUNCTION, on_curl_timer) != CURLM_OK) {
    curl_multi_cleanup(G.multi);
    snprintf(err, errlen, "cannot set up libcurl for OneGate");
    return -1;
  }
  /* Timers on a live loop cannot fail to initialise (libuv). */
  (void)uv_timer_init(loop, &G.curl_timer);
  (void)uv_timer_init(loop, &G.pub_timer);
  (void)uv_timer_init(loop, &G.disc_timer);
  (void)uv_timer_init(loop, &G.watch_timer);
  (void)uv_timer_init(loop, &G.ready_timer);
  fs_backoff_init(&G.pub_bo, (uint64_t)(cfg->backoff_initial_s * 1000), (uint64_t)(cfg->backoff_max_s * 1000), seed);
  fs_backoff_init(&G.disc_bo, (uint64_t)(cfg->backoff_initial_s * 1000), (uint64_t)(cfg->backoff_max_s * 1000),
                  seed * 31 + 7);
  G.pub.done = pub_done;
  G.disc.done = disc_done;
  G.started = 1;
  if (cfg->role == FS_ROLE_LINK) {
    link_endpoint();
    link_ca();
    if (cfg->tls) fs_tls_on_ca_change(on_ca_change, NULL);
  } else if (!cfg->upstream[0]) {
    G.discovering = 1;
    if ((rv = uv_timer_start(&G.watch_timer, on_watch, WATCH_MS, WATCH_MS)) < 0) {
      snprintf(err, errlen, "cannot start the OneGate watch timer: %s", uv_strerror(rv));
      return -1;
    }
    discover();
  }
  fs_onegate_update();
  return 0;
}

void fs_onegate_update(void) {
  char why[600];
  int serving;
  if (!G.started || G.stopping) return;
  serving = !strcmp(fs_admin_verdict(why, sizeof(why)), "SERVING");
  if (serving) G.ever_serving = 1;
  if (G.was_serving && !serving) G.lost_ms = now_ms();
  G.was_serving = serving;
  if (G.cfg->role == FS_ROLE_NODE && fs_proxy_upstream_up()) {
    G.up_once = 1;
    fs_backoff_reset(&G.disc_bo);
    G.rediscover_not_before = 0;
  }
  publish_check();
}

void fs_onegate_drain(void) {
  if (!G.started) return;
  G.draining = 1;
  uv_timer_stop(&G.pub_timer); /* say it now, not after a backoff */
  fs_onegate_update();
}

static void on_handle_closed(uv_handle_t *h) {
  (void)h;
  if (--G.closing_handles == 0 && G.on_closed) G.on_closed();
}

static void maybe_close(void) {
  uv_timer_t *timers[] = {&G.curl_timer, &G.pub_timer, &G.disc_timer, &G.watch_timer, &G.ready_timer};
  size_t i;
  if (!G.stopping || G.pub.busy || G.closing_handles || !G.multi) return;
  if (G.disc.busy) {
    (void)curl_multi_remove_handle(G.multi, G.disc.easy);
    curl_easy_cleanup(G.disc.easy);
    G.disc.easy = NULL;
    curl_slist_free_all(G.disc.hdrs);
    G.disc.hdrs = NULL;
    free(G.disc.resp);
    G.disc.resp = NULL;
    G.disc.busy = 0;
  }
  curl_multi_cleanup(G.multi); /* CURL_POLL_REMOVE closes the socket handles */
  G.multi = NULL;
  curl_global_cleanup();
  for (i = 0; i < sizeof(timers) / sizeof(timers[0]); i++) {
    G.closing_handles++;
    uv_close((uv_handle_t *)timers[i], on_handle_closed);
  }
}

void fs_onegate_stop(void (*on_closed)(void)) {
  if (G.started && G.cfg->role == FS_ROLE_LINK && G.cfg->tls) fs_tls_on_ca_change(NULL, NULL);
  if (!G.started) {
    if (on_closed) on_closed();
    return;
  }
  G.on_closed = on_closed;
  G.stopping = 1;
  /* A PUT in flight (FL_READY=NO at drain) may finish, within its timeout. */
  maybe_close();
}
