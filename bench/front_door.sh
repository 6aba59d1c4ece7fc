#!/usr/bin/env bash
# Benchmark of the router's own overhead on the cheapest request, `GET /v2/`, next to nginx answering
# the same bytes from a `return` directive, in one run on this machine. Prints both and their ratio;
# absolute numbers mean little on a shared 2-core box, the ratio is the figure to compare.
#
#   bench/front_door.sh [DURATION] [CONNECTIONS]      defaults: 10s, 64
#
# Both servers get one worker (one core); wrk gets one thread (the other core). Runs on demand only:
# it is not part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

duration=${1:-10s}
conns=${2:-64}
hr_rust
hr_apt nginx-light wrk curl
hr_log "release build"
cargo build --release --locked -q -p harbor-router

hr_work


# nginx: one worker, keep-alive, the same body and headers as the router's /v2/.
nginx_port=$(hr_free_port)
cat >"$work/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$nginx_port reuseport;
    location = /v2/ {
      default_type "application/json; charset=utf-8";
      add_header Docker-Distribution-API-Version registry/2.0;
      return 200 '{}';
    }
  }
}
NGINX
nginx -c "$work/nginx.conf" -p "$work" &
pids+=($!)

router_port=$(hr_free_port)
WORKERS=1 LISTEN_ADDR=127.0.0.1:$router_port METRICS_ADDR=127.0.0.1:0 LOG_LEVEL=warn MAX_CONNECTIONS_PER_CLIENT=0 \
  HARBOR_URL=http://127.0.0.1:9 target/release/harbor-router >"$work/router.log" 2>&1 &
pids+=($!)

hr_wait_port 127.0.0.1 "$nginx_port" 10 || { cat "$work/nginx-error.log"; exit 1; }
hr_wait_port 127.0.0.1 "$router_port" 10 || { cat "$work/router.log"; exit 1; }
curl -fsS "http://127.0.0.1:$router_port/v2/" >/dev/null
curl -fsS "http://127.0.0.1:$nginx_port/v2/" >/dev/null

run() { # NAME PORT -> prints "NAME RPS P50 P99"
  wrk -t1 -c"$conns" -d"$duration" --latency "http://127.0.0.1:$2/v2/" >"$work/$1.txt"
  local rps p50 p99
  rps=$(awk '/^Requests\/sec/ {print $2}' "$work/$1.txt")
  p50=$(awk '$1 == "50%" {print $2}' "$work/$1.txt")
  p99=$(awk '$1 == "99%" {print $2}' "$work/$1.txt")
  echo "$1 $rps $p50 $p99"
}

hr_log "warm-up"
wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$router_port/v2/" >/dev/null
wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$nginx_port/v2/" >/dev/null
hr_log "measuring GET /v2/, $conns connections, $duration each, alternating"
r1=$(run router "$router_port"); n1=$(run nginx "$nginx_port")
r2=$(run router "$router_port"); n2=$(run nginx "$nginx_port")

printf '\n%-8s %12s %10s %10s\n' server req/s p50 p99
printf '%-8s %12s %10s %10s\n' $r1 $n1 $r2 $n2
awk -v a="$(echo "$r1" | cut -d' ' -f2)" -v b="$(echo "$r2" | cut -d' ' -f2)" \
    -v c="$(echo "$n1" | cut -d' ' -f2)" -v d="$(echo "$n2" | cut -d' ' -f2)" \
    'BEGIN { printf "\nrouter/nginx throughput ratio: %.2f (best of two each: %.2f)\n", (a+b)/(c+d), (a>b?a:b)/(c>d?c:d) }'
