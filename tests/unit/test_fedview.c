/* Unit tests: metricrec (MetricRecord bodies and their FedAvg-style
 * aggregate) and fedview (the runs and rounds behind GET /v1/federation:
 * round.metrics, run.start / run.end, the document, and its bounds with
 * 10,000 nodes and 1,000 rounds), driven with explicit times. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <math.h>

#include "evcap.h"
#include "fedstate.h"
#include "fedview.h"
#include "fleet.pb-c.h"
#include "log.h"
#include "metricrec.h"

#define RUN   12537570364687388763ull
#define RUN_S "12537570364687388763"

/* --- MetricRecord bodies ------------------------------------------------------------------ */

typedef enum { V_DOUBLE, V_SINT, V_UINT, V_DLIST, V_NONE } vkind;
typedef struct spec {
  const char *key;
  vkind kind;
  double d;
  int64_t i;
} spec;

static uint8_t body[4096];

/* Packs a MetricRecord of |n| items; returns its length. */
static size_t build(const spec *sp, size_t n) {
  Flwr__Proto__MetricRecord rec = FLWR__PROTO__METRIC_RECORD__INIT;
  Flwr__Proto__MetricRecord__Item items[16], *ptrs[16];
  Flwr__Proto__MetricRecordValue vals[16];
  Flwr__Proto__DoubleList lists[16];
  double two[2] = {0.25, 0.75};
  size_t i;
  assert_true(n <= 16);
  for (i = 0; i < n; i++) {
    Flwr__Proto__MetricRecord__Item it = FLWR__PROTO__METRIC_RECORD__ITEM__INIT;
    Flwr__Proto__MetricRecordValue v = FLWR__PROTO__METRIC_RECORD_VALUE__INIT;
    Flwr__Proto__DoubleList dl = FLWR__PROTO__DOUBLE_LIST__INIT;
    items[i] = it, vals[i] = v, lists[i] = dl;
    items[i].key = (char *)sp[i].key;
    switch (sp[i].kind) {
    case V_DOUBLE:
      vals[i].value_case = FLWR__PROTO__METRIC_RECORD_VALUE__VALUE_DOUBLE, vals[i].double_ = sp[i].d;
      break;
    case V_SINT:
      vals[i].value_case = FLWR__PROTO__METRIC_RECORD_VALUE__VALUE_SINT64, vals[i].sint64 = sp[i].i;
      break;
    case V_UINT:
      vals[i].value_case = FLWR__PROTO__METRIC_RECORD_VALUE__VALUE_UINT64, vals[i].uint64 = (uint64_t)sp[i].i;
      break;
    case V_DLIST:
      lists[i].n_vals = 2, lists[i].vals = two;
      vals[i].value_case = FLWR__PROTO__METRIC_RECORD_VALUE__VALUE_DOUBLE_LIST, vals[i].double_list = &lists[i];
      break;
    case V_NONE:
      break;
    }
    items[i].value = sp[i].kind == V_NONE ? NULL : &vals[i];
    ptrs[i] = &items[i];
  }
  rec.n_items = n;
  rec.items = ptrs;
  assert_true(flwr__proto__metric_record__get_packed_size(&rec) <= sizeof(body));
  return flwr__proto__metric_record__pack(&rec, body);
}

static int setup(void **state) {
  (void)state;
  cap_init(FS_LOG_DEBUG);
  fs_fed_reset();
  cap_reset();
  return 0;
}

static int teardown(void **state) {
  (void)state;
  fs_fed_reset();
  cap_reset();
  return 0;
}

/* --- metricrec ----------------------------------------------------------------------------- */

