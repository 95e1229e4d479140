"""Clients that misbehave: connections held open against /metrics, a model name that is not
valid UTF-8, an Alertmanager address that redirects (SECURITY.md).

The attacker is a real client in another process (its descriptors are not the model's); the
endpoint is the real one ``serve_prometheus`` starts; the receivers are real HTTP servers.
"""
from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

import moewatch
import moewatch.export.http as metrics_http
from moewatch.export.alertmanager import AlertmanagerExporter
from moewatch.export.http import MAX_CONNECTIONS, MetricsServer
from moewatch.export.prometheus import PrometheusEndpoint

from reliability_helpers import ToyMoE, forward

HERE = os.path.dirname(os.path.abspath(__file__))

# Holds N connections to 127.0.0.1:PORT, each with half a request sent (or, SILENT, nothing);
# reopens any the server closes, for SECONDS. Prints "holding" once all are open.
ATTACKER = r'''
import select, socket, sys, time
port, n, seconds, silent = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "silent"
def open_one():
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if not silent:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
    s.setblocking(False)
    return s
socks, opened = [], 0
for _ in range(n):
    try:
        socks.append(open_one()); opened += 1
    except OSError:
        pass
print("holding", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    readable, _, _ = select.select(socks, [], [], 0.05)
    for s in readable:
        try:
            gone = s.recv(1) == b""
        except OSError:
            gone = True
        if gone:
            socks.remove(s); s.close()
            try:
                socks.append(open_one()); opened += 1
            except OSError:
                pass
print("opened", opened, "held", len(socks), flush=True)
'''


def start_attacker(port: int, connections: int, seconds: float, mode: str = "partial") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", ATTACKER, str(port), str(connections), str(seconds), mode],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def scrape(port: int, timeout: float = 3.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        return response.read().decode()


def open_fds() -> int:
    """The process's open sockets (what the endpoint's connections hold). Pipes are left out:
    the suite's vLLM engine runs start in the background during these tests (conftest), each
    child with pipes to this process."""
    sockets = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            sockets += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # closed meanwhile
            pass
    return sockets


def os_threads() -> int:
    """The process's threads less those of the suite's background vLLM engine runs (the pool's
    ``engine-run`` threads and each child's output reader, which come and go meanwhile)."""
    def engine_runs() -> int:
        return sum(1 for thread in threading.enumerate() if thread.name.startswith("engine-run"))

    before = engine_runs()
    tasks = len(os.listdir("/proc/self/task"))
    return tasks - max(before, engine_runs())  # one starting meanwhile is counted as one of them


def toy_monitor(**options):
    model = ToyMoE()
    mon = moewatch.attach(model, gates="routers.*", top_k=2, background=False, window_tokens=10, **options)
    forward(model, torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(0)))
    mon.flush()
    return model, mon


DEFERS_ACCEPT = hasattr(socket, "TCP_DEFER_ACCEPT")


@pytest.mark.parametrize("mode", ["partial", "silent", "silent, no deferred accept"])
def test_scrapes_are_answered_while_300_connections_are_held(mode, monkeypatch):
    """300 connections holding half a request (or nothing), reopened as fast as the server
    closes them: every scrape is answered quickly, the endpoint never holds more than its cap,
    and the process's threads and descriptors do not grow. Where the kernel defers accepting
    (Linux), silent connections wait there; the last case runs the server as on a platform
    without it, where the cap and the grace period alone keep scrapes answered."""
    if mode == "silent, no deferred accept":
        monkeypatch.setattr(metrics_http, "_defer_accept", lambda listener: None)
    model, mon = toy_monitor()
    try:
        port = mon.serve_prometheus(port=0)
        server = next(e for e in mon._exporters if isinstance(e, PrometheusEndpoint))._server
        scrape(port)
        threads, fds = os_threads(), open_fds()
        attacker = start_attacker(port, 300, 8.0, mode.split(",")[0])
        latencies, held, fd_counts, thread_counts = [], [], [], []
        try:
            end = time.monotonic() + 5.0
            while time.monotonic() < end:
                t0 = time.monotonic()
                text = scrape(port)
                latencies.append(time.monotonic() - t0)
                assert "moewatch_gate_tokens_total" in text
                held.append(server.connections)
                fd_counts.append(open_fds())
                thread_counts.append(os_threads())
                time.sleep(0.1)
            attacker_report = attacker.stdout.readline().split()  # "opened N held M" at its end
        finally:
            attacker.kill()
            attacker.wait()
        assert len(latencies) >= 10 and max(latencies) < 2.0, latencies
        assert max(held) <= MAX_CONNECTIONS, held
        if mode == "silent" and DEFERS_ACCEPT:
            # the attack was real: the attacker held its 300 connections open to the end, in
            # the kernel's queue (none of them cost this process a descriptor)
            assert int(attacker_report[3]) == 300, attacker_report
        else:  # the attack was real: many connections were closed to make room
            assert server.evicted > 100, (server.evicted, attacker_report)
        # the cap, one connection just accepted before the oldest is closed, and this scrape's own socket
        assert max(fd_counts) <= fds + MAX_CONNECTIONS + 2, (fds, fd_counts)
        assert max(thread_counts) == threads, (threads, thread_counts)
        scrape(port)  # and right after the attack
    finally:
        mon.detach()


