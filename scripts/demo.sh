#!/usr/bin/env bash
# Runs the whole thing locally, on free loopback ports, without a Harbor:
#   1. the test bed's stand-in Harbor (projects API, token service) in front of the real
#      docker-registry, seeded with images in the proxy-cache projects dockerhub, ghcr, quay and k8s;
#   2. harbor-router pointed at it with the stand-in's robot account;
# then waits until the router has discovered the projects, pulls images through it with skopeo
# (naming no project), prints commands to try, and stays up until Ctrl-C, stopping everything it
# started.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

hr_rust
hr_apt curl python3 docker-registry skopeo
hr_log "building the router (release) and the stand-in Harbor"
cargo build --release --locked -q -p harbor-router
cargo build --locked -q -p testbed --bin harbor-standin

hr_work

hr_log "starting the stand-in Harbor and the registry, seeding images"
hr_standin target/debug/harbor-standin
harbor_url=$(hr_standin_field 'v["harbor_url"]')

hr_log "starting harbor-router against $harbor_url"
HARBOR_URL=$harbor_url HARBOR_USERNAME=$(hr_standin_field 'v["robot_user"]') HARBOR_PASSWORD=$(hr_standin_field 'v["robot_password"]') \
  LISTEN_ADDR=127.0.0.1:0 METRICS_ADDR=127.0.0.1:0 LOG_FORMAT=json WORKERS=${WORKERS:-2} \
  DISCOVERY_INTERVAL=${DISCOVERY_INTERVAL:-10s} target/release/harbor-router >"$work/router.log" 2>&1 &
pids+=($!)
addr=$(hr_wait_for "$work/router.log" 's/.*"message":"listening","addr":"\([^"]*\)".*/\1/p' "${pids[-1]}")
hr_wait_for "$work/router.log" '/proxy-cache projects discovered/p' "${pids[-1]}" >/dev/null

echo
echo "\$ curl -s http://$addr/readyz"
curl -s "http://$addr/readyz"; echo
echo
echo "Projects the router discovered (from its log):"
python3 -c 'import json,sys
for line in open(sys.argv[1]):
    try: v = json.loads(line)
    except ValueError: continue
    if v.get("message") == "proxy-cache projects discovered": last = v["projects"]
print("  " + last)' "$work/router.log"
echo
echo "Images in the stand-in Harbor:"
hr_standin_field '"\n".join("  %s:%s  %s" % (i["repository"], i["tag"], i["digest"]) for i in v["images"])'
hr_log "pulling through the router with skopeo, naming no project"
for ref in proxy/nginx:latest proxy/library/alpine:3.19 proxy/org/app:v1 proxy/coreos/etcd:v3.5.0 proxy/pause:3.9; do
  digest=$(skopeo inspect --raw --tls-verify=false "docker://$addr/$ref" | sha256sum | cut -d' ' -f1)
  skopeo copy --all --preserve-digests --quiet --src-tls-verify=false "docker://$addr/$ref" "dir:$work/pulled-${ref//[\/:]/_}"
  echo "  $addr/$ref  sha256:$digest  (copied with --all)"
done
cat <<TXT

Try:
  skopeo inspect --tls-verify=false docker://$addr/proxy/nginx:latest
  skopeo copy --all --src-tls-verify=false docker://$addr/proxy/coreos/etcd:v3.5.0 dir:/tmp/etcd
  skopeo list-tags --tls-verify=false docker://$addr/proxy/coreos/etcd
  curl -s http://$addr/readyz
  # the stand-in Harbor itself, where a client has to name the project:
  skopeo inspect --tls-verify=false --creds '$(hr_standin_field 'v["robot_user"]')':$(hr_standin_field 'v["robot_password"]') docker://${harbor_url#http://}/dockerhub/library/nginx:latest

Logs: $work/router.log, $work/standin.log
Press Ctrl-C to stop.
TXT
wait "${pids[@]}"
