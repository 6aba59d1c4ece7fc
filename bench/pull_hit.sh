#!/usr/bin/env bash
# Benchmark of the router's overhead on a cache hit of the pull path, next to nginx serving the same
# bytes, in one run on this machine. Prints a table and ratios; absolute numbers mean little on a
# shared, noisy 2-core box, the ratios are the figures to compare.
#
#   bench/pull_hit.sh [DURATION] [CONNECTIONS] [BLOB_CONNECTIONS]     defaults: 10s, 64, 16
#
# A fake Harbor made of nginx (one worker, static files, no auth) serves the projects API, one
# registry, one ~500-byte OCI manifest (by tag and by digest) and one 1 MiB blob. The router (one
# worker) discovers the one proxy-cache project `hub` and is warmed with one pull, so every measured
# request is a hit of the routing cache. wrk (one thread) then measures, alternating, two rounds each:
#
#   nginx-tag      wrk -> nginx   /v2/hub/library/app/manifests/v1            (the reference)
#   router-tag     wrk -> router  /v2/proxy/library/app/manifests/v1  -> nginx (one upstream request
#                  per client request, through the router's keep-alive pool)
#   router-digest  wrk -> router  /v2/proxy/library/app/manifests/sha256:…    (answered from the
#                  router's memory: no upstream request)
#   nginx-blob     wrk -> nginx   /v2/hub/library/app/blobs/sha256:…          (1 MiB bodies)
#   router-blob    wrk -> router  /v2/proxy/library/app/blobs/sha256:…  -> nginx (streamed)
#
# How to read the ratios:
# - router-tag/nginx: in this case the router, nginx *and* wrk share the 2 cores, and every client
#   request costs nginx a request too, so the ratio understates what a router in front of a remote
#   Harbor costs: there, Harbor's own time (tens of ms for a proxy-cache manifest) dwarfs the router's,
#   and the router has its core to itself. It is a worst case for the proxying path, not a forecast.
# - router-digest/nginx: no upstream request at all; it shows the router's own ceiling on a manifest
#   (request parsing, routing, cache lookup, response), against nginx serving a static file.
# - router-blob/nginx-blob: the cost of streaming 1 MiB through the router: it reads every byte from
#   nginx and writes it to wrk (two more copies through the kernel), on the cores nginx and wrk use.
#   nginx runs with sendfile off: on loopback, sendfile made it about half as fast to wrk.
# - the added p50 of the tag path is measured under a closed loop of CONNECTIONS connections, so it is
#   mostly queueing (p50 ~ connections / throughput), not the service time of one request.
# The `up/req` column counts nginx's requests (stub_status) per wrk request: 1 for nginx and the
# proxied cases, ~0 when the router answers from memory. It proves which path was measured. The
# `cpu us/req` columns are the CPU time (user + system, from /proc) each server spent per request
# during the run: less noisy than req/s on a shared machine, and they say where the time went.
#
# Runs on demand only: it is not part of scripts/test.sh. Needs no Docker; loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

duration=${1:-10s}
conns=${2:-64}
blob_conns=${3:-16}
accept='Accept: application/vnd.oci.image.manifest.v1+json'

hr_rust
hr_apt nginx-light wrk curl python3
hr_log "release build"
cargo build --release --locked -q -p harbor-router

hr_work

die() { echo "pull_hit.sh: $*" >&2; exit 1; }

# The content: a 1 MiB random blob, a config, and an OCI manifest naming both (~500 bytes).
www=$work/www
mkdir -p "$www"
chmod 755 "$work" "$www" # nginx's worker runs as nobody when started by root
read -r manifest_digest blob_digest < <(python3 - "$www" <<'PY'
import hashlib, json, os, sys
www = sys.argv[1]
def put(name, data):
    with open(os.path.join(www, name), "wb") as f:
        f.write(data)
    return "sha256:" + hashlib.sha256(data).hexdigest()
blob = os.urandom(1 << 20)
config = json.dumps({"architecture": "amd64", "os": "linux",
                     "rootfs": {"type": "layers", "diff_ids": []}}, separators=(",", ":")).encode()
manifest = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": put("config", config), "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": put("blob", blob), "size": len(blob)}],
    "annotations": {"org.opencontainers.image.title": "harbor-router bench",
                    "org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
}, separators=(",", ":")).encode()
print(put("manifest", manifest), "sha256:" + hashlib.sha256(blob).hexdigest())
PY
)
[ -n "$blob_digest" ] || die "could not generate the content"
printf '[{"project_id":1,"name":"hub","registry_id":1,"metadata":{"public":"true"}}]' >"$www/projects.json"
printf '{"id":1,"name":"up","type":"docker-registry","url":"https://example.invalid"}' >"$www/registry.json"

