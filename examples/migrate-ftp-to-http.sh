#!/usr/bin/env bash
# "Migrate a store from FTP to HTTP", scripted end to end on this machine.
#
# Before: the back office uploads price lists to its FTP server as POS{n}.spr.$k and collects
# reports from POS{n}.rep.$k; the tills talk to the FTP server themselves.
# After: the back office changes nothing. kkm-bridge takes the price lists from the same FTP
# server and serves them to the tills over HTTP (KKMTransfer); the tills' reports come back
# over HTTP and land on the FTP server as POS{n}.rep.$k, where the back office finds them.
#
# This script plays all three parties against a real FTP server:
#   the back office (curl uploads a price list the FTP way: temp name, then rename),
#   the bridge    (kkm-bridge run, config like examples/ftp-to-http.toml),
#   till 1        (examples/till-sim.rs, which speaks KKMTransfer as «Кассир 5» does).
#
# Usage: examples/migrate-ftp-to-http.sh            (as root: starts vsftpd via scripts/ftp-server)
#        KKM_TEST_FTP_URL=ftp://user:pass@host:port/dir examples/migrate-ftp-to-http.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
fixtures="$repo/../shared/fixtures"
url="${KKM_TEST_FTP_URL:-$("$repo/scripts/ftp-server" start)}"
port="${KKM_MIGRATE_HTTP_PORT:-18080}"

# ftp://user:pass@host:port/dir
rest="${url#ftp://}"
cred="${rest%%@*}"; rest="${rest#*@}"
user="${cred%%:*}"; pass="${cred#*:}"
hostport="${rest%%/*}"; dir="${rest#*/}"
sub="migrate-$$"
ftp="ftp://$hostport/$dir/$sub"

work="$(mktemp -d)"
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  curl -s -u "$user:$pass" "ftp://$hostport/$dir/" -Q "-RMD $sub" -o /dev/null 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== building kkm-bridge and the till simulator"
cargo build --quiet --manifest-path "$repo/Cargo.toml" --bin kkm-bridge --example till-sim
bin="$repo/target/debug"

echo "== the back office uploads a price list for till 1 to $ftp, as it always did"
curl -sS -u "$user:$pass" --ftp-create-dirs -T "$fixtures/POS1.spr.cp1251" "$ftp/.upload.tmp" \
  -Q '-RNFR .upload.tmp' -Q '-RNTO POS1.spr.$1'

echo "== the bridge: the same FTP server as the office side, HTTP for the tills"
cat > "$work/migrate.toml" <<EOF
state_dir = "$work/state"
[endpoint.officeftp]
type = "ftp"
url = "ftp://$user@$hostport/$dir/$sub"
password_env = "KKM_FTP_PASSWORD"
poll = "300ms"
[endpoint.tills]
type = "http"
listen = "127.0.0.1:$port"
[[endpoint.tills.user]]
login = "kassa"
password_env = "KKM_TILL_PASSWORD"
pos = "1-20"
[[link]]
office = "officeftp"
kassa = "tills"
pos = "1-20"
EOF
export KKM_FTP_PASSWORD="$pass" KKM_TILL_PASSWORD="till-secret"
"$bin/kkm-bridge" run --config "$work/migrate.toml" 2> "$work/bridge.log" &
pid=$!

echo "== till 1, switched to HTTP, asks for its packages"
till() {
  "$bin/examples/till-sim" --url "http://127.0.0.1:$port/hs/KKMTransfer" --pos 1 \
    --login kassa --password till-secret --out "$work/till1" "$@"
}
for _ in $(seq 100); do
  till >/dev/null 2>&1 || true
  [ -e "$work/till1/POS1.spr.1" ] && break
  sleep 0.2
done
cmp "$fixtures/POS1.spr.cp1251" "$work/till1/POS1.spr.1"
echo "   till 1 got package 1: the price list, byte for byte"
[ -z "$(curl -s -u "$user:$pass" -l "$ftp/" | grep -F 'POS1.spr')" ]
echo "   and the bridge took it off the FTP server (DELE after it was stored)"

echo "== till 1 sends a report over HTTP"
till --report "$fixtures/POS1.rep.cp1251"
for _ in $(seq 100); do
  curl -s -u "$user:$pass" -l "$ftp/" | grep -qxF 'POS1.rep.$1' && break
  sleep 0.2
done
curl -sS -u "$user:$pass" "$ftp/POS1.rep.\$1" -o "$work/got.rep"
curl -sS -u "$user:$pass" "$ftp/" -Q '-DELE POS1.rep.$1' -o /dev/null
cmp "$fixtures/POS1.rep.cp1251" "$work/got.rep"
echo "   the back office finds it on its FTP server as POS1.rep.\$1, byte for byte"

kill -TERM "$pid"
wait "$pid"
pid=""
echo "migrate-ftp-to-http: ok"
