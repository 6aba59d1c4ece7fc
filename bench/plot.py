#!/usr/bin/env python3
"""Charts from one bench/run.py result: each scenario's router figure next to its nginx reference
(medians of the interleaved rounds), and every figure against its target. Written as PNG files."""

import json
import os
import sys


plt = None  # matplotlib.pyplot, imported by main() when charts are drawn
ROUTER = "#2b6cb0"
NGINX = "#a0aec0"


def bars(ax, title, labels, router, nginx, unit, ref_name):
    xs = range(len(labels))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], router, w, label="harbor-router", color=ROUTER)
    ax.bar([x + w / 2 for x in xs], nginx, w, label=ref_name, color=NGINX)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels)
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    ax.margins(y=0.12)

    def label(v):
        return f"{v:.1f}" if v < 100 else f"{v:,.0f}"

    for x, v in zip(xs, router):
        ax.annotate(label(v), (x - w / 2, v), ha="center", va="bottom", fontsize=7)
    for x, v in zip(xs, nginx):
        ax.annotate(label(v), (x + w / 2, v), ha="center", va="bottom", fontsize=7)


def markdown(result):
    """The figures as a Markdown table, for docs/benchmarks.md."""
    rows = ["| scenario | figure | measured | target | met |", "|---|---|---|---|---|"]
    for f in result["figures"]:
        v = f["value"]
        value = f"{v:.2f}" if isinstance(v, float) else str(v)
        unit = f" {f['unit']}" if f["unit"] else ""
        met = {True: "yes", False: "**no**", None: "—"}[f["met"]]
        rows.append(f"| {f['scenario']} | {f['figure']} | {value}{unit} | {f['target']} | {met} |")
    return "\n".join(rows)


