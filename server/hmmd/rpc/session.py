"""A device session: one Connect stream, its handshake, callbacks, acks and deadlines.

The session is the device's ``DeviceOps`` in the core. A callback becomes a
KernelMessage with a fresh id; the caller waits for the matching Ack for at most
the negotiated callback deadline. A missed deadline, or a stream that breaks,
fences the device: the core stops calling it and revokes its DMA rights, every
callback still waiting completes at once, and the stream is closed.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from hmm import bulk
from hmm.abi import MIN_MESSAGE_BYTES, PAGE_SIZE, PROTOCOL_VERSION, ULONG_MAX
from hmm.errors import KernelError
from hmm.status import Malformed, abort
from hmm.v1 import device_pb2 as pb
from hmmd.config import Config
from hmmd.core.device import Device
from hmmd.core.devmem import MemoryKind
from hmmd.core.evict import Eviction
from hmmd.core.kernel import Kernel
from hmmd.core.migrate import Migration
from hmmd.core.notifier import IntervalNotifier, NotifierRange
from hmmd.core.physmem import ZERO_PFN
from hmmd.rpc.staging import StagingArea

log = logging.getLogger(__name__)

# A Connect stream's messages; one that does not parse comes as a Malformed (hmm.status).
Requests = AsyncIterator[pb.DeviceMessage | Malformed]

# Capabilities this daemon offers; a session uses those both sides name.
CAPABILITIES = ("dma", "coherence-sanitizer", "migrate-to-ram-setup", "own-migrate-silent", "detach", "shm",
                "migrate-setup-data", "ack-pages", "migrate-chain", "bulk-stream")
# How long after its request stream ended a call that gRPC has not cancelled counts as
# closed by the device rather than dropped (the cancel follows within a millisecond).
CLOSE_OR_DROP_S = 0.05


def migration_reply(mig: Migration | Eviction) -> pb.MigrateSetupReply:
    """What MigrateSetup answers, also sent inside MigrateToRam."""
    return pb.MigrateSetupReply(migration_id=mig.id, src_pfns=mig.src_pfns.astype("<u8").tobytes(),
                                src_flags=mig.src_flags.tobytes(), cpages=mig.cpages)


def _resolve(fut: asyncio.Future[pb.Ack | None], ack: pb.Ack) -> None:
    if not fut.done():
        fut.set_result(ack)


class DeviceSession:
    """One connected device. Created by the Device servicer's Connect handler."""

    def __init__(self, kernel: Kernel, config: Config, registry: dict[str, DeviceSession]) -> None:
        self.kernel = kernel
        self.config = config
        self.registry = registry
        self.token = secrets.token_hex(16)
        self.device: Device | None = None
        self.deadline_s = config.callback_deadline_ms / 1000
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[pb.Ack | None]] = {}
        self._unacked: dict[int, pb.KernelMessage] = {}  # sent again after a resume
        self._context: grpc.aio.ServicerContext | None = None
        self._attached = asyncio.Event()  # a stream is attached (set between a drop and its resume: clear)
        self._stream_done = asyncio.Event()  # the attached stream ended (dropped or closed)
        self._welcome: pb.Welcome | None = None
        self._write_lock = asyncio.Lock()  # one writer at a time on the stream
        self._closed = asyncio.Event()
        self.fenced_reason = ""
        self.fence_errno = 0
        self._background: set[asyncio.Task[None]] = set()
        self._requests: set[asyncio.Task[object]] = set()  # unary calls in flight (begin_request)
        self.staging: StagingArea | None = None  # capability "shm"

    # ---- the stream -------------------------------------------------------------------
    async def serve(self, requests: Requests, context: grpc.aio.ServicerContext) -> None:
        try:
            first = await asyncio.wait_for(anext(requests), self.config.hello_timeout_ms / 1000)
        except TimeoutError:
            await abort(context, errno.ETIMEDOUT, "no Hello received")
            return
        except StopAsyncIteration:
            await abort(context, errno.EINVAL, "the stream ended before a Hello")
            return
        if isinstance(first, Malformed):
            await abort(context, errno.EINVAL, f"the first message does not parse: {first.error}")
            return
        if first.WhichOneof("msg") != "hello":
            await abort(context, errno.EINVAL, "the first message must be a Hello")
            return
        hello = first.hello
        if hello.version_major != PROTOCOL_VERSION[0]:
            await abort(context, errno.EPROTONOSUPPORT,
                        f"protocol {hello.version_major}.x is not supported; this daemon speaks "
                        f"{PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]}")
            return
        if hello.resume_session:
            old = self.registry.get(hello.resume_session)
            if old is None or old.device is None or old.device.name != hello.name or not old.device.alive:
                await abort(context, errno.ENOENT, "no session of this device to resume (fenced, or its grace "
                                                   "period is over): connect anew")
                return
            if old._attached.is_set():
                await abort(context, errno.EBUSY, "the session's stream is still attached")
                return
            await old._run_stream(requests, context)
            return
        if (hello.memory in (MemoryKind.DEVICE_PRIVATE, MemoryKind.DEVICE_COHERENT)
                and hello.memory_pages > self.config.max_device_memory_pages):
            await abort(context, errno.ENOMEM,
                        f"{hello.memory_pages} pages of device memory is more than a device may declare "
                        f"(--max-device-memory-pages {self.config.max_device_memory_pages})")
            return
        max_msg = self.config.max_message_bytes
        if hello.max_message_bytes:
            if hello.max_message_bytes < MIN_MESSAGE_BYTES:
                await abort(context, errno.EINVAL, f"max_message_bytes {hello.max_message_bytes} is below "
                                                   f"{MIN_MESSAGE_BYTES}: no page of contents would fit")
                return
            max_msg = min(max_msg, hello.max_message_bytes)
        try:
            self.device = self.kernel.register_device(hello.name, self, MemoryKind(hello.memory),
                                                      hello.memory_pages, max_msg)
        except ValueError:
            await abort(context, errno.EINVAL, f"unknown memory kind {hello.memory}")
            return
        except KernelError as e:
            await abort(context, e.errno or errno.EIO, e.strerror or "")
            return
        if hello.callback_deadline_ms:
            self.deadline_s = min(hello.callback_deadline_ms, self.config.callback_deadline_ms) / 1000
        self.registry[self.token] = self
        dev = self.device
        dev.wants_fault_migration = "migrate-to-ram-setup" in hello.capabilities
        dev.own_migrate_silent = "own-migrate-silent" in hello.capabilities
        if "shm" in hello.capabilities and hello.shm_bytes and self.config.shm_max_bytes:
            self._create_staging(min(hello.shm_bytes, self.config.shm_max_bytes))
        granted = [c for c in CAPABILITIES if c in hello.capabilities and (c != "shm" or self.staging)]
        log.info("device %s connected as id %d (owner %d)", dev.name, dev.id, dev.owner)
        welcome = pb.Welcome(
            version_major=PROTOCOL_VERSION[0],
            version_minor=PROTOCOL_VERSION[1],
            device_id=dev.id,
            owner=dev.owner,
            session=self.token,
            capabilities=granted,
            limits=pb.Limits(
                max_message_bytes=max_msg,
                max_pages_per_request=self.kernel.limits.max_pages_per_request,
                callback_deadline_ms=int(self.deadline_s * 1000),
                max_notifiers=dev.max_notifiers,
                reconnect_grace_ms=self.config.reconnect_grace_ms,
                max_requests_in_flight=self.config.max_requests_per_device,
            ),
            zero_pfn=ZERO_PFN,
            system_frames=self.kernel.ram.nframes,
            device_pfn_base=dev.pgmap.base if dev.pgmap else 0,
            device_pfn_count=dev.pgmap.npages if dev.pgmap else 0,
            shm_path=self.staging.path if self.staging else "",
            shm_bytes=self.staging.size if self.staging else 0,
            shm_socket=self.config.shm_socket if self.staging else "",
        )
        self._welcome = welcome
        await self._run_stream(requests, context)

    async def _run_stream(self, requests: Requests, context: grpc.aio.ServicerContext) -> None:
        """Attach a stream: the Welcome, then every callback not yet acked (after a
        resume), then callbacks as they come, until the stream ends or the device is
        fenced."""
        assert self._welcome is not None and self.device is not None
        self._context = context
        self._stream_done = asyncio.Event()
        self._attached.set()
        reader = asyncio.create_task(self._read_loop(requests, context))
        await self._send(pb.KernelMessage(id=0, welcome=self._welcome))
        for msg in list(self._unacked.values()):
            await self._send(msg)
        closed = asyncio.ensure_future(self._closed.wait())
        dropped = asyncio.ensure_future(self._stream_done.wait())
        try:
            await asyncio.wait([closed, dropped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            dropped.cancel()
            reader.cancel()
            if not self._closed.is_set():  # gRPC cancelled the call: the connection went
                self._dropped("connection dropped", errno.ECONNRESET, context)
        if self._closed.is_set() and self.fence_errno:
            await abort(context, self.fence_errno, f"fenced: {self.fenced_reason}")

    def _dropped(self, reason: str, err: int, context: grpc.aio.ServicerContext) -> None:
        """``context``'s stream broke. With a reconnect grace the session waits for a
        resume (callbacks wait within their deadlines); without one, or a clean close
        by the device, it is fenced now. A stream already replaced by a resume is
        not the session's any more: its end changes nothing."""
        if context is not self._context:
            return
        grace_s = self.config.reconnect_grace_ms / 1000
        if not err or not grace_s or self._closed.is_set() or self.device is None or not self.device.alive:
            self.fence(reason, err)
            return
        if not self._attached.is_set():
            return
        log.warning("device %s: %s; keeping the session %d ms for a resume", self.device.name, reason,
                    self.config.reconnect_grace_ms)
        self._attached.clear()
        self._context = None
        self._stream_done.set()
        asyncio.get_running_loop().call_later(grace_s, self._grace_over, self._stream_done, reason)

    def _grace_over(self, stream_done: asyncio.Event, reason: str) -> None:
        if not self._attached.is_set() and self._stream_done is stream_done:
            self.fence(f"{reason}; not resumed within {self.config.reconnect_grace_ms} ms", errno.ECONNRESET)

    def _create_staging(self, size: int) -> None:
        """The shared-memory staging area; without one the capability is not granted."""
        assert self.device is not None
        size = -(-size // PAGE_SIZE) * PAGE_SIZE
        try:
            self.staging = StagingArea.create(size, f"dev{self.device.id}")
        except OSError as e:
            log.warning("device %s: no shared-memory staging area of %d bytes: %s", self.device.name, size, e)

    def shm_span(self, offset: int, length: int) -> np.ndarray:
        """Bytes [offset, offset + length) of the staging area; EINVAL without one, or
        outside it (StagingArea.span)."""
        if self.staging is None:
            raise KernelError(errno.EINVAL, "this session has no shared-memory staging area (capability shm)")
        return self.staging.span(offset, length)

    def granted(self, capability: str) -> bool:
        """Whether this session's Welcome granted ``capability``."""
        return self._welcome is not None and capability in self._welcome.capabilities

    def pages_data(self, req: pb.MigratePagesRequest | bulk.Bulk) -> bulk.Buffer:
        """A MigratePages request's SYSTEM_DATA contents: ``data``, or with
        ``shm_offset`` a view of the staging area (``data`` must then be empty)."""
        if not req.HasField("shm_offset"):
            return req.data
        if req.data:
            raise KernelError(errno.EINVAL, "data and shm_offset are exclusive")
        return self.shm_span(req.shm_offset, req.shm_length)

    def begin_request(self) -> None:
        """Count the calling task as one of this session's unary calls until it ends;
        EAGAIN when --max-requests-per-device are already in flight. Idempotent
        within one task."""
        task = asyncio.current_task()
        if task is None or task in self._requests:
            return
        limit = self.config.max_requests_per_device
        if len(self._requests) >= limit:
            raise KernelError(errno.EAGAIN, f"{limit} requests in flight already (--max-requests-per-device)")
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _read_loop(self, requests: Requests, context: grpc.aio.ServicerContext) -> None:
        assert self.device is not None
        reason, err = "stream closed by the device", 0
        try:
            async for msg in requests:
                if isinstance(msg, Malformed):  # garbage: as if the stream broke
                    self._dropped(f"sent a message that does not parse: {msg.error}", errno.ECONNRESET, context)
                    return
                kind = msg.WhichOneof("msg")
                if kind == "ack":
                    faults = self.device.faults
                    if faults.take("drop_acks"):
                        continue
                    fut = self._pending.pop(msg.ack.id, None)
                    if fut is not None and not fut.done():
                        if faults.ack_delay_ms:
                            asyncio.get_running_loop().call_later(faults.ack_delay_ms / 1000, _resolve, fut, msg.ack)
                        else:
                            fut.set_result(msg.ack)
                else:
                    log.warning("device %s sent an unexpected %s; ignored", self.device.name, kind)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the peer vanished or sent garbage
            reason, err = f"stream broke: {type(e).__name__}", errno.ECONNRESET
        else:
            # The request stream ends the same way when the device closes its side and
            # when the connection goes; only then does gRPC cancel the call, a moment
            # later, and the stream handler names the drop (_run_stream). Wait that
            # moment before calling it a close: longer where a wrong answer would fence
            # a session that could have been resumed.
            await asyncio.sleep(CLOSE_OR_DROP_S * (4 if self.config.reconnect_grace_ms else 1))
        self._dropped(reason, err, context)

    async def _send(self, msg: pb.KernelMessage) -> bool:
        """Write one message on the stream; False if the device is fenced. While the
        stream is dropped (reconnect grace) this waits for the resume — callers bound
        the wait with their deadline."""
        while not self._closed.is_set():
            context = self._context
            if context is None:
                if self._welcome is None:
                    return False  # not connected yet
                attached = asyncio.ensure_future(self._attached.wait())
                closed = asyncio.ensure_future(self._closed.wait())
                try:
                    await asyncio.wait([attached, closed], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    attached.cancel()
                    closed.cancel()
                continue
            try:
                async with self._write_lock:
                    await context.write(msg)
                return True
            except Exception as e:  # the peer vanished mid-write
                self._dropped(f"stream broke while writing: {type(e).__name__}", errno.ECONNRESET, context)
        return False

    def fence(self, reason: str, err: int) -> None:
        """Cut the device off; release every callback waiting on it. ``err`` is the
        errno the stream ends with (0: the device closed it itself)."""
        if self._closed.is_set():
            return
        self.fenced_reason = reason
        self.fence_errno = err
        self.registry.pop(self.token, None)
        if self.device is not None:
            self.kernel.fence_device(self.device, reason)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result(None)
        self._pending.clear()
        self._unacked.clear()
        if self.staging is not None:
            self.staging.close()
        self._closed.set()

    async def _call(self, msg: pb.KernelMessage) -> pb.Ack | None:
        """Send a callback and wait for its ack; None if the device was fenced."""
        dev = self.device
        if dev is None or not dev.alive:
            return None
        msg.id = next(self._ids)
        fut: asyncio.Future[pb.Ack | None] = asyncio.get_running_loop().create_future()
        self._pending[msg.id] = fut
        self._unacked[msg.id] = msg
        try:
            # The deadline covers the send too: a frozen peer can stall a write.
            async with asyncio.timeout(self.deadline_s):
                if dev.faults.stream_delay_ms:
                    await asyncio.sleep(dev.faults.stream_delay_ms / 1000)
                if not await self._send(msg):
                    return None
                return await fut
        except TimeoutError:
            self.fence(f"missed the {int(self.deadline_s * 1000)} ms callback deadline", errno.ETIMEDOUT)
            return None
        finally:
            self._pending.pop(msg.id, None)
            self._unacked.pop(msg.id, None)

    # ---- DeviceOps ------------------------------------------------------------------------
    async def invalidate(self, notifier: IntervalNotifier, rng: NotifierRange, cur_seq: int) -> bool:
        assert self.device is not None
        t0 = time.perf_counter()
        ack = await self._call(pb.KernelMessage(invalidate=pb.Invalidate(
            notifier_id=notifier.id,
            pid=getattr(rng.mm, "pid", 0),
            start=rng.start,
            end=min(rng.end, ULONG_MAX),
            event=int(rng.event),  # type: ignore[arg-type]  # protobuf enum fields take ints
            owner=rng.owner,
            blockable=rng.blockable,
            cur_seq=cur_seq,
        )))
        if ack is None:
            return True
        self.device.invalidate_latency.add(time.perf_counter() - t0)
        return ack.ok

    async def file_open(self, file_id: int, pid: int) -> int:
        ack = await self._call(pb.KernelMessage(file_open=pb.FileOpen(file_id=file_id, pid=pid)))
        if ack is None:
            return errno.ENXIO
        if ack.errno and ack.errno not in errno.errorcode:  # e.g. a C driver's -EIO: meaningless to the opener
            assert self.device is not None
            log.warning("device %s refused an open with %d, which is not an errno: EIO", self.device.name, ack.errno)
            return errno.EIO
        return ack.errno

    async def file_release(self, file_id: int, pid: int) -> None:
        await self._call(pb.KernelMessage(file_release=pb.FileRelease(file_id=file_id, pid=pid)))

    async def migrate_to_ram(self, pid: int, addr: int, pfn: int, fault_token: int,
                             migration: Migration | None) -> bool:
        msg = pb.MigrateToRam(pid=pid, addr=addr, device_pfn=pfn, fault_token=fault_token)
        if migration is not None:
            msg.migration.CopyFrom(migration_reply(migration))
        ack = await self._call(pb.KernelMessage(migrate_to_ram=msg))
        if ack is None or not ack.ok or self.device is None:
            return False
        if ack.HasField("pages"):  # the copy came with the ack: run pages + finalize here
            if migration is None or ack.pages.migration_id != migration.id:
                log.warning("device %s: Ack.pages names migration %d, not the fault's", self.device.name,
                            ack.pages.migration_id)
                return False
            try:
                await self.kernel.migrate_pages(self.device, migration.id, ack.pages.dst_pfns,
                                                ack.pages.dst_flags, self.pages_data(ack.pages))
                await self.kernel.migrate_finalize(self.device, migration.id)
            except KernelError as e:
                log.warning("device %s: the pages in its MigrateToRam ack failed: %s", self.device.name, e)
                return False
        return True

    def page_free(self, pfns: np.ndarray) -> None:
        task = asyncio.get_running_loop().create_task(self._send_page_free(np.asarray(pfns, dtype="<u8")))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_page_free(self, pfns: np.ndarray) -> None:
        """PageFree in as many messages as the device's negotiated message limit
        takes (its channel refuses a larger one, and the stream would break); after
        a resume, if the stream is dropped now. The only stream message that grows
        with a call's size: a MigrateToRam lists at most one compound page (512
        entries), well below the least limit a device may negotiate."""
        assert self.device is not None
        step = self.kernel.reply_room(self.device) // pfns.itemsize
        for lo in range(0, len(pfns), step):
            chunk = pb.PageFree(pfns=pfns[lo:lo + step].tobytes())
            if not await self._send(pb.KernelMessage(id=0, page_free=chunk)):
                return

    async def detach(self, reason: str) -> None:
        """Ask a device that takes Detach to give its memory back (it evicts, then
        acks; bounded by the callback deadline)."""
        if self.device is None or not self.device.alive or self._welcome is None \
                or "detach" not in self._welcome.capabilities:
            return
        used = self.device.pgmap.used_pages if self.device.pgmap is not None else 0
        ack = await self._call(pb.KernelMessage(detach=pb.Detach(reason=reason)))
        left = self.device.pgmap.used_pages if self.device.pgmap is not None else 0
        log.info("device %s detached (%s): %d of its %d pages in use were given back%s", self.device.name, reason,
                 used - left, used, "" if ack is not None else "; it did not answer")

    async def close(self) -> None:
        """Shut the session down (daemon exit)."""
        self.fence("daemon shutting down", errno.ESHUTDOWN)
