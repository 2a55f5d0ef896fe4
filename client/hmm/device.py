"""The device SDK: a driver base class and the connection that runs its session.

A device author subclasses ``Driver`` and connects:

    class MyDriver(Driver):
        async def invalidate(self, mirror, rng):   # update lock held, seq recorded
            self.table.erase(rng.start, rng.end)
            return True

    conn = await DeviceConnection.connect("127.0.0.1:50051", "mydev", MyDriver())
    mirror = await conn.insert_notifier(pid, 0, 1 << 47)   # after pid opened /dev/mydev
    async with mirror.fault(addr, addr + size, write=True) as result:
        ...program the device page table from result...

The connection owns one Connect stream. Callbacks (invalidate, file open and
release) each run on their own task and take only the mirror's update lock, so
they never wait for anything that waits on them; each is acked when it returns.
No protobuf type reaches the driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
import numpy as np

from hmm import bulk
from hmm.abi import (
    MEMORY_DEVICE_PRIVATE,
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_DST_FLAGS,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_SETUP_BYTES_PER_PAGE,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    PTRS_PER_PTE,
    SESSION_METADATA_KEY,
    Event,
)
from hmm.channel import DEFAULT_MAX_MESSAGE_BYTES, open_channel, raise_kernel_error, to_kernel_error
from hmm.errors import KernelError
from hmm.mirror import InvalidateRange, Mirror, RangeResult
from hmm.security import Credentials
from hmm.staging import StagingArea
from hmm.v1 import device_pb2 as pb
from hmm.v1 import device_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

# Room left in a message around the page contents it carries (framing, pfns of a
# request are counted separately).
MESSAGE_OVERHEAD = 4096
# A read through the staging area of at least twice this is split in (up to 4)
# calls through two regions in turn, so that the daemon's copy into the area and
# this process's copy out of it overlap.
PIPELINE_MIN_PAGES = 1024
# Pages a message of DmaReadStream / MigratePagesStream carries (capability
# "bulk-stream"): small enough that one part is stored while the next is on the
# wire, big enough that the per-message cost stays small against the copy.
STREAM_CHUNK_PAGES = 512


@dataclass
class DeviceFaults:
    """Faults a device injects into its own side of the protocol: its next
    ``drop_acks`` acks are never sent, and every ack waits ``ack_delay_ms`` first.
    (The daemon injects faults too: hmm.v1.Admin/InjectFaults, ``hmmctl inject``.)"""

    ack_delay_ms: int = 0
    drop_acks: int = 0


@dataclass(frozen=True)
class DeviceFile:
    """A process's open of this device (the kernel's struct file)."""

    file_id: int
    pid: int




@dataclass
class Migration:
    """An open migrate_vma session: per page the source and its MIGRATE_PFN_* flags."""

    id: int
    pid: int
    start: int
    src_pfns: np.ndarray  # uint64
    src_flags: np.ndarray  # uint8
    cpages: int
    # A migrate_to_ram's migration: migrate_pages(finalize=True) is not sent but
    # kept here, to travel in the callback's ack.
    in_ack: bool = False
    pages: pb.MigratePagesRequest | None = None
    # migrate_setup(with_data=True): the contents of the pages data_pages() names,
    # one (4096,) uint8 row each, in that order (read-only).
    data: np.ndarray | None = None

    @property
    def npages(self) -> int:
        return len(self.src_flags)

    def sources(self) -> tuple[np.ndarray, np.ndarray]:
        """Per page (a compound entry's 512 pages each): its source PFN and its
        MIGRATE_PFN_* flags, COMPOUND cleared."""
        heads = np.flatnonzero(self.src_flags & MIGRATE_PFN_COMPOUND)
        if not len(heads):
            return self.src_pfns, self.src_flags
        pfns, flags = self.src_pfns.copy(), self.src_flags.copy()
        for i in heads.tolist():
            flags[i : i + PTRS_PER_PTE] = self.src_flags[i] & ~np.uint8(MIGRATE_PFN_COMPOUND)
            if self.src_flags[i] & MIGRATE_PFN_VALID:
                pfns[i : i + PTRS_PER_PTE] = self.src_pfns[i] + np.arange(PTRS_PER_PTE, dtype=np.uint64)
        return pfns, flags


@dataclass(frozen=True)
class FaultRequest:
    """migrate_to_ram: the CPU touched device page ``pfn`` at ``addr`` of ``pid``.
    ``migration`` is that page's migration, already set up, for a driver that asked
    for it (Driver.wants_fault_migration); otherwise set one up with ``fault_token``."""

    pid: int
    addr: int
    pfn: int
    fault_token: int
    migration: Migration | None = None


class Driver:
    """Callbacks of a device driver. Override what the device needs."""

    # True: migrate_to_ram gets the faulting page's migration already set up (one
    # round trip less); the driver must then finish it with migrate_pages(finalize),
    # which the SDK sends back inside the callback's ack (one more round trip less).
    wants_fault_migration = False
    # True: the driver never needs the MIGRATE invalidations its own migrations
    # raise (it keeps its device tables itself), so the daemon does not send them.
    ignores_own_migrate = False

    async def invalidate(self, mirror: Mirror, rng: InvalidateRange) -> bool:
        """Stop using [rng.start, rng.end) of ``mirror``. Runs with ``mirror.lock`` held
        after the SDK stored ``rng.cur_seq``. Return False only when
        ``rng.blockable`` is False and the work would have to sleep."""
        return True

    async def release(self, mirror: Mirror) -> None:
        """The mirrored process is gone (after the RELEASE invalidation)."""

    async def file_open(self, file: DeviceFile) -> None:
        """A process opened the device; raise KernelError to refuse."""

    async def file_release(self, file: DeviceFile) -> None:
        """The last reference to an open of the device went away."""

    async def detach(self, reason: str) -> None:
        """The daemon asks the device to give its memory back before it ends the
        session (shutdown): evict every page. Override it to be asked (capability
        "detach"); the SDK acks when it returns."""

    async def migrate_to_ram(self, fault: FaultRequest) -> bool:
        """Move the faulting device page home (migrate_vma with ``fault.fault_token``);
        False makes the CPU access fail with EFAULT (SIGBUS)."""
        return False

    def page_free(self, pfns: np.ndarray) -> None:
        """These device pages lost their last reference: free for reuse."""

    def connection_lost(self, error: KernelError) -> None:
        """The session ended (fenced by the daemon, the daemon stopped, or the network
        failed); ``DeviceConnection.closed`` resolves with the same error. Nothing here
        by default: a device program should then exit or connect again."""


async def _pages_parts(req: pb.MigratePagesRequest, data: np.ndarray, room: int,
                       part_pages: int) -> AsyncIterator[bulk.Bulk]:
    """A MigratePagesStream's messages: ``req`` with as much of ``data`` as fits
    ``room`` bytes, then the rest, ``part_pages`` pages a message (at most
    STREAM_CHUNK_PAGES)."""
    step = min(part_pages, STREAM_CHUNK_PAGES) * PAGE_SIZE
    first = max(0, min(step, room) // PAGE_SIZE * PAGE_SIZE)
    yield bulk.Bulk(req, data[:first])
    for lo in range(first, len(data), step):
        yield bulk.Bulk(pb.MigratePagesRequest(), data[lo:lo + step])


def _check_ack_pages(mig: Migration, flags: np.ndarray, npfns: int, nbytes: int) -> None:
    """The checks the daemon makes of the pages step put in a MigrateToRam ack (EINVAL)."""
    if len(flags) != mig.npages or npfns not in (0, mig.npages):
        raise KernelError(errno.EINVAL, f"the pages step names {len(flags)} flags and {npfns} PFNs "
                          f"for a migration of {mig.npages} pages")
    if (flags & ~np.uint8(MIGRATE_PFN_DST_FLAGS)).any():
        raise KernelError(errno.EINVAL, "unknown dst_flags bits")
    if bool(nbytes) != bool((flags & MIGRATE_PFN_SYSTEM_DATA).any()) or nbytes % PAGE_SIZE:
        raise KernelError(errno.EINVAL, f"{nbytes} bytes of data for pages flagged "
                          f"{'' if (flags & MIGRATE_PFN_SYSTEM_DATA).any() else 'without '}SYSTEM_DATA "
                          "(a page coming home needs VALID | SYSTEM_DATA and its 4096 bytes)")


class DeviceConnection:
    """A connected device: the callback stream plus the driver-facing kernel calls."""

    def __init__(self, channel: grpc.aio.Channel, driver: Driver) -> None:
        self.channel = channel
        self.stub = device_pb2_grpc.DeviceStub(channel)
        bulk.install(self.stub, channel)  # page contents with fewer copies
        self.driver = driver
        self.device_id = 0
        self.owner = 0
        self.zero_pfn = 0
        self.system_frames = 0
        self.max_pages = 0
        self.callback_deadline_ms = 0
        self.device_pfn_base = 0
        self.device_pfn_count = 0
        self.memory = 0  # the kind of device memory declared (hmm.abi.MEMORY_*)
        self.max_message_bytes = 0
        self.capabilities: tuple[str, ...] = ()
        self.staging: StagingArea | None = None  # capability "shm", when the area could be mapped
        self.mirrors: dict[int, Mirror] = {}
        self._early_seq: dict[int, int] = {}  # cur_seq seen before InsertNotifier returned
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._call: grpc.aio.StreamStreamCall | None = None
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed: asyncio.Future[KernelError] = asyncio.get_running_loop().create_future()
        self.name = ""
        self.reconnect_grace_ms = 0  # the daemon keeps a dropped session this long (Limits)
        self.max_requests_in_flight = 0
        self.resumes = 0  # how often a dropped stream was resumed
        # Callback ids being handled, and the acks of the latest handled ones: a
        # resume re-sends what was not acked, and each is handled once.
        self._handling: set[int] = set()
        self._acks: dict[int, pb.Ack] = {}
        self.faults = DeviceFaults()  # misbehave on purpose (tests of what depends on the device)
        self._dropping = False  # drop_stream() cancelled the stream

    @classmethod
    async def connect(
        cls, address: str, name: str, driver: Driver, *, capabilities: tuple[str, ...] = ("dma",),
        callback_deadline_ms: int = 0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        keepalive_ms: int = 2000, memory: int = 0, memory_pages: int = 0, shm_bytes: int = 0,
        credentials: Credentials | None = None,
    ) -> DeviceConnection:
        """Open the session: Hello, then wait for the Welcome. Raises KernelError
        (EEXIST if the name is taken, EPROTONOSUPPORT, ECONNREFUSED, ...).
        ``memory`` (hmm.abi.MEMORY_DEVICE_PRIVATE) and ``memory_pages`` declare device
        memory; its PFNs are then [device_pfn_base, device_pfn_base + device_pfn_count).
        ``shm_bytes`` asks for a shared-memory staging area of that size (capability
        "shm"): when the daemon grants it and it can be mapped here (same host),
        page contents of DMA and migrations travel through it (``staging``);
        otherwise, and whenever it is full, they travel in messages.
        ``credentials`` (token, TLS) default to the HMM_* environment (hmm.security)."""
        conn = cls(open_channel(address, credentials, max_message_bytes=max_message_bytes,
                                keepalive_ms=keepalive_ms), driver)
        if driver.wants_fault_migration:
            capabilities = (*capabilities, "migrate-to-ram-setup")
        if driver.ignores_own_migrate:
            capabilities = (*capabilities, "own-migrate-silent")
        if type(driver).detach is not Driver.detach:
            capabilities = (*capabilities, "detach")
        if shm_bytes > 0:
            capabilities = (*capabilities, "shm")
        capabilities = (*capabilities, "migrate-setup-data", "ack-pages", "migrate-chain", "bulk-stream")
        try:
            await conn._handshake(name, capabilities, callback_deadline_ms, max_message_bytes, memory, memory_pages,
                                  shm_bytes)
        except BaseException:
            await conn.channel.close()
            raise
        return conn

    async def _handshake(self, name: str, capabilities: tuple[str, ...], deadline_ms: int, max_msg: int,
                         memory: int, memory_pages: int, shm_bytes: int) -> None:
        self._call = self.stub.Connect()
        hello = pb.Hello(version_major=PROTOCOL_VERSION[0], version_minor=PROTOCOL_VERSION[1], name=name,
                         capabilities=list(capabilities), callback_deadline_ms=deadline_ms,
                         max_message_bytes=max_msg, memory=memory,  # type: ignore[arg-type]
                         memory_pages=memory_pages, shm_bytes=max(shm_bytes, 0))
        try:
            try:
                await self._call.write(pb.DeviceMessage(hello=hello))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the call ended already (refused, e.g. EACCES): read() raises its status
            first = await self._call.read()
        except grpc.aio.AioRpcError as e:
            raise_kernel_error(e)
        if first is grpc.aio.EOF:
            try:
                await self._call
            except grpc.aio.AioRpcError as e:
                raise_kernel_error(e)
            raise KernelError(errno.ECONNRESET, "the daemon closed the stream before the Welcome")
        if first.WhichOneof("msg") != "welcome":
            raise KernelError(errno.EPROTO, "the daemon's first message was not a Welcome")
        w = first.welcome
        self.device_id, self.owner = w.device_id, w.owner
        self.zero_pfn, self.system_frames = w.zero_pfn, w.system_frames
        self.max_pages = w.limits.max_pages_per_request
        self.max_message_bytes = w.limits.max_message_bytes
        self.callback_deadline_ms = w.limits.callback_deadline_ms
        self.capabilities = tuple(w.capabilities)
        if "shm" in self.capabilities:
            # The socket, when offered, works from any pid namespace of the host (a
            # /proc path seen from another one could even name some other file).
            if w.shm_socket:
                self.staging = await asyncio.to_thread(StagingArea.fetch, w.shm_socket, w.session, w.shm_bytes)
            if self.staging is None:
                self.staging = StagingArea.map(w.shm_path, w.shm_bytes)
        self.device_pfn_base, self.device_pfn_count = w.device_pfn_base, w.device_pfn_count
        self.memory = memory
        self._metadata = ((SESSION_METADATA_KEY, w.session),)
        self.name = name
        self.reconnect_grace_ms = w.limits.reconnect_grace_ms
        self.max_requests_in_flight = w.limits.max_requests_in_flight  # EAGAIN beyond (0: an older daemon)
        self._reader = asyncio.create_task(self._read_loop())

    def drop_stream(self) -> None:
        """Break the callback stream, as a lost connection would (fault injection):
        with a reconnect grace the session resumes, otherwise the device is fenced."""
        if self._call is not None:
            self._dropping = True
            self._call.cancel()

    async def _resume(self) -> KernelError | None:
        """The stream dropped: open a new one resuming the session, retrying until the
        daemon's grace period is over. None once resumed; else why the session is gone."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reconnect_grace_ms / 1000
        hello = pb.Hello(version_major=PROTOCOL_VERSION[0], version_minor=PROTOCOL_VERSION[1], name=self.name,
                         resume_session=self._metadata[0][1])
        last = ""
        while loop.time() < deadline and not self.closed.done():
            call = self.stub.Connect()
            try:
                await call.write(pb.DeviceMessage(hello=hello))
                first = await call.read()
                if first is not grpc.aio.EOF and first.WhichOneof("msg") == "welcome":
                    self._call = call
                    self.resumes += 1
                    log.warning("device %s: stream resumed", self.name)
                    return None
                await call
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
                if isinstance(e, grpc.aio.AioRpcError):
                    why = to_kernel_error(e)
                    if why.errno == errno.ENOENT:  # a daemon that never had it, or fenced it meanwhile
                        return KernelError(errno.ENOENT, f"the daemon no longer knows this session (restarted, or "
                                                         f"fenced it): connect again ({why})")
                    last = f": {why}"
            await asyncio.sleep(0.05)
        return KernelError(errno.ECONNRESET, f"not resumed within the daemon's {self.reconnect_grace_ms} ms "
                                             f"reconnect grace{last}")

    # ---- callbacks -----------------------------------------------------------------------
    async def _read_loop(self) -> None:
        error = KernelError(errno.ECONNRESET, "stream ended")
        try:
            while True:
                try:
                    await self._read_stream()
                    break
                except grpc.aio.AioRpcError as e:
                    error = to_kernel_error(e)
                    # Fenced (or refused) by the daemon: over. Dropped: resume if it keeps sessions.
                    dropped = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) \
                        or error.errno == errno.ECONNRESET
                    if not (dropped and self.reconnect_grace_ms):
                        break
                    if gone := await self._resume():
                        error = gone
                        break
                except asyncio.CancelledError:
                    if not self._dropping:
                        raise  # close()
                    self._dropping = False  # drop_stream(): as a lost connection
                    error = KernelError(errno.ECONNRESET, "stream dropped (fault injection)")
                    if not self.reconnect_grace_ms:
                        break
                    if gone := await self._resume():
                        error = gone
                        break
        except asyncio.CancelledError:
            error = KernelError(errno.ECONNABORTED, "connection closed by this device")
        finally:
            if not self.closed.done():
                if error.errno != errno.ECONNABORTED:  # (not this device's own close())
                    log.warning("device %s: session ended: %s", self.name, error)
                self.closed.set_result(error)
                try:
                    self.driver.connection_lost(error)
                except Exception:
                    log.exception("connection_lost callback failed")

    async def _read_stream(self) -> None:
        """Dispatch the current stream's callbacks until it ends (raises AioRpcError)."""
        call = self._call
        assert call is not None
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                break
            kind = msg.WhichOneof("msg")
            if kind == "page_free":
                self._on_page_free(msg.page_free)
                continue
            if msg.id in self._handling:
                continue  # sent again after a resume; its ack will follow
            if msg.id in self._acks:  # handled, but the ack may be lost with the old stream
                self._spawn(self._write_ack(self._acks[msg.id]))
                continue
            self._handling.add(msg.id)
            if kind == "invalidate":
                self._spawn(self._on_invalidate(msg.id, msg.invalidate))
            elif kind == "file_open":
                self._spawn(self._on_file_open(msg.id, msg.file_open))
            elif kind == "file_release":
                self._spawn(self._on_file_release(msg.id, msg.file_release))
            elif kind == "migrate_to_ram":
                self._spawn(self._on_migrate_to_ram(msg.id, msg.migrate_to_ram))
            elif kind == "detach":
                self._spawn(self._on_detach(msg.id, msg.detach))
        await call

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ack(self, callback_id: int, ok: bool = True, err: int = 0,
                   pages: pb.MigratePagesRequest | None = None) -> None:
        ack = pb.Ack(id=callback_id, ok=ok, errno=err, pages=pages)
        self._handling.discard(callback_id)
        self._acks[callback_id] = ack
        while len(self._acks) > 1024:
            del self._acks[next(iter(self._acks))]
        await self._write_ack(ack)

    async def _write_ack(self, ack: pb.Ack) -> None:
        """Write an ack on the current stream (after a resume, the new one)."""
        if self.faults.drop_acks > 0:
            self.faults.drop_acks -= 1
            return
        if self.faults.ack_delay_ms:
            await asyncio.sleep(self.faults.ack_delay_ms / 1000)
        if self._call is None or self.closed.done():
            return
        try:
            async with self._write_lock:
                await self._call.write(pb.DeviceMessage(ack=ack))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            log.debug("ack %d not sent: %r", ack.id, e)

    async def _on_invalidate(self, callback_id: int, m: pb.Invalidate) -> None:
        rng = InvalidateRange(m.notifier_id, m.pid, m.start, m.end, Event(m.event), m.owner, m.blockable, m.cur_seq)
        mirror = self.mirrors.get(m.notifier_id)
        ok = True
        if mirror is None:
            # InsertNotifier's reply has not been processed yet: keep the sequence.
            self._early_seq[m.notifier_id] = max(self._early_seq.get(m.notifier_id, 0), m.cur_seq)
        elif not rng.blockable and mirror.lock.locked():
            # A non-blockable range may be refused rather than wait for the lock. The
            # daemon has made cur_seq the notifier's sequence already: take it too, or
            # read_retry fails until the next invalidation (a plain store: one thread).
            mirror.seq = m.cur_seq
            ok = False
        else:
            async with mirror.lock:
                mirror.seq = m.cur_seq
                try:
                    ok = await self.driver.invalidate(mirror, rng)
                except Exception:
                    log.exception("driver invalidate failed; acking anyway")
            if rng.event == Event.RELEASE:
                mirror.released = True
                try:
                    await self.driver.release(mirror)
                except Exception:
                    log.exception("driver release failed")
        await self._ack(callback_id, ok=ok)

    async def _on_file_open(self, callback_id: int, m: pb.FileOpen) -> None:
        err = 0
        try:
            await self.driver.file_open(DeviceFile(m.file_id, m.pid))
        except KernelError as e:
            err = e.errno or errno.EIO
        except Exception:
            log.exception("driver file_open failed")
            err = errno.EIO
        await self._ack(callback_id, err=err)

    async def _on_file_release(self, callback_id: int, m: pb.FileRelease) -> None:
        try:
            await self.driver.file_release(DeviceFile(m.file_id, m.pid))
        except Exception:
            log.exception("driver file_release failed")
        await self._ack(callback_id)

    async def _on_migrate_to_ram(self, callback_id: int, m: pb.MigrateToRam) -> None:
        ok = False
        mig = None
        if m.HasField("migration"):
            r = m.migration
            # The pages step rides on the ack only where the daemon says it honours it.
            mig = Migration(r.migration_id, m.pid, m.addr & ~(PAGE_SIZE - 1), np.frombuffer(r.src_pfns, dtype="<u8"),
                            np.frombuffer(r.src_flags, dtype=np.uint8).copy(), r.cpages,
                            in_ack="ack-pages" in self.capabilities)
        try:
            ok = await self.driver.migrate_to_ram(FaultRequest(m.pid, m.addr, m.device_pfn, m.fault_token, mig))
        except Exception:
            log.exception("driver migrate_to_ram failed")
        await self._ack(callback_id, ok=ok, pages=mig.pages if mig is not None and ok else None)

    async def _on_detach(self, callback_id: int, m: pb.Detach) -> None:
        try:
            await self.driver.detach(m.reason)
        except Exception:
            log.exception("driver detach failed")
        await self._ack(callback_id)

    def _on_page_free(self, m: pb.PageFree) -> None:
        try:
            self.driver.page_free(np.frombuffer(m.pfns, dtype="<u8"))
        except Exception:
            log.exception("driver page_free failed")

    # ---- kernel calls ----------------------------------------------------------------------
    async def _unary(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        try:
            return await method(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise_kernel_error(e)

    async def insert_notifier(self, pid: int, start: int, length: int, lock: asyncio.Lock | None = None) -> Mirror:
        """mmu_interval_notifier_insert on ``pid`` (which must have opened this device)."""
        r = await self._unary(self.stub.InsertNotifier, pb.InsertNotifierRequest(pid=pid, start=start, length=length))
        seq = max(r.seq, self._early_seq.pop(r.notifier_id, 0))
        mirror = Mirror(self, r.notifier_id, pid, start, length, seq, lock)
        self.mirrors[r.notifier_id] = mirror
        return mirror

    async def remove_notifier(self, mirror: Mirror) -> None:
        try:
            await self._unary(self.stub.RemoveNotifier, pb.NotifierRef(notifier_id=mirror.notifier_id))
        finally:
            self.mirrors.pop(mirror.notifier_id, None)

    async def read_begin(self, mirror: Mirror) -> int:
        r = await self._unary(self.stub.ReadBegin, pb.NotifierRef(notifier_id=mirror.notifier_id))
        return r.seq

    async def range_fault(
        self, mirror: Mirror, seq: int, start: int, end: int, *, default_flags: int = 0, pfn_flags_mask: int = 0,
        requests: bytes = b"", dev_private_owner: int = 0, snapshot: bool = False,
    ) -> RangeResult:
        """One hmm_range_fault call (no retry loop: see Mirror.fault)."""
        req = pb.RangeFaultRequest(
            notifier_id=mirror.notifier_id, notifier_seq=seq, start=start, end=end, default_flags=default_flags,
            pfn_flags_mask=pfn_flags_mask, requests=requests, dev_private_owner=dev_private_owner,
        )
        r = await self._unary(self.stub.Snapshot if snapshot else self.stub.RangeFault, req)
        return RangeResult(
            start,
            np.frombuffer(r.pfns, dtype="<u8"),
            np.frombuffer(r.flags, dtype=np.uint8),
            np.frombuffer(r.orders, dtype=np.uint8),
        )

    # ---- page contents: in messages, or through the staging area ------------------------
    def chunk_pages(self, per_page: int, besides: int = 0) -> int:
        """Most pages of contents one call carries: the message limit (``per_page``
        bytes a page on the wire, ``besides`` bytes of other fields), or the staging
        area, and max_pages_per_request."""
        room = max(1, (self.max_message_bytes - MESSAGE_OVERHEAD - besides) // per_page)
        if self.staging is not None:
            room = max(room, self.staging.size // PAGE_SIZE)
        return max(1, min(room, self.max_pages))

    def shared_memory(self, npages: int) -> np.ndarray | None:
        """A (npages, 4096) uint8 array inside the staging area, this device's until the
        connection closes: for device memory the daemon can copy into and out of
        directly — ``dma_read_into`` a part of it, or ``migrate_pages`` with a part of
        it as the data, moves the contents with one copy instead of two (one into the
        area, one out of it). None without an area or without room in it."""
        st = self.staging
        off = st.alloc(npages * PAGE_SIZE) if st is not None and npages > 0 else None
        if st is None or off is None:
            return None
        return st.view(off, npages * PAGE_SIZE).reshape(npages, PAGE_SIZE)

    @contextmanager
    def transfer_buffer(self, npages: int) -> Iterator[np.ndarray]:
        """A writable (npages, 4096) uint8 array for page contents: a region of the
        staging area when there is room (dma_read_into fills it and dma_write /
        migrate_pages send it without a copy), else an ordinary array. Valid only
        inside the ``with``."""
        st = self.staging
        off = st.alloc(npages * PAGE_SIZE) if st is not None and npages > 0 else None
        if st is None or off is None:
            yield np.empty((npages, PAGE_SIZE), dtype=np.uint8)
            return
        try:
            yield st.view(off, npages * PAGE_SIZE).reshape(npages, PAGE_SIZE)
        finally:
            st.free(off)

    async def dma_read(self, pfns: np.ndarray) -> bytes:
        """Read whole system frames (n x 4096 bytes) the device holds; any number of
        pages (several calls if they do not fit one). EFAULT for a frame not held."""
        pfns = np.asarray(pfns, dtype="<u8")
        if self.staging is None and len(pfns) * PAGE_SIZE <= self.max_message_bytes - MESSAGE_OVERHEAD:
            r = await self._unary(self.stub.DmaRead, pb.DmaReadRequest(pfns=pfns.tobytes()))
            return bytes(r.data)
        out = np.empty(len(pfns) * PAGE_SIZE, dtype=np.uint8)
        await self.dma_read_into(pfns, out)
        return out.tobytes()

    async def dma_read_into(self, pfns: np.ndarray, out: np.ndarray) -> None:
        """dma_read into ``out`` (a C-contiguous writable array of len(pfns) x 4096
        bytes), with no intermediate bytes object: through the staging area when
        there is one (straight into ``out`` when it is a transfer_buffer), else in
        messages."""
        pfns = np.asarray(pfns, dtype="<u8")
        if not out.flags.c_contiguous or not out.flags.writeable or out.nbytes != len(pfns) * PAGE_SIZE:
            raise ValueError("out must be a C-contiguous writable array of len(pfns) x 4096 bytes")
        if not len(pfns):  # the daemon's EINVAL
            await self._unary(self.stub.DmaRead, pb.DmaReadRequest())
        flat = out.reshape(-1).view(np.uint8)
        st = self.staging
        if st is not None and len(pfns) >= 2 * PIPELINE_MIN_PAGES and st.offset_of(flat) is None \
                and await self._dma_read_pipelined(st, pfns, flat):
            return
        step = self.chunk_pages(PAGE_SIZE)
        if st is None and len(pfns) > step and "bulk-stream" in self.capabilities:
            await self._dma_read_stream(pfns, flat, min(step, STREAM_CHUNK_PAGES))
            return
        for lo in range(0, len(pfns), step):
            await self._dma_read_part(pfns[lo:lo + step], flat[lo * PAGE_SIZE:(lo + step) * PAGE_SIZE])

    async def _dma_read_stream(self, pfns: np.ndarray, out: np.ndarray, chunk: int) -> None:
        """A big read in messages as DmaReadStreams (capability "bulk-stream"): each
        part is copied into ``out`` while the daemon sends the next."""
        for lo in range(0, len(pfns), self.max_pages):
            part = pfns[lo:lo + self.max_pages]
            pos, end = lo * PAGE_SIZE, (lo + len(part)) * PAGE_SIZE
            replies = self.stub.DmaReadStream(pb.DmaReadStreamRequest(pfns=part.tobytes(), chunk_pages=chunk),
                                              metadata=self._metadata)
            try:
                async for r in replies:
                    n = len(r.data)
                    if pos + n > end:
                        raise KernelError(errno.EIO, "DmaReadStream sent more than was asked for")
                    out[pos:pos + n] = np.frombuffer(r.data, dtype=np.uint8)
                    pos += n
            except grpc.aio.AioRpcError as e:
                raise_kernel_error(e)
            finally:
                replies.cancel()  # (a no-op once it has ended)
            if pos != end:
                raise KernelError(errno.EIO, "DmaReadStream ended early")

    async def _dma_read_pipelined(self, st: StagingArea, pfns: np.ndarray, out: np.ndarray) -> bool:
        """A big read through two regions of the area in turn: the daemon fills one
        while this process copies the other out, so the two copies overlap (they run
        in different processes). False, having done nothing, without room for two."""
        chunk = min(max(len(pfns) // 4, PIPELINE_MIN_PAGES), self.max_pages)
        regions = [st.alloc(chunk * PAGE_SIZE), st.alloc(chunk * PAGE_SIZE)]
        if None in regions:
            for r in regions:
                if r is not None:
                    st.free(r)
            return False
        starts = iter(range(0, len(pfns), chunk))
        inflight: deque[tuple[asyncio.Future[Any], int, int]] = deque()

        def issue(region: int) -> None:
            lo = next(starts, None)
            if lo is not None:
                req = pb.DmaReadRequest(pfns=pfns[lo:lo + chunk].tobytes(), shm_offset=region)
                inflight.append((asyncio.ensure_future(self._unary(self.stub.DmaRead, req)), lo, region))

        try:
            for region in regions:
                issue(cast(int, region))
            while inflight:
                call, lo, region = inflight[0]
                await call
                inflight.popleft()
                hi = min(len(pfns), lo + chunk)
                np.copyto(out[lo * PAGE_SIZE:hi * PAGE_SIZE], st.view(region, (hi - lo) * PAGE_SIZE))
                issue(region)
        finally:
            for call, _, _ in inflight:  # after an error: the daemon may still be writing
                await asyncio.gather(call, return_exceptions=True)
            for r in regions:
                st.free(cast(int, r))
        return True

    async def _dma_read_part(self, pfns: np.ndarray, out: np.ndarray) -> None:
        st = self.staging
        if st is not None:
            off = st.offset_of(out)
            if off is not None:  # out is in the area: the daemon fills it there
                await self._unary(self.stub.DmaRead, pb.DmaReadRequest(pfns=pfns.tobytes(), shm_offset=off))
                return
            off = st.alloc(out.nbytes)
            if off is not None:
                try:
                    await self._unary(self.stub.DmaRead, pb.DmaReadRequest(pfns=pfns.tobytes(), shm_offset=off))
                    np.copyto(out, st.view(off, out.nbytes))
                finally:
                    st.free(off)
                return
        step = max(1, (self.max_message_bytes - MESSAGE_OVERHEAD) // PAGE_SIZE)
        for lo in range(0, len(pfns), step):  # in messages
            r = await self._unary(self.stub.DmaRead, pb.DmaReadRequest(pfns=pfns[lo:lo + step].tobytes()))
            np.copyto(out[lo * PAGE_SIZE:(lo + step) * PAGE_SIZE], np.frombuffer(r.data, dtype=np.uint8))

    async def dma_write(self, pfns: np.ndarray, data: bytes | np.ndarray) -> None:
        """Write whole system frames the device holds writable; ``data`` is len(pfns)
        x 4096 bytes (bytes, or an array: a transfer_buffer is sent without a copy
        through the staging area). Several calls if it does not fit one. EFAULT for
        a frame not held writable."""
        flat = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
        if len(flat) != len(pfns) * PAGE_SIZE:
            raise KernelError(errno.EINVAL, "data must be len(pfns) x 4096 bytes")
        pfns = np.asarray(pfns, dtype="<u8")
        if self.staging is None and isinstance(data, bytes) and \
                len(pfns) <= (self.max_message_bytes - MESSAGE_OVERHEAD) // (PAGE_SIZE + 8):
            # One message (an empty pfns is the daemon's EINVAL).
            await self._unary(self.stub.DmaWrite, bulk.Bulk(pb.DmaWriteRequest(pfns=pfns.tobytes()), flat))
            return
        if not len(pfns):  # the daemon's EINVAL
            await self._unary(self.stub.DmaWrite, pb.DmaWriteRequest())
        step = self.chunk_pages(PAGE_SIZE + 8)
        for lo in range(0, len(pfns), step):
            await self._dma_write_part(pfns[lo:lo + step], flat[lo * PAGE_SIZE:(lo + step) * PAGE_SIZE])

    async def _dma_write_part(self, pfns: np.ndarray, data: np.ndarray) -> None:
        st = self.staging
        if st is not None:
            off = st.offset_of(data)
            if off is not None:
                await self._unary(self.stub.DmaWrite, pb.DmaWriteRequest(pfns=pfns.tobytes(), shm_offset=off))
                return
            off = st.alloc(data.nbytes)
            if off is not None:
                try:
                    np.copyto(st.view(off, data.nbytes), data)
                    await self._unary(self.stub.DmaWrite, pb.DmaWriteRequest(pfns=pfns.tobytes(), shm_offset=off))
                finally:
                    st.free(off)
                return
        step = max(1, (self.max_message_bytes - MESSAGE_OVERHEAD) // (PAGE_SIZE + 8))
        for lo in range(0, len(pfns), step):  # in messages
            await self._unary(self.stub.DmaWrite, bulk.Bulk(pb.DmaWriteRequest(pfns=pfns[lo:lo + step].tobytes()),
                                                             data[lo * PAGE_SIZE:(lo + step) * PAGE_SIZE]))

    async def find_vma(self, pid: int, addr: int) -> tuple[int, int, int]:
        """(start, end, vm_flags) of the mapping at ``addr``; ENOENT if none."""
        r = await self._unary(self.stub.FindVma, pb.FindVmaRequest(pid=pid, addr=addr))
        return r.start, r.end, r.vm_flags

    async def migrate_setup(self, pid: int, start: int, end: int, select: int, fault_token: int = 0, *,
                            with_data: bool = False) -> Migration:
        """migrate_vma_setup over [start, end); finalize it promptly (it holds the
        process's mmap lock). ``with_data``: also read what data_pages() names into
        ``Migration.data`` — inside the setup's reply (one round trip less) when the
        daemon offers capability "migrate-setup-data", there is no staging area (which
        moves bulk contents for less) and the range fits one message; else with
        dma_read, and if that fails the migration is finalized (nothing moves)."""
        req = self._setup_request(pid, start, end, select, fault_token, with_data)
        r = await self._unary(self.stub.MigrateSetup, req)
        return await self._set_up(req, r, r.data, with_data)

    def _setup_request(self, pid: int, start: int, end: int, select: int, fault_token: int,
                       with_data: bool, other_bytes: int = 0) -> pb.MigrateSetupRequest:
        """The request; its with_data only where the contents may come in the reply
        (which carries ``other_bytes`` besides)."""
        npages = (end - start) // PAGE_SIZE
        inline = with_data and self.staging is None and "migrate-setup-data" in self.capabilities \
            and npages * (PAGE_SIZE + MIGRATE_SETUP_BYTES_PER_PAGE) + other_bytes \
            <= self.max_message_bytes - MESSAGE_OVERHEAD
        return pb.MigrateSetupRequest(pid=pid, start=start, end=end, select=select, fault_token=fault_token,
                                      with_data=inline)

    async def _set_up(self, req: pb.MigrateSetupRequest, r: pb.MigrateSetupReply, data: bulk.Buffer,
                      with_data: bool) -> Migration:
        """The Migration of a setup's reply; with ``with_data`` its contents, from
        ``data`` (the reply's) or else read now."""
        mig = Migration(r.migration_id, req.pid, req.start, np.frombuffer(r.src_pfns, dtype="<u8"),
                        np.frombuffer(r.src_flags, dtype=np.uint8).copy(), r.cpages)
        if req.with_data:
            mig.data = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        elif with_data:
            pfns = mig.sources()[0][self.data_pages(mig)]
            try:
                raw = await self.dma_read(pfns) if len(pfns) else b""
            except BaseException:
                await self.migrate_finalize(mig)
                raise
            mig.data = np.frombuffer(raw, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        return mig

    def data_pages(self, mig: Migration) -> np.ndarray:
        """Indexes of the pages whose contents the device copies from system memory
        (and ``Migration.data`` holds): VALID and MIGRATE, and not one of this
        device's private pages (a system frame, or a coherent page); a compound
        entry's 512 pages each."""
        pfns, flags = mig.sources()
        want = MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE
        sel = (flags & want) == want
        if self.memory == MEMORY_DEVICE_PRIVATE:
            base = np.uint64(self.device_pfn_base)
            sel &= (pfns < base) | (pfns >= base + np.uint64(self.device_pfn_count))
        return np.flatnonzero(sel)

    @property
    def evict_pages(self) -> int:
        """Device pages one EvictSetup may cover whatever is in use: its reply lists
        at most one entry (9 bytes) per page of the range, below the message limit."""
        return max(1, (self.max_message_bytes - MESSAGE_OVERHEAD) // MIGRATE_SETUP_BYTES_PER_PAGE)

    async def evict_setup(self, start_pfn: int = 0, npages: int = 0) -> Migration:
        """migrate_device_range over this device's mapped pages among ``npages`` device
        PFNs from ``start_pfn`` (0, 0: its whole memory; see the proto); answer with
        migrate_pages(SYSTEM_DATA + each page's data) and finalize. EINVAL when more
        of the range's pages are in use than one reply can list: a range of at most
        ``evict_pages`` pages always fits."""
        r = await self._unary(self.stub.EvictSetup, pb.EvictSetupRequest(start_pfn=start_pfn, npages=npages))
        return Migration(r.migration_id, 0, 0, np.frombuffer(r.src_pfns, dtype="<u8"),
                         np.frombuffer(r.src_flags, dtype=np.uint8).copy(), r.cpages)

    async def migrate_pages(self, mig: Migration, dst_pfns: np.ndarray, dst_flags: np.ndarray,
                            data: bytes | np.ndarray = b"", *, finalize: bool = False) -> np.ndarray:
        """migrate_vma_pages (and, with ``finalize``, migrate_vma_finalize in the same
        call); returns the src flags (MIGRATE: the page moves). ``data``: the
        SYSTEM_DATA contents (bytes, or an array: a transfer_buffer goes through the
        staging area without a copy); it must fit one message unless it goes through
        the staging area."""
        return (await self._pages(mig, dst_pfns, dst_flags, data, finalize, None))[0]

    async def migrate_pages_and_setup(self, mig: Migration, dst_pfns: np.ndarray, dst_flags: np.ndarray,
                                      data: bytes | np.ndarray = b"", *, pid: int, start: int, end: int,
                                      select: int, with_data: bool = False) -> Migration:
        """migrate_pages(finalize=True) of ``mig``, then migrate_setup of the next
        range: in one call where the daemon offers capability "migrate-chain" (a
        device that migrates piece by piece makes one round trip a piece), else in
        two. ``mig`` is over when this returns or raises: finalized, its outcome in
        ``mig.src_flags``, also when only the setup failed (its KernelError is
        raised); if the pages step failed (raised), it is finalized with nothing moved."""
        req = self._setup_request(pid, start, end, select, 0, with_data, other_bytes=mig.npages)  # (its src flags)
        chain = not mig.in_ack and "migrate-chain" in self.capabilities
        try:
            if chain:
                _, r = await self._pages(mig, dst_pfns, dst_flags, data, True, req)
            else:
                await self.migrate_pages(mig, dst_pfns, dst_flags, data, finalize=True)
        except KernelError:
            with contextlib.suppress(KernelError):  # (already over if the reply was what got lost)
                await self.migrate_finalize(mig)
            raise
        if not chain:
            return await self.migrate_setup(pid, start, end, select, with_data=with_data)
        if r.next_errno:
            raise KernelError(r.next_errno, r.next_error)
        return await self._set_up(req, r.next, r.data, with_data)

    async def _pages(self, mig: Migration, dst_pfns: np.ndarray, dst_flags: np.ndarray, data: bytes | np.ndarray,
                     finalize: bool, nxt: pb.MigrateSetupRequest | None) -> tuple[np.ndarray, Any]:
        """One MigratePages call (with ``nxt``: its chained setup); the src flags and
        the reply (a Bulk; None when the pages wait for the ack of migrate_to_ram)."""
        req = pb.MigratePagesRequest(
            migration_id=mig.id, dst_pfns=np.asarray(dst_pfns, dtype="<u8").tobytes(),
            dst_flags=np.asarray(dst_flags, dtype=np.uint8).tobytes(), finalize=finalize, next=nxt)
        if mig.in_ack and finalize:
            # Sent with the ack; the page moves unless the daemon then refuses it, and
            # then the access fails as for a False return. What the daemon would refuse
            # for certain is refused here, where the driver hears it.
            _check_ack_pages(mig, np.asarray(dst_flags, dtype=np.uint8), len(dst_pfns),
                             data.nbytes if isinstance(data, np.ndarray) else len(data))
            req.data = bytes(data)
            mig.pages = req
            mig.src_flags = np.where((np.asarray(dst_flags) & MIGRATE_PFN_VALID) != 0, mig.src_flags,
                                     mig.src_flags & ~np.uint8(MIGRATE_PFN_MIGRATE)).astype(np.uint8)
            return mig.src_flags, None
        st = self.staging
        flat = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
        off = None if st is None or not len(flat) else st.offset_of(flat)
        region = None
        if st is not None and off is None and len(flat):
            off = region = st.alloc(len(flat))
            if region is not None:
                np.copyto(st.view(region, len(flat)), flat)
        try:
            room = self.max_message_bytes - MESSAGE_OVERHEAD - req.ByteSize()
            if off is not None:
                req.shm_offset, req.shm_length = off, len(flat)
                r = await self._unary(self.stub.MigratePages, req)
            elif len(flat) > room and "bulk-stream" in self.capabilities:
                parts = _pages_parts(req, flat, room, max(1, (self.max_message_bytes - MESSAGE_OVERHEAD) // PAGE_SIZE))
                r = await self._unary(self.stub.MigratePagesStream, parts)
            else:
                r = await self._unary(self.stub.MigratePages, bulk.Bulk(req, flat))
        finally:
            if st is not None and region is not None:
                st.free(region)
        mig.src_flags = np.frombuffer(r.src_flags, dtype=np.uint8).copy()
        return mig.src_flags, r

    async def migrate_finalize(self, mig: Migration) -> np.ndarray:
        r = await self._unary(self.stub.MigrateFinalize, pb.MigrationRef(migration_id=mig.id))
        mig.src_flags = np.frombuffer(r.src_flags, dtype=np.uint8).copy()
        return mig.src_flags

    async def make_exclusive(self, pid: int, start: int, npages: int, *, with_owner: bool = True) -> np.ndarray:
        """make_device_exclusive over the pages; they come back locked: map them,
        then unlock_pages."""
        r = await self._unary(self.stub.MakeExclusive, pb.MakeExclusiveRequest(
            pid=pid, start=start, npages=npages, with_owner=with_owner))
        return np.frombuffer(r.pfns, dtype="<u8")

    async def unlock_pages(self, pfns: np.ndarray) -> None:
        await self._unary(self.stub.UnlockPages, pb.UnlockPagesRequest(pfns=_pfn_bytes(pfns)))

    async def close(self) -> None:
        """End the session (the daemon removes this device's notifiers)."""
        if self._call is not None and not self.closed.done():
            try:
                await self._call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
            try:
                await asyncio.wait_for(asyncio.shield(self.closed), 2)
            except TimeoutError:
                pass
        if self._reader is not None:
            self._reader.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.channel.close()
        if self.staging is not None:
            self.staging.close()

    async def __aenter__(self) -> DeviceConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _pfn_bytes(pfns: np.ndarray) -> bytes:
    return np.asarray(pfns, dtype="<u8").tobytes()
