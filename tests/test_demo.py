"""`moewatch demo`, as the README runs it: healthy traffic passes, every injected fault is caught;
it shows progress while it records the baseline, leaves a dump and names the commands that read
it, serves /metrics until Ctrl-C with --serve, and leaves no temporary folder behind."""
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    return dict(os.environ, TMPDIR=str(temp), PYTHONPATH=ROOT), temp


def _left_behind(temp):
    """What is left in TMPDIR, but torch's own compile cache (torchinductor_<user>), not the demo's."""
    return [name for name in os.listdir(temp) if not name.startswith("torchinductor_")]


def test_demo_catches_every_fault_and_recovers(tmp_path):
    env, temp = _env(tmp_path)
    result = subprocess.run([sys.executable, "-m", "moewatch", "demo", "--windows", "1"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    phases = re.split(r"\n\d\. ", out)
    recording, healthy, drills = phases[1], phases[2], phases[3:]
    # progress while the baseline records (not a terminal: a line per quarter)
    progress = re.findall(r"\] (\d+)/24 windows, [\d,]+ tokens, \d+ s", recording)
    assert progress == ["6", "12", "18", "24"], recording
    assert "window  0  ok" in healthy
    assert len(drills) == 3
    for drill in drills:
        faulted, recovered = drill.split("fault removed:")
        assert re.search(r"window +\d+  collapse", faulted), drill
        assert "model.layers.2.mlp.gate: collapse" in faulted
        assert re.findall(r"window +\d+  (\w+)", recovered)[-1] == "ok", drill
    assert "experts 0,1 take" in drills[0]
    assert "expert 3 is dead" in drills[1]
    assert "router-logit std" in drills[2]
    assert "internal errors: none" in out
    # the files it leaves, and the next commands, which work as printed
    assert sorted(os.listdir(tmp_path / "moewatch-demo")) == ["baseline.json", "demo.parquet"]
    commands = re.findall(r"^  (moewatch .+?)(?:   #.*)?$", out.split("\nnext:\n")[1], re.M)
    assert commands[0] == "moewatch report moewatch-demo/demo.parquet --out moewatch-demo/report"
    outputs = []
    for command in commands:
        done = subprocess.run([sys.executable, "-m", *command.split()], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        outputs.append(done.stdout)
    assert "model.layers.2.mlp.gate: 3 incident(s), worst collapse" in outputs[0]  # the three drills
    assert _left_behind(temp) == []  # no temporary folder left behind


def _sigint_default() -> None:
    """A terminal's Ctrl-C reaches the demo: undo an ignored SIGINT inherited from a runner that
    started the tests in the background (Python turns SIGINT into KeyboardInterrupt only when it
    starts with the default disposition)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_serve_keeps_metrics_up_until_ctrl_c(tmp_path):
    env, temp = _env(tmp_path)
    demo = subprocess.Popen([sys.executable, "-m", "moewatch", "demo", "--windows", "1", "--baseline-windows", "8",
                             "--serve", "0"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_sigint_default)
    try:
        url = None
        lines = []
        for line in demo.stdout:  # until the demo has finished its drills
            lines.append(line)
            found = re.match(r"serving (http://127\.0\.0\.1:\d+/metrics) until Ctrl-C", line)
            if found:
                url = found.group(1)
                break
        assert url, "".join(lines)[-3000:]
        start = time.monotonic()
        while time.monotonic() - start < 15:  # well past the ~10 s it used to stay up
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read().decode()
            assert 'moewatch_up{model="demo",rank="0"} 1.0' in body
            assert 'moewatch_monitoring_state{model="demo",rank="0",state="ok"} 1.0' in body
            time.sleep(3)
        demo.send_signal(signal.SIGINT)
        rest, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, err[-2000:]
    assert "stopped serving" in rest
    assert _left_behind(temp) == []