static void parse_every_value_type(void **state) {
  spec sp[] = {{"loss", V_DOUBLE, 0.5, 0},    {"num-examples", V_SINT, 0, 96}, {"neg", V_SINT, 0, -7},
               {"big", V_UINT, 0, 1ll << 53}, {"per-class", V_DLIST, 0, 0},    {"empty", V_NONE, 0, 0},
               {"nan", V_DOUBLE, NAN, 0},     {"inf", V_DOUBLE, INFINITY, 0}};
  fs_mrec_item it[FS_MREC_MAX_ITEMS];
  size_t n = build(sp, 8);
  double w;
  (void)state;
  assert_int_equal(fs_mrec_parse(body, n, it, FS_MREC_MAX_ITEMS), 8);
  assert_int_equal(it[0].kind, FS_MREC_SCALAR);
  assert_true(it[0].value == 0.5);
  assert_int_equal(it[0].key_len, 4);
  assert_memory_equal(it[0].key, "loss", 4);
  assert_true(it[1].kind == FS_MREC_SCALAR && it[1].value == 96);
  assert_true(it[2].kind == FS_MREC_SCALAR && it[2].value == -7); /* zigzag */
  assert_true(it[3].kind == FS_MREC_SCALAR && it[3].value == 9007199254740992.0);
  assert_int_equal(it[4].kind, FS_MREC_LIST);
  assert_int_equal(it[5].kind, FS_MREC_OTHER); /* no value */
  assert_int_equal(it[6].kind, FS_MREC_OTHER); /* NaN: not a number JSON can carry */
  assert_int_equal(it[7].kind, FS_MREC_OTHER);
  assert_int_equal(fs_mrec_weight(it, 8, &w), 1);
  assert_true(w == 96);
  /* Fewer slots than items: the count is still right. */
  assert_int_equal(fs_mrec_parse(body, n, it, 2), 8);
}

static void parse_malformed_and_odd_bodies(void **state) {
  static const uint8_t bad_varint[] = {0x0a, 0x80};
  static const uint8_t cut_item[] = {0x0a, 0x10, 0x0a, 0x01, 'k'};                              /* declares 16, has 3 */
  static const uint8_t wrong_wire[] = {0x08, 0x01};                                             /* items as a varint */
  static const uint8_t unknown_value[] = {0x0a, 0x07, 0x0a, 0x01, 'k', 0x12, 0x02, 0x48, 0x01}; /* field 9 */
  static const uint8_t other_field[] = {0x10, 0x05};                                            /* field 2: skipped */
  fs_mrec_item it[4];
  double w;
  (void)state;
  assert_int_equal(fs_mrec_parse(bad_varint, sizeof(bad_varint), it, 4), -1);
  assert_int_equal(fs_mrec_parse(cut_item, sizeof(cut_item), it, 4), -1);
  assert_int_equal(fs_mrec_parse(wrong_wire, sizeof(wrong_wire), it, 4), -1);
  assert_int_equal(fs_mrec_parse(unknown_value, sizeof(unknown_value), it, 4), 1);
  assert_int_equal(it[0].kind, FS_MREC_OTHER);
  assert_int_equal(fs_mrec_parse(other_field, sizeof(other_field), it, 4), 0);
  assert_int_equal(fs_mrec_parse(body, 0, it, 4), 0); /* empty record */
  assert_int_equal(fs_mrec_parse(NULL, 0, it, 4), 0);
  assert_int_equal(fs_mrec_weight(it, 0, &w), 0);
  {
    /* A weight that is negative, a list or NaN is no weight. */
    spec neg[] = {{"num-examples", V_SINT, 0, -3}}, list[] = {{"num-examples", V_DLIST, 0, 0}},
         nan[] = {{"num-examples", V_DOUBLE, NAN, 0}}, dbl[] = {{"num-examples", V_DOUBLE, 12.5, 0}};
    assert_int_equal(fs_mrec_parse(body, build(neg, 1), it, 4), 1);
    assert_int_equal(fs_mrec_weight(it, 1, &w), 0);
    assert_int_equal(fs_mrec_parse(body, build(list, 1), it, 4), 1);
    assert_int_equal(fs_mrec_weight(it, 1, &w), 0);
    assert_int_equal(fs_mrec_parse(body, build(nan, 1), it, 4), 1);
    assert_int_equal(fs_mrec_weight(it, 1, &w), 0);
    assert_int_equal(fs_mrec_parse(body, build(dbl, 1), it, 4), 1);
    assert_int_equal(fs_mrec_weight(it, 1, &w), 1);
    assert_true(w == 12.5);
  }
}

