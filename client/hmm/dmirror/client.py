"""A Python client for the dmirror command service (what the conformance suite uses)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from hmm.abi import Event
from hmm.channel import open_channel, raise_kernel_error
from hmm.security import Credentials
from hmm.v1 import common_pb2, dmirror_pb2_grpc
from hmm.v1 import dmirror_pb2 as pb


@dataclass(frozen=True)
class Reply:
    cpages: int
    faults: int
    data: bytes


@dataclass(frozen=True)
class Invalidation:
    event: Event
    start: int
    end: int
    owner: int
    cur_seq: int
    mapped_pages: int
    snoop_crc32: int | None


class DmirrorClient:
    def __init__(self, address: str, credentials: Credentials | None = None) -> None:
        """``credentials`` (token, TLS) default to the HMM_* environment (hmm.security)."""
        self.channel = open_channel(address, credentials)
        self.stub = dmirror_pb2_grpc.DmirrorStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def command(self, file_id: int, cmd: int, addr: int, npages: int, data: bytes = b"") -> Reply:
        try:
            request = pb.DmirrorCommand(file_id=file_id, cmd=cmd, addr=addr, npages=npages,  # type: ignore[arg-type]
                                    data=data)  # protobuf enum fields take ints
            r = await self.stub.Command(request)
        except grpc.aio.AioRpcError as e:
            raise_kernel_error(e)
        return Reply(r.cpages, r.faults, r.data)

    async def events(self, file_id: int, clear: bool = False) -> list[Invalidation]:
        try:
            r = await self.stub.Events(pb.EventsRequest(file_id=file_id, clear=clear))
        except grpc.aio.AioRpcError as e:
            raise_kernel_error(e)
        return [Invalidation(Event(e.event), e.start, e.end, e.owner, e.cur_seq, e.mapped_pages,
                             e.snoop_crc32 if e.snooped else None) for e in r.events]

    async def devices(self) -> list[str]:
        """The names of the devices this command service runs."""
        try:
            r = await self.stub.Devices(common_pb2.Empty())
        except grpc.aio.AioRpcError as e:
            raise_kernel_error(e)
        return [d.name for d in r.devices]
