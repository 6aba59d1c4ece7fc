#!/usr/bin/env python3
"""A rollout through the router: N simulated nodes pull one new image at once, the way containerd
does (HEAD the tag, GET the index by digest, the platform's manifest, its config and its layers),
through two router pods in front of the test bed's stand-in Harbor and the real registry. Between
the routers and Harbor sits a shaping proxy that gives every connection an upstream's latency and
bandwidth, and counts what Harbor was asked for and sent. One node reads its layer slowly.

The same rollout runs with COALESCE_PULLS on and off, each on a fresh stand-in (Harbor's cache
empty) and fresh routers, interleaved for --rounds rounds. Printed per mode (medians over rounds):
Harbor's requests per object, bytes Harbor sent ÷ the image's size, p50/p99 time to pull, failed
pulls (a body that does not hash to its digest counts), and the routers' peak RSS.

The two pods share a real Redis (a `redis-server` master and one `redis-sentinel`, started here on
free loopback ports), as in a cluster: what one pod learns (which project has the image) the other
reads. Not modelled: Harbor's own upstream behind it (the proxy plays Harbor with an upstream's
speed).
"""

import argparse
import asyncio
import hashlib
import http.client
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

IMAGE = "library/nginx"
TAG = "latest"
ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


def log(msg):
    print(f"==> {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the shaping proxy (Harbor's speed)

class Shaper:
    """A TCP proxy in front of the stand-in: each request's answer waits `latency` before its first
    byte and flows at `rate` bytes/s per connection. Counts requests by kind and bytes sent."""

    def __init__(self, upstream_port, latency, rate):
        self.upstream_port, self.latency, self.rate = upstream_port, latency, rate
        self.requests = {}
        self.bytes_sent = 0
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.port = None
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._conn, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    @staticmethod
    def _kind(head):
        """What a request is asking for (None: not a pull)."""
        line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        parts = line.split(" ")
        if len(parts) < 2 or not parts[1].startswith("/v2/"):
            return None
        path = parts[1].split("?")[0]
        m = re.match(r"/v2/[^/]+/(.+)/(manifests|blobs)/(.+)$", path)
        if not m:
            return None
        if m.group(2) == "blobs":
            return "blobs (config and layer)"
        if m.group(3).startswith("sha256:"):
            return "manifests by digest (index and platform)"
        return f"{parts[0]} manifest by tag"

    def _count(self, kind, status):
        """Counts an answer: by what was asked, with the answers that are not the object apart
        (a cold core's token challenge, a fan-out's miss in a project without the image)."""
        if kind is None:
            return
        if status == 401:
            kind = f"{kind}: 401 token challenges"
        elif status == 404:
            kind = f"{kind}: 404 from projects without it (fan-out)"
        with self.lock:
            self.requests[kind] = self.requests.get(kind, 0) + 1

    async def _conn(self, reader, writer):
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        pending = asyncio.Event()
        # What each request on this connection asked for, in order (HTTP/1.1: answers come in the
        # order of the requests, one after the other).
        kinds = []

        async def client_to_upstream():
            buf = b""
            try:
                while data := await reader.read(65536):
                    buf += data
                    while b"\r\n\r\n" in buf:
                        head, buf = buf.split(b"\r\n\r\n", 1)
                        kinds.append(self._kind(head))
                        pending.set()
                    up_w.write(data)
                    await up_w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                up_w.close()

        async def upstream_to_client():
            try:
                while True:
                    data = await up_r.read(16384)
                    if not data:
                        break
                    if pending.is_set():
                        # A new answer starts: an upstream's round trip first.
                        pending.clear()
                        line = data.split(b"\r\n", 1)[0].split(b" ")
                        status = int(line[1]) if len(line) > 1 and line[1].isdigit() else 0
                        self._count(kinds.pop(0) if kinds else None, status)
                        await asyncio.sleep(self.latency)
                    writer.write(data)
                    await writer.drain()
                    with self.lock:
                        self.bytes_sent += len(data)
                    await asyncio.sleep(len(data) / self.rate)
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        await asyncio.gather(client_to_upstream(), upstream_to_client())

    def counts(self):
        with self.lock:
            return dict(self.requests), self.bytes_sent


# ------------------------------------------------------------------ processes

class Procs:
    def __init__(self):
        self.procs = []
        self.dir = tempfile.mkdtemp(prefix="rollout-")

    def spawn(self, argv, name, env=None):
        out = open(os.path.join(self.dir, f"{name}.out"), "w+")
        err = open(os.path.join(self.dir, f"{name}.err"), "w")
        p = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        p.out_path = out.name
        self.procs.append(p)
        return p

    def wait_line(self, p, pattern, limit=60):
        end = time.time() + limit
        while time.time() < end:
            with open(p.out_path) as f:
                for line in f:
                    if pattern in line:
                        return line
            if p.poll() is not None:
                raise SystemExit(f"{p.args[0]} exited: {open(p.out_path).read()[-2000:]}")
            time.sleep(0.05)
        raise SystemExit(f"{p.args[0]}: no line with {pattern!r}")

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_cli(port, *args):
    r = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10)
    return r.stdout.strip()


