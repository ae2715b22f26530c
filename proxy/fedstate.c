/* fedstate: see fedstate.h. */
#include "fedstate.h"

#include <stdlib.h>
#include <string.h>

#include "fleet.h"
#include "log.h"

typedef struct fnode {
  uint64_t id;
  uint64_t last_seen_ms;
  double hb_s;
  uint64_t cur_serial;        /* the round its latest instruction belongs to */
  uint64_t awaited_serial;    /* a round that counts on it (online at its start) */
  int64_t cur_round;          /* -1: not known (yet) */
  uint64_t pend_in, pend_out; /* object bytes before its round was known */
  uint32_t pushes_left;       /* objects its reply still has to push */
  uint64_t unsettled_in;      /* bytes of pushes counted on arrival whose call has not ended */
  uint64_t unsettled_serial;  /* the round they were counted in */
  uint64_t calls, errors, bytes_in, bytes_out;
  char peer[48];
  uint8_t used, active, offline, deactivated;
} fnode;

typedef struct fmsg {
  char id[FS_FED_ID_LEN + 1];
  char *type, *group; /* owned; at most FS_FED_STR_MAX bytes */
  uint64_t node_id, run_id, t_dispatch;
  int64_t round; /* -1 unknown */
  uint32_t n_objects;
  char (*objects)[FS_FED_ID_LEN + 1]; /* while the round is unknown */
  uint8_t used, announced, replied;
} fmsg;

#define MAX_ROUNDS 32
typedef struct fround {
  uint64_t run_id, serial;
  char type[FS_FED_STR_MAX + 1];
  int64_t round;
  uint64_t t_start;
  uint32_t nodes, replies, errors, missing; /* missing: went offline without replying */
  uint32_t awaited;                         /* online nodes at its start that have not left without joining */
  uint32_t pushes_pending;                  /* reply objects announced, not yet pushed */
  uint64_t bytes_in, bytes_out;
  uint8_t open;
} fround;

#define CONFIG_CACHE 256
static struct {
  fnode *nodes; /* open addressing by id */
  size_t nodes_cap, n_nodes;
  fmsg *msgs; /* open addressing by id hash */
  size_t msgs_cap, n_msgs;
  fround rounds[MAX_ROUNDS];
  struct {
    char id[FS_FED_ID_LEN + 1];
    int64_t round;
  } cfg[CONFIG_CACHE];
  size_t cfg_next;
  uint64_t active; /* activated, not deactivated */
  int64_t last_round;
  uint64_t last_round_run;
  uint64_t round_serial;
  uint64_t untracked; /* calls of nodes beyond the cap */
  fs_fed_run runs[FS_FED_RUNS];
} F;

/* The run's counters; the least recently seen run makes room. */
static fs_fed_run *run_get(uint64_t now, uint64_t run_id) {
  fs_fed_run *r = NULL, *oldest = &F.runs[0];
  int i;
  for (i = 0; i < FS_FED_RUNS && !r; i++) {
    if (F.runs[i].last_ms && F.runs[i].run_id == run_id) r = &F.runs[i];
    else if (F.runs[i].last_ms < oldest->last_ms) oldest = &F.runs[i];
  }
  if (!r) {
    r = oldest;
    memset(r, 0, sizeof(*r));
    r->run_id = run_id;
    r->round = -1;
  }
  r->last_ms = now ? now : 1; /* 0 marks a free slot */
  fs_view_run_seen(now, run_id);
  return r;
}

size_t fs_fed_runs(fs_fed_run *out) {
  size_t n = 0, i, j;
  for (i = 0; i < FS_FED_RUNS; i++) {
    if (!F.runs[i].last_ms) continue;
    for (j = n; j > 0 && out[j - 1].last_ms < F.runs[i].last_ms; j--) out[j] = out[j - 1];
    out[j] = F.runs[i];
    out[j].open_since_ms = 0;
    {
      int k;
      for (k = 0; k < MAX_ROUNDS; k++)
        if (F.rounds[k].open && F.rounds[k].run_id == F.runs[i].run_id) out[j].open_since_ms = F.rounds[k].t_start;
    }
    n++;
  }
  return n;
}

