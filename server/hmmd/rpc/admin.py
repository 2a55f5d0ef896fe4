"""hmm.v1.Admin servicer: read-only views for tools and benchmarks."""

from __future__ import annotations

from hmm.status import rpc_method
from hmm.v1 import admin_pb2 as pb
from hmm.v1 import admin_pb2_grpc
from hmmd.core.kernel import Kernel
from hmmd.core.stats import Latencies
from hmmd.rpc.process import process_status


def _summary(lat: Latencies, reset: bool) -> pb.LatencySummary:
    s = lat.summary()
    if reset:
        lat.reset()
    return pb.LatencySummary(count=s.count, p50_us=s.p50_us, p99_us=s.p99_us, max_us=s.max_us)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel

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
                migrations_open=len(d.migrations),
            )
            for d in k.devices.values()
        ]
        return pb.KernelStats(
            ram_frames=k.ram.nframes, ram_used_frames=k.ram.used_frames, processes=len(k.processes),
            devices=devices, window_latency=_summary(k.window_latency, reset),
        )

    @rpc_method
    async def Processes(self, request: pb.StatsRequest, context) -> pb.ProcessList:  # noqa: N802
        return pb.ProcessList(processes=[process_status(p) for p in self.k.processes.values()])
