"""Read-only views of a running daemon (hmm.v1.Admin)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from hmm.channel import insecure_channel, raise_kernel_error
from hmm.process import Status, status_from_message
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


@dataclass(frozen=True)
class KernelStats:
    ram_frames: int
    ram_used_frames: int
    processes: int
    devices: tuple[DeviceStats, ...]
    window_latency: Latency

    def device(self, name: str) -> DeviceStats:
        """The most recent device of that name (a fenced one keeps its record)."""
        matches = [d for d in self.devices if d.name == name]
        if not matches:
            raise KeyError(name)
        return matches[-1]


def _lat(m: pb.LatencySummary) -> Latency:
    return Latency(m.count, m.p50_us, m.p99_us, m.max_us)


class AdminClient:
    def __init__(self, channel: grpc.aio.Channel | None = None, address: str = "") -> None:
        self._own = channel is None
        self.channel = channel if channel is not None else insecure_channel(address)
        self.stub = admin_pb2_grpc.AdminStub(self.channel)

    async def close(self) -> None:
        if self._own:
            await self.channel.close()

    async def processes(self) -> list[Status]:
        """Every live process with its counters and maps."""
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
                        d.memory_used_pages, d.migrations_open)
            for d in s.devices
        )
        return KernelStats(s.ram_frames, s.ram_used_frames, s.processes, devices, _lat(s.window_latency))
