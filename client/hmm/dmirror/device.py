"""dmirror: the reference device, shaped like the kernel's lib/test_hmm.c.

A ``Dmirror`` is one device (one session with the daemon). A process opening
"/dev/<name>" creates a ``Handle`` bound to that process: a whole-address-space
mirror, a device page table and the handle lock (the driver's update lock). Its
commands are the kernel driver's ioctls, with the same counters and errors.

Implemented here: READ, WRITE, SNAPSHOT, CHECK_EXCLUSIVE, FLAGS. The migration
and exclusive-access commands need device memory in the daemon (a later step)
and fail with ENOTTY until then, like an ioctl the driver does not know.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import zlib
from dataclasses import dataclass, field

import numpy as np

from hmm.abi import (
    HMM_DMIRROR_PROT_ERROR,
    HMM_DMIRROR_PROT_NONE,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_PUD,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_PROT_ZERO,
    HMM_PFN_ERROR,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_ORDER,
    PUD_ORDER,
    TASK_SIZE,
    Event,
)
from hmm.device import DeviceConnection, DeviceFile, Driver
from hmm.errors import KernelError
from hmm.mirror import InvalidateRange, Mirror, RangeResult
from hmm.sparse import SparseTable

log = logging.getLogger(__name__)

# dmirror commands (the ioctl numbers' low byte) and flags.
CMD_READ, CMD_WRITE, CMD_MIGRATE_TO_DEV, CMD_MIGRATE_TO_SYS = 0, 1, 2, 3
CMD_SNAPSHOT, CMD_EXCLUSIVE, CMD_CHECK_EXCLUSIVE, CMD_RELEASE, CMD_FLAGS = 4, 5, 6, 7, 8
FLAG_FAIL_ALLOC = 1

# Device page-table entry: frame << 12 | tag bits.
DPT_VALID = np.uint64(1)
DPT_WRITE = np.uint64(2)
DPT_ATOMIC = np.uint64(4)

MAX_EVENTS = 10_000


@dataclass
class CommandResult:
    cpages: int = 0
    faults: int = 0
    data: bytes = b""


@dataclass
class EventRecord:
    event: Event
    start: int
    end: int
    owner: int
    cur_seq: int
    mapped_pages: int = 0
    snoop_crc32: int = 0
    snooped: bool = False


@dataclass(eq=False)
class Handle:
    """One open of the device, bound to the opening process's address space."""

    file: DeviceFile
    mirror: Mirror
    table: SparseTable = field(default_factory=SparseTable)
    flags: int = 0
    events: list[EventRecord] = field(default_factory=list)

    @property
    def lock(self) -> asyncio.Lock:
        return self.mirror.lock