static void weighted_and_unweighted_means(void **state) {
  fs_mrec_stat s;
  int weighted;
  (void)state;
  /* FedAvg: (10 x 0.5 + 30 x 0.25) / 40 = 0.3125; the plain mean would be 0.375. */
  memset(&s, 0, sizeof(s));
  fs_mrec_add(&s, 0.5, 1, 10);
  fs_mrec_add(&s, 0.25, 1, 30);
  assert_true(fs_mrec_mean(&s, &weighted) == 0.3125);
  assert_int_equal(weighted, 1);
  assert_true(s.min == 0.25 && s.max == 0.5 && s.count == 2);
  /* One reply without num-examples: no weighted mean can be honest: plain. */
  fs_mrec_add(&s, 1.0, 0, 0);
  assert_true(fs_mrec_mean(&s, &weighted) == (0.5 + 0.25 + 1.0) / 3);
  assert_int_equal(weighted, 0);
  assert_true(s.max == 1.0 && s.count == 3 && s.weighted == 2);
  /* All weights 0: the plain mean. */
  memset(&s, 0, sizeof(s));
  fs_mrec_add(&s, 2, 1, 0);
  fs_mrec_add(&s, 4, 1, 0);
  assert_true(fs_mrec_mean(&s, &weighted) == 3);
  assert_int_equal(weighted, 0);
  /* Negative values keep min/max right. */
  memset(&s, 0, sizeof(s));
  fs_mrec_add(&s, -3, 1, 1);
  fs_mrec_add(&s, -1, 1, 3);
  assert_true(s.min == -3 && s.max == -1);
  assert_true(fs_mrec_mean(&s, &weighted) == -1.5);
  /* Empty. */
  memset(&s, 0, sizeof(s));
  assert_true(fs_mrec_mean(&s, &weighted) == 0);
  assert_int_equal(weighted, 0);
}

/* --- fedview ------------------------------------------------------------------------------- */

static char *render(uint64_t now, size_t max, size_t *len) {
  fs_view_ctx c = {"link", "test", "127.0.0.1:9192", 1, "SERVING", "", now, 1700000000000ull + now};
  return fs_view_render(&c, max, len);
}

/* |needle| occurs in the document. */
static void doc_has(const char *doc, const char *needle) {
  if (!strstr(doc, needle)) fail_msg("not in the document: %s", needle);
}

static const fs_view_round_stats two_replies = {2, 2, 0, 0, 100, 200};

