#!/usr/bin/env bash
# A rollout through two router pods, with and without COALESCE_PULLS (see bench/rollout.py):
#
#   bench/rollout.sh [--nodes N] [--rounds R] [--spread S] [--latency-ms MS] [--mbps MBIT]
#                    [--linger D]                                               on a release build
#   bench/rollout.sh --smoke                                                    8 nodes, once, on the
#                                                                                debug build: proves
#                                                                                the script works
#
# Loopback only, free ports; needs the test bed's stand-in (built here), docker-registry and Redis
# (redis-server, redis-sentinel, redis-cli).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

smoke=""
for a in "$@"; do [ "$a" = "--smoke" ] && smoke=1; done
hr_apt python3 docker-registry redis-server redis-sentinel redis-tools
if [ -n "$smoke" ]; then
  profile=debug
  hr_rust
  cargo build --locked -q -p harbor-router -p testbed
else
  profile=release
  hr_rust
  hr_log "release build (router and test bed)"
  cargo build --release --locked -q -p harbor-router -p testbed
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 bench/rollout.py --binary "target/$profile/harbor-router" \
  --standin "target/$profile/harbor-standin" "$@"
