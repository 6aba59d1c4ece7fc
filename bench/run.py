#!/usr/bin/env python3
"""The benchmark suite: every scenario of docs/benchmarks.md, each next to its nginx reference in the
same run, on loopback. Started by bench/run.sh, which installs nginx and wrk and builds the router.

    bench/run.py --binary PATH [--smoke] [--rounds N] [--duration S] [--out FILE] [SCENARIO ...]

Everything runs on free loopback ports and is stopped by PID on exit. With two or more cores the
server under test (the router, or nginx as the proxy reference) is pinned to CPU 0 and the load
generator and the upstream (nginx playing Harbor) to CPU 1, so the two do not trade places between
rounds: that steadies the figures on a 2-core machine, and the load generator never steals the
server's core. Rounds are interleaved (every case of a scenario, then the next round), and the
figures are medians over rounds. `--smoke` runs each scenario once, briefly, on whatever binary it is
given: it proves the scripts work and produces a result, and its figures mean nothing.
"""

import argparse
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ACCEPT = "application/vnd.oci.image.manifest.v1+json"
TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
SERVER_CPU = "0"
LOAD_CPU = "1" if CORES > 1 else "0"

SCENARIOS = [
    "base",
    "tag",
    "tag-p99",
    "digest",
    "blob",
    "blob-chunked",
    "slow-readers",
    "cold-fanout",
    "idle",
    "tls",
    "idle-tls",
    "workers",
    "io-driver",
]

# nginx's proxy reference: a fixed rewrite of /v2/proxy/ to the project, to the upstream `harbor`
# (the plain and the TLS reference alike).
PROXY_LOCATION = """    location /v2/proxy/ {
      rewrite ^/v2/proxy/(.*)$ /v2/hub/$1 break;
      proxy_pass http://harbor;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffers 8 64k;
      proxy_max_temp_file_size 0;
    }"""


def log(msg):
    print(f"==> {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_port(port, what, proc=None, limit=20):
    end = time.time() + limit
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port} within {limit}s")


