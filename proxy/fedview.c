/* fedview: see fedview.h. */
#include "fedview.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fedstate.h"
#include "log.h"
#include "metricrec.h"

typedef struct vphase {
  uint64_t serial;
  int64_t round;
  char type[FS_VIEW_TYPE_LEN + 1];
  uint64_t t_start, t_end; /* t_end 0: open */
  fs_view_round_stats st;  /* final counters once ended */
  uint32_t with_metrics;   /* MetricRecord objects counted */
  uint32_t lists, skipped; /* list values seen; values not counted (not numbers, keys beyond the cap) */
  double examples;         /* sum of the weights */
  fs_mrec_stat *stats;     /* FS_VIEW_KEYS, by the run's key index; NULL until metrics arrive */
} vphase;

typedef struct vrun {
  uint64_t run_id, first_ms, last_ms;
  char fab_id[FS_VIEW_STR_LEN + 1], fab_version[FS_VIEW_STR_LEN + 1], status[FS_VIEW_STR_LEN + 1];
  const char *end_reason; /* NULL while running */
  vphase *ph;             /* ring: ph[(head + i) % cap], i < n, oldest first */
  uint32_t cap, head, n;
  uint64_t phases_dropped;
  char keys[FS_VIEW_KEYS][FS_VIEW_KEY_LEN + 1];
  uint32_t nkeys;
  uint8_t used, open; /* open: it has a phase not yet ended */
} vrun;

static struct {
  vrun runs[FS_VIEW_RUNS];
  size_t phases; /* in all runs */
  uint64_t runs_dropped;
} V;

static void copy_cut(char *dst, size_t cap, const char *s) {
  size_t n = s ? strlen(s) : 0;
  if (n >= cap) {
    n = cap - 1;
    while (n > 0 && ((uint8_t)s[n] & 0xC0) == 0x80) n--; /* not inside a UTF-8 sequence */
  }
  if (n) memcpy(dst, s, n);
  dst[n] = '\0';
}

static vphase *ph_at(vrun *r, uint32_t i) { return &r->ph[(r->head + i) % r->cap]; }

static void run_free(vrun *r) {
  uint32_t i;
  for (i = 0; i < r->n; i++) free(ph_at(r, i)->stats);
  free(r->ph);
  V.phases -= r->n;
  memset(r, 0, sizeof(*r));
}

void fs_view_reset(void) {
  int i;
  for (i = 0; i < FS_VIEW_RUNS; i++) run_free(&V.runs[i]);
  memset(&V, 0, sizeof(V));
}

size_t fs_view_runs_kept(void) {
  size_t n = 0;
  int i;
  for (i = 0; i < FS_VIEW_RUNS; i++) n += V.runs[i].used;
  return n;
}

size_t fs_view_phases_kept(void) { return V.phases; }

size_t fs_view_memory(void) {
  size_t b = sizeof(V);
  int i;
  uint32_t j;
  for (i = 0; i < FS_VIEW_RUNS; i++) {
    vrun *r = &V.runs[i];
    b += (size_t)r->cap * sizeof(vphase);
    for (j = 0; j < r->n; j++)
      if (ph_at(r, j)->stats) b += FS_VIEW_KEYS * sizeof(fs_mrec_stat);
  }
  return b;
}

static void run_end(uint64_t now, vrun *r, const char *reason) {
  fs_event ev;
  if (r->end_reason) return;
  r->end_reason = reason;
  if (fs_ev_begin(&ev, FS_LOG_INFO, "run.end")) {
    fs_ev_id(&ev, "run_id", r->run_id);
    fs_ev_str(&ev, "reason", reason);
    fs_ev_u64(&ev, "duration_ms", r->last_ms - r->first_ms);
    fs_ev_u64(&ev, "idle_ms", now > r->last_ms ? now - r->last_ms : 0);
    fs_ev_u64(&ev, "rounds", r->n ? (uint64_t)(r->n + r->phases_dropped) : r->phases_dropped);
    if (r->n) fs_ev_i64(&ev, "last_round", ph_at(r, r->n - 1)->round);
    if (r->status[0]) fs_ev_str(&ev, "status", r->status);
    fs_ev_end(&ev);
  }
}

static vrun *run_find(uint64_t run_id) {
  int i;
  for (i = 0; i < FS_VIEW_RUNS; i++)
    if (V.runs[i].used && V.runs[i].run_id == run_id) return &V.runs[i];
  return NULL;
}