class Dmirror(Driver):
    """One dmirror device: its handles and their commands."""

    def __init__(self, name: str, memory: str = "private", *, snoop: bool = False) -> None:
        self.name = name
        self.memory = memory
        self.snoop = snoop
        self.conn: DeviceConnection | None = None
        self.handles: dict[int, Handle] = {}
        self._by_notifier: dict[int, Handle] = {}

    async def connect(self, kernel_address: str, callback_deadline_ms: int = 0) -> DeviceConnection:
        self.conn = await DeviceConnection.connect(kernel_address, self.name, self,
                                                   callback_deadline_ms=callback_deadline_ms)
        return self.conn

    # ---- driver callbacks ------------------------------------------------------------------
    async def file_open(self, file: DeviceFile) -> None:
        assert self.conn is not None
        mirror = await self.conn.insert_notifier(file.pid, 0, TASK_SIZE)
        handle = Handle(file, mirror)
        self.handles[file.file_id] = handle
        self._by_notifier[mirror.notifier_id] = handle

    async def file_release(self, file: DeviceFile) -> None:
        handle = self.handles.pop(file.file_id, None)
        if handle is None or self.conn is None:
            return
        self._by_notifier.pop(handle.mirror.notifier_id, None)
        try:
            await self.conn.remove_notifier(handle.mirror)
        except KernelError as e:
            log.debug("remove_notifier on close: %s", e)
        handle.table.clear()

    async def invalidate(self, mirror: Mirror, rng: InvalidateRange) -> bool:
        """Erase the range from the handle's table (the handle lock is held)."""
        handle = self._by_notifier.get(mirror.notifier_id)
        if handle is None:
            return True
        if rng.event == Event.MIGRATE and rng.owner == self.conn_owner:
            return True  # our own migration: the command maintains the table itself
        end = min(rng.end, TASK_SIZE)
        rec = EventRecord(rng.event, rng.start, rng.end, rng.owner, rng.cur_seq)
        old = handle.table.erase(rng.start, end) if rng.start < end else np.zeros(0, dtype=np.uint64)
        live = old[(old & DPT_VALID) != 0]
        rec.mapped_pages = len(live)
        if self.snoop and len(live) and self.conn is not None:
            try:
                data = await self.conn.dma_read(live >> np.uint64(PAGE_SHIFT))
                rec.snoop_crc32, rec.snooped = zlib.crc32(data), True
            except KernelError as e:
                log.warning("snoop DMA failed: %s", e)
        if len(handle.events) < MAX_EVENTS:
            handle.events.append(rec)
        return True

    @property
    def conn_owner(self) -> int:
        return self.conn.owner if self.conn is not None else 0

    # ---- commands ------------------------------------------------------------------------------
    def handle(self, file_id: int) -> Handle:
        h = self.handles.get(file_id)
        if h is None:
            raise KernelError(errno.EINVAL, f"no open handle {file_id} on {self.name}")
        return h

    async def command(self, file_id: int, cmd: int, addr: int, npages: int, data: bytes = b"") -> CommandResult:
        """Run one command with the kernel driver's checks, in its order."""
        h = self.handle(file_id)
        if addr & ~PAGE_MASK:
            raise KernelError(errno.EINVAL, "addr is not page-aligned")
        end = addr + npages * PAGE_SIZE
        if npages <= 0 or end <= addr or end > 1 << 64:
            raise KernelError(errno.EINVAL, "empty or wrapping range")
        if cmd == CMD_READ:
            return await self._read(h, addr, end)
        if cmd == CMD_WRITE:
            return await self._write(h, addr, end, data)
        if cmd == CMD_SNAPSHOT:
            return await self._snapshot(h, addr, end)
        if cmd == CMD_CHECK_EXCLUSIVE:
            return await self._check_exclusive(h, addr, end)
        if cmd == CMD_FLAGS:
            h.flags = npages
            return CommandResult()
        if cmd in (CMD_MIGRATE_TO_DEV, CMD_MIGRATE_TO_SYS, CMD_EXCLUSIVE, CMD_RELEASE):
            raise KernelError(errno.ENOTTY, "needs device memory in the daemon (not available yet)")
        raise KernelError(errno.EINVAL, f"unknown command {cmd}")

    def _check_bound(self, h: Handle) -> None:
        if h.mirror.released:
            raise KernelError(errno.EINVAL, "the bound address space is gone")

    async def _fault_pass(self, h: Handle, start: int, end: int, write: bool) -> None:
        """One fault pass: make the device table cover [start, end) (1000 ms budget)."""
        assert self.conn is not None
        step = self.conn.max_pages << PAGE_SHIFT
        for s in range(start, end, step):
            e = min(end, s + step)
            async with h.mirror.fault(s, e, write=write) as result:
                self._store(h, result)

    @staticmethod
    def _store(h: Handle, r: RangeResult) -> None:
        """Program the device table from a range fault result (handle lock held)."""
        valid = (r.flags & HMM_PFN_VALID) != 0
        entries = np.where(valid, (r.pfns << np.uint64(PAGE_SHIFT)) | DPT_VALID, np.uint64(0))
        entries[valid & ((r.flags & HMM_PFN_WRITE) != 0)] |= DPT_WRITE
        old = h.table.gather(r.start, r.start + (r.npages << PAGE_SHIFT))
        h.table.scatter(r.start, np.where(valid, entries, old).astype(np.uint64))

    async def _copy_loop(self, h: Handle, start: int, end: int, write: bool, data: bytes) -> CommandResult:
        """READ/WRITE: copy through the table from the first page not yet done; fault
        the rest in when a page is missing (not writable, for WRITE)."""
        assert self.conn is not None
        n = (end - start) >> PAGE_SHIFT
        out = bytearray(n * PAGE_SIZE) if not write else bytearray()
        done, faults = 0, 0
        usable_bit = DPT_WRITE if write else DPT_VALID
        while True:
            self._check_bound(h)
            async with h.lock:
                ent = h.table.gather(start + (done << PAGE_SHIFT), end)
                usable = (ent & usable_bit) != 0
                if write:
                    usable &= (ent & DPT_ATOMIC) == 0
                k = int(np.argmin(usable)) if not usable.all() else len(usable)
                if k:
                    pfns = ent[:k] >> np.uint64(PAGE_SHIFT)
                    span = slice(done * PAGE_SIZE, (done + k) * PAGE_SIZE)
                    if write:
                        await self.conn.dma_write(pfns, data[span])
                    else:
                        out[span] = await self.conn.dma_read(pfns)
                    done += k
            if done == n:
                return CommandResult(n, faults, bytes(out))
            await self._fault_pass(h, start + (done << PAGE_SHIFT), end, write)
            faults += 1

    async def _read(self, h: Handle, start: int, end: int) -> CommandResult:
        return await self._copy_loop(h, start, end, False, b"")

    async def _write(self, h: Handle, start: int, end: int, data: bytes) -> CommandResult:
        if len(data) != end - start:
            raise KernelError(errno.EFAULT, f"WRITE needs {end - start} bytes of data, got {len(data)}")
        return await self._copy_loop(h, start, end, True, data)

    async def _snapshot(self, h: Handle, start: int, end: int) -> CommandResult:
        """A non-faulting range fault through a temporary notifier; one byte per page."""
        assert self.conn is not None
        self._check_bound(h)
        out = bytearray()
        step = self.conn.max_pages << PAGE_SHIFT
        for s in range(start, end, step):
            e = min(end, s + step)
            temp = await self.conn.insert_notifier(h.file.pid, s, e - s, lock=h.lock)
            try:
                async with temp.fault(s, e, snapshot=True) as r:
                    out += self.snapshot_bytes(r)
            finally:
                await self.conn.remove_notifier(temp)
        return CommandResult(len(out), 0, bytes(out))

    def snapshot_bytes(self, r: RangeResult) -> bytes:
        """HMM_DMIRROR_PROT_* per page from a range fault result."""
        zero = np.uint64(self.conn.zero_pfn if self.conn else 0)
        valid = (r.flags & HMM_PFN_VALID) != 0
        b = np.full(r.npages, HMM_DMIRROR_PROT_NONE, dtype=np.uint8)
        b[valid] = np.where((r.flags[valid] & HMM_PFN_WRITE) != 0, HMM_DMIRROR_PROT_WRITE, HMM_DMIRROR_PROT_READ)
        b[valid & (r.pfns == zero)] |= HMM_DMIRROR_PROT_ZERO
        b[valid & (r.orders == PMD_ORDER)] |= HMM_DMIRROR_PROT_PMD
        b[valid & (r.orders == PUD_ORDER)] |= HMM_DMIRROR_PROT_PUD
        b[(r.flags & HMM_PFN_ERROR) != 0] = HMM_DMIRROR_PROT_ERROR
        return b.tobytes()

    async def _check_exclusive(self, h: Handle, start: int, end: int) -> CommandResult:
        async with h.lock:
            ent = h.table.gather(start, end)
        if ((ent & DPT_ATOMIC) != 0).any():
            raise KernelError(errno.EPERM, "a page is still held exclusively")
        return CommandResult()

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
