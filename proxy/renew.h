/*
 * renew: when a certificate is replaced, as pure functions of times in
 * seconds since the epoch (no clock, no OpenSSL): the certificate lifecycle
 * of tls.c asks them at start, on SIGHUP and on its renewal timer.
 *
 * Rule: a certificate is renewed once less than a third of its lifetime
 * (notAfter - notBefore) is left; the timer looks again at the renewal
 * point of the certificate that reaches it first, but at least every
 * FS_RENEW_CHECK_MAX_S (an hour: a new host address is noticed within an
 * hour) and at most every FS_RENEW_CHECK_MIN_S.
 */
#ifndef FS_RENEW_H
#define FS_RENEW_H

#include <stdint.h>

#define FS_RENEW_CHECK_MAX_S 3600
#define FS_RENEW_CHECK_MIN_S 1

/* Lifetimes of the auto-generated certificates, in seconds (tests may
 * shorten them: FS_TEST_CERT_LIFETIME_S, FS_TEST_CA_LIFETIME_S). */
#define FS_RENEW_CA_LIFETIME_S     (3650LL * 86400)
#define FS_RENEW_SERVER_LIFETIME_S (825LL * 86400)

/* Nonzero when a certificate valid from |not_before| to |not_after| must be
 * replaced at |now|: less than a third of its lifetime left, expired, not
 * valid yet, or an empty or inverted validity. */
int fs_renew_due(int64_t now, int64_t not_before, int64_t not_after);

/* When fs_renew_due() becomes true for that certificate: notAfter less a
 * third of its lifetime (not_before when the validity is nonsense). */
int64_t fs_renew_at(int64_t not_before, int64_t not_after);

/* Seconds from |now| until the timer looks again, given the renewal points
 * of the certificates it watches (|n| of them, |at|; 0 certificates: the
 * maximum), clamped to [FS_RENEW_CHECK_MIN_S, FS_RENEW_CHECK_MAX_S]. */
int64_t fs_renew_next_check_s(int64_t now, const int64_t *at, int n);

/* How far back notBefore is set for a certificate of |lifetime_s|, against
 * peers whose clock is slightly behind: an hour, but none for lifetimes
 * under a day (the shortened lifetimes of tests), whose whole life would
 * otherwise be mostly in the past. */
int64_t fs_renew_backdate_s(int64_t lifetime_s);

/* notAfter of a new server certificate issued at |now| for |lifetime_s|
 * under a CA valid until |ca_not_after|: never beyond its CA. */
int64_t fs_renew_server_not_after(int64_t now, int64_t lifetime_s, int64_t ca_not_after);

#endif
