/*
 * policy: the data path's decisions, as pure functions over plain values
 * (no clock reads, no I/O, no globals), so each can be pinned by unit tests
 * (tests/unit/test_policy.c): how long a call may wait for an upstream,
 * whether a call may be repeated, when a stalled call probes its connection
 * and when it gives up, which upstream connection takes a call, how the
 * keepalive time grows after too_many_pings, the idle timer of a client
 * connection, and when a header block is abuse.  The rooms that act on
 * them (upcall.c, uppool.c, downstream.c) only gather the facts and carry
 * the verdict out.
 *
 * Times are milliseconds on one clock (the loop's).
 */
#ifndef FS_POLICY_H
#define FS_POLICY_H

#include <stddef.h>
#include <stdint.h>

/* --- holding a call while no upstream connection can take it ------------- */

/* How long a call may wait for an upstream: |hold_ms|, but for a call with
 * its own deadline (|has_deadline|, |deadline_ms| from now) end the wait a
 * little before it (10%, at most 200 ms), so the client gets our UNAVAILABLE,
 * which Flower retries, rather than its own DEADLINE_EXCEEDED, which it does
 * not.  Returns at least 1. */
uint64_t fs_policy_hold_ms(uint64_t hold_ms, int has_deadline, uint64_t deadline_ms);

/* --- repeating a call -------------------------------------------------------- */

/* A call is repeated at most this many times. */
#define FS_POLICY_MAX_RETRIES 3

typedef struct fs_retry_facts {
  uint8_t replay_complete;   /* every request byte sent upstream is still kept */
  uint8_t response_started;  /* the upstream sent response headers: it processed the call */
  uint8_t trailers_sent;     /* request trailers went out (they are not kept) */
  uint8_t finished;          /* the call's final status is already decided */
  uint8_t client_present;    /* the client's stream is still open */
  uint8_t draining;          /* the sidecar is shutting down */
  uint8_t attempts;          /* repeats made so far */
  uint8_t refused;           /* the upstream provably never processed it (REFUSED_STREAM, above GOAWAY) */
  uint8_t method_repeatable; /* the method has no side effects (fs_fleet_repeatable) */
} fs_retry_facts;

/* Nonzero when the call may be sent again: everything sent is kept, no
 * answer came, the client still waits, fewer than FS_POLICY_MAX_RETRIES
 * repeats were made, not draining, and either the upstream never saw it or
 * the method has no side effects. */
int fs_policy_may_retry(const fs_retry_facts *f);

/* --- calls stalled on a silent connection (node role) ------------------------ */

/* Nonzero when a call is watched for a stall: the stall probe is on for this
 * pool, the call has a deadline, no response headers came yet, and ending it
 * UNAVAILABLE is safe (the client repeats it: a heartbeat or a method
 * without side effects). */
int fs_policy_stall_watched(int probe_enabled, int has_deadline, int response_started, int safe_to_fail);

/* When a watched call sent at |sent_ms| with deadline |deadline_ms| is given
 * up on if its connection did not answer a PING: the fs_policy_hold_ms
 * margin before the deadline. */
uint64_t fs_policy_stall_check_at(uint64_t sent_ms, uint64_t deadline_ms);

/* When it probes its connection with a PING: halfway to the check. */
uint64_t fs_policy_stall_probe_at(uint64_t sent_ms, uint64_t deadline_ms);

typedef enum {
  FS_STALL_WAIT,  /* nothing to do before *|next_at| */
  FS_STALL_PROBE, /* PING the connection now, record |now_ms| as the probe time and decide again */
  FS_STALL_FAIL,  /* no PING ACK since the probe and the check time came: end the call UNAVAILABLE */
  FS_STALL_ALIVE  /* the connection answered the probe: leave the call to its own deadline */
} fs_stall_verdict;

/* Decides for one watched call at |now_ms|: |probe_ms| is when its probe
 * PING went out (0: not yet), |ping_ack_ms| when the connection's last PING
 * ACK arrived (0: never).  Only an ACK after the probe counts: on a lossy
 * link old data trickles in while the call's own bytes are stuck behind it.
 * Sets *|next_at| (> |now_ms|) for FS_STALL_WAIT only. */
