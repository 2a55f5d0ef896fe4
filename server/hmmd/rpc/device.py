"""hmm.v1.Device servicer: the driver-facing kernel API, thin over the core."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncGenerator, AsyncIterator

import grpc
import numpy as np

from hmm import bulk
from hmm.abi import PAGE_SIZE, SESSION_METADATA_KEY
from hmm.errors import KernelError
from hmm.status import Malformed, abort, if_caller_leaves, rpc_method, rpc_stream
from hmm.v1 import common_pb2, device_pb2_grpc
from hmm.v1 import device_pb2 as pb
from hmmd.config import Config
from hmmd.core.device import Device
from hmmd.core.hmm import HmmResult
from hmmd.core.kernel import Kernel
from hmmd.core.physmem import Contents, Parts
from hmmd.rpc.session import DeviceSession, Requests, migration_reply

EMPTY = common_pb2.Empty()


class DeviceServicer(device_pb2_grpc.DeviceServicer):
    def __init__(self, kernel: Kernel, config: Config) -> None:
        self.kernel = kernel
        self.config = config
        self.sessions: dict[str, DeviceSession] = {}

    async def Connect(  # noqa: N802
        self, request_iterator: Requests, context: grpc.aio.ServicerContext
    ) -> None:
        await DeviceSession(self.kernel, self.config, self.sessions).serve(request_iterator, context)

    def _session(self, context: grpc.aio.ServicerContext) -> DeviceSession:
        token = dict(context.invocation_metadata() or ()).get(SESSION_METADATA_KEY)
        session = self.sessions.get(str(token)) if token else None
        if session is None or session.device is None or not session.device.alive:
            raise KernelError(errno.ENODEV, "no such device session (never connected, or fenced)")
        session.begin_request()
        return session

    def _device(self, context: grpc.aio.ServicerContext) -> Device:
        device = self._session(context).device
        assert device is not None
        return device

    @rpc_method
    async def InsertNotifier(self, request: pb.InsertNotifierRequest, context) -> pb.InsertNotifierReply:  # noqa: N802
        sub = await self.kernel.insert_notifier(self._device(context), request.pid, request.start, request.length)
        return pb.InsertNotifierReply(notifier_id=sub.id, seq=sub.invalidate_seq)

    @rpc_method
    async def RemoveNotifier(self, request: pb.NotifierRef, context) -> common_pb2.Empty:  # noqa: N802
        await self.kernel.remove_notifier(self._device(context), request.notifier_id)
        return EMPTY

    @rpc_method
    async def ReadBegin(self, request: pb.NotifierRef, context) -> pb.ReadBeginReply:  # noqa: N802
        return pb.ReadBeginReply(seq=await self.kernel.read_begin(self._device(context), request.notifier_id))

    async def _range(self, request: pb.RangeFaultRequest, context, snapshot: bool) -> pb.RangeFaultReply:
        result = await self.kernel.range_fault(
            self._device(context), request.notifier_id, request.notifier_seq, request.start, request.end,
            request.default_flags, request.pfn_flags_mask, request.requests, request.dev_private_owner,
            snapshot=snapshot,
        )
        return _reply(result)

    @rpc_method
    async def RangeFault(self, request: pb.RangeFaultRequest, context) -> pb.RangeFaultReply:  # noqa: N802
        return await self._range(request, context, snapshot=False)

    @rpc_method
    async def Snapshot(self, request: pb.RangeFaultRequest, context) -> pb.RangeFaultReply:  # noqa: N802
        return await self._range(request, context, snapshot=True)

    @rpc_method
    async def DmaRead(self, request: pb.DmaReadRequest, context) -> pb.DmaReadReply | bytes:  # noqa: N802
        session = self._session(context)
        assert session.device is not None
        if request.HasField("shm_offset"):  # into the staging area, by shared memory
            out = session.shm_span(request.shm_offset, len(request.pfns) // 8 * PAGE_SIZE)
            self.kernel.dma_read_into(session.device, request.pfns, out)
            return pb.DmaReadReply()
        return bulk.encode(pb.DmaReadReply(), self.kernel.dma_read(session.device, request.pfns))

    @rpc_stream
    async def DmaReadStream(self, request: pb.DmaReadStreamRequest, context) -> AsyncGenerator[bytes, None]:  # noqa: N802
        session = self._session(context)
        assert session.device is not None
        if not session.granted("bulk-stream"):
            raise KernelError(errno.EINVAL, "DmaReadStream needs capability bulk-stream")
        for chunk in self.kernel.dma_read_chunks(session.device, request.pfns, request.chunk_pages):
            yield bulk.encode(pb.DmaReadReply(), chunk)

    @rpc_method
    async def DmaWrite(self, request: bulk.Bulk, context) -> common_pb2.Empty:  # noqa: N802
        session = self._session(context)
        assert session.device is not None
        data: bulk.Buffer = request.data
        if request.HasField("shm_offset"):  # from the staging area
            if request.data:
                raise KernelError(errno.EINVAL, "data and shm_offset are exclusive")
            data = session.shm_span(request.shm_offset, len(request.pfns) // 8 * PAGE_SIZE)
        self.kernel.dma_write(session.device, request.pfns, data)
        return EMPTY

    @rpc_method
    async def FindVma(self, request: pb.FindVmaRequest, context) -> pb.FindVmaReply:  # noqa: N802
        start, end, flags = await self.kernel.find_vma(self._device(context), request.pid, request.addr)
        return pb.FindVmaReply(start=start, end=end, vm_flags=flags)

    def _check_setup(self, session: DeviceSession, r: pb.MigrateSetupRequest, other_bytes: int = 0,
                     chained: bool = False) -> None:
        """A setup's arguments that need no look at the address space (with_data's
        included), checked before anything is done; ``other_bytes``: what its reply
        carries besides the setup. A chained setup's process is checked too."""
        assert session.device is not None
        if r.with_data and not session.granted("migrate-setup-data"):
            raise KernelError(errno.EINVAL, "with_data needs capability migrate-setup-data")
        self.kernel.check_migrate_setup(session.device, r.start, r.end, r.select, r.with_data, other_bytes,
                                        pid=r.pid if chained else None)

    @rpc_method
    async def MigrateSetup(self, request: pb.MigrateSetupRequest, context) -> pb.MigrateSetupReply | bytes:  # noqa: N802
        r, session = request, self._session(context)
        dev = session.device
        assert dev is not None
        self._check_setup(session, r)
        mig = await self.kernel.migrate_setup(dev, r.pid, r.start, r.end, r.select, r.fault_token)
        reply = bulk.encode(migration_reply(mig), self.kernel.migration_data(dev, mig)) if r.with_data \
            else migration_reply(mig)
        self._forget_if_caller_leaves(dev, mig.id)
        return reply

    @rpc_method
    async def EvictSetup(self, request: pb.EvictSetupRequest, context) -> pb.MigrateSetupReply:  # noqa: N802
        dev = self._device(context)
        ev = await self.kernel.evict_setup(dev, request.start_pfn, request.npages)
        reply = migration_reply(ev)
        self._forget_if_caller_leaves(dev, ev.id)
        return reply

    def _forget_if_caller_leaves(self, dev: Device, migration_id: int) -> None:
        """A call that set a migration up completes even when its caller leaves
        (rpc_method), but a caller without the reply never learns the id: roll the
        migration back then (it holds mmap locks), not when --migration-timeout-ms
        runs out. Called last, with the reply made."""
        if_caller_leaves(lambda: self.kernel.abandon_migration(dev, migration_id))

    @rpc_method
    async def MigratePages(self, request: bulk.Bulk, context) -> pb.MigrateReply | bytes:  # noqa: N802
        session = self._session(context)
        return await self._migrate_pages(request, session, session.pages_data(request))

    async def _migrate_pages(self, r: bulk.Bulk, session: DeviceSession, data: Contents) -> pb.MigrateReply | bytes:
        """MigratePages with its contents (``data``) taken from wherever they came."""
        dev = session.device
        assert dev is not None
        nxt: pb.MigrateSetupRequest | None = r.next if r.HasField("next") else None
        if nxt is not None:  # a chained setup: every argument checked before the first step
            if not session.granted("migrate-chain"):
                raise KernelError(errno.EINVAL, "next needs capability migrate-chain")
            if not r.finalize:
                raise KernelError(errno.EINVAL, "next needs finalize: a migration is set up after the last one ends")
            if nxt.fault_token:
                raise KernelError(errno.EINVAL, "a chained setup takes no fault token")
            self._check_setup(session, nxt, other_bytes=len(r.dst_flags), chained=True)  # (+ this one's src_flags)
        mig = await self.kernel.migrate_pages(dev, r.migration_id, r.dst_pfns, r.dst_flags, data)
        if r.finalize:
            mig = await self.kernel.migrate_finalize(dev, r.migration_id)
        reply = pb.MigrateReply(src_flags=mig.src_flags.tobytes())
        if nxt is None:
            return reply
        try:
            nmig = await self.kernel.migrate_setup(dev, nxt.pid, nxt.start, nxt.end, nxt.select)
            chunks = self.kernel.migration_data(dev, nmig) if nxt.with_data else []
        except KernelError as e:  # the first migration is over either way: say so, and why this one failed
            reply.next_errno, reply.next_error = e.errno or errno.EIO, e.strerror or ""
            return reply
        reply.next.CopyFrom(migration_reply(nmig))
        out = bulk.encode(reply, chunks) if nxt.with_data else reply
        self._forget_if_caller_leaves(dev, nmig.id)
        return out

    async def MigratePagesStream(  # noqa: N802
        self, request_iterator: AsyncIterator[bulk.Bulk | Malformed], context
    ) -> pb.MigrateReply | bytes:
        first = await anext(request_iterator, None)
        if first is None or isinstance(first, Malformed):
            await abort(context, errno.EINVAL, "MigratePagesStream got no message" if first is None
                        else f"malformed request: {first.error}")
        # Reading the parts is not shielded: a caller that leaves ends it, having
        # changed nothing. The step itself is shielded, as MigratePages is.
        try:
            session = self._session(context)
            room = self._pages_stream_room(first, session)  # (before any contents are kept)
            parts = await _parts(first, request_iterator, room)
        except KernelError as e:
            await abort(context, e.errno or errno.EIO, e.strerror or "")
        return await self._migrate_pages_stream_step((first, parts), context)

    @rpc_method
    async def _migrate_pages_stream_step(self, request: tuple[bulk.Bulk, Parts], context) -> pb.MigrateReply | bytes:
        """The step a MigratePagesStream brought, shielded from its caller leaving and
        its errors made statuses (rpc_method), as MigratePages's are."""
        first, parts = request
        return await self._migrate_pages(first, self._session(context), parts)

    def _pages_stream_room(self, first: bulk.Bulk, session: DeviceSession) -> int:
        """The most contents a MigratePagesStream that starts with ``first`` may bring."""
        assert session.device is not None
        if not session.granted("bulk-stream"):
            raise KernelError(errno.EINVAL, "MigratePagesStream needs capability bulk-stream")
        if first.HasField("shm_offset"):
            raise KernelError(errno.EINVAL, "MigratePagesStream carries its contents in messages, not shm_offset")
        return self.kernel.pages_data_room(session.device, first.migration_id, first.dst_flags)

    @rpc_method
    async def MigrateFinalize(self, request: pb.MigrationRef, context) -> pb.MigrateReply:  # noqa: N802
        mig = await self.kernel.migrate_finalize(self._device(context), request.migration_id)
        return pb.MigrateReply(src_flags=mig.src_flags.tobytes())

    @rpc_method
    async def MakeExclusive(self, request: pb.MakeExclusiveRequest, context) -> pb.MakeExclusiveReply:  # noqa: N802
        r = request
        pfns = await self.kernel.make_exclusive(self._device(context), r.pid, r.start, r.npages, r.with_owner)
        return pb.MakeExclusiveReply(pfns=pfns.astype("<u8").tobytes())

    @rpc_method
    async def UnlockPages(self, request: pb.UnlockPagesRequest, context) -> common_pb2.Empty:  # noqa: N802
        self.kernel.unlock_pages(self._device(context), request.pfns)
        return EMPTY

    async def close_all(self) -> None:
        """Daemon shutdown: devices that take Detach give their memory back (all at
        once, each within its deadline), then every session ends."""
        await asyncio.gather(*(s.detach("daemon shutting down") for s in list(self.sessions.values())))
        for session in list(self.sessions.values()):
            await session.close()


