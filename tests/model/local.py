"""The real dmirror driver on an in-process core: no gRPC, no sockets.

``LocalConnection`` stands where ``hmm.device.DeviceConnection`` stands for a
device process — it offers the driver-facing kernel calls dmirror makes — and it
is also the core's ``DeviceOps`` for that device, where the rpc layer's session
would be: each callback takes the mirror's update lock and records ``cur_seq``
exactly as the SDK does, then runs the driver's callback. So the model tests run
hmm-dmirror's own command code (``hmm.dmirror.device.Dmirror``) against
``hmmd.core.kernel.Kernel`` directly, thousands of steps a second.

The core's ``tests/core/conftest.py`` FakeDevice only records invalidations (it has
no device memory and no commands), which is why the model tests use this instead.
"""

from __future__ import annotations

import asyncio
import errno

import numpy as np

from hmm.abi import MEMORY_DEVICE_PRIVATE, MIGRATE_PFN_MIGRATE, MIGRATE_PFN_VALID, PAGE_SIZE, Event
from hmm.device import DeviceConnection, DeviceFile, FaultRequest, Migration
from hmm.dmirror.device import DevicePool, Dmirror
from hmm.errors import KernelError
from hmm.mirror import InvalidateRange, Mirror, RangeResult
from hmmd.core.device import Device
from hmmd.core.devmem import MemoryKind
from hmmd.core.evict import Eviction
from hmmd.core.kernel import Kernel
from hmmd.core.migrate import Migration as CoreMigration
from hmmd.core.notifier import IntervalNotifier, NotifierRange
from hmmd.core.physmem import ZERO_PFN


def _pfn_bytes(pfns: np.ndarray) -> bytes:
    return np.asarray(pfns, dtype="<u8").tobytes()


def _driver_migration(mig: CoreMigration | Eviction, pid: int, start: int, *, in_ack: bool = False) -> Migration:
    return Migration(mig.id, pid, start, np.asarray(mig.src_pfns).astype(np.uint64),
                     np.asarray(mig.src_flags, dtype=np.uint8).copy(), mig.cpages, in_ack=in_ack)


