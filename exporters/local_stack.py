#!/usr/bin/env python3
"""A local Prometheus + Alertmanager on 127.0.0.1, for the tests and the demo.

Both servers run from the Debian packages (``prometheus``, ``prometheus-alertmanager``; installed
with apt-get when missing and running as root), on free ports, with their configuration and
data in a temporary directory that is removed on stop::

    with LocalStack(rule_files=["alert_rules/*.yml"]) as stack:
        stack.set_targets(["127.0.0.1:9400"])           # picked up live (file service discovery)
        stack.wait_query("sum(moewatch_up)", lambda r: r and float(r[0]["value"][1]) >= 1)
        print(stack.prometheus_url, stack.alertmanager_url)

From a shell (the demo): ``python exporters/local_stack.py --target 127.0.0.1:9400`` runs until
Ctrl-C. Only the standard library is used, so the script works outside the project's venv.
"""
from __future__ import annotations

import argparse
import fcntl
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

PACKAGES = ("prometheus", "prometheus-alertmanager")
# Debian names first, then the upstream release binaries.
PROMETHEUS_BINARIES = ("prometheus",)
ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")
_INSTALL_LOCK = os.path.join(tempfile.gettempdir(), "moewatch-local-stack-install.lock")


class StackUnavailable(RuntimeError):
    """The servers are not installed and cannot be installed here (the message says why)."""


def _which(names: Sequence[str]) -> Optional[str]:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def binaries() -> Dict[str, Optional[str]]:
    return {"prometheus": _which(PROMETHEUS_BINARIES), "alertmanager": _which(ALERTMANAGER_BINARIES),
            "promtool": _which(("promtool",)), "amtool": _which(("amtool",))}


def ensure_installed() -> Dict[str, str]:
    """Paths of the binaries; installs the Debian packages first if they are missing.

    Raises :class:`StackUnavailable` when they are missing and cannot be installed (not root,
    no apt-get, or the installation failed).
    """
    found = binaries()
    if found["prometheus"] and found["alertmanager"]:
        return found  # type: ignore[return-value]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackUnavailable("prometheus / prometheus-alertmanager are not installed and this is not a "
                               "root Debian system; install them: apt-get install -y " + " ".join(PACKAGES))
    # One installer at a time (several test processes may start together).
    with open(_INSTALL_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = binaries()
        if not (found["prometheus"] and found["alertmanager"]):
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            steps = (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES])
            for step in steps:
                done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=900)
                if done.returncode != 0:
                    raise StackUnavailable(f"{' '.join(step)} failed ({done.returncode}): {done.stderr[-2000:]}")
            _stop_packaged_services()
            found = binaries()
    if not (found["prometheus"] and found["alertmanager"]):
        raise StackUnavailable(f"installed {PACKAGES} but the binaries are still missing: {found}")
    return found  # type: ignore[return-value]


def _stop_packaged_services() -> None:
    """Debian starts the packaged services where it can; the stack runs its own copies."""
    for service in ("prometheus", "prometheus-alertmanager", "prometheus-node-exporter"):
        subprocess.run(["service", service, "stop"], capture_output=True, timeout=60, check=False)


def _ephemeral_ports() -> range:
    """The ports the kernel gives outgoing connections as their source ports."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_ports(count: int) -> int:
    """A base port such that base .. base + count - 1 are free (the ranks of one host).

    Taken below the kernel's ephemeral range: a server started later (a vLLM worker starts
    tens of seconds after its port is chosen) binds a port that no outgoing connection of
    another process (Prometheus's scrapes, a vLLM engine's own sockets) can have taken as its
    source port meanwhile; a random pick keeps tests that run side by side apart. The pick is
    the operating system's randomness, not the ``random`` module's (which a seeded training run
    in another thread resets: two picks then gave the same port), and no port is handed out
    twice by one process (a port handed out is free until its server starts)."""
    ephemeral = _ephemeral_ports()
    low = 10000 if ephemeral.start - count >= 10000 else 1024
    outside = range(low, ephemeral.start - count + 1)  # bases whose ports all lie below the range
    for _ in range(200):
        base = _PICK.choice(outside) if outside else _kernel_port()
        ports = set(range(base, base + count))
        with _HANDED_OUT_LOCK:
            if ports & _HANDED_OUT:
                continue
            try:
                for port in ports:
                    with socket.socket() as sock:
                        sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.update(ports)
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


_PICK = random.SystemRandom()
_HANDED_OUT: set = set()  # ports free_ports has returned in this process
_HANDED_OUT_LOCK = threading.Lock()


def _kernel_port() -> int:
    """A port the kernel picks (in its ephemeral range: only where nothing lies below it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port() -> int:
    return free_ports(1)


def _get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode())


