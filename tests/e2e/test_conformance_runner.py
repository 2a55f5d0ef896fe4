"""`hmmctl conformance` runs the kernel's self-tests against a running daemon and a
running device (any language), and prints a per-test table and a pass count."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.procs import Program


def test_runner_against_running_daemon_and_device(hmmd: Program, dmirror_factory) -> None:
    prog, names = dmirror_factory(2)
    argv = [sys.executable, "-m", "hmmd.ctl", "conformance", "--kernel", hmmd.address, "--device", prog.address,
            "--devices", ",".join(names), "-k", "open_close or anon_write_prot or double_map"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "3 passed, 0 failed"
    assert {line.split()[0] for line in lines[:-1]} == {
        "test_open_close[private]", "test_anon_write_prot[private]", "test_double_map[private]"}
    r = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=120, check=False)
    report = json.loads(r.stdout)
    assert report["passed"] == report["total"] == 3
