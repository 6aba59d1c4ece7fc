#!/usr/bin/env bash
# Runs harbor-router locally on a free loopback port and shows it answering, then stays up until
# Ctrl-C, stopping everything it started.
#
# Today the router's front door is complete (registry base endpoint, health, validation, drain);
# Harbor discovery and the pull path are being built (see the issues), so with no Harbor behind it the
# health endpoints answer 503 and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

hr_rust
hr_apt curl
hr_log "building (release)"
cargo build --release --locked -q

work=$(mktemp -d)
router_pid=""
cleanup() {
  [ -n "$router_pid" ] && kill "$router_pid" 2>/dev/null && wait "$router_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

HARBOR_URL=${HARBOR_URL:-http://127.0.0.1:9} LISTEN_ADDR=127.0.0.1:0 METRICS_ADDR=127.0.0.1:0 \
  LOG_FORMAT=json WORKERS=${WORKERS:-2} target/release/harbor-router >"$work/router.log" 2>&1 &
router_pid=$!

addr=""
for _ in $(seq 1 100); do
  addr=$(sed -n 's/.*"message":"listening","addr":"\([^"]*\)".*/\1/p' "$work/router.log" | head -n1)
  [ -n "$addr" ] && break
  kill -0 "$router_pid" 2>/dev/null || { cat "$work/router.log"; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "the router did not start:"; cat "$work/router.log"; exit 1; }

hr_log "harbor-router listening on $addr (pid $router_pid)"
echo
echo "\$ curl -si http://$addr/v2/"
curl -si "http://$addr/v2/"; echo; echo
echo "\$ curl -si http://$addr/healthz"
curl -si "http://$addr/healthz"; echo; echo
echo "\$ curl -si http://$addr/v2/proxy/../etc/manifests/latest"
curl -si --path-as-is "http://$addr/v2/proxy/../etc/manifests/latest"; echo; echo
cat <<TXT
Try it yourself:
  curl -si http://$addr/v2/
  curl -si http://$addr/readyz
  curl -si -X PUT http://$addr/v2/proxy/nginx/manifests/latest

Logs: $work/router.log  (tail -f it in another terminal)
Press Ctrl-C to stop.
TXT
wait "$router_pid"
