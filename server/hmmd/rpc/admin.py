"""hmm.v1.Admin servicer: views for tools and benchmarks, the trace, the invariant
checker and fault injection."""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncGenerator, Iterable
from dataclasses import fields

from hmm.errors import KernelError
from hmm.status import rpc_method, rpc_stream
from hmm.v1 import admin_pb2 as pb
from hmm.v1 import admin_pb2_grpc
from hmmd.core.faults import DeviceFaults
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import Kernel
from hmmd.core.stats import Latencies
from hmmd.core.trace import DEFAULT_QUEUE, TraceEvent
from hmmd.rpc.process import process_status
from hmmd.rpc.session import DeviceSession

log = logging.getLogger(__name__)

MAX_BATCH = 1024  # events per streamed message
_FIELDS = tuple(f.name for f in fields(TraceEvent) if f.name != "kind")  # named alike in TraceEvent messages


def _summary(lat: Latencies, reset: bool) -> pb.LatencySummary:
    s = lat.summary()
    if reset:
        lat.reset()
    return pb.LatencySummary(count=s.count, p50_us=s.p50_us, p99_us=s.p99_us, max_us=s.max_us)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, kernel: Kernel, sessions: dict[str, DeviceSession] | None = None) -> None:
        self.k = kernel
        self.sessions = sessions if sessions is not None else {}

    @rpc_method
    async def CheckInvariants(self, request: pb.InvariantsRequest, context) -> pb.InvariantReport:  # noqa: N802
        return pb.InvariantReport(violations=check_invariants(self.k))

    @rpc_method
    async def CompactMemory(self, request: pb.CompactRequest, context) -> pb.CompactReply:  # noqa: N802
        return pb.CompactReply(pages_moved=await self.k.compact_memory())

    @rpc_method
    async def InjectFaults(self, request: pb.InjectFaultsRequest, context) -> pb.FaultPlan:  # noqa: N802
        dev = self.k.device_by_name(request.device)
        if dev is None:
            raise KernelError(errno.ENOENT, f"no connected device named {request.device!r}")
        dev.faults.update(**{f.name: getattr(request, f.name) for f in fields(DeviceFaults)
                             if request.HasField(f.name)})
        plan = pb.FaultPlan(**{f.name: getattr(dev.faults, f.name) for f in fields(DeviceFaults)})
        if request.disconnect:
            for session in list(self.sessions.values()):
                if session.device is dev:
                    session.fence("disconnected by fault injection", errno.ECONNRESET)
        return plan

    @rpc_method
    async def Stats(self, request: pb.StatsRequest, context) -> pb.KernelStats:  # noqa: N802
        k, reset = self.k, request.reset_latencies
        devices = [
            pb.DeviceStats(
                device_id=d.id, name=d.name, alive=d.alive, fenced_reason=d.fenced_reason, owner=d.owner,
                notifiers=len(d.notifiers), invalidations=d.invalidations, range_faults=d.range_faults,
                violations=d.violations, invalidate_latency=_summary(d.invalidate_latency, reset),
                memory=d.pgmap.kind.name.removeprefix("DEVICE_").lower() if d.pgmap is not None else "",
                memory_pages=d.pgmap.npages if d.pgmap is not None else 0,
                memory_used_pages=d.pgmap.used_pages if d.pgmap is not None else 0,
                memory_pfn_base=d.pgmap.base if d.pgmap is not None else 0,
                migrations_open=len(d.migrations),
                migrate_to_ram_latency=_summary(d.migrate_to_ram_latency, reset),
            )
            for d in k.listed_devices()
        ]
        return pb.KernelStats(
            ram_frames=k.ram.nframes, ram_used_frames=k.ram.used_frames, processes=len(k.processes),
            devices=devices, window_latency=_summary(k.window_latency, reset),
            hugetlb_pages=k.ram.hugetlb_pages, hugetlb_free=k.ram.hugetlb_free, hugetlb_reserved=k.ram.hugetlb_reserved,
            swap_pages=k.swap.npages, swap_used_pages=k.swap.used,
            reclaim_stalls=k.reclaimer.stalls, reclaimed_pages=k.reclaimer.reclaimed, oom_kills=k.oom_kills,
        )

    @rpc_method
    async def Processes(self, request: pb.StatsRequest, context) -> pb.ProcessList:  # noqa: N802
        return pb.ProcessList(processes=[process_status(p) for p in self.k.processes.values()])

    @rpc_method
    async def Notifiers(self, request: pb.NotifiersRequest, context) -> pb.NotifierList:  # noqa: N802
        entries = sorted((e for e in self.k.notifiers.values() if not request.pid or e[2].pid == request.pid),
                         key=lambda e: (e[2].pid, e[1].start, e[1].id))
        return pb.NotifierList(notifiers=[
            pb.NotifierInfo(notifier_id=sub.id, device_id=dev.id, device_name=dev.name, pid=mm.pid, start=sub.start,
                            last=sub.last, seq=sub.invalidate_seq, mm_seq=sub.subs.invalidate_seq, state=sub.state)
            for dev, sub, mm in entries
        ])

    @rpc_method
    async def TraceBuffer(self, request: pb.TraceBufferRequest, context) -> pb.TraceBatch:  # noqa: N802
        tracer = self.k.trace
        events, dropped = tracer.buffered(), tracer.overwritten
        if request.clear:
            tracer.clear()
        return pb.TraceBatch(events=_events(events), dropped=dropped)

    @rpc_stream
    async def TraceStream(  # noqa: N802
        self, request: pb.TraceStreamRequest, context
    ) -> AsyncGenerator[pb.TraceBatch, None]:
        with self.k.trace.subscribe(request.queue_size or DEFAULT_QUEUE) as sub:
            yield pb.TraceBatch()  # subscribed: the caller may start its workload
            while batch := await sub.next_batch(MAX_BATCH):
                yield pb.TraceBatch(events=_events(batch), dropped=sub.dropped)


def _events(events: Iterable[TraceEvent]) -> list[pb.TraceEvent]:
    """The events as messages. One that cannot be converted (a trace point's bug) is
    left out: it must not fail every TraceBuffer call, or end a live stream."""
    out = []
    for ev in events:
        try:
            out.append(_event(ev))
        except (TypeError, ValueError) as e:
            log.error("trace event %r left out: %s", ev, e)
    return out


def _event(ev: TraceEvent) -> pb.TraceEvent:
    msg = pb.TraceEvent(kind=int(ev.kind))  # type: ignore[arg-type]  # protobuf enum fields take ints
    for name in _FIELDS:
        setattr(msg, name, getattr(ev, name))
    return msg
