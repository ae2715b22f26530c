/* observe: see observe.h. */
#include "observe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fedstate.h"
#include "fedview.h"
#include "fleet.pb-c.h"
#include "grpcmsg.h"
#include "log.h"

/* Messages up to this size are kept inside the observer: Fleet polling
 * (PullMessages, heartbeats) then costs no allocation. */
#define OBS_INLINE 256

typedef struct obs_dir {
  fs_grpcmsg split;
  uint8_t *buf;      /* prefix of the first message (inline or malloc'd) */
  uint32_t len;      /* bytes in buf */
  uint32_t declared; /* the first message's length */
  uint8_t flags;     /* its compressed flag */
  uint8_t begun, done;
  uint64_t bytes; /* DATA bytes seen this way */
  uint8_t inline_buf[OBS_INLINE];
} obs_dir;

struct fs_obs {
  fs_fleet_method method;
  char peer[64];
  obs_dir d[2];
  /* PushObject: counted in its round when the request arrived */
  uint8_t push_counted;
  uint64_t push_node, push_bytes;
};

static uint64_t (*clock_ms)(void);

void fs_obs_set_clock(uint64_t (*now_ms)(void)) { clock_ms = now_ms; }
static uint64_t now(void) { return clock_ms ? clock_ms() : 0; }

fs_fleet_method fs_obs_method(const fs_obs *o) { return o ? o->method : FS_FLEET_NONE; }

/* --- following the first message each way -------------------------------- */

typedef struct cb_ctx {
  obs_dir *d;
} cb_ctx;

static int on_begin(void *ud, uint8_t flags, uint32_t len) {
  obs_dir *d = ud;
  if (d->begun) return 0;
  d->begun = 1;
  d->flags = flags;
  d->declared = len;
  if (len <= OBS_INLINE) d->buf = d->inline_buf;
  else if (!(d->buf = malloc(len < FS_OBS_PREFIX ? len : FS_OBS_PREFIX))) d->declared = 0;
  return 0;
}

static void on_body(void *ud, const uint8_t *p, size_t n) {
  obs_dir *d = ud;
  size_t cap = d->declared < FS_OBS_PREFIX ? d->declared : FS_OBS_PREFIX;
  if (d->done || !d->buf || d->len >= cap) return;
  if (n > cap - d->len) n = cap - d->len;
  memcpy(d->buf + d->len, p, n);
  d->len += (uint32_t)n;
}

static void on_end(void *ud) {
  obs_dir *d = ud;
  d->done = 1;
}

static const fs_grpcmsg_cb split_cb = {on_begin, on_body, on_end};

fs_obs *fs_obs_start(const uint8_t *path, size_t len, const char *peer) {
  fs_fleet_method m = fs_fleet_method_of(path, len);
  fs_obs *o;
  if (m == FS_FLEET_NONE || !(o = calloc(1, sizeof(*o)))) return NULL;
  o->method = m;
  if (peer) {
    size_t pl = strlen(peer);
    if (pl >= sizeof(o->peer)) pl = sizeof(o->peer) - 1;
    memcpy(o->peer, peer, pl);
  }
  fs_grpcmsg_init(&o->d[0].split, UINT32_MAX);
  fs_grpcmsg_init(&o->d[1].split, UINT32_MAX);
  return o;
}

static void push_arrived(fs_obs *o);

void fs_obs_data(fs_obs *o, int dir, const uint8_t *p, size_t n) {
  obs_dir *d;
  if (!o) return;
  d = &o->d[dir];
  d->bytes += n;
  /* After the first message only bytes are counted. */
  if (d->done) return;
  fs_grpcmsg_feed(&d->split, p, n, &split_cb, d);
  if (d->done && dir == 0 && o->method == FS_FLEET_PUSH_OBJECT) push_arrived(o);
}

/* --- decoding ----------------------------------------------------------------- */

static void undecoded(const fs_obs *o, int dir, const char *why) {
  fs_event ev;
  if (!fs_ev_begin(&ev, FS_LOG_DEBUG, "fleet.undecoded")) return;
  fs_ev_str(&ev, "method", fs_fleet_method_name(o->method));
  fs_ev_str(&ev, "direction", dir ? "response" : "request");
  fs_ev_str(&ev, "reason", why);
  fs_ev_end(&ev);
}

