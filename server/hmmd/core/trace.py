"""Timeline tracing: what the kernel did, for whom, and how long it took.

Like the kernel's tracepoints, each emission site is one call on the kernel's
``Tracer``, and each call returns at once while nobody listens: no ring buffer,
no sink and no subscriber. Otherwise an event goes

* to a bounded ring buffer (the recent past: ``hmmctl trace --out`` after the fact),
* to sinks, called synchronously (the Prometheus metrics),
* to live subscribers, each through a bounded queue: a subscriber that falls
  behind loses events (counted), the kernel never waits for it.

What is traced, and where it is drawn (``chrome_trace``):

* on a device's track: every invalidation callback, sent → acked, per notifier;
  range faults with their errno; migrations setup → finalize (direction, pages
  and bytes moved, rollback); evictions; migrate_to_ram; fencing;
* on a process's track: each invalidation window's fan-out (event type, notifiers
  called), and the CPU system calls that opened windows (munmap, mprotect, fork, …).

Everything runs on the daemon's event loop; timestamps are ``time.perf_counter``
nanoseconds since the tracer started.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import functools
import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

import numpy as np

from hmm.abi import MIGRATE_PFN_MIGRATE, PAGE_SHIFT, PAGE_SIZE, ULONG_MAX
from hmm.errors import KernelError, errno_name

if TYPE_CHECKING:
    from hmmd.core.device import Device
    from hmmd.core.evict import Eviction
    from hmmd.core.migrate import Migration
    from hmmd.core.notifier import IntervalNotifier, NotifierRange

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_QUEUE = 10_000  # events a live subscriber may have waiting before newer ones are dropped
DEVICE_TRACK_BASE = 1 << 20  # Chrome trace pids of device tracks, above any process pid


class Kind(enum.IntEnum):
    """What an event records (the numbers are hmm.v1.TraceKind's)."""

    INVALIDATE = 1  # one notifier's invalidate callback, sent → acked (device track)
    RANGE_FAULT = 2  # hmm_range_fault for a device
    MIGRATE = 3  # migrate_vma, setup → finalize
    MIGRATE_TO_RAM = 4  # a CPU fault on a device page, handled by its owner
    EVICT = 5  # a device's memory moved home, setup → finalize
    FENCE = 6  # a device cut off (instant)
    SYSCALL = 7  # a CPU system call that opened invalidation windows (process track)
    WINDOW = 8  # one invalidation window's fan-out in an address space (process track)


@dataclass(slots=True)
class TraceEvent:
    """One traced event. Fields that do not apply to a kind stay at their default."""

    kind: Kind
    ts_ns: int  # start, since the tracer started
    dur_ns: int = 0  # 0 for an instant
    seq: int = 0  # 1, 2, … in emission order: a gap in a live stream is a drop
    device_id: int = 0
    device_name: str = ""
    pid: int = 0
    process_name: str = ""
    start: int = 0  # [start, end): the virtual range concerned
    end: int = 0
    npages: int = 0  # pages asked for (range fault) or moved (migration, eviction)
    nbytes: int = 0  # bytes moved (migration, eviction)
    errno: int = 0  # 0 on success
    ok: bool = True  # acked / moved home / finalized; False: fenced, failed or rolled back
    event: str = ""  # the invalidation's event type (UNMAP, CLEAR, …): INVALIDATE, WINDOW
    owner: int = 0  # the invalidation's owner tag
    notifier_id: int = 0
    cur_seq: int = 0  # the sequence the invalidation carried
    syscall: str = ""  # SYSCALL: its name
    direction: str = ""  # MIGRATE, EVICT: "to_device", "to_ram" or "mixed"
    rollback: bool = False
    reason: str = ""  # FENCE: why
    count: int = 0  # WINDOW: notifiers called; SYSCALL: windows opened

    @property
    def end_ns(self) -> int:
        return self.ts_ns + self.dur_ns


class Subscription:
    """A live reader of a tracer: a bounded queue that drops, never blocks.

    Use as a context manager; ``next_batch`` waits for events and returns [] once
    the subscription was closed (by the reader or by ``Tracer.close``) and drained.
    """

    def __init__(self, tracer: Tracer, maxsize: int) -> None:
        self._tracer = tracer
        self.maxsize = max(1, maxsize)
        self._events: deque[TraceEvent] = deque()
        self._ready = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def offer(self, ev: TraceEvent) -> None:
        if len(self._events) >= self.maxsize:
            self.dropped += 1
            return
        self._events.append(ev)
        self._ready.set()

    async def next_batch(self, max_events: int = 1024) -> list[TraceEvent]:
        while not self._events and not self.closed:
            self._ready.clear()
            await self._ready.wait()
        n = min(max_events, len(self._events))
        return [self._events.popleft() for _ in range(n)]

    def close(self) -> None:
        self.closed = True
        self._ready.set()
        self._tracer._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Tracer:
    """The kernel's trace points. ``capacity`` bounds the ring buffer (0: none)."""

    def __init__(self, capacity: int = 0) -> None:
        self.origin = time.perf_counter()
        self.wall_origin = time.time()
        self.ring: deque[TraceEvent] | None = None
        self.sinks: list[Callable[[TraceEvent], None]] = []
        self._subscribers: set[Subscription] = set()
        self.on = False
        self.seq = 0
        self.overwritten = 0  # events the full ring buffer let go
        self.process_names: dict[int, str] = {}
        self._windows: dict[int, int] = {}  # pid -> windows traced (tells which syscalls opened one)
        self._open: dict[int, tuple[float, str]] = {}  # migration id -> (setup time, direction)
        self.set_capacity(capacity)

    # ---- listeners -----------------------------------------------------------------------
    def set_capacity(self, capacity: int) -> None:
        """Resize the ring buffer (keeping its newest events); 0 removes it."""
        old = list(self.ring or ())
        self.ring = deque(old[-capacity:], maxlen=capacity) if capacity > 0 else None
        self._update()

    def add_sink(self, sink: Callable[[TraceEvent], None]) -> None:
        self.sinks.append(sink)
        self._update()

    def remove_sink(self, sink: Callable[[TraceEvent], None]) -> None:
        self.sinks.remove(sink)
        self._update()

    def subscribe(self, maxsize: int = DEFAULT_QUEUE) -> Subscription:
        sub = Subscription(self, maxsize)
        self._subscribers.add(sub)
        self._update()
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)
        self._update()

    def close(self) -> None:
        """End every live subscription (daemon shutdown: streams must not idle)."""
        for sub in list(self._subscribers):
            sub.close()

    def _update(self) -> None:
        self.on = self.ring is not None or bool(self.sinks) or bool(self._subscribers)

    def buffered(self) -> list[TraceEvent]:
        """The ring buffer's events, oldest first."""
        return list(self.ring or ())

    def clear(self) -> None:
        if self.ring is not None:
            self.ring.clear()

    # ---- emission --------------------------------------------------------------------------
    def _ns(self, t: float) -> int:
        return int((t - self.origin) * 1e9)

    def _emit(self, ev: TraceEvent) -> None:
        self.seq += 1
        ev.seq = self.seq
        if self.ring is not None:
            if len(self.ring) == self.ring.maxlen:
                self.overwritten += 1
            self.ring.append(ev)
        for sink in self.sinks:
            try:
                sink(ev)
            except Exception:  # a broken sink must not break the kernel
                log.exception("trace sink %r failed", sink)
        for sub in self._subscribers:
            sub.offer(ev)

    def _event(self, kind: Kind, t0: float, t1: float | None, dev: Device | None, pid: int,
               **fields: Any) -> TraceEvent:
        ts = self._ns(t0)
        return TraceEvent(
            kind, ts, self._ns(t1) - ts if t1 is not None else 0,
            device_id=dev.id if dev is not None else 0, device_name=dev.name if dev is not None else "",
            pid=pid, process_name=self.process_names.get(pid, "") if pid else "", **fields,
        )

    def process_name(self, pid: int, name: str) -> None:
        """A process was created (recorded even while off: a later reader names its track)."""
        self.process_names[pid] = name

    def forget_process(self, pid: int) -> None:
        self.process_names.pop(pid, None)
        self._windows.pop(pid, None)

    async def invalidation(self, dev: Device, sub: IntervalNotifier, rng: NotifierRange, cur_seq: int,
                           call: Awaitable[bool]) -> bool:
        """Await a device's invalidate callback ``call``, recording sent → acked."""
        if not self.on:
            return await call
        t0, ok = time.perf_counter(), False
        try:
            ok = await call
            return ok
        finally:
            self._emit(self._event(
                Kind.INVALIDATE, t0, time.perf_counter(), dev, getattr(rng.mm, "pid", 0),
                start=rng.start, end=min(rng.end, ULONG_MAX), ok=ok and dev.alive, event=rng.event.name,
                owner=rng.owner, notifier_id=sub.id, cur_seq=cur_seq,
            ))

    async def range_fault(self, dev: Device, pid: int, start: int, end: int, call: Awaitable[R]) -> R:
        """Await hmm_range_fault ``call`` for ``dev``, recording its duration and errno."""
        if not self.on:
            return await call
        return await self._span(Kind.RANGE_FAULT, call, dev, pid, start, end, npages=(end - start) >> PAGE_SHIFT)

    async def migrate_to_ram(self, dev: Device, pid: int, addr: int, call: Awaitable[bool]) -> bool:
        """Await the owner's migrate_to_ram ``call`` for the page at ``addr``."""
        if not self.on:
            return await call
        page = addr & ~(PAGE_SIZE - 1)
        return await self._span(Kind.MIGRATE_TO_RAM, call, dev, pid, page, page + PAGE_SIZE, npages=1)

    async def _span(self, kind: Kind, call: Awaitable[R], dev: Device | None, pid: int, start: int, end: int,
                    **fields: Any) -> R:
        t0, err, ok = time.perf_counter(), errno.EINTR, False
        try:
            result = await call
            err, ok = 0, result is not False
            return result
        except KernelError as e:
            err = e.errno or errno.EIO
            raise
        finally:
            self._emit(self._event(kind, t0, time.perf_counter(), dev, pid, start=start, end=end, errno=err,
                                   ok=ok, **fields))

    def migration_setup(self, mig: Migration | Eviction) -> None:
        """A migration or eviction was set up; ``migration_end`` closes it."""
        if not self.on:
            return
        mm = getattr(mig, "mm", None)  # a Migration; an Eviction brings device pages home
        direction = "to_ram"
        if mm is not None:
            m = cast("Migration", mig)  # per page (compound entries unfolded)
            collected = (m.page_flags & MIGRATE_PFN_MIGRATE) != 0
            n = int(np.count_nonzero(collected & (m.page_pfns >= mm.ram.nframes)))  # device pages
            direction = "to_device" if n == 0 else "to_ram" if n == mig.cpages else "mixed"
        self._open[mig.id] = (time.perf_counter(), direction)

    def migration_end(self, dev: Device, mig: Migration | Eviction, rollback: bool) -> None:
        """Finalized (or rolled back): the pages that moved are those still collected."""
        opened = self._open.pop(mig.id, None)
        if opened is None or not self.on:
            return
        moved = 0 if rollback else mig.cpages
        mm = getattr(mig, "mm", None)
        self._emit(self._event(
            Kind.EVICT if mm is None else Kind.MIGRATE, opened[0], time.perf_counter(), dev, getattr(mm, "pid", 0),
            start=getattr(mig, "start", 0), end=getattr(mig, "end", 0), npages=moved, nbytes=moved * PAGE_SIZE,
            ok=not rollback, direction=opened[1], rollback=rollback,
        ))

    async def eviction(self, dev: Device | None, call: Awaitable[int]) -> int:
        """Await the core's own move of a device's coherent pages home (``call`` returns
        how many pages moved)."""
        if not self.on:
            return await call
        t0, moved = time.perf_counter(), 0
        try:
            moved = await call
            return moved
        finally:
            self._emit(self._event(Kind.EVICT, t0, time.perf_counter(), dev, 0, npages=moved,
                                   nbytes=moved * PAGE_SIZE, direction="to_ram"))

    def fence(self, dev: Device, reason: str) -> None:
        if self.on:
            now = time.perf_counter()
            self._emit(self._event(Kind.FENCE, now, None, dev, 0, ok=False, reason=reason))

    def window(self, mm: object, rng: NotifierRange, t0: float, notifiers: int) -> None:
        """An invalidation window of ``mm`` called ``notifiers`` notifiers since ``t0``."""
        if not self.on:
            return
        pid = getattr(mm, "pid", 0)
        self._windows[pid] = self._windows.get(pid, 0) + 1
        self._emit(self._event(Kind.WINDOW, t0, time.perf_counter(), None, pid, start=rng.start,
                               end=min(rng.end, ULONG_MAX), event=rng.event.name, owner=rng.owner, count=notifiers))

    def _syscall(self, pid: int, name: str, t0: float, windows: int, extent: tuple[int, int], err: int) -> None:
        opened = self._windows.get(pid, 0) - windows
        if opened > 0:
            self._emit(self._event(Kind.SYSCALL, t0, time.perf_counter(), None, pid, start=extent[0],
                                   end=extent[1], syscall=name, errno=err, ok=not err, count=opened))


