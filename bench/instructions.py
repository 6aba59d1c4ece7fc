#!/usr/bin/env python3
"""Instructions per request, counted by callgrind, for the router's cheapest answers: `GET /v2/`, a
proxied tag hit (one upstream request through the pool) and a manifest by digest (from memory), for
each router binary given, next to nginx doing the same (`return 200` for `/v2/`, `proxy_pass` for the
tag, a static file for the digest). Started by bench/instructions.sh, which builds the binaries.

    bench/instructions.py --binary LABEL=PATH [--binary LABEL=PATH ...] [--seconds S] [--out FILE]

Only user space is counted (callgrind sees no kernel work), and only between a zeroing and a dump
taken around a steady wrk run against a warm server: start-up, discovery and the warm-up pulls are
not in the figure. Instruction counts repeat within a fraction of a percent from run to run where
times on these machines move by ±10 %; a change of a few percent is a real change. The routers run
with the epoll driver by default (`--driver io_uring` for the other), the same for every binary.
"""

import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the suite's processes, content and nginx set-up)

CASES = [
    # (case, router path, nginx reference, its path)
    ("v2", "/v2/", "return", "/v2/"),
    ("tag", "/v2/proxy/library/app/manifests/v1", "proxy", "/v2/proxy/library/app/manifests/v1"),
    ("digest", "/v2/proxy/library/app/manifests/{digest}", "static", "/v2/hub/library/app/manifests/{digest}"),
]


def valgrind(out_dir, name, argv):
    return ["valgrind", "--tool=callgrind", "--vgdb=yes", "--trace-children=no",
            f"--callgrind-out-file={out_dir}/{name}.%p.out"] + argv


def dumps(out_dir, name, pid):
    return sorted(glob.glob(f"{out_dir}/{name}.{pid}.out*"), key=os.path.getmtime)


def instructions_of(path):
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise SystemExit(f"{path}: no totals line")