async def _parts(first: bulk.Bulk, rest: AsyncIterator[bulk.Bulk | Malformed], room: int) -> Parts:
    """A MigratePagesStream's contents, kept as the messages brought them. EINVAL for
    a later message with another field than data, or more than ``room`` bytes."""
    pieces: list[bulk.Buffer] = []
    total = 0
    part: bulk.Bulk | Malformed | None = first
    while part is not None:
        if isinstance(part, Malformed):
            raise KernelError(errno.EINVAL, f"malformed request: {part.error}")
        if part is not first and part.msg.ByteSize():
            raise KernelError(errno.EINVAL, "a MigratePagesStream message after the first holds only data")
        total += len(part.data)
        if total > room:
            raise KernelError(errno.EINVAL, f"more contents than the step's SYSTEM_DATA entries take "
                              f"({room // PAGE_SIZE} pages)")
        if part.data:
            pieces.append(part.data)
        part = await anext(rest, None)
    return Parts(pieces)


def _reply(result: HmmResult) -> pb.RangeFaultReply:
    return pb.RangeFaultReply(
        pfns=result.pfns.astype("<u8", copy=False).tobytes(),
        flags=result.flags.astype(np.uint8, copy=False).tobytes(),
        orders=result.orders.astype(np.uint8, copy=False).tobytes(),
    )