static void round_metrics_aggregated(void **state) {
  spec a[] = {{"num-examples", V_SINT, 0, 10}, {"train-loss", V_DOUBLE, 0.5, 0}, {"per-class", V_DLIST, 0, 0}};
  spec b[] = {{"num-examples", V_UINT, 0, 30}, {"train-loss", V_DOUBLE, 0.25, 0}, {"note", V_NONE, 0, 0}};
  spec c[] = {{"eval acc\"x", V_DOUBLE, 0.75, 0}}; /* no num-examples; a key with a quote and a space */
  const char *l;
  char *doc;
  size_t len;
  (void)state;
  fs_view_round_start(1000, RUN, 1, 1, "train");
  assert_int_equal(cap_count("run.start"), 1);
  cap_assert_field(cap_find("run.start", 0), "run_id", RUN_S);
  assert_int_equal(fs_view_metrics(1, body, build(a, 3)), 0);
  assert_int_equal(fs_view_metrics(1, body, build(b, 3)), 0);
  assert_int_equal(fs_view_metrics(1, (const uint8_t *)"\x0a\x80", 2), -1); /* not protobuf: not counted */
  fs_view_round_end(1250, 1, &two_replies);
  l = cap_find("round.metrics", 0);
  assert_non_null(l);
  cap_assert_field(l, "run_id", RUN_S);
  cap_assert_field(l, "round", "1");
  cap_assert_field(l, "message_type", "train");
  cap_assert_field(l, "replies", "2");
  cap_assert_field(l, "examples", "40");
  cap_assert_field(l, "metric_train_loss", "0.312500000");
  cap_assert_field(l, "metric_num_examples", "20.000000000"); /* the weight itself: plain mean */

  fs_view_round_start(1300, RUN, 2, 1, "evaluate");
  fs_view_metrics(2, body, build(c, 1));
  fs_view_metrics(2, body, build(a, 3));
  fs_view_round_end(1400, 2, &two_replies);
  l = cap_find("round.metrics", 1);
  cap_assert_field(l, "metric_eval_acc_x", "0.750000000"); /* field name made safe */

  doc = render(1500, 1 << 20, &len);
  assert_non_null(doc);
  assert_int_equal(strlen(doc), len);
  doc_has(doc, "\"run_id\":\"" RUN_S "\"");
  doc_has(doc, "\"metric_keys\":[\"num-examples\",\"train-loss\",\"eval acc\\\"x\"]");
  doc_has(doc,
          "\"round\":1,\"message_type\":\"train\",\"open\":false,\"start_ms\":1700000001000,\"end_ms\":"
          "1700000001250,\"duration_ms\":250,\"nodes\":2,\"replies\":2,\"errors\":0,\"missing\":0,\"bytes_in\":100,"
          "\"bytes_out\":200,\"metric_records\":2,\"examples\":40,\"list_values\":1,\"skipped_values\":1");
  doc_has(doc, "\"train-loss\":{\"count\":2,\"min\":0.25,\"max\":0.5,\"mean\":0.3125,\"weighted\":true}");
  doc_has(doc, "\"num-examples\":{\"count\":2,\"min\":10,\"max\":30,\"mean\":20,\"weighted\":false}");
  /* evaluate: one reply without a weight: the plain mean, said so */
  doc_has(doc, "\"eval acc\\\"x\":{\"count\":1,\"min\":0.75,\"max\":0.75,\"mean\":0.75,\"weighted\":false}");
  doc_has(doc, "\"train-loss\":{\"count\":1,\"min\":0.5,\"max\":0.5,\"mean\":0.5,\"weighted\":true}");
  free(doc);
  /* Metrics of a round no longer (or never) kept are ignored. */
  assert_int_equal(fs_view_metrics(999, body, build(a, 3)), 0);
}

static void metric_keys_bounded(void **state) {
  char keys[12][80];
  spec sp[12];
  int i;
  char *doc;
  size_t len;
  (void)state;
  for (i = 0; i < 12; i++) {
    snprintf(keys[i], sizeof(keys[i]), "k%d", i);
    sp[i].key = keys[i], sp[i].kind = V_DOUBLE, sp[i].d = i, sp[i].i = 0;
  }
  memset(keys[11], 'x', 70); /* longer than FS_VIEW_KEY_LEN */
  keys[11][70] = 0;
  fs_view_round_start(0, RUN, 1, 1, "train");
  fs_view_metrics(1, body, build(sp, 12));
  fs_view_round_end(10, 1, &two_replies);
  doc = render(10, 1 << 20, &len);
  assert_non_null(doc);
  /* FS_VIEW_KEYS keys kept, the rest (and the long one) skipped and counted */
  doc_has(doc, "\"metric_keys\":[\"k0\",\"k1\",\"k2\",\"k3\",\"k4\",\"k5\",\"k6\",\"k7\"]");
  doc_has(doc, "\"skipped_values\":4");
  assert_null(strstr(doc, "\"k8\""));
  free(doc);
}