class Counting(run.Bench):
    def measure(self, name, pid, port, path, conns):
        """Zeroes the counts of `pid` (under callgrind), runs wrk, dumps; instructions per request."""
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
        before = len(dumps(self.work, name, pid))
        argv = ["wrk", "-t1", f"-c{conns}", f"-d{self.args.seconds}s", "-H", f"Accept: {run.ACCEPT}",
                f"http://127.0.0.1:{port}{path}"]
        out = subprocess.run(run.pinned(run.LOAD_CPU, argv), capture_output=True, text=True, check=True).stdout
        if "Non-2xx" in out:
            raise SystemExit(f"wrk saw non-2xx answers on {path}:\n{out}")
        n = int(re.search(r"(\d+) requests in", out).group(1))
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
        end = time.time() + 30
        while len(dumps(self.work, name, pid)) <= before:
            if time.time() > end:
                raise SystemExit(f"{name}: callgrind wrote no dump")
            time.sleep(0.1)
        time.sleep(0.3)  # the dump is written whole before the next one is asked for
        ir = instructions_of(dumps(self.work, name, pid)[-1])
        return {"requests": n, "instructions": ir, "per_request": ir / max(n, 1)}

    def router_under(self, label, binary):
        port, metrics = run.free_port(), run.free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "WORKERS": "1",
            "IO_DRIVER": self.args.driver,
            "LISTEN_ADDR": f"127.0.0.1:{port}",
            "METRICS_ADDR": f"127.0.0.1:{metrics}",
            "LOG_LEVEL": "warn",
            "HARBOR_URL": f"http://127.0.0.1:{self.harbor_port}",
            "FANOUT_BUDGET_PER_IP": "1000000",
            "MAX_CONNECTIONS_PER_CLIENT": "0",
            "COALESCE_LINGER": "0",
        }
        name = f"router-{label}"
        p = self.spawn(valgrind(self.work, name, [binary]), name, env=env, cpu=run.SERVER_CPU)
        run.wait_port(port, name, p, limit=120)
        end = time.time() + 120
        while run.http_get(metrics, "/readyz")[0] != 200:
            if p.poll() is not None or time.time() > end:
                raise SystemExit(f"{name} is not ready: {open(self.log_path(name)).read()[-2000:]}")
            time.sleep(0.2)
        # The first requests under callgrind are slow (every code path is translated once), and a
        # 10 s client timeout can pass: ask again until the deadline.
        for path in ("/v2/proxy/library/app/manifests/v1", f"/v2/proxy/library/app/manifests/{self.digest}"):
            end = time.time() + 120
            while True:
                status, headers, _ = run.http_get(port, path, {"Accept": run.ACCEPT})
                if status == 200 and headers.get("docker-content-digest") == self.digest:
                    break
                if status not in (0, 503) or p.poll() is not None or time.time() > end:
                    raise SystemExit(f"{name}: {path} answered {status}: {open(self.log_path(name)).read()[-3000:]}")
                time.sleep(0.5)
        return p, port

    def nginx_under(self):
        """nginx answering all three reference paths, one process (no master), under callgrind."""
        w, d = self.www, self.digest
        port = run.free_port()
        conf = os.path.join(self.work, "nginx-ref.conf")
        with open(conf, "w") as f:
            f.write(f"""worker_processes 1;
master_process off;
daemon off;
pid {self.work}/nginx-ref.pid;
error_log {self.work}/nginx-ref-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  types {{ }}
  upstream harbor {{ server 127.0.0.1:{self.harbor_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location = /v2/ {{ default_type application/json; add_header Docker-Distribution-Api-Version registry/2.0; return 200 '{{}}'; }}
    location = /v2/hub/library/app/manifests/{d} {{ default_type {run.ACCEPT}; add_header Docker-Content-Digest {d}; alias {w}/manifest; }}
{run.PROXY_LOCATION}
  }}
}}
""")
        p = self.spawn(valgrind(self.work, "nginx", ["nginx", "-c", conf, "-p", self.work]), "nginx",
                       cpu=run.SERVER_CPU)
        run.wait_port(port, "nginx (reference)", p, limit=120)
        return p, port

    def count(self):
        self.content()
        self.start_hit_servers()
        results = {}
        servers = []
        for label, binary in self.args.binary:
            p, port = self.router_under(label, binary)
            servers.append((f"router-{label}", p, port, lambda c: c[1]))
        p, port = self.nginx_under()
        servers.append(("nginx", p, port, lambda c: c[3]))
        for case in CASES:
            for name, proc, port, path_of in servers:
                path = path_of(case).format(digest=self.digest)
                m = self.measure(name, proc.pid, port, path, self.args.conns)
                results.setdefault(case[0], {})[name] = m
                run.log(f"{case[0]:7} {name:22} {m['per_request']:10,.0f} instructions/request "
                        f"({m['requests']} requests)")
        return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", action="append", required=True, type=lambda v: tuple(v.split("=", 1)),
                    help="LABEL=PATH of a router binary; give several to compare")
    ap.add_argument("--seconds", type=int, default=5, help="seconds of wrk per case")
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--driver", default="epoll", help="the routers' IO_DRIVER (epoll or io_uring)")
    ap.add_argument("--blob-mib", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    bench = Counting(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        results = bench.count()
    finally:
        bench.stop_all()
    labels = [f"router-{label}" for label, _ in args.binary]
    print()
    head = ["case"] + labels + ["nginx"] + [f"{lab} ÷ nginx" for lab in labels]
    if len(labels) > 1:
        head += [f"{labels[-1]} ÷ {labels[0]}"]
    rows = [head]
    for case, by in results.items():
        row = [case] + [f"{by[n]['per_request']:,.0f}" for n in labels + ["nginx"]]
        row += [f"{by[n]['per_request'] / by['nginx']['per_request']:.2f}" for n in labels]
        if len(labels) > 1:
            row += [f"{by[labels[-1]]['per_request'] / by[labels[0]]['per_request']:.3f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"\nuser-space instructions per request (callgrind), one worker, IO_DRIVER={args.driver}, "
          f"{args.conns} connections, {args.seconds}s per case")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "binaries": dict(args.binary), "conns": args.conns, "seconds": args.seconds,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
