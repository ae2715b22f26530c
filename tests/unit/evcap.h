/*
 * Test helper (header only, included by test_observe.c, test_fedstate.c and
 * test_fedview.c):
 * captures the event logger's lines through a pipe, as test_log.c does,
 * and finds events and fields in them.
 *
 *   cap_init(FS_LOG_DEBUG);        once (fs_log_init on a 1 MiB pipe)
 *   cap_reset();                   forget lines read so far, drain the pipe
 *   cap_collect();                 read new lines; returns how many there are
 *   cap_find("round.end", 0)       the first line of that event, or NULL
 *   cap_count("node.offline")
 *   cap_field(line, "node_id")     the value: strings without the quotes
 *                                  (escapes kept), numbers as written; NULL
 *                                  when absent
 *   cap_assert_field(line, k, v)   fails the cmocka test unless field k is v
 *
 * Include it after <cmocka.h>.
 */
#ifndef EVCAP_H
#define EVCAP_H

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

#define CAP_MAX_LINES 8192

static int cap_fds[2] = {-1, -1};
static char cap_buf[4 << 20];
static size_t cap_len;
static char *cap_lines[CAP_MAX_LINES];
static int cap_n;

static void cap_init(fs_log_level level) {
  if (cap_fds[0] < 0) {
    if (pipe(cap_fds) < 0) abort();
    (void)fcntl(cap_fds[1], F_SETPIPE_SZ, 1 << 20);
    (void)fcntl(cap_fds[0], F_SETFL, O_NONBLOCK);
  }
  fs_log_init(FS_LOG_JSON, level, "link", cap_fds[1]);
}

static int cap_collect(void) {
  for (;;) {
    ssize_t r = read(cap_fds[0], cap_buf + cap_len, sizeof(cap_buf) - 1 - cap_len);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    cap_len += (size_t)r;
    if (cap_len >= sizeof(cap_buf) - 1) abort(); /* a test wrote far too much */
  }
  cap_buf[cap_len] = '\0';
  /* Split what is new into lines (every write is one whole line). */
  {
    char *p = cap_n ? cap_lines[cap_n - 1] + strlen(cap_lines[cap_n - 1]) + 1 : cap_buf;
    while (p < cap_buf + cap_len) {
      char *nl = strchr(p, '\n');
      if (!nl || cap_n >= CAP_MAX_LINES) abort();
      *nl = '\0';
      cap_lines[cap_n++] = p;
      p = nl + 1;
    }
  }
  return cap_n;
}

static void cap_reset(void) {
  cap_collect();
  cap_len = 0;
  cap_n = 0;
}

static int cap_is(const char *line, const char *event) {
  char pat[96];
  snprintf(pat, sizeof(pat), "\"event\":\"%s\",", event);
  return strstr(line, pat) != NULL;
}

static const char *cap_find(const char *event, int nth) {
  int i;
  cap_collect();
  for (i = 0; i < cap_n; i++)
    if (cap_is(cap_lines[i], event) && nth-- == 0) return cap_lines[i];
  return NULL;
}

/* Index of the nth line of |event| (-1 when absent), for ordering checks. */
static int cap_index(const char *event, int nth) {
  int i;
  cap_collect();
  for (i = 0; i < cap_n; i++)
    if (cap_is(cap_lines[i], event) && nth-- == 0) return i;
  return -1;
}

static int cap_count(const char *event) {
  int i, n = 0;
  cap_collect();
  for (i = 0; i < cap_n; i++) n += cap_is(cap_lines[i], event);
  return n;
}

static const char *cap_field(const char *line, const char *key) {
  static char val[8192];
  char pat[96];
  const char *p;
  size_t n = 0;
  if (!line) return NULL;
  snprintf(pat, sizeof(pat), ",\"%s\":", key);
  if (!(p = strstr(line, pat))) return NULL;
  p += strlen(pat);
  if (*p == '"') {
    p++;
    while (*p && *p != '"' && n < sizeof(val) - 2) {
      if (*p == '\\' && p[1]) val[n++] = *p++;
      val[n++] = *p++;
    }
  } else {
    while (*p && *p != ',' && *p != '}' && n < sizeof(val) - 1) val[n++] = *p++;
  }
  val[n] = '\0';
  return val;
}

static void cap_assert_field(const char *line, const char *key, const char *want) {
  const char *v = cap_field(line, key);
  if (!v) fail_msg("no field %s in %s", key, line ? line : "(no line)");
  if (strcmp(v, want)) fail_msg("field %s is %s, want %s in %s", key, v, want, line);
}

#endif
