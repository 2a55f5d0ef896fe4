"""hmmctl on a running daemon: ps, devices, maps, pagemap, check, inject, oom-kill and
compact, in text and JSON."""

from __future__ import annotations

import json
import subprocess
import sys

from hmm.abi import PAGE_SIZE
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import CMD_EXCLUSIVE, CMD_MIGRATE_TO_DEV
from hmm.process import ProcessClient
from tests.procs import Program


def ctl(hmmd: Program, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "hmmd.ctl", *args, "--kernel", hmmd.address],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


async def test_ps_devices_maps_and_pagemap(hmmd: Program, cpu: ProcessClient, dmirror_factory) -> None:
    prog, (name,) = dmirror_factory(1)
    dm = DmirrorClient(prog.address)
    proc = await cpu.spawn("viewed")
    a = await proc.mmap(16 * PAGE_SIZE)
    await proc.write(a, b"x" * (12 * PAGE_SIZE))
    _, fid = await proc.open(f"/dev/{name}")
    await dm.command(fid, CMD_MIGRATE_TO_DEV, a, 4)
    await dm.command(fid, CMD_EXCLUSIVE, a + 4 * PAGE_SIZE, 2)
    await proc.read(a + 12 * PAGE_SIZE, 4)
    await proc.set_oom_score_adj(-500)

    ps = json.loads(ctl(hmmd, "ps", "--json"))
    me = next(p for p in ps if p["pid"] == proc.pid)
    assert me["name"] == "viewed" and me["rss_anon"] == 12 and me["oom_score_adj"] == -500
    row = next(line for line in ctl(hmmd, "ps").splitlines() if line.endswith(" viewed"))
    assert row.split()[-2:] == ["-500", "viewed"]

    devices = {d["name"]: d for d in json.loads(ctl(hmmd, "devices", "--json"))}
    assert devices[name]["alive"] and devices[name]["memory_used_pages"] == 4

    maps = json.loads(ctl(hmmd, "maps", str(proc.pid), "--json"))
    assert [(m["start"], m["end"], m["perms"]) for m in maps] == [(a, a + 16 * PAGE_SIZE, "rw-p")]

    pages = json.loads(ctl(hmmd, "pagemap", str(proc.pid), hex(a), "16", "--json"))
    kinds = [p["kind"] for p in pages]
    assert kinds == ["device-private"] * 4 + ["device-exclusive"] * 2 + ["system"] * 6 + ["zero page"] + ["none"] * 3
    assert {p["device"] for p in pages[:4]} == {name}
    text = ctl(hmmd, "pagemap", str(proc.pid), hex(a), "16")
    assert f"4 pages  device-private on {name}" in text and "3 pages  none" in text
    await proc.exit()
    await dm.close()