# nginx: the fake Harbor, one worker, keep-alive, static files, no auth.
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
  sendfile off; # on loopback, sendfile halves nginx's blob throughput to wrk (measured): keep the reference at its best
  types { }
  server {
    listen 127.0.0.1:$nginx_port reuseport;
    location = /api/v2.0/projects {
      default_type application/json;
      add_header X-Total-Count 1;
      alias $www/projects.json;
    }
    location = /api/v2.0/registries/1 {
      default_type application/json;
      alias $www/registry.json;
    }
    location = /v2/hub/library/app/manifests/v1 {
      default_type application/vnd.oci.image.manifest.v1+json;
      add_header Docker-Content-Digest $manifest_digest;
      alias $www/manifest;
    }
    location = /v2/hub/library/app/manifests/$manifest_digest {
      default_type application/vnd.oci.image.manifest.v1+json;
      add_header Docker-Content-Digest $manifest_digest;
      alias $www/manifest;
    }
    location = /v2/hub/library/app/blobs/$blob_digest {
      default_type application/octet-stream;
      add_header Docker-Content-Digest $blob_digest;
      alias $www/blob;
    }
    location = /nginx_status { stub_status; }
  }
}
NGINX
nginx -c "$work/nginx.conf" -p "$work" >"$work/nginx.out" 2>&1 &
pids+=($!)
nginx_master=$!
hr_wait_port 127.0.0.1 "$nginx_port" 10 || { cat "$work/nginx.out" "$work/nginx-error.log" >&2; die "nginx did not start"; }
nginx_worker=$(pgrep -P "$nginx_master" | head -n1)
[ -n "$nginx_worker" ] || die "no nginx worker process"

router_port=$(hr_free_port)
# ROUTER_ENV adds variables to the router's environment, e.g. ROUTER_ENV="IO_DRIVER=epoll"; for the
# access log's cost, ROUTER_ENV="LOG_LEVEL=info LOG_FORMAT=json ACCESS_LOG=all" (access lines are
# written at info; the log goes to a file in the run's temporary directory).
# COALESCE_LINGER=0: the proxied tag goes upstream every time, as with nginx's proxy_pass.
env WORKERS=1 LISTEN_ADDR=127.0.0.1:$router_port METRICS_ADDR=127.0.0.1:0 LOG_LEVEL=warn MAX_CONNECTIONS_PER_CLIENT=0 COALESCE_LINGER=0 \
  HARBOR_URL=http://127.0.0.1:$nginx_port ${ROUTER_ENV:-} target/release/harbor-router >"$work/router.log" 2>&1 &
pids+=($!)
router_pid=$!

nginx=http://127.0.0.1:$nginx_port
router=http://127.0.0.1:$router_port
tag_path=library/app/manifests/v1
digest_path=library/app/manifests/$manifest_digest
blob_path=library/app/blobs/$blob_digest

hr_log "waiting for the router to discover the project (/readyz)"
deadline=$((SECONDS + 30))
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$router/readyz" 2>/dev/null)" = 200 ]; do
  kill -0 "$router_pid" 2>/dev/null || { cat "$work/router.log" >&2; die "the router exited"; }
  [ "$SECONDS" -ge "$deadline" ] && { cat "$work/router.log" >&2; die "the router is not ready after 30 s"; }
  sleep 0.1
done

