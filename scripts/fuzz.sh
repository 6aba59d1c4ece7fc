#!/usr/bin/env bash
# Fuzzes every hand-written parser of the router for a bounded time, on demand (never part of
# scripts/test.sh): the route parser, discovery's Link headers, WWW-Authenticate challenges,
# configuration values, tag-list bodies, X-Forwarded-For and the query strings that go up. The
# target bodies live in src/fuzz_targets.rs; fuzz/ holds the cargo-fuzz crate.
#
#   scripts/fuzz.sh [SECONDS] [TARGET…]     defaults: 60 s each, every target
#
# Runs on stable Rust (cargo-fuzz with --sanitizer none: libFuzzer's coverage, no ASan; the
# router has no unsafe parsing code). Each corpus starts from fuzz/regressions/<target>/. A crash
# leaves its input in fuzz/artifacts/<target>/: fix the bug, then copy the input into
# fuzz/regressions/<target>/, where tests/fuzz_regressions.rs replays it on every test run.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

secs=${1:-60}
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^harbor-router-fuzz$')
fi

hr_rust
hr_apt g++ # libFuzzer is C++
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

cd fuzz
failed=()
for t in "${targets[@]}"; do
  hr_log "fuzzing $t for ${secs}s"
  mkdir -p "corpus/$t"
  cp -n "regressions/$t"/* "corpus/$t/" 2>/dev/null || true
  if ! cargo fuzz run --sanitizer none -O "$t" "corpus/$t" -- \
      -max_total_time="$secs" -max_len=4096 -print_final_stats=1 2>&1 | tail -n 12; then
    failed+=("$t")
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz.sh: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
hr_log "no crash in ${targets[*]}"
