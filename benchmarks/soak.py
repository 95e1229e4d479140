"""Soak: many tiny monitored forwards with every exporter on; host memory, threads and file
descriptors must stay flat.

    python benchmarks/soak.py                      # 1,000,000 forwards
    python benchmarks/soak.py --forwards 200000 --report 20

The model is one gate (a Linear, 8 -> 4 experts, top-2) called on 4 tokens per forward, so
the run measures moewatch, not a model. Its router is skewed onto two experts: the detector
reports a collapse in every window, so each part is busy the whole time.

Exporters, all on at once:
* Prometheus: ``serve_prometheus(port=0)``, scraped over HTTP every ``--scrape-seconds``;
* OpenTelemetry: a ``MeterProvider`` with an ``InMemoryMetricReader``, collected at every scrape;
* Alertmanager: ``alertmanager_url`` on a local port where nothing listens (every post fails,
  is counted and backs off);
* dumps: ``dump_dir`` (the automatic collapse dump and the shutdown dump) plus a manual dump
  over the same file at every report.

Every ``--report`` percent it prints a row: forwards, seconds, RSS (MiB), OS threads, Python
threads, open file descriptors, windows closed, internal errors by component. At the end it
compares the second row (after warm-up) with the last and exits 1 if RSS grew by more than
``--rss-slack-mib`` or the thread or descriptor counts grew (a count that falls is something
the process held before the soak being closed: a leak grows).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request

import torch
from torch import nn


class OneGate(nn.Module):
    """A model that is only a router: [B, H] -> router logits [B, E]."""

    def __init__(self, hidden: int = 8, experts: int = 4):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=True)
        with torch.no_grad():
            self.gate.bias.copy_(torch.tensor([4.0, 4.0, -4.0, -4.0])[:experts])  # two experts take it all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x)


def proc_status() -> dict:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return {"rss_mib": int(out["VmRSS"].split()[0]) / 1024, "os_threads": int(out["Threads"])}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwards", type=int, default=1_000_000)
    parser.add_argument("--tokens", type=int, default=4, help="tokens per forward")
    parser.add_argument("--report", type=int, default=10, help="print a row every this many percent")
    parser.add_argument("--scrape-seconds", type=float, default=1.0)
    parser.add_argument("--window-seconds", type=float, default=0.5)
    parser.add_argument("--rss-slack-mib", type=float, default=16.0)
    args = parser.parse_args(argv)

    import moewatch
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    torch.set_num_threads(1)
    model = OneGate()
    x = torch.randn(args.tokens, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)  # before attach: the unmonitored output
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    work = tempfile.mkdtemp(prefix="moewatch-soak-")
    dump_dir = os.path.join(work, "dumps")
    mon = moewatch.attach(model, gates="gate", top_k=2, model_name="soak", window_seconds=args.window_seconds,
                          window_tokens=10**9, ring_windows=256, sample_decisions=0.01, decision_slots=4096,
                          meter_provider=provider, alertmanager_url=f"http://127.0.0.1:{dead_port()}",
                          export_timeout_seconds=1.0, dump_dir=dump_dir, dump_max_bytes=64 * 2**20)
    port = mon.serve_prometheus(port=0)
    url = f"http://127.0.0.1:{port}/metrics"
    stop = threading.Event()
    scrapes = {"ok": 0, "failed": 0, "bytes": 0}

    quiet = threading.Lock()  # held by a scrape; taken to measure between scrapes

    def scraper() -> None:  # what a Prometheus server and an OTel exporter do, on their own thread
        while not stop.wait(args.scrape_seconds):
            with quiet:
                try:
                    with urllib.request.urlopen(url, timeout=10) as response:
                        scrapes["bytes"] = len(response.read())
                    reader.get_metrics_data()
                    scrapes["ok"] += 1
                except Exception as error:  # reported at the end; the soak goes on
                    scrapes["failed"] += 1
                    print(f"scrape failed: {error}", file=sys.stderr)

    def measure(floor: tuple = None) -> tuple:
        """(RSS MiB, OS threads, Python threads, open fds) between scrapes; the least of several
        reads, so that what is open only for a moment (a server thread finishing its last request,
        the dump writer's file while it writes one) is not counted as a leak. With ``floor`` (the
        first row's threads and fds), reads go on for up to five seconds until none of them is
        above it: a leaked thread or descriptor stays open through every read, a passing one does
        not (one thread outlived a second of reads once, on a loaded 2-core machine)."""
        with quiet:
            reads, deadline = [], time.perf_counter() + 5.0
            while True:
                status = proc_status()
                reads.append((status["rss_mib"], status["os_threads"], threading.active_count(), open_fds()))
                least = tuple(min(r[i] for r in reads) for i in range(4))
                if len(reads) >= 5 and (floor is None or all(now <= then for now, then in zip(least[1:], floor))
                                        or time.perf_counter() > deadline):
                    return least
                time.sleep(0.01)

    scraping = threading.Thread(target=scraper, name="soak-scraper", daemon=True)
    scraping.start()

    every = max(1, args.forwards * args.report // 100)
    rows = []
    header = ("| forwards | seconds | RSS MiB | OS threads | Python threads | open fds | windows | "
              "scrapes | internal errors |")
    print(header)
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(1, args.forwards + 1):
            out = model(x)
            if i % every == 0 or i == args.forwards:
                if not torch.equal(out, expected):
                    print("output changed under the monitor", file=sys.stderr)
                    return 2
                mon.dump(os.path.join(work, "manual.parquet"))
                errors = ", ".join(f"{k} {v}" for k, v in sorted(mon.error_counts().items())) or "-"
                windows = mon.windows()
                floor = rows[1][3:6] if len(rows) > 1 else None  # row 0 is warm-up (see below)
                row = (i, time.perf_counter() - start, *measure(floor),
                       int(windows["window"].max() + 1) if len(windows) else 0, scrapes["ok"], errors)
                rows.append(row)
                print(f"| {row[0]:,} | {row[1]:.0f} | {row[2]:.1f} | {row[3]} | {row[4]} | {row[5]} | "
                      f"{row[6]:,} | {row[7]:,} | {row[8]} |", flush=True)
    stop.set()
    scraping.join()
    counted = int(mon.counts()["gate"].sum())
    mon.detach()
    dumps = sorted(os.listdir(dump_dir))
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nassignments counted {counted:,} (expected {args.forwards * args.tokens * 2:,}); "
          f"dumps in dump_dir: {len(dumps)}; last /metrics size {scrapes['bytes']:,} bytes; "
          f"failed scrapes {scrapes['failed']}")
    if len(rows) < 3:
        return 0
    first, last = rows[1], rows[-1]  # row 0 is warm-up (imports, first windows, caches)
    growth = last[2] - first[2]
    print(f"RSS {first[2]:.1f} -> {last[2]:.1f} MiB ({growth:+.1f}); OS threads {first[3]} -> {last[3]}; "
          f"Python threads {first[4]} -> {last[4]}; open fds {first[5]} -> {last[5]}")
    flat = growth <= args.rss_slack_mib and all(end <= begin for begin, end in zip(first[3:6], last[3:6]))
    ok = flat and counted == args.forwards * args.tokens * 2 and scrapes["failed"] == 0
    print("flat" if ok else "NOT FLAT or miscounted")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
