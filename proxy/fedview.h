/*
 * fedview: the history behind GET /v1/federation and the page at GET /
 * (README.md, "The federation view"): the runs seen (first and last
 * traffic, the FAB GetRun named), their rounds with fedstate's counters,
 * and per round the aggregate of the metrics in the replies' MetricRecord
 * objects.  It writes run.start, run.end and round.metrics, and renders
 * the whole view, nodes included (from fedstate), as one JSON document.
 *
 * Bounded: FS_VIEW_RUNS runs (a new one evicts the least recently active),
 * FS_VIEW_RUN_PHASES rounds per run and FS_VIEW_PHASES in all (the oldest
 * are dropped first), FS_VIEW_KEYS metric keys per run; every drop is
 * counted and shown in the document.  Time is passed in (monotonic ms), so
 * the module is tested without a clock.
 */
#ifndef FS_FEDVIEW_H
#define FS_FEDVIEW_H

#include <stddef.h>
#include <stdint.h>

#define FS_VIEW_RUNS       8
#define FS_VIEW_RUN_PHASES 2048 /* a round is one phase per message type */
#define FS_VIEW_PHASES     4096
#define FS_VIEW_KEYS       8
#define FS_VIEW_KEY_LEN    64  /* longer keys are skipped */
#define FS_VIEW_TYPE_LEN   32  /* message types are cut to this */
#define FS_VIEW_STR_LEN    128 /* fab_id, fab_version, status are cut to this */
/* A run with no open round and no traffic for this long has ended. */
#define FS_VIEW_RUN_IDLE_MS (600 * 1000)

/* A round's counters (fedstate's, see round.end). */
typedef struct fs_view_round_stats {
  uint32_t nodes, replies, errors, missing;
  uint64_t bytes_in, bytes_out;
} fs_view_round_stats;

void fs_view_reset(void);

/* Traffic of run |run_id| (0 is ignored): writes run.start when it is new
 * (or had ended). */
void fs_view_run_seen(uint64_t now_ms, uint64_t run_id);
/* GetRun answered: the run's FAB and status; status "finished" ends it
 * (run.end, reason "finished"). */
void fs_view_run_info(uint64_t now_ms, uint64_t run_id, const char *fab_id, const char *fab_version,
                      const char *status);
/* fedstate opened round |serial| (unique, increasing) of a run. */
void fs_view_round_start(uint64_t now_ms, uint64_t run_id, uint64_t serial, int64_t round, const char *type);
/* fedstate ended round |serial| with |st|: writes round.metrics when its
 * replies carried metrics. */
void fs_view_round_end(uint64_t now_ms, uint64_t serial, const fs_view_round_stats *st);
/* A reply of round |serial| pushed a MetricRecord object with |body|.
 * Returns 0, or -1 when the body is not a MetricRecord (nothing counted). */
int fs_view_metrics(uint64_t serial, const uint8_t *body, size_t len);
/* Ends idle runs (run.end, reason "idle").  Call about once a second. */
void fs_view_tick(uint64_t now_ms);

/* What the document says besides fedstate's and fedview's state. */
typedef struct fs_view_ctx {
  const char *role, *version, *upstream;
  int upstream_up;
  const char *health, *health_reason;
  uint64_t now_ms;  /* the clock fedstate and fedview are fed with */
  uint64_t wall_ms; /* Unix time in ms, for the timestamps */
} fs_view_ctx;

/* Renders the document (README.md) into a malloc'd buffer of at most
 * |max| bytes.  Returns it (NUL-terminated, |*len| without the NUL; the
 * caller frees), or NULL when out of memory or larger than |max|. */
char *fs_view_render(const fs_view_ctx *ctx, size_t max, size_t *len);

/* For tests and /metrics: runs and phases kept, bytes held. */
size_t fs_view_runs_kept(void);
size_t fs_view_phases_kept(void);
size_t fs_view_memory(void);

#endif