def traced_syscall(*, ranged: bool = False) -> Callable[
    [Callable[Concatenate[Any, int, P], Awaitable[R]]], Callable[Concatenate[Any, int, P], Awaitable[R]]
]:
    """Decorate a Kernel system call ``(self, pid, …)``: while tracing, a call that
    opened invalidation windows in its process is recorded on that process's track.
    With ``ranged`` the first two arguments after the pid are an address and a length
    (or the bytes written). An ``exit`` (or ``oom_kill``) also forgets the process."""

    def wrap(fn: Callable[Concatenate[Any, int, P], Awaitable[R]]) -> Callable[Concatenate[Any, int, P], Awaitable[R]]:
        name = fn.__name__

        @functools.wraps(fn)
        async def call(kernel: Any, pid: int, *args: P.args, **kwargs: P.kwargs) -> R:
            tracer: Tracer = kernel.trace
            try:
                if not tracer.on:
                    return await fn(kernel, pid, *args, **kwargs)
                t0, windows, err = time.perf_counter(), tracer._windows.get(pid, 0), errno.EINTR
                try:
                    result = await fn(kernel, pid, *args, **kwargs)
                    err = 0
                    return result
                except KernelError as e:
                    err = e.errno or errno.EIO
                    raise
                finally:
                    tracer._syscall(pid, name, t0, windows, _extent(args) if ranged else (0, 0), err)
            finally:
                if name in ("exit", "oom_kill"):
                    tracer.forget_process(pid)

        return call

    return wrap