static void msg_free(fmsg *m) {
  free(m->objects);
  free(m->type);
  free(m->group);
}

void fs_fed_reset(void) {
  size_t i;
  for (i = 0; i < F.msgs_cap; i++) msg_free(&F.msgs[i]);
  free(F.nodes);
  free(F.msgs);
  memset(&F, 0, sizeof(F));
  F.last_round = -1;
  fs_view_reset();
}

uint64_t fs_fed_nodes_active(void) { return F.active; }
int64_t fs_fed_current_round(uint64_t *run_id) {
  *run_id = F.last_round_run;
  return F.last_round;
}

/* --- tables ------------------------------------------------------------------ */

static uint64_t hash_u64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  return x;
}

static uint64_t hash_str(const char *s) {
  uint64_t h = 1469598103934665603ull;
  while (*s) h = (h ^ (uint8_t)*s++) * 1099511628211ull;
  return h;
}

static fnode *node_get(uint64_t id, int create) {
  size_t i, mask;
  if (!F.nodes) {
    if (!create || !(F.nodes = calloc(1024, sizeof(fnode)))) return NULL;
    F.nodes_cap = 1024;
  }
  mask = F.nodes_cap - 1;
  for (i = hash_u64(id) & mask;; i = (i + 1) & mask) {
    if (F.nodes[i].used && F.nodes[i].id == id) return &F.nodes[i];
    if (!F.nodes[i].used) break;
  }
  if (!create || F.n_nodes >= FS_FED_MAX_NODES) return NULL;
  if ((F.n_nodes + 1) * 2 > F.nodes_cap) { /* grow: keep the load under 1/2 */
    fnode *old = F.nodes;
    size_t oldcap = F.nodes_cap, j;
    if (!(F.nodes = calloc(oldcap * 2, sizeof(fnode)))) return F.nodes = old, NULL;
    F.nodes_cap = oldcap * 2;
    for (j = 0; j < oldcap; j++)
      if (old[j].used) {
        size_t k;
        for (k = hash_u64(old[j].id) & (F.nodes_cap - 1); F.nodes[k].used; k = (k + 1) & (F.nodes_cap - 1)) {}
        F.nodes[k] = old[j];
      }
    free(old);
    return node_get(id, create);
  }
  F.nodes[i].used = 1;
  F.nodes[i].id = id;
  F.nodes[i].cur_round = -1;
  F.n_nodes++;
  return &F.nodes[i];
}

/* Messages: fixed table (deletions would need tombstones; entries are freed
 * by marking them replied and reused when the table is rebuilt). */
static fmsg *msg_find(const char *id) {
  size_t i, mask, n;
  if (!F.msgs || !id || !*id) return NULL;
  mask = F.msgs_cap - 1;
  for (i = hash_str(id) & mask, n = 0; n < F.msgs_cap; i = (i + 1) & mask, n++) {
    if (!F.msgs[i].used) return NULL;
    if (!strcmp(F.msgs[i].id, id)) return &F.msgs[i];
  }
  return NULL;
}

static void msgs_compact(void) {
  /* Drop replied messages by rebuilding the table. */
  fmsg *old = F.msgs;
  size_t cap = F.msgs_cap, j;
  if (!(F.msgs = calloc(cap, sizeof(fmsg)))) {
    F.msgs = old;
    return;
  }
  F.n_msgs = 0;
  for (j = 0; j < cap; j++) {
    if (!old[j].used) continue;
    if (old[j].replied) {
      msg_free(&old[j]);
      continue;
    }
    {
      size_t k;
      for (k = hash_str(old[j].id) & (cap - 1); F.msgs[k].used; k = (k + 1) & (cap - 1)) {}
      F.msgs[k] = old[j];
      F.n_msgs++;
    }
  }
  free(old);
}