/* The first message of |dir| decoded with protobuf-c, or NULL. */
static ProtobufCMessage *unpack(const fs_obs *o, int dir, const ProtobufCMessageDescriptor *desc) {
  const obs_dir *d = &o->d[dir];
  ProtobufCMessage *m;
  if (!d->begun) return undecoded(o, dir, "no message"), NULL;
  if (d->flags & 1) return undecoded(o, dir, "compressed"), NULL;
  if (!d->done || d->len != d->declared) return undecoded(o, dir, "incomplete or larger than the prefix kept"), NULL;
  if (!(m = protobuf_c_message_unpack(desc, NULL, d->len, d->buf))) undecoded(o, dir, "corrupt protobuf");
  return m;
}

/* Fields of a message too large to keep, read from its prefix. */
typedef struct walked {
  uint64_t node_id, run_id;
  char object_id[80];
  char type[32];        /* object type from the content's header line */
  uint64_t content_len; /* declared length of the content / object */
  const uint8_t *body;  /* the object's body, as far as kept */
  size_t body_len;
  uint64_t body_declared; /* the body length its header line declares */
  int found, available, ok;
} walked;

static void copy_str(char *dst, size_t cap, const uint8_t *s, size_t n) {
  if (n >= cap) n = cap - 1;
  memcpy(dst, s, n);
  dst[n] = '\0';
}

static void walk_content(walked *w, const fs_pb_field *f) {
  uint64_t body;
  int hl;
  w->content_len = f->declared;
  if ((hl = fs_fleet_object_header(f->data, f->len, w->type, sizeof(w->type), &body)) < 0) {
    snprintf(w->type, sizeof(w->type), "?");
    return;
  }
  w->body = f->data + hl;
  w->body_len = f->len - (size_t)hl;
  w->body_declared = body;
}

/* PushObjectRequest (dir 0) or PullObjectResponse (dir 1); |quiet|: no
 * fleet.undecoded (the call's end will say it). */
static int walk_object(const fs_obs *o, int dir, walked *w, int quiet) {
  const obs_dir *d = &o->d[dir];
  const uint8_t *p = d->buf, *end;
  fs_pb_field f;
  int rv;
  memset(w, 0, sizeof(*w));
  if (!d->begun || (d->flags & 1)) {
    if (!quiet) undecoded(o, dir, d->begun ? "compressed" : "no message");
    return -1;
  }
  if (!p) return 0; /* an empty message: no fields */
  end = p + d->len;
  while ((rv = fs_pb_next(&p, end, &f)) == 1) {
    if (dir == 0) {
      if (f.num == 1 && f.wire == 2) {
        const uint8_t *q = f.data;
        fs_pb_field g;
        while (fs_pb_next(&q, f.data + f.len, &g) == 1)
          if (g.num == 1 && g.wire == 0) w->node_id = g.value;
      } else if (f.num == 2 && f.wire == 0) {
        w->run_id = f.value;
      } else if (f.num == 3 && f.wire == 2) {
        copy_str(w->object_id, sizeof(w->object_id), f.data, f.len);
      } else if (f.num == 4 && f.wire == 2) {
        walk_content(w, &f);
      }
    } else {
      if (f.num == 1 && f.wire == 0) w->found = f.value != 0;
      else if (f.num == 2 && f.wire == 0) w->available = f.value != 0;
      else if (f.num == 3 && f.wire == 2) walk_content(w, &f);
    }
  }
  if (rv < 0) {
    if (!quiet) undecoded(o, dir, "corrupt protobuf");
    return -1;
  }
  return 0;
}

/* The SuperLink gets the object as soon as its request is through, and may
 * end the round before the answer comes back: fedstate counts it now. */
static void push_arrived(fs_obs *o) {
  walked w;
  if (walk_object(o, 0, &w, 1) < 0) return;
  o->push_node = w.node_id;
  o->push_bytes = w.content_len;
  o->push_counted = (uint8_t)fs_fed_push_arrived(w.node_id, w.content_len);
}

/* --- events ------------------------------------------------------------------- */

static uint64_t node_of(const Flwr__Proto__Node *n) { return n ? n->node_id : 0; }

static int begin(fs_event *ev, fs_log_level lvl, const char *name) { return fs_ev_begin(ev, lvl, name); }

static void node_event(const fs_obs *o, const char *name, uint64_t node_id, double hb, fs_log_level lvl) {
  fs_event ev;
  if (!begin(&ev, lvl, name)) return;
  fs_ev_id(&ev, "node_id", node_id);
  fs_ev_str(&ev, "peer", o->peer);
  if (hb > 0) fs_ev_num(&ev, "heartbeat_interval", hb, 1);
  fs_ev_end(&ev);
}

