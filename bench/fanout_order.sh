#!/usr/bin/env bash
# The latency cost of FANOUT_ORDER on a cold pull, measured against the same router without it, in
# one run on this machine.
#
#   bench/fanout_order.sh [ROUNDS] [REQUESTS]     defaults: 5 rounds of 300 sequential requests
#
# The test bed's stand-in Harbor (projects API, token service) in front of the real docker-registry
# (Debian package docker-registry), seeded with the default images, and two routers (one worker each):
#
#   A  FANOUT_ORDER unset: the fastest win is answered;
#   B  FANOUT_ORDER=dockerhub,quay,k8s,ghcr: the image's project, ghcr, ranked last (the worst case:
#      a win from ghcr is held until dockerhub, quay and k8s have all answered 404).
#
# Both run with CACHE_TTL=1us STALE_WHILE_REVALIDATE=0s NEGATIVE_CACHE_TTL=0s (and a fan-out budget
# no client reaches), so every pull of org/app:v1 (in ghcr only) is a cold fan-out over the four
# proxy-cache projects dockerhub, ghcr, quay and k8s. (Not CACHE_TTL=1ms: a pull takes 1-3 ms here,
# so the next one often arrived within 1 ms of the mapping being learned and about half the pulls
# were hits of the mapping, asking ghcr alone; the cache-lookup line at the end shows which.)
#
# A python client (one keep-alive connection, sequential requests, time.perf_counter) pulls the
# manifest by tag, interleaved A, B, A, B, … for ROUNDS rounds of REQUESTS requests each; prints
# p50/p90/p99 per round and their medians over the rounds, B − A, and each router's CPU time per
# request (from /proc: the sum over its threads of /proc/PID/task/*/schedstat, nanoseconds, and
# utime + stime of /proc/PID/stat, clock ticks, summed over all rounds because a tick is 10 ms). From
# each router's /metrics it prints what every pull cost upstream (projects asked, answers by status,
# connections opened, mapping lookups, each project's mean time to answer), proving each pull was a
# fan-out and showing why the latencies differ.
#
# Everything shares this machine's cores: the client, the routers, the stand-in and the registry. On
# loopback every project is the same docker-registry behind the same stand-in, so the projects'
# answer times differ little (here ghcr's 200 is even a little slower than the three 404s, so the
# win usually comes last anyway): B − A is the cost of waiting for the slowest of four similar
# answers instead of the one that has the image. Against real upstreams (a Docker Hub 404 can take
# far longer than a ghcr 200), B waits for the slowest better-ranked project, whatever that costs.
# A pays something B does not: the losers it stops waiting for are cancelled, and a cancelled
# request's pooled connection is closed (the "connections opened/pull" figure).
#
# Runs on demand only: it is not part of scripts/test.sh. Needs no Docker; loopback only, free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

rounds=${1:-5}
requests=${2:-300}
path=/v2/proxy/org/app/manifests/v1
accept='application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json'
order=dockerhub,quay,k8s,ghcr

hr_rust
hr_apt ca-certificates curl python3 docker-registry skopeo
hr_log "release build (router and test bed)"
cargo build --release --locked -q --bin harbor-router -p harbor-router
cargo build --release --locked -q -p testbed

hr_work

die() { echo "fanout_order.sh: $*" >&2; exit 1; }

hr_log "starting the stand-in Harbor and the registry, seeding images"
hr_standin target/release/harbor-standin
harbor_url=$(hr_standin_field 'v["harbor_url"]')
expected=$(hr_standin_field '[i["digest"] for i in v["images"] if i["repository"] == "ghcr/org/app" and i["tag"] == "v1"][0]')
[ -n "$expected" ] || die "the test bed seeded no ghcr/org/app:v1"

# start_router NAME [VAR=VALUE...]: starts a router with a clean environment; sets <NAME>_pid,
# <NAME>_addr and <NAME>_metrics.
start_router() {
  local name=$1 log=$work/router-$1.log line
  shift
  env -i PATH="$PATH" \
    HARBOR_URL="$harbor_url" HARBOR_USERNAME="$(hr_standin_field 'v["robot_user"]')" HARBOR_PASSWORD="$(hr_standin_field 'v["robot_password"]')" \
    WORKERS=1 LISTEN_ADDR=127.0.0.1:0 METRICS_ADDR=127.0.0.1:0 LOG_FORMAT=json \
    CACHE_TTL=1us STALE_WHILE_REVALIDATE=0s NEGATIVE_CACHE_TTL=0s FANOUT_BUDGET_PER_IP=1000000 MAX_CONNECTIONS_PER_CLIENT=0 \
    "$@" target/release/harbor-router >"$log" 2>&1 &
  pids+=($!)
  printf -v "${name}_pid" %s "$!"
  line=$(hr_wait_for "$log" '/"message":"listening"/p' "$!")
  printf -v "${name}_addr" %s "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["addr"])' "$line")"
  printf -v "${name}_metrics" %s "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["metrics_addr"])' "$line")"
}
hr_log "starting router A (fastest win) and router B (FANOUT_ORDER=$order)"
start_router A
start_router B FANOUT_ORDER=$order