static fmsg *msg_add(const char *id) {
  size_t i, mask;
  if (strlen(id) > FS_FED_ID_LEN) return NULL;
  if (!F.msgs) {
    if (!(F.msgs = calloc(2 * FS_FED_MAX_MSGS, sizeof(fmsg)))) return NULL;
    F.msgs_cap = 2 * FS_FED_MAX_MSGS;
  }
  if (F.n_msgs >= FS_FED_MAX_MSGS) msgs_compact();
  if (F.n_msgs >= FS_FED_MAX_MSGS) return NULL;
  mask = F.msgs_cap - 1;
  for (i = hash_str(id) & mask; F.msgs[i].used; i = (i + 1) & mask)
    if (!strcmp(F.msgs[i].id, id)) return &F.msgs[i];
  F.msgs[i].used = 1;
  strcpy(F.msgs[i].id, id);
  F.n_msgs++;
  return &F.msgs[i];
}

static void copy(char *dst, size_t cap, const char *s) {
  size_t n = s ? strlen(s) : 0;
  if (n >= cap) n = cap - 1;
  if (n) memcpy(dst, s, n);
  dst[n] = '\0';
}

/* --- rounds ------------------------------------------------------------------- */

/* An owned copy of |s| cut to FS_FED_STR_MAX bytes (never inside a UTF-8
 * sequence); NULL when out of memory. */
static char *dup_str(const char *s) {
  size_t n = s ? strlen(s) : 0;
  char *d;
  if (n > FS_FED_STR_MAX) {
    n = FS_FED_STR_MAX;
    while (n > 0 && ((uint8_t)s[n] & 0xC0) == 0x80) n--;
  }
  if (!(d = malloc(n + 1))) return NULL;
  if (n) memcpy(d, s, n);
  d[n] = '\0';
  return d;
}

static fround *round_open(uint64_t serial) {
  int i;
  for (i = 0; i < MAX_ROUNDS; i++)
    if (F.rounds[i].open && F.rounds[i].serial == serial) return &F.rounds[i];
  return NULL;
}

static fround *round_of_node(const fnode *n) { return n && n->cur_round >= 0 ? round_open(n->cur_serial) : NULL; }

static fround *round_find(uint64_t run_id, const char *type, int64_t round) {
  int i;
  for (i = 0; i < MAX_ROUNDS; i++)
    if (F.rounds[i].open && F.rounds[i].run_id == run_id && F.rounds[i].round == round &&
        !strcmp(F.rounds[i].type, type))
      return &F.rounds[i];
  return NULL;
}

static void round_stats(const fround *r, fs_view_round_stats *st) {
  st->nodes = r->nodes;
  st->replies = r->replies;
  st->errors = r->errors;
  st->missing = r->missing;
  st->bytes_in = r->bytes_in;
  st->bytes_out = r->bytes_out;
}

int fs_fed_round_live(uint64_t serial, fs_view_round_stats *out) {
  fround *r = serial ? round_open(serial) : NULL;
  if (!r) return 0;
  round_stats(r, out);
  return 1;
}

static void round_end(uint64_t now, fround *r) {
  fs_event ev;
  fs_view_round_stats st;
  if (fs_ev_begin(&ev, FS_LOG_INFO, "round.end")) {
    fs_ev_id(&ev, "run_id", r->run_id);
    fs_ev_i64(&ev, "round", r->round);
    fs_ev_str(&ev, "message_type", r->type);
    fs_ev_u64(&ev, "nodes", r->nodes);
    fs_ev_u64(&ev, "replies", r->replies);
    fs_ev_u64(&ev, "errors", r->errors);
    fs_ev_u64(&ev, "missing", r->missing);
    fs_ev_u64(&ev, "duration_ms", now - r->t_start);
    fs_ev_u64(&ev, "bytes_in", r->bytes_in);
    fs_ev_u64(&ev, "bytes_out", r->bytes_out);
    fs_ev_end(&ev);
  }
  r->open = 0;
  round_stats(r, &st);
  fs_view_round_end(now, r->serial, &st);
}