static void collect_ids(const Flwr__Proto__ObjectTree *t, const char **ids, size_t *n) {
  size_t i;
  if (!t || *n >= FS_FED_MAX_TREE) return;
  ids[(*n)++] = t->object_id;
  for (i = 0; i < t->n_children; i++) collect_ids(t->children[i], ids, n);
}

/* Nonzero when field |num| is present in a kept first message. */
static int has_field(const obs_dir *d, uint32_t num) {
  const uint8_t *p = d->buf, *end;
  fs_pb_field f;
  if (!p) return 0;
  end = p + d->len;
  while (fs_pb_next(&p, end, &f) == 1)
    if (f.num == num) return 1;
  return 0;
}

uint64_t fs_obs_node_id(const fs_obs *o) {
  const obs_dir *d;
  const uint8_t *p, *end;
  fs_pb_field f, g;
  int plain; /* uint64 node_id = 1, not Node node = 1 */
  if (!o) return 0;
  switch (o->method) {
  case FS_FLEET_REGISTER_NODE:
  case FS_FLEET_ACTIVATE_NODE: /* the request has no id; the answer gives it */
    d = &o->d[1], plain = 1;
    break;
  case FS_FLEET_DEACTIVATE_NODE:
  case FS_FLEET_UNREGISTER_NODE:
    d = &o->d[0], plain = 1;
    break;
  default:
    d = &o->d[0], plain = 0;
  }
  if (!(p = d->buf) || (d->flags & 1)) return 0;
  end = p + d->len;
  while (fs_pb_next(&p, end, &f) == 1) {
    if (f.num != 1) continue;
    if (plain) return f.wire == 0 ? f.value : 0;
    if (f.wire != 2) return 0;
    {
      const uint8_t *q = f.data;
      while (fs_pb_next(&q, f.data + f.len, &g) == 1)
        if (g.num == 1 && g.wire == 0) return g.value;
    }
  }
  return 0;
}

/* The node id of a request whose field 1 is `Node node` (most Fleet
 * requests), read without unpacking; 0 when absent. */
static uint64_t request_node_id(const fs_obs *o) { return o->d[0].done ? fs_obs_node_id(o) : 0; }

static void emit_pull_messages(const fs_obs *o) {
  Flwr__Proto__PullMessagesResponse *rs = NULL;
  uint64_t node_id = request_node_id(o);
  size_t i;
  fs_fed_node_seen(now(), node_id);
  /* Polling mostly finds nothing: unpack only an answer that has messages. */
  if (o->d[1].done && o->d[1].len == o->d[1].declared && !(o->d[1].flags & 1) && !has_field(&o->d[1], 2)) return;
  rs = (void *)unpack(o, 1, &flwr__proto__pull_messages_response__descriptor);
  if (rs) {
    for (i = 0; i < rs->n_messages_list; i++) {
      const Flwr__Proto__Metadata *md = rs->messages_list[i]->metadata;
      const Flwr__Proto__ObjectTree *t = i < rs->n_message_object_trees ? rs->message_object_trees[i] : NULL;
      const char *ids[FS_FED_MAX_TREE];
      size_t n = 0;
      fs_fed_dispatch d;
      collect_ids(t, ids, &n);
      d.node_id = node_id;
      d.run_id = md ? md->run_id : 0;
      d.message_id = md ? md->message_id : "";
      d.message_type = md ? md->message_type : "";
      d.group_id = md ? md->group_id : "";
      d.objects = ids;
      d.n_objects = n;
      fs_fed_dispatch_msg(now(), &d);
    }
  }
  if (rs) protobuf_c_message_free_unpacked(&rs->base, NULL);
}

static void emit_push_messages(const fs_obs *o) {
  Flwr__Proto__PushMessagesRequest *rq = (void *)unpack(o, 0, &flwr__proto__push_messages_request__descriptor);
  Flwr__Proto__PushMessagesResponse *rs = (void *)unpack(o, 1, &flwr__proto__push_messages_response__descriptor);
  size_t i;
  if (rq) {
    fs_fed_node_seen(now(), node_of(rq->node));
    for (i = 0; i < rq->n_messages_list; i++) {
      const Flwr__Proto__Message *m = rq->messages_list[i];
      const Flwr__Proto__Metadata *md = m->metadata;
      fs_fed_reply r;
      r.node_id = node_of(rq->node);
      r.run_id = md ? md->run_id : 0;
      r.message_id = md ? md->message_id : "";
      r.reply_to = md ? md->reply_to_message_id : "";
      r.message_type = md ? md->message_type : "";
      r.has_error = m->error != NULL;
      r.error_code = m->error ? m->error->code : 0;
      r.error_reason = m->error ? m->error->reason : "";
      r.clientapp_runtime_s = i < rq->n_clientapp_runtime_list ? rq->clientapp_runtime_list[i] : -1;
      r.objects_to_push = rs ? (int64_t)rs->n_objects_to_push : -1;
      fs_fed_reply_msg(now(), &r);
    }
  }
  if (rq) protobuf_c_message_free_unpacked(&rq->base, NULL);
  if (rs) protobuf_c_message_free_unpacked(&rs->base, NULL);
}

