/*
 * fedstate: what the link role derives from the Fleet calls it sees: the
 * server round of each instruction, round.start / round.end per run and
 * message type, and node.offline for an active node silent for twice its
 * heartbeat interval.
 *
 * Rounds: an instruction's round is the `server-round` of the ConfigRecord
 * object in its tree, which the node pulls after PullMessages.  So
 * message.dispatch is emitted once the round is known (the ConfigRecord is
 * pulled, or was already seen: identical configs share an object id), or
 * at ConfirmMessageReceived without a round (an instruction without a
 * ConfigRecord), or after FS_FED_PENDING_MS.
 *
 * Memory is bounded: at most FS_FED_MAX_NODES nodes and FS_FED_MAX_MSGS
 * messages are tracked; beyond that, new ones are not (events still flow,
 * without derived fields).  Time is passed in, so the module is pure and
 * tested without a clock.
 *
 * It feeds fedview (the history of runs and rounds behind GET
 * /v1/federation) as rounds start and end, and keeps per node what that
 * view lists: peer, calls, bytes, errors, state.
 */
#ifndef FS_FEDSTATE_H
#define FS_FEDSTATE_H

#include <stddef.h>
#include <stdint.h>

#include "fedview.h"

#define FS_FED_MAX_NODES  16384
#define FS_FED_MAX_MSGS   16384
#define FS_FED_MAX_TREE   64 /* object ids remembered per instruction */
#define FS_FED_PENDING_MS 30000
#define FS_FED_ID_LEN     64   /* SHA-256 hex */
#define FS_FED_STR_MAX    1024 /* message_type, group_id: longer ones are cut */

typedef struct fs_fed_dispatch {
  uint64_t node_id, run_id;
  const char *message_id, *message_type, *group_id;
  const char *const *objects; /* object ids of the message's tree */
  size_t n_objects;
} fs_fed_dispatch;

typedef struct fs_fed_reply {
  uint64_t node_id, run_id;
  const char *message_id, *reply_to, *message_type;
  int has_error;
  int64_t error_code;
  const char *error_reason;
  double clientapp_runtime_s; /* < 0: unknown */
  int64_t objects_to_push;    /* < 0: unknown */
} fs_fed_reply;

/* Forgets everything (start, tests). */
void fs_fed_reset(void);

void fs_fed_node_activated(uint64_t now_ms, uint64_t node_id, double heartbeat_interval_s);
void fs_fed_node_deactivated(uint64_t node_id);
/* Any call made by |node_id|: it is alive. */
void fs_fed_node_seen(uint64_t now_ms, uint64_t node_id);

/* PullMessages handed out an instruction (emits message.dispatch now or
 * later, see above). */
void fs_fed_dispatch_msg(uint64_t now_ms, const fs_fed_dispatch *d);
/* A ConfigRecord object with `server-round` |round| was pulled or pushed. */
void fs_fed_config_round(uint64_t now_ms, const char *object_id, int64_t round);
/* |bytes| of object content moved for |node_id| (pulled: out to the node). */
void fs_fed_object_bytes(uint64_t node_id, uint64_t bytes, int pulled);
/* The whole request of a PushObject of |bytes| from |node_id| has arrived,
 * and is about to reach the SuperLink.  The SuperLink may act on the object
 * (and the ServerApp start the next phase, which ends this round) before
 * the call's answer comes back, so the bytes are counted in the node's
 * round now.  Returns 1 when they were: the call's end is then told with
 * fs_fed_push_settled() instead of fs_fed_object_bytes(); 0 when the
 * node's round is not known (then fs_fed_object_bytes() at success). */
int fs_fed_push_arrived(uint64_t node_id, uint64_t bytes);
/* A push counted by fs_fed_push_arrived() ended: |ok| (then
 * fs_fed_object_pushed() follows), or failed, and then its bytes leave its
 * round if that is still open (a round.end already written keeps them). */
