/* Go-compatible parsing and printing of durations and booleans, so that
 * flower-probe accepts exactly the flag values grpc_health_probe (a Go
 * program using the standard "flag" package) accepts, and prints durations
 * the way Go's time.Duration.String() does ("1s", "500ms", "1m30s").
 */
#ifndef FLOWER_PROBE_GODUR_H
#define FLOWER_PROBE_GODUR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Longest string go_format_duration() produces, with its NUL. */
#define GO_DURATION_BUFSZ 40

/* time.ParseDuration: "300ms", "-1.5h", "2h45m", "1us"/"1µs", "0".
 * Returns 0 and stores nanoseconds in *out, or -1 and writes Go's error text
 * (e.g. `time: missing unit in duration "1"`) to err. */
int go_parse_duration(const char *s, int64_t *out, char *err, size_t errlen);

/* time.Duration.String(); buf must hold GO_DURATION_BUFSZ bytes.  Returns
 * buf. */
char *go_format_duration(int64_t ns, char *buf);

/* strconv.ParseBool: 1 t T TRUE true True 0 f F FALSE false False.
 * Returns 0 on success, -1 otherwise. */
int go_parse_bool(const char *s, bool *out);

#endif