/* A message's round became known: count its node in the round. */
static fround *round_join(uint64_t now, const fmsg *m) {
  fround *r = round_find(m->run_id, m->type, m->round), *slot = NULL;
  fs_event ev;
  int i;
  if (r) {
    r->nodes++;
    return r;
  }
  /* The ServerApp starts a phase once the previous one is over: a new round
   * or message type of this run closes what is still open of it. */
  for (i = 0; i < MAX_ROUNDS; i++) {
    fround *o = &F.rounds[i];
    if (o->open && o->run_id == m->run_id) round_end(now, o);
  }
  for (i = 0; i < MAX_ROUNDS && !slot; i++)
    if (!F.rounds[i].open) slot = &F.rounds[i];
  if (!slot) { /* too many runs at once: the oldest round ends early */
    slot = &F.rounds[0];
    for (i = 1; i < MAX_ROUNDS; i++)
      if (F.rounds[i].t_start < slot->t_start) slot = &F.rounds[i];
    round_end(now, slot);
  }
  memset(slot, 0, sizeof(*slot));
  slot->open = 1;
  slot->run_id = m->run_id;
  slot->serial = ++F.round_serial;
  copy(slot->type, sizeof(slot->type), m->type);
  slot->round = m->round;
  slot->t_start = now;
  slot->nodes = 1;
  /* The nodes online now are the ones the phase can count on; one that
   * leaves without joining is awaited no more, one that leaves after its
   * reply still was (the others may not have pulled theirs yet). */
  {
    size_t j;
    for (j = 0; j < F.nodes_cap; j++) {
      fnode *n = &F.nodes[j];
      if (n->used && n->active && !n->offline) {
        n->awaited_serial = slot->serial;
        slot->awaited++;
      }
    }
  }
  F.last_round = m->round;
  F.last_round_run = m->run_id;
  if (fs_ev_begin(&ev, FS_LOG_INFO, "round.start")) {
    fs_ev_id(&ev, "run_id", m->run_id);
    fs_ev_i64(&ev, "round", m->round);
    fs_ev_str(&ev, "message_type", m->type);
    fs_ev_end(&ev);
  }
  fs_view_round_start(now, m->run_id, slot->serial, m->round, m->type);
  return slot;
}

/* Every online node got the instruction and answered: the round is over.
 * (With client sampling, fewer nodes take part: the next phase ends it.) */
static void round_maybe_end(uint64_t now, fround *r) {
  if (r->open && r->nodes > 0 && r->replies + r->missing >= r->nodes && r->pushes_pending == 0 &&
      r->nodes >= r->awaited)
    round_end(now, r);
}

static void announce(uint64_t now, fmsg *m) {
  fs_event ev;
  if (m->announced) return;
  m->announced = 1;
  if (m->round >= 0) {
    fnode *n = node_get(m->node_id, 0);
    fround *r = round_join(now, m);
    if (n) {
      n->cur_serial = r->serial;
      n->cur_round = m->round;
      r->bytes_in += n->pend_in;
      r->bytes_out += n->pend_out;
      n->pend_in = n->pend_out = 0;
    }
  }
  {
    fs_fed_run *run = run_get(now, m->run_id);
    run->instructions++;
    if (m->round >= 0) run->round = m->round;
  }
  if (fs_ev_begin(&ev, FS_LOG_INFO, "message.dispatch")) {
    fs_ev_id(&ev, "node_id", m->node_id);
    fs_ev_id(&ev, "run_id", m->run_id);
    fs_ev_str(&ev, "message_id", m->id);
    fs_ev_str(&ev, "message_type", m->type);
    fs_ev_str(&ev, "group_id", m->group);
    if (m->round >= 0) fs_ev_i64(&ev, "round", m->round);
    fs_ev_u64(&ev, "objects", m->n_objects);
    fs_ev_end(&ev);
  }
  free(m->objects);
  m->objects = NULL;
}