void fs_fed_push_settled(uint64_t node_id, uint64_t bytes, int ok);
/* A PushObject of |node_id| succeeded (after fs_fed_object_bytes): its
 * round may be complete now. */
void fs_fed_object_pushed(uint64_t now_ms, uint64_t node_id);
void fs_fed_confirm(uint64_t now_ms, uint64_t node_id, uint64_t run_id, const char *message_id);
/* PushMessages delivered a reply (emits message.reply, maybe round.end). */
void fs_fed_reply_msg(uint64_t now_ms, const fs_fed_reply *r);

/* A Fleet call about |node_id| (0: none) from |peer| ended, |ok| or not,
 * having carried |bytes_in| from the node and |bytes_out| to it.  A node
 * not tracked yet is tracked from its first successful call (the
 * SuperLink accepted it). */
void fs_fed_node_call(uint64_t now_ms, uint64_t node_id, const char *peer, int ok, uint64_t bytes_in,
                      uint64_t bytes_out);
/* A reply of |node_id| pushed a MetricRecord object: its metrics count in
 * the node's current round (fs_view_metrics). */
void fs_fed_reply_metrics(uint64_t node_id, const uint8_t *body, size_t len);

/* Emits node.offline for silent nodes and overdue message.dispatch.  Call
 * about once a second. */
void fs_fed_tick(uint64_t now_ms);

/* For metrics. */
uint64_t fs_fed_nodes_active(void);
int64_t fs_fed_current_round(uint64_t *run_id);

/* Node states, as GET /v1/federation and /metrics show them:
 * deactivated (DeactivateNode seen), offline (active, silent for 2 x its
 * heartbeat interval), late (silent for more than 1 x), active.  A node
 * whose ActivateNode was not seen (the sidecar started later) is judged by
 * its last call with Flower's default interval of 30 s. */
typedef enum { FS_NODE_ACTIVE = 0, FS_NODE_LATE, FS_NODE_OFFLINE, FS_NODE_DEACTIVATED, FS_NODE_NSTATES } fs_node_state;
const char *fs_fed_node_state_name(fs_node_state s);

typedef struct fs_fed_node_info {
  uint64_t node_id, last_seen_ms; /* last_seen_ms: fedstate's clock */
  uint64_t calls, errors, bytes_in, bytes_out;
  double heartbeat_s;
  const char *peer; /* "" when unknown */
  fs_node_state state;
} fs_fed_node_info;
/* Calls |fn| for each tracked node, in table order. */
void fs_fed_each_node(uint64_t now_ms, void (*fn)(void *ud, const fs_fed_node_info *n), void *ud);
/* Nodes per state; returns the nodes tracked. */
uint64_t fs_fed_node_states(uint64_t now_ms, uint64_t counts[FS_NODE_NSTATES]);
/* Nodes whose calls were seen but that could not be tracked (the cap). */
uint64_t fs_fed_nodes_untracked(void);
/* The live counters of round |serial| while it is open: returns 1, else 0. */
int fs_fed_round_live(uint64_t serial, fs_view_round_stats *out);

/* Per run, for the FS_FED_RUNS runs most recently seen (older ones are
 * forgotten, which keeps the metrics' run_id label bounded). */
#define FS_FED_RUNS 8
typedef struct fs_fed_run {
  uint64_t run_id;
  int64_t round;         /* latest server round, -1 none seen */
  uint64_t instructions; /* message.dispatch */
  uint64_t replies, error_replies;
  uint64_t last_ms;
  uint64_t open_since_ms; /* start of its open round (fedstate's clock), 0: none */
} fs_fed_run;
/* Copies up to FS_FED_RUNS runs into |out|, most recent first; returns how
 * many. */
size_t fs_fed_runs(fs_fed_run *out);

/* Reads `server-round` from a ConfigRecord body (protobuf).  Returns 0 and
 * |*round|, or -1 when absent or malformed. */
int fs_fed_parse_server_round(const uint8_t *body, size_t len, int64_t *round);

#endif