def start_redis(procs):
    """A Redis master and one Sentinel watching it, on free loopback ports; the Sentinel's port."""
    for _ in range(5):
        master = free_port()
        data = os.path.join(procs.dir, f"redis-{master}")
        os.makedirs(data, exist_ok=True)
        p = procs.spawn(["redis-server", "--port", str(master), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--dir", data], f"redis-{master}")
        end = time.time() + 10
        while time.time() < end and p.poll() is None and redis_cli(master, "ping") != "PONG":
            time.sleep(0.05)
        if p.poll() is None and redis_cli(master, "ping") == "PONG":
            break
    else:
        raise SystemExit("redis-server never answered")
    for _ in range(5):
        port = free_port()
        conf = os.path.join(procs.dir, f"sentinel-{port}.conf")
        with open(conf, "w") as f:
            f.write(f"port {port}\nbind 127.0.0.1\ndir {procs.dir}\n"
                    f"sentinel monitor mymaster 127.0.0.1 {master} 1\n")
        p = procs.spawn(["redis-sentinel", conf], f"sentinel-{port}")
        end = time.time() + 10
        want = ["127.0.0.1", str(master)]
        while time.time() < end and p.poll() is None:
            if redis_cli(port, "sentinel", "get-master-addr-by-name", "mymaster").split() == want:
                return port
            time.sleep(0.05)
    raise SystemExit("redis-sentinel never named the master")


def redis_up(metrics_port):
    c = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=5)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    return 'harbor_router_redis_state{state="up"} 1' in text


def peak_rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------ one node's pull

def sha256(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def pull(port, slow):
    """One node's pull; returns (seconds, ok, body bytes pulled)."""
    start = time.perf_counter()
    pulled = [0]
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def get(method, path, accept=ACCEPT, read_slowly=False):
        c.request(method, path, headers={"Accept": accept} if accept else {})
        r = c.getresponse()
        if read_slowly:
            body = b""
            while chunk := r.read(16384):
                body += chunk
                time.sleep(0.05)
        else:
            body = r.read()
        pulled[0] += len(body)
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), body

    base = f"/v2/proxy/{IMAGE}"
    try:
        st, h, _ = get("HEAD", f"{base}/manifests/{TAG}")
        digest = h.get("docker-content-digest")
        if st != 200 or not digest:
            return time.perf_counter() - start, False, pulled[0]
        st, _, index = get("GET", f"{base}/manifests/{digest}")
        if st != 200 or sha256(index) != digest:
            return time.perf_counter() - start, False, pulled[0]
        platform = next(m for m in json.loads(index)["manifests"]
                        if m.get("platform", {}).get("architecture") == "amd64")
        st, _, manifest = get("GET", f"{base}/manifests/{platform['digest']}")
        if st != 200 or sha256(manifest) != platform["digest"]:
            return time.perf_counter() - start, False, pulled[0]
        m = json.loads(manifest)
        for blob in [m["config"]] + m["layers"]:
            st, _, body = get("GET", f"{base}/blobs/{blob['digest']}", accept=None,
                              read_slowly=slow and blob in m["layers"])
            if st != 200 or sha256(body) != blob["digest"]:
                return time.perf_counter() - start, False, pulled[0]
        return time.perf_counter() - start, True, pulled[0]
    except (OSError, http.client.HTTPException, StopIteration, ValueError, KeyError):
        return time.perf_counter() - start, False, pulled[0]
    finally:
        c.close()


# ------------------------------------------------------------------ one rollout

def rollout(args, coalesce):
    procs = Procs()
    try:
        standin = procs.spawn([args.standin], "standin")
        v = json.loads(procs.wait_line(standin, "harbor_url"))
        harbor_port = int(v["harbor_url"].rsplit(":", 1)[1])
        shaper = Shaper(harbor_port, args.latency_ms / 1000, args.mbps * 1e6 / 8)
        sentinel = start_redis(procs)
        routers = []
        for i in range(2):
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HARBOR_URL": f"http://127.0.0.1:{shaper.port}",
                "HARBOR_USERNAME": v["robot_user"],
                "HARBOR_PASSWORD": v["robot_password"],
                "LISTEN_ADDR": "127.0.0.1:0",
                "METRICS_ADDR": "127.0.0.1:0",
                "LOG_FORMAT": "json",
                "LOG_LEVEL": "info",
                "WORKERS": "2",
                "COALESCE_PULLS": "true" if coalesce else "false",
                # Every simulated node connects from 127.0.0.1.
                "MAX_CONNECTIONS_PER_CLIENT": "0",
                "FANOUT_BUDGET_PER_IP": "1000000",
                "REDIS_SENTINELS": f"127.0.0.1:{sentinel}",
                "REDIS_MASTER_NAME": "mymaster",
            }
            if args.linger is not None:
                env["COALESCE_LINGER"] = args.linger
            r = procs.spawn([args.binary], f"router-{i}", env=env)
            line = json.loads(procs.wait_line(r, '"message":"listening"'))
            r.port = int(line["addr"].rsplit(":", 1)[1])
            r.metrics = int(line["metrics_addr"].rsplit(":", 1)[1])
            routers.append(r)
        for r in routers:
            end = time.time() + 60
            while True:
                try:
                    c = http.client.HTTPConnection("127.0.0.1", r.metrics, timeout=5)
                    c.request("GET", "/readyz")
                    if c.getresponse().status == 200 and redis_up(r.metrics):
                        break
                except OSError:
                    pass
                if time.time() > end:
                    raise SystemExit("a router never became ready with Redis up")
                time.sleep(0.05)
        base_counts, base_bytes = shaper.counts()
        rng = random.Random(42)
        starts = sorted(rng.uniform(0, args.spread) for _ in range(args.nodes))
        results = [None] * args.nodes
        t0 = time.perf_counter()

        def node(i):
            delay = t0 + starts[i] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            results[i] = pull(routers[i % 2].port, slow=(i == args.nodes // 2))

        threads = [threading.Thread(target=node, args=(i,)) for i in range(args.nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        counts, sent = shaper.counts()
        counts = {k: n - base_counts.get(k, 0) for k, n in counts.items() if n - base_counts.get(k, 0)}
        times = sorted(t for t, ok, _ in results if ok)
        slow_time = results[args.nodes // 2][0]
        others = sorted(t for i, (t, ok, _) in enumerate(results) if ok and i != args.nodes // 2)
        size = max(n for _, ok, n in results if ok) if times else 0
        rss = max(peak_rss_kib(r.pid) for r in routers)
        return {
            "requests": counts,
            "bytes_sent": sent - base_bytes,
            "failed": sum(1 for _, ok, _ in results if not ok),
            "image_bytes": size,
            "p50_s": statistics.median(times) if times else float("nan"),
            "p99_s": others[min(len(others) - 1, int(len(others) * 0.99))] if others else float("nan"),
            "slow_node_s": slow_time,
            "rss_kib": rss,
        }
    finally:
        procs.stop_all()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--standin", required=True)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--spread", type=float, default=2.0, help="seconds over which the nodes start")
    ap.add_argument("--latency-ms", type=float, default=50)
    ap.add_argument("--mbps", type=float, default=100, help="upstream bandwidth per connection, Mbit/s")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--linger", help="COALESCE_LINGER for the routers (default: theirs)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.smoke:
        args.nodes, args.rounds, args.spread = 8, 1, 0.2
    runs = {"on": [], "off": []}
    for rnd in range(args.rounds):
        for mode in ("on", "off"):
            log(f"round {rnd + 1}: COALESCE_PULLS {mode}, {args.nodes} nodes")
            r = rollout(args, mode == "on")
            log(f"  {json.dumps(r)}")
            runs[mode].append(r)

    def med(mode, f):
        return statistics.median(f(r) for r in runs[mode])

    kinds = sorted({k for rs in runs.values() for r in rs for k in r["requests"]})
    objects = {"blobs (config and layer)": 2, "manifests by digest (index and platform)": 2}
    size = max(r["image_bytes"] for rs in runs.values() for r in rs) or 1
    print(f"\nrollout: {args.nodes} nodes over {args.spread:.1f} s, two router pods (2 workers each) "
          f"sharing Redis, COALESCE_LINGER {args.linger or 'default'}, "
          f"Harbor at {args.latency_ms:.0f} ms and {args.mbps:.0f} Mbit/s a connection; image {size} "
          f"bytes; medians of {args.rounds} round(s); Harbor's answers that are not the object are counted "
          f"apart: token challenges (a cold core's first request to a project is answered 401) and "
          f"fan-out misses (404 from the projects without the image)\n")
    print(f"{'figure':84} {'sharing on':>12} {'sharing off':>12}")
    for k in kinds:
        n = next((n for o, n in objects.items() if k.startswith(o)), 1)
        print(f"{'Harbor requests per object: ' + k:84} {med('on', lambda r: r['requests'].get(k, 0)) / n:>12.1f} "
              f"{med('off', lambda r: r['requests'].get(k, 0)) / n:>12.1f}")
    print(f"{'bytes Harbor sent ÷ image size':84} {med('on', lambda r: r['bytes_sent']) / size:>12.1f} "
          f"{med('off', lambda r: r['bytes_sent']) / size:>12.1f}")
    for label, f in [("p50 time to pull (s)", lambda r: r["p50_s"]),
                     ("p99 time to pull, slow node aside (s)", lambda r: r["p99_s"]),
                     ("slow node's time to pull (s)", lambda r: r["slow_node_s"]),
                     ("failed pulls", lambda r: r["failed"]),
                     ("router peak RSS (MiB)", lambda r: r["rss_kib"] / 1024)]:
        print(f"{label:84} {med('on', f):>12.3f} {med('off', f):>12.3f}")
    out = args.out or os.path.join("bench", "results", time.strftime("rollout-%Y%m%dT%H%M%S.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "image_bytes": size, "runs": runs}, f, indent=1)
    if any(r["failed"] for rs in runs.values() for r in rs):
        sys.exit("rollout: some pulls failed")


if __name__ == "__main__":
    main()
