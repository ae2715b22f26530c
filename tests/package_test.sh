#!/bin/bash
# package_test.sh DIR: installs the .deb files `make deb` left in DIR with
# apt-get (as a user would), checks what they installed and that it runs,
# checks the unit with systemd-analyze (verify silent; security exposure
# 1.5 or lower for each role), then purges and checks that nothing is left
# but the state directory.  Root, on a machine you may change (CI).
set -euo pipefail
dir=${1:?usage: package_test.sh DIR}
max_exposure=1.5
fail() { echo "package-test: FAIL: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root (apt-get install)"
for p in flower-sidecar flower-probe; do
  ! dpkg -s "$p" >/dev/null 2>&1 || fail "$p is installed already: purge it first"
done

debs=("$dir"/flower-sidecar_*.deb "$dir"/flower-probe_*.deb)
echo "== apt-get install ${debs[*]}"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${debs[@]/#/./}" >/dev/null 2>&1 ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null

echo "== dpkg -L"
expect_sidecar=(/usr/sbin/flower-sidecar /lib/systemd/system/flower-sidecar@.service /etc/default/flower-sidecar
  /etc/one-context.d/net-99-flower-sidecar /usr/lib/flower-sidecar/one-context-hook
  /usr/lib/flower-sidecar/health-check.sh /usr/share/man/man8/flower-sidecar.8.gz
  /usr/share/doc/flower-sidecar/examples/flower-superlink.service)
expect_probe=(/usr/bin/flower-probe /usr/share/man/man1/flower-probe.1.gz)
# Outputs are captured first: with pipefail, `cmd | grep -q` fails when grep
# stops reading early and cmd gets SIGPIPE.
files_sidecar=$(dpkg -L flower-sidecar)
files_probe=$(dpkg -L flower-probe)
for f in "${expect_sidecar[@]}"; do grep -qx "$f" <<<"$files_sidecar" || fail "flower-sidecar lacks $f"; done
for f in "${expect_probe[@]}"; do grep -qx "$f" <<<"$files_probe" || fail "flower-probe lacks $f"; done
grep -q grpc <<<"$files_sidecar" && fail "flower-sidecar ships a gRPC file"
grep -q '^Depends:.*grpc' <<<"$(dpkg -s flower-sidecar)" && fail "flower-sidecar depends on gRPC (only flower-probe may)"
for b in /usr/sbin/flower-sidecar /usr/bin/flower-probe; do
  ! grep -q '\.debug_info' <<<"$(readelf -S "$b")" || fail "$b is not stripped"
  grep -q 'Build ID' <<<"$(readelf -n "$b")" || fail "$b has no build id (its -dbgsym package needs it)"
done
for f in "${expect_sidecar[@]}" "${expect_probe[@]}"; do [ -e "$f" ] || fail "$f missing on disk"; done

echo "== the installed binaries run"
v=$(/usr/sbin/flower-sidecar --version)
[ "$v" = "flower-sidecar $(dpkg-query -W -f='${Version}' flower-sidecar)" ] || fail "--version says '$v'"
help=$(/usr/sbin/flower-sidecar --help) # not piped into grep -q: pipefail would see SIGPIPE
grep -q -- --tls-require-client-cert <<<"$help" || fail "--help"
rc=0; /usr/bin/flower-probe -addr 127.0.0.1:1 -connect-timeout 1s >/dev/null 2>&1 || rc=$?
[ "$rc" = 2 ] || fail "flower-probe against a closed port exited $rc, expected 2"
rc=0; /usr/sbin/flower-sidecar node >/dev/null 2>&1 || rc=$?
[ "$rc" = 2 ] || fail "flower-sidecar node without an upstream exited $rc, expected 2"
grep -q "^\.TH FLOWER-SIDECAR 8 .*flower-sidecar $(dpkg-query -W -f='${Version}' flower-sidecar)" \
  <<<"$(zcat /usr/share/man/man8/flower-sidecar.8.gz)" || fail "flower-sidecar.8 does not carry the package version"
grep -q '^\.TH FLOWER-PROBE 1' <<<"$(zcat /usr/share/man/man1/flower-probe.1.gz)" || fail "flower-probe.1"

echo "== systemd-analyze"
for role in link node; do
  out=$(systemd-analyze verify "flower-sidecar@$role.service" 2>&1) || fail "verify $role: $out"
  [ -z "$out" ] || fail "systemd-analyze verify flower-sidecar@$role.service printed: $out"
  score=$(systemd-analyze security --offline=yes --no-pager "flower-sidecar@$role.service" 2>&1 |
    sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
  [ -n "$score" ] || fail "no exposure level for flower-sidecar@$role.service"
  echo "flower-sidecar@$role.service exposure $score (at most $max_exposure)"
  awk -v s="$score" -v m="$max_exposure" 'BEGIN { exit !(s <= m) }' || fail "exposure $score above $max_exposure"
done

echo "== the installed contextualization hook writes its files"
tmp=$(mktemp -d)
printf 'export FL_SIDECAR_ROLE="link"\nexport FL_TLS_ENABLED="YES"\n' >"$tmp/one_env"
ONE_ENV=$tmp/one_env SYSTEMD=no /usr/lib/flower-sidecar/one-context-hook
[ "$(stat -c %a /etc/flower-sidecar/context.env)" = 600 ] || fail "context.env is not mode 0600"
rm -rf "$tmp"

echo "== apt-get purge"
mkdir -p /var/lib/flower-sidecar/tls && echo state >/var/lib/flower-sidecar/tls/ca.pem # as a unit run leaves it
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq flower-sidecar flower-probe >/dev/null
for f in "${expect_sidecar[@]}" "${expect_probe[@]}" /etc/flower-sidecar /usr/lib/flower-sidecar \
  /usr/share/doc/flower-sidecar; do
  [ ! -e "$f" ] || fail "$f left after purge"
done
[ -e /var/lib/flower-sidecar/tls/ca.pem ] || fail "purge removed the state directory (the CA)"
rm -rf /var/lib/flower-sidecar
echo "package-test: OK"