static int64_t cached_round(const char *object_id) {
  size_t i;
  for (i = 0; i < CONFIG_CACHE; i++)
    if (F.cfg[i].id[0] && !strcmp(F.cfg[i].id, object_id)) return F.cfg[i].round;
  return -1;
}

/* An instruction that is not tracked: say what we know now. */
static void dispatch_untracked(const fs_fed_dispatch *d) {
  fs_event ev;
  if (fs_ev_begin(&ev, FS_LOG_INFO, "message.dispatch")) {
    fs_ev_id(&ev, "node_id", d->node_id);
    fs_ev_id(&ev, "run_id", d->run_id);
    fs_ev_str(&ev, "message_id", d->message_id);
    fs_ev_str(&ev, "message_type", d->message_type);
    fs_ev_str(&ev, "group_id", d->group_id);
    fs_ev_u64(&ev, "objects", d->n_objects);
    fs_ev_end(&ev);
  }
}

void fs_fed_dispatch_msg(uint64_t now, const fs_fed_dispatch *d) {
  fmsg *m = d->message_id ? msg_add(d->message_id) : NULL;
  size_t i;
  if (!m) {
    dispatch_untracked(d);
    return;
  }
  if (m->announced) return; /* handed out again: already told */
  fs_view_run_seen(now, d->run_id);
  {
    fnode *n = node_get(d->node_id, 1);
    if (n) { /* its next object bytes belong to this instruction */
      n->cur_round = -1;
      n->pend_in = n->pend_out = 0;
    }
  }
  m->node_id = d->node_id;
  m->run_id = d->run_id;
  m->t_dispatch = now;
  m->round = -1;
  m->n_objects = (uint32_t)d->n_objects;
  free(m->type);
  free(m->group);
  m->type = dup_str(d->message_type);
  m->group = dup_str(d->group_id);
  if (!m->type || !m->group) { /* out of memory: forget it, say what we know */
    m->replied = 1;
    m->announced = 1;
    free(m->type), free(m->group);
    m->type = m->group = NULL;
    dispatch_untracked(d);
    return;
  }
  for (i = 0; i < d->n_objects && m->round < 0; i++) m->round = cached_round(d->objects[i]);
  if (m->round >= 0) {
    announce(now, m);
    return;
  }
  free(m->objects);
  m->objects = calloc(d->n_objects < FS_FED_MAX_TREE ? d->n_objects : FS_FED_MAX_TREE, FS_FED_ID_LEN + 1);
  for (i = 0; m->objects && i < d->n_objects && i < FS_FED_MAX_TREE; i++)
    copy(m->objects[i], FS_FED_ID_LEN + 1, d->objects[i]);
}

void fs_fed_config_round(uint64_t now, const char *object_id, int64_t round) {
  size_t i, j;
  if (!object_id || !*object_id) return;
  if (cached_round(object_id) < 0) {
    copy(F.cfg[F.cfg_next].id, FS_FED_ID_LEN + 1, object_id);
    F.cfg[F.cfg_next].round = round;
    F.cfg_next = (F.cfg_next + 1) % CONFIG_CACHE;
  }
  /* Pending instructions whose tree holds this object now know their round. */
  for (i = 0; i < F.msgs_cap; i++) {
    fmsg *m = &F.msgs[i];
    if (!m->used || m->announced || !m->objects) continue;
    for (j = 0; j < m->n_objects && j < FS_FED_MAX_TREE; j++)
      if (!strcmp(m->objects[j], object_id)) {
        m->round = round;
        announce(now, m);
        break;
      }
  }
}

void fs_fed_confirm(uint64_t now, uint64_t node_id, uint64_t run_id, const char *message_id) {
  fmsg *m = msg_find(message_id);
  fs_event ev;
  if (m) announce(now, m);
  if (fs_ev_begin(&ev, FS_LOG_INFO, "message.confirm")) {
    fs_ev_id(&ev, "node_id", node_id);
    fs_ev_id(&ev, "run_id", run_id);
    fs_ev_str(&ev, "message_id", message_id);
    fs_ev_end(&ev);
  }
}