fs_stall_verdict fs_policy_stall(uint64_t now_ms, uint64_t sent_ms, uint64_t deadline_ms, uint64_t probe_ms,
                                 uint64_t ping_ack_ms, uint64_t *next_at);

/* --- which upstream connection takes a call --------------------------------- */

typedef struct fs_upconn_view {
  uint8_t closing;      /* being closed */
  uint8_t ready;        /* its SETTINGS arrived */
  uint8_t goaway;       /* the upstream said GOAWAY: no new streams */
  uint32_t streams;     /* open streams */
  uint32_t max_streams; /* the upstream's MAX_CONCURRENT_STREAMS */
} fs_upconn_view;

/* Chooses among |n| connections (|v|, in pool order) for a new call.
 * Returns the index of the first ready connection below its stream limit;
 * else sets *|should_connect| when none is connecting, fewer than
 * |max_conns| are open (|n| counts every open one) and not |draining|, and
 * returns -1 so the call waits for that connection; else, when every ready
 * connection is full and no more may be opened, the least loaded one
 * (nghttp2 queues the stream until one closes); -1 when there is none or one
 * is still connecting. */
int fs_policy_pick_upstream(const fs_upconn_view *v, size_t n, size_t max_conns, int draining, int *should_connect);

/* --- abuse ----------------------------------------------------------------------- */

/* A client's header block that decodes to more than this many times the
 * header list limit is an attack, not a large request: HPACK lets 1-byte
 * indexes repeat a 4 KB table entry, so decoding on costs the sidecar far
 * more than the client's bytes. */
#define FS_POLICY_HEADER_ABUSE_FACTOR 4

/* Nonzero when |decoded_bytes| (RFC 7541 size of one block so far) makes
 * the block abuse under |limit|: the connection is closed with
 * ENHANCE_YOUR_CALM instead of decoding on.  Up to that, a block over the
 * limit only ends its own call (RESOURCE_EXHAUSTED). */
int fs_policy_header_abuse(uint64_t decoded_bytes, uint32_t limit);

/* --- reaching the upstream again ------------------------------------------------ */

/* A failed connection attempt either reached the upstream's process (the
 * TCP handshake completed, then TLS, HTTP/2 or the server failed: it cost
 * the SuperLink work, so the gRPC backoff governs the next attempt) or did
 * not (SYN unanswered, no route, host unreachable, or refused: the host
 * answered with a bare RST, nothing listens; cheap for it): then short TCP
 * probes look for its return (uppool.c). */
typedef enum { FS_ATTEMPT_REACHED = 0, FS_ATTEMPT_UNREACHED } fs_attempt_class;

/* The class of an attempt that failed with |tcp_connected| (the handshake
 * completed) and |connect_err| (libuv's error of the TCP connect; 0 when
 * our own TCP connect timer ran out).  Unknown local errors (no
 * descriptors, no memory) count as reached: the backoff paces them. */
fs_attempt_class fs_policy_attempt_class(int tcp_connected, int connect_err);

/* The delay before the next probe: |interval_ms| +-20 %, from |rnd| (any
 * 64-bit value): a crowd of nodes probes at spread-out phases. */
uint64_t fs_policy_probe_delay(uint64_t interval_ms, uint64_t rnd);

/* --- frame floods (client connections) ------------------------------------------ */

/* What a client connection has sent and been sent, for the flood limits
 * (Envoy's model): frames that cost the sidecar work but carry nothing. */
typedef struct fs_flood_count {
  uint32_t empty_in_a_row; /* DATA frames without payload or END_STREAM, in a row */
  uint32_t priority;       /* PRIORITY frames received */
  uint32_t window_updates; /* WINDOW_UPDATE frames received */
  uint32_t streams;        /* requests the client opened */
  uint32_t data_sent;      /* DATA frames sent to the client */
} fs_flood_count;

#define FS_FLOOD_EMPTY_IN_A_ROW          10 /* empty DATA frames in a row */
#define FS_FLOOD_PRIORITY_PER_STREAM     100
#define FS_FLOOD_WINDOW_UPDATES_BASE     100
#define FS_FLOOD_WINDOW_UPDATES_PER_DATA 10

