"""`moewatch demo`, as the README runs it: healthy traffic passes, every injected fault is caught."""
import re
import subprocess
import sys


def test_demo_catches_every_fault_and_recovers():
    result = subprocess.run([sys.executable, "-m", "moewatch", "demo", "--windows", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    phases = re.split(r"\n\d\. ", out)
    healthy, drills = phases[2], phases[3:]
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