/* One of the objects |n|'s reply announced arrived. */
static void reply_object_in(fnode *n, fround *r) {
  if (!n->pushes_left) return;
  n->pushes_left--;
  r->pushes_pending--;
}

void fs_fed_object_bytes(uint64_t node_id, uint64_t bytes, int pulled) {
  fnode *n = node_get(node_id, 0);
  fround *r = round_of_node(n);
  if (n && n->cur_round < 0) {
    if (pulled) n->pend_out += bytes;
    else n->pend_in += bytes;
    return;
  }
  if (!r) return;
  if (pulled) {
    r->bytes_out += bytes;
  } else {
    r->bytes_in += bytes;
    reply_object_in(n, r);
  }
}

int fs_fed_push_arrived(uint64_t node_id, uint64_t bytes) {
  fnode *n = node_get(node_id, 0);
  fround *r = round_of_node(n);
  /* Pushes of two rounds at once (not Flower's way): the later one is
   * counted when it succeeds, as a push of an unknown round is. */
  if (!r || (n->unsettled_in && n->unsettled_serial != r->serial)) return 0;
  r->bytes_in += bytes;
  n->unsettled_in += bytes;
  n->unsettled_serial = r->serial;
  return 1;
}

void fs_fed_push_settled(uint64_t node_id, uint64_t bytes, int ok) {
  fnode *n = node_get(node_id, 0);
  fround *r;
  if (!n) return;
  if (bytes > n->unsettled_in) bytes = n->unsettled_in;
  n->unsettled_in -= bytes;
  if (!(r = round_open(n->unsettled_serial))) return; /* round.end counted them */
  if (ok) reply_object_in(n, r);
  else r->bytes_in -= bytes;
}

void fs_fed_object_pushed(uint64_t now, uint64_t node_id) {
  fnode *n = node_get(node_id, 0);
  fround *r = round_of_node(n);
  if (r) round_maybe_end(now, r);
}

void fs_fed_reply_msg(uint64_t now, const fs_fed_reply *rp) {
  fmsg *m = msg_find(rp->reply_to);
  fround *r = NULL;
  fs_event ev;
  if (m && !m->replied && m->round >= 0) r = round_find(m->run_id, m->type, m->round);
  {
    fs_fed_run *run = run_get(now, rp->run_id);
    run->replies++;
    if (rp->has_error) run->error_replies++;
  }
  if (fs_ev_begin(&ev, FS_LOG_INFO, "message.reply")) {
    fs_ev_id(&ev, "node_id", rp->node_id);
    fs_ev_id(&ev, "run_id", rp->run_id);
    fs_ev_str(&ev, "message_id", rp->message_id);
    fs_ev_str(&ev, "reply_to", rp->reply_to);
    fs_ev_str(&ev, "message_type", rp->message_type);
    if (m && m->round >= 0) fs_ev_i64(&ev, "round", m->round);
    if (rp->has_error) {
      fs_ev_i64(&ev, "error_code", rp->error_code);
      fs_ev_str(&ev, "error_reason", rp->error_reason);
    }
    if (rp->clientapp_runtime_s >= 0) fs_ev_num(&ev, "clientapp_runtime_s", rp->clientapp_runtime_s, 3);
    if (rp->objects_to_push >= 0) fs_ev_u64(&ev, "objects_to_push", (uint64_t)rp->objects_to_push);
    fs_ev_end(&ev);
  }
  if (!m || m->replied) return;
  m->replied = 1;
  if (r) {
    fnode *n = node_get(rp->node_id, 0);
    r->replies++;
    if (rp->has_error) r->errors++;
    if (n && rp->objects_to_push > 0) {
      n->pushes_left = (uint32_t)rp->objects_to_push;
      r->pushes_pending += n->pushes_left;
    }
    round_maybe_end(now, r);
  }
}

/* --- nodes ---------------------------------------------------------------------- */

/* |n| left (deactivated, offline): a round that awaited it and that it has
 * not joined awaits one node fewer. */