def rollout(results, out):
    """One chart from bench/rollout.sh results (one per spread): Harbor's requests per blob, the
    bytes it sent ÷ the image, and the p99 time to pull, sharing on against off."""
    import statistics

    def med(r, mode, f):
        return statistics.median(f(run) for run in r["runs"][mode])

    panels = [
        ("Harbor requests per blob (lower is better)", "requests",
         lambda run: run["requests"].get("blobs (config and layer)", 0) / 2),
        ("Bytes Harbor sent ÷ image size", "×", lambda run: run["bytes_sent"] / max(run["image_bytes"], 1)),
        ("p99 time to pull, slow node aside", "s", lambda run: run["p99_s"]),
    ]
    labels = [f"{r['args']['nodes']} nodes\nover {r['args']['spread']:g} s" for r in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    for ax, (title, unit, f) in zip(axes, panels):
        bars(ax, title, labels, [med(r, "on", f) for r in results], [med(r, "off", f) for r in results],
             unit, "COALESCE_PULLS=false")
        ax.get_legend().remove()
    fig.legend(["COALESCE_PULLS=true (default)", "COALESCE_PULLS=false"], frameon=False,
               loc="lower center", ncol=2)
    a = results[0]["args"]
    fig.suptitle(f"A rollout through two router pods sharing Redis; Harbor at {a['latency_ms']:g} ms and {a['mbps']:g} Mbit/s a "
                 f"connection; medians of {a['rounds']} rounds")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = os.path.join(out, "rollout.png")
    fig.savefig(path, dpi=110)
    print(path)


def soak(result, out):
    """One chart from a bench/soak.sh report: requests and failures, latency, each pod's RSS and
    open descriptors, minute by minute, with every fault marked where it began."""
    minutes = result["minutes"]
    xs = [m["minute"] + 0.5 for m in minutes]
    fig, axes = plt.subplots(4, 1, figsize=(12, 11), sharex=True)
    a = axes[0]
    a.plot(xs, [m["requests"] for m in minutes], color=ROUTER, label="requests")
    a.set_ylabel("requests / min")
    b = a.twinx()
    b.bar(xs, [sum(m["explained"].values()) for m in minutes], 0.4, color=NGINX, label="explained failures")
    b.bar([x + 0.4 for x in xs], [sum(m["unexpected"].values()) for m in minutes], 0.4, color="#c53030",
          label="unexpected failures")
    b.set_ylabel("failures / min")
    lines = a.get_legend_handles_labels()
    more = b.get_legend_handles_labels()
    a.legend(lines[0] + more[0], lines[1] + more[1], frameon=False, loc="lower left", fontsize=8)
    a.set_title("Requests and failures (explained: the fault table's expected answers)")

    axes[1].plot(xs, [m["p50_ms"] for m in minutes], color=ROUTER, label="p50")
    axes[1].plot(xs, [m["p99_ms"] for m in minutes], color="#dd6b20", label="p99")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ms (log)")
    axes[1].set_title("Client latency, retries included")
    axes[1].legend(frameon=False, fontsize=8)

    pods = sorted({p for m in minutes for p in m["rss_kib"]})
    for pod in pods:
        axes[2].plot(xs, [m["rss_kib"].get(pod, float("nan")) / 1024 for m in minutes], label=pod)
        axes[3].plot(xs, [m["fds"].get(pod, float("nan")) for m in minutes], label=pod)
    axes[2].set_ylabel("MiB")
    axes[2].set_title("Resident memory per pod (a pod restarted starts a new series at its new size)")
    axes[2].legend(frameon=False, fontsize=8)
    axes[3].set_ylabel("descriptors")
    axes[3].set_title("Open descriptors per pod")
    axes[3].legend(frameon=False, fontsize=8)
    axes[3].set_xlabel("minute")

    for f in result["faults"]:
        t = f["start_s"] / 60
        for ax in axes:
            ax.axvline(t, color="#718096", lw=0.6, ls=":")
        axes[0].annotate(f["fault"], (t, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                         fontsize=6, va="top", ha="right", color="#4a5568")
    s = result["soak"]
    fig.suptitle(f"Soak: {s['minutes']:g} minutes, {s['clients']} clients, {s['requests']:,} requests, "
                 f"{s['unexpected']} unexpected failures, {s['faults']} faults; rss slope "
                 f"{s['rss_slope_kib_per_min']:.1f} KiB/min, fd slope {s['fd_slope_per_min']:.2f}/min", fontsize=10)
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "soak.png")
    fig.savefig(path, dpi=100)
    print(path)


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: bench/plot RESULT.json [OUT_DIR] | bench/plot --markdown RESULT.json")
    if sys.argv[1] == "--markdown":
        print(markdown(json.load(open(sys.argv[2]))))
        return
    result = json.load(open(sys.argv[1]))
    import matplotlib

    matplotlib.use("Agg")
    global plt
    import matplotlib.pyplot as plt

    if "soak" in result:
        # a bench/soak.sh report: bench/plot SOAK.json [OUT_DIR]
        soak(result, sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks"))
        return
    if "runs" in result:
        # bench/rollout.sh results, one file per spread: bench/plot A.json [B.json …]
        results = [json.load(open(f)) for f in sys.argv[1:] if f.endswith(".json")]
        rollout(results, os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks"))
        return

    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks")
    os.makedirs(out, exist_ok=True)
    med = {k: v["median"] for k, v in result["results"].items() if isinstance(v, dict) and "median" in v}
    note = f"{result['machine']['cores']} cores, {result['when']}; medians of interleaved rounds"
    written = []

    # Requests per second and CPU per request: the request-bound scenarios.
    cases = [("base", "nginx-return", "/v2/"), ("tag", "nginx-proxy", "tag (proxied)"),
             ("tag-p99", "nginx-proxy", "tag, 8 conns"), ("digest", "nginx-static", "digest")]
    cases = [c for c in cases if c[0] in med]
    if cases:
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = [c[2] for c in cases]
        bars(a, "Requests per second (higher is better)", labels,
             [med[s]["router"]["rps"] for s, _, _ in cases], [med[s][r]["rps"] for s, r, _ in cases],
             "req/s", "nginx (proxy_pass, return, or static file)")
        bars(b, "Server CPU per request (lower is better)", labels,
             [med[s]["router"]["cpu_us_per_req"] for s, _, _ in cases],
             [med[s][r]["cpu_us_per_req"] for s, r, _ in cases], "µs", "nginx")
        fig.suptitle(note, fontsize=9)
        fig.tight_layout()
        path = os.path.join(out, "requests.png")
        fig.savefig(path, dpi=110)
        written.append(path)

    blobs = [s for s in ("blob-1", "blob-16") if s in med]
    if blobs:
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = [s.replace("blob-", "") + " client(s)" for s in blobs]
        bars(a, "Blob throughput (higher is better)", labels,
             [med[s]["router"]["bytes_per_s"] / (1 << 20) for s in blobs],
             [med[s]["nginx-proxy"]["bytes_per_s"] / (1 << 20) for s in blobs], "MiB/s", "nginx proxy_pass")
        bars(b, "Server CPU per MiB (lower is better)", labels,
             [med[s]["router"]["cpu_us_per_mib"] for s in blobs],
             [med[s]["nginx-proxy"]["cpu_us_per_mib"] for s in blobs], "µs/MiB", "nginx proxy_pass")
        fig.suptitle(note, fontsize=9)
        fig.tight_layout()
        path = os.path.join(out, "blobs.png")
        fig.savefig(path, dpi=110)
        written.append(path)

    # Cold fan-out latency: routed vs the project's own.
    fans = [k for k in ("cold-fanout-3", "cold-fanout-50") if k in result["results"]]
    if fans:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels = [k.rsplit("-", 1)[1] + " projects" for k in fans]
        bars(ax, "Cold pull, time to first byte (median)", labels,
             [result["results"][k]["routed_us"]["p50"] for k in fans],
             [result["results"][k]["direct_us"]["p50"] for k in fans], "µs", "the project asked directly")
        fig.suptitle(note, fontsize=9)
        fig.tight_layout()
        path = os.path.join(out, "cold-fanout.png")
        fig.savefig(path, dpi=110)
        written.append(path)

    for p in written:
        print(p)


if __name__ == "__main__":
    main()
