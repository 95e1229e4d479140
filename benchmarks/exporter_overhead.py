#!/usr/bin/env python3
"""Forward latency of a monitored model while its Alertmanager and OTLP endpoints misbehave.

Runs the same monitored forwards with both exporters pointed at: a healthy endpoint, a dead one
(connection refused), one that hangs (accepts, never answers), and one that answers HTTP 500.
The router is pushed in and out of collapse every few windows, so the alert client always has
state changes to send, and OTLP exports every 0.2 s. Prints latency per case and its ratio to
the healthy case: a ratio near 1.0 means the endpoint's failure costs the model nothing.

    python benchmarks/exporter_overhead.py [--forwards 1000] [--rounds 5] [--tokens 128]
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import moewatch  # noqa: E402
from tests.tiny_models import tiny_mixtral  # noqa: E402


class Endpoint:
    """An HTTP endpoint that answers 200, answers 500, or holds every request ("hang")."""

    def __init__(self, mode: str):
        release = self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if mode == "hang":
                    release.wait(30)
                    return
                self.send_response(500 if mode == "error" else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def collapse_hook(state: Dict[str, bool]):
    def hook(module, args, output):
        if not state["on"]:
            return None
        logits = output[0].clone()
        logits[:, :2] += 50.0
        top, indices = torch.topk(torch.softmax(logits, -1), module.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), indices
    return hook


def measure(model, url: Optional[str], forwards: int, tokens: int, state) -> Dict[str, list]:
    """Latencies (seconds) of ``forwards`` monitored forwards; a window closes every 8 forwards."""
    options = {} if url is None else {"alertmanager_url": url, "otlp_endpoint": url,
                                      "otlp_interval_seconds": 0.2, "alert_resend_seconds": 1.0,
                                      "export_timeout_seconds": 0.5}
    ids = torch.randint(0, 128, (1, tokens), generator=torch.Generator().manual_seed(0))
    latencies: List[float] = []
    with moewatch.attach(model, model_name="bench", window_seconds=0.05, **options) as mon:
        with torch.no_grad():
            for i in range(forwards):
                state["on"] = (i // 24) % 2 == 1  # collapse on and off: alerts fire and resolve
                start = time.perf_counter()
                model(input_ids=ids)
                latencies.append(time.perf_counter() - start)
                if i % 8 == 7:
                    mon.flush()  # the alert client's listener runs here, on the model's thread
        errors = mon.errors.counts()
    return {"latencies": latencies, "failures": [sum(v for k, v in errors.items() if k in ("alertmanager", "otlp"))]}


CASES = [("no exporters", None), ("healthy", "ok"), ("dead", "dead"), ("hanging", "hang"), ("HTTP 500", "error")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forwards", type=int, default=1000, help="per case, over all rounds")
    parser.add_argument("--rounds", type=int, default=5, help="cases are interleaved round by round")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)  # failed exports are the point here
    logging.getLogger("moewatch").setLevel(logging.ERROR)
    model = tiny_mixtral()
    state = {"on": False}
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            module.register_forward_hook(collapse_hook(state))
    with torch.no_grad():  # warm up
        for _ in range(10):
            model(input_ids=torch.randint(0, 128, (1, args.tokens)))
    endpoints = {mode: Endpoint(mode) for mode in ("ok", "hang", "error")}
    results: Dict[str, Dict[str, list]] = {label: {"latencies": [], "failures": []} for label, _ in CASES}
    per_round = max(8, args.forwards // args.rounds)
    try:
        # Interleaved rounds: a machine's load changes hit every case alike.
        for _ in range(args.rounds):
            for label, mode in CASES:
                url = None if mode is None else (dead_url() if mode == "dead" else endpoints[mode].url)
                got = measure(model, url, per_round, args.tokens, state)
                for key in got:
                    results[label][key] += got[key]
    finally:
        for endpoint in endpoints.values():
            endpoint.stop()
    healthy = summary(results["healthy"]["latencies"])
    print(f"forward latency: {args.rounds} interleaved rounds x {per_round} forwards of {args.tokens} tokens "
          f"(tiny Mixtral, {torch.get_num_threads()} CPU threads)")
    print(f"{'endpoint':<14}{'median ms':>11}{'p90 ms':>10}{'median/healthy':>16}{'p90/healthy':>13}"
          f"{'failures':>10}")
    for label, r in results.items():
        s = summary(r["latencies"])
        print(f"{label:<14}{s['median'] * 1e3:>11.3f}{s['p90'] * 1e3:>10.3f}{s['median'] / healthy['median']:>16.3f}"
              f"{s['p90'] / healthy['p90']:>13.3f}{sum(r['failures']):>10d}")


def summary(latencies: List[float]) -> Dict[str, float]:
    ordered = sorted(latencies)
    return {"median": statistics.median(ordered), "p90": ordered[int(0.9 * (len(ordered) - 1))]}


if __name__ == "__main__":
    main()