static void run_start_and_end(void **state) {
  const char *l;
  (void)state;
  fs_view_run_seen(1000, RUN);
  fs_view_run_seen(2000, RUN);
  fs_view_run_seen(2000, 0); /* no run */
  assert_int_equal(cap_count("run.start"), 1);
  /* A round open: never idle, however long. */
  fs_view_round_start(3000, RUN, 1, 1, "train");
  fs_view_tick(3000 + 10 * FS_VIEW_RUN_IDLE_MS);
  assert_int_equal(cap_count("run.end"), 0);
  fs_view_round_end(3000 + 10 * FS_VIEW_RUN_IDLE_MS, 1, &two_replies);
  fs_view_tick(3000 + 11 * FS_VIEW_RUN_IDLE_MS - 1);
  assert_int_equal(cap_count("run.end"), 0);
  fs_view_tick(3000 + 11 * FS_VIEW_RUN_IDLE_MS);
  l = cap_find("run.end", 0);
  assert_non_null(l);
  cap_assert_field(l, "run_id", RUN_S);
  cap_assert_field(l, "reason", "idle");
  cap_assert_field(l, "rounds", "1");
  cap_assert_field(l, "last_round", "1");
  fs_view_tick(3000 + 20 * FS_VIEW_RUN_IDLE_MS);
  assert_int_equal(cap_count("run.end"), 1);
  /* Traffic after an idle end starts it again. */
  fs_view_run_seen(3000 + 21 * FS_VIEW_RUN_IDLE_MS, RUN);
  assert_int_equal(cap_count("run.start"), 2);
  /* GetRun says finished: ends it; later traffic of it does not restart it. */
  fs_view_run_info(3000 + 22 * FS_VIEW_RUN_IDLE_MS, RUN, "flwrlabs/app", "1.0.0", "finished");
  l = cap_find("run.end", 1);
  cap_assert_field(l, "reason", "finished");
  cap_assert_field(l, "status", "finished");
  fs_view_run_info(3000 + 22 * FS_VIEW_RUN_IDLE_MS, RUN, "flwrlabs/app", "1.0.0", "finished");
  fs_view_run_seen(3000 + 23 * FS_VIEW_RUN_IDLE_MS, RUN);
  assert_int_equal(cap_count("run.start"), 2);
  assert_int_equal(cap_count("run.end"), 2);
}

/* More runs than FS_VIEW_RUNS: the least recently active ones go, with
 * run.end (evicted), and the document says how many. */
static void runs_bounded(void **state) {
  uint64_t r;
  char *doc;
  size_t len;
  (void)state;
  for (r = 1; r <= FS_VIEW_RUNS + 3; r++) fs_view_run_seen(r * 10, r);
  assert_int_equal(fs_view_runs_kept(), FS_VIEW_RUNS);
  assert_int_equal(cap_count("run.start"), FS_VIEW_RUNS + 3);
  assert_int_equal(cap_count("run.end"), 3);
  cap_assert_field(cap_find("run.end", 0), "reason", "evicted");
  cap_assert_field(cap_find("run.end", 0), "run_id", "1");
  doc = render(1000, 1 << 20, &len);
  doc_has(doc, "\"runs_dropped\":3");
  assert_null(strstr(doc, "\"run_id\":\"3\""));
  doc_has(doc, "\"run_id\":\"4\"");
  free(doc);
}

/* 1,000 rounds of train + evaluate, each with metrics, in 3 runs: the
 * state stays within its caps and says what it dropped. */