static void node_left(fnode *n) {
  int i;
  for (i = 0; i < MAX_ROUNDS; i++) {
    fround *r = &F.rounds[i];
    if (r->open && n->awaited_serial == r->serial && n->cur_serial != r->serial && r->awaited > 0) r->awaited--;
  }
  n->awaited_serial = 0;
}

void fs_fed_node_activated(uint64_t now, uint64_t node_id, double hb) {
  fnode *n = node_get(node_id, 1);
  if (!n) return;
  if (!n->active) F.active++;
  n->active = 1;
  n->offline = 0;
  n->deactivated = 0;
  /* A node's own number: keep it sane (NaN, negative, absurd) before any
   * arithmetic with it. */
  n->hb_s = hb >= 1 && hb <= 86400 ? hb : (hb > 86400 ? 86400 : 30);
  n->last_seen_ms = now;
}

void fs_fed_node_deactivated(uint64_t node_id) {
  fnode *n = node_get(node_id, 0);
  if (!n || !n->active) return;
  if (!n->offline) node_left(n);
  n->active = 0;
  n->offline = 0;
  n->deactivated = 1;
  F.active--;
}

void fs_fed_node_seen(uint64_t now, uint64_t node_id) {
  fnode *n = node_get(node_id, 0);
  if (!n) return;
  n->last_seen_ms = now;
  if (n->offline && n->active) n->offline = 0;
}

void fs_fed_node_call(uint64_t now, uint64_t node_id, const char *peer, int ok, uint64_t bytes_in, uint64_t bytes_out) {
  fnode *n;
  if (!node_id) return;
  if (!(n = node_get(node_id, ok))) {
    if (ok) F.untracked++;
    return;
  }
  if (!n->hb_s) n->hb_s = 30; /* not activated while we watched: Flower's default */
  if (ok && !n->last_seen_ms) n->last_seen_ms = now;
  n->calls++;
  if (!ok) n->errors++;
  n->bytes_in += bytes_in;
  n->bytes_out += bytes_out;
  if (peer && *peer) copy(n->peer, sizeof(n->peer), peer);
}

void fs_fed_reply_metrics(uint64_t node_id, const uint8_t *body, size_t len) {
  fnode *n = node_get(node_id, 0);
  if (n && n->cur_round >= 0 && n->cur_serial) (void)fs_view_metrics(n->cur_serial, body, len);
}

const char *fs_fed_node_state_name(fs_node_state s) {
  static const char *const names[] = {"active", "late", "offline", "deactivated"};
  return s < FS_NODE_NSTATES ? names[s] : "active";
}

static fs_node_state node_state(const fnode *n, uint64_t now) {
  uint64_t hb_ms = (uint64_t)(1000 * (n->hb_s > 0 ? n->hb_s : 30)),
           idle = now > n->last_seen_ms ? now - n->last_seen_ms : 0;
  if (n->deactivated && !n->active) return FS_NODE_DEACTIVATED;
  if (n->active) return n->offline ? FS_NODE_OFFLINE : idle > hb_ms ? FS_NODE_LATE : FS_NODE_ACTIVE;
  /* activation not seen: judged by its calls alone */
  return idle >= 2 * hb_ms ? FS_NODE_OFFLINE : idle > hb_ms ? FS_NODE_LATE : FS_NODE_ACTIVE;
}

void fs_fed_each_node(uint64_t now, void (*fn)(void *ud, const fs_fed_node_info *n), void *ud) {
  size_t i;
  for (i = 0; i < F.nodes_cap; i++) {
    const fnode *n = &F.nodes[i];
    fs_fed_node_info info;
    if (!n->used) continue;
    info.node_id = n->id;
    info.last_seen_ms = n->last_seen_ms;
    info.calls = n->calls;
    info.errors = n->errors;
    info.bytes_in = n->bytes_in;
    info.bytes_out = n->bytes_out;
    info.heartbeat_s = n->hb_s > 0 ? n->hb_s : 30;
    info.peer = n->peer;
    info.state = node_state(n, now);
    fn(ud, &info);
  }
}