/* The run's record, made (run.start) when new; the least recently active
 * run makes room. */
static vrun *run_touch(uint64_t now, uint64_t run_id) {
  vrun *r = run_find(run_id), *slot = NULL;
  fs_event ev;
  int i;
  if (!run_id) return NULL;
  if (r) {
    r->last_ms = now;
    /* GetRun said finished: later calls (other nodes' GetRun) do not
     * restart it; traffic after an idle end does. */
    if (!r->end_reason || !strcmp(r->end_reason, "finished")) return r;
    r->end_reason = NULL;
  } else {
    for (i = 0; i < FS_VIEW_RUNS && !slot; i++)
      if (!V.runs[i].used) slot = &V.runs[i];
    if (!slot) {
      slot = &V.runs[0];
      for (i = 1; i < FS_VIEW_RUNS; i++)
        if (V.runs[i].last_ms < slot->last_ms) slot = &V.runs[i];
      run_end(now, slot, "evicted");
      run_free(slot);
      V.runs_dropped++;
    }
    r = slot;
    r->used = 1;
    r->run_id = run_id;
    r->first_ms = r->last_ms = now;
  }
  if (fs_ev_begin(&ev, FS_LOG_INFO, "run.start")) {
    fs_ev_id(&ev, "run_id", run_id);
    if (r->fab_id[0]) fs_ev_str(&ev, "fab_id", r->fab_id);
    if (r->fab_version[0]) fs_ev_str(&ev, "fab_version", r->fab_version);
    fs_ev_end(&ev);
  }
  return r;
}

void fs_view_run_seen(uint64_t now, uint64_t run_id) { (void)run_touch(now, run_id); }

void fs_view_run_info(uint64_t now, uint64_t run_id, const char *fab_id, const char *fab_version, const char *status) {
  vrun *r = run_touch(now, run_id);
  if (!r) return;
  if (fab_id && *fab_id) copy_cut(r->fab_id, sizeof(r->fab_id), fab_id);
  if (fab_version && *fab_version) copy_cut(r->fab_version, sizeof(r->fab_version), fab_version);
  if (status && *status) copy_cut(r->status, sizeof(r->status), status);
  if (status && !strcmp(status, "finished")) run_end(now, r, "finished");
}

/* The oldest phase of all runs goes (FS_VIEW_PHASES reached). */
static void drop_oldest_phase(void) {
  vrun *best = NULL;
  int i;
  for (i = 0; i < FS_VIEW_RUNS; i++) {
    vrun *r = &V.runs[i];
    if (r->used && r->n && (!best || ph_at(r, 0)->serial < ph_at(best, 0)->serial)) best = r;
  }
  if (!best) return;
  free(ph_at(best, 0)->stats);
  best->head = (best->head + 1) % best->cap;
  best->n--;
  best->phases_dropped++;
  V.phases--;
}

void fs_view_round_start(uint64_t now, uint64_t run_id, uint64_t serial, int64_t round, const char *type) {
  vrun *r = run_touch(now, run_id);
  vphase *p;
  if (!r) return;
  if (r->n == r->cap && r->cap < FS_VIEW_RUN_PHASES) { /* grow the ring, oldest first again */
    uint32_t cap = r->cap ? r->cap * 2 : 16, i;
    vphase *ph;
    if (cap > FS_VIEW_RUN_PHASES) cap = FS_VIEW_RUN_PHASES;
    if ((ph = calloc(cap, sizeof(*ph)))) {
      for (i = 0; i < r->n; i++) ph[i] = *ph_at(r, i);
      free(r->ph);
      r->ph = ph;
      r->cap = cap;
      r->head = 0;
    }
  }
  if (!r->cap) return;  /* out of memory: this round is not kept */
  if (r->n == r->cap) { /* this run's cap: its oldest phase goes */
    free(ph_at(r, 0)->stats);
    r->head = (r->head + 1) % r->cap;
    r->n--;
    r->phases_dropped++;
    V.phases--;
  }
  if (V.phases >= FS_VIEW_PHASES) drop_oldest_phase();
  p = ph_at(r, r->n);
  memset(p, 0, sizeof(*p));
  p->serial = serial;
  p->round = round;
  copy_cut(p->type, sizeof(p->type), type);
  p->t_start = now;
  r->n++;
  r->open = 1;
  V.phases++;
}

