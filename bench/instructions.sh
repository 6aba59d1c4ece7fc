#!/usr/bin/env bash
# User-space instructions per request (callgrind) for `/v2/`, a proxied tag hit and a manifest by
# digest: the router at each commit given and at the working tree, next to nginx doing the same
# (bench/instructions.py). Counts, not times: they repeat where times on a shared machine do not.
#
#   bench/instructions.sh [--ref COMMIT ...] [--seconds S] [--driver epoll|io_uring] [--out FILE]
#                                     default ref: 1e89866 (the hit path before the second wave)
#
# Each commit is built once (release) in a worktree under target/bench-refs/, kept for the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

refs=()
pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ref) refs+=("$2"); shift 2 ;;
    *) pass+=("$1"); shift ;;
  esac
done
[ ${#refs[@]} -gt 0 ] || refs=(1e89866)

hr_apt nginx-light wrk python3 procps valgrind
hr_rust
binaries=()
for ref in "${refs[@]}"; do
  sha=$(git rev-parse --short "$ref^{commit}")
  tree="target/bench-refs/$sha"
  if [ ! -x "$tree/target/release/harbor-router" ]; then
    hr_log "release build of $sha"
    [ -d "$tree" ] || git worktree add --detach -f "$tree" "$sha" >/dev/null
    (cd "$tree" && cargo build --release --locked -q -p harbor-router)
  fi
  binaries+=(--binary "$sha=$tree/target/release/harbor-router")
done
hr_log "release build of the working tree"
cargo build --release --locked -q -p harbor-router
binaries+=(--binary "now=target/release/harbor-router")
exec python3 bench/instructions.py "${binaries[@]}" "${pass[@]}"