static void emit_object(const fs_obs *o, int push) {
  walked w;
  fs_event ev;
  uint64_t node_id = 0, run_id = 0;
  char object_id[80] = "";
  if (push) {
    if (walk_object(o, 0, &w, 0) < 0) return;
    node_id = w.node_id, run_id = w.run_id;
    snprintf(object_id, sizeof(object_id), "%s", w.object_id);
  } else {
    Flwr__Proto__PullObjectRequest *rq = (void *)unpack(o, 0, &flwr__proto__pull_object_request__descriptor);
    if (rq) {
      node_id = node_of(rq->node), run_id = rq->run_id;
      snprintf(object_id, sizeof(object_id), "%s", rq->object_id);
      protobuf_c_message_free_unpacked(&rq->base, NULL);
    }
    if (walk_object(o, 1, &w, 0) < 0) return;
  }
  fs_fed_node_seen(now(), node_id);
  /* A cut request tells nothing reliable about its run. */
  if (!push || o->d[0].done) fs_view_run_seen(now(), run_id);
  /* A reply's metrics, counted in its round before the push that may end
   * the round is. */
  if (push && !strcmp(w.type, "MetricRecord") && w.body_len == w.body_declared)
    fs_fed_reply_metrics(node_id, w.body, w.body_len);
  if (push && o->push_counted) fs_fed_push_settled(node_id, w.content_len, 1);
  else fs_fed_object_bytes(node_id, w.content_len, !push);
  if (push) fs_fed_object_pushed(now(), node_id);
  if (!strcmp(w.type, "ConfigRecord")) {
    int64_t round;
    if (fs_fed_parse_server_round(w.body, w.body_len, &round) == 0) fs_fed_config_round(now(), object_id, round);
  }
  if (!begin(&ev, FS_LOG_DEBUG, push ? "object.push" : "object.pull")) return;
  fs_ev_id(&ev, "node_id", node_id);
  fs_ev_id(&ev, "run_id", run_id);
  fs_ev_str(&ev, "object_id", object_id);
  fs_ev_str(&ev, "object_type", w.type[0] ? w.type : "none");
  fs_ev_u64(&ev, "bytes", w.content_len);
  if (!push && !w.available) fs_ev_bool(&ev, "available", 0);
  fs_ev_end(&ev);
}

