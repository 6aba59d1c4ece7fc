#!/usr/bin/env bash
# Readiness or completion: the same hyper server (examples/io_model.rs, one io_uring runtime, the
# router's `/v2/` answer) with its sockets driven by monoio's readiness layer (the router's way) and
# by io_uring read/write operations on owned buffers. Interleaved rounds of wrk against each, CPU
# time per request from /proc, and system calls per request from perf when it can count them.
#
#   bench/io_model.sh [ROUNDS] [DURATION] [CONNECTIONS]     defaults: 3, 6s, 64
#
# The servers run on CPU 0, wrk on CPU 1 (taskset). Runs on demand only.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

rounds=${1:-3}
duration=${2:-6s}
conns=${3:-64}
hr_rust
hr_apt wrk procps
hr_log "release build of examples/io_model.rs"
cargo build --release --locked -q --example io_model
hr_work

declare -A port pid
for mode in poll completion; do
  MODE=$mode taskset -c 0 target/release/examples/io_model >"$work/$mode.port" 2>"$work/$mode.log" &
  pid[$mode]=$!
  pids+=($!)
  port[$mode]=$(hr_wait_for "$work/$mode.port" '/^[0-9]\+$/p' "${pid[$mode]}")
done

hz=$(getconf CLK_TCK)
declare -A cpu_sum req_sum
printf '%-11s %6s %12s %14s\n' server round "req/s" "CPU µs/req"
for r in $(seq 1 "$rounds"); do
  for mode in poll completion; do
    before=$(hr_cpu_ticks "${pid[$mode]}")
    out=$(taskset -c 1 wrk -t1 -c"$conns" -d"$duration" "http://127.0.0.1:${port[$mode]}/v2/")
    after=$(hr_cpu_ticks "${pid[$mode]}")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    us=$(awk -v t=$((after - before)) -v n="$requests" -v hz="$hz" 'BEGIN {printf "%.2f", t * 1e6 / hz / n}')
    printf '%-11s %6s %12s %14s\n' "$mode" "$r" "$rps" "$us"
    cpu_sum[$mode]=$(( ${cpu_sum[$mode]:-0} + after - before ))
    req_sum[$mode]=$(( ${req_sum[$mode]:-0} + requests ))
  done
done
for mode in poll completion; do
  awk -v t="${cpu_sum[$mode]}" -v n="${req_sum[$mode]}" -v hz="$hz" -v m="$mode" \
    'BEGIN {printf "%-11s all rounds: %.2f µs of CPU per request\n", m, t * 1e6 / hz / n}'
done
if command -v perf >/dev/null && perf stat -e raw_syscalls:sys_enter -- true >/dev/null 2>&1; then
  for mode in poll completion; do
    perf stat -x, -e raw_syscalls:sys_enter -p "${pid[$mode]}" -o "$work/$mode.perf" -- sleep 4 &
    out=$(taskset -c 1 wrk -t1 -c"$conns" -d4s "http://127.0.0.1:${port[$mode]}/v2/")
    wait $!
    calls=$(awk -F, '/sys_enter/ {print $1}' "$work/$mode.perf")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    awk -v c="$calls" -v n="$requests" -v m="$mode" \
      'BEGIN {printf "%-11s %.2f system calls per request\n", m, c / n}'
  done
else
  hr_log "perf cannot count system calls here: skipped"
fi