@pytest.mark.skipif(not DEFERS_ACCEPT, reason="the kernel has no deferred accept")
def test_the_kernel_hands_over_a_connection_only_once_its_request_starts():
    server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0)
    try:
        assert server._listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        silent = socket.create_connection(("127.0.0.1", server.server_port))  # connected, sends nothing
        time.sleep(0.5)
        assert server.connections == 0  # still the kernel's
        silent.sendall(b"GET /metrics HTTP/1.1\r\n")  # the request starts: handed over now
        deadline = time.monotonic() + 5
        while server.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.connections == 1
        silent.close()
    finally:
        server.close()


def test_requests_time_out_and_bad_requests_get_an_answer():
    registry = CollectorRegistry(auto_describe=True)
    family = GaugeMetricFamily("demo_value", "a value", labels=["k"])
    family.add_metric(["v"], 1.0)

    class One:
        def collect(self):
            yield family

    registry.register(One())
    server = MetricsServer(registry, "127.0.0.1", 0, request_timeout=0.5, max_request_bytes=2048)
    port = server.server_port
    try:
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")  # and nothing more
        slow.settimeout(5)
        t0 = time.monotonic()
        assert slow.recv(100) == b""  # closed by the server at its deadline
        assert 0.3 < time.monotonic() - t0 < 3.0
        # the server closes first and counts right after, on its own thread (see the test below)
        deadline = time.monotonic() + 2
        while server.timed_out == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.timed_out == 1
        slow.close()

        def raw(request: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(request)
                out = b""
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return out
                    out += chunk

        assert raw(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431")
        assert raw(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").startswith(b"HTTP/1.1 405")
        assert raw(b"GET /../../etc/passwd HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
        assert raw(b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400")
        head = raw(b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics?name[]=demo_value",
                                         headers={"Accept": "application/openmetrics-text; version=1.0.0",
                                                  "Accept-Encoding": "gzip"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert 'demo_value{k="v"} 1.0' in gzip.decompress(response.read()).decode()
    finally:
        server.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_client_that_never_reads_its_answer_is_dropped_at_the_write_deadline():
    registry = CollectorRegistry()
    family = GaugeMetricFamily("demo_series", "many series", labels=["i"])
    for i in range(300_000):  # about 9 MiB of exposition: more than the socket buffers hold
        family.add_metric([str(i)], float(i))

    class Many:
        def collect(self):
            yield family

    registry.register(Many())
    server = MetricsServer(registry, "127.0.0.1", 0, write_timeout=0.5)
    try:
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", server.server_port))
        reader.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")  # and never reads
        deadline = time.monotonic() + 10
        while server.timed_out == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.timed_out == 1 and server.connections == 0 and server.served == 0
        assert "demo_series" in scrape(server.server_port, timeout=10)  # the next client is served
        reader.close()
    finally:
        server.close()


def test_a_connection_is_closed_before_it_is_counted():
    """Whoever polls the counters (a test, a health check) sees a counted connection gone: the
    server closes a connection first, then counts it served or timed out."""
    seen = []

    class Watched(MetricsServer):
        def _drop(self, conn):
            seen.append((self.served, self.timed_out, self.evicted))  # the counts at each close
            super()._drop(conn)

    registry = CollectorRegistry()
    server = Watched(registry, "127.0.0.1", 0, request_timeout=0.3)
    try:
        partial = socket.create_connection(("127.0.0.1", server.server_port))
        partial.sendall(b"GET /metrics HTTP/1.1\r\n")  # and nothing more
        deadline = time.monotonic() + 10
        while server.timed_out == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.timed_out == 1 and server.connections == 0
        scrape(server.server_port, timeout=10)
        deadline = time.monotonic() + 10
        while server.served == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.served == 1 and server.connections == 0
        partial.close()
    finally:
        server.close()
    assert seen[:2] == [(0, 0, 0), (0, 1, 0)]  # neither was counted before it was closed


CHILD = r'''
import json, os, resource, sys, threading
sys.path.insert(0, sys.argv[1])
import torch
import moewatch
from reliability_helpers import ToyMoE, forward
torch.set_num_threads(1)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
model = ToyMoE()
mon = moewatch.attach(model, gates="routers.*", top_k=2, background=False, window_tokens=10)
port = mon.serve_prometheus(port=0)
print(json.dumps({"port": port, "fds": len(os.listdir("/proc/self/fd"))}), flush=True)
sys.stdin.readline()
for seed in range(3):
    forward(model, torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(seed)))
    mon.flush()
path = mon.dump(sys.argv[2])
print(json.dumps({"dump": path, "fds": len(os.listdir("/proc/self/fd")), "errors": mon.error_counts(),
                  "threads": threading.active_count()}), flush=True)
sys.stdin.readline()
mon.detach()
'''


def test_a_process_limited_to_64_descriptors_still_writes_its_dump_under_attack(tmp_path):
    model_process = subprocess.Popen([sys.executable, "-c", CHILD, HERE, str(tmp_path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
    try:
        started = json.loads(model_process.stdout.readline())
        port = started["port"]
        attacker = start_attacker(port, 300, 20.0)
        try:
            for _ in range(10):
                assert "moewatch_up" in scrape(port)
                time.sleep(0.05)
            model_process.stdin.write("go\n")
            model_process.stdin.flush()
            done = json.loads(model_process.stdout.readline())
            assert "moewatch_windows_total" in scrape(port)
        finally:
            attacker.kill()
            attacker.wait()
        model_process.stdin.write("stop\n")
        model_process.stdin.flush()
        assert model_process.wait(60) == 0
    finally:
        model_process.kill()
    assert moewatch.read_dump(done["dump"]).windows["window"].nunique() == 3
    assert done["fds"] <= started["fds"] + MAX_CONNECTIONS + 1, (started, done)
    assert done["errors"] == {}, done


# -- label values that are not valid UTF-8 --------------------------------------------------
def test_a_model_name_that_is_not_utf8_is_exported_and_a_failing_scrape_is_counted():
    name = os.fsdecode(b"/models/caf\xe9")  # a real directory name on a latin-1 file system
    assert "\udce9" in name
    registry = CollectorRegistry()

    class FailsOnce:
        """A collector of the user's, sharing the registry, whose first scrape has an unencodable label."""

        calls = 0

        def collect(self):
            FailsOnce.calls += 1
            family = GaugeMetricFamily("user_value", "a user's metric", labels=["path"])
            family.add_metric([name if FailsOnce.calls == 1 else "/models/ok"], 1.0)
            yield family

    registry.register(FailsOnce())
    model, mon = toy_monitor(model_name=name)
    try:
        port = mon.serve_prometheus(port=0, registry=registry)
        with pytest.raises(urllib.error.HTTPError) as failed:  # the user's label cannot be encoded
            scrape(port)
        assert failed.value.code == 500
        text = scrape(port)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        model_labels = {dict(labels).get("model") for (_, labels) in samples if dict(labels).get("model")}
        assert model_labels == {"/models/caf\\xe9"}
        errors = [v for (n, labels), v in samples.items()
                  if n == "moewatch_internal_errors_total" and dict(labels).get("component") == "prometheus"]
        assert errors == [1.0]
        assert mon.error_counts() == {"prometheus": 1}
        # OpenTelemetry's view of the same state carries the same, encodable, value
        from moewatch.export.samples import samples as all_samples
        from moewatch.export.state import StateReader

        state = StateReader(mon).read()
        for rows in all_samples(state, []).values():
            for labels, _ in rows:
                for value in labels:
                    value.encode("utf-8")
    finally:
        mon.detach()


# -- Alertmanager redirects ------------------------------------------------------------------
class Receiver:
    """A real HTTP server: POSTs to /api/v2/alerts answer ``status`` (with ``location`` for a
    redirect); every request is recorded as (method, path)."""

    def __init__(self, status: int = 200, location: str = ""):
        self.requests = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                owner.requests.append((self.command, self.path))
                self.send_response(owner.status)
                if owner.location:
                    self.send_header("Location", owner.location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"[]")

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, *args):
                pass

        self.status, self.location = status, location
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def collapse(model, mon, windows: int = 3):
    """Traffic through a collapsed router (ToyMoE(skew=True)) until the detector says so."""
    for seed in range(windows):
        forward(model, torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(seed)))
        mon.flush()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308, 202, 204, 500])
def test_alerts_are_delivered_only_by_a_2xx_and_redirects_are_not_followed(status):
    target = Receiver(200)
    front = Receiver(status, location=target.url + "/api/v2/alerts")
    model = ToyMoE(skew=True)
    mon = moewatch.attach(model, gates="routers.*", top_k=2, background=False, window_tokens=10,
                          alertmanager_url=front.url, model_name="toy")
    try:
        collapse(model, mon)
        assert mon.health().severity == "collapse"
        exporter = next(e for e in mon._exporters if isinstance(e, AlertmanagerExporter))
        deadline = time.monotonic() + 20
        delivered = 200 <= status < 300
        while time.monotonic() < deadline:
            # The receiver records a request before the sender has read the answer and
            # counted the error: wait for the count, not for the request.
            if (exporter.sent if delivered else mon.error_counts().get("alertmanager", 0) >= 2):
                break
            time.sleep(0.05)
        assert all(method == "POST" for method, _ in front.requests), front.requests
        assert target.requests == []  # never followed, as a GET or otherwise
        if delivered:
            assert exporter.sent >= 1 and "alertmanager" not in mon.error_counts()
        else:
            assert exporter.sent == 0
            assert len(front.requests) >= 2  # retried
            assert mon.error_counts()["alertmanager"] >= 2
            assert str(status) in mon.errors.last()["alertmanager"]
    finally:
        mon.detach()
        front.stop()
        target.stop()


def test_a_redirect_in_front_of_a_real_alertmanager_is_an_error_not_a_lost_alert(request):
    """Before: the 301 was followed as a GET, the real Alertmanager answered 200 with its list
    of alerts, and moewatch counted the alert as sent while Alertmanager never had it."""
    from tests.export_helpers import start_stack

    stack = start_stack(request, prometheus=False)
    front = Receiver(301, location=stack.alertmanager_url + "/api/v2/alerts")
    model = ToyMoE(skew=True)
    mon = moewatch.attach(model, gates="routers.*", top_k=2, background=False, window_tokens=10,
                          alertmanager_url=front.url, model_name="redirected")
    try:
        collapse(model, mon)
        exporter = next(e for e in mon._exporters if isinstance(e, AlertmanagerExporter))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and mon.error_counts().get("alertmanager", 0) < 2:
            time.sleep(0.05)
        assert len(front.requests) >= 2
        assert exporter.sent == 0 and mon.error_counts()["alertmanager"] >= 2
        assert "301" in mon.errors.last()["alertmanager"]
        assert [a for a in stack.alerts() if a["labels"].get("model") == "redirected"] == []
    finally:
        mon.detach()
        front.stop()
    # the same alerts, posted to the real Alertmanager's own address, arrive
    model = ToyMoE(skew=True)
    mon = moewatch.attach(model, gates="routers.*", top_k=2, background=False, window_tokens=10,
                          alertmanager_url=stack.alertmanager_url, model_name="direct")
    try:
        collapse(model, mon)
        fired = stack.wait_alerts(lambda alerts: any(a["labels"].get("model") == "direct" for a in alerts))
        assert {a["labels"]["layer"] for a in fired if a["labels"].get("model") == "direct"} == {"routers.g0", "routers.g1"}
    finally:
        mon.detach()