# fetch URL OUT: GET with the manifest Accept line; body to OUT, headers to OUT.h; prints the status.
fetch() { curl -sS -H "$accept" -o "$2" -D "$2.h" -w '%{http_code}' "$1"; }
digest_of() { tr -d '\r' <"$1.h" | awk -F': ' 'tolower($1) == "docker-content-digest" {print $2}'; }

hr_log "warming the mapping with one pull of the tag"
status=$(fetch "$router/v2/proxy/$tag_path" "$work/warm")
[ "$status" = 200 ] || { cat "$work/warm" "$work/router.log" >&2; die "warm-up pull answered $status, not 200"; }
[ "$(digest_of "$work/warm")" = "$manifest_digest" ] ||
  die "warm-up pull: Docker-Content-Digest '$(digest_of "$work/warm")', expected $manifest_digest"

hr_log "checking the router answers what nginx answers"
same() { # NAME ROUTER-PATH NGINX-PATH EXPECTED-DIGEST
  local r n
  r=$(fetch "$router/v2/proxy/$2" "$work/r-$1"); n=$(fetch "$nginx/v2/hub/$3" "$work/n-$1")
  [ "$r" = 200 ] && [ "$n" = 200 ] || die "$1: router answered $r, nginx $n"
  cmp -s "$work/r-$1" "$work/n-$1" || die "$1: the router's body differs from nginx's"
  [ "$(digest_of "$work/r-$1")" = "$4" ] && [ "$(digest_of "$work/n-$1")" = "$4" ] ||
    die "$1: Docker-Content-Digest router '$(digest_of "$work/r-$1")', nginx '$(digest_of "$work/n-$1")', expected $4"
  echo "  $1: same bytes ($(wc -c <"$work/r-$1") B) and digest"
}
same tag "$tag_path" "$tag_path" "$manifest_digest"
same digest "$digest_path" "$digest_path" "$manifest_digest" # fills the router's manifest cache
same digest-cached "$digest_path" "$digest_path" "$manifest_digest"
same blob "$blob_path" "$blob_path" "$blob_digest"

nginx_requests() { curl -fsS "$nginx/nginx_status" | awk 'NR == 3 {print $3}'; }
before=$(nginx_requests)
for _ in $(seq 20); do fetch "$router/v2/proxy/$digest_path" "$work/probe" >/dev/null; done
after=$(nginx_requests)
[ $((after - before)) -le 3 ] ||
  die "20 pulls by digest cost nginx $((after - before)) requests: the router is not answering them from memory"
echo "  digest: 20 pulls cost nginx $((after - before - 1)) requests (answered from the router's memory)"

tick_us=$((1000000 / $(getconf CLK_TCK)))

# run NAME URL CONNS: one wrk run; prints
# "NAME RPS P50_US P99_US UPSTREAM_PER_REQUEST ROUTER_CPU_US_PER_REQ NGINX_CPU_US_PER_REQ".
run() {
  local out=$work/$1.txt b a rb ra nb na
  b=$(nginx_requests); rb=$(hr_cpu_ticks "$router_pid"); nb=$(hr_cpu_ticks "$nginx_worker")
  wrk -t1 -c"$3" -d"$duration" --latency -H "$accept" "$2" >"$out"
  ra=$(hr_cpu_ticks "$router_pid"); na=$(hr_cpu_ticks "$nginx_worker")
  a=$(nginx_requests)
  if grep -q 'Non-2xx' "$out"; then cat "$out" >&2; die "$1: wrk saw non-2xx answers"; fi
  grep -q 'Socket errors' "$out" && { echo "  $1: $(grep 'Socket errors' "$out")" >&2; }
  awk -v name="$1" -v up=$((a - b - 1)) -v rcpu=$(((ra - rb) * tick_us)) -v ncpu=$(((na - nb) * tick_us)) '
    function us(v) {
      if (v ~ /us$/) return v + 0
      if (v ~ /ms$/) return v * 1000
      if (v ~ /m$/) return v * 60e6
      return v * 1e6 # "s"
    }
    $2 == "requests" && $3 == "in" { n = $1 }
    $1 == "50%" { p50 = us($2) }
    $1 == "99%" { p99 = us($2) }
    /^Requests\/sec/ { rps = $2 }
    END { n = (n > 0 ? n : 1); printf "%s %.0f %.0f %.0f %.2f %.1f %.1f\n", name, rps, p50, p99, up / n, rcpu / n, ncpu / n }' "$out"
}

