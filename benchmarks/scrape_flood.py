"""Scrapes of /metrics while another process floods the endpoint with connections.

An attacker process holds N connections to the endpoint (sending nothing, or half a request),
reopening each one the server closes; meanwhile this process scrapes as fast as it can, with
optional busy processes loading every core and a busy Python thread in this process (a model's
thread taking the GIL). Prints scrapes answered and failed, and the latency spread.

    python benchmarks/scrape_flood.py --seconds 40 --mode silent --busy-processes 2 --busy-thread
    python benchmarks/scrape_flood.py --no-deferred-accept   # as on a platform without it
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reliability"))

from prometheus_client import CollectorRegistry, Gauge  # noqa: E402

import moewatch.export.http as metrics_http  # noqa: E402
from test_hostile_clients import scrape, start_attacker  # noqa: E402


def scrape_once(port: int) -> float:
    """Seconds for one whole GET /metrics; raises OSError if it is not answered 200."""
    t0 = time.monotonic()
    scrape(port, timeout=3)
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--mode", choices=["silent", "partial"], default="silent")
    parser.add_argument("--busy-processes", type=int, default=0)
    parser.add_argument("--busy-thread", action="store_true")
    parser.add_argument("--no-deferred-accept", action="store_true")
    args = parser.parse_args()
    if args.no_deferred_accept:
        metrics_http._defer_accept = lambda listener: None
    registry = CollectorRegistry()
    Gauge("demo_value", "a value", registry=registry).set(1)
    server = metrics_http.MetricsServer(registry, "127.0.0.1", 0)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy_processes)]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    if args.busy_thread:
        threading.Thread(target=spin, daemon=True).start()
    attacker = start_attacker(server.server_port, args.connections, args.seconds + 5, args.mode)
    latencies, failures = [], 0
    try:
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            try:
                latencies.append(scrape_once(server.server_port))
            except OSError as error:
                failures += 1
                print("failed:", type(error).__name__, error, flush=True)
            time.sleep(0.01)
    finally:
        stop.set()
        attacker.kill()
        for proc in busy:
            proc.kill()
        server.close()
    latencies.sort()
    ms = [1e3 * latencies[int(q * (len(latencies) - 1))] for q in (0.5, 0.99, 1.0)] if latencies else [0, 0, 0]
    print(f"{args.mode} flood of {args.connections}, busy processes {args.busy_processes}, busy thread "
          f"{args.busy_thread}, deferred accept {not args.no_deferred_accept}: {len(latencies)} answered, "
          f"{failures} failed; latency median {ms[0]:.1f} ms, p99 {ms[1]:.0f} ms, max {ms[2]:.0f} ms; "
          f"{server.evicted} connections evicted")


if __name__ == "__main__":
    main()
