#!/usr/bin/env bash
# A soak under faults (testbed/src/bin/soak.rs; the fault table and the criteria are in
# docs/reliability.md): two router pods sharing Redis Sentinel in front of the stand-in Harbor and
# the real registry, a steady mixed workload from many loopback addresses through a small balancer,
# and faults on a schedule, each several times.
#
#   bench/soak.sh [--minutes M] [--clients N] [--rate R] [--latency-ms MS] [--out FILE.json]
#                                                   on a release build (default 30 minutes)
#   bench/soak.sh --smoke [--out FILE.json]          a minute and a half on the debug build: proves
#                                                   the harness works; judges no slope
#
# Its last line: `soak: <requests> requests, <unexpected> unexpected failures, rss slope <x>
# KiB/min, fd slope <y>/min, <faults> faults`; non-zero exit when an unexpected failure happened, a
# fault did not recover, or (not with --smoke) a slope passed its bound. `bench/plot FILE.json`
# charts a report.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

smoke=""
for a in "$@"; do [ "$a" = "--smoke" ] && smoke=1; done
hr_apt docker-registry redis-server redis-sentinel redis-tools
hr_rust
if [ -n "$smoke" ]; then
  profile=debug
  cargo build --locked -q -p harbor-router -p testbed
else
  profile=release
  hr_log "release build (router and test bed)"
  cargo build --release --locked -q -p harbor-router -p testbed
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec "target/$profile/soak" --router "target/$profile/harbor-router" "$@"
