#!/bin/sh
# health-check.sh: the OpenNebula READY_SCRIPT of the Flower appliances
# (SuperLink VM: `flower-sidecar link`; SuperNode VM: `flower-sidecar node`).
#
# Asks the sidecar's admin port, with flower-probe, whether the Fleet path is
# SERVING: the sidecar's listener accepts, its upstream HTTP/2 connection is up
# (the SuperLink itself on the SuperLink VM; the SuperLink's link sidecar, over
# TLS, on a SuperNode VM) and it is not shutting down.  Retries until SERVING or
# until READY_TIMEOUT seconds have passed; one line per attempt on stdout.
#
# Settings (environment; OpenNebula exports the context variables):
#   FL_SIDECAR_ADMIN     the sidecar's --admin address            127.0.0.1:9099
#   READY_TIMEOUT        seconds to keep trying; 0 = one attempt  300
#   READY_INTERVAL       seconds between attempts                 2
#   READY_PROBE_TIMEOUT  connect and RPC timeout per attempt, s   2
#   FLOWER_PROBE         the probe binary    flower-probe on PATH, else
#                        /usr/local/bin/flower-probe (where `make install` puts it)
#
# Exit status: 0 SERVING; 1 not SERVING within READY_TIMEOUT; 2 bad settings or
# no usable flower-probe (not retried).
#
# POSIX sh; needs only date, sleep and tr besides flower-probe.

me=health-check
service=flwr.proto.Fleet

admin=${FL_SIDECAR_ADMIN:-127.0.0.1:9099}
timeout=${READY_TIMEOUT:-300}
interval=${READY_INTERVAL:-2}
probe_timeout=${READY_PROBE_TIMEOUT:-2}

fail_config() {
    echo "$me: $*" >&2
    exit 2
}

# A non-negative integer.
is_int() {
    case $1 in '' | *[!0-9]*) return 1 ;; esac
    return 0
}

# A positive number of seconds: 2, 0.5, 1.25.
is_seconds() {
    case $1 in '' | *[!0-9.]* | .* | *. | *.*.*) return 1 ;; esac
    case $1 in *[1-9]*) return 0 ;; esac
    return 1
}

is_int "$timeout" || fail_config "invalid READY_TIMEOUT: '$timeout' (whole seconds, 0 or more)"
is_seconds "$interval" || fail_config "invalid READY_INTERVAL: '$interval' (seconds, more than 0)"
is_seconds "$probe_timeout" || fail_config "invalid READY_PROBE_TIMEOUT: '$probe_timeout' (seconds, more than 0)"
port=${admin##*:}
host=${admin%:*}
if [ "$host" = "$admin" ] || [ -z "$host" ] || ! is_int "$port" || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
    fail_config "invalid FL_SIDECAR_ADMIN: '$admin' (expected HOST:PORT)"
fi

if [ -n "${FLOWER_PROBE:-}" ]; then
    probe=$FLOWER_PROBE
elif probe=$(command -v flower-probe 2>/dev/null) && [ -n "$probe" ]; then
    :
else
    probe=/usr/local/bin/flower-probe
fi
if [ ! -f "$probe" ] || [ ! -x "$probe" ]; then
    fail_config "flower-probe not found or not executable: '$probe' (set FLOWER_PROBE or run make install)"
fi

start=$(date +%s)
attempt=0
while :; do
    attempt=$((attempt + 1))
    out=$("$probe" -addr "$admin" -service "$service" \
        -connect-timeout "${probe_timeout}s" -rpc-timeout "${probe_timeout}s" 2>&1)
    rc=$?
    elapsed=$(($(date +%s) - start))
    # the probe's message, on one line
    msg=$(printf '%s' "$out" | tr '\r\n' '  ')
    case $rc in
    0)
        echo "$me: attempt $attempt (${elapsed}s): $admin $service SERVING"
        exit 0
        ;;
    1) fail_config "flower-probe refused its arguments: $msg" ;;
    2) state="no connection to the sidecar's admin port" ;;
    3) state="health RPC failed" ;;
    4) state="NOT_SERVING" ;;
    *) state="flower-probe exit $rc" ;;
    esac
    echo "$me: attempt $attempt (${elapsed}s): $admin $service not ready: $state: $msg"
    # Whole seconds from date(1): "more than" makes sure READY_TIMEOUT really passed.
    if [ "$timeout" -eq 0 ] || [ "$elapsed" -gt "$timeout" ]; then
        echo "$me: $admin $service not SERVING after ${elapsed}s and $attempt attempts; giving up" >&2
        exit 1
    fi
    sleep "$interval"
done