for r in A B; do
  pid_var=${r}_pid addr_var=${r}_addr
  deadline=$((SECONDS + 30))
  until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://${!addr_var}/readyz" 2>/dev/null)" = 200 ]; do
    kill -0 "${!pid_var}" 2>/dev/null || { cat "$work/router-$r.log" >&2; die "router $r exited"; }
    [ "$SECONDS" -ge "$deadline" ] && { cat "$work/router-$r.log" >&2; die "router $r is not ready after 30 s"; }
    sleep 0.1
  done
done

hr_log "checking both routers answer org/app:v1 with the seeded digest"
for r in A B; do
  addr_var=${r}_addr
  status=$(curl -sS -H "Accept: $accept" -o "$work/$r.body" -D "$work/$r.h" -w '%{http_code}' "http://${!addr_var}$path")
  digest=$(tr -d '\r' <"$work/$r.h" | awk -F': ' 'tolower($1) == "docker-content-digest" {print $2}')
  [ "$status" = 200 ] || { cat "$work/$r.body" "$work/router-$r.log" >&2; die "router $r answered $status, not 200"; }
  [ "$digest" = "$expected" ] || die "router $r: Docker-Content-Digest '$digest', expected $expected"
  echo "  router $r: 200, $digest"
done
cmp -s "$work/A.body" "$work/B.body" || die "routers A and B answered different bodies"

# One round: REQUESTS sequential pulls on one keep-alive connection; prints one JSON object.
cat >"$work/round.py" <<'PY'
import glob, http.client, json, sys, time
addr, path, accept, n, pid, expected = sys.argv[1:7]
n, pid = int(n), int(pid)

def sched_ns():  # on-CPU time of every live thread, ns
    t = 0
    for f in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            t += int(open(f).read().split()[0])
        except (OSError, ValueError):
            pass
    return t

def ticks():  # utime + stime of the whole process (dead threads included), clock ticks
    s = open(f"/proc/{pid}/stat").read()
    f = s[s.rindex(")") + 2:].split()
    return int(f[11]) + int(f[12])

host, port = addr.rsplit(":", 1)
c = http.client.HTTPConnection(host, int(port), timeout=30)
hdrs = {"Accept": accept}

def pull():
    c.request("GET", path, headers=hdrs)
    r = c.getresponse()
    r.read()
    if r.status != 200 or r.getheader("Docker-Content-Digest") != expected:
        sys.exit(f"{addr}: {r.status} {r.getheader('Docker-Content-Digest')}")

pull()  # opens the connection; not timed
lat = []
s0, t0 = sched_ns(), ticks()
for _ in range(n):
    a = time.perf_counter()
    pull()
    lat.append(time.perf_counter() - a)
s1, t1 = sched_ns(), ticks()
c.close()
lat.sort()
q = lambda p: lat[min(n - 1, int(p * n))] * 1e6
print(json.dumps({"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "mean": sum(lat) / n * 1e6,
                  "cpu_us": (s1 - s0) / n / 1e3, "ticks": t1 - t0, "n": n}))
PY

# One scrape of /metrics as JSON: {"name{labels}": value}.
scrape() {
  curl -fsS "http://$1/metrics" | python3 -c '
import json, sys
m = {}
for line in sys.stdin:
    if line.startswith("#") or not line.strip():
        continue
    k, v = line.rsplit(" ", 1)
    m[k] = float(v)
print(json.dumps(m))'
}

round() { # NAME N
  local pid_var=${1}_pid addr_var=${1}_addr
  python3 "$work/round.py" "${!addr_var}" "$path" "$accept" "$2" "${!pid_var}" "$expected"
}

hr_log "warm-up (50 pulls each)"
round A 50 >/dev/null
round B 50 >/dev/null

scrape "$A_metrics" >"$work/A.before"
scrape "$B_metrics" >"$work/B.before"
hr_log "measuring: $rounds rounds of $requests sequential pulls each, interleaved A, B"
: >"$work/results"
for i in $(seq 1 "$rounds"); do
  for r in A B; do
    echo "$r $i $(round "$r" "$requests")" >>"$work/results"
  done
done
scrape "$A_metrics" >"$work/A.after"
scrape "$B_metrics" >"$work/B.after"
for r in A B; do
  pid_var=${r}_pid
  kill -0 "${!pid_var}" 2>/dev/null || { cat "$work/router-$r.log" >&2; die "router $r died during the run"; }
done

python3 - "$work" "$rounds" "$requests" "$(getconf CLK_TCK)" <<'PY'
import json, re, statistics as st, sys
work, rounds, requests, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows = {"A": [], "B": []}
for line in open(f"{work}/results"):
    r, i, js = line.split(" ", 2)
    rows[r].append((int(i), json.loads(js)))