class LocalConnection:
    """A dmirror device registered with an in-process kernel (see the module doc)."""

    def __init__(self, kernel: Kernel, driver: Dmirror) -> None:
        self.kernel = kernel
        self.driver = driver
        self.dev: Device | None = None
        self.mirrors: dict[int, Mirror] = {}
        self._early_seq: dict[int, int] = {}
        self.owner = 0
        self.zero_pfn = ZERO_PFN
        self.system_frames = kernel.ram.nframes
        self.max_pages = kernel.limits.max_pages_per_request
        self.device_pfn_base = 0
        self.device_pfn_count = 0
        self.memory = MEMORY_DEVICE_PRIVATE
        self.max_message_bytes = 0  # the device's, once attached
        self.staging = None

    @classmethod
    def attach(cls, kernel: Kernel, name: str, memory_pages: int) -> Dmirror:
        """Register a device-private dmirror called ``name`` with ``kernel``."""
        driver = Dmirror(name, "private", memory_pages=memory_pages)
        conn = cls(kernel, driver)
        dev = kernel.register_device(name, conn, MemoryKind(MEMORY_DEVICE_PRIVATE), memory_pages)
        dev.wants_fault_migration = driver.wants_fault_migration
        dev.own_migrate_silent = driver.ignores_own_migrate
        assert dev.pgmap is not None
        conn.dev, conn.owner = dev, dev.owner
        conn.device_pfn_base, conn.device_pfn_count = dev.pgmap.base, dev.pgmap.npages
        conn.max_message_bytes = dev.max_message_bytes
        driver.conn = conn  # type: ignore[assignment]  # duck-typed DeviceConnection
        driver.pool = DevicePool(conn.device_pfn_base, conn.device_pfn_count)
        return driver

    @property
    def device(self) -> Device:
        assert self.dev is not None
        return self.dev

    # ---- DeviceOps: the core calls the device ------------------------------------------
    async def invalidate(self, notifier: IntervalNotifier, rng: NotifierRange, cur_seq: int) -> bool:
        mirror = self.mirrors.get(notifier.id)
        if mirror is None:  # insert_notifier has not returned yet
            self._early_seq[notifier.id] = max(self._early_seq.get(notifier.id, 0), cur_seq)
            return True
        if not rng.blockable and mirror.lock.locked():
            mirror.seq = cur_seq  # as the SDK: the daemon already made it the notifier's
            return False
        event = Event(int(rng.event))
        inv = InvalidateRange(notifier.id, getattr(rng.mm, "pid", 0), rng.start, rng.end, event, rng.owner,
                              rng.blockable, cur_seq)
        async with mirror.lock:
            mirror.seq = cur_seq
            ok = await self.driver.invalidate(mirror, inv)
        if event == Event.RELEASE:
            mirror.released = True
            await self.driver.release(mirror)
        return ok

    async def file_open(self, file_id: int, pid: int) -> int:
        try:
            await self.driver.file_open(DeviceFile(file_id, pid))
        except KernelError as e:
            return e.errno or errno.EIO
        return 0

    async def file_release(self, file_id: int, pid: int) -> None:
        await self.driver.file_release(DeviceFile(file_id, pid))

    async def migrate_to_ram(self, pid: int, addr: int, pfn: int, fault_token: int,
                             migration: CoreMigration | None) -> bool:
        mig = _driver_migration(migration, pid, addr & ~(PAGE_SIZE - 1), in_ack=True) if migration else None
        ok = await self.driver.migrate_to_ram(FaultRequest(pid, addr, pfn, fault_token, mig))
        if not ok:
            return False
        if mig is not None and mig.pages is not None:  # the copy "came with the ack"
            p = mig.pages
            try:
                await self.kernel.migrate_pages(self.device, mig.id, p.dst_pfns, p.dst_flags, p.data)
                await self.kernel.migrate_finalize(self.device, mig.id)
            except KernelError:
                return False
        return True

    def page_free(self, pfns: np.ndarray) -> None:
        self.driver.page_free(np.asarray(pfns, dtype=np.uint64))

    # ---- the driver calls the kernel ----------------------------------------------------
    async def insert_notifier(self, pid: int, start: int, length: int, lock: asyncio.Lock | None = None) -> Mirror:
        sub = await self.kernel.insert_notifier(self.device, pid, start, length)
        seq = max(sub.invalidate_seq, self._early_seq.pop(sub.id, 0))
        mirror = Mirror(self, sub.id, pid, start, length, seq, lock)  # type: ignore[arg-type]
        self.mirrors[sub.id] = mirror
        return mirror

    async def remove_notifier(self, mirror: Mirror) -> None:
        try:
            await self.kernel.remove_notifier(self.device, mirror.notifier_id)
        finally:
            self.mirrors.pop(mirror.notifier_id, None)

    async def read_begin(self, mirror: Mirror) -> int:
        return await self.kernel.read_begin(self.device, mirror.notifier_id)

    async def range_fault(self, mirror: Mirror, seq: int, start: int, end: int, *, default_flags: int = 0,
                          pfn_flags_mask: int = 0, requests: bytes = b"", dev_private_owner: int = 0,
                          snapshot: bool = False) -> RangeResult:
        await asyncio.sleep(0)  # a driver that retries forever still lets the loop run (and time out)
        r = await self.kernel.range_fault(self.device, mirror.notifier_id, seq, start, end, default_flags,
                                          pfn_flags_mask, requests, dev_private_owner, snapshot=snapshot)
        return RangeResult(start, r.pfns.astype(np.uint64), r.flags.astype(np.uint8), r.orders.astype(np.uint8))

    async def dma_read(self, pfns: np.ndarray) -> bytes:
        return b"".join(self.kernel.dma_read(self.device, _pfn_bytes(pfns)))

    async def dma_write(self, pfns: np.ndarray, data: bytes) -> None:
        self.kernel.dma_write(self.device, _pfn_bytes(pfns), bytes(data))

    async def find_vma(self, pid: int, addr: int) -> tuple[int, int, int]:
        return await self.kernel.find_vma(self.device, pid, addr)

    async def migrate_setup(self, pid: int, start: int, end: int, select: int, fault_token: int = 0, *,
                            with_data: bool = False) -> Migration:
        mig = await self.kernel.migrate_setup(self.device, pid, start, end, select, fault_token)
        out = _driver_migration(mig, pid, start)
        if with_data:  # the daemon's MigrateSetup(with_data) reply
            raw = b"".join(self.kernel.migration_data(self.device, mig))
            out.data = np.frombuffer(raw, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        return out

    def data_pages(self, mig: Migration) -> np.ndarray:
        return DeviceConnection.data_pages(self, mig)  # type: ignore[arg-type]  # the fields it reads are here too

    # The SDK's sizes from the same fields (the device's message limit, no staging area).
    evict_pages = DeviceConnection.evict_pages
    chunk_pages = DeviceConnection.chunk_pages

    async def evict_setup(self, start_pfn: int = 0, npages: int = 0) -> Migration:
        return _driver_migration(await self.kernel.evict_setup(self.device, start_pfn, npages), 0, 0)

    async def migrate_pages(self, mig: Migration, dst_pfns: np.ndarray, dst_flags: np.ndarray,
                            data: bytes = b"", *, finalize: bool = False) -> np.ndarray:
        pfns = _pfn_bytes(dst_pfns)
        flags = np.asarray(dst_flags, dtype=np.uint8).tobytes()
        if mig.in_ack and finalize:
            from hmm.v1 import device_pb2 as pb  # the ack's carrier, as the SDK builds it

            mig.pages = pb.MigratePagesRequest(migration_id=mig.id, dst_pfns=pfns, dst_flags=flags,
                                               data=bytes(data), finalize=True)
            mig.src_flags = np.where((np.asarray(dst_flags) & MIGRATE_PFN_VALID) != 0, mig.src_flags,
                                     mig.src_flags & ~np.uint8(MIGRATE_PFN_MIGRATE)).astype(np.uint8)
            return mig.src_flags
        core = await self.kernel.migrate_pages(self.device, mig.id, pfns, flags, bytes(data))
        if finalize:
            core = await self.kernel.migrate_finalize(self.device, mig.id)
        mig.src_flags = np.asarray(core.src_flags, dtype=np.uint8).copy()
        return mig.src_flags

    async def migrate_finalize(self, mig: Migration) -> np.ndarray:
        core = await self.kernel.migrate_finalize(self.device, mig.id)
        mig.src_flags = np.asarray(core.src_flags, dtype=np.uint8).copy()
        return mig.src_flags

    async def make_exclusive(self, pid: int, start: int, npages: int, *, with_owner: bool = True) -> np.ndarray:
        pfns = await self.kernel.make_exclusive(self.device, pid, start, npages, with_owner)
        return np.asarray(pfns).astype(np.uint64)

    async def unlock_pages(self, pfns: np.ndarray) -> None:
        self.kernel.unlock_pages(self.device, _pfn_bytes(pfns))

    async def close(self) -> None:
        pass