static void thousand_rounds_bounded(void **state) {
  spec sp[] = {{"num-examples", V_SINT, 0, 64}, {"loss", V_DOUBLE, 0.5, 0}, {"acc", V_DOUBLE, 0.9, 0}};
  size_t n = build(sp, 3), len, mem;
  uint64_t serial = 0, t = 0, run;
  int round, k;
  char *doc;
  (void)state;
  fs_log_init(FS_LOG_JSON, FS_LOG_WARN, "link", cap_fds[1]); /* 6,000 round.metrics lines: not captured */
  for (run = 1; run <= 3; run++)
    for (round = 1; round <= 1000; round++)
      for (k = 0; k < 2; k++) {
        serial++, t += 10;
        fs_view_round_start(t, run, serial, round, k ? "evaluate" : "train");
        fs_view_metrics(serial, body, n);
        fs_view_metrics(serial, body, n);
        fs_view_round_end(t + 5, serial, &two_replies);
      }
  cap_init(FS_LOG_DEBUG);
  /* one run's 2,000 phases fit FS_VIEW_RUN_PHASES; all of them FS_VIEW_PHASES */
  assert_int_equal(fs_view_phases_kept(), FS_VIEW_PHASES);
  mem = fs_view_memory();
  print_message("fedview: 6,000 rounds seen, %zu kept, %zu bytes held\n", fs_view_phases_kept(), mem);
  assert_true(mem < 4 * 1024 * 1024);
  doc = render(t + 100, 64 << 20, &len);
  assert_non_null(doc);
  print_message("fedview: document with 4,096 rounds: %zu bytes\n", len);
  assert_true(len < 8 * 1024 * 1024);
  /* the oldest went first: run 1 lost 6,000 - 4,096 = 1,904 of its 2,000 */
  doc_has(doc, "\"run_id\":\"1\"");
  doc_has(doc, "\"rounds_dropped\":1904");
  doc_has(doc, "\"run_id\":\"3\",");
  doc_has(doc, "\"loss\":{\"count\":2,\"min\":0.5,\"max\":0.5,\"mean\":0.5,\"weighted\":true}");
  free(doc);
  /* A cap on the document's size is honoured: NULL, not a cut document. */
  assert_null(render(t + 100, 4096, &len));
  /* One run beyond 2,048 phases drops its own oldest. */
  fs_fed_reset();
  fs_log_init(FS_LOG_JSON, FS_LOG_WARN, "link", cap_fds[1]);
  for (round = 1; round <= 1100; round++)
    for (k = 0; k < 2; k++) {
      serial++;
      fs_view_round_start(serial, 77, serial, round, k ? "evaluate" : "train");
      fs_view_round_end(serial, serial, &two_replies);
    }
  cap_init(FS_LOG_DEBUG);
  assert_int_equal(fs_view_phases_kept(), FS_VIEW_RUN_PHASES);
  doc = render(serial + 1, 64 << 20, &len);
  doc_has(doc, "\"rounds_dropped\":152");
  free(doc);
}

/* 10,000 nodes (and 20,000: the cap): the node table and the document stay
 * bounded; the states come out right. */
typedef struct count_ctx {
  size_t n;
  uint64_t states[FS_NODE_NSTATES];
} count_ctx;
static void count_node(void *ud, const fs_fed_node_info *n) {
  count_ctx *c = ud;
  c->n++;
  c->states[n->state]++;
}

static void ten_thousand_nodes_bounded(void **state) {
  uint64_t i, counts[FS_NODE_NSTATES];
  count_ctx cc;
  char *doc;
  size_t len;
  (void)state;
  fs_log_init(FS_LOG_JSON, FS_LOG_WARN, "link", cap_fds[1]);
  for (i = 1; i <= 10000; i++) {
    fs_fed_node_activated(1000, 1000000000000000000ull + i, 30);
    fs_fed_node_call(1000, 1000000000000000000ull + i, "203.0.113.200:65535", 1, 512, 1024);
  }
  assert_int_equal(fs_fed_node_states(1000, counts), 10000);
  doc = render(1000, 64 << 20, &len);
  assert_non_null(doc);
  print_message("fedview: document with 10,000 nodes: %zu bytes\n", len);
  assert_true(len < 4 * 1024 * 1024);
  free(doc);
  /* Beyond the cap: not tracked, counted. */
  for (i = 10001; i <= 20000; i++) fs_fed_node_call(1000, 1000000000000000000ull + i, "203.0.113.9:1", 1, 1, 1);
  assert_int_equal(fs_fed_node_states(1000, counts), FS_FED_MAX_NODES);
  assert_int_equal(fs_fed_nodes_untracked(), 20000 - FS_FED_MAX_NODES);
  doc = render(1000, 64 << 20, &len);
  assert_non_null(doc);
  print_message("fedview: document with %d nodes: %zu bytes\n", FS_FED_MAX_NODES, len);
  assert_true(len < 6 * 1024 * 1024);
  {
    char want[64];
    snprintf(want, sizeof(want), "\"tracked\":%d,\"untracked_calls\":%d", FS_FED_MAX_NODES, 20000 - FS_FED_MAX_NODES);
    doc_has(doc, want);
  }
  free(doc);
  cap_init(FS_LOG_DEBUG);
  memset(&cc, 0, sizeof(cc));
  fs_fed_each_node(1000, count_node, &cc);
  assert_int_equal(cc.n, FS_FED_MAX_NODES);
}

