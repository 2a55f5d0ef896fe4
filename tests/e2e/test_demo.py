"""The README's main job: `hmmctl demo` on embedded defaults passes every step,
and leaves a timeline of the run for ui.perfetto.dev."""

import json
import subprocess
import sys
from pathlib import Path


def test_hmmctl_demo_passes() -> None:
    r = subprocess.run([sys.executable, "-m", "hmmd.ctl", "demo"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout
    assert "coherence violations: 0" in r.stdout
    for step in ("both devices mirror it", "migrate to device memory", "migrate_to_ram", "two devices contend",
                 "device-exclusive access", "munmap half", "OOM kill", "memory pressure", "a device stops answering"):
        assert step in r.stdout
    trace_line = next(line for line in r.stdout.splitlines() if line.startswith("timeline of the run"))
    assert "ui.perfetto.dev" in r.stdout and "chrome://tracing" in r.stdout
    doc = json.loads(Path(trace_line.rsplit(" ", 1)[-1]).read_text())
    cats = {e.get("cat") for e in doc["traceEvents"]}
    assert {"invalidate", "range_fault", "migrate", "migrate_to_ram", "fence", "syscall", "window"} <= cats
