"""The kernel's timeline trace (core/trace.py): the ring buffer's bound, live
subscribers that drop instead of blocking, what each trace point records, and the
Chrome trace export."""

from __future__ import annotations

import asyncio
import errno
from collections import defaultdict

import pytest

from hmm.abi import MAP_ANONYMOUS, MAP_PRIVATE, MREMAP_MAYMOVE, TASK_SIZE, ULONG_MAX, Event
from hmm.errors import KernelError
from hmmd.core.kernel import Kernel
from hmmd.core.notifier import NotifierRange
from hmmd.core.trace import DEVICE_TRACK_BASE, Kind, TraceEvent, Tracer, chrome_trace

from .conftest import P, make_env, pattern, raises_errno
from .test_migrate import make_g, settle


def fence_event(tracer: Tracer, env_dev, n: int) -> None:  # type: ignore[no-untyped-def]
    for i in range(n):
        tracer.fence(env_dev, f"reason {i}")


async def test_off_by_default_and_costs_one_check() -> None:
    env = await make_env()
    tracer = env.k.trace
    assert not tracer.on
    a = await env.mmap(4)
    await env.write(a, pattern(4, 1))
    await env.k.munmap(env.p.pid, a, 4 * P)
    assert tracer.buffered() == [] and tracer.seq == 0


async def test_ring_buffer_keeps_the_newest_events() -> None:
    env = await make_env()
    tracer = env.k.trace
    tracer.set_capacity(4)
    fence_event(tracer, env.dev, 10)
    kept = tracer.buffered()
    assert [e.seq for e in kept] == [7, 8, 9, 10]
    assert [e.reason for e in kept] == ["reason 6", "reason 7", "reason 8", "reason 9"]
    assert tracer.overwritten == 6
    tracer.set_capacity(2)  # shrinking keeps the newest
    assert [e.seq for e in tracer.buffered()] == [9, 10]
    tracer.set_capacity(0)
    assert not tracer.on and tracer.buffered() == []


async def test_slow_subscriber_drops_and_never_blocks() -> None:
    env = await make_env()
    tracer = env.k.trace
    slow = tracer.subscribe(maxsize=3)
    fast = tracer.subscribe(maxsize=100)
    assert tracer.on
    fence_event(tracer, env.dev, 10)  # synchronous: returns although nobody reads
    assert [e.seq for e in await slow.next_batch()] == [1, 2, 3]
    assert slow.dropped == 7
    assert [e.seq for e in await fast.next_batch(max_events=4)] == [1, 2, 3, 4]
    assert [e.seq for e in await fast.next_batch()] == list(range(5, 11)) and fast.dropped == 0
    fence_event(tracer, env.dev, 1)  # room again: the slow one sees new events
    assert [e.seq for e in await slow.next_batch()] == [11]
    slow.close()
    fast.close()
    assert not tracer.on


async def test_next_batch_waits_and_close_ends_it() -> None:
    env = await make_env()
    tracer = env.k.trace
    sub = tracer.subscribe()
    waiter = asyncio.ensure_future(sub.next_batch())
    await asyncio.sleep(0)
    assert not waiter.done()
    tracer.fence(env.dev, "x")
    assert [e.kind for e in await asyncio.wait_for(waiter, 1)] == [Kind.FENCE]
    waiter = asyncio.ensure_future(sub.next_batch())
    await asyncio.sleep(0)
    tracer.close()  # daemon shutdown ends every stream
    assert await asyncio.wait_for(waiter, 1) == []
    assert not tracer.on


