/*
 * proxy: the glue (see proxy.h).  The rooms it starts and drains:
 *   downstream.c  the listener and client connections (client legs)
 *   uppool.c      the upstream connections, hold queue and repeats (upstream legs)
 *   call.c        a call's two legs and the flow control between them
 *   policy.c      every decision the three take, as pure functions
 * The roles differ only in the options set here and in fs_config's
 * defaults (config.c), never in the data path.
 */
#include "proxy.h"
#include "upconn.h"
#include "tls.h"

#include <malloc.h>
#include <string.h>

#include "call.h"
#include "downstream.h"
#include "uppool.h"

/* Every TRIM_EVERY_MS, if at least TRIM_AFTER_CALLS calls were freed since
 * the last look, free heap pages go back to the system: after a burst of
 * calls (an attack, a round of large models) the RSS falls back instead of
 * staying at its peak (glibc keeps small freed blocks in the heap). */
#define TRIM_EVERY_MS    2000
#define TRIM_AFTER_CALLS 256

static struct {
  uint8_t stopped;
  uv_timer_t trim_timer;
  uint64_t trimmed_at_calls;
  void (*on_stopped)(void);
  void (*on_state_change)(void);
} G;

const fs_proxy_stats *fs_proxy_get_stats(void) { return &fs_env.stats; }
int fs_proxy_upstream_up(void) { return fs_uppool_up(); }
int fs_proxy_upstream_down_planned(void) { return fs_uppool_down_planned(); }
int fs_proxy_draining(void) { return fs_env.draining; }
unsigned fs_proxy_upstream_failures(void) { return fs_uppool_failures(); }
void fs_proxy_upstream_phase(char *out, size_t len) { fs_uppool_next_attempt(out, len); }

int fs_proxy_retarget(const char *endpoint, const char *ca_b64, char *err, size_t errlen) {
  SSL_CTX *tls = NULL;
  if (fs_env.cfg->tls) {
    fs_config c = *fs_env.cfg;
    if (ca_b64[0]) c.tls_ca = ca_b64, c.tls_ca_from = "FL_CA_CERT (OneGate)";
    if (!(tls = fs_tls_client_ctx(&c, err, errlen))) return -1;
  }
  return fs_uppool_retarget(endpoint, tls, err, errlen);
}
int fs_proxy_listening(void) { return fs_downstream_listening(); }
const char *fs_proxy_upstream_error(void) { return fs_uppool_error(); }
void fs_proxy_on_state_change(void (*cb)(void)) { G.on_state_change = cb; }

static void on_trim_timer(uv_timer_t *t) {
  (void)t;
  if (fs_env.calls_freed - G.trimmed_at_calls < TRIM_AFTER_CALLS) return;
  G.trimmed_at_calls = fs_env.calls_freed;
  (void)malloc_trim(0);
}

static void state_changed(void) {
  if (G.on_state_change) G.on_state_change();
}

/* Draining ends in this order: client connections go (their calls end or
 * time out), then the upstream connections are closed, then both rooms
 * stop.  Runs whenever either room may have become idle. */
static void maybe_stopped(void) {
  if (!fs_env.draining || G.stopped || fs_downstream_conns() > 0) return;
  fs_uppool_close_all();
  if (!fs_uppool_idle()) return; /* back here once the pool is idle */
  G.stopped = 1;
  uv_close((uv_handle_t *)&G.trim_timer, NULL);
  fs_uppool_stop();
  fs_downstream_stop();
  if (G.on_stopped) G.on_stopped();
}

int fs_proxy_start(uv_loop_t *loop, const fs_config *cfg, SSL_CTX *down_ctx, SSL_CTX *up_ctx, void (*on_stopped)(void),
                   char *err, size_t errlen) {
  fs_uppool_options up;
  memset(&G, 0, sizeof(G));
  memset(&fs_env, 0, sizeof(fs_env));
  G.on_stopped = on_stopped;
  fs_env.loop = loop;
  fs_env.cfg = cfg;
  fs_env.replay_max = (size_t)cfg->retry_buffer * 8;
  fs_env.buffers.cap = cfg->max_buffer;
  if (!fs_env.idle_calls.next) fs_list_init(&fs_env.idle_calls);
  memset(&up, 0, sizeof(up));
  up.tls = up_ctx;
  /* The node role owns a WAN link to the SuperLink: it watches it with
   * keepalive PINGs and probes it for calls that stall. */
  up.keepalive = cfg->role == FS_ROLE_NODE;
  up.stall_probe = cfg->role == FS_ROLE_NODE;
  up.on_state_change = state_changed;
  up.on_maybe_idle = maybe_stopped;
  (void)uv_timer_init(loop, &G.trim_timer); /* cannot fail on a live loop */
  if (uv_timer_start(&G.trim_timer, on_trim_timer, TRIM_EVERY_MS, TRIM_EVERY_MS) == 0)
    uv_unref((uv_handle_t *)&G.trim_timer);
  if (fs_downstream_start(down_ctx, maybe_stopped, err, errlen) < 0) return -1;
  state_changed();
  return fs_uppool_start(&up, err, errlen);
}

void fs_proxy_set_tls(SSL_CTX *ctx) {
  if (fs_env.draining || G.stopped) SSL_CTX_free(ctx);
  else if (fs_env.cfg->role == FS_ROLE_LINK) fs_downstream_set_tls(ctx);
  else fs_uppool_set_tls(ctx);
}

void fs_proxy_drain(void) {
  if (fs_env.draining) return;
  fs_env.draining = 1;
  fs_uppool_drain();
  fs_downstream_drain((uint64_t)(fs_env.cfg->drain_timeout_s * 1000));
  state_changed();
  maybe_stopped();
}

void fs_proxy_get_budget(fs_proxy_budget_view *v) {
  v->calls_open = fs_env.calls_open;
  v->pool_used = fs_env.buffers.used;
  v->pool_cap = fs_env.buffers.cap;
  v->pool_refused = fs_env.buffers.refused;
}