def _extent(args: tuple[Any, ...]) -> tuple[int, int]:
    addr, size = int(args[0]), args[1]
    end = addr + (len(size) if isinstance(size, bytes | bytearray | memoryview) else int(size))
    # A failed call may have named a range past 2^64 - 1 (mremap of 2^64 - 4096 bytes):
    # clamp it as windows are, so that every recorded range fits TraceEvent's uint64s.
    return _clamp(addr), _clamp(end)


def _clamp(value: int) -> int:
    return min(max(value, 0), ULONG_MAX)


# ---- presentation -------------------------------------------------------------------------------
def title(ev: TraceEvent) -> str:
    """A short name for the event (the slice's name in a timeline)."""
    failed = f" {errno_name(ev.errno)}" if ev.errno else ""
    match ev.kind:
        case Kind.INVALIDATE:
            return f"invalidate {ev.event}" + ("" if ev.ok else " (not acked)")
        case Kind.RANGE_FAULT:
            return "range_fault" + failed
        case Kind.MIGRATE:
            return f"migrate {ev.direction}" + (" (rolled back)" if ev.rollback else "")
        case Kind.EVICT:
            return "evict" + (" (rolled back)" if ev.rollback else "")
        case Kind.MIGRATE_TO_RAM:
            return "migrate_to_ram" + ("" if ev.ok else failed or " FAILED")
        case Kind.FENCE:
            return "fenced"
        case Kind.SYSCALL:
            return ev.syscall + failed
        case Kind.WINDOW:
            return f"window {ev.event}"
    return ev.kind.name.lower()