def pinned(cpu, argv):
    return ["taskset", "-c", cpu] + argv if shutil.which("taskset") and CORES > 1 else argv


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="hr-bench-")
        os.chmod(self.work, 0o755)  # nginx's worker runs as nobody when started by root
        self.procs = []
        self.results = {}
        self.figures = []
        # The router perf samples in --profile runs (set by each scenario).
        self.profiled = None

    # ---------------------------------------------------------------- processes

    def spawn(self, argv, name, env=None, cpu=None):
        out = open(os.path.join(self.work, f"{name}.log"), "wb")
        argv = pinned(cpu, argv) if cpu is not None else argv
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(self.work, ignore_errors=True)

    def nginx(self, name, body, cpu):
        """Starts one nginx (one worker) with `body` inside `http {}`; returns its worker's pid."""
        conf = os.path.join(self.work, f"{name}.conf")
        with open(conf, "w") as f:
            f.write(f"""worker_processes 1;
daemon off;
pid {self.work}/{name}.pid;
error_log {self.work}/{name}-error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  types {{ }}
{body}
}}
""")
        master = self.spawn(["nginx", "-c", conf, "-p", self.work], name, cpu=cpu)
        return master

    def nginx_worker(self, master):
        end = time.time() + 10
        while time.time() < end:
            try:
                kids = subprocess.run(["pgrep", "-P", str(master.pid)], capture_output=True,
                                      text=True).stdout.split()
            except FileNotFoundError:
                kids = []
            if kids:
                return int(kids[0])
            time.sleep(0.05)
        raise SystemExit("no nginx worker process")

    def router(self, name, harbor_port, extra=None, cpu=SERVER_CPU):
        port = free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "WORKERS": "1",
            "LISTEN_ADDR": f"127.0.0.1:{port}",
            "METRICS_ADDR": f"127.0.0.1:{free_port()}",
            "LOG_LEVEL": "warn",
            "HARBOR_URL": f"http://127.0.0.1:{harbor_port}",
            "FANOUT_BUDGET_PER_IP": "1000000",
            # Every load generator connects from 127.0.0.1: one address, many clients.
            "MAX_CONNECTIONS_PER_CLIENT": "0",
            # A proxied tag is asked of Harbor every time, as nginx's proxy_pass asks its upstream:
            # with the linger on, a repeated tag would be answered from the last one instead.
            "COALESCE_LINGER": "0",
        }
        # Allocator settings pass through, so they can be compared (MIMALLOC_ARENA_EAGER_COMMIT=2
        # is mimalloc's own default on Linux; the router's is on-demand commit).
        env.update({k: v for k, v in os.environ.items() if k.startswith("MIMALLOC_")})
        # ROUTER_ENV="COALESCE_PULLS=false …" adds variables to every router of the run, so a
        # setting can be compared with itself.
        env.update(dict(kv.split("=", 1) for kv in os.environ.get("ROUTER_ENV", "").split() if "=" in kv))
        env.update(extra or {})
        p = self.spawn([self.args.binary], name, env=env, cpu=cpu)
        p.port = port
        p.metrics = int(env["METRICS_ADDR"].rsplit(":", 1)[1])
        wait_port(port, name, p)
        end = time.time() + 30
        # The metrics port answers the probes (plain HTTP even when the client port speaks TLS).
        while http_get(p.metrics, "/readyz")[0] != 200:
            if p.poll() is not None or time.time() > end:
                raise SystemExit(f"{name} is not ready: {open(self.log_path(name)).read()[-2000:]}")
            time.sleep(0.05)
        return p

    def log_path(self, name):
        return os.path.join(self.work, f"{name}.log")

    # ---------------------------------------------------------------- content

    def content(self):
        """The image every hit scenario pulls: an OCI manifest, a config, one blob."""
        www = os.path.join(self.work, "www")
        os.makedirs(www)
        os.chmod(www, 0o755)

        def put(name, data):
            with open(os.path.join(www, name), "wb") as f:
                f.write(data)
            return "sha256:" + hashlib.sha256(data).hexdigest()

        blob_size = self.args.blob_mib << 20
        h = hashlib.sha256()
        chunk = os.urandom(1 << 20)
        with open(os.path.join(www, "blob"), "wb") as f:
            for i in range(self.args.blob_mib):
                part = chunk[i % 997:] + chunk[: i % 997]  # 1 MiB of random bytes, rotated
                f.write(part)
                h.update(part)
        blob = "sha256:" + h.hexdigest()
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": ACCEPT,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": put("config", config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": blob, "size": blob_size}],
            "annotations": {"org.opencontainers.image.title": "harbor-router bench"},
        }, separators=(",", ":")).encode()
        digest = put("manifest", manifest)
        with open(os.path.join(www, "projects.json"), "w") as f:
            f.write('[{"project_id":1,"name":"hub","registry_id":1,"metadata":{"public":"true"}}]')
        with open(os.path.join(www, "registry.json"), "w") as f:
            f.write('{"id":1,"name":"up","type":"docker-registry","url":"https://example.invalid"}')
        self.www, self.digest, self.blob, self.blob_size = www, digest, blob, blob_size
        self.manifest_len = len(manifest)

    def start_hit_servers(self):
        """nginx as Harbor (static files, the upstream of every proxied case) on the load CPU; nginx
        as the proxy reference (a fixed rewrite of /v2/proxy/ to the project) on the server CPU."""
        w, d, b = self.www, self.digest, self.blob
        self.harbor_port = free_port()
        self.harbor = self.nginx("harbor", f"""
  sendfile off;
  server {{
    listen 127.0.0.1:{self.harbor_port};
    location = /api/v2.0/projects {{ default_type application/json; add_header X-Total-Count 1; alias {w}/projects.json; }}
    location = /api/v2.0/registries/1 {{ default_type application/json; alias {w}/registry.json; }}
    location = /v2/ {{ default_type application/json; add_header Docker-Distribution-Api-Version registry/2.0; return 200 '{{}}'; }}
    location = /v2/hub/library/app/manifests/v1 {{ default_type {ACCEPT}; add_header Docker-Content-Digest {d}; alias {w}/manifest; }}
    location = /v2/hub/library/app/manifests/{d} {{ default_type {ACCEPT}; add_header Docker-Content-Digest {d}; alias {w}/manifest; }}
    location = /v2/hub/library/app/blobs/{b} {{ default_type application/octet-stream; add_header Docker-Content-Digest {b}; alias {w}/blob; }}
  }}""", LOAD_CPU)
        wait_port(self.harbor_port, "nginx (Harbor)", self.harbor)
        self.harbor_worker = self.nginx_worker(self.harbor)
        self.proxy_port = free_port()
        self.proxy = self.nginx("proxy", f"""
  upstream harbor {{ server 127.0.0.1:{self.harbor_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{self.proxy_port};
    location = /v2/ {{ default_type application/json; add_header Docker-Distribution-Api-Version registry/2.0; return 200 '{{}}'; }}
{PROXY_LOCATION}
  }}""", SERVER_CPU)
        wait_port(self.proxy_port, "nginx (proxy)", self.proxy)
        self.proxy_worker = self.nginx_worker(self.proxy)

    def hit_router(self, name, extra=None):
        r = self.router(name, self.harbor_port, extra)
        self.profiled = r.pid
        # Warm: the mapping (a tag pull) and the manifest memory (a digest pull).
        for path in (f"/v2/proxy/library/app/manifests/v1", f"/v2/proxy/library/app/manifests/{self.digest}"):
            status, headers, body = http_get(r.port, path, {"Accept": ACCEPT})
            if status != 200 or headers.get("docker-content-digest") != self.digest:
                raise SystemExit(f"{name}: {path} answered {status} {headers}")
            if hashlib.sha256(body).hexdigest() != self.digest.split(":")[1]:
                raise SystemExit(f"{name}: {path}: the body does not hash to the digest")
        return r

    # ---------------------------------------------------------------- measuring

    def wrk(self, port, path, conns, server_pids, upstream_pid=None, accept=True, duration=None, scheme="http"):
        duration = duration or self.args.duration
        argv = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency"]
        if accept:
            argv += ["-H", f"Accept: {ACCEPT}"]
        argv.append(f"{scheme}://127.0.0.1:{port}{path}")
        before = {p: cpu_ticks(p) for p in server_pids}
        up_before = cpu_ticks(upstream_pid) if upstream_pid else 0
        out = subprocess.run(pinned(LOAD_CPU, argv), capture_output=True, text=True, check=True).stdout
        after = {p: cpu_ticks(p) for p in server_pids}
        up_after = cpu_ticks(upstream_pid) if upstream_pid else 0
        if "Non-2xx" in out:
            raise SystemExit(f"wrk saw non-2xx answers on {path}:\n{out}")
        n = int(re.search(r"(\d+) requests in", out).group(1)) or 1
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        transfer = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
        scale = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[transfer.group(2)]
        lat = {m.group(1): to_us(m.group(2)) for m in re.finditer(r"^\s+(50|90|99)%\s+(\S+)", out, re.M)}
        cpu = sum(after[p] - before[p] for p in server_pids) * TICK_US
        mib = float(transfer.group(1)) * scale * duration / (1 << 20)
        return {
            "cpu_us_per_mib": cpu / mib if mib else None,
            "requests": n,
            "rps": rps,
            "bytes_per_s": float(transfer.group(1)) * scale,
            "p50_us": lat.get("50"),
            "p90_us": lat.get("90"),
            "p99_us": lat.get("99"),
            "cpu_us_per_req": cpu / n,
            "upstream_cpu_us_per_req": (up_after - up_before) * TICK_US / n,
            "cpu_s": cpu / 1e6,
        }

    def rounds(self, scenario, cases):
        """Runs every case of `cases` (name → thunk returning a result dict), interleaved, for the
        configured rounds; keeps every round and returns the medians."""
        runs = {name: [] for name in cases}
        for r in range(self.args.rounds):
            for name, thunk in cases.items():
                res = thunk()
                runs[name].append(res)
                log(f"  {scenario} round {r + 1}: {name}: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in res.items() if isinstance(v, (int, float)) and v is not None))
        medians = {name: median_of(rs) for name, rs in runs.items()}
        self.results[scenario] = {"rounds": runs, "median": medians}
        if self.args.profile and "router" in cases and self.profiled is not None:
            self.results[scenario]["profile"] = self.perf(scenario, cases["router"])
        return medians

    def perf(self, scenario, thunk):
        """Runs `thunk` once more with perf sampling the router (the pid in `self.profiled`);
        returns the hottest symbols with their share of the samples."""
        data = os.path.join(self.work, f"{scenario}.perf")
        rec = subprocess.Popen(["perf", "record", "-q", "-F", "2999", "-p", str(self.profiled), "-o", data],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        thunk()
        rec.send_signal(signal.SIGINT)
        rec.wait(timeout=30)
        rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,symbol",
                              "--percent-limit", "0.7"], capture_output=True, text=True).stdout
        top = []
        for line in rep.splitlines():
            m = re.match(r"\s+([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.+)$", line)
            if m:
                top.append({"percent": float(m.group(1)), "dso": m.group(2), "symbol": m.group(3).strip()})
        dsos = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso"],
                              capture_output=True, text=True).stdout
        by_dso = {}
        for line in dsos.splitlines():
            m = re.match(r"\s+([\d.]+)%\s+(\S+)", line)
            if m:
                by_dso[m.group(2)] = float(m.group(1))
        log(f"  {scenario}: the router's samples by binary: " + ", ".join(f"{k} {v:.1f}%" for k, v in by_dso.items()))
        log(f"  {scenario}: profile of the router (flat, share of samples):")
        for t in top[:25]:
            log(f"    {t['percent']:5.1f}%  {t['dso'][:20]:20}  {t['symbol'][:110]}")
        return {"by_dso": by_dso, "top": top}

    def figure(self, scenario, name, value, target, met, unit=""):
        self.figures.append({"scenario": scenario, "figure": name, "value": value, "unit": unit,
                             "target": target, "met": met})

    # ---------------------------------------------------------------- scenarios

    def s_base(self):
        r = self.hit_router("router-base")
        m = self.rounds("base", {
            "nginx-return": lambda: self.wrk(self.proxy_port, "/v2/", self.args.conns, [self.proxy_worker], accept=False),
            "router": lambda: self.wrk(r.port, "/v2/", self.args.conns, [r.pid], accept=False),
        })
        ratio = m["router"]["rps"] / m["nginx-return"]["rps"]
        self.figure("base", "req/s ÷ nginx return 200", ratio, "≥ 1.0", ratio >= 1.0)
        self.figure("base", "CPU/request, router vs nginx", m["router"]["cpu_us_per_req"], "",
                    None, f"µs vs {m['nginx-return']['cpu_us_per_req']:.1f} µs")
        self.kill(r)

    def s_tag(self):
        r = self.hit_router("router-tag")
        path = "/v2/proxy/library/app/manifests/v1"
        m = self.rounds("tag", {
            "nginx-proxy": lambda: self.wrk(self.proxy_port, path, self.args.conns, [self.proxy_worker], self.harbor_worker),
            "router": lambda: self.wrk(r.port, path, self.args.conns, [r.pid], self.harbor_worker),
        })
        ratio = m["router"]["rps"] / m["nginx-proxy"]["rps"]
        cpu = m["router"]["cpu_us_per_req"] / m["nginx-proxy"]["cpu_us_per_req"]
        self.figure("tag", "req/s ÷ nginx proxy_pass", ratio, "≥ 1.2", ratio >= 1.2)
        self.figure("tag", "CPU/request ÷ nginx proxy_pass", cpu, "≤ 0.8", cpu <= 0.8,
                    f"({m['router']['cpu_us_per_req']:.1f} µs vs {m['nginx-proxy']['cpu_us_per_req']:.1f} µs)")
        self.kill(r)

    def s_tag_p99(self):
        r = self.hit_router("router-tag-p99")
        path = "/v2/proxy/library/app/manifests/v1"
        m = self.rounds("tag-p99", {
            "nginx-proxy": lambda: self.wrk(self.proxy_port, path, 8, [self.proxy_worker], self.harbor_worker),
            "router": lambda: self.wrk(r.port, path, 8, [r.pid], self.harbor_worker),
        })
        diff = m["router"]["p99_us"] - m["nginx-proxy"]["p99_us"]
        self.figure("tag-p99", "p99 router − p99 nginx proxy_pass, 8 connections", diff, "≤ 0", diff <= 0, "µs")
        self.kill(r)

    def s_digest(self):
        r = self.hit_router("router-digest")
        rpath = f"/v2/proxy/library/app/manifests/{self.digest}"
        npath = f"/v2/hub/library/app/manifests/{self.digest}"
        # nginx serving the file is the ceiling: it runs on the load CPU as Harbor does, so for this
        # scenario a second nginx serves the same file from the server CPU.
        m = self.rounds("digest", {
            "nginx-static": lambda: self.wrk(self.static_port, npath, self.args.conns, [self.static_worker]),
            "router": lambda: self.wrk(r.port, rpath, self.args.conns, [r.pid], self.harbor_worker),
        })
        if m["router"]["upstream_cpu_us_per_req"] > 1:
            log("warning: the digest case cost the upstream CPU: not answered from memory?")
        ratio = m["router"]["rps"] / m["nginx-static"]["rps"]
        self.figure("digest", "req/s ÷ nginx serving the static file", ratio, "≥ 1.0", ratio >= 1.0,
                    f"(CPU/request {m['router']['cpu_us_per_req']:.1f} µs vs {m['nginx-static']['cpu_us_per_req']:.1f} µs)")
        self.kill(r)

    def start_static(self):
        w, d = self.www, self.digest
        self.static_port = free_port()
        self.static = self.nginx("static", f"""
  sendfile off;
  server {{
    listen 127.0.0.1:{self.static_port};
    location = /v2/hub/library/app/manifests/{d} {{ default_type {ACCEPT}; add_header Docker-Content-Digest {d}; alias {w}/manifest; }}
  }}""", SERVER_CPU)
        wait_port(self.static_port, "nginx (static)", self.static)
        self.static_worker = self.nginx_worker(self.static)

    def s_blob(self):
        r = self.hit_router("router-blob")
        path = f"/v2/proxy/library/app/blobs/{self.blob}"
        for conns in (1, 16):
            name = f"blob-{conns}"
            counted = ("harbor_router_upstream_responses_total", "harbor_router_requests_total",
                       "harbor_router_shared_requests_total", "harbor_router_shared_fallouts_total")
            before = {c: metric(r.metrics, c) for c in counted}
            m = self.rounds(name, {
                "nginx-proxy": lambda c=conns: self.wrk(self.proxy_port, path, c, [self.proxy_worker], self.harbor_worker, accept=False),
                "router": lambda c=conns: self.wrk(r.port, path, c, [r.pid], self.harbor_worker, accept=False),
            })
            ratio = m["router"]["bytes_per_s"] / m["nginx-proxy"]["bytes_per_s"]
            cpu_r = m["router"]["cpu_us_per_mib"]
            cpu_n = m["nginx-proxy"]["cpu_us_per_mib"]
            self.figure(name, f"throughput ÷ nginx proxy_pass ({self.args.blob_mib} MiB blob, {conns} client{'s' if conns > 1 else ''})",
                        ratio, "≥ 1.0", ratio >= 1.0,
                        f"({m['router']['bytes_per_s'] / (1 << 20):.0f} vs {m['nginx-proxy']['bytes_per_s'] / (1 << 20):.0f} MiB/s)")
            self.figure(name, "CPU per MiB ÷ nginx proxy_pass's", cpu_r / cpu_n if cpu_n else float("nan"), "≤ 1.0",
                        cpu_n > 0 and cpu_r / cpu_n <= 1.0, f"({cpu_r:.0f} µs vs {cpu_n:.0f} µs per MiB)")
            # What Harbor was asked for the router's pulls (COALESCE_PULLS shares one transfer).
            grown = {c.removeprefix("harbor_router_"): metric(r.metrics, c) - before[c] for c in counted}
            self.results.setdefault("blob-sharing", {})[name] = grown
            log(f"  {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in grown.items()))
        self.kill(r)

    def s_blob_chunked(self):
        """A blob Harbor sends without its length (up to v2.15, a blob it has not cached yet): the
        router hashes it as it streams to check it against its digest. The same 1 MiB blob from a
        Harbor that sends it chunked (nginx's sub_filter drops the length) against one that frames
        it, through the same router build, 16 connections: the figure is the hashing's cost."""
        w, b = self.www, self.blob
        port = free_port()
        chunked = self.nginx("harbor-chunked", f"""
  sendfile off;
  server {{
    listen 127.0.0.1:{port};
    location = /api/v2.0/projects {{ default_type application/json; add_header X-Total-Count 1; alias {w}/projects.json; }}
    location = /api/v2.0/registries/1 {{ default_type application/json; alias {w}/registry.json; }}
    location = /v2/ {{ default_type application/json; add_header Docker-Distribution-Api-Version registry/2.0; return 200 '{{}}'; }}
    location = /v2/hub/library/app/manifests/v1 {{ default_type {ACCEPT}; add_header Docker-Content-Digest {self.digest}; alias {w}/manifest; }}
    location = /v2/hub/library/app/manifests/{self.digest} {{ default_type {ACCEPT}; add_header Docker-Content-Digest {self.digest}; alias {w}/manifest; }}
    location = /v2/hub/library/app/blobs/{b} {{ default_type application/octet-stream; sub_filter_types *; sub_filter 'harbor-router-never-present' ''; alias {w}/blob; }}
  }}""", LOAD_CPU)
        wait_port(port, "nginx (Harbor, chunked blobs)", chunked)
        chunked_worker = self.nginx_worker(chunked)
        path = f"/v2/proxy/library/app/blobs/{b}"
        status, headers, body = http_get(port, f"/v2/hub/library/app/blobs/{b}", {})
        if status != 200 or "content-length" in headers:
            raise SystemExit(f"blob-chunked: the chunked Harbor answered {status} {headers}")
        framed = self.hit_router("router-blob")
        hashed = self.router("router-blob-chunked", port)
        status, headers, body = http_get(hashed.port, path, {})
        if status != 200 or hashlib.sha256(body).hexdigest() != b.split(":")[1]:
            raise SystemExit(f"blob-chunked: the router answered {status}, or a body that does not hash to the digest")
        m = self.rounds("blob-chunked", {
            "framed": lambda: self.wrk(framed.port, path, 16, [framed.pid], self.harbor_worker, accept=False),
            "chunked": lambda: self.wrk(hashed.port, path, 16, [hashed.pid], chunked_worker, accept=False),
        })
        cpu_f, cpu_c = m["framed"]["cpu_us_per_mib"], m["chunked"]["cpu_us_per_mib"]
        self.figure("blob-chunked", "router CPU per MiB, hashed (chunked) ÷ streamed (framed)",
                    cpu_c / cpu_f if cpu_f else float("nan"), "", None,
                    f"({cpu_c:.0f} µs vs {cpu_f:.0f} µs per MiB)")
        ratio = m["chunked"]["bytes_per_s"] / m["framed"]["bytes_per_s"]
        self.figure("blob-chunked", "throughput, chunked ÷ framed", ratio, "", None,
                    f"({m['chunked']['bytes_per_s'] / (1 << 20):.0f} vs {m['framed']['bytes_per_s'] / (1 << 20):.0f} MiB/s)")
        self.kill(framed)
        self.kill(hashed)
        self.kill(chunked)

    def s_slow_readers(self):
        r = self.hit_router("router-slow")
        path = f"/v2/proxy/library/app/blobs/{self.blob}"
        before = rss_kib(r.pid)
        stop = threading.Event()
        peak = [before]
        secs = self.args.slow_seconds

        def reader():
            try:
                s = socket.create_connection(("127.0.0.1", r.port))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
                while not stop.is_set():
                    if not s.recv(64 << 10):
                        break
                    time.sleep(0.05)  # ~1.3 MB/s
                s.close()
            except OSError:
                pass

        readers = self.args.slow_readers
        threads = [threading.Thread(target=reader, daemon=True) for _ in range(readers)]
        for t in threads:
            t.start()
        end = time.time() + secs
        while time.time() < end:
            peak[0] = max(peak[0], rss_kib(r.pid))
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(timeout=5)
        growth = (peak[0] - before) / 1024
        self.results["slow-readers"] = {"readers": readers, "rss_before_kib": before, "rss_peak_kib": peak[0],
                                        "seconds": secs}
        self.figure("slow-readers", f"router RSS growth, {readers} slow readers of the blob", growth, "< 32 MiB",
                    growth < 32, f"MiB ({growth / readers:.2f} MiB each)")
        self.kill(r)

    def s_idle(self):
        n = self.args.idle
        r = self.router("router-idle", self.harbor_port, {"MAX_CONNECTIONS": str(n + 1000)})
        before = rss_kib(r.pid)
        socks = []
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", r.port))
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: bench\r\n\r\n")
            socks.append(s)
        for s in socks:  # every connection answered once, then idle (keep-alive)
            s.settimeout(10)
            got = b""
            while b"\r\n\r\n" not in got or not got.endswith(b"{}"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        # Idle connections park after a whole sweep period (1-2 s) and the worker returns freed memory
        # to the system on its next check (every 5 s): what 10 000 idle nodes cost is measured then.
        time.sleep(0.5 if self.args.smoke else 8)
        after = rss_kib(r.pid)
        for s in socks:
            s.close()
        self.results["idle"] = {"connections": n, "rss_before_kib": before, "rss_after_kib": after}
        self.figure("idle", f"router RSS with {n} idle keep-alive clients", after / 1024, "< 100 MiB",
                    after / 1024 < 100, f"MiB (from {before / 1024:.1f} MiB, {(after - before) / n * 1024 / 1024:.2f} KiB each)")
        self.kill(r)

    # ---------------------------------------------------------------- TLS to clients

    def tls_files(self):
        """A self-signed certificate for 127.0.0.1 (openssl), made once per run."""
        cert, key = os.path.join(self.work, "tls.crt"), os.path.join(self.work, "tls.key")
        if not os.path.exists(cert):
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                           check=True, capture_output=True)
        return cert, key

    def tls_router(self, name, extra=None):
        cert, key = self.tls_files()
        env = {"TLS_CERT_FILE": cert, "TLS_KEY_FILE": key}
        env.update(extra or {})
        r = self.router(name, self.harbor_port, env)
        ctx = ssl.create_default_context(cafile=cert)
        for path in (f"/v2/proxy/library/app/manifests/v1", f"/v2/proxy/library/app/manifests/{self.digest}"):
            c = http.client.HTTPSConnection("127.0.0.1", r.port, timeout=10, context=ctx)
            c.request("GET", path, headers={"Accept": ACCEPT})
            res = c.getresponse()
            body = res.read()
            c.close()
            if res.status != 200 or hashlib.sha256(body).hexdigest() != self.digest.split(":")[1]:
                raise SystemExit(f"{name}: {path} over TLS answered {res.status}")
        return r

    def tls_proxy(self):
        """nginx terminating TLS for the same proxied requests (one worker, the server CPU)."""
        if getattr(self, "tls_proxy_port", None):
            return
        cert, key = self.tls_files()
        self.tls_proxy_port = free_port()
        master = self.nginx("proxy-tls", f"""
  upstream harbor {{ server 127.0.0.1:{self.harbor_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{self.tls_proxy_port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
{PROXY_LOCATION}
  }}""", SERVER_CPU)
        wait_port(self.tls_proxy_port, "nginx (TLS proxy)", master)
        self.tls_proxy_worker = self.nginx_worker(master)

    def s_tls(self):
        """The proxied tag and the 1 GiB blob over TLS (keep-alive: handshakes are amortized), against
        the router without TLS and nginx terminating TLS for the same requests."""
        self.tls_proxy()
        plain = self.hit_router("router-plain")
        tls = self.tls_router("router-tls")
        tag = "/v2/proxy/library/app/manifests/v1"
        m = self.rounds("tls-tag", {
            "nginx-tls-proxy": lambda: self.wrk(self.tls_proxy_port, tag, self.args.conns, [self.tls_proxy_worker],
                                                self.harbor_worker, scheme="https"),
            "router-tls": lambda: self.wrk(tls.port, tag, self.args.conns, [tls.pid], self.harbor_worker, scheme="https"),
            "router-plain": lambda: self.wrk(plain.port, tag, self.args.conns, [plain.pid], self.harbor_worker),
        })
        rt, rp, nt = m["router-tls"], m["router-plain"], m["nginx-tls-proxy"]
        self.figure("tls-tag", "req/s ÷ nginx terminating TLS (proxy_pass)", rt["rps"] / nt["rps"], "≥ 1.0",
                    rt["rps"] >= nt["rps"])
        self.figure("tls-tag", "CPU/request ÷ nginx terminating TLS", rt["cpu_us_per_req"] / nt["cpu_us_per_req"],
                    "", None, f"({rt['cpu_us_per_req']:.1f} µs vs {nt['cpu_us_per_req']:.1f} µs)")
        self.figure("tls-tag", "CPU/request with TLS ÷ without", rt["cpu_us_per_req"] / rp["cpu_us_per_req"],
                    "", None, f"({rt['cpu_us_per_req']:.1f} µs vs {rp['cpu_us_per_req']:.1f} µs)")
        blob = f"/v2/proxy/library/app/blobs/{self.blob}"
        m = self.rounds("tls-blob-1", {
            "nginx-tls-proxy": lambda: self.wrk(self.tls_proxy_port, blob, 1, [self.tls_proxy_worker],
                                                self.harbor_worker, accept=False, scheme="https"),
            "router-tls": lambda: self.wrk(tls.port, blob, 1, [tls.pid], self.harbor_worker, accept=False,
                                           scheme="https"),
            "router-plain": lambda: self.wrk(plain.port, blob, 1, [plain.pid], self.harbor_worker, accept=False),
        })
        rt, rp, nt = m["router-tls"], m["router-plain"], m["nginx-tls-proxy"]
        mib = 1 << 20
        self.figure("tls-blob-1", f"throughput ÷ nginx terminating TLS ({self.args.blob_mib} MiB blob, 1 client)",
                    rt["bytes_per_s"] / nt["bytes_per_s"], "≥ 1.0", rt["bytes_per_s"] >= nt["bytes_per_s"],
                    f"({rt['bytes_per_s'] / mib:.0f} vs {nt['bytes_per_s'] / mib:.0f} MiB/s; without TLS "
                    f"{rp['bytes_per_s'] / mib:.0f})")
        self.figure("tls-blob-1", "CPU per MiB ÷ nginx terminating TLS",
                    rt["cpu_us_per_mib"] / nt["cpu_us_per_mib"], "≤ 1.0", rt["cpu_us_per_mib"] <= nt["cpu_us_per_mib"],
                    f"({rt['cpu_us_per_mib']:.0f} µs vs {nt['cpu_us_per_mib']:.0f} µs per MiB; without TLS "
                    f"{rp['cpu_us_per_mib']:.0f})")
        self.kill(plain)
        self.kill(tls)

    def s_idle_tls(self):
        """What an idle TLS connection costs: N clients each do a handshake and one request, then stay."""
        n = self.args.idle
        r = self.tls_router("router-idle-tls", {"MAX_CONNECTIONS": str(n + 1000), "HEADER_READ_TIMEOUT": "300s"})
        cert, _ = self.tls_files()
        ctx = ssl.create_default_context(cafile=cert)
        before = rss_kib(r.pid)
        socks = []
        for i in range(n):
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", r.port)), server_hostname="127.0.0.1")
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: bench\r\n\r\n")
            got = b""
            s.settimeout(10)
            while not got.endswith(b"{}"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            socks.append(s)
        time.sleep(0.5 if self.args.smoke else 8)
        after = rss_kib(r.pid)
        for s in socks:
            s.close()
        self.results["idle-tls"] = {"connections": n, "rss_before_kib": before, "rss_after_kib": after}
        self.figure("idle-tls", f"router RSS with {n} idle TLS keep-alive clients", after / 1024, "", None,
                    f"MiB (from {before / 1024:.1f} MiB, {(after - before) / n:.1f} KiB each)")
        self.kill(r)

    def s_workers(self):
        path = f"/v2/proxy/library/app/manifests/{self.digest}"
        one = self.hit_router("router-w1", {"WORKERS": "1"})
        two = self.router("router-w2", self.harbor_port, {"WORKERS": "2"}, cpu="0,1")
        for _ in range(4):  # warm both workers' memories (connections land on either listener)
            http_get(two.port, f"/v2/proxy/library/app/manifests/v1", {"Accept": ACCEPT})
            http_get(two.port, path, {"Accept": ACCEPT})

        def run(r):
            # Two wrk threads, so both workers' listeners get connections (SO_REUSEPORT spreads them).
            argv = ["wrk", "-t2", f"-c{self.args.conns}", f"-d{self.args.duration}s", "--latency",
                    "-H", f"Accept: {ACCEPT}", f"http://127.0.0.1:{r.port}{path}"]
            b = cpu_ticks(r.pid)
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            a = cpu_ticks(r.pid)
            n = int(re.search(r"(\d+) requests in", out).group(1)) or 1
            return {"requests": n, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
                    "cpu_us_per_req": (a - b) * TICK_US / n}

        m = self.rounds("workers", {"workers-1": lambda: run(one), "workers-2": lambda: run(two)})
        growth = m["workers-2"]["cpu_us_per_req"] / m["workers-1"]["cpu_us_per_req"]
        self.figure("workers", "CPU/request, WORKERS=2 ÷ WORKERS=1 (manifest by digest)", growth,
                    "no growth (≤ 1.05)", growth <= 1.05,
                    f"({m['workers-2']['cpu_us_per_req']:.1f} vs {m['workers-1']['cpu_us_per_req']:.1f} µs)")
        self.kill(one)
        self.kill(two)

    def s_io_driver(self):
        uring = self.hit_router("router-uring", {"IO_DRIVER": "io_uring"})
        epoll = self.hit_router("router-epoll", {"IO_DRIVER": "epoll"})
        tag = "/v2/proxy/library/app/manifests/v1"
        digest = f"/v2/proxy/library/app/manifests/{self.digest}"
        m = self.rounds("io-driver", {
            "io_uring-tag": lambda: self.wrk(uring.port, tag, self.args.conns, [uring.pid], self.harbor_worker),
            "epoll-tag": lambda: self.wrk(epoll.port, tag, self.args.conns, [epoll.pid], self.harbor_worker),
            "io_uring-digest": lambda: self.wrk(uring.port, digest, self.args.conns, [uring.pid]),
            "epoll-digest": lambda: self.wrk(epoll.port, digest, self.args.conns, [epoll.pid]),
        })
        for case in ("tag", "digest"):
            u, e = m[f"io_uring-{case}"], m[f"epoll-{case}"]
            self.figure("io-driver", f"{case}: req/s io_uring ÷ epoll", u["rps"] / e["rps"], "reported", None,
                        f"(CPU/request {u['cpu_us_per_req']:.1f} vs {e['cpu_us_per_req']:.1f} µs)")
        self.kill(uring)
        self.kill(epoll)

    def s_cold_fanout(self):
        for projects in (3, 50):
            self.cold_fanout(projects)

    def cold_fanout(self, projects):
        """A fake Harbor with token auth and `projects` projects; every name exists in p0 only. Each
        pull names a new repository, so it is a cold fan-out over every project. Compared with the
        time to first byte of asking p0 itself (with a token), in the same loop."""
        port = free_port()
        w = os.path.join(self.work, f"fan{projects}")
        os.makedirs(w)
        os.chmod(w, 0o755)
        with open(os.path.join(w, "projects.json"), "w") as f:
            json.dump([{"project_id": i + 1, "name": f"p{i}", "registry_id": i + 1, "metadata": {"public": "true"}}
                       for i in range(projects)], f)
        with open(os.path.join(w, "registry.json"), "w") as f:
            f.write('{"id":1,"name":"up","type":"docker-registry","url":"https://example.invalid"}')
        shutil.copy(os.path.join(self.www, "manifest"), os.path.join(w, "manifest"))
        d = self.digest
        challenge = f'Bearer realm="http://127.0.0.1:{port}/service/token",service="harbor-registry"'
        fan = self.nginx(f"fan{projects}", f"""
  sendfile off;
  server {{
    listen 127.0.0.1:{port};
    location = /api/v2.0/projects {{ default_type application/json; add_header X-Total-Count {projects}; alias {w}/projects.json; }}
    location ~ ^/api/v2.0/registries/\\d+$ {{ default_type application/json; alias {w}/registry.json; }}
    location = /service/token {{ default_type application/json; return 200 '{{"token":"t","expires_in":1800}}'; }}
    location ~ ^/v2/p0/.+/manifests/v1$ {{
      if ($http_authorization = "") {{ add_header WWW-Authenticate '{challenge}' always; return 401; }}
      default_type {ACCEPT}; add_header Docker-Content-Digest {d}; alias {w}/manifest;
    }}
    location /v2/ {{
      if ($http_authorization = "") {{ add_header WWW-Authenticate '{challenge}' always; return 401; }}
      default_type application/json;
      return 404 '{{"errors":[{{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}}]}}';
    }}
  }}""", LOAD_CPU)
        wait_port(port, "nginx (fan-out Harbor)", fan)
        r = self.router(f"router-fan{projects}", port, {
            "HARBOR_USERNAME": "robot$bench", "HARBOR_PASSWORD": "x",
            "MAX_FANOUT_PROJECTS": str(max(projects, 50)),
        })
        # The first pull learns the token realm (a 401 challenge); not measured.
        http_get(r.port, "/v2/proxy/warm/x/manifests/v1", {"Accept": ACCEPT})
        tokens_before = metric(r.metrics, "harbor_router_token_fetches_total")
        n = self.args.cold
        direct, routed = [], []
        dconn = http.client.HTTPConnection("127.0.0.1", port)
        rconn = http.client.HTTPConnection("127.0.0.1", r.port)
        cpu_before = cpu_ticks(r.pid)
        self.cold_pulls(projects, range(n), dconn, rconn, direct, routed)
        cpu_per_pull = (cpu_ticks(r.pid) - cpu_before) * TICK_US / n
        tokens = metric(r.metrics, "harbor_router_token_fetches_total") - tokens_before
        width = metric(r.metrics, "harbor_router_fanout_width_projects_sum")
        opened = metric(r.metrics, "harbor_router_upstream_connections_opened_total")
        name = f"cold-fanout-{projects}"
        med_d, med_r = statistics.median(direct), statistics.median(routed)
        self.results[name] = {"pulls": n, "direct_us": summary(direct), "routed_us": summary(routed),
                              "token_requests_per_pull": tokens / n, "projects_asked_total": width,
                              "upstream_connections_opened": opened,
                              "router_cpu_us_per_pull": cpu_per_pull}
        self.figure(name, f"time to first byte − the project's own, {projects} projects (median)",
                    (med_r - med_d) / 1000, "≤ 1 ms", med_r - med_d <= 1000,
                    f"ms ({med_r:.0f} vs {med_d:.0f} µs; p90 {percentile(routed, 90):.0f} vs {percentile(direct, 90):.0f} µs; "
                    f"router CPU {cpu_per_pull:.0f} µs a pull)")
        self.figure(name, "token requests per cold pull", tokens / n, "1", abs(tokens / n - 1) < 0.05)
        if self.args.profile:
            self.profiled = r.pid
            self.results[name]["profile"] = self.perf(
                name, lambda: self.cold_pulls(projects, range(n, 2 * n), dconn, rconn, [], []))
        self.kill(r)
        self.kill(fan)

    def cold_pulls(self, projects, indices, dconn, rconn, direct, routed):
        """Cold pulls of new names (`indices`), each asked of p0 directly and through the router;
        the times to first byte go to `direct` and `routed`."""
        for i in indices:
            name = f"cold/n{i}-{os.getpid()}-{projects}"
            t0 = time.perf_counter()
            dconn.request("GET", f"/v2/p0/{name}/manifests/v1", headers={"Accept": ACCEPT, "Authorization": "Bearer t"})
            res = dconn.getresponse()
            t1 = time.perf_counter()
            res.read()
            if res.status != 200:
                raise SystemExit(f"direct pull answered {res.status}")
            t2 = time.perf_counter()
            rconn.request("GET", f"/v2/proxy/{name}/manifests/v1", headers={"Accept": ACCEPT})
            res = rconn.getresponse()
            t3 = time.perf_counter()
            res.read()
            if res.status != 200:
                raise SystemExit(f"routed cold pull answered {res.status}")
            direct.append((t1 - t0) * 1e6)
            routed.append((t3 - t2) * 1e6)

    def kill(self, p):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    # ---------------------------------------------------------------- the run

    def run(self, scenarios):
        self.content()
        self.start_hit_servers()
        if "digest" in scenarios:
            self.start_static()
        started = time.time()
        for s in scenarios:
            log(f"scenario {s}")
            getattr(self, "s_" + s.replace("-", "_"))()
        return time.time() - started


def to_us(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", v)
    if not m:
        return None
    x = float(m.group(1))
    return x * {"us": 1, "ms": 1e3, "s": 1e6, "m": 60e6}[m.group(2)]


def median_of(runs):
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and v is not None]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


def summary(xs):
    return {"p50": percentile(xs, 50), "p90": percentile(xs, 90), "p99": percentile(xs, 99)}


def http_get(port, path, headers=None):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body
    except OSError:
        return 0, {}, b""


def metric(port, name):
    _, _, body = http_get(port, "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def versions(binary):
    def out(argv):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None

    git = out(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "describe", "--always", "--dirty"])
    return {
        "harbor-router": git,
        "binary": binary,
        "nginx": out(["nginx", "-v"]),
        "wrk": out(["wrk", "-v"]),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def table(figures):
    rows = [("scenario", "figure", "value", "target", "met")]
    for f in figures:
        v = f["value"]
        value = f"{v:.2f} {f['unit']}".strip() if isinstance(v, float) else f"{v} {f['unit']}".strip()
        met = {True: "yes", False: "NO", None: "—"}[f["met"]]
        rows.append((f["scenario"], f["figure"], value, f["target"], met))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for r in rows:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--blob-mib", type=int, default=1024)
    ap.add_argument("--idle", type=int, default=10000)
    ap.add_argument("--cold", type=int, default=300, help="cold pulls per fan-out scenario")
    ap.add_argument("--slow-seconds", type=int, default=15)
    ap.add_argument("--slow-readers", type=int, default=16)
    ap.add_argument("--out", help="JSON result file (default bench/results/<time>.json)")
    ap.add_argument("--profile", action="store_true",
                    help="after each scenario's rounds, one more run of its router case under perf; "
                         "prints the hottest functions (a flat profile) and keeps it in the result")
    ap.add_argument("scenarios", nargs="*", help=f"any of: {' '.join(SCENARIOS)} (default: all)")
    args = ap.parse_args()
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario {unknown}; choose from {SCENARIOS}")
    if args.smoke:
        args.rounds, args.duration, args.blob_mib = 1, 1, 4
        args.idle, args.cold, args.slow_seconds, args.conns = 200, 20, 1, 16
    scenarios = args.scenarios or SCENARIOS
    bench = Bench(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        took = bench.run(scenarios)
    finally:
        bench.stop_all()
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "smoke": args.smoke,
        "machine": {"cores": CORES, "cpu": cpu_model(), "pinned": CORES > 1 and bool(shutil.which("taskset"))},
        "versions": versions(args.binary),
        "parameters": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "seconds": took,
        "figures": bench.figures,
        "results": bench.results,
    }
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   time.strftime("%Y%m%dT%H%M%S") + (".smoke" if args.smoke else "") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print()
    print(table(bench.figures))
    print(f"\n{CORES} cores; {'pinned: server on CPU 0, load and upstream on CPU 1' if result['machine']['pinned'] else 'not pinned'}; "
          f"{args.rounds} interleaved round(s) of {args.duration}s; medians. Result: {out}")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