async def test_munmap_records_window_invalidation_and_syscall() -> None:
    env = await make_env()
    k, pid = env.k, env.p.pid
    k.trace.set_capacity(100)
    a = await env.mmap(8)
    await env.write(a, pattern(8, 2))  # no notifier hit: the writes fault in, no window
    assert k.trace.buffered() == []
    await k.munmap(pid, a, 8 * P)
    by_kind = {e.kind: e for e in k.trace.buffered()}
    assert set(by_kind) == {Kind.INVALIDATE, Kind.WINDOW, Kind.SYSCALL}
    inv = by_kind[Kind.INVALIDATE]
    assert (inv.device_name, inv.pid, inv.process_name, inv.notifier_id) == ("fake0", pid, "test", env.sub.id)
    assert (inv.start, inv.end, inv.event, inv.ok) == (a, a + 8 * P, "UNMAP", True)
    assert inv.cur_seq == env.sub.invalidate_seq and inv.cur_seq & 1
    win, call = by_kind[Kind.WINDOW], by_kind[Kind.SYSCALL]
    assert (win.pid, win.event, win.count, win.device_id) == (pid, "UNMAP", 1, 0)
    assert (call.syscall, call.start, call.end, call.count, call.errno) == ("munmap", a, a + 8 * P, 1, 0)
    # The syscall contains its window, which contains the callback.
    assert call.ts_ns <= win.ts_ns <= inv.ts_ns and inv.end_ns <= win.end_ns <= call.end_ns
    assert all(e.dur_ns > 0 for e in by_kind.values())
    assert [e.seq for e in k.trace.buffered()] == [1, 2, 3]