hr_log "warm-up (2 s each)"
for u in "$nginx/v2/hub/$tag_path" "$router/v2/proxy/$tag_path" "$router/v2/proxy/$digest_path"; do
  wrk -t1 -c"$conns" -d2s -H "$accept" "$u" >/dev/null
done
for u in "$nginx/v2/hub/$blob_path" "$router/v2/proxy/$blob_path"; do
  wrk -t1 -c"$blob_conns" -d2s "$u" >/dev/null
done

hr_log "measuring: $duration per run, manifests with $conns connections, blobs with $blob_conns, two rounds"
results=()
for round in 1 2; do
  results+=("$round $(run nginx-tag "$nginx/v2/hub/$tag_path" "$conns")")
  results+=("$round $(run router-tag "$router/v2/proxy/$tag_path" "$conns")")
  results+=("$round $(run router-digest "$router/v2/proxy/$digest_path" "$conns")")
  results+=("$round $(run nginx-blob "$nginx/v2/hub/$blob_path" "$blob_conns")")
  results+=("$round $(run router-blob "$router/v2/proxy/$blob_path" "$blob_conns")")
done
kill -0 "$router_pid" 2>/dev/null || { cat "$work/router.log" >&2; die "the router died during the run"; }

printf '%s\n' "${results[@]}" | awk '
  BEGIN {
    printf "\n%-14s %5s %10s %8s %8s %7s %11s %11s\n", "", "", "", "", "", "", "router cpu", "nginx cpu"
    printf "%-14s %5s %10s %8s %8s %7s %11s %11s\n", "case", "round", "req/s", "p50 us", "p99 us", "up/req", "us/req", "us/req"
  }
  {
    printf "%-14s %5s %10d %8d %8d %7.2f %11.1f %11.1f\n", $2, $1, $3, $4, $5, $6, $7, $8
    rcpu[$2] += $7 / 2; ncpu[$2] += $8 / 2
    rps[$2] += $3 / 2; p50[$2] += $4 / 2
    if ($3 > best[$2]) best[$2] = $3
  }
  END {
    printf "\nthroughput ratios (mean of the two rounds; best of two in brackets):\n"
    printf "  router-tag    / nginx-tag   %5.2f  (%.2f)\n", rps["router-tag"] / rps["nginx-tag"], best["router-tag"] / best["nginx-tag"]
    printf "  router-digest / nginx-tag   %5.2f  (%.2f)\n", rps["router-digest"] / rps["nginx-tag"], best["router-digest"] / best["nginx-tag"]
    printf "  router-blob   / nginx-blob  %5.2f  (%.2f)\n", rps["router-blob"] / rps["nginx-blob"], best["router-blob"] / best["nginx-blob"]
    printf "added p50 latency of the tag path (router-tag p50 - nginx-tag p50, means): %+.0f us\n", p50["router-tag"] - p50["nginx-tag"]
    printf "router CPU per request (means): tag %.1f us, digest %.1f us, blob %.1f us; nginx per manifest %.1f us, per blob %.1f us\n",
      rcpu["router-tag"], rcpu["router-digest"], rcpu["router-blob"], ncpu["nginx-tag"], ncpu["nginx-blob"]
  }'
if [ -s "$work/router.log" ]; then
  # With ROUTER_ENV="LOG_LEVEL=info LOG_FORMAT=json ACCESS_LOG=all" (measuring the access log's cost)
  # the log holds millions of access lines: count them, show the rest.
  access=$(grep -c '"target":"access"' "$work/router.log" || true)
  [ "$access" -gt 0 ] && { echo; echo "router access lines written: $access"; }
  if grep -v '"target":"access"' "$work/router.log" | grep -q .; then
    echo; echo "router log (other lines):"; grep -v '"target":"access"' "$work/router.log" | head -50
  fi
fi
