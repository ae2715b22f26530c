/* renew: see renew.h. */
#include "renew.h"

int64_t fs_renew_at(int64_t not_before, int64_t not_after) {
  if (not_after <= not_before) return not_before;
  return not_after - (not_after - not_before) / 3;
}

int fs_renew_due(int64_t now, int64_t not_before, int64_t not_after) {
  if (not_after <= not_before || now < not_before || now >= not_after) return 1;
  return now >= fs_renew_at(not_before, not_after);
}

int64_t fs_renew_next_check_s(int64_t now, const int64_t *at, int n) {
  int64_t d = FS_RENEW_CHECK_MAX_S;
  int i;
  for (i = 0; i < n; i++)
    if (at[i] - now < d) d = at[i] - now;
  if (d < FS_RENEW_CHECK_MIN_S) d = FS_RENEW_CHECK_MIN_S;
  return d;
}

int64_t fs_renew_backdate_s(int64_t lifetime_s) { return lifetime_s >= 86400 ? 3600 : 0; }

int64_t fs_renew_server_not_after(int64_t now, int64_t lifetime_s, int64_t ca_not_after) {
  int64_t t = now + lifetime_s;
  return t > ca_not_after ? ca_not_after : t;
}
