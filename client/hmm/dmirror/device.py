"""dmirror: the reference device, shaped like the kernel's lib/test_hmm.c.

A ``Dmirror`` is one device (one session with the daemon). A process opening
"/dev/<name>" creates a ``Handle`` bound to that process: a whole-address-space
mirror, a device page table and the handle lock (the driver's update lock). Its
commands are the kernel driver's ioctls, with the same counters and errors.

Device memory is device-private — a pool of pages whose contents live in this
process — or device-coherent: pages the daemon's CPU maps directly, whose
contents this device reaches by DMA to its own PFNs. Implemented: READ, WRITE, MIGRATE_TO_DEV, MIGRATE_TO_SYS, SNAPSHOT,
EXCLUSIVE, CHECK_EXCLUSIVE, RELEASE (eviction), FLAGS, and the migrate_to_ram and
page_free callbacks. As in the newest driver, closing any handle evicts the device.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from hmm.abi import (
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
    HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
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
    HMM_RANGE_DEFAULT_TIMEOUT_MS,
    MEMORY_DEVICE_COHERENT,
    MEMORY_DEVICE_PRIVATE,
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_COMPOUND,
    MIGRATE_VMA_SELECT_DEVICE_COHERENT,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_ORDER,
    PTRS_PER_PTE,
    PUD_ORDER,
    TASK_SIZE,
    Event,
)
from hmm.channel import DEFAULT_MAX_MESSAGE_BYTES
from hmm.device import DeviceConnection, DeviceFile, Driver, FaultRequest, Migration
from hmm.errors import KernelError
from hmm.mirror import InvalidateRange, Mirror, RangeResult
from hmm.security import Credentials
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
DPT_DEVICE = np.uint64(8)  # the frame is one of this device's own pages

MIGRATE_PIECE_PAGES = 512  # migrations go piece by piece, never across a VMA end
BLOCK_PAGES = PTRS_PER_PTE  # a compound (THP) entry: 512 pages
EVICT_BATCH_PAGES = 4096  # 16 MiB of contents per MigratePages during eviction
FAULT_CHUNK_PAGES = 32  # the kernel driver's range-fault chunk, each with its own time budget
VM_READ = 0x1
DEFAULT_MEMORY_PAGES = 1 << 16  # 256 MiB of device memory

MAX_EVENTS = 10_000


def unfold(src_flags: np.ndarray) -> np.ndarray:
    """Per page: MIGRATE set, a compound entry's flag standing for its 512 pages."""
    out = (src_flags & MIGRATE_PFN_MIGRATE) != 0
    for i in np.flatnonzero(out & ((src_flags & MIGRATE_PFN_COMPOUND) != 0)).tolist():
        out[i : i + BLOCK_PAGES] = True
    return out


def unfold_pfns(src_pfns: np.ndarray, src_flags: np.ndarray) -> np.ndarray:
    """Per page: the source PFN (a compound entry's pages follow its head), 0 for none."""
    out = np.where((src_flags & MIGRATE_PFN_VALID) != 0, src_pfns, 0).astype(np.uint64)
    heads = ((src_flags & MIGRATE_PFN_COMPOUND) != 0) & ((src_flags & MIGRATE_PFN_VALID) != 0)
    for i in np.flatnonzero(heads).tolist():
        out[i : i + BLOCK_PAGES] = np.uint64(src_pfns[i]) + np.arange(BLOCK_PAGES, dtype=np.uint64)
    return out


def runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) of each run of consecutive indices in sorted ``idx``."""
    if not len(idx):
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(idx, breaks)]


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


class DevicePool:
    """The device's memory: pages [base, base + npages). Private contents live here;
    coherent contents in the daemon, reached through ``conn``'s DMA. Each allocated
    page remembers the handle that migrated it.

    Two free lists, as the kernel driver's: single pages, and blocks of 512 pages
    aligned to 512 PFNs (for compound, THP, migration). The memory is cut into
    blocks up front; single pages come from the unaligned edges first, then from
    splitting a block. A block allocated whole returns to the block list once all
    of its pages are free again; pages of a split block stay single pages."""

    def __init__(self, base: int, npages: int, coherent: DeviceConnection | None = None) -> None:
        self.base = base
        self.npages = npages
        self.coherent = coherent
        self.storage = np.zeros((0 if coherent else npages, PAGE_SIZE), dtype=np.uint8)  # backed lazily
        first = (-base) % BLOCK_PAGES  # the first page whose PFN is block-aligned
        nblocks = max(0, (npages - first) // BLOCK_PAGES)
        self._blocks = [first + b * BLOCK_PAGES for b in range(nblocks - 1, -1, -1)]  # pop(): lowest first
        # Without a block, every page is an edge page, listed once.
        edges = [*range(first), *range(first + nblocks * BLOCK_PAGES, npages)] if nblocks else list(range(npages))
        self._free = edges[::-1]  # single pages; pop(): lowest first
        self._whole: dict[int, int] = {}  # first page of a block allocated whole -> its pages still in use
        self.migrated_by: dict[int, int] = {}  # device pfn -> file_id

    def contains(self, pfns: np.ndarray) -> np.ndarray:
        return (pfns >= self.base) & (pfns < self.base + self.npages)

    @property
    def free_pages(self) -> int:
        return len(self._free) + BLOCK_PAGES * len(self._blocks)

    @property
    def free_blocks(self) -> int:
        return len(self._blocks)

    def _take(self, idx: list[int], file_id: int) -> np.ndarray:
        pfns = np.array(idx, dtype=np.uint64) + np.uint64(self.base)
        for pfn in pfns.tolist():
            self.migrated_by[pfn] = file_id
        return pfns

    def alloc(self, n: int, file_id: int) -> np.ndarray:
        """``n`` single pages (blocks are split when the single pages run out)."""
        if n > self.free_pages:
            raise KernelError(errno.ENOMEM, "device memory is full")
        while len(self._free) < n:
            b = self._blocks.pop(0)  # split the highest block, keeping low ones whole
            self._free[:0] = range(b + BLOCK_PAGES - 1, b - 1, -1)
        return self._take([self._free.pop() for _ in range(n)], file_id)

    def alloc_block(self, file_id: int) -> np.ndarray | None:
        """One aligned block of 512 pages, or None when no block is free."""
        if not self._blocks:
            return None
        b = self._blocks.pop()
        self._whole[b] = BLOCK_PAGES
        return self._take(list(range(b, b + BLOCK_PAGES)), file_id)

    def free(self, pfns: np.ndarray) -> None:
        first = (-self.base) % BLOCK_PAGES
        for pfn in pfns.tolist():
            if self.migrated_by.pop(int(pfn), None) is None:
                continue
            i = int(pfn) - self.base
            b = i - (i - first) % BLOCK_PAGES
            if b in self._whole:
                self._whole[b] -= 1
                if not self._whole[b]:
                    del self._whole[b]
                    self._blocks.append(b)
            else:
                self._free.append(i)

    async def read(self, pfns: np.ndarray) -> bytes:
        if self.coherent is not None:
            return await self.coherent.dma_read(pfns) if len(pfns) else b""
        return self.storage[(pfns - np.uint64(self.base)).astype(np.int64)].tobytes()

    async def write(self, pfns: np.ndarray, data: bytes) -> None:
        if self.coherent is not None:
            if len(pfns):
                await self.coherent.dma_write(pfns, data)
            return
        self.storage[(pfns - np.uint64(self.base)).astype(np.int64)] = np.frombuffer(
            data, dtype=np.uint8).reshape(-1, PAGE_SIZE)


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

    # dmirror migrates the faulting page (the whole block when the CPU maps it
    # by PMD), so the daemon may set that up.
    wants_fault_migration = True
    # It ignores its own MIGRATE events (HMM-SELFTESTS.md 1.7): no need to send them.
    ignores_own_migrate = True

    def __init__(self, name: str, memory: str = "private", *, snoop: bool = False,
                 memory_pages: int = DEFAULT_MEMORY_PAGES) -> None:
        if memory not in ("private", "coherent"):
            raise ValueError(f"memory is 'private' or 'coherent', not {memory!r}")
        self.name = name
        self.memory = memory
        self.coherent = memory == "coherent"
        self.snoop = snoop
        self.memory_pages = memory_pages
        self.conn: DeviceConnection | None = None
        self.pool: DevicePool | None = None
        self.handles: dict[int, Handle] = {}
        self._by_notifier: dict[int, Handle] = {}

    async def connect(self, kernel_address: str, callback_deadline_ms: int = 0,
                      credentials: Credentials | None = None,
                      max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> DeviceConnection:
        self.conn = await DeviceConnection.connect(
            kernel_address, self.name, self, callback_deadline_ms=callback_deadline_ms, credentials=credentials,
            memory=MEMORY_DEVICE_COHERENT if self.coherent else MEMORY_DEVICE_PRIVATE, memory_pages=self.memory_pages,
            max_message_bytes=max_message_bytes)
        self.pool = DevicePool(self.conn.device_pfn_base, self.conn.device_pfn_count,
                               self.conn if self.coherent else None)
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
        # The newest driver evicts the whole device when any handle closes.
        try:
            await self.evict()
        except KernelError as e:
            log.warning("eviction on close failed: %s", e)

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
                data = await self._copy_out(live)
                rec.snoop_crc32, rec.snooped = zlib.crc32(data), True
            except KernelError as e:
                log.warning("snoop DMA failed: %s", e)
        if len(handle.events) < MAX_EVENTS:
            handle.events.append(rec)
        return True

    @property
    def _select_own(self) -> int:
        """The migrate selector of this device's own pages."""
        return MIGRATE_VMA_SELECT_DEVICE_COHERENT if self.coherent else MIGRATE_VMA_SELECT_DEVICE_PRIVATE

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
        if cmd == CMD_MIGRATE_TO_DEV:
            return await self._migrate_to_dev(h, addr, end)
        if cmd == CMD_MIGRATE_TO_SYS:
            return await self._migrate_to_sys(h, addr, end)
        if cmd == CMD_EXCLUSIVE:
            return await self._exclusive(h, addr, end)
        if cmd == CMD_RELEASE:
            await self.evict()
            return CommandResult()
        raise KernelError(errno.EINVAL, f"unknown command {cmd}")

    def _check_bound(self, h: Handle) -> None:
        if h.mirror.released:
            raise KernelError(errno.EINVAL, "the bound address space is gone")

    async def _fault_pass(self, h: Handle, start: int, end: int, write: bool) -> None:
        """One fault pass: make the device table cover [start, end). The kernel driver
        faults 32 pages at a time with 1000 ms each; one call covers many chunks, so
        it gets their budgets added up."""
        assert self.conn is not None
        step = self.conn.max_pages << PAGE_SHIFT
        for s in range(start, end, step):
            e = min(end, s + step)
            budget = HMM_RANGE_DEFAULT_TIMEOUT_MS * -(-((e - s) >> PAGE_SHIFT) // FAULT_CHUNK_PAGES)
            async with h.mirror.fault(s, e, write=write, timeout_ms=budget) as result:
                self._store(h, result)

    def _store(self, h: Handle, r: RangeResult) -> None:
        """Program the device table from a range fault result (handle lock held)."""
        valid = (r.flags & HMM_PFN_VALID) != 0
        entries = np.where(valid, (r.pfns << np.uint64(PAGE_SHIFT)) | DPT_VALID, np.uint64(0))
        entries[valid & ((r.flags & HMM_PFN_WRITE) != 0)] |= DPT_WRITE
        if self.pool is not None:
            entries[valid & self.pool.contains(r.pfns)] |= DPT_DEVICE
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
        stalled_at = -1  # where a write fault pass last left a page unwritable
        while True:
            self._check_bound(h)
            async with h.lock:
                ent = h.table.gather(start + (done << PAGE_SHIFT), end)
                usable = (ent & usable_bit) != 0
                if write:
                    usable &= (ent & DPT_ATOMIC) == 0
                k = int(np.argmin(usable)) if not usable.all() else len(usable)
                if k:
                    span = slice(done * PAGE_SIZE, (done + k) * PAGE_SIZE)
                    if write:
                        await self._copy_in(ent[:k], data[span])
                    else:
                        out[span] = await self._copy_out(ent[:k])
                    done += k
                own_read_only = write and k < len(ent) and (ent[k] & (DPT_DEVICE | DPT_WRITE)) == DPT_DEVICE
            if done == n:
                return CommandResult(n, faults, bytes(out))
            page = start + (done << PAGE_SHIFT)
            if own_read_only and stalled_at == done:
                # A write fault leaves our own read-only device page as it is (the range
                # fault reports it valid, without WRITE: HMM-SEMANTICS.md 1.2). Bring it
                # home, then the next pass faults a writable system page.
                await self._migrate_to_sys(h, page, page + PAGE_SIZE)
            stalled_at = done  # (no progress for another reason: an invalidation raced the pass)
            await self._fault_pass(h, page, end, write)
            faults += 1

    async def _copy_out(self, entries: np.ndarray) -> bytes:
        """The contents of the pages ``entries`` point at: system pages over DMA, this
        device's own pages from its memory (handle lock held)."""
        assert self.conn is not None
        pfns = entries >> np.uint64(PAGE_SHIFT)
        dev = (entries & DPT_DEVICE) != 0
        if not dev.any():
            return await self.conn.dma_read(pfns)
        assert self.pool is not None
        out = np.empty((len(entries), PAGE_SIZE), dtype=np.uint8)
        out[dev] = np.frombuffer(await self.pool.read(pfns[dev]), dtype=np.uint8).reshape(-1, PAGE_SIZE)
        if (~dev).any():
            out[~dev] = np.frombuffer(await self.conn.dma_read(pfns[~dev]), dtype=np.uint8).reshape(-1, PAGE_SIZE)
        return out.tobytes()

    async def _copy_in(self, entries: np.ndarray, data: bytes) -> None:
        assert self.conn is not None
        pfns = entries >> np.uint64(PAGE_SHIFT)
        dev = (entries & DPT_DEVICE) != 0
        pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        if dev.any():
            assert self.pool is not None
            await self.pool.write(pfns[dev], pages[dev].tobytes())
        if (~dev).any():
            await self.conn.dma_write(pfns[~dev], pages[~dev].tobytes())

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
        # Another device's private page is never valid here, so a valid device page
        # that is not ours is another device's coherent page.
        device = valid & (r.pfns >= np.uint64(self.conn.system_frames if self.conn else 0))
        own = device & self.pool.contains(r.pfns) if self.pool is not None else np.zeros_like(device)
        b[own] |= HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL if self.coherent else HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL
        b[device & ~own] |= HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE
        b[valid & (r.orders == PMD_ORDER)] |= HMM_DMIRROR_PROT_PMD
        b[valid & (r.orders == PUD_ORDER)] |= HMM_DMIRROR_PROT_PUD
        b[(r.flags & HMM_PFN_ERROR) != 0] = HMM_DMIRROR_PROT_ERROR
        return b.tobytes()

    # ---- migration ------------------------------------------------------------------------
    async def _pieces(self, h: Handle, start: int, end: int) -> AsyncIterator[tuple[int, int]]:
        """Pieces of at most 512 pages that never cross a VMA end; EINVAL at a hole or
        an unreadable mapping, checked as each piece is reached, like the driver: the
        pieces before it have migrated by then."""
        assert self.conn is not None
        self._check_bound(h)
        pos = start
        while pos < end:
            try:
                _, vend, vflags = await self.conn.find_vma(h.file.pid, pos)
            except KernelError as e:
                raise KernelError(errno.EINVAL, f"no readable mapping at {pos:#x}") from e
            if not vflags & VM_READ:
                raise KernelError(errno.EINVAL, f"mapping at {pos:#x} is not readable")
            piece_end = min(end, vend, pos + MIGRATE_PIECE_PAGES * PAGE_SIZE)
            yield pos, piece_end
            pos = piece_end

    def _fail_alloc(self, h: Handle) -> bool:
        """FLAGS FAIL_ALLOC: the next allocation of this handle fails, once."""
        if h.flags & FLAG_FAIL_ALLOC:
            h.flags &= ~FLAG_FAIL_ALLOC
            return True
        return False

    async def _migrate_to_dev(self, h: Handle, start: int, end: int) -> CommandResult:
        assert self.conn is not None and self.pool is not None
        async for s, e in self._pieces(h, start, end):
            mig = await self.conn.migrate_setup(h.file.pid, s, e,
                                                MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND,
                                                with_data=True)
            try:
                dst, flags, pages, per_page = await self._alloc_and_copy(h, mig)
                try:
                    moved = unfold(await self.conn.migrate_pages(mig, dst, flags))
                except KernelError:
                    self.pool.free(pages[pages != 0])  # a failed MigratePages took none of them
                    raise
                # Unused destinations come back through page_free.
                async with h.lock:
                    done = np.flatnonzero(moved & (pages != 0))
                    if len(done):
                        entries = (pages[done] << np.uint64(PAGE_SHIFT)) | DPT_VALID | DPT_DEVICE
                        entries[(per_page[done] & MIGRATE_PFN_WRITE) != 0] |= DPT_WRITE
                        ent = h.table.gather(s, e)
                        ent[done] = entries
                        h.table.scatter(s, ent)
            finally:
                await self.conn.migrate_finalize(mig)
        # Read back through the device table, without faulting: ENOENT at a page
        # that did not end up mapped by this handle.
        async with h.lock:
            ent = h.table.gather(start, end)
            if not ((ent & DPT_VALID) != 0).all():
                raise KernelError(errno.ENOENT, "a page is not on this device")
            readback = await self._copy_out(ent)
        return CommandResult((end - start) >> PAGE_SHIFT, 0, readback)

    async def _alloc_and_copy(self, h: Handle, mig: Migration) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                        np.ndarray]:
        """dmirror_migrate_alloc_and_copy(): a device page for every collected entry
        (a block of 512 for a compound one), filled from its source or zeroed.
        FAIL_ALLOC fails the first allocation: a compound entry then gets 512 single
        pages (the daemon splits its source), a single one stays behind. Returns the
        destinations (wire form), and per page the device page and dst flags."""
        assert self.conn is not None and self.pool is not None
        n = mig.npages
        dst = np.zeros(n, dtype=np.uint64)
        flags = np.zeros(n, dtype=np.uint8)
        pages = np.zeros(n, dtype=np.uint64)  # per page: its device page
        per_page = np.zeros(n, dtype=np.uint8)  # per page: VALID (+WRITE) where it has one
        # The setup's reply brought the collected system pages' contents (with_data).
        assert mig.data is not None
        contents = np.zeros((n, PAGE_SIZE), dtype=np.uint8)
        contents[self.conn.data_pages(mig)] = mig.data
        try:
            first = True
            for i in np.flatnonzero((mig.src_flags & MIGRATE_PFN_MIGRATE) != 0).tolist():
                fail = first and self._fail_alloc(h)
                first = False
                write = mig.src_flags[i] & MIGRATE_PFN_WRITE
                if mig.src_flags[i] & MIGRATE_PFN_COMPOUND:
                    block = None if fail else self.pool.alloc_block(h.file.file_id)
                    span = slice(i, i + BLOCK_PAGES)
                    pages[span] = block if block is not None else self.pool.alloc(BLOCK_PAGES, h.file.file_id)
                    per_page[span] = MIGRATE_PFN_VALID | write
                    if block is not None:
                        dst[i], flags[i] = block[0], MIGRATE_PFN_VALID | MIGRATE_PFN_COMPOUND | write
                    else:
                        dst[span], flags[span] = pages[span], MIGRATE_PFN_VALID | write
                elif not fail:
                    pages[i] = self.pool.alloc(1, h.file.file_id)[0]
                    dst[i] = pages[i]
                    per_page[i] = flags[i] = MIGRATE_PFN_VALID | write
            used = np.flatnonzero(pages)
            if len(used):  # holes and the zero page stay zero-filled
                await self.pool.write(pages[used], contents[used].tobytes())
        except BaseException:
            self.pool.free(pages[pages != 0])  # never handed to the daemon: no page_free will come
            raise
        return dst, flags, pages, per_page

    async def _migrate_to_sys(self, h: Handle, start: int, end: int) -> CommandResult:
        assert self.conn is not None
        cpages = 0
        async for s, e in self._pieces(h, start, end):
            mig = await self.conn.migrate_setup(h.file.pid, s, e, self._select_own | MIGRATE_VMA_SELECT_COMPOUND)
            moved = await self._copy_home(h, mig)
            if moved is None:
                raise KernelError(errno.ENOMEM, "could not allocate system memory")
            cpages += moved
        return CommandResult(cpages, 0, b"")

    async def _copy_home(self, h: Handle | None, mig: Migration) -> int | None:
        """Migrate the collected device pages of ``mig`` to new system pages (a THP
        for a compound entry), and finalize. Returns how many pages moved, or None
        when an allocation failed (nothing moved): FAIL_ALLOC fails the first one,
        after which a compound entry falls back to 512 single pages."""
        assert self.conn is not None and self.pool is not None
        sel = ((mig.src_flags & MIGRATE_PFN_MIGRATE) != 0) & ((mig.src_flags & MIGRATE_PFN_VALID) != 0)
        sel &= self.pool.contains(mig.src_pfns)
        idx = np.flatnonzero(sel)
        if not len(idx):
            await self.conn.migrate_finalize(mig)
            return 0
        fail = h is not None and self._fail_alloc(h)
        compound = (mig.src_flags & MIGRATE_PFN_COMPOUND) != 0
        if fail and not compound[idx[0]]:
            await self.conn.migrate_finalize(mig)  # nothing moves
            return None
        src = unfold_pfns(mig.src_pfns, mig.src_flags)
        flags = np.zeros(mig.npages, dtype=np.uint8)
        pages = np.zeros(mig.npages, dtype=bool)
        for k, i in enumerate(idx.tolist()):
            base = MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA | (mig.src_flags[i] & MIGRATE_PFN_WRITE)
            if compound[i]:
                pages[i : i + BLOCK_PAGES] = True
                if fail and k == 0:  # the THP allocation failed: 512 single pages
                    flags[i : i + BLOCK_PAGES] = base
                else:
                    flags[i] = base | MIGRATE_PFN_COMPOUND
            else:
                pages[i] = True
                flags[i] = base
        data = await self.pool.read(src[pages])
        # The entries go now in the handle the pages were migrated by (the kernel's
        # rpage->zone_device_data) and in the migrating process's other handles: the
        # MIGRATE event is our own, which we ignore. Another process that maps one of
        # these pages (fork) hears a CLEAR; one that does not keeps its entries.
        for handle in ([h] if h is not None else []) + [x for x in self.handles.values()
                                                         if x is not h and x.file.pid == mig.pid]:
            async with handle.lock:  # the handle's entries for these pages go now
                for lo, hi in runs(np.flatnonzero(pages)):
                    handle.table.erase(mig.start + (lo << PAGE_SHIFT), mig.start + (hi << PAGE_SHIFT))
        moved = await self.conn.migrate_pages(mig, np.zeros(mig.npages, dtype=np.uint64), flags, data,
                                              finalize=True)
        return int(np.count_nonzero(unfold(moved) & pages))

    async def migrate_to_ram(self, fault: FaultRequest) -> bool:
        """The CPU touched one of our pages: bring that page home, or the whole block
        when the CPU maps it by PMD (the daemon then set the block's migration up)."""
        assert self.conn is not None and self.pool is not None
        file_id = self.pool.migrated_by.get(fault.pfn)
        h = self.handles.get(file_id) if file_id is not None else None
        mig = fault.migration
        if mig is None:
            start = fault.addr & PAGE_MASK
            mig = await self.conn.migrate_setup(fault.pid, start, start + PAGE_SIZE,
                                                MIGRATE_VMA_SELECT_DEVICE_PRIVATE, fault.fault_token)
        return bool(await self._copy_home(h, mig))  # None (out of memory) or 0 fail the access

    async def evict(self) -> int:
        """Move every page of this device's memory that a process maps back to system
        memory (RELEASE, and close), in ranges whose EvictSetup reply fits a message.
        The CLEAR events erase every handle's entries. Returns how many pages moved."""
        assert self.conn is not None and self.pool is not None
        conn, moved = self.conn, 0
        end = conn.device_pfn_base + conn.device_pfn_count
        for lo in range(conn.device_pfn_base, end, conn.evict_pages):
            moved += await self._evict_range(lo, min(conn.evict_pages, end - lo))
        return moved

    async def _evict_range(self, start_pfn: int, npages: int) -> int:
        assert self.conn is not None and self.pool is not None
        ev = await self.conn.evict_setup(start_pfn, npages)
        flags = MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA | (ev.src_flags & MIGRATE_PFN_WRITE)
        # Each MigratePages carries every entry's dst flag besides its share of the
        # contents (dst_pfns are ignored for an eviction: none sent).
        batch = min(EVICT_BATCH_PAGES, self.conn.chunk_pages(PAGE_SIZE, besides=ev.npages))
        try:
            for s in range(0, ev.npages, batch):
                part = np.zeros(ev.npages, dtype=np.uint8)
                part[s : s + batch] = flags[s : s + batch]
                await self.conn.migrate_pages(ev, np.zeros(0, dtype=np.uint64), part,
                                              await self.pool.read(ev.src_pfns[s : s + batch]))
        finally:  # an error puts every page back now rather than holding every mmap lock
            moved = await self.conn.migrate_finalize(ev)
        return int(np.count_nonzero(moved & MIGRATE_PFN_MIGRATE))

    async def detach(self, reason: str) -> None:
        """The daemon is going away: every page comes home first."""
        moved = await self.evict()
        log.info("%s: detached (%s), %d pages evicted", self.name, reason, moved)

    def page_free(self, pfns: np.ndarray) -> None:
        if self.pool is not None:
            self.pool.free(pfns)

    async def _exclusive(self, h: Handle, start: int, end: int) -> CommandResult:
        """Exclusive access page by page (the request carries no owner, so the
        EXCLUSIVE event also erases the page's old entry here), ATOMIC entries
        stored while the pages are locked, then a read back without faulting."""
        assert self.conn is not None
        self._check_bound(h)
        n = (end - start) >> PAGE_SHIFT
        pfns = await self.conn.make_exclusive(h.file.pid, start, n, with_owner=False)
        try:
            async with h.lock:
                entries = (pfns << np.uint64(PAGE_SHIFT)) | DPT_VALID | DPT_WRITE | DPT_ATOMIC
                h.table.scatter(start, entries.astype(np.uint64))
        finally:
            await self.conn.unlock_pages(pfns)
        async with h.lock:
            ent = h.table.gather(start, end)
            if not ((ent & DPT_VALID) != 0).all():
                raise KernelError(errno.ENOENT, "an exclusive entry vanished")
            readback = await self._copy_out(ent)
        return CommandResult(n, 0, readback)

    async def _check_exclusive(self, h: Handle, start: int, end: int) -> CommandResult:
        async with h.lock:
            ent = h.table.gather(start, end)
        if ((ent & DPT_ATOMIC) != 0).any():
            raise KernelError(errno.EPERM, "a page is still held exclusively")
        return CommandResult()

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
