"""Compound (THP, order-9) migration (HMM-SEMANTICS.md §1.3 [newest] COMPOUND rules,
§1.2 own device-private PMD rows; HMM-SELFTESTS.md §1.6, §1.8).

``ThpGpu`` is a driver with device-private memory that asks for compound entries:
it moves a compound entry into 512 aligned device pages (or, told to, into 512
single pages), and brings a PMD-mapped block home as a THP
(SYSTEM_DATA|COMPOUND) or as single pages. Every move is checked against real
byte patterns, with refcounts, mapcounts, RSS, huge marks and page_free.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pytest

from hmm.abi import (
    HMM_PFN_ERROR,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_COMPOUND,
    MIGRATE_VMA_SELECT_DEVICE_COHERENT,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    O_RDWR,
    PMD_ORDER,
    PMD_SHIFT,
    PMD_SIZE,
    PROT_READ,
    PTRS_PER_PTE,
    TASK_SIZE,
    Event,
)
from hmm.errors import KernelError
from hmmd.core.device import Device
from hmmd.core.devmem import DevicePageMap, MemoryKind
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import Kernel
from hmmd.core.migrate import Migration
from hmmd.core.notifier import IntervalNotifier
from hmmd.core.pagetable import (
    PTE_PRESENT,
    PTE_WRITE,
    SWP_DEVICE_PRIVATE,
    SWP_MIGRATION,
    pmd_shape,
    pte_pfn,
    pte_swp_type,
)
from hmmd.core.physmem import ZERO_PFN, Parts

from .conftest import RW, ZERO_PAGE, DeviceRig, Env, FakeDevice, P, add_device, make_env, pattern, raises_errno

H = PTRS_PER_PTE
SYS, DEVP, COH = MIGRATE_VMA_SELECT_SYSTEM, MIGRATE_VMA_SELECT_DEVICE_PRIVATE, MIGRATE_VMA_SELECT_DEVICE_COHERENT
CMP = MIGRATE_VMA_SELECT_COMPOUND
V, M, W, C = MIGRATE_PFN_VALID, MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE, MIGRATE_PFN_COMPOUND
SD = MIGRATE_PFN_SYSTEM_DATA
GPU_PAGES = 4 * H + 8


def u64(a) -> bytes:  # type: ignore[no-untyped-def]
    return np.asarray(a, dtype="<u8").tobytes()


def u8(a) -> bytes:  # type: ignore[no-untyped-def]
    return np.asarray(a, dtype=np.uint8).tobytes()


def swp(ptes: np.ndarray) -> np.ndarray:
    return pte_swp_type(ptes)


def wbit(ptes: np.ndarray) -> np.ndarray:
    return (ptes & PTE_WRITE) != 0


def present(ptes: np.ndarray) -> np.ndarray:
    return (ptes & PTE_PRESENT) != 0


class ThpGpu(FakeDevice):
    """Device-private memory in a dict (device PFN -> page), allocated in aligned
    blocks of 512 or single pages, with a compound-aware migrate_to_ram."""

    def __init__(self) -> None:
        super().__init__()
        self.k: Kernel | None = None
        self.dev: Device | None = None
        self.mem: dict[int, bytes] = {}
        self.freed: list[int] = []
        self.m2r: list[tuple[int, int, int, bool]] = []  # (pid, addr, pfn, handed a compound entry)
        self.thp_home = True  # migrate_to_ram brings a compound entry home as a THP
        self.gate: asyncio.Event | None = None  # migrate_to_ram waits on it

    @property
    def pgmap(self) -> DevicePageMap:
        assert self.dev is not None and self.dev.pgmap is not None
        return self.dev.pgmap

    def page_free(self, pfns: np.ndarray) -> None:
        for pfn in pfns:
            self.freed.append(int(pfn))
            self.mem.pop(int(pfn), None)

    def alloc(self, n: int) -> np.ndarray:
        """``n`` single pages from the top of the memory (blocks stay whole below)."""
        free = np.flatnonzero(self.pgmap.refcount == 0)[::-1][:n]
        assert len(free) == n, "device memory exhausted"
        return (np.sort(free) + self.pgmap.base).astype(np.int64)

    def alloc_block(self) -> np.ndarray:
        for b in range(0, self.pgmap.npages - H + 1, H):
            if not self.pgmap.refcount[b : b + H].any():
                return np.arange(b, b + H, dtype=np.int64) + self.pgmap.base
        raise AssertionError("no free block")

    def dma_read(self, pfns) -> bytes:  # type: ignore[no-untyped-def]
        assert self.k is not None and self.dev is not None
        return b"".join(self.k.dma_read(self.dev, u64(pfns)))

    async def home(self, mig: Migration, *, thp: bool = True) -> np.ndarray:
        """MIGRATE_TO_SYS of every collected device page: a THP for a compound entry
        (512 single pages unless ``thp``), the contents in parts. Finalizes; returns
        the src flags (wire)."""
        assert self.k is not None and self.dev is not None
        src_flags, src_pfns = mig.src_flags, mig.src_pfns
        flags = np.zeros(mig.npages, dtype=np.uint8)
        data = []
        for i in np.flatnonzero(((src_flags & M) != 0) & ((src_flags & V) != 0)).tolist():
            base = V | SD | (src_flags[i] & W)
            if src_flags[i] & C:
                if thp:
                    flags[i] = base | C
                else:
                    flags[i : i + H] = base
                data += [self.mem[int(src_pfns[i]) + j] for j in range(H)]
            else:
                flags[i] = base
                data.append(self.mem[int(src_pfns[i])])
        # In parts cut anywhere, as a MigratePagesStream brings them.
        whole = b"".join(data)
        cuts = [0, *range(3 * P + 1000, len(whole), 7 * P + 3), len(whole)]
        parts = Parts(memoryview(whole)[a:b] for a, b in itertools.pairwise(cuts))
        await self.k.migrate_pages(self.dev, mig.id, u64(np.zeros(mig.npages)), u8(flags), parts)
        await self.k.migrate_finalize(self.dev, mig.id)
        return mig.src_flags

    async def migrate_to_ram(self, pid: int, addr: int, pfn: int, token: int, migration: Migration | None) -> bool:
        assert self.k is not None and self.dev is not None
        if self.gate is not None:
            await self.gate.wait()
        mig = migration if migration is not None else await self.k.migrate_setup(
            self.dev, pid, addr & ~(P - 1), (addr & ~(P - 1)) + P, DEVP, token)
        self.m2r.append((pid, addr, pfn, bool((mig.src_flags & C).any())))
        await self.home(mig, thp=self.thp_home)
        return True


@dataclass
class T(DeviceRig):
    """The conftest env plus /dev/gpu0 (ThpGpu, device-private), opened by the process
    and mirroring its whole address space."""

    env: Env
    gpu: ThpGpu
    dev: Device
    sub: IntervalNotifier

    def huge(self, addr: int, mm=None) -> bool:  # type: ignore[no-untyped-def]
        return (addr >> PMD_SHIFT) in (mm or self.mm).pt.huge

    async def setup(self, start: int, end: int, select: int = SYS | CMP, pid: int | None = None) -> Migration:
        return await self.k.migrate_setup(self.dev, self.env.p.pid if pid is None else pid, start, end, select)

    def copy(self, mig: Migration, i: int, pages: np.ndarray) -> None:
        """The driver's copy of entry ``i`` (per page of a compound one) into ``pages``."""
        if mig.src_flags[i] & V:
            srcs = int(mig.src_pfns[i]) + np.arange(len(pages))
            data = self.gpu.dma_read(srcs)
            for j, pfn in enumerate(pages.tolist()):
                self.gpu.mem[pfn] = data[j * P : (j + 1) * P]
        else:
            for pfn in pages.tolist():
                self.gpu.mem[pfn] = ZERO_PAGE

    async def to_device(self, start: int, end: int, *, split: bool = False) -> tuple[Migration, np.ndarray, np.ndarray]:
        """M2D with compound entries: a block for each (512 single pages if ``split``),
        a single page for every other entry. Returns the migration, the wire src
        flags after pages, and the device page of every page."""
        mig = await self.setup(start, end)
        flags, dst = np.zeros(mig.npages, dtype=np.uint8), np.zeros(mig.npages, dtype=np.int64)
        pages = np.zeros(mig.npages, dtype=np.int64)
        src = mig.src_flags
        for i in np.flatnonzero((src & M) != 0).tolist():
            w = src[i] & W
            if src[i] & C:
                block = self.gpu.alloc(H) if split else self.gpu.alloc_block()
                pages[i : i + H] = block
                self.copy(mig, i, block)
                if split:
                    dst[i : i + H], flags[i : i + H] = block, V | w
                else:
                    dst[i], flags[i] = block[0], V | C | w
            elif not pages[i]:
                pages[i] = dst[i] = self.gpu.alloc(1)[0]
                self.copy(mig, i, pages[i : i + 1])
                flags[i] = V | w
        await self.k.migrate_pages(self.dev, mig.id, u64(dst), u8(flags), b"")
        after = mig.src_flags.copy()
        await self.k.migrate_finalize(self.dev, mig.id)
        return mig, after, pages

    async def range_fault(self, start: int, end: int, default: int, owner: int, *, mine: bool = True):  # type: ignore[no-untyped-def]
        """read_begin + range_fault, again on EBUSY (a fault that migrates a page home
        invalidates the caller's own range)."""
        dev, sub = (self.dev, self.sub) if mine else (self.env.dev, self.env.sub)
        for _ in range(10):
            seq = await self.k.read_begin(dev, sub.id)
            try:
                return await self.k.range_fault(dev, sub.id, seq, start, end, default, 0, b"", owner)
            except KernelError as e:
                if e.errno != errno.EBUSY:
                    raise
        raise AssertionError("range fault kept colliding")


