/* policy: see policy.h. */
#include "policy.h"

#include <uv.h>

uint64_t fs_policy_hold_ms(uint64_t hold_ms, int has_deadline, uint64_t deadline_ms) {
  if (has_deadline) {
    uint64_t margin = deadline_ms / 10 < 200 ? deadline_ms / 10 : 200;
    if (deadline_ms - margin < hold_ms) hold_ms = deadline_ms - margin;
  }
  return hold_ms ? hold_ms : 1;
}

int fs_policy_may_retry(const fs_retry_facts *f) {
  return f->replay_complete && !f->response_started && !f->trailers_sent && !f->finished && f->client_present &&
         f->attempts < FS_POLICY_MAX_RETRIES && !f->draining && (f->refused || f->method_repeatable);
}

int fs_policy_stall_watched(int probe_enabled, int has_deadline, int response_started, int safe_to_fail) {
  return probe_enabled && has_deadline && !response_started && safe_to_fail;
}

uint64_t fs_policy_stall_check_at(uint64_t sent_ms, uint64_t deadline_ms) {
  uint64_t left = deadline_ms > sent_ms ? deadline_ms - sent_ms : 0;
  return sent_ms + fs_policy_hold_ms(UINT64_MAX, 1, left);
}

uint64_t fs_policy_stall_probe_at(uint64_t sent_ms, uint64_t deadline_ms) {
  return sent_ms + (fs_policy_stall_check_at(sent_ms, deadline_ms) - sent_ms) / 2;
}

fs_stall_verdict fs_policy_stall(uint64_t now_ms, uint64_t sent_ms, uint64_t deadline_ms, uint64_t probe_ms,
                                 uint64_t ping_ack_ms, uint64_t *next_at) {
  uint64_t check_at = fs_policy_stall_check_at(sent_ms, deadline_ms);
  uint64_t probe_at = fs_policy_stall_probe_at(sent_ms, deadline_ms);
  if (!probe_ms && now_ms >= probe_at) return FS_STALL_PROBE;
  if (now_ms < check_at) {
    *next_at = probe_ms ? check_at : probe_at;
    return FS_STALL_WAIT;
  }
  return ping_ack_ms >= probe_ms ? FS_STALL_ALIVE : FS_STALL_FAIL;
}

int fs_policy_pick_upstream(const fs_upconn_view *v, size_t n, size_t max_conns, int draining, int *should_connect) {
  size_t i;
  int connecting = 0, best = -1;
  for (i = 0; i < n; i++) {
    if (v[i].closing) continue;
    if (!v[i].ready) {
      connecting = 1;
      continue;
    }
    if (v[i].goaway) continue;
    if (v[i].streams < v[i].max_streams) {
      *should_connect = 0;
      return (int)i;
    }
    if (best < 0 || v[i].streams < v[best].streams) best = (int)i;
  }
  *should_connect = !connecting && n < max_conns && !draining;
  return *should_connect || connecting ? -1 : best;
}

int fs_policy_header_abuse(uint64_t decoded_bytes, uint32_t limit) {
  return decoded_bytes > (uint64_t)limit * FS_POLICY_HEADER_ABUSE_FACTOR;
}

uint64_t fs_policy_keepalive_backoff(uint64_t time_ms) {
  const uint64_t day = 86400000;
  return time_ms < day / 2 ? time_ms * 2 : day;
}

fs_idle_action fs_policy_idle(int ready, int closing, uint32_t streams, int ever_used, uint64_t idle_ms, uint64_t *ms) {
  if (!ready || closing) return FS_IDLE_ASIS;
  if (streams > 0) return FS_IDLE_STOP;
  if (!ever_used) {
    *ms = idle_ms && idle_ms < FS_POLICY_UNUSED_IDLE_MS ? idle_ms : FS_POLICY_UNUSED_IDLE_MS;
    return FS_IDLE_ARM;
  }
  if (idle_ms == 0) return FS_IDLE_STOP;
  *ms = idle_ms;
  return FS_IDLE_ARM;
}

const char *fs_policy_flood(const fs_flood_count *f) {
  if (f->empty_in_a_row > FS_FLOOD_EMPTY_IN_A_ROW) return "empty DATA frames";
  if ((uint64_t)f->priority > (uint64_t)FS_FLOOD_PRIORITY_PER_STREAM * ((uint64_t)f->streams + 1))
    return "PRIORITY frames";
  if ((uint64_t)f->window_updates >
      FS_FLOOD_WINDOW_UPDATES_BASE + (uint64_t)FS_FLOOD_WINDOW_UPDATES_PER_DATA * f->data_sent)
    return "WINDOW_UPDATE frames";
  return NULL;
}

fs_attempt_class fs_policy_attempt_class(int tcp_connected, int connect_err) {
  if (tcp_connected) return FS_ATTEMPT_REACHED;
  switch (connect_err) {
  case 0: /* our TCP connect timer: the SYN went unanswered */
  case UV_ETIMEDOUT:
  case UV_EHOSTUNREACH:
  case UV_ENETUNREACH:
  case UV_ECONNREFUSED:
  case UV_ECONNRESET:
    return FS_ATTEMPT_UNREACHED;
  default:
    return FS_ATTEMPT_REACHED;
  }
}

uint64_t fs_policy_probe_delay(uint64_t interval_ms, uint64_t rnd) {
  uint64_t span = interval_ms * 2 / 5; /* 40 %: from 0.8 to 1.2 x */
  return interval_ms - interval_ms / 5 + (span ? rnd % (span + 1) : 0);
}

/* --- budgets --------------------------------------------------------------------- */

int fs_budget_take(fs_budget *b, uint64_t n) {
  if (n > b->cap || b->used > b->cap - n) {
    b->refused++;
    return -1;
  }
  b->used += n;
  return 0;
}

void fs_budget_give(fs_budget *b, uint64_t n) { b->used = n > b->used ? 0 : b->used - n; }

fs_admit fs_policy_admit(uint64_t live, uint32_t max_calls, uint64_t idle_ms, int blocked_on_client,
                         uint32_t conn_calls, uint32_t new_conn_calls) {
  if (live < max_calls) return FS_ADMIT_OK;
  if ((blocked_on_client && idle_ms >= FS_POLICY_EVICT_IDLE_MS) || (uint64_t)conn_calls > (uint64_t)new_conn_calls + 1)
    return FS_ADMIT_EVICT;
  return FS_ADMIT_REFUSE;
}
