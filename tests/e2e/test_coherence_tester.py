"""Short runs of the seeded multi-device coherence tester (tests/coherence.py):
three dmirror devices and the CPU on one region for about 12 s; two Python and two
Node.js dmirror devices for about 8 s; then a Python and a Node.js device on a
daemon with 512 KiB of RAM, where reclaim swaps the region out all along, for about
8 s, and the same on a region of shared memory that a forked child shares; and
three devices for about 8 s on a region of transparent huge pages. Every
byte is checked against the shadow, the DMA sanitizer must record no violation,
and the invariants must hold at the end. A failure names the seed that produced
it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.coherence import Config, Report, run
from tests.procs import Program, start_dmirror, start_hmmd, start_node_dmirror

SEED = 1


async def test_three_devices_and_the_cpu_stay_coherent(hmmd: Program, dmirror_factory) -> None:  # type: ignore[no-untyped-def]
    prog, names = dmirror_factory(3)
    report = await run(hmmd.address, [(prog.address, n) for n in names],
                       Config(seed=SEED, duration_s=12.0, op_timeout_s=30.0))
    check(report, names)


async def test_python_and_node_devices_and_the_cpu_stay_coherent(  # type: ignore[no-untyped-def]
        hmmd: Program, dmirror_factory, tmp_path: Path) -> None:
    prog, names = dmirror_factory(2)
    node_names = ["coh_node0", "coh_node1"]
    node = start_node_dmirror(tmp_path, hmmd.address, *node_names)
    try:
        report = await run(hmmd.address, [(prog.address, n) for n in names] + [(node.address, n) for n in node_names],
                           Config(seed=SEED + 1, duration_s=8.0, op_timeout_s=30.0))
    finally:
        code = node.stop()
    check(report, [*names, *node_names])
    assert code == 0, node.log_text()


async def test_devices_and_the_cpu_stay_coherent_over_huge_pages(hmmd: Program, dmirror_factory) -> None:  # type: ignore[no-untyped-def]
    prog, names = dmirror_factory(3)
    report = await run(hmmd.address, [(prog.address, n) for n in names],
                       Config(seed=SEED + 5, duration_s=8.0, op_timeout_s=30.0, thp=True, chunks=64, chunk_pages=16))
    check(report, names)
    assert report.by_kind().get("remap_span", {}).get("ok", 0) > 0


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
async def test_devices_and_the_cpu_stay_coherent_under_memory_pressure(tmp_path: Path, shared: bool) -> None:
    daemon = start_hmmd(tmp_path, "--ram", "512K", "--callback-deadline-ms", "1500", name="hmmd-512k")
    prog = start_dmirror(tmp_path, daemon.address, "press_py", name="dmirror-press")
    node = start_node_dmirror(tmp_path, daemon.address, "press_node")
    try:
        report = await run(daemon.address, [(prog.address, "press_py"), (node.address, "press_node")],
                           Config(seed=SEED + 2 + shared, duration_s=8.0, chunks=32, op_timeout_s=30.0, pressure=True,
                                  shared=shared))
    finally:
        prog.stop()
        node_code = node.stop()
        code = daemon.stop()
    check(report, ["press_py", "press_node"], shared=shared)
    assert report.reclaimed_pages > 0
    assert code == 0 and node_code == 0, daemon.log_text() + node.log_text()


def check(report: Report, names: list[str], *, shared: bool = False) -> None:
    print(json.dumps({"seed": report.seed, "ops": report.by_kind(), "skipped": dict(report.skipped)}, indent=1))
    assert not report.failure, report.failure
    assert report.violations == {n: 0 for n in names}, report.violations
    assert report.invariants == [], report.invariants
    counts = report.by_kind()
    # Shared memory never migrates nor becomes exclusive: those calls must be refused.
    kinds = ("READ", "WRITE", "cpu_read", "cpu_write", "child_read", "child_write") if shared \
        else ("READ", "WRITE", "MIGRATE_TO_DEV", "MIGRATE_TO_SYS", "EXCLUSIVE", "cpu_read", "cpu_write")
    for kind in kinds:
        assert counts.get(kind, {}).get("ok", 0) > 0, f"no successful {kind} in the run: {counts}"
    if shared:
        assert set(counts.get("EXCLUSIVE", {})) <= {"EOPNOTSUPP", "EFAULT"}, counts
        assert counts.get("EXCLUSIVE", {}).get("EOPNOTSUPP", 0) > 0, counts