static vphase *phase_find(uint64_t serial, vrun **run) {
  int i;
  for (i = 0; i < FS_VIEW_RUNS; i++) {
    vrun *r = &V.runs[i];
    uint32_t j;
    if (!r->used || !r->n || serial < ph_at(r, 0)->serial || serial > ph_at(r, r->n - 1)->serial) continue;
    for (j = r->n; j-- > 0;) /* the newest first: that is where replies go */
      if (ph_at(r, j)->serial == serial) {
        if (run) *run = r;
        return ph_at(r, j);
      }
  }
  return NULL;
}

/* A metric key as an event field name, flat snake_case as every event
 * field: "metric_" and the key lowercased, characters other than [a-z0-9_]
 * replaced by '_' ("train-loss" -> "metric_train_loss"). */
static void field_name(char *out, size_t cap, const char *key) {
  size_t i, o = 0;
  static const char prefix[] = "metric_";
  memcpy(out, prefix, sizeof(prefix) - 1);
  o = sizeof(prefix) - 1;
  for (i = 0; key[i] && o + 1 < cap; i++) {
    char c = key[i];
    if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
    out[o++] = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ? c : '_';
  }
  out[o] = '\0';
}

void fs_view_round_end(uint64_t now, uint64_t serial, const fs_view_round_stats *st) {
  vrun *r = NULL;
  vphase *p = phase_find(serial, &r);
  fs_event ev;
  uint32_t k, i;
  if (!p) return;
  p->t_end = now ? now : 1;
  p->st = *st;
  r->last_ms = now;
  r->open = 0;
  for (i = 0; i < r->n; i++)
    if (!ph_at(r, i)->t_end) r->open = 1;
  if (!p->with_metrics || !fs_ev_begin(&ev, FS_LOG_INFO, "round.metrics")) return;
  fs_ev_id(&ev, "run_id", r->run_id);
  fs_ev_i64(&ev, "round", p->round);
  fs_ev_str(&ev, "message_type", p->type);
  fs_ev_u64(&ev, "replies", p->with_metrics);
  fs_ev_num(&ev, "examples", p->examples, 0);
  for (k = 0; k < r->nkeys; k++) {
    char name[FS_VIEW_KEY_LEN + 16];
    int weighted;
    double m;
    if (!p->stats || !p->stats[k].count) continue;
    m = fs_mrec_mean(&p->stats[k], &weighted);
    field_name(name, sizeof(name), r->keys[k]);
    fs_ev_num(&ev, name, m, 9);
  }
  fs_ev_end(&ev);
}

/* The index of |key| in the run's key table, added when there is room;
 * -1 when it is not (too long, table full). */
static int key_index(vrun *r, const char *key, size_t len) {
  uint32_t k;
  if (len == 0 || len > FS_VIEW_KEY_LEN || memchr(key, '\0', len)) return -1;
  for (k = 0; k < r->nkeys; k++)
    if (strlen(r->keys[k]) == len && !memcmp(r->keys[k], key, len)) return (int)k;
  if (r->nkeys >= FS_VIEW_KEYS) return -1;
  memcpy(r->keys[r->nkeys], key, len);
  r->keys[r->nkeys][len] = '\0';
  return (int)r->nkeys++;
}

static int is_weight_key(const fs_mrec_item *it) {
  return it->key_len == sizeof(FS_MREC_WEIGHT_KEY) - 1 && !memcmp(it->key, FS_MREC_WEIGHT_KEY, it->key_len);
}

int fs_view_metrics(uint64_t serial, const uint8_t *body, size_t len) {
  fs_mrec_item items[FS_MREC_MAX_ITEMS];
  vrun *r = NULL;
  vphase *p = phase_find(serial, &r);
  int n = fs_mrec_parse(body, len, items, FS_MREC_MAX_ITEMS), has_w, i;
  double w = 0;
  if (n < 0) return -1;
  if (!p) return 0;
  if (!p->stats && !(p->stats = calloc(FS_VIEW_KEYS, sizeof(fs_mrec_stat)))) return 0;
  p->with_metrics++;
  if (n > FS_MREC_MAX_ITEMS) {
    p->skipped += (uint32_t)(n - FS_MREC_MAX_ITEMS);
    n = FS_MREC_MAX_ITEMS;
  }
  has_w = fs_mrec_weight(items, (size_t)n, &w);
  if (has_w) p->examples += w;
  for (i = 0; i < n; i++) {
    int k;
    if (items[i].kind == FS_MREC_LIST) {
      p->lists++;
      continue;
    }
    if (items[i].kind != FS_MREC_SCALAR || (k = key_index(r, items[i].key, items[i].key_len)) < 0) {
      p->skipped++;
      continue;
    }
    /* The weight itself is summarized unweighted. */
    fs_mrec_add(&p->stats[k], items[i].value, has_w && !is_weight_key(&items[i]), w);
  }
  return 0;
}