static void node_states(void **state) {
  uint64_t c[FS_NODE_NSTATES];
  char *doc;
  size_t len;
  (void)state;
  fs_fed_node_activated(1000, 11, 10);
  fs_fed_node_call(1000, 11, "198.51.100.1:4000", 1, 10, 20);
  fs_fed_node_call(1100, 11, "198.51.100.1:4000", 0, 5, 0); /* a failed call: an error, not "seen" */
  fs_fed_node_activated(1000, 12, 10);
  fs_fed_node_deactivated(12);
  fs_fed_node_call(5000, 13, "198.51.100.3:4000", 1, 1, 1); /* activation not seen: default 30 s */
  fs_fed_node_call(1000, 14, "198.51.100.4:4000", 0, 1, 1); /* never succeeded: not tracked */
  fs_fed_node_states(5000, c);
  assert_int_equal(c[FS_NODE_ACTIVE], 2);
  assert_int_equal(c[FS_NODE_DEACTIVATED], 1);
  fs_fed_node_states(11001, c); /* 11: silent for more than its 10 s interval */
  assert_int_equal(c[FS_NODE_LATE], 1);
  assert_int_equal(c[FS_NODE_ACTIVE], 1);
  fs_fed_tick(20999);
  fs_fed_node_states(20999, c);
  assert_int_equal(c[FS_NODE_OFFLINE], 0);
  fs_fed_tick(21000); /* 2 x 10 s: offline */
  fs_fed_node_states(21000, c);
  assert_int_equal(c[FS_NODE_OFFLINE], 1);
  fs_fed_node_states(35001, c); /* 13: 30 s silent */
  assert_int_equal(c[FS_NODE_LATE], 1);
  fs_fed_node_states(65000, c);
  assert_int_equal(c[FS_NODE_OFFLINE], 2);
  assert_int_equal(c[FS_NODE_DEACTIVATED], 1);
  doc = render(21000, 1 << 20, &len);
  doc_has(doc,
          "{\"node_id\":\"11\",\"peer\":\"198.51.100.1:4000\",\"state\":\"offline\",\"last_seen_ms\":1700000001000,"
          "\"idle_ms\":20000,\"heartbeat_interval_s\":10,\"calls\":2,\"errors\":1,\"bytes_in\":15,\"bytes_out\":20}");
  doc_has(doc, "\"node_id\":\"12\",\"peer\":\"\",\"state\":\"deactivated\"");
  doc_has(doc, "\"node_counts\":{\"active\":1,\"late\":0,\"offline\":1,\"deactivated\":1,\"tracked\":3,");
  assert_null(strstr(doc, "\"node_id\":\"14\""));
  free(doc);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(parse_every_value_type, setup, teardown),
      cmocka_unit_test_setup_teardown(parse_malformed_and_odd_bodies, setup, teardown),
      cmocka_unit_test_setup_teardown(weighted_and_unweighted_means, setup, teardown),
      cmocka_unit_test_setup_teardown(round_metrics_aggregated, setup, teardown),
      cmocka_unit_test_setup_teardown(metric_keys_bounded, setup, teardown),
      cmocka_unit_test_setup_teardown(run_start_and_end, setup, teardown),
      cmocka_unit_test_setup_teardown(runs_bounded, setup, teardown),
      cmocka_unit_test_setup_teardown(thousand_rounds_bounded, setup, teardown),
      cmocka_unit_test_setup_teardown(ten_thousand_nodes_bounded, setup, teardown),
      cmocka_unit_test_setup_teardown(node_states, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