Target = Union[str, Dict[str, Any]]  # "host:port", or {"targets": [...], "labels": {...}}


class LocalStack:
    """Prometheus (scraping the targets you set) and Alertmanager (receiving its alerts)."""

    def __init__(self, rule_files: Iterable[str] = (), scrape_interval: str = "1s",
                 evaluation_interval: str = "1s", alertmanager: bool = True, prometheus: bool = True,
                 workdir: Optional[str] = None, alertmanager_config: Optional[str] = None):
        self.rule_files = [os.path.abspath(p) for p in rule_files]
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.with_alertmanager = alertmanager
        self.with_prometheus = prometheus
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="moewatch-stack-")
        self.alertmanager_config = alertmanager_config
        self.prometheus_port = free_port() if prometheus else None
        self.alertmanager_port = free_port() if alertmanager else None
        self._processes: Dict[str, subprocess.Popen] = {}
        self._logs: Dict[str, str] = {}

    # -- URLs ----------------------------------------------------------------------------------
    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://127.0.0.1:{self.alertmanager_port}"

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> "LocalStack":
        paths = ensure_installed()
        try:
            if self.with_alertmanager:
                self._start_alertmanager(paths["alertmanager"])
            if self.with_prometheus:
                self._start_prometheus(paths["prometheus"])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop both servers (TERM, then KILL) and remove the temporary directory."""
        for name, process in list(self._processes.items()):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=15)
            del self._processes[name]
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, argv: List[str], ready_url: str, timeout: float = 60.0) -> None:
        log_path = os.path.join(self.workdir, f"{name}.log")
        self._logs[name] = log_path
        with open(log_path, "wb") as log:
            self._processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                     cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._processes[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self._processes[name].returncode}:\n{self.log(name)}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{self.log(name)}")

    def log(self, name: str) -> str:
        """The last lines a server wrote (for failure messages)."""
        try:
            with open(self._logs[name], errors="replace") as fh:
                return "".join(fh.readlines()[-40:])
        except (KeyError, OSError):
            return ""

    def _start_alertmanager(self, binary: str) -> None:
        config = os.path.join(self.workdir, "alertmanager.yml")
        if self.alertmanager_config:
            shutil.copy(self.alertmanager_config, config)
        else:
            with open(config, "w") as fh:
                fh.write(_ALERTMANAGER_YML)
        os.makedirs(os.path.join(self.workdir, "alertmanager-data"), exist_ok=True)
        self._spawn("alertmanager", [
            binary, f"--config.file={config}",
            f"--storage.path={os.path.join(self.workdir, 'alertmanager-data')}",
            f"--web.listen-address=127.0.0.1:{self.alertmanager_port}",
            "--cluster.listen-address=",  # no HA gossip port
        ], f"{self.alertmanager_url}/-/ready")

    def _start_prometheus(self, binary: str) -> None:
        os.makedirs(os.path.join(self.workdir, "targets"), exist_ok=True)
        self.set_targets([])
        config = os.path.join(self.workdir, "prometheus.yml")
        with open(config, "w") as fh:
            fh.write(self._prometheus_yml())
        self._spawn("prometheus", [
            binary, f"--config.file={config}",
            f"--storage.tsdb.path={os.path.join(self.workdir, 'prometheus-data')}",
            f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
            "--web.enable-lifecycle",
        ], f"{self.prometheus_url}/-/ready")

    def _prometheus_yml(self) -> str:
        lines = [
            "global:",
            f"  scrape_interval: {self.scrape_interval}",
            f"  evaluation_interval: {self.evaluation_interval}",
            "scrape_configs:",
            "  - job_name: moewatch",
            "    file_sd_configs:",
            f"      - files: ['{os.path.join(self.workdir, 'targets', '*.json')}']",
            "        refresh_interval: 1s",
        ]
        if self.rule_files:
            lines.append("rule_files:")
            lines += [f"  - '{p}'" for p in self.rule_files]
        if self.with_alertmanager:
            lines += ["alerting:", "  alertmanagers:", "    - static_configs:",
                      f"        - targets: ['127.0.0.1:{self.alertmanager_port}']"]
        return "\n".join(lines) + "\n"

    # -- targets -------------------------------------------------------------------------------
    def set_targets(self, targets: Sequence[Target]) -> None:
        """Replace the scrape targets ("host:port" or file_sd groups); Prometheus picks them up live."""
        groups = [{"targets": [t], "labels": {}} if isinstance(t, str) else t for t in targets]
        path = os.path.join(self.workdir, "targets", "moewatch.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(groups, fh)
        os.replace(tmp, path)  # atomic: Prometheus never reads half a file

    # -- reading back --------------------------------------------------------------------------
    def query(self, promql: str) -> List[dict]:
        """Instant query; the ``result`` list of the API's answer."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        answer = _get_json(url)
        if answer.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {answer}")
        return answer["data"]["result"]

    def wait_query(self, promql: str, done: Callable[[List[dict]], bool], timeout: float = 90.0) -> List[dict]:
        """Poll ``promql`` until ``done(result)``; returns the result (raises with the last one)."""
        return _wait(lambda: self.query(promql), done, timeout, f"query {promql!r}")

    def targets(self) -> List[dict]:
        return _get_json(f"{self.prometheus_url}/api/v1/targets")["data"]["activeTargets"]

    def alerts(self, **filters: str) -> List[dict]:
        """Alertmanager's alerts (``GET /api/v2/alerts``), e.g. ``alerts(active="true")``."""
        query = ("?" + urllib.parse.urlencode(filters)) if filters else ""
        return _get_json(f"{self.alertmanager_url}/api/v2/alerts{query}")

    def wait_alerts(self, done: Callable[[List[dict]], bool], timeout: float = 90.0, **filters: str) -> List[dict]:
        return _wait(lambda: self.alerts(**filters), done, timeout, "Alertmanager alerts")

    def prometheus_alerts(self) -> List[dict]:
        """Alerts Prometheus's rules hold (pending or firing)."""
        return _get_json(f"{self.prometheus_url}/api/v1/alerts")["data"]["alerts"]


