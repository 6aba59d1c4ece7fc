#!/usr/bin/env bash
# The benchmark suite (docs/benchmarks.md): every scenario next to its nginx reference, in one run,
# on loopback, interleaved rounds, medians; prints a table of figures against their targets and writes
# a JSON result (machine, versions, every round) under bench/results/.
#
#   bench/run.sh [--rounds N] [--duration S] [SCENARIO ...]   a full run on a release build
#   bench/run.sh --smoke [SCENARIO ...]                        each scenario once, briefly, on the
#                                                              debug binary the tests built: proves the
#                                                              scripts work; its figures mean nothing
#
# Scenarios: base tag tag-p99 digest blob blob-chunked slow-readers cold-fanout idle tls idle-tls
# workers io-driver (all by default). bench/plot turns result files into the charts of
# docs/benchmarks.md. ROUTER_ENV adds variables to every router of the run
# (ROUTER_ENV="COALESCE_PULLS=false").
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

smoke=""
for a in "$@"; do [ "$a" = "--smoke" ] && smoke=1; done

hr_apt nginx-light wrk python3 procps openssl
if [ -n "$smoke" ]; then
  binary=target/debug/harbor-router
  if [ ! -x "$binary" ]; then
    hr_rust
    cargo build --locked -q -p harbor-router
  fi
else
  hr_rust
  hr_log "release build"
  cargo build --release --locked -q -p harbor-router
  binary=target/release/harbor-router
fi
# The idle-clients scenario holds 10 000 connections: the client (this process tree) and the router
# need descriptors for them.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 bench/run.py --binary "$binary" "$@"
