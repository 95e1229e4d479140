"""Helpers for the exporter tests: a fault that collapses routing, HTTP endpoints that misbehave,
and the local Prometheus + Alertmanager stack from ``exporters/``."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_LOAD_LOCK = threading.Lock()


def load_local_stack():
    """exporters/local_stack.py as a module (the folder is not a package), loaded once (under a
    lock: a thread must not get the module while another is still executing it)."""
    with _LOAD_LOCK:
        if "moewatch_local_stack" in sys.modules:
            return sys.modules["moewatch_local_stack"]
        path = os.path.join(ROOT, "exporters", "local_stack.py")
        spec = importlib.util.spec_from_file_location("moewatch_local_stack", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


def start_stack(request, **kwargs):
    """A started LocalStack, stopped by the test's finalizer; skips only if it cannot be installed."""
    local_stack = load_local_stack()
    try:
        local_stack.ensure_installed()
    except local_stack.StackUnavailable as why:
        pytest.skip(f"real Prometheus/Alertmanager unavailable: {why}")
    stack = local_stack.LocalStack(**kwargs)
    request.addfinalizer(stack.stop)
    return stack.start()


_SESSION_STACK = None
_SESSION_STACK_LOCK = threading.Lock()


def session_stack():
    """A Prometheus (without Alertmanager) for the session's engine runs, started on first use
    from whichever thread (engine runs start before any engine test: ``vllm_helpers.ENGINES``),
    stopped when the session ends (:func:`stop_session_stack`). Raises the stack's
    ``StackUnavailable`` where it cannot be installed."""
    global _SESSION_STACK
    with _SESSION_STACK_LOCK:
        if _SESSION_STACK is None:
            local_stack = load_local_stack()
            local_stack.ensure_installed()
            _SESSION_STACK = local_stack.LocalStack(alertmanager=False).start()
        return _SESSION_STACK


def stop_session_stack() -> None:
    global _SESSION_STACK
    with _SESSION_STACK_LOCK:
        if _SESSION_STACK is not None:
            _SESSION_STACK.stop()
            _SESSION_STACK = None


class CollapseFault:
    """Forward hooks on every Mixtral gate that, while ``on``, push the router onto experts 0 and 1.

    Registered before ``moewatch.attach`` so the monitor sees the faulty decision, exactly as it
    would see a router whose weights collapsed.
    """

    def __init__(self, model: torch.nn.Module, bias: float = 50.0):
        self.on = False
        self.bias = bias
        self.handles = [m.register_forward_hook(self._hook) for name, m in model.named_modules()
                        if name.endswith("mlp.gate")]
        assert self.handles, "no gate found"

    def _hook(self, module, args, output):
        if not self.on:
            return None
        logits = output[0].clone()
        logits[:, :2] += self.bias
        probs = torch.softmax(logits.float(), dim=-1)
        top, indices = torch.topk(probs, module.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), indices

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_forwards(model: torch.nn.Module, steps: int = 2, batch: int = 2, length: int = 16, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randint(0, model.config.vocab_size, (batch, length), generator=gen))


def free_port() -> int:
    return free_ports(1)


def free_ports(count: int) -> int:
    """A base port such that base .. base + count - 1 are free (the ranks of one host), below
    the kernel's ephemeral range (``local_stack.free_ports``)."""
    return load_local_stack().free_ports(count)


class Endpoint:
    """A real HTTP server that answers POSTs in one of three ways: ``ok`` (records the body),
    ``error`` (HTTP 500) or ``hang`` (holds the request up to 30 s, until :meth:`stop`)."""

    def __init__(self, mode: str = "ok", status: int = 200):
        self.mode = mode
        self.status = status
        self.bodies: List[bytes] = []
        self.paths: List[str] = []
        self.requests = 0
        self.answered = 0
        self._release = threading.Event()
        self._received = threading.Condition()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with endpoint._received:
                    endpoint.requests += 1
                    endpoint.paths.append(self.path)
                    if endpoint.mode == "ok":
                        endpoint.bodies.append(body)
                    endpoint._received.notify_all()
                if endpoint.mode == "hang":
                    endpoint._release.wait(30)
                    return
                code = 500 if endpoint.mode == "error" else endpoint.status
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with endpoint._received:
                    endpoint.answered += 1

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def wait_requests(self, n: int, timeout: float = 60.0) -> bool:
        """Block until ``n`` requests arrived (True) or ``timeout`` passed (False)."""
        with self._received:
            return self._received.wait_for(lambda: self.requests >= n, timeout=timeout)

    def json_bodies(self) -> List[list]:
        return [json.loads(b) for b in self.bodies]

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


def dead_url() -> str:
    """A URL on which nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true; returns its last value (tests assert on it, not on time)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def only(items: list, what: str = "item") -> Optional[dict]:
    assert len(items) == 1, f"expected one {what}, got {len(items)}: {items}"
    return items[0]
