#!/usr/bin/env bash
# The one test command. On a fresh Debian machine it installs what the tests need (only what is
# missing), builds once, and runs: cargo fmt --check, clippy with warnings as errors, and every test
# of the workspace: unit, in-process, the integration tests that start the built binary on loopback
# port 0, and the test bed's (stand-in Harbor in front of the real docker-registry, skopeo, nginx).
#
#   scripts/test.sh            everything
#   scripts/test.sh -- NAME    cargo test filter passed through (e.g. -- shutdown)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

filter=()
if [ "${1:-}" = "--" ]; then shift; filter=("$@"); fi

start=$SECONDS
stage() { hr_log "$1 ($((SECONDS - start))s)"; }

stage "toolchain"
hr_rust
# docker-registry: the real CNCF registry behind the stand-in Harbor; skopeo: seeds images and pulls;
# nginx-light: the TLS front in the upstream tests; redis-server, redis-sentinel, redis-tools: the real
# Redis (master, replica, Sentinels) of the sharing tests; prometheus: promtool checks the metrics
# and the alert rules; containerd: node-style pulls (ctr) through the router as a registry mirror.
hr_apt ca-certificates docker-registry skopeo nginx-light redis-server redis-sentinel redis-tools prometheus containerd

stage "cargo fmt --check"
cargo fmt --all -- --check

stage "build (tests and binary, debug)"
cargo test --locked --workspace --all-targets --no-run

stage "cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings

stage "tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked --workspace --all-targets -- "${filter[@]}" 2>&1 | tee "$log"

stage "done"
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
