#!/bin/bash
# `make test`: runs `make STAGE` for each stage named, in order, saying what
# runs; prints the time each took and the total at the end.  Stops at the
# first stage that fails (and still prints the times so far).
#
#     tests/stages.sh format-check all unit unit-asan fuzz-corpus integration
#
# Builds use every core (make -j); MAKE may name the make to run.
set -u
MAKE=${MAKE:-make}
jobs=$(nproc 2>/dev/null || echo 2)
now() { date +%s.%N; }
fmt() { awk -v s="$1" 'BEGIN { m = int(s / 60); printf "%dm%04.1fs", m, s - 60 * m }'; }

t0=$(now)
summary=""
rc=0
for stage in "$@"; do
  echo "==> make $stage ($(date -u +%H:%M:%S) UTC)"
  t=$(now)
  $MAKE --no-print-directory -j"$jobs" "$stage"
  rc=$?
  took=$(awk -v a="$t" -v b="$(now)" 'BEGIN { print b - a }')
  summary="$summary$(printf '  %-14s %9s%s' "$stage" "$(fmt "$took")" "$([ $rc = 0 ] || echo "  FAILED (exit $rc)")")
"
  [ $rc = 0 ] || break
done
total=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { print b - a }')
echo
echo "make test: time per stage"
printf '%s' "$summary"
printf '  %-14s %9s\n' total "$(fmt "$total")"
exit $rc