uint64_t fs_fed_node_states(uint64_t now, uint64_t counts[FS_NODE_NSTATES]) {
  size_t i;
  memset(counts, 0, FS_NODE_NSTATES * sizeof(counts[0]));
  for (i = 0; i < F.nodes_cap; i++)
    if (F.nodes[i].used) counts[node_state(&F.nodes[i], now)]++;
  return F.n_nodes;
}

uint64_t fs_fed_nodes_untracked(void) { return F.untracked; }

void fs_fed_tick(uint64_t now) {
  size_t i;
  for (i = 0; i < F.nodes_cap; i++) {
    fnode *n = &F.nodes[i];
    fs_event ev;
    if (!n->used || !n->active || n->offline || now < n->last_seen_ms + (uint64_t)(2000 * n->hb_s)) continue;
    n->offline = 1;
    node_left(n);
    if (fs_ev_begin(&ev, FS_LOG_WARN, "node.offline")) {
      fs_ev_id(&ev, "node_id", n->id);
      fs_ev_u64(&ev, "last_seen_ms", now - n->last_seen_ms);
      fs_ev_end(&ev);
    }
    /* Its outstanding instruction will not be answered: the round may end. */
    {
      size_t j;
      for (j = 0; j < F.msgs_cap; j++) {
        fmsg *m = &F.msgs[j];
        fround *r;
        if (!m->used || m->replied || m->node_id != n->id || m->round < 0) continue;
        m->replied = 1;
        if ((r = round_find(m->run_id, m->type, m->round))) {
          r->missing++;
          round_maybe_end(now, r);
        }
      }
      if (n->pushes_left && n->cur_round >= 0) { /* its reply's objects will not come */
        fround *r = round_of_node(n);
        if (r) {
          r->pushes_pending -= n->pushes_left < r->pushes_pending ? n->pushes_left : r->pushes_pending;
          n->pushes_left = 0;
          round_maybe_end(now, r);
        }
      }
    }
  }
  for (i = 0; i < F.msgs_cap; i++) {
    fmsg *m = &F.msgs[i];
    if (m->used && !m->announced && now >= m->t_dispatch + FS_FED_PENDING_MS) announce(now, m);
  }
  /* A node awaited by a round may have left (offline, deactivated) without
   * pulling its instruction: fewer nodes are awaited now. */
  for (i = 0; i < MAX_ROUNDS; i++) round_maybe_end(now, &F.rounds[i]);
  fs_view_tick(now);
}

/* ConfigRecord: repeated Item items = 1; Item { string key = 1;
 * ConfigRecordValue value = 2 }; ConfigRecordValue { sint64 = 2; ... }. */
int fs_fed_parse_server_round(const uint8_t *body, size_t len, int64_t *round) {
  const uint8_t *p = body, *end = body + len;
  fs_pb_field f;
  int rv;
  while ((rv = fs_pb_next(&p, end, &f)) == 1) {
    const uint8_t *q, *qe;
    fs_pb_field g;
    int is_round = 0;
    if (f.num != 1 || f.wire != 2 || f.len != f.declared) continue;
    q = f.data, qe = f.data + f.len;
    while (fs_pb_next(&q, qe, &g) == 1) {
      if (g.num == 1 && g.wire == 2 && g.len == 12 && !memcmp(g.data, "server-round", 12)) is_round = 1;
      else if (g.num == 2 && g.wire == 2 && is_round) {
        const uint8_t *r = g.data, *re = g.data + g.len;
        fs_pb_field v;
        while (fs_pb_next(&r, re, &v) == 1)
          if (v.wire == 0 && (v.num == 2 || v.num == 3)) {
            /* sint64 is zigzag; uint64 plain */
            *round = v.num == 2 ? (int64_t)((v.value >> 1) ^ (~(v.value & 1) + 1)) : (int64_t)v.value;
            return 0;
          }
      }
    }
  }
  (void)rv;
  return -1;
}