async def make_t() -> T:
    env = await make_env()
    gpu = ThpGpu()
    dev, sub = await add_device(env.k, "gpu0", gpu, MemoryKind.DEVICE_PRIVATE, GPU_PAGES, env.p.pid)
    assert sub is not None
    gpu.k, gpu.dev = env.k, dev
    dev.wants_fault_migration = True  # as dmirror: migrate_to_ram gets the block's migration set up
    return T(env, gpu, dev, sub)


@pytest.fixture
async def t() -> AsyncIterator[T]:
    rig = await make_t()
    yield rig
    await settle()  # (migrations release their mmap locks in the background)
    assert check_invariants(rig.k) == []  # counts, RSS, PMD marks and DMA rights agree


async def thp_window(env: Env, advice: int | None = MADV_HUGEPAGE, prot: int = RW) -> tuple[int, int]:
    """A 2 x PMD anonymous mapping (advised) and the aligned PMD inside it."""
    a = await env.mmap(2 * H, prot=prot)
    if advice is not None:
        await env.k.madvise(env.p.pid, a, 2 * H * P, advice)
    return a, (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)


async def thp(t: T, seed: int) -> tuple[int, bytes]:
    """A THP window written with a pattern: a PMD-mapped order-9 folio."""
    _, w = await thp_window(t.env)
    data = pattern(H, seed)
    await t.env.write(w, data)
    assert t.huge(w)
    return w, data


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def assert_device_pmd(t: T, w: int, pages: np.ndarray, data: bytes, write: bool = True) -> None:
    """[w, w + 2 MiB) is one device-private PMD of the aligned block ``pages`` holding ``data``."""
    ptes = t.ptes(w, w + PMD_SIZE)
    assert (swp(ptes) == SWP_DEVICE_PRIVATE).all() and (wbit(ptes) == write).all()
    assert list(pte_pfn(ptes)) == list(pages) and pages[0] % H == 0
    assert t.huge(w) and pmd_shape(ptes)
    idx = t.pgmap.index(pages)
    assert (t.pgmap.refcount[idx] == 1).all() and (t.pgmap.mapcount[idx] == 1).all()
    assert b"".join(t.gpu.mem[int(p)] for p in pages) == data


