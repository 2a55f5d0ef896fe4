"""Read-only views of a running daemon (hmm.v1.Admin)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, fields

import grpc

from hmm.channel import open_channel, raise_kernel_error
from hmm.process import Status, status_from_message
from hmm.security import Credentials
from hmm.v1 import admin_pb2 as pb
from hmm.v1 import admin_pb2_grpc


@dataclass(frozen=True)
class Latency:
    count: int
    p50_us: float
    p99_us: float
    max_us: float


@dataclass(frozen=True)
class DeviceStats:
    device_id: int
    name: str
    alive: bool
    fenced_reason: str
    owner: int
    notifiers: int
    invalidations: int
    range_faults: int
    violations: int
    invalidate_latency: Latency
    memory: str
    memory_pages: int
    memory_used_pages: int
    migrations_open: int
    memory_pfn_base: int = 0
    migrate_to_ram_latency: Latency = Latency(0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class KernelStats:
    ram_frames: int
    ram_used_frames: int
    processes: int
    devices: tuple[DeviceStats, ...]
    window_latency: Latency
    hugetlb_pages: int = 0  # the pool, in 2 MiB pages
    hugetlb_free: int = 0  # free, the reserved ones included
    hugetlb_reserved: int = 0  # promised to mappings at mmap, not faulted in yet
    swap_pages: int = 0  # swap space
    swap_used_pages: int = 0
    reclaim_stalls: int = 0  # allocations that had to reclaim (allocstall)
    reclaimed_pages: int = 0  # the pages their reclaim swapped out
    oom_kills: int = 0  # processes the OOM killer chose when reclaim could not make room

    def device(self, name: str) -> DeviceStats:
        """The most recent device of that name (a fenced one keeps its record)."""
        matches = [d for d in self.devices if d.name == name]
        if not matches:
            raise KeyError(name)
        return matches[-1]


@dataclass(frozen=True)
class NotifierInfo:
    """An interval notifier [start, last] of a device over a process, and its
    sequence state: "idle", "invalidating", "insert-deferred" or "remove-deferred"."""

    notifier_id: int
    device_id: int
    device_name: str
    pid: int
    start: int
    last: int
    seq: int
    mm_seq: int
    state: str


@dataclass(frozen=True)
class TraceEvent:
    """One trace event (hmm.v1.TraceEvent); ``kind`` is "invalidate", "range_fault",
    "migrate", "migrate_to_ram", "evict", "fence", "syscall" or "window"."""

    kind: str
    ts_ns: int
    dur_ns: int
    seq: int
    device_id: int
    device_name: str
    pid: int
    process_name: str
    start: int
    end: int
    npages: int
    nbytes: int
    errno: int
    ok: bool
    event: str
    owner: int
    notifier_id: int
    cur_seq: int
    syscall: str
    direction: str
    rollback: bool
    reason: str
    count: int


@dataclass(frozen=True)
class TraceBatch:
    events: tuple[TraceEvent, ...]
    dropped: int  # events lost so far (see hmm.v1.TraceBatch)


_TRACE_FIELDS = tuple(f.name for f in fields(TraceEvent) if f.name != "kind")


def _trace_batch(m: pb.TraceBatch) -> TraceBatch:
    return TraceBatch(tuple(
        TraceEvent(pb.TraceKind.Name(e.kind).removeprefix("TRACE_").lower(),  # type: ignore[arg-type]
                   **{name: getattr(e, name) for name in _TRACE_FIELDS})
        for e in m.events
    ), m.dropped)


def _lat(m: pb.LatencySummary) -> Latency:
    return Latency(m.count, m.p50_us, m.p99_us, m.max_us)


class AdminClient:
    def __init__(self, channel: grpc.aio.Channel | None = None, address: str = "",
                 credentials: Credentials | None = None) -> None:
        """On ``channel``, or on a channel of its own to ``address`` with ``credentials``
        (default: the HMM_* environment, hmm.security)."""
        if isinstance(channel, str):  # (an easy slip: the address is a keyword argument)
            raise TypeError(f"AdminClient(address={channel!r}), not a channel: the first argument is a channel")
        self._own = channel is None
        self.channel = channel if channel is not None else open_channel(address, credentials)
        self.stub = admin_pb2_grpc.AdminStub(self.channel)

    async def close(self) -> None:
        if self._own:
            await self.channel.close()

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def processes(self) -> list[Status]:
        """Every process with its counters and maps (an OOM-killed one, not alive,
        until it has exited)."""
        try:
            r = await self.stub.Processes(pb.StatsRequest())
        except grpc.aio.AioRpcError as e:
            raise_kernel_error(e)
        return [status_from_message(s) for s in r.processes]

    async def stats(self, reset_latencies: bool = False) -> KernelStats:
        try:
            s = await self.stub.Stats(pb.StatsRequest(reset_latencies=reset_latencies))
        except grpc.aio.AioRpcError as e:
            raise_kernel_error(e)
        devices = tuple(
            DeviceStats(d.device_id, d.name, d.alive, d.fenced_reason, d.owner, d.notifiers, d.invalidations,
                        d.range_faults, d.violations, _lat(d.invalidate_latency), d.memory, d.memory_pages,
                        d.memory_used_pages, d.migrations_open, d.memory_pfn_base,
                        _lat(d.migrate_to_ram_latency))
            for d in s.devices
        )
        return KernelStats(s.ram_frames, s.ram_used_frames, s.processes, devices, _lat(s.window_latency),
                           s.hugetlb_pages, s.hugetlb_free, s.hugetlb_reserved, s.swap_pages, s.swap_used_pages,
                           s.reclaim_stalls, s.reclaimed_pages, s.oom_kills)

    async def check_invariants(self) -> list[str]:
        """The daemon's invariant violations (empty: all hold)."""
        try:
            r = await self.stub.CheckInvariants(pb.InvariantsRequest())
        except grpc.aio.AioRpcError as e:
            raise_kernel_error(e)
        return list(r.violations)

    async def compact_memory(self) -> int:
        """Memory compaction (/proc/sys/vm/compact_memory): the pages moved."""
        try:
            r = await self.stub.CompactMemory(pb.CompactRequest())
        except grpc.aio.AioRpcError as e:
            raise_kernel_error(e)
        return int(r.pages_moved)

    async def inject_faults(self, device: str, *, disconnect: bool = False, **faults: int) -> dict[str, int]:
        """Set some of a device's injected faults (ack_delay_ms, drop_acks,
        stream_delay_ms, fail_alloc, fail_dma); with ``disconnect`` fence it now.
        Returns the device's whole plan."""
        try:
            r = await self.stub.InjectFaults(pb.InjectFaultsRequest(device=device, disconnect=disconnect, **faults))
        except grpc.aio.AioRpcError as e:
            raise_kernel_error(e)
        return {f.name: getattr(r, f.name) for f in r.DESCRIPTOR.fields}

    async def notifiers(self, pid: int = 0) -> list[NotifierInfo]:
        """Every interval notifier (of one process when ``pid``), by pid and address."""
        try:
            r = await self.stub.Notifiers(pb.NotifiersRequest(pid=pid))
        except grpc.aio.AioRpcError as e:
            raise_kernel_error(e)
        return [NotifierInfo(n.notifier_id, n.device_id, n.device_name, n.pid, n.start, n.last, n.seq, n.mm_seq,
                             n.state) for n in r.notifiers]

    async def trace_buffer(self, clear: bool = False) -> TraceBatch:
        """The daemon's trace ring buffer, oldest first."""
        try:
            r = await self.stub.TraceBuffer(pb.TraceBufferRequest(clear=clear))
        except grpc.aio.AioRpcError as e:
            raise_kernel_error(e)
        return _trace_batch(r)

    async def trace_stream(self, queue_size: int = 0) -> AsyncGenerator[TraceBatch, None]:
        """Live trace batches until the caller stops iterating (or the daemon stops).
        The first batch is empty and arrives once the daemon has subscribed."""
        call = self.stub.TraceStream(pb.TraceStreamRequest(queue_size=queue_size))
        try:
            async for m in call:
                yield _trace_batch(m)
        except grpc.aio.AioRpcError as e:
            raise_kernel_error(e)
        finally:
            call.cancel()