static void emit(const fs_obs *o) {
  fs_event ev;
  ProtobufCMessage *rq = NULL, *rs = NULL;
  switch (o->method) {
  case FS_FLEET_REGISTER_NODE:
    if ((rs = unpack(o, 1, &flwr__proto__register_node_fleet_response__descriptor)))
      node_event(o, "node.register", ((Flwr__Proto__RegisterNodeFleetResponse *)rs)->node_id, 0, FS_LOG_INFO);
    break;
  case FS_FLEET_ACTIVATE_NODE:
    rq = unpack(o, 0, &flwr__proto__activate_node_request__descriptor);
    if ((rs = unpack(o, 1, &flwr__proto__activate_node_response__descriptor))) {
      double hb = rq ? ((Flwr__Proto__ActivateNodeRequest *)rq)->heartbeat_interval : 0;
      uint64_t id = ((Flwr__Proto__ActivateNodeResponse *)rs)->node_id;
      fs_fed_node_activated(now(), id, hb);
      node_event(o, "node.activate", id, hb, FS_LOG_INFO);
    }
    break;
  case FS_FLEET_DEACTIVATE_NODE:
    if ((rq = unpack(o, 0, &flwr__proto__deactivate_node_request__descriptor))) {
      uint64_t id = ((Flwr__Proto__DeactivateNodeRequest *)rq)->node_id;
      fs_fed_node_deactivated(id);
      node_event(o, "node.deactivate", id, 0, FS_LOG_INFO);
    }
    break;
  case FS_FLEET_UNREGISTER_NODE:
    if ((rq = unpack(o, 0, &flwr__proto__unregister_node_fleet_request__descriptor)))
      node_event(o, "node.unregister", ((Flwr__Proto__UnregisterNodeFleetRequest *)rq)->node_id, 0, FS_LOG_INFO);
    break;
  case FS_FLEET_SEND_NODE_HEARTBEAT:
    if ((rq = unpack(o, 0, &flwr__proto__send_node_heartbeat_request__descriptor))) {
      Flwr__Proto__SendNodeHeartbeatRequest *h = (void *)rq;
      fs_fed_node_seen(now(), node_of(h->node));
      node_event(o, "node.heartbeat", node_of(h->node), h->heartbeat_interval, FS_LOG_DEBUG);
    }
    break;
  case FS_FLEET_PULL_MESSAGES:
    emit_pull_messages(o);
    break;
  case FS_FLEET_PUSH_MESSAGES:
    emit_push_messages(o);
    break;
  case FS_FLEET_CONFIRM_MESSAGE_RECEIVED:
    if ((rq = unpack(o, 0, &flwr__proto__confirm_message_received_request__descriptor))) {
      Flwr__Proto__ConfirmMessageReceivedRequest *c = (void *)rq;
      fs_fed_node_seen(now(), node_of(c->node));
      fs_fed_confirm(now(), node_of(c->node), c->run_id, c->message_object_id);
    }
    break;
  case FS_FLEET_GET_RUN:
    rq = unpack(o, 0, &flwr__proto__get_run_request__descriptor);
    if ((rs = unpack(o, 1, &flwr__proto__get_run_response__descriptor)) && ((Flwr__Proto__GetRunResponse *)rs)->run) {
      const Flwr__Proto__Run *r = ((Flwr__Proto__GetRunResponse *)rs)->run;
      fs_view_run_info(now(), r->run_id, r->fab_id, r->fab_version, r->status ? r->status->status : "");
    }
    if (rs && begin(&ev, FS_LOG_INFO, "run.fetch")) {
      const Flwr__Proto__Run *r = ((Flwr__Proto__GetRunResponse *)rs)->run;
      fs_ev_id(&ev, "node_id", rq ? node_of(((Flwr__Proto__GetRunRequest *)rq)->node) : 0);
      fs_ev_id(&ev, "run_id", r ? r->run_id : (rq ? ((Flwr__Proto__GetRunRequest *)rq)->run_id : 0));
      if (r) {
        fs_ev_str(&ev, "fab_id", r->fab_id);
        fs_ev_str(&ev, "fab_version", r->fab_version);
        fs_ev_str(&ev, "fab_hash", r->fab_hash);
      }
      fs_ev_u64(&ev, "bytes", o->d[1].declared);
      fs_ev_end(&ev);
    }
    break;
  case FS_FLEET_GET_FAB:
    if ((rq = unpack(o, 0, &flwr__proto__get_fab_request__descriptor)))
      fs_view_run_seen(now(), ((Flwr__Proto__GetFabRequest *)rq)->run_id);
    if (rq && begin(&ev, FS_LOG_INFO, "fab.fetch")) {
      Flwr__Proto__GetFabRequest *g = (void *)rq;
      fs_ev_id(&ev, "node_id", node_of(g->node));
      fs_ev_id(&ev, "run_id", g->run_id);
      fs_ev_str(&ev, "fab_hash", g->hash_str);
      fs_ev_u64(&ev, "bytes", o->d[1].declared);
      fs_ev_end(&ev);
    }
    break;
  case FS_FLEET_PUSH_OBJECT:
    emit_object(o, 1);
    break;
  case FS_FLEET_PULL_OBJECT:
    emit_object(o, 0);
    break;
  default:
    break;
  }
  if (rq) protobuf_c_message_free_unpacked(rq, NULL);
  if (rs) protobuf_c_message_free_unpacked(rs, NULL);
}

void fs_obs_finish(fs_obs *o, int grpc_status) {
  if (!o) return;
  if (grpc_status == 0) emit(o);
  else if (o->push_counted) fs_fed_push_settled(o->push_node, o->push_bytes, 0);
  fs_fed_node_call(now(), fs_obs_node_id(o), o->peer, grpc_status == 0, o->d[0].bytes, o->d[1].bytes);
  if (o->d[0].buf != o->d[0].inline_buf) free(o->d[0].buf);
  if (o->d[1].buf != o->d[1].inline_buf) free(o->d[1].buf);
  free(o);
}