# ==== 1. M2D of a THP: one compound entry, a device-private PMD ====================
async def test_m2d_thp_is_one_compound_entry_and_becomes_a_device_pmd(t: T) -> None:
    k, mm = t.k, t.mm
    base = k.ram.used_frames
    w, data = await thp(t, 1)
    frames = pte_pfn(t.ptes(w, w + PMD_SIZE))
    assert mm.rss[0] == H and k.ram.used_frames == base + H

    mig = await t.setup(w, w + PMD_SIZE)
    # The wire form: the head, then 511 zero entries; inside, per page.
    assert mig.src_flags[0] == V | M | W | C and not mig.src_flags[1:].any()
    assert mig.src_pfns[0] == frames[0] and not mig.src_pfns[1:].any()
    assert list(mig.page_pfns) == list(frames) and (mig.page_flags == V | M | W).all()
    assert mig.cpages == H and mig.heads == [0]
    assert not t.huge(w)  # migration entries stand in for the PMD meanwhile
    assert (swp(t.ptes(w, w + PMD_SIZE)) == SWP_MIGRATION).all()
    # Every frame of the folio may be read while the migration holds it.
    assert t.gpu.dma_read(frames) == data

    block = t.gpu.alloc_block()
    t.copy(mig, 0, block)
    dst, flags = np.zeros(H, dtype=np.int64), np.zeros(H, dtype=np.uint8)
    dst[0], flags[0] = block[0], V | W | C
    await k.migrate_pages(t.dev, mig.id, u64(dst), u8(flags), b"")
    assert mig.src_flags[0] == V | M | W | C and not mig.src_flags[1:].any()  # moves whole
    await k.migrate_finalize(t.dev, mig.id)

    assert_device_pmd(t, w, block, data)
    assert mm.rss[0] == H and k.ram.used_frames == base  # the THP's frames were freed
    assert (k.ram.refcount[frames] == 0).all() and (k.ram.mapcount[frames] == 0).all()
    assert t.gpu.freed == []


async def test_own_device_pmd_is_reported_at_order_9_and_another_owners_is_an_error(t: T) -> None:
    w, data = await thp(t, 2)
    _, _, pages = await t.to_device(w, w + PMD_SIZE)
    n_m2r = len(t.gpu.m2r)
    res = await t.range_fault(w, w + PMD_SIZE, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, t.dev.owner)
    assert (res.flags == HMM_PFN_VALID | HMM_PFN_WRITE).all() and (res.orders == PMD_ORDER).all()
    assert list(res.pfns) == list(pages)
    # Another owner: ERROR without a fault request (a snapshot), migrate_to_ram with one.
    res = await t.range_fault(w, w + PMD_SIZE, 0, 0, mine=False)
    assert (res.flags == HMM_PFN_ERROR).all()
    assert len(t.gpu.m2r) == n_m2r and t.huge(w)
    res = await t.range_fault(w + 3 * P, w + 5 * P, HMM_PFN_REQ_FAULT, 0, mine=False)
    assert (res.flags == HMM_PFN_VALID | HMM_PFN_WRITE).all() and (res.orders == PMD_ORDER).all()
    assert len(t.gpu.m2r) == n_m2r + 1 and t.gpu.m2r[-1][3]  # one compound migration home
    assert await t.env.read(w, PMD_SIZE) == data


async def test_cpu_fault_on_a_device_pmd_brings_the_whole_block_home_as_a_thp(t: T) -> None:
    k, mm = t.k, t.mm
    w, data = await thp(t, 3)
    base = k.ram.used_frames
    _, _, pages = await t.to_device(w, w + PMD_SIZE)
    assert k.ram.used_frames == base - H

    assert await t.env.read(w + 7 * P + 5, 11) == data[7 * P + 5 : 7 * P + 16]
    assert len(t.gpu.m2r) == 1 and t.gpu.m2r[0][3]  # the daemon set up the whole block, compound
    ptes = t.ptes(w, w + PMD_SIZE)
    frames = pte_pfn(ptes)
    assert present(ptes).all() and wbit(ptes).all() and t.huge(w) and pmd_shape(ptes)
    assert frames[0] % H == 0 and (np.diff(frames) == 1).all()  # one new order-9 folio
    assert (k.ram.refcount[frames] == 1).all() and (k.ram.mapcount[frames] == 1).all()
    assert sorted(t.gpu.freed) == sorted(pages.tolist())  # every device page freed, once
    assert mm.rss[0] == H and k.ram.used_frames == base
    assert await t.env.read(w, PMD_SIZE) == data
    res = await t.range_fault(w, w + PMD_SIZE, HMM_PFN_REQ_FAULT, t.dev.owner)
    assert (res.orders == PMD_ORDER).all()


async def test_block_home_as_single_pages_splits_the_pmd(t: T) -> None:
    k = t.k
    w, data = await thp(t, 4)
    base = k.ram.used_frames
    await t.to_device(w, w + PMD_SIZE)
    t.gpu.thp_home = False
    assert await t.env.read(w + 100 * P, P) == data[100 * P : 101 * P]
    assert not t.huge(w) and present(t.ptes(w, w + PMD_SIZE)).all()
    assert len(t.gpu.freed) == H and k.ram.used_frames == base
    assert await t.env.read(w, PMD_SIZE) == data


async def test_a_device_that_sets_up_its_own_fault_migration_splits_the_pmd(t: T) -> None:
    w, data = await thp(t, 25)
    await t.to_device(w, w + PMD_SIZE)
    t.dev.wants_fault_migration = False  # it migrates the faulting page only
    assert await t.env.read(w + 5 * P, P) == data[5 * P : 6 * P]
    assert len(t.gpu.m2r) == 1 and not t.gpu.m2r[0][3] and not t.huge(w) and len(t.gpu.freed) == 1
    assert (swp(t.ptes(w, w + PMD_SIZE))[np.arange(H) != 5] == SWP_DEVICE_PRIVATE).all()