def _wait(read: Callable[[], Any], done: Callable[[Any], bool], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = read()
            if done(last):
                return last
        except (urllib.error.URLError, OSError) as error:
            last = error
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: condition not met within {timeout:.0f} s; last answer: {last!r}")
        time.sleep(0.25)


_ALERTMANAGER_YML = """\
# Minimal local configuration: alerts are kept and shown by the API; nothing is notified.
route:
  receiver: local
  group_by: [alertname, model, layer, rank]
  group_wait: 1s
  group_interval: 5s
  repeat_interval: 1h
receivers:
  - name: local
inhibit_rules:
  - source_matchers: [alertname="MoewatchGateCollapse"]
    target_matchers: [alertname="MoewatchGateDrift"]
    equal: [model, layer, rank]
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", default=[],
                        help="host:port of a moewatch /metrics endpoint (repeatable)")
    parser.add_argument("--rules", action="append", default=[],
                        help="rule file glob (default: alert_rules/*.yml next to this folder)")
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    patterns = args.rules or [os.path.join(here, os.pardir, "alert_rules", "*.yml")]
    rules = sorted(p for pattern in patterns for p in glob.glob(pattern))
    with LocalStack(rule_files=rules, scrape_interval="5s", evaluation_interval="5s") as stack:
        stack.set_targets(args.target or ["127.0.0.1:9400"])
        print(f"Prometheus   {stack.prometheus_url}\nAlertmanager {stack.alertmanager_url}\n"
              f"rules        {len(rules)} file(s); Ctrl-C stops both", flush=True)
        stopped = []
        signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
        try:
            while not stopped:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
