"""Tracing a real daemon: a workload against hmmd and dmirror exported as a Chrome
trace that trace viewers load (one track per device and per process, the expected
event kinds, sane timing); `hmmctl trace` live; `hmmctl notifiers`; a failed call
whose range passes 2^64 - 1 does not break the trace."""

from __future__ import annotations

import asyncio
import errno
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from hmm.abi import MREMAP_MAYMOVE, PAGE_SIZE, PROT_READ, TASK_SIZE, ULONG_MAX
from hmm.admin import AdminClient, TraceEvent
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import CMD_MIGRATE_TO_DEV, CMD_READ
from hmm.errors import KernelError
from hmm.process import ProcessClient
from hmmd.core.trace import DEVICE_TRACK_BASE
from tests.e2e.recorder import Recorder, recording_device
from tests.procs import Program, start_dmirror, start_hmmd

N = 32  # pages


def ctl(hmmd: Program, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "hmmd.ctl", *args, "--kernel", hmmd.address],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def check_chrome_trace(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """What a Chrome Trace Event Format loader needs: every event well-formed, every
    track named, and each thread's complete events nested. Returns the non-metadata events."""
    assert isinstance(doc["traceEvents"], list)
    named_procs, named_threads = set(), set()
    body = []
    for e in doc["traceEvents"]:
        assert e["ph"] in ("X", "i", "M"), e
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int) and isinstance(e["name"], str), e
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "process_sort_index", "thread_name", "thread_sort_index"), e
            if e["name"] == "process_name":
                named_procs.add(e["pid"])
            if e["name"] == "thread_name":
                named_threads.add((e["pid"], e["tid"]))
            continue
        assert isinstance(e["ts"], float | int) and e["ts"] >= 0, e
        if e["ph"] == "X":
            assert isinstance(e["dur"], float | int) and e["dur"] >= 0, e
        else:
            assert e["s"] in ("g", "p", "t"), e
        body.append(e)
    for e in body:
        assert e["pid"] in named_procs and (e["pid"], e["tid"]) in named_threads, e
    per_thread: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
    for e in body:
        if e["ph"] == "X":
            per_thread[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"]))
    for slices in per_thread.values():
        stack: list[float] = []
        for start, end in sorted(slices, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1] <= start:
                stack.pop()
            assert not stack or end <= stack[-1] + 1e-3, "slices of one thread overlap without nesting"
            stack.append(end)
    return body


async def test_workload_exports_a_perfetto_trace(hmmd: Program, cpu: ProcessClient, dmirror_factory,
                                                 tmp_path: Path) -> None:
    # First in this module: the module's daemon has traced nothing else.
    prog, names = dmirror_factory(2)
    dm = DmirrorClient(prog.address)
    admin = AdminClient(cpu.channel)
    await admin.trace_buffer(clear=True)
    t0 = time.perf_counter()
    a_proc = await cpu.spawn("tracer-a")
    b_proc = await cpu.spawn("tracer-b")
    a = await a_proc.mmap(N * PAGE_SIZE)
    pat = np.arange(N * PAGE_SIZE // 4, dtype=np.int32).tobytes()
    await a_proc.write(a, pat)
    _, fa0 = await a_proc.open(f"/dev/{names[0]}")
    _, fa1 = await a_proc.open(f"/dev/{names[1]}")
    await dm.command(fa0, CMD_READ, a, N)  # range faults by both devices
    await dm.command(fa1, CMD_READ, a, N)
    r = await dm.command(fa0, CMD_MIGRATE_TO_DEV, a, N // 2)  # MIGRATE to device memory
    assert r.cpages == N // 2
    assert await a_proc.read(a + PAGE_SIZE, PAGE_SIZE) == pat[PAGE_SIZE : 2 * PAGE_SIZE]  # migrate_to_ram
    await a_proc.mprotect(a, N * PAGE_SIZE, PROT_READ)  # a syscall opening a window over both mirrors
    b = await b_proc.mmap(4 * PAGE_SIZE)
    await b_proc.write(b, b"b" * 4 * PAGE_SIZE)
    _, fb1 = await b_proc.open(f"/dev/{names[1]}")
    await dm.command(fb1, CMD_READ, b, 4)
    await b_proc.munmap(b, 4 * PAGE_SIZE)
    elapsed_us = (time.perf_counter() - t0) * 1e6

    out = tmp_path / "trace.json"
    text = ctl(hmmd, "trace", "--buffer", "--out", str(out))
    assert "wrote " in text and "ui.perfetto.dev" in text
    doc = json.loads(out.read_text())
    body = check_chrome_trace(doc)
    procs = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    stats = await admin.stats()
    ids = {d.name: d.device_id for d in stats.devices}
    assert procs == {
        DEVICE_TRACK_BASE + ids[names[0]]: f"device {names[0]} (id {ids[names[0]]})",
        DEVICE_TRACK_BASE + ids[names[1]]: f"device {names[1]} (id {ids[names[1]]})",
        a_proc.pid: f"process {a_proc.pid} tracer-a",
        b_proc.pid: f"process {b_proc.pid} tracer-b",
    }
    kinds = defaultdict(list)
    for e in body:
        kinds[e["cat"]].append(e)
    assert set(kinds) == {"invalidate", "window", "syscall", "range_fault", "migrate", "migrate_to_ram"}
    # The CPU read that pulled a page home opened a MIGRATE window: it counts as well.
    assert {e["name"] for e in kinds["syscall"] if e["pid"] == a_proc.pid} == {"read", "mprotect"}
    assert {e["name"] for e in kinds["syscall"] if e["pid"] == b_proc.pid} == {"munmap"}
    (to_dev,) = [e for e in kinds["migrate"] if e["name"] == "migrate to_device"]
    assert to_dev["args"]["npages"] == N // 2 and to_dev["args"]["nbytes"] == N // 2 * PAGE_SIZE
    assert to_dev["pid"] == DEVICE_TRACK_BASE + ids[names[0]]
    (m2r,) = kinds["migrate_to_ram"]
    assert m2r["args"]["start"] == hex(a + PAGE_SIZE) and m2r["args"]["ok"]
    protect = [e for e in kinds["invalidate"] if e["args"]["event"] == "PROTECTION_VMA"]
    assert {e["pid"] for e in protect} == {DEVICE_TRACK_BASE + ids[n] for n in names}
    assert all(e["args"]["ok"] and e["args"]["cur_seq"] % 2 == 1 for e in kinds["invalidate"])
    assert {e["args"]["pid"] for e in kinds["range_fault"]} == {a_proc.pid, b_proc.pid}
    # Timing: every span lies within the workload's wall time, and a syscall holds its windows.
    first = min(e["ts"] for e in body)
    assert max(e["ts"] + e.get("dur", 0) for e in body) - first <= elapsed_us
    assert all(0 < e["dur"] < 1.5e6 for e in kinds["invalidate"])  # acked within the callback deadline
    (mprotect,) = [e for e in kinds["syscall"] if e["name"] == "mprotect"]
    (window,) = [e for e in kinds["window"] if e["args"]["event"] == "PROTECTION_VMA"]
    assert mprotect["ts"] <= window["ts"] and window["ts"] + window["dur"] <= mprotect["ts"] + mprotect["dur"]
    for e in protect:
        assert window["ts"] <= e["ts"] and e["ts"] + e["dur"] <= window["ts"] + window["dur"]
    await a_proc.exit()
    await b_proc.exit()
    await dm.close()


class Lines:
    """A program's stdout lines, read by a thread (select on a buffered pipe misses
    lines that arrived together)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.queue: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.reader.start()
        self.seen: list[str] = []

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            self.queue.put(line)

    def until(self, text: str, timeout: float = 20.0) -> None:
        """Wait for a line containing ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.queue.get(timeout=0.05)
            except queue.Empty:
                continue
            self.seen.append(line)
            if text in line:
                return
        raise AssertionError(f"never saw {text!r}: {self.seen}")

    def all(self, timeout: float = 20.0) -> str:
        """Every line, once the program closed its stdout."""
        self.reader.join(timeout)
        while not self.queue.empty():
            self.seen.append(self.queue.get())
        return "".join(self.seen)


async def test_hmmctl_trace_live(hmmd: Program, cpu: ProcessClient, dmirror_factory, tmp_path: Path) -> None:
    prog, (name,) = dmirror_factory(1)
    proc = await cpu.spawn("live")
    a = await proc.mmap(8 * PAGE_SIZE)
    await proc.write(a, b"L" * 8 * PAGE_SIZE)
    _, fid = await proc.open(f"/dev/{name}")
    dm = DmirrorClient(prog.address)
    await dm.command(fid, CMD_READ, a, 8)
    out = tmp_path / "live.json"
    tracer = subprocess.Popen([sys.executable, "-m", "hmmd.ctl", "trace", "--kernel", hmmd.address, "--duration",
                               "60", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = Lines(tracer)
    try:
        lines.until("tracing hmmd at")  # subscribed: everything from here on is seen
        await proc.munmap(a, 8 * PAGE_SIZE)
        lines.until("munmap")
        tracer.send_signal(signal.SIGINT)
        assert tracer.wait(20) == 0, tracer.stderr.read() if tracer.stderr else ""
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    text = lines.all()
    unmap = next(line for line in text.splitlines() if "invalidate UNMAP" in line)
    assert f"dev {name}" in unmap and f"pid {proc.pid}" in unmap and f"[{a:#x}, +8p)" in unmap
    assert any(f"pid {proc.pid} live" in line and "window UNMAP" in line for line in text.splitlines())
    assert "wrote " in text and "ui.perfetto.dev" in text
    body = check_chrome_trace(json.loads(out.read_text()))
    ours = [e for e in body if e["args"].get("pid") == proc.pid]  # other tests' devices may still be leaving
    assert sorted(e["cat"] for e in ours) == ["invalidate", "syscall", "window"]
    await proc.exit()
    await dm.close()


async def test_hmmctl_trace_duration_and_json(hmmd: Program) -> None:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "hmmd.ctl", "trace", "--kernel", hmmd.address, "--duration", "0.5",
                        "--json"], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert 0.5 <= time.monotonic() - t0 < 20
    assert "tracing hmmd at" in r.stderr
    for line in r.stdout.splitlines():  # whatever else ran meanwhile: one JSON object per event
        assert json.loads(line)["kind"]
    events = [json.loads(line) for line in ctl(hmmd, "trace", "--buffer", "--json").splitlines()]
    assert events and all({"kind", "ts_ns", "dur_ns", "seq"} <= set(e) for e in events)
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)


async def test_hmmctl_notifiers(hmmd: Program, cpu: ProcessClient, dmirror_factory) -> None:
    prog, names = dmirror_factory(2)
    proc = await cpu.spawn("watched")
    await proc.open(f"/dev/{names[0]}")
    await proc.open(f"/dev/{names[1]}")
    listed = json.loads(ctl(hmmd, "notifiers", "--json", "--pid", str(proc.pid)))
    assert sorted(n["device_name"] for n in listed) == sorted(names)
    for n in listed:
        assert n["pid"] == proc.pid and n["start"] == 0 and n["last"] == TASK_SIZE - 1
        assert n["state"] == "idle" and n["mm_seq"] % 2 == 0 and n["seq"] == n["mm_seq"] - 1
    everyone = json.loads(ctl(hmmd, "notifiers", "--json"))
    assert {n["notifier_id"] for n in listed} <= {n["notifier_id"] for n in everyone}
    text = ctl(hmmd, "notifiers")
    assert text.splitlines()[0].split()[:3] == ["ID", "DEVICE", "PID"] and names[0] in text
    await proc.exit()
    assert json.loads(ctl(hmmd, "notifiers", "--json", "--pid", str(proc.pid))) == []
    del prog


def test_demo_json_against_running_daemon(hmmd: Program, dmirror_factory, tmp_path: Path) -> None:
    prog, names = dmirror_factory(2)
    out = tmp_path / "demo.json"
    r = subprocess.run([sys.executable, "-m", "hmmd.ctl", "demo", "--kernel", hmmd.address,
                        *(f"--device={n}={prog.address}" for n in names), "--trace-out", str(out), "--json"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)  # progress went to stderr
    assert result["ok"] and result["violations"] == 0 and result["trace"] == str(out)
    assert len(result["steps"]) == 12 and all(s["ok"] for s in result["steps"])
    assert "ok   CPU writes a pattern" in r.stderr and "ui.perfetto.dev" in r.stderr
    check_chrome_trace(json.loads(out.read_text()))


async def test_fenced_coherent_device_is_evicted_by_the_core(hmmd: Program, cpu: ProcessClient, tmp_path: Path) -> None:
    dm_prog = start_dmirror(tmp_path, hmmd.address, "coh_t0:coherent", args=("--snoop",), name="dmirror-coh")
    dm = DmirrorClient(dm_prog.address)
    admin = AdminClient(cpu.channel)
    proc = await cpu.spawn("coh")
    a = await proc.mmap(8 * PAGE_SIZE)
    await proc.write(a, b"c" * 8 * PAGE_SIZE)
    _, fid = await proc.open("/dev/coh_t0")
    assert (await dm.command(fid, CMD_MIGRATE_TO_DEV, a, 4)).cpages == 4
    await dm.close()
    dm_prog.proc.kill()  # killed, so fenced with its pages: the daemon moves them home itself
    dm_prog.stop()
    for _ in range(200):
        evicted = [e for e in (await admin.trace_buffer()).events if e.kind == "evict" and e.device_name == "coh_t0"]
        if evicted:
            break
        await asyncio.sleep(0.05)
    (ev,) = evicted
    assert (ev.npages, ev.nbytes, ev.direction, ev.ok) == (4, 4 * PAGE_SIZE, "to_ram", True)
    assert await proc.read(a, 8 * PAGE_SIZE) == b"c" * 8 * PAGE_SIZE
    await proc.exit()



async def test_failed_call_past_2_64_does_not_break_the_trace(hmmd: Program, cpu: ProcessClient) -> None:
    admin = AdminClient(cpu.channel)
    rec = Recorder()
    async with recording_device(hmmd.address, "trace", rec) as dev:
        proc = await cpu.spawn("past-2-64")
        a = await proc.mmap(2 * PAGE_SIZE)
        await proc.write(a, b"p" * 2 * PAGE_SIZE)
        await proc.open(f"/dev/{dev.name}")
        await dev.insert_notifier(proc.pid, a, 2 * PAGE_SIZE)
        stream = admin.trace_stream()
        assert (await asyncio.wait_for(anext(stream), 10)).events == ()  # subscribed
        rec.hold = asyncio.Event()
        unmap = asyncio.ensure_future(proc.munmap(a + PAGE_SIZE, PAGE_SIZE))
        await asyncio.wait_for(until(lambda: bool(rec.events)), 10)  # in its window, holding the mmap lock
        # A call is traced only if a window opens while it runs: this one waits for
        # the munmap's lock, and fails once it has it (EINVAL: the shrink's tail leaves
        # the address space).
        bogus = asyncio.ensure_future(proc.mremap(a, ULONG_MAX - PAGE_SIZE + 1, PAGE_SIZE, MREMAP_MAYMOVE))
        # The daemon starts the calls of one channel in the order they were sent: once a
        # later one is answered, the mremap has begun (and waits for the lock).
        await admin.stats()
        assert not bogus.done()
        rec.hold.set()
        await asyncio.wait_for(unmap, 10)
        with pytest.raises(KernelError) as e:
            await asyncio.wait_for(bogus, 10)
        assert e.value.errno == errno.EINVAL

        def ours(events: Iterable[TraceEvent]) -> list[TraceEvent]:
            return [e for e in events if e.kind == "syscall" and e.pid == proc.pid and e.syscall == "mremap"]

        # Recorded with its end clamped (TraceEvent.end is a uint64), and the buffer reads.
        (mr,) = ours((await admin.trace_buffer()).events)
        assert (mr.start, mr.end, mr.errno, mr.ok, mr.count) == (a, ULONG_MAX, errno.EINVAL, False, 1)
        # The live stream got it too, and goes on.
        seen: list[TraceEvent] = []
        while not ours(seen):
            seen += (await asyncio.wait_for(anext(stream), 10)).events
        await proc.munmap(a, PAGE_SIZE)
        while not any(e.kind == "syscall" and e.syscall == "munmap" and e.start == a for e in seen):
            seen += (await asyncio.wait_for(anext(stream), 10)).events
        await stream.aclose()
        # And a clear clears.
        await admin.trace_buffer(clear=True)
        assert not ours((await admin.trace_buffer()).events)
        await proc.exit()


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def test_hmmctl_trace_says_so_when_the_daemon_goes_away(tmp_path: Path) -> None:
    daemon = start_hmmd(tmp_path, name="hmmd-trace-end")
    tracer = subprocess.Popen([sys.executable, "-m", "hmmd.ctl", "trace", "--kernel", daemon.address, "--duration",
                               "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        Lines(tracer).until("tracing hmmd at")
        assert daemon.stop() == 0  # SIGTERM: the daemon ends the stream cleanly
        assert tracer.wait(20) == 1
        assert tracer.stderr is not None
        assert tracer.stderr.read() == f"hmmctl: hmmd at {daemon.address} ended the trace stream (it is shutting " \
                                       "down)\n"
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