def _range(ev: TraceEvent) -> str:
    if not ev.end:
        return ""
    if ev.end >= ULONG_MAX:
        return f"[{ev.start:#x}, all)"
    n = (ev.end - ev.start) >> PAGE_SHIFT
    return f"[{ev.start:#x}, +{n}p)"


def describe(ev: TraceEvent) -> str:
    """One readable line: time, where, what, details."""
    where = f"dev {ev.device_name}" if ev.device_id else f"pid {ev.pid} {ev.process_name}".rstrip()
    parts = [f"{ev.ts_ns / 1e9:12.6f}s", f"{where:<20}", f"{title(ev):<28}"]
    if ev.device_id and ev.pid:
        parts.append(f"pid {ev.pid}")
    if rng := _range(ev):
        parts.append(rng)
    if ev.kind == Kind.INVALIDATE:
        parts.append(f"notifier {ev.notifier_id} seq {ev.cur_seq}" + (f" owner {ev.owner}" if ev.owner else ""))
    if ev.kind in (Kind.MIGRATE, Kind.EVICT):
        parts.append(f"{ev.npages} pages moved")
    if ev.kind == Kind.WINDOW:
        parts.append(f"{ev.count} notifier(s)")
    if ev.reason:
        parts.append(ev.reason)
    if ev.dur_ns:
        parts.append(f"{ev.dur_ns / 1000:.0f} us")
    return "  ".join(parts)