async def test_check_and_inject(hmmd: Program, cpu: ProcessClient, dmirror_factory) -> None:
    prog, (name,) = dmirror_factory(1)
    assert ctl(hmmd, "check") == "every invariant holds\n"
    assert json.loads(ctl(hmmd, "check", "--json")) == {"violations": []}
    plan = json.loads(ctl(hmmd, "inject", name, "--ack-delay-ms", "5", "--fail-dma", "2", "--json"))
    assert plan == {"device": name, "disconnected": False, "ack_delay_ms": 5, "drop_acks": 0,
                    "stream_delay_ms": 0, "fail_alloc": 0, "fail_dma": 2}
    assert ctl(hmmd, "inject", name, "--fail-dma", "0") == (
        f"{name}: ack_delay_ms=5, drop_acks=0, stream_delay_ms=0, fail_alloc=0, fail_dma=0\n")
    ctl(hmmd, "inject", name, "--disconnect")
    devices = {d["name"]: d for d in json.loads(ctl(hmmd, "devices", "--json"))}
    assert not devices[name]["alive"] and "fault injection" in devices[name]["fenced_reason"]
    r = subprocess.run([sys.executable, "-m", "hmmd.ctl", "inject", "nobody", "--drop-acks", "1",
                        "--kernel", hmmd.address], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1 and "ENOENT" in r.stderr


async def test_pagemap_names_coherent_device_pages(hmmd: Program, cpu: ProcessClient, tmp_path) -> None:
    from tests.procs import start_dmirror

    prog = start_dmirror(tmp_path, hmmd.address, "ctl_coherent:coherent", name="dmirror-ctl-coherent")
    try:
        dm = DmirrorClient(prog.address)
        proc = await cpu.spawn("coherent-view")
        a = await proc.mmap(8 * PAGE_SIZE)
        await proc.write(a, b"c" * (8 * PAGE_SIZE))
        _, fid = await proc.open("/dev/ctl_coherent")
        await dm.command(fid, CMD_MIGRATE_TO_DEV, a, 4)
        pages = json.loads(ctl(hmmd, "pagemap", str(proc.pid), hex(a), "8", "--json"))
        assert [p["kind"] for p in pages] == ["device-coherent"] * 4 + ["system"] * 4
        assert {p["device"] for p in pages[:4]} == {"ctl_coherent"}
        assert sorted(p["frame"] for p in pages[:4]) == sorted({p["frame"] for p in pages[:4]})
        assert "device-coherent on ctl_coherent" in ctl(hmmd, "pagemap", str(proc.pid), hex(a), "8")
        await dm.close()
        await proc.exit()
    finally:
        prog.stop()


async def test_oom_kill(hmmd: Program, cpu: ProcessClient) -> None:
    victims = [await cpu.spawn("oom") for _ in range(2)]
    for v in victims:
        a = await v.mmap(8 * PAGE_SIZE)
        await v.write(a, b"\x01" * 8 * PAGE_SIZE)
    assert ctl(hmmd, "oom-kill", str(victims[0].pid)) == (
        f"pid {victims[0].pid} killed; the OOM reaper freed 8 pages in 1 pass\n")
    assert json.loads(ctl(hmmd, "oom-kill", str(victims[1].pid), "--json")) == {
        "pid": victims[1].pid, "reaped": True, "passes": 1, "pages_reaped": 8}
    assert not {v.pid for v in victims} & {p["pid"] for p in json.loads(ctl(hmmd, "ps", "--json"))}
    r = subprocess.run([sys.executable, "-m", "hmmd.ctl", "oom-kill", str(victims[0].pid), "--kernel", hmmd.address],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1 and "ESRCH" in r.stderr


async def test_compact(hmmd: Program, cpu: ProcessClient) -> None:
    proc = await cpu.spawn("compact")
    a = await proc.mmap(4 * PAGE_SIZE)
    await proc.write(a, b"\x02" * 4 * PAGE_SIZE)
    before = await proc.pagemap(a, 4)
    moved = json.loads(ctl(hmmd, "compact", "--json"))["pages_moved"]
    assert moved >= 4 and not set((await proc.pagemap(a, 4)).tolist()) & set(before.tolist())
    assert ctl(hmmd, "compact").endswith(" pages moved\n")
    assert await proc.read(a, 4 * PAGE_SIZE) == b"\x02" * 4 * PAGE_SIZE
    await proc.exit()


def test_usage_mistakes_are_one_line_errors(hmmd: Program, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A missing token file, a token with a space, a count below 1: one line naming
    the problem and a non-zero exit, no traceback."""
    spaced = tmp_path / "spaced.tok"
    spaced.write_text("two words\n")
    cases = [
        (["stats", "--auth-token-file", str(tmp_path / "missing.tok")], 1, "No such file or directory"),
        (["stats", "--auth-token-file", str(spaced)], 1, "printable ASCII without spaces"),
        (["pagemap", "1", "0x1000", "-5"], 2, "-5 is not a positive count"),
    ]
    for args, rc, text in cases:
        r = subprocess.run([sys.executable, "-m", "hmmd.ctl", *args, "--kernel", hmmd.address],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == rc and text in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
