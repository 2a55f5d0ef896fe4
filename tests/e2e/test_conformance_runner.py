"""`hmmctl conformance` runs the kernel's self-tests against a running daemon and a
running device (any language), and prints a per-test table and a pass count."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from hmm.admin import AdminClient
from tests.procs import Program, start_dmirror

SUBSET = "open_close or anon_write_prot or double_map"
TESTS = ("test_open_close", "test_anon_write_prot", "test_double_map")


def run(hmmd: Program, device: Program, names: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hmmd.ctl", "conformance", "--kernel", hmmd.address, "--device", device.address,
            "--devices", ",".join(names), "-k", SUBSET, *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_runner_against_running_daemon_and_device(hmmd: Program, dmirror_factory) -> None:
    """Two private devices: the coherent variant is skipped, as the kernel's suite
    does without coherent devices, and that is not a failure."""
    prog, names = dmirror_factory(2)
    r = run(hmmd, prog, names)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "3 passed, 0 failed, 3 skipped, 0 xfailed"
    outcomes = {line.split()[0]: line.split()[1] for line in lines[:-1]}
    assert outcomes == {**{f"{t}[private]": "passed" for t in TESTS}, **{f"{t}[coherent]": "skipped" for t in TESTS}}
    report = json.loads(run(hmmd, prog, names, "--json").stdout)
    assert (report["passed"], report["skipped"], report["failed"], report["total"]) == (3, 3, 0, 6)


def test_runner_runs_both_variants_on_four_devices(hmmd: Program, tmp_path: Path) -> None:
    names = ["rv0", "rv1", "rv2", "rv3"]
    prog = start_dmirror(tmp_path, hmmd.address, "rv0", "rv1", "rv2:coherent", "rv3:coherent", name="dmirror-rv")
    try:
        r = run(hmmd, prog, names)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.splitlines()[-1] == "6 passed, 0 failed, 0 skipped, 0 xfailed"
    finally:
        assert prog.stop() == 0, prog.log_text()


async def test_runner_fails_when_a_test_fails(hmmd: Program, dmirror_factory) -> None:
    """Device 1's DMA fails (injected): double_map cannot read through it, and the
    runner says so."""
    prog, names = dmirror_factory(2)
    async with AdminClient(address=hmmd.address) as admin:
        await admin.inject_faults(names[1], fail_dma=1000)
    r = run(hmmd, prog, names)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1].startswith("2 passed, 1 failed")
    outcomes = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()[:-1]}
    assert outcomes["test_double_map[private]"] == "failed", r.stdout


def test_runner_refuses_at_once_what_it_could_not_run_against(hmmd: Program, dmirror_factory) -> None:
    """Preflight: an address that does not answer, or device names the device service
    does not run, are one line and exit 2, before any test."""
    prog, names = dmirror_factory(2)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    nobody = f"127.0.0.1:{free.getsockname()[1]}"  # bound, not listening: refused
    cases = [
        (["--kernel", nobody], f"hmmctl: hmmd at {nobody} does not answer"),
        (["--kernel", hmmd.address, "--device", nobody], f"hmmctl: the device service at {nobody} does not answer"),
        (["--kernel", hmmd.address, "--device", prog.address, "--devices", f"{names[0]},no-such-device"],
         f"hmmctl: the device service at {prog.address} runs {names[0]}, {names[1]}, not no-such-device: "
         "pass --devices"),
        (["--device", prog.address], "hmmctl: --device needs --kernel"),
    ]
    try:
        for args, text in cases:
            r = subprocess.run([sys.executable, "-m", "hmmd.ctl", "conformance", *args], capture_output=True,
                               text=True, timeout=60, check=False)
            assert r.returncode == 2 and r.stdout == "", (args, r.stdout, r.stderr)
            assert r.stderr.startswith(text) and len(r.stderr.splitlines()) == 1, (args, r.stderr)
    finally:
        free.close()