print(f"\nper round (latency in us, cpu = router CPU per pull from schedstat, us)")
print(f"{'router':<8}{'round':>6}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}{'cpu':>8}")
for i in range(1, rounds + 1):
    for r in "AB":
        v = dict(rows[r])[i]
        print(f"{r:<8}{i:>6}{v['p50']:>9.0f}{v['p90']:>9.0f}{v['p99']:>9.0f}{v['mean']:>9.0f}{v['cpu_us']:>8.1f}")

med = {r: {k: st.median(v[k] for _, v in rows[r]) for k in ("p50", "p90", "p99", "mean", "cpu_us")} for r in "AB"}
tick_cpu = {r: sum(v["ticks"] for _, v in rows[r]) * 1e6 / hz / sum(v["n"] for _, v in rows[r]) for r in "AB"}
print(f"\nmedians over {rounds} rounds of {requests} pulls (us)")
print(f"{'':<22}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}{'cpu/pull':>11}{'cpu/pull':>12}")
print(f"{'':<22}{'':>9}{'':>9}{'':>9}{'':>9}{'schedstat':>11}{'/proc/stat':>12}")
names = {"A": "A fastest win", "B": "B FANOUT_ORDER"}
for r in "AB":
    m = med[r]
    print(f"{names[r]:<22}{m['p50']:>9.0f}{m['p90']:>9.0f}{m['p99']:>9.0f}{m['mean']:>9.0f}{m['cpu_us']:>11.1f}{tick_cpu[r]:>12.1f}")
d = {k: med["B"][k] - med["A"][k] for k in med["A"]}
print(f"{'B - A':<22}{d['p50']:>+9.0f}{d['p90']:>+9.0f}{d['p99']:>+9.0f}{d['mean']:>+9.0f}{d['cpu_us']:>+11.1f}{tick_cpu['B'] - tick_cpu['A']:>+12.1f}")
print(f"{'B / A':<22}" + "".join(f"{med['B'][k] / med['A'][k]:>9.2f}" for k in ("p50", "p90", "p99", "mean")) +
      f"{med['B']['cpu_us'] / med['A']['cpu_us']:>11.2f}{tick_cpu['B'] / tick_cpu['A']:>12.2f}")
# Per round B - A, so the spread of the difference shows too.
diffs = [dict(rows["B"])[i]["p50"] - dict(rows["A"])[i]["p50"] for i in range(1, rounds + 1)]
print("p50 B - A per round: " + ", ".join(f"{x:+.0f}" for x in diffs))

print(f"\nupstream cost per pull, from /metrics (measured rounds only: {rounds * requests} pulls per router, + {rounds} untimed)")
def load(p):
    return json.load(open(p))
def total(m, name, **labels):
    t = 0.0
    for k, v in m.items():
        base = k.split("{", 1)[0]
        if base != name:
            continue
        if all(f'{a}="{b}"' in k for a, b in labels.items()):
            t += v
    return t
for r in "AB":
    b, a = load(f"{work}/{r}.before"), load(f"{work}/{r}.after")
    delta = lambda name, **l: total(a, name, **l) - total(b, name, **l)
    pulls = rounds * (requests + 1)
    fan = delta("harbor_router_fanouts_total")
    found = delta("harbor_router_fanouts_total", outcome="found")
    wsum, wcount = delta("harbor_router_fanout_width_projects_sum"), delta("harbor_router_fanout_width_projects_count")
    statuses = sorted({re.search(r'status="([^"]+)"', k).group(1) for k in a if k.startswith("harbor_router_upstream_responses_total{")})
    answers = ", ".join(f"{s} {delta('harbor_router_upstream_responses_total', status=s) / pulls:.2f}" for s in statuses)
    opened = delta("harbor_router_upstream_connections_opened_total")
    print(f"  {names[r]:<16} fan-outs/pull {fan / pulls:.2f} (found {found / pulls:.2f}), projects asked/fan-out "
          f"{wsum / max(wcount, 1):.2f}, upstream answers/pull: {answers}, connections opened/pull {opened / pulls:.2f}")
    lookups = {}
    for k in a:
        if k.startswith("harbor_router_cache_lookups_total{"):
            lk = ",".join(re.findall(r'="([^"]+)"', k.split("{", 1)[1]))
            v = a[k] - b.get(k, 0.0)
            if v:
                lookups[lk] = v / pulls
    print(f"  {'':<16} cache lookups/pull: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(lookups.items())))
    durations = []
    for proj in ("dockerhub", "ghcr", "quay", "k8s"):
        n = delta("harbor_router_upstream_duration_seconds_count", project=proj)
        t = delta("harbor_router_upstream_duration_seconds_sum", project=proj)
        durations.append(f"{proj} {t / n * 1e6:.0f} us ({n / pulls:.2f}/pull)" if n else f"{proj} -")
    print(f"  {'':<16} upstream time to answer head, mean: " + ", ".join(durations))
PY
for r in A B; do
  if grep -v '"message":"listening"' "$work/router-$r.log" | grep -q '"level":"\(WARN\|ERROR\)"'; then
    echo; echo "router $r log (warnings and errors):"; grep '"level":"\(WARN\|ERROR\)"' "$work/router-$r.log" | head -20
  fi
done
