"""hmm.v1.Dmirror servicer: dmirror's ioctls as a gRPC command service."""

from __future__ import annotations

import errno

from hmm.dmirror.device import Dmirror
from hmm.errors import KernelError
from hmm.status import rpc_method
from hmm.v1 import common_pb2, dmirror_pb2_grpc
from hmm.v1 import dmirror_pb2 as pb


class DmirrorServicer(dmirror_pb2_grpc.DmirrorServicer):
    def __init__(self, devices: list[Dmirror]) -> None:
        self.devices = devices

    def _device_of(self, file_id: int) -> Dmirror:
        for dev in self.devices:
            if file_id in dev.handles:
                return dev
        raise KernelError(errno.EINVAL, f"no open handle {file_id}")

    @rpc_method
    async def Command(self, request: pb.DmirrorCommand, context) -> pb.DmirrorReply:  # noqa: N802
        dev = self._device_of(request.file_id)
        r = await dev.command(request.file_id, request.cmd, request.addr, request.npages, request.data)
        return pb.DmirrorReply(cpages=r.cpages, faults=r.faults, data=r.data)

    @rpc_method
    async def Events(self, request: pb.EventsRequest, context) -> pb.EventsReply:  # noqa: N802
        h = self._device_of(request.file_id).handle(request.file_id)
        events = [
            pb.InvalidateRecord(event=int(e.event), start=e.start, end=e.end,  # type: ignore[arg-type]
                                owner=e.owner, cur_seq=e.cur_seq, mapped_pages=e.mapped_pages,
                                snoop_crc32=e.snoop_crc32, snooped=e.snooped)
            for e in h.events
        ]
        if request.clear:
            h.events.clear()
        return pb.EventsReply(events=events)

    @rpc_method
    async def Devices(self, request: common_pb2.Empty, context) -> pb.DevicesReply:  # noqa: N802
        return pb.DevicesReply(devices=[
            pb.DeviceInfo(name=d.name, device_id=d.conn.device_id if d.conn else 0,
                          owner=d.conn_owner, memory=d.memory)
            for d in self.devices
        ])