async def test_system_thp_falls_back_to_single_frames_when_no_block_is_free(t: T, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    w, data = await thp(t, 5)
    await t.to_device(w, w + PMD_SIZE)
    monkeypatch.setattr(t.k.ram, "alloc_contig", lambda n, zero=True: None)
    assert await t.env.read(w, PMD_SIZE) == data  # SYSTEM_DATA|COMPOUND, but no aligned block
    assert not t.huge(w) and present(t.ptes(w, w + PMD_SIZE)).all()
    assert t.mm.rss[0] == H and len(t.gpu.freed) == H


async def test_concurrent_faults_on_one_device_pmd_migrate_it_once(t: T) -> None:
    w, data = await thp(t, 6)
    await t.to_device(w, w + PMD_SIZE)
    t.gpu.gate = asyncio.Event()
    reads = [asyncio.create_task(t.env.read(w + i * 64 * P, P)) for i in range(4)]
    await settle()
    t.gpu.gate.set()
    got = await asyncio.gather(*reads)
    assert got == [data[i * 64 * P : (i * 64 + 1) * P] for i in range(4)]
    assert len(t.gpu.m2r) == 1 and t.huge(w) and len(t.gpu.freed) == H


# ==== 2. destinations: whole, split, refused =========================================
async def test_fail_alloc_fallback_splits_the_source_into_single_pages(t: T) -> None:
    k, mm = t.k, t.mm
    w, data = await thp(t, 7)
    base = k.ram.used_frames
    mig, after, pages = await t.to_device(w, w + PMD_SIZE, split=True)
    assert (after == V | M | W).all()  # split: one entry per page again
    assert mig.heads == []
    ptes = t.ptes(w, w + PMD_SIZE)
    assert (swp(ptes) == SWP_DEVICE_PRIVATE).all() and list(pte_pfn(ptes)) == list(pages)
    assert not t.huge(w) and mm.rss[0] == H and k.ram.used_frames == base - H
    assert b"".join(t.gpu.mem[int(p)] for p in pages) == data
    # A fault brings one page home (the CPU maps them by PTE now).
    assert await t.env.read(w + 2 * P, P) == data[2 * P : 3 * P]
    assert len(t.gpu.m2r) == 1 and not t.gpu.m2r[0][3] and t.gpu.freed == [int(pages[2])]


async def test_per_page_destinations_move_only_those_pages(t: T) -> None:
    k = t.k
    w, data = await thp(t, 8)
    frames = pte_pfn(t.ptes(w, w + PMD_SIZE))
    mig = await t.setup(w, w + PMD_SIZE)
    pages = t.gpu.alloc(2)
    t.copy(mig, 0, pages)  # the first two pages of the folio
    dst, flags = np.zeros(H, dtype=np.int64), np.zeros(H, dtype=np.uint8)
    dst[:2], flags[:2] = pages, V | W
    await k.migrate_pages(t.dev, mig.id, u64(dst), u8(flags), b"")
    after = mig.src_flags
    assert list(after[:3]) == [V | M | W, V | M | W, V | W] and (after[2:] == V | W).all()
    assert list(mig.src_pfns[:3]) == list(frames[:3])  # split: every page has its own entry
    await k.migrate_finalize(t.dev, mig.id)
    ptes = t.ptes(w, w + PMD_SIZE)
    assert (swp(ptes[:2]) == SWP_DEVICE_PRIVATE).all() and present(ptes[2:]).all()
    assert list(pte_pfn(ptes[2:])) == list(frames[2:]) and not t.huge(w)
    assert (k.ram.mapcount[frames[2:]] == 1).all() and (k.ram.refcount[frames[2:]] == 1).all()
    assert k.ram.refcount[frames[0]] == 0 and t.mm.rss[0] == H
    assert await t.env.read(w, PMD_SIZE) == data


async def test_no_destination_keeps_the_thp_whole_and_mapped_by_pmd(t: T) -> None:
    w, data = await thp(t, 9)
    before = t.ptes(w, w + PMD_SIZE)
    mig = await t.setup(w, w + PMD_SIZE)
    await t.k.migrate_pages(t.dev, mig.id, u64(np.zeros(H)), u8(np.zeros(H)), b"")
    assert mig.src_flags[0] == V | W | C and not mig.src_flags[1:].any()  # still one entry, not moving
    await t.k.migrate_finalize(t.dev, mig.id)
    assert (t.ptes(w, w + PMD_SIZE) == before).all() and t.huge(w)
    assert await t.env.read(w, PMD_SIZE) == data


async def test_rollback_maps_the_thp_by_pmd_again(t: T) -> None:
    w, data = await thp(t, 10)
    before = t.ptes(w, w + PMD_SIZE)
    mig = await t.setup(w, w + PMD_SIZE)
    t.k._end_migration(t.dev, mig, rollback=True)  # the device is gone, say
    assert (t.ptes(w, w + PMD_SIZE) == before).all() and t.huge(w)
    assert await t.env.read(w, PMD_SIZE) == data


async def test_compound_destination_for_a_single_source_is_refused(t: T) -> None:
    k = t.k
    a = await t.env.mmap(2 * H)
    w = (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    data = pattern(H, 11)
    await t.env.write(w, data)  # no MADV_HUGEPAGE: 512 single pages
    assert not t.huge(w)
    mig = await t.setup(w, w + PMD_SIZE)
    assert mig.heads == [] and (mig.src_flags == V | M | W).all()
    block = t.gpu.alloc_block()
    dst, flags = np.zeros(H, dtype=np.int64), np.zeros(H, dtype=np.uint8)
    dst[0], flags[0] = block[0], V | W | C
    await k.migrate_pages(t.dev, mig.id, u64(dst), u8(flags), b"")
    assert not (mig.src_flags & M).any()
    assert sorted(t.gpu.freed) == sorted(block.tolist())  # the unused block went back
    await k.migrate_finalize(t.dev, mig.id)
    assert present(t.ptes(w, w + PMD_SIZE)).all() and not t.pgmap.refcount.any()
    assert await t.env.read(w, PMD_SIZE) == data


async def test_malformed_compound_destinations_change_nothing(t: T) -> None:
    k = t.k
    w, data = await thp(t, 12)
    mig = await t.setup(w, w + PMD_SIZE)
    block = t.gpu.alloc_block()
    for dst0, tail in ((block[0], True), (block[1], False)):  # a tail entry set; an unaligned block
        dst, flags = np.zeros(H, dtype=np.int64), np.zeros(H, dtype=np.uint8)
        dst[0], flags[0] = dst0, V | C
        if tail:
            dst[5], flags[5] = block[5], V
        with raises_errno(errno.EINVAL):
            await k.migrate_pages(t.dev, mig.id, u64(dst), u8(flags), b"")
    flags = np.zeros(H, dtype=np.uint8)
    flags[0] = V | SD | C
    with raises_errno(errno.EINVAL):  # a compound SYSTEM_DATA entry carries 512 pages
        await k.migrate_pages(t.dev, mig.id, u64(np.zeros(H)), u8(flags), bytes(P))
    assert not t.pgmap.refcount.any() and not mig.pages_done
    await k.migrate_finalize(t.dev, mig.id)
    assert t.huge(w) and await t.env.read(w, PMD_SIZE) == data


# ==== 3. holes: the huge zero page and empty THP-enabled spans ========================
async def test_empty_thp_span_is_a_compound_hole_only_where_thp_is_enabled(t: T) -> None:
    a1, w1 = await thp_window(t.env)
    mig = await t.setup(w1, w1 + PMD_SIZE)
    assert mig.src_flags[0] == M | C and not mig.src_flags[1:].any() and mig.cpages == H
    await t.k.migrate_finalize(t.dev, mig.id)
    a2, w2 = await thp_window(t.env, advice=MADV_NOHUGEPAGE)
    mig = await t.setup(w2, w2 + PMD_SIZE)
    assert (mig.src_flags == M).all() and mig.heads == []  # holes, one by one
    await t.k.migrate_finalize(t.dev, mig.id)
    mig = await t.setup(w1, w1 + PMD_SIZE, SYS)  # no SELECT_COMPOUND
    assert (mig.src_flags == M).all() and mig.heads == []
    await t.k.migrate_finalize(t.dev, mig.id)
    mig = await t.setup(w1 + P, w1 + PMD_SIZE + P)  # not a whole aligned span
    assert (mig.src_flags == M).all() and mig.heads == []
    await t.k.migrate_finalize(t.dev, mig.id)


async def test_compound_hole_fills_a_device_pmd(t: T) -> None:
    mm = t.mm
    for prot in (RW, PROT_READ):
        _, w = await thp_window(t.env, prot=prot)
        t.env.fake.take()
        mig, after, pages = await t.to_device(w, w + PMD_SIZE)
        assert after[0] == M | C and not after[1:].any()
        # One MIGRATE window at pages for the fill (after setup's), owner the device.
        assert [e for e in t.env.fake.take() if e[0] == Event.MIGRATE] == [(Event.MIGRATE, w, w + PMD_SIZE)] * 2
        assert_device_pmd(t, w, pages, bytes(PMD_SIZE), write=prot == RW)
    assert mm.rss[0] == 2 * H
    assert await t.env.read(w, PMD_SIZE) == bytes(PMD_SIZE)  # read-only: home as a read-only THP
    ptes = t.ptes(w, w + PMD_SIZE)
    assert t.huge(w) and present(ptes).all() and not wbit(ptes).any() and mm.rss[0] == 2 * H


async def test_huge_zero_page_is_a_compound_hole_with_select_system(t: T) -> None:
    _, w = await thp_window(t.env, prot=PROT_READ)
    assert await t.env.read(w, 4) == bytes(4)  # the huge zero page
    assert t.huge(w) and (pte_pfn(t.ptes(w, w + PMD_SIZE)) == ZERO_PFN).all()
    mig = await t.setup(w, w + PMD_SIZE, DEVP | CMP)  # not selected without SELECT_SYSTEM
    assert not mig.src_flags.any() and t.huge(w)
    await t.k.migrate_finalize(t.dev, mig.id)
    mig, after, pages = await t.to_device(w, w + PMD_SIZE)
    assert after[0] == M | C
    assert_device_pmd(t, w, pages, bytes(PMD_SIZE), write=False)
    assert t.mm.rss[0] == H


async def test_compound_hole_split_fills_single_pages(t: T) -> None:
    _, w = await thp_window(t.env, prot=PROT_READ)
    await t.env.read(w, 4)
    mig, after, pages = await t.to_device(w, w + PMD_SIZE, split=True)
    assert (after == M).all()
    ptes = t.ptes(w, w + PMD_SIZE)
    assert (swp(ptes) == SWP_DEVICE_PRIVATE).all() and list(pte_pfn(ptes)) == list(pages)
    assert not t.huge(w) and t.mm.rss[0] == H
    assert await t.env.read(w + 2 * P, 8) == bytes(8) and len(t.gpu.freed) == 1


async def test_compound_hole_is_refused_when_the_cpu_filled_it_meanwhile(t: T) -> None:
    _, w = await thp_window(t.env)
    mig = await t.setup(w, w + PMD_SIZE)
    assert mig.heads == [0]
    await t.env.write(w + 9 * P, b"cpu")  # the CPU wins: a THP (the hole had no migration entry)
    assert t.huge(w)
    block = t.gpu.alloc_block()
    dst, flags = np.zeros(H, dtype=np.int64), np.zeros(H, dtype=np.uint8)
    dst[0], flags[0] = block[0], V | C
    await t.k.migrate_pages(t.dev, mig.id, u64(dst), u8(flags), b"")
    await t.k.migrate_finalize(t.dev, mig.id)
    assert not (mig.src_flags & M).any() and sorted(t.gpu.freed) == sorted(block.tolist())
    assert present(t.ptes(w, w + PMD_SIZE)).all() and t.huge(w) and not t.pgmap.refcount.any()
    assert t.mm.rss[0] == H and await t.env.read(w + 9 * P, 3) == b"cpu"


async def test_holes_a_thp_fault_outside_the_range_filled_meanwhile_do_not_migrate(t: T) -> None:
    """Part of an empty THP span migrates: its holes have no migration entry, so a
    write elsewhere in the span maps the whole 2 MiB as a THP meanwhile, and the pages
    step finds them populated (migrate_vma_insert_page gives up): nothing moves, the
    CPU's THP stays, the destinations go back to the device."""
    _, w = await thp_window(t.env)
    mig = await t.setup(w, w + 16 * P)
    assert mig.heads == [] and ((mig.src_flags & M) != 0).all()
    await t.env.write(w + 100 * P, b"cpu")
    assert t.huge(w)
    block = t.gpu.alloc(16)
    await t.k.migrate_pages(t.dev, mig.id, u64(block), u8(np.full(16, V | W)), b"")
    await t.k.migrate_finalize(t.dev, mig.id)
    assert not (mig.src_flags & M).any() and sorted(t.gpu.freed) == sorted(block.tolist())
    assert present(t.ptes(w, w + PMD_SIZE)).all() and t.huge(w) and not t.pgmap.refcount.any()
    assert await t.env.read(w, 16 * P) == bytes(16 * P) and await t.env.read(w + 100 * P, 3) == b"cpu"
    check_invariants(t.k)


async def test_compound_hole_of_the_huge_zero_page_a_read_fault_put_there_is_filled(t: T) -> None:
    _, w = await thp_window(t.env, prot=PROT_READ)
    mig = await t.setup(w, w + PMD_SIZE)
    assert await t.env.read(w, 8) == bytes(8)  # the huge zero page, meanwhile
    assert t.huge(w)
    block = t.gpu.alloc_block()
    t.copy(mig, 0, block)
    dst, flags = np.zeros(H, dtype=np.int64), np.zeros(H, dtype=np.uint8)
    dst[0], flags[0] = block[0], V | C
    await t.k.migrate_pages(t.dev, mig.id, u64(dst), u8(flags), b"")
    await t.k.migrate_finalize(t.dev, mig.id)
    assert_device_pmd(t, w, block, bytes(PMD_SIZE), write=False)
    assert t.mm.rss[0] == H


# ==== 4. M2S of a device PMD ===========================================================
async def test_m2s_of_a_device_pmd_whole_and_split(t: T) -> None:
    k = t.k
    for thp_dst in (True, False):
        w, data = await thp(t, 13 + thp_dst)
        _, _, pages = await t.to_device(w, w + PMD_SIZE)
        freed = len(t.gpu.freed)
        mig = await t.setup(w, w + PMD_SIZE, DEVP | CMP)
        assert mig.src_flags[0] == V | M | W | C and mig.src_pfns[0] == pages[0] and not mig.src_flags[1:].any()
        after = await t.gpu.home(mig, thp=thp_dst)
        assert (after[0] & M) and (after[1:] == (0 if thp_dst else V | M | W)).all()
        assert t.huge(w) == thp_dst and present(t.ptes(w, w + PMD_SIZE)).all()
        assert len(t.gpu.freed) == freed + H and t.mm.rss[0] == H
        assert await t.env.read(w, PMD_SIZE) == data
        assert not t.gpu.m2r
        await k.munmap(t.env.p.pid, w, PMD_SIZE)
    assert t.mm.rss[0] == 0 and not t.pgmap.refcount.any()


# ==== 5. everything else that changes a device PMD's entries ============================
async def test_partial_munmap_of_a_device_pmd_splits_it_and_frees_that_part(t: T) -> None:
    k = t.k
    w, data = await thp(t, 15)
    _, _, pages = await t.to_device(w, w + PMD_SIZE)
    await k.munmap(t.env.p.pid, w + PMD_SIZE // 4, PMD_SIZE // 2)
    assert not t.huge(w) and t.mm.rss[0] == H // 2
    assert sorted(t.gpu.freed) == sorted(pages[H // 4 : 3 * H // 4].tolist())
    assert await t.env.read(w, PMD_SIZE // 4) == data[: PMD_SIZE // 4]  # page by page home
    assert await t.env.read(w + 3 * PMD_SIZE // 4, PMD_SIZE // 4) == data[3 * PMD_SIZE // 4 :]
    assert len(t.gpu.m2r) == H // 2 and not any(c for *_, c in t.gpu.m2r)
    assert not t.pgmap.refcount.any() and t.mm.rss[0] == H // 2


async def test_whole_munmap_and_dontneed_free_every_device_page(t: T) -> None:
    k = t.k
    for how in ("munmap", "dontneed"):
        w, _ = await thp(t, 16)
        await t.to_device(w, w + PMD_SIZE)
        t.gpu.freed.clear()
        if how == "munmap":
            await k.munmap(t.env.p.pid, w, PMD_SIZE)
        else:
            await k.madvise(t.env.p.pid, w, PMD_SIZE, MADV_DONTNEED)
        assert len(t.gpu.freed) == H and not t.huge(w) and not t.ptes(w, w + PMD_SIZE).any()
        assert t.mm.rss[0] == 0 and not t.pgmap.refcount.any()


async def test_madvise_free_and_mprotect_of_a_device_pmd(t: T) -> None:
    k = t.k
    w, data = await thp(t, 17)
    await t.to_device(w, w + PMD_SIZE)
    await k.mprotect(t.env.p.pid, w, PMD_SIZE, PROT_READ)  # the whole PMD: stays one
    ptes = t.ptes(w, w + PMD_SIZE)
    assert t.huge(w) and not wbit(ptes).any() and (swp(ptes) == SWP_DEVICE_PRIVATE).all()
    res = await t.range_fault(w, w + P, HMM_PFN_REQ_FAULT, t.dev.owner)
    assert list(res.flags) == [HMM_PFN_VALID] and list(res.orders) == [PMD_ORDER]
    await k.mprotect(t.env.p.pid, w, P, RW)  # part of it: split
    assert not t.huge(w)
    await k.mprotect(t.env.p.pid, w, PMD_SIZE, RW)
    await k.madvise(t.env.p.pid, w, PMD_SIZE, MADV_FREE)  # device pages are not freed by it
    assert (swp(t.ptes(w, w + PMD_SIZE)) == SWP_DEVICE_PRIVATE).all() and not t.gpu.freed
    assert await t.env.read(w, PMD_SIZE) == data


async def test_madvise_hugepage_on_part_of_a_pmd_splits_it(t: T) -> None:
    w, data = await thp(t, 18)
    await t.to_device(w, w + PMD_SIZE)
    await t.k.madvise(t.env.p.pid, w, PMD_SIZE // 2, MADV_NOHUGEPAGE)  # a VMA boundary inside
    assert not t.huge(w)
    assert await t.env.read(w + PMD_SIZE - P, P) == data[-P:]
    assert len(t.gpu.m2r) == 1 and not t.gpu.m2r[0][3]  # one page: no PMD any more


async def test_mremap_moves_a_device_pmd_page_by_page(t: T) -> None:
    k = t.k
    w, data = await thp(t, 19)
    _, _, pages = await t.to_device(w, w + PMD_SIZE)
    dest = await t.env.mmap(3 * H)
    dest = (dest + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    new = await k.mremap(t.env.p.pid, w, PMD_SIZE, PMD_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, dest + 5 * P)
    ptes = t.ptes(new, new + PMD_SIZE)
    assert list(pte_pfn(ptes)) == list(pages) and not t.huge(w) and not t.huge(new)
    assert t.mm.rss[0] == H and await t.env.read(new, PMD_SIZE) == data


async def test_fork_shares_a_device_pmd_read_only_and_a_fault_brings_it_home_for_both(t: T) -> None:
    k = t.k
    w, data = await thp(t, 20)
    _, _, pages = await t.to_device(w, w + PMD_SIZE)
    child = await k.fork(t.env.p.pid)
    for mm in (t.mm, child.mm):
        ptes = t.ptes(w, w + PMD_SIZE, mm)
        assert t.huge(w, mm) and not wbit(ptes).any() and list(pte_pfn(ptes)) == list(pages)
    idx = t.pgmap.index(pages)
    assert (t.pgmap.refcount[idx] == 2).all() and (t.pgmap.mapcount[idx] == 2).all()
    assert child.mm.rss[0] == H
    # The child's access migrates the block home for both (CLEAR in the parent).
    assert await k.read(child.pid, w + 9 * P, P) == data[9 * P : 10 * P]
    assert len(t.gpu.m2r) == 1 and t.gpu.m2r[0][3] and sorted(t.gpu.freed) == sorted(pages.tolist())
    cp, pp = t.ptes(w, w + PMD_SIZE, child.mm), t.ptes(w, w + PMD_SIZE)
    assert present(cp).all() and (pte_pfn(cp) == pte_pfn(pp)).all() and present(pp).all()
    frames = pte_pfn(cp)
    assert (k.ram.refcount[frames] == 2).all() and (k.ram.mapcount[frames] == 2).all()
    assert t.huge(w, child.mm) and not t.huge(w)
    await t.env.write(w, b"parent")  # copy-on-write: the child keeps the data
    assert await k.read(child.pid, w, PMD_SIZE) == data
    assert await t.env.read(w, 6) == b"parent" and await t.env.read(w + P, PMD_SIZE - P) == data[P:]
    assert t.mm.rss[0] == H and child.mm.rss[0] == H


async def test_eviction_moves_a_device_pmd_home_page_by_page(t: T) -> None:
    from hmmd.core.evict import migrate_device_finalize, migrate_device_pages, migrate_device_setup

    k = t.k
    w, data = await thp(t, 21)
    _, _, pages = await t.to_device(w, w + PMD_SIZE)
    t.env.fake.take()
    async with t.mm.lock.read():
        ev = await migrate_device_setup(t.pgmap, [t.mm])
        assert list(ev.src_pfns) == list(pages) and not t.huge(w)
        payload = Parts(t.gpu.mem[int(p)] for p in ev.src_pfns)  # (a MigratePagesStream's)
        migrate_device_pages(ev, np.full(ev.npages, V | SD, dtype=np.uint8), payload, k.ram)
        migrate_device_finalize(ev)
    assert t.env.fake.take() == [(Event.CLEAR, w, w + PMD_SIZE)]
    assert present(t.ptes(w, w + PMD_SIZE)).all() and not t.huge(w)
    assert len(t.gpu.freed) == H and t.mm.rss[0] == H
    assert await t.env.read(w, PMD_SIZE) == data


async def test_evicting_part_of_a_device_pmd_announces_the_split(t: T) -> None:
    from hmmd.core.evict import migrate_device_finalize, migrate_device_pages, migrate_device_setup

    w, data = await thp(t, 34)
    _, _, pages = await t.to_device(w, w + PMD_SIZE)
    t.env.fake.take()
    lo = int(pages[0]) + 8
    async with t.mm.lock.read():
        ev = await migrate_device_setup(t.pgmap, [t.mm], span=(lo, lo + 4))
        assert list(ev.src_pfns) == list(pages[8:12])
        payload = b"".join(t.gpu.mem[int(p)] for p in ev.src_pfns)
        migrate_device_pages(ev, np.full(ev.npages, V | SD, dtype=np.uint8), payload, t.k.ram)
        migrate_device_finalize(ev)
    # __split_huge_pmd's CLEAR over the block, then the eviction's over what it moves.
    assert t.env.fake.take() == [(Event.CLEAR, w, w + PMD_SIZE), (Event.CLEAR, w + 8 * P, w + 12 * P)]
    ptes = t.ptes(w, w + PMD_SIZE)
    assert not t.huge(w) and present(ptes[8:12]).all()
    assert (swp(ptes[:8]) == SWP_DEVICE_PRIVATE).all() and (swp(ptes[12:]) == SWP_DEVICE_PRIVATE).all()
    assert await t.env.read(w, PMD_SIZE) == data


async def test_exclusive_access_splits_a_thp(t: T) -> None:
    w, data = await thp(t, 22)
    pfns = await t.k.make_exclusive(t.dev, t.env.p.pid, w + 3 * P, 1, True)
    t.k.unlock_pages(t.dev, u64(pfns))
    assert not t.huge(w)
    assert await t.env.read(w, PMD_SIZE) == data


async def test_a_migration_of_part_of_a_thp_announces_the_split_and_a_whole_one_does_not(t: T) -> None:
    w, data = await thp(t, 31)
    t.env.fake.take()
    mig = await t.setup(w + P, w + 3 * P, SYS)
    await t.k.migrate_finalize(t.dev, mig.id)  # (nothing moves)
    assert t.env.fake.take() == [(Event.MIGRATE, w + P, w + 3 * P), (Event.CLEAR, w, w + PMD_SIZE)]
    w2, _ = await thp(t, 32)
    t.env.fake.take()
    await t.to_device(w2, w2 + PMD_SIZE)  # a compound entry: the folio moves whole
    assert [e for e, _, _ in t.env.fake.take()] == [Event.MIGRATE]
    assert await t.env.read(w, PMD_SIZE) == data


async def test_migrating_part_of_a_fork_shared_thp_announces_the_split_in_the_other_process(t: T) -> None:
    k = t.k
    w, data = await thp(t, 33)
    child = await k.fork(t.env.p.pid)
    assert t.huge(w, child.mm)
    theirs = await k.insert_notifier(t.env.dev, child.pid, 0, TASK_SIZE)
    t.env.fake.take()
    mig = await t.setup(w + P, w + 3 * P, SYS)
    heard = t.env.fake.events
    # Here: the MIGRATE, then the split. In the child (try_to_migrate of the split
    # folio): the split's CLEAR over the block, then the CLEAR that unmaps the pages.
    assert [e.key for e in heard if e.notifier == t.env.sub.id] == [
        (Event.MIGRATE, w + P, w + 3 * P), (Event.CLEAR, w, w + PMD_SIZE)]
    assert [e.key for e in heard if e.notifier == theirs.id] == [
        (Event.CLEAR, w, w + PMD_SIZE), (Event.CLEAR, w + P, w + 3 * P)]
    assert not t.huge(w, child.mm) and (swp(t.ptes(w + P, w + 3 * P, child.mm)) == SWP_MIGRATION).all()
    await k.migrate_finalize(t.dev, mig.id)  # (nothing moves: both map the pages again)
    assert await k.read(child.pid, w, PMD_SIZE) == data and await t.env.read(w, PMD_SIZE) == data


async def test_fork_with_a_pinned_page_splits_the_thp(t: T) -> None:
    k = t.k
    w, data = await thp(t, 23)
    pin = await k.pin_user_pages(t.env.p.pid, w + 4 * P, 1, write=True, longterm=False, hold=True)
    t.env.fake.take()
    child = await k.fork(t.env.p.pid)
    assert not t.huge(w) and not t.huge(w, child.mm)
    # copy_huge_pmd: the split (CLEAR over the 2 MiB) inside fork's PROTECTION_PAGE.
    heard = t.env.fake.take()
    assert (Event.CLEAR, w, w + PMD_SIZE) in heard and heard[0][0] == Event.PROTECTION_PAGE
    assert await k.read(child.pid, w, PMD_SIZE) == data
    k.unpin_user_pages(t.env.p.pid, pin)


# ==== 6. coherent memory: a coherent THP ================================================
async def test_coherent_thp_moves_whole_both_ways() -> None:
    from tests.core.test_coherent import CoherentDevice

    env = await make_env(Kernel(64 << 20, coherent_bytes=16 << 20))
    coh = CoherentDevice()
    dev = env.k.register_device("coh0", coh, MemoryKind.DEVICE_COHERENT, 2 * H)
    coh.k, coh.dev = env.k, dev
    await env.k.open(env.p.pid, "/dev/coh0", O_RDWR)
    k, pgmap = env.k, coh.pgmap
    _, w = await thp_window(env)
    data = pattern(H, 24)
    await env.write(w, data)
    frames = pte_pfn(env.ptes(w, w + PMD_SIZE))

    mig = await k.migrate_setup(dev, env.p.pid, w, w + PMD_SIZE, SYS | CMP)
    assert mig.src_flags[0] == V | M | W | C
    first = (-pgmap.base) % H  # an aligned block of the coherent frames
    block = np.arange(first, first + H, dtype=np.int64) + pgmap.base
    coh.dma_write(block, coh.dma_read(frames))
    dst, flags = np.zeros(H, dtype=np.int64), np.zeros(H, dtype=np.uint8)
    dst[0], flags[0] = block[0], V | W | C
    await k.migrate_pages(dev, mig.id, u64(dst), u8(flags), b"")
    await k.migrate_finalize(dev, mig.id)
    ptes = env.ptes(w, w + PMD_SIZE)
    assert present(ptes).all() and list(pte_pfn(ptes)) == list(block) and (w >> PMD_SHIFT) in env.mm.pt.huge
    assert (pgmap.refcount[pgmap.index(block)] == 1).all() and env.mm.rss[0] == H
    res = await env.fault(w, w + PMD_SIZE, HMM_PFN_REQ_FAULT)
    assert (res.orders == PMD_ORDER).all() and (res.flags == HMM_PFN_VALID | HMM_PFN_WRITE).all()
    assert await env.read(w, PMD_SIZE) == data  # in place

    mig = await k.migrate_setup(dev, env.p.pid, w, w + PMD_SIZE, COH | CMP)
    assert mig.src_flags[0] == V | M | W | C and mig.src_pfns[0] == block[0]
    flags = np.zeros(H, dtype=np.uint8)
    flags[0] = V | SD | C
    await k.migrate_pages(dev, mig.id, u64(np.zeros(H)), u8(flags), coh.dma_read(block))
    await k.migrate_finalize(dev, mig.id)
    ptes = env.ptes(w, w + PMD_SIZE)
    assert present(ptes).all() and (pte_pfn(ptes) < k.ram.nframes).all() and (w >> PMD_SHIFT) in env.mm.pt.huge
    assert sorted(coh.freed) == sorted(block.tolist()) and not pgmap.refcount.any()
    assert await env.read(w, PMD_SIZE) == data and env.mm.rss[0] == H
    await settle()
    assert check_invariants(k) == []