/* NULL while |f| is within the limits; else what was flooded (static
 * text): the connection is then closed with GOAWAY ENHANCE_YOUR_CALM.
 * PRIORITY frames: at most 100 per stream opened (+100); WINDOW_UPDATE:
 * at most 100 + 10 per DATA frame sent (a client that reads sends one or
 * two per DATA frame); empty DATA frames: at most 10 in a row. */
const char *fs_policy_flood(const fs_flood_count *f);

/* --- keepalive ------------------------------------------------------------------ */

/* The keepalive time for the next connections after the upstream said
 * GOAWAY ENHANCE_YOUR_CALM "too_many_pings": doubled, as gRPC clients do,
 * up to a day. */
uint64_t fs_policy_keepalive_backoff(uint64_t time_ms);

/* --- idle client connections --------------------------------------------------- */

typedef enum {
  FS_IDLE_STOP, /* calls are open (or no idle timeout): no timer */
  FS_IDLE_ARM,  /* arm the timer for *|ms| unless it runs already */
  FS_IDLE_ASIS  /* not judged now (not yet ready, or closing) */
} fs_idle_action;

/* A client connection that never opened a stream is closed after this
 * (or --idle-timeout when shorter): a connection that only holds a file
 * descriptor is not a client. */
#define FS_POLICY_UNUSED_IDLE_MS 60000

/* The idle timer of a client connection: |ready| once the client's
 * HTTP/2 preface and SETTINGS arrived (before, the handshake timer runs),
 * |streams| open, |ever_used| once a stream was opened, |idle_ms| the
 * --idle-timeout (0 = never, for connections that were used).  Sets *|ms|
 * for FS_IDLE_ARM. */
fs_idle_action fs_policy_idle(int ready, int closing, uint32_t streams, int ever_used, uint64_t idle_ms, uint64_t *ms);

/* --- the process's call and buffer budgets -------------------------------------- */

/* Every stream starts with a window of one buffer block each way
 * (FS_CALL_FIRST_WINDOW); widening it to --stream-window takes the
 * difference from one pool of --max-buffer bytes, handed back when the call
 * ends.  So buffers stay under --max-calls x 2 first windows + --max-buffer,
 * however the clients behave: a client that reads nothing holds one block
 * per call, and when the pool is spent calls go on with their first window
 * (slower, never failed). */
typedef struct fs_budget {
  uint64_t cap, used;
  uint64_t refused; /* takes that did not fit */
} fs_budget;

/* Takes |n| bytes from |b|: 0, or -1 (counted in b->refused, nothing
 * taken) when they would exceed its cap. */
int fs_budget_take(fs_budget *b, uint64_t n);
/* Hands back |n| bytes taken before. */
void fs_budget_give(fs_budget *b, uint64_t n);

typedef enum {
  FS_ADMIT_OK,     /* below --max-calls */
  FS_ADMIT_EVICT,  /* at the cap: the call idle longest gives way (RESOURCE_EXHAUSTED), then admit */
  FS_ADMIT_REFUSE, /* at the cap: REFUSED_STREAM (clients may retry it: never processed) */
} fs_admit;

/* A call idle this long gives way to any new call at the cap. */
#define FS_POLICY_EVICT_IDLE_MS 2000

/* A new call arrives on a client connection with |new_conn_calls| calls
 * open, |live| calls open in all, --max-calls |max_calls|.  A candidate to
 * give way (one of the calls idle longest) has moved no byte for |idle_ms|,
 * holds answer bytes its client does not take when |blocked_on_client|, and
 * its connection has |conn_calls| calls open.  At the cap it gives way when
 * its client has left it idle for FS_POLICY_EVICT_IDLE_MS (a call waiting
 * for a slow upstream is not its client's doing and never gives way for
 * that), or when its client holds more calls than the newcomer's plus one:
 * a client with fewer calls never waits behind one holding more, so whoever
 * fills the cap pays for it, not the others.  FS_ADMIT_REFUSE: this
 * candidate may not give way. */
fs_admit fs_policy_admit(uint64_t live, uint32_t max_calls, uint64_t idle_ms, int blocked_on_client,
                         uint32_t conn_calls, uint32_t new_conn_calls);

#endif