def _args(ev: TraceEvent) -> dict[str, Any]:
    out: dict[str, Any] = {"seq": ev.seq}
    if ev.pid:
        out["pid"] = ev.pid
    if ev.end:
        out["start"], out["end"] = f"{ev.start:#x}", f"{ev.end:#x}"
    for key in ("npages", "nbytes", "owner", "notifier_id", "cur_seq", "count"):
        if value := getattr(ev, key):
            out[key] = value
    if ev.errno:
        out["errno"] = errno_name(ev.errno)
    for key in ("event", "direction", "reason"):
        if value := getattr(ev, key):
            out[key] = value
    if ev.kind in (Kind.INVALIDATE, Kind.MIGRATE_TO_RAM, Kind.MIGRATE, Kind.EVICT):
        out["ok"] = ev.ok
    return out


_THREADS = {
    Kind.FENCE: "lifecycle",
    Kind.RANGE_FAULT: "range faults",
    Kind.MIGRATE: "migrations",
    Kind.EVICT: "migrations",
    Kind.MIGRATE_TO_RAM: "migrate_to_ram",
    Kind.SYSCALL: "syscalls",
    Kind.WINDOW: "invalidation windows",
}


def _track(ev: TraceEvent) -> tuple[int, str, str]:
    """(Chrome pid, process name, thread name) of the event's track."""
    if ev.kind in (Kind.SYSCALL, Kind.WINDOW):
        return ev.pid, f"process {ev.pid} {ev.process_name}".rstrip(), _THREADS[ev.kind]
    proc = (DEVICE_TRACK_BASE + ev.device_id, f"device {ev.device_name} (id {ev.device_id})")
    if ev.kind == Kind.INVALIDATE:
        return (*proc, f"notifier {ev.notifier_id} (pid {ev.pid})")
    return (*proc, _THREADS[ev.kind])


def chrome_trace(events: Iterable[TraceEvent], *, dropped: int = 0) -> dict[str, Any]:
    """The events in the Chrome Trace Event Format, as ui.perfetto.dev and
    chrome://tracing load it: one process per device and per CPU process, threads
    per kind (per notifier for invalidations), "X" complete events for spans and
    "i" instants. Overlapping spans that do not nest go to extra lanes
    ("… #2"), since a thread's slices must nest."""
    out: list[dict[str, Any]] = []
    procs: dict[int, str] = {}
    tids: dict[tuple[int, str], int] = {}
    lanes: dict[tuple[int, str], list[list[int]]] = {}  # per thread: each lane's stack of open end times
    for ev in sorted(events, key=lambda e: (e.ts_ns, -e.dur_ns, e.seq)):
        pid, pname, thread = _track(ev)
        procs.setdefault(pid, pname)
        if ev.dur_ns:
            stacks = lanes.setdefault((pid, thread), [])
            lane = 0
            while lane < len(stacks):
                stack = stacks[lane]
                while stack and stack[-1] <= ev.ts_ns:
                    stack.pop()
                if not stack or ev.end_ns <= stack[-1]:
                    break
                lane += 1
            else:
                stacks.append([])
            stacks[lane].append(ev.end_ns)
            if lane:
                thread = f"{thread} #{lane + 1}"
        tid = tids.setdefault((pid, thread), len(tids) + 1)
        base = {"name": title(ev), "cat": ev.kind.name.lower(), "ts": ev.ts_ns / 1000, "pid": pid, "tid": tid,
                "args": _args(ev)}
        if ev.dur_ns:
            out.append({**base, "ph": "X", "dur": ev.dur_ns / 1000})
        else:
            out.append({**base, "ph": "i", "s": "p"})
    meta: list[dict[str, Any]] = []
    for pid, name in procs.items():
        order = pid - DEVICE_TRACK_BASE if pid >= DEVICE_TRACK_BASE else DEVICE_TRACK_BASE + pid  # devices first
        meta.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}})
        meta.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": order}})
    for (pid, thread), tid in tids.items():
        meta.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread}})
        meta.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
    return {
        "traceEvents": meta + out,
        "displayTimeUnit": "ms",
        "otherData": {"producer": "hmmd", "clock": "microseconds since the daemon's tracer started",
                      "dropped_events": dropped},
    }


def write_chrome_trace(path: str | Path, events: Iterable[TraceEvent], *, dropped: int = 0) -> int:
    """Write ``chrome_trace`` to ``path``; returns the number of events written."""
    doc = chrome_trace(events, dropped=dropped)
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # a reader never sees half a file
    partial.write_text(json.dumps(doc))
    partial.replace(path)
    return sum(1 for e in doc["traceEvents"] if e["ph"] != "M")


# The tracer of address spaces and devices made outside a Kernel (core unit tests):
# nobody ever listens to it.
NO_TRACE = Tracer()