async def test_syscall_without_a_window_is_not_recorded() -> None:
    env = await make_env()
    k = env.k
    k.trace.set_capacity(100)
    other = k.spawn("bystander")  # nobody mirrors it
    a = await k.mmap(other.pid, 0, 4 * P, 3, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    await k.write(other.pid, a, b"x" * P)
    await k.mprotect(other.pid, a, 4 * P, 1)
    await k.munmap(other.pid, a, 4 * P)
    child = await k.fork(other.pid)
    await k.exit(child.pid)
    assert k.trace.buffered() == []
    assert child.pid not in k.trace.process_names  # exit forgets the name


async def test_failed_syscall_carries_its_errno() -> None:
    env = await make_env()
    k = env.k
    k.trace.set_capacity(100)
    a = await env.mmap(2)
    await env.write(a, pattern(2, 3))
    await k.mprotect(env.p.pid, a, 2 * P, 1)  # read-only, one window
    with pytest.raises(KernelError):
        await env.write(a, b"y")  # EFAULT, no window: not recorded
    calls = [e for e in k.trace.buffered() if e.kind == Kind.SYSCALL]
    assert [(c.syscall, c.errno) for c in calls] == [("mprotect", 0)]


async def test_failed_syscall_past_2_64_is_clamped() -> None:
    """A call whose range runs past 2^64 - 1 fails; one that waited for the mmap lock
    while a window opened is recorded, its end clamped to 2^64 - 1 as a window's is
    (TraceEvent.end is a uint64)."""
    env = await make_env()
    k, pid = env.k, env.p.pid
    k.trace.set_capacity(100)
    a = await env.mmap(2)
    await env.write(a, pattern(2, 6))
    in_window, release = asyncio.Event(), asyncio.Event()

    async def hold(sub, rng, cur_seq) -> None:  # type: ignore[no-untyped-def]
        in_window.set()
        await release.wait()

    env.fake.hook = hold
    unmap = asyncio.ensure_future(k.munmap(pid, a + P, P))  # holds the mmap lock in its window
    await asyncio.wait_for(in_window.wait(), 1)
    mremap = asyncio.ensure_future(k.mremap(pid, a, ULONG_MAX - P + 1, P, MREMAP_MAYMOVE, 0))
    await asyncio.sleep(0)  # it starts, and queues for the lock
    assert not mremap.done()
    release.set()
    await asyncio.wait_for(unmap, 1)
    with raises_errno(errno.EINVAL):  # (a shrink whose tail leaves the address space)
        await asyncio.wait_for(mremap, 1)
    calls = {e.syscall: e for e in k.trace.buffered() if e.kind == Kind.SYSCALL}
    assert set(calls) == {"munmap", "mremap"}
    mr = calls["mremap"]  # (count: the munmap's window)
    assert (mr.start, mr.end, mr.errno, mr.ok, mr.count) == (a, ULONG_MAX, errno.EINVAL, False, 1)


async def test_range_fault_records_success_and_ebusy() -> None:
    env = await make_env()
    k = env.k
    k.trace.set_capacity(100)
    a = await env.mmap(4)
    await env.write(a, pattern(4, 4))
    await env.fault(a, a + 4 * P, default=1)
    seq = await env.read_begin()
    await k.mprotect(env.p.pid, a, P, 1)  # makes ``seq`` stale
    with pytest.raises(KernelError):
        await env.fault(a, a + 4 * P, default=1, seq=seq)
    faults = [e for e in k.trace.buffered() if e.kind == Kind.RANGE_FAULT]
    assert [(f.errno, f.ok, f.npages, f.start, f.device_name) for f in faults] == [
        (0, True, 4, a, "fake0"), (errno.EBUSY, False, 4, a, "fake0")]


async def test_migration_migrate_to_ram_and_fence() -> None:
    g = await make_g()
    k = g.k
    k.trace.set_capacity(1000)
    a = await g.env.mmap(4)
    await g.env.write(a, pattern(4, 5))
    await g.to_device(a, a + 4 * P)
    await settle()
    await g.env.read(a + P, P)  # CPU fault: migrate_to_ram of one page
    events = k.trace.buffered()
    migs = [e for e in events if e.kind == Kind.MIGRATE]
    assert [(m.direction, m.npages, m.nbytes, m.rollback, m.device_name) for m in migs] == [
        ("to_device", 4, 4 * P, False, "gpu0"), ("to_ram", 1, P, False, "gpu0")]
    (m2r,) = [e for e in events if e.kind == Kind.MIGRATE_TO_RAM]
    assert (m2r.start, m2r.pid, m2r.ok, m2r.device_name) == (a + P, g.p.pid, True, "gpu0")
    assert m2r.ts_ns <= migs[1].ts_ns and migs[1].end_ns <= m2r.end_ns  # setup inside the callback
    # Setup opened a MIGRATE window with the device's owner; both mirrors got it.
    inv = [e for e in events if e.kind == Kind.INVALIDATE and e.event == "MIGRATE"]
    assert {e.device_name for e in inv} == {"fake0", "gpu0"} and {e.owner for e in inv} == {g.dev.owner}
    # A migration the device abandons is rolled back when it is fenced.
    mig = await g.setup(a + 2 * P, a + 4 * P)
    k.fence_device(g.dev, "test fence")
    await settle()
    tail = k.trace.buffered()[-2:]
    assert [e.kind for e in tail] == [Kind.FENCE, Kind.MIGRATE]
    assert tail[0].reason == "test fence" and tail[1].rollback and tail[1].npages == 0 and not tail[1].ok
    assert mig.id not in g.dev.migrations


async def test_invalidation_of_a_fenced_device_is_not_acked() -> None:
    env = await make_env()
    k = env.k
    k.trace.set_capacity(100)

    def fence_inside(sub, rng, cur_seq) -> None:  # type: ignore[no-untyped-def]
        k.fence_device(env.dev, "died mid-callback")

    env.fake.hook = fence_inside
    a = await env.mmap(1)
    await env.write(a, b"z")
    await k.munmap(env.p.pid, a, P)
    (inv,) = [e for e in k.trace.buffered() if e.kind == Kind.INVALIDATE]
    assert not inv.ok


# ---- export ---------------------------------------------------------------------------------
def ev(kind: Kind, ts: int, dur: int, **kw) -> TraceEvent:  # type: ignore[no-untyped-def]
    return TraceEvent(kind, ts, dur, **kw)


def check_nesting(doc: dict) -> None:
    """Every thread's "X" slices nest (what trace viewers need)."""
    per_thread: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
    for e in doc["traceEvents"]:
        if e["ph"] == "X":
            per_thread[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"]))
    for slices in per_thread.values():
        stack: list[float] = []
        for start, end in sorted(slices, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1] <= start:
                stack.pop()
            assert not stack or end <= stack[-1], slices
            stack.append(end)


def test_chrome_trace_tracks_and_lanes() -> None:
    dev = {"device_id": 2, "device_name": "gpu0", "pid": 7}
    events = [
        ev(Kind.SYSCALL, 1000, 9000, pid=7, process_name="app", syscall="munmap", start=0x1000, end=0x3000, count=1),
        ev(Kind.WINDOW, 2000, 5000, pid=7, process_name="app", event="UNMAP", count=2),
        ev(Kind.INVALIDATE, 2100, 3000, notifier_id=5, event="UNMAP", **dev),
        ev(Kind.INVALIDATE, 2200, 3500, notifier_id=5, event="CLEAR", **dev),  # overlaps, does not nest
        ev(Kind.RANGE_FAULT, 8000, 1000, npages=2, errno=errno.EBUSY, ok=False, **dev),
        ev(Kind.FENCE, 20000, 0, reason="deadline", device_id=2, device_name="gpu0"),
    ]
    for i, e in enumerate(events):
        e.seq = i + 1
    doc = chrome_trace(events, dropped=3)
    assert doc["otherData"]["dropped_events"] == 3
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    procs = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert procs == {7: "process 7 app", DEVICE_TRACK_BASE + 2: "device gpu0 (id 2)"}
    threads = {(e["pid"], e["args"]["name"]) for e in meta if e["name"] == "thread_name"}
    dev_pid = DEVICE_TRACK_BASE + 2
    assert threads == {(7, "syscalls"), (7, "invalidation windows"), (dev_pid, "notifier 5 (pid 7)"),
                       (dev_pid, "notifier 5 (pid 7) #2"), (dev_pid, "range faults"), (dev_pid, "lifecycle")}
    body = {e["name"]: e for e in doc["traceEvents"] if e["ph"] != "M"}
    assert set(body) == {"munmap", "window UNMAP", "invalidate UNMAP", "invalidate CLEAR", "range_fault EBUSY",
                         "fenced"}
    assert body["munmap"]["ts"] == 1.0 and body["munmap"]["dur"] == 9.0  # microseconds
    assert body["munmap"]["args"]["start"] == "0x1000"
    assert body["fenced"]["ph"] == "i" and body["fenced"]["args"]["reason"] == "deadline"
    assert body["invalidate UNMAP"]["tid"] != body["invalidate CLEAR"]["tid"]
    check_nesting(doc)


async def test_export_of_a_real_run_nests() -> None:
    g = await make_g()
    k = g.k
    k.trace.set_capacity(1000)
    for i in range(3):
        a = await g.env.mmap(8)
        await g.env.write(a, pattern(8, i))
        await g.range_fault(a, a + 8 * P, 1, 0)
        await g.to_device(a, a + 4 * P)
        await settle()
        await g.env.read(a, 8 * P)
        await k.mprotect(g.p.pid, a, 8 * P, 1)
        await k.munmap(g.p.pid, a, 8 * P)
    await k.exit(g.p.pid)
    doc = chrome_trace(k.trace.buffered())
    check_nesting(doc)
    cats = {e["cat"] for e in doc["traceEvents"] if e["ph"] != "M"}
    assert cats == {"invalidate", "window", "syscall", "range_fault", "migrate", "migrate_to_ram"}


def test_notifier_state() -> None:
    k = Kernel(16 << 20)
    p = k.spawn("s")
    subs = p.mm.notifiers
    from hmmd.core.notifier import IntervalNotifier

    class Ops:
        async def invalidate(self, sub, rng, cur_seq) -> bool:  # type: ignore[no-untyped-def]
            sub.set_seq(cur_seq)
            return True

    sub = IntervalNotifier(subs, 0, TASK_SIZE, Ops())
    subs.insert(sub)
    assert sub.state == "idle"

    async def run() -> None:
        rng = NotifierRange(p.mm, 0, P, Event.CLEAR)
        await subs.invalidate_range_start(rng)
        assert sub.state == "invalidating"
        late = IntervalNotifier(subs, 0, P, Ops())
        subs.insert(late)
        assert late.state == "insert-deferred"
        task = asyncio.ensure_future(subs.remove(sub))
        await asyncio.sleep(0)
        assert sub.state == "remove-deferred"
        subs.invalidate_range_end(rng)
        await task
        assert late.state == "idle"

    asyncio.run(run())