void fs_view_tick(uint64_t now) {
  int i;
  for (i = 0; i < FS_VIEW_RUNS; i++) {
    vrun *r = &V.runs[i];
    if (r->used && !r->end_reason && !r->open && now >= r->last_ms + FS_VIEW_RUN_IDLE_MS) run_end(now, r, "idle");
  }
}

/* --- the document ----------------------------------------------------------- */

typedef struct jw {
  char *p;
  size_t len, cap, max;
  int failed;
} jw;

static int jw_room(jw *w, size_t n) {
  char *np;
  size_t cap;
  if (w->failed) return 0;
  if (w->len + n + 1 <= w->cap) return 1;
  if (w->len + n + 1 > w->max) return w->failed = 1, 0;
  cap = w->cap ? w->cap : 4096;
  while (cap < w->len + n + 1) cap *= 2;
  if (cap > w->max) cap = w->max;
  if (!(np = realloc(w->p, cap))) return w->failed = 1, 0;
  w->p = np;
  w->cap = cap;
  return 1;
}

static void jw_raw(jw *w, const char *s, size_t n) {
  if (!jw_room(w, n)) return;
  memcpy(w->p + w->len, s, n);
  w->len += n;
  w->p[w->len] = '\0';
}

static void jw_fmt(jw *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void jw_fmt(jw *w, const char *fmt, ...) {
  char tmp[128];
  va_list ap;
  int n;
  va_start(ap, fmt);
  n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
  va_end(ap);
  if (n > 0) jw_raw(w, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

/* A JSON string: escaped by log.c's escaper (invalid UTF-8 becomes U+FFFD). */
static void jw_strn(jw *w, const char *s, size_t n) {
  size_t done = 0;
  jw_raw(w, "\"", 1);
  while (done < n && !w->failed) {
    size_t chunk = n - done > 1024 ? 1024 : n - done, used;
    if (!jw_room(w, 6 * chunk)) return;
    used = fs_json_escape(w->p, w->cap - 1, &w->len, s + done, chunk);
    if (!used) break; /* cannot happen with room for 6 bytes per byte */
    done += used;
  }
  w->p[w->len] = '\0';
  jw_raw(w, "\"", 1);
}

static void jw_str(jw *w, const char *s) { jw_strn(w, s ? s : "", s ? strlen(s) : 0); }

/* A key (our own ASCII) and the colon. */
static void jw_key(jw *w, int *first, const char *key) {
  jw_raw(w, *first ? "\"" : ",\"", *first ? 1 : 2);
  jw_raw(w, key, strlen(key));
  jw_raw(w, "\":", 2);
  *first = 0;
}

/* "key":unsigned. */
static void jw_u64(jw *w, int *first, const char *key, uint64_t v) {
  jw_key(w, first, key);
  jw_fmt(w, "%" PRIu64, v);
}

static void jw_num(jw *w, double v) {
  if (!isfinite(v)) jw_raw(w, "null", 4); /* JSON has no NaN or infinity */
  else jw_fmt(w, "%.17g", v);
}

static uint64_t wall(const fs_view_ctx *c, uint64_t t) {
  uint64_t back = c->now_ms > t ? c->now_ms - t : 0;
  return c->wall_ms > back ? c->wall_ms - back : 0;
}

typedef struct node_ctx {
  jw *w;
  const fs_view_ctx *c;
  size_t n;
} node_ctx;

static void node_json(void *ud, const fs_fed_node_info *n) {
  node_ctx *nc = ud;
  jw *w = nc->w;
  int f = 1;
  if (nc->n++) jw_raw(w, ",", 1);
  jw_raw(w, "{", 1);
  jw_key(w, &f, "node_id");
  jw_fmt(w, "\"%" PRIu64 "\"", n->node_id);
  jw_key(w, &f, "peer");
  jw_str(w, n->peer);
  jw_key(w, &f, "state");
  jw_str(w, fs_fed_node_state_name(n->state));
  jw_u64(w, &f, "last_seen_ms", n->last_seen_ms ? wall(nc->c, n->last_seen_ms) : 0);
  jw_u64(w, &f, "idle_ms", nc->c->now_ms > n->last_seen_ms ? nc->c->now_ms - n->last_seen_ms : 0);
  jw_key(w, &f, "heartbeat_interval_s");
  jw_num(w, n->heartbeat_s);
  jw_u64(w, &f, "calls", n->calls);
  jw_u64(w, &f, "errors", n->errors);
  jw_u64(w, &f, "bytes_in", n->bytes_in);
  jw_u64(w, &f, "bytes_out", n->bytes_out);
  jw_raw(w, "}", 1);
}

static void phase_json(jw *w, const fs_view_ctx *c, const vrun *r, const vphase *p) {
  fs_view_round_stats st = p->st;
  int f = 1, open = !p->t_end;
  uint64_t end = open ? c->now_ms : p->t_end;
  uint32_t k;
  if (open) (void)fs_fed_round_live(p->serial, &st); /* an open round's counters are live */
  jw_raw(w, "{", 1);
  jw_key(w, &f, "round");
  jw_fmt(w, "%" PRId64, p->round);
  jw_key(w, &f, "message_type");
  jw_str(w, p->type);
  jw_key(w, &f, "open");
  jw_raw(w, open ? "true" : "false", open ? 4 : 5);
  jw_u64(w, &f, "start_ms", wall(c, p->t_start));
  jw_key(w, &f, "end_ms");
  if (open) jw_raw(w, "null", 4);
  else jw_fmt(w, "%" PRIu64, wall(c, p->t_end));
  jw_u64(w, &f, "duration_ms", end > p->t_start ? end - p->t_start : 0);
  jw_u64(w, &f, "nodes", st.nodes);
  jw_u64(w, &f, "replies", st.replies);
  jw_u64(w, &f, "errors", st.errors);
  jw_u64(w, &f, "missing", st.missing);
  jw_u64(w, &f, "bytes_in", st.bytes_in);
  jw_u64(w, &f, "bytes_out", st.bytes_out);
  jw_u64(w, &f, "metric_records", p->with_metrics);
  jw_key(w, &f, "examples");
  jw_num(w, p->examples);
  jw_u64(w, &f, "list_values", p->lists);
  jw_u64(w, &f, "skipped_values", p->skipped);
  jw_key(w, &f, "metrics");
  jw_raw(w, "{", 1);
  {
    int first = 1;
    for (k = 0; p->stats && k < r->nkeys; k++) {
      const fs_mrec_stat *s = &p->stats[k];
      int weighted, g = 1;
      double m;
      if (!s->count) continue;
      m = fs_mrec_mean(s, &weighted);
      if (!first) jw_raw(w, ",", 1);
      first = 0;
      jw_str(w, r->keys[k]);
      jw_raw(w, ":{", 2);
      jw_u64(w, &g, "count", s->count);
      jw_key(w, &g, "min");
      jw_num(w, s->min);
      jw_key(w, &g, "max");
      jw_num(w, s->max);
      jw_key(w, &g, "mean");
      jw_num(w, m);
      jw_key(w, &g, "weighted");
      jw_raw(w, weighted ? "true" : "false", weighted ? 4 : 5);
      jw_raw(w, "}", 1);
    }
  }
  jw_raw(w, "}}", 2);
}

static void run_json(jw *w, const fs_view_ctx *c, const vrun *r) {
  int f = 1;
  uint32_t i;
  jw_raw(w, "{", 1);
  jw_key(w, &f, "run_id");
  jw_fmt(w, "\"%" PRIu64 "\"", r->run_id);
  jw_key(w, &f, "fab_id");
  jw_str(w, r->fab_id);
  jw_key(w, &f, "fab_version");
  jw_str(w, r->fab_version);
  jw_key(w, &f, "status");
  jw_str(w, r->status);
  jw_u64(w, &f, "first_seen_ms", wall(c, r->first_ms));
  jw_u64(w, &f, "last_seen_ms", wall(c, r->last_ms));
  jw_key(w, &f, "ended");
  if (r->end_reason) jw_str(w, r->end_reason);
  else jw_raw(w, "null", 4);
  jw_u64(w, &f, "rounds_dropped", r->phases_dropped);
  jw_key(w, &f, "metric_keys");
  jw_raw(w, "[", 1);
  for (i = 0; i < r->nkeys; i++) {
    if (i) jw_raw(w, ",", 1);
    jw_str(w, r->keys[i]);
  }
  jw_raw(w, "]", 1);
  jw_key(w, &f, "rounds");
  jw_raw(w, "[", 1);
  for (i = 0; i < r->n; i++) {
    if (i) jw_raw(w, ",", 1);
    phase_json(w, c, r, ((vrun *)r)->ph + ((r->head + i) % r->cap));
  }
  jw_raw(w, "]}", 2);
}

char *fs_view_render(const fs_view_ctx *c, size_t max, size_t *len) {
  jw w = {NULL, 0, 0, max, 0};
  uint64_t counts[FS_NODE_NSTATES], tracked = fs_fed_node_states(c->now_ms, counts);
  const vrun *order[FS_VIEW_RUNS];
  size_t nr = 0, i, j;
  int f = 1, s;
  node_ctx nc = {&w, c, 0};
  jw_raw(&w, "{", 1);
  jw_key(&w, &f, "version");
  jw_str(&w, c->version);
  jw_key(&w, &f, "role");
  jw_str(&w, c->role);
  jw_u64(&w, &f, "now_ms", c->wall_ms);
  jw_key(&w, &f, "health");
  {
    int g = 1;
    jw_raw(&w, "{", 1);
    jw_key(&w, &g, "status");
    jw_str(&w, c->health);
    jw_key(&w, &g, "reason");
    jw_str(&w, c->health_reason);
    jw_raw(&w, "}", 1);
  }
  jw_key(&w, &f, "upstream");
  {
    int g = 1;
    jw_raw(&w, "{", 1);
    jw_key(&w, &g, "address");
    jw_str(&w, c->upstream);
    jw_key(&w, &g, "up");
    jw_raw(&w, c->upstream_up ? "true" : "false", c->upstream_up ? 4 : 5);
    jw_raw(&w, "}", 1);
  }
  jw_key(&w, &f, "limits");
  jw_fmt(&w,
         "{\"nodes\":%d,\"runs\":%d,\"rounds_per_run\":%d,\"rounds\":%d,\"metric_keys_per_run\":%d,"
         "\"metric_key_length\":%d}",
         FS_FED_MAX_NODES, FS_VIEW_RUNS, FS_VIEW_RUN_PHASES, FS_VIEW_PHASES, FS_VIEW_KEYS, FS_VIEW_KEY_LEN);
  jw_key(&w, &f, "node_counts");
  jw_raw(&w, "{", 1);
  for (s = 0; s < FS_NODE_NSTATES; s++)
    jw_fmt(&w, "%s\"%s\":%" PRIu64, s ? "," : "", fs_fed_node_state_name((fs_node_state)s), counts[s]);
  jw_fmt(&w, ",\"tracked\":%" PRIu64 ",\"untracked_calls\":%" PRIu64 "}", tracked, fs_fed_nodes_untracked());
  jw_key(&w, &f, "nodes");
  jw_raw(&w, "[", 1);
  fs_fed_each_node(c->now_ms, node_json, &nc);
  jw_raw(&w, "]", 1);
  jw_u64(&w, &f, "runs_dropped", V.runs_dropped);
  /* Runs, first seen first. */
  for (i = 0; i < FS_VIEW_RUNS; i++) {
    if (!V.runs[i].used) continue;
    for (j = nr; j > 0 && order[j - 1]->first_ms > V.runs[i].first_ms; j--) order[j] = order[j - 1];
    order[j] = &V.runs[i];
    nr++;
  }
  jw_key(&w, &f, "runs");
  jw_raw(&w, "[", 1);
  for (i = 0; i < nr; i++) {
    if (i) jw_raw(&w, ",", 1);
    run_json(&w, c, order[i]);
  }
  jw_raw(&w, "]}\n", 3);
  if (w.failed) {
    free(w.p);
    return NULL;
  }
  *len = w.len;
  return w.p;
}
