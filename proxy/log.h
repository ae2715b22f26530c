/*
 * log: the event logger (README.md, "Events").
 *
 * One event = one line, built in a fixed 4096-byte buffer and written with a
 * single write(), so lines from one process never interleave and a pipe
 * reader (PIPE_BUF = 4096) always gets whole lines.  The output fd is put in
 * non-blocking mode when it is a pipe or socket: if the reader cannot keep
 * up, the line is dropped and counted (fs_log_dropped()), never queued, so
 * the data path never waits on logging.
 *
 * Usage:
 *   fs_event ev;
 *   if (fs_ev_begin(&ev, FS_LOG_INFO, "conn.open")) {
 *     fs_ev_str(&ev, "peer", peer);
 *     fs_ev_u64(&ev, "bytes_in", n);
 *     fs_ev_end(&ev);
 *   }
 */
#ifndef FS_LOG_H
#define FS_LOG_H

#include <stddef.h>
#include <stdint.h>

typedef enum { FS_LOG_DEBUG = 0, FS_LOG_INFO, FS_LOG_WARN, FS_LOG_ERROR } fs_log_level;
typedef enum { FS_LOG_JSON = 0, FS_LOG_TEXT } fs_log_format;

#define FS_LOG_LINE_MAX 4096
/* A single string value longer than this is cut and marked with "...". */
#define FS_LOG_VALUE_MAX 1024

typedef struct fs_event {
  char buf[FS_LOG_LINE_MAX];
  size_t len;
  uint8_t truncated; /* a value was cut or a field did not fit */
  fs_log_level level;
} fs_event;

/* Configures the logger.  |role| must outlive the logger ("link"/"node").
 * Output goes to |fd| (1 for stdout).  Never fails. */
void fs_log_init(fs_log_format format, fs_log_level min_level, const char *role, int fd);

/* Starts an event.  Returns 0 (and |ev| must not be used further) when
 * |level| is filtered out, nonzero otherwise. */
int fs_ev_begin(fs_event *ev, fs_log_level level, const char *name);
void fs_ev_str(fs_event *ev, const char *key, const char *value);
void fs_ev_strn(fs_event *ev, const char *key, const char *value, size_t len);
/* A 64-bit id as a decimal string ("node_id", "run_id"). */
void fs_ev_id(fs_event *ev, const char *key, uint64_t value);
void fs_ev_u64(fs_event *ev, const char *key, uint64_t value);
void fs_ev_i64(fs_event *ev, const char *key, int64_t value);
/* A number with up to |decimals| fraction digits. */
void fs_ev_num(fs_event *ev, const char *key, double value, int decimals);
void fs_ev_bool(fs_event *ev, const char *key, int value);
/* Writes the line.  Returns 0, or -1 when it was dropped. */
int fs_ev_end(fs_event *ev);

/* Rate limit of the events a remote peer can cause at will (rpc.error,
 * conn.open, conn.close, tls.fail, fleet.undecoded), per kind. */
#define FS_LOG_BURST 1000
#define FS_LOG_RATE  100

/* Lines of those kinds suppressed by their rate limit, since start. */
uint64_t fs_log_suppressed(void);

/* Lines dropped because the output could not take them, since start. */
uint64_t fs_log_dropped(void);

/* Parses "debug|info|warning|warn|error" (any case).  Returns 0 or -1. */
int fs_log_parse_level(const char *s, fs_log_level *out);

/* Appends |s| JSON-escaped (without quotes) to |out| of capacity |cap|,
 * replacing invalid UTF-8 with U+FFFD.  Stops before a character that would
 * not fit.  Returns the number of bytes of |s| consumed; |*outlen| is
 * advanced.  Exposed for unit tests. */
size_t fs_json_escape(char *out, size_t cap, size_t *outlen, const char *s, size_t n);

#endif
