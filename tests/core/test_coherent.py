"""MEMORY_DEVICE_COHERENT (HMM-SEMANTICS.md §1.3, §1.4, §1.6, §2.2): device pages the
CPU maps with ordinary present PTEs.

Coherent pages are frames of the device-coherent window above system RAM
(``PhysMem`` frames [nframes, span)). ``CoherentDevice`` is a driver with such
memory: it allocates destinations among its free window frames, copies with DMA
(the collected system pages it was granted, and its own frames, which it may
always reach), and records page_free. It has no migrate_to_ram worth the name:
the CPU never faults on a coherent page, so any call is a test failure.
Every move is checked against real byte patterns.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pytest

from hmm.abi import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    MADV_COLLAPSE,
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_DEVICE_COHERENT,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    O_RDWR,
    PMD_SIZE,
    PROT_READ,
    PTRS_PER_PTE,
    Event,
)
from hmmd.core.device import Device
from hmmd.core.devmem import DevicePageMap, MemoryKind
from hmmd.core.gup import PM_FILE, PM_MMAP_EXCLUSIVE, PM_PFRAME_MASK, PM_PRESENT, PM_SWAP
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import Kernel
from hmmd.core.migrate import Migration
from hmmd.core.notifier import IntervalNotifier
from hmmd.core.pagetable import PTE_PRESENT, PTE_WRITE, SWP_MIGRATION, pte_pfn, pte_swp_type
from hmmd.core.physmem import PG_ANON, PG_LOCKED

from .conftest import (
    RAM_BYTES,
    RW,
    ZERO_PAGE,
    DeviceRig,
    Env,
    FakeDevice,
    P,
    add_device,
    make_env,
    page,
    pattern,
    raises_errno,
)
from .test_migrate import settle

SYS = MIGRATE_VMA_SELECT_SYSTEM
COH = MIGRATE_VMA_SELECT_DEVICE_COHERENT
DEVP = MIGRATE_VMA_SELECT_DEVICE_PRIVATE
V, M, W = MIGRATE_PFN_VALID, MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE
SD = MIGRATE_PFN_SYSTEM_DATA
COH_PAGES = 32
WINDOW_PAGES = 4 * COH_PAGES


def u64(a) -> bytes:  # type: ignore[no-untyped-def]
    return np.asarray(a, dtype="<u8").tobytes()


def u8(a) -> bytes:  # type: ignore[no-untyped-def]
    return np.asarray(a, dtype=np.uint8).tobytes()


def present(ptes: np.ndarray) -> np.ndarray:
    return (ptes & PTE_PRESENT) != 0


def wbit(ptes: np.ndarray) -> np.ndarray:
    return (ptes & PTE_WRITE) != 0


class CoherentDevice(FakeDevice):
    """A FakeDevice with DEVICE_COHERENT memory: its pages' contents are RAM's frames."""

    def __init__(self) -> None:
        super().__init__()
        self.k: Kernel | None = None
        self.dev: Device | None = None
        self.freed: list[int] = []
        self.m2r_calls: list[tuple[int, int, int]] = []

    @property
    def pgmap(self) -> DevicePageMap:
        assert self.dev is not None and self.dev.pgmap is not None
        return self.dev.pgmap

    def page_free(self, pfns: np.ndarray) -> None:
        self.freed.extend(int(p) for p in pfns)

    async def migrate_to_ram(self, pid: int, addr: int, pfn: int, token: int, migration: Migration | None) -> bool:
        self.m2r_calls.append((pid, addr, pfn))  # never expected: coherent pages are present
        return False

    def alloc(self, n: int) -> np.ndarray:
        free = np.flatnonzero(self.pgmap.refcount == 0)[:n]
        assert len(free) == n, "device memory exhausted"
        return (free + self.pgmap.base).astype(np.int64)

    def dma_read(self, pfns) -> bytes:  # type: ignore[no-untyped-def]
        assert self.k is not None and self.dev is not None
        return b"".join(self.k.dma_read(self.dev, u64(pfns)))

    def dma_write(self, pfns, data: bytes) -> None:  # type: ignore[no-untyped-def]
        assert self.k is not None and self.dev is not None
        self.k.dma_write(self.dev, u64(pfns), data)


async def add_coherent(k: Kernel, name: str, npages: int = COH_PAGES, pid: int | None = None
                       ) -> tuple[CoherentDevice, Device, IntervalNotifier | None]:
    """Register a coherent device; with ``pid``, that process opens it and the device
    mirrors its whole address space."""
    ops = CoherentDevice()
    dev, sub = await add_device(k, name, ops, MemoryKind.DEVICE_COHERENT, npages, pid)
    ops.k, ops.dev = k, dev
    return ops, dev, sub


@dataclass
class C(DeviceRig):
    """The conftest env (process + /dev/fake0, a plain mirror without memory) plus
    /dev/coh0 with coherent memory, opened by the process and mirroring it."""

    env: Env
    coh: CoherentDevice
    dev: Device
    sub: IntervalNotifier

    async def setup(self, start: int, end: int, select: int = SYS, dev: Device | None = None) -> Migration:
        return await self.k.migrate_setup(dev or self.dev, self.p.pid, start, end, select)

    async def to_coherent(self, start: int, end: int, skip: tuple[int, ...] = (),
                          coh: CoherentDevice | None = None) -> tuple[Migration, np.ndarray]:
        """A whole migration to coherent memory: setup(SYSTEM), the driver's copy (DMA
        from each collected frame, zeros for holes, DMA to its own frames), pages,
        finalize. Returns the migration and the destinations."""
        coh = coh or self.coh
        assert coh.dev is not None
        mig = await self.setup(start, end, SYS, coh.dev)
        sel = (mig.src_flags & M) != 0
        sel[list(skip)] = False
        dst = np.zeros(mig.npages, dtype=np.int64)
        dst[sel] = coh.alloc(int(sel.sum()))
        for i in np.flatnonzero(sel):
            data = coh.dma_read([mig.src_pfns[i]]) if mig.src_flags[i] & V else ZERO_PAGE
            coh.dma_write([dst[i]], data)
        await self.k.migrate_pages(coh.dev, mig.id, u64(dst), u8(np.where(sel, V | W, 0)), b"")
        await self.k.migrate_finalize(coh.dev, mig.id)
        return mig, dst

    async def to_system(self, start: int, end: int) -> Migration:
        """MIGRATE_TO_SYS: setup(DEVICE_COHERENT), the driver reads its own frames, and
        hands the contents over as SYSTEM_DATA."""
        mig = await self.setup(start, end, COH)
        sel = ((mig.src_flags & M) != 0) & ((mig.src_flags & V) != 0)
        payload = self.coh.dma_read(mig.src_pfns[sel]) if sel.any() else b""
        await self.k.migrate_pages(self.dev, mig.id, u64(np.zeros(mig.npages)), u8(np.where(sel, V | SD, 0)),
                                   payload)
        await self.k.migrate_finalize(self.dev, mig.id)
        return mig

    async def range_fault(self, start: int, end: int, default: int, owner: int = 0, *,
                          dev: Device | None = None, sub: IntervalNotifier | None = None):  # type: ignore[no-untyped-def]
        dev, sub = dev or self.env.dev, sub or self.env.sub
        seq = await self.k.read_begin(dev, sub.id)
        return await self.k.range_fault(dev, sub.id, seq, start, end, default, 0, b"", owner)


async def make_c(window_pages: int = WINDOW_PAGES) -> C:
    env = await make_env(Kernel(RAM_BYTES, coherent_bytes=window_pages * P))
    coh, dev, sub = await add_coherent(env.k, "coh0", pid=env.p.pid)
    assert sub is not None
    return C(env, coh, dev, sub)


@pytest.fixture
async def c() -> AsyncIterator[C]:
    """The rig; afterwards every count the core keeps must match the page tables."""
    rig = await make_c()
    yield rig
    await drain(rig.k)
    assert check_invariants(rig.k) == []


async def filled(c: C, npages: int, seed: int, flags: int = MAP_PRIVATE | MAP_ANONYMOUS) -> tuple[int, bytes]:
    a = await c.env.mmap(npages, flags=flags)
    data = pattern(npages, seed)
    await c.env.write(a, data)
    return a, data


async def drain(k: Kernel) -> None:
    """Wait for the kernel's background work (a fenced device's eviction, notifier
    removal, lock releases), bounded."""
    for _ in range(100):
        if not k._background:
            return
        await asyncio.wait_for(asyncio.gather(*list(k._background)), 5)
    raise AssertionError("background work never settled")


# ==== 1. registration: the device-coherent window ==========================================
async def test_coherent_pages_are_frames_of_the_window_above_ram() -> None:
    k = Kernel(RAM_BYTES, coherent_bytes=16 * P)
    nframes = k.ram.nframes
    assert k.ram.span == nframes + 16
    a = k.register_device("a", CoherentDevice(), MemoryKind.DEVICE_COHERENT, 8)
    b = k.register_device("b", CoherentDevice(), MemoryKind.DEVICE_COHERENT, 6)
    assert a.pgmap is not None and b.pgmap is not None
    assert a.pgmap.kind == b.pgmap.kind == MemoryKind.DEVICE_COHERENT
    assert (a.pgmap.base, a.pgmap.end) == (nframes, nframes + 8)
    assert (b.pgmap.base, b.pgmap.end) == (nframes + 8, nframes + 14)
    assert k.devmem.lookup(nframes + 3) is a.pgmap and k.devmem.lookup(nframes + 13) is b.pgmap
    assert k.devmem.lookup(nframes + 14) is None and k.devmem.lookup(nframes - 1) is None
    assert list(k.ram.is_device(np.array([nframes - 1, nframes, nframes + 15, nframes + 16]))) == [
        False, True, True, False]
    # The counts are RAM's: a coherent page's refcount is the frame's.
    assert a.pgmap.used_pages == 0 and k.ram.used_frames == 1  # the zero page only
    # Two pages left: three do not fit; nothing is registered by a refusal.
    with raises_errno(errno.ENOMEM):
        k.register_device("c", CoherentDevice(), MemoryKind.DEVICE_COHERENT, 3)
    assert k.device_by_name("c") is None
    c = k.register_device("c", CoherentDevice(), MemoryKind.DEVICE_COHERENT, 2)
    assert c.pgmap is not None and (c.pgmap.base, c.pgmap.end) == (nframes + 14, nframes + 16)
    with raises_errno(errno.ENOMEM):
        k.register_device("d", CoherentDevice(), MemoryKind.DEVICE_COHERENT, 1)
    # Private memory does not use the window.
    p = k.register_device("p", CoherentDevice(), MemoryKind.DEVICE_PRIVATE, 64)
    assert p.pgmap is not None and p.pgmap.base > k.ram.span


async def test_coherent_registration_errors() -> None:
    k = Kernel(RAM_BYTES, coherent_bytes=0)
    with raises_errno(errno.ENOMEM):  # no window at all
        k.register_device("x", CoherentDevice(), MemoryKind.DEVICE_COHERENT, 1)
    k = Kernel(RAM_BYTES, coherent_bytes=8 * P)
    for kind, npages in ((MemoryKind.DEVICE_COHERENT, 0), (MemoryKind.NONE, 4)):
        with raises_errno(errno.EINVAL):  # a kind without a size, or a size without a kind
            k.register_device("x", CoherentDevice(), kind, npages)
    with raises_errno(errno.EINVAL):
        k.register_device("x", CoherentDevice(), MemoryKind.DEVICE_COHERENT, -1)
    assert k.devices == {} and k.devmem.coherent == []
    dev = k.register_device("x", CoherentDevice(), MemoryKind.DEVICE_COHERENT, 8)  # the whole window
    assert dev.pgmap is not None and dev.pgmap.npages == 8


# ==== 2. migration to coherent memory ============================================================
async def test_m2d_coherent_destinations_become_present_ptes(c: C) -> None:
    k, mm, n = c.k, c.p.mm, 8
    base_frames = k.ram.used_frames
    a = await c.env.mmap(n)
    data = pattern(5, 1)
    await c.env.write(a, data)  # pages 0..4 written
    await k.clear_refs(c.p.pid, 4)  # soft-dirty tracking write-protects them; 0..3 are written again
    await c.env.write(a, data[: 4 * P])
    assert await c.env.read(a + 5 * P, P) == ZERO_PAGE  # page 5: the zero page; 6, 7: holes
    assert mm.rss == [5, 0, 0] and k.ram.used_frames == base_frames + 5
    before = c.ptes(a, a + n * P)
    c.env.fake.events.clear()

    mig = await c.setup(a, a + n * P)
    assert list(mig.src_flags) == [V | M | W] * 4 + [V | M] + [M] * 3
    assert list(mig.src_pfns[:5]) == list(pte_pfn(before)[:5])
    assert (pte_swp_type(c.ptes(a, a + 5 * P)) == SWP_MIGRATION).all()
    dst = c.coh.alloc(n)
    assert (dst >= k.ram.nframes).all() and (dst < k.ram.span).all()
    for i in range(n):  # DMA from the collected frames to the device's own frames
        c.coh.dma_write([dst[i]], c.coh.dma_read([mig.src_pfns[i]]) if i < 5 else ZERO_PAGE)
    await k.migrate_pages(c.dev, mig.id, u64(dst), u8([V | W] * n), b"")
    assert list(mig.src_flags) == [V | M | W] * 4 + [V | M] + [M] * 3
    mid = c.ptes(a, a + n * P)
    assert present(mid[5:]).all() and list(pte_pfn(mid[5:])) == list(dst[5:])  # holes filled at pages
    assert (k.ram.flags[dst] & PG_LOCKED).all()  # destinations locked until finalize
    await k.migrate_finalize(c.dev, mig.id)

    after = c.ptes(a, a + n * P)
    assert present(after).all() and (pte_swp_type(after) == 0).all()
    assert list(pte_pfn(after)) == list(dst)
    # WRITE from the original PTE; filled holes are writable because the VMA is.
    assert list(wbit(after)) == [True] * 4 + [False] + [True] * 3
    assert not (k.ram.flags[dst] & PG_LOCKED).any() and (k.ram.flags[dst] & PG_ANON).all()
    assert (k.ram.refcount[dst] == 1).all() and (k.ram.mapcount[dst] == 1).all()
    assert c.pgmap.used_pages == n
    assert k.ram.used_frames == base_frames  # the five system frames were freed
    assert mm.rss == [8, 0, 0]  # unchanged by the move, +1 per filled hole (zero page included)
    # The other mirror saw one MIGRATE with the coherent device's owner, then the hole fill.
    assert [(e.event, e.owner) for e in c.env.fake.events] == [(Event.MIGRATE, c.dev.owner)] * 2
    assert c.coh.freed == []

    # The CPU reads and writes the device memory in place: no fault, no event, no move.
    c.env.fake.events.clear()
    c.coh.events.clear()
    assert await c.env.read(a, n * P) == data + ZERO_PAGE * 3
    await c.env.write(a + P + 10, b"in place")
    await c.env.write(a + 4 * P, b"read-only pte")  # reused: the only mapping of an anonymous page
    await c.env.write(a + 7 * P, pattern(1, 2))
    now = c.ptes(a, a + n * P)
    assert list(pte_pfn(now)) == list(dst) and wbit(now).all()
    expect = bytearray(data + ZERO_PAGE * 3)
    expect[P + 10 : P + 18] = b"in place"
    expect[4 * P : 4 * P + 13] = b"read-only pte"
    expect[7 * P :] = pattern(1, 2)
    assert await c.env.read(a, n * P) == bytes(expect)
    assert c.coh.dma_read(dst) == bytes(expect)  # the device sees the CPU's writes
    c.coh.dma_write(dst[2:3], pattern(1, 3))  # and the CPU sees the device's
    assert await c.env.read(a + 2 * P, P) == pattern(1, 3)
    assert c.coh.m2r_calls == [] and c.env.fake.events == [] and c.coh.events == []
    assert mm.rss == [8, 0, 0] and c.pgmap.used_pages == n and c.coh.freed == []


async def test_m2d_into_a_read_only_vma_fills_holes_read_only(c: C) -> None:
    a = await c.env.mmap(2, prot=PROT_READ)
    mig, dst = await c.to_coherent(a, a + 2 * P)
    assert list(mig.src_flags) == [M, M]
    after = c.ptes(a, a + 2 * P)
    assert present(after).all() and not wbit(after).any() and list(pte_pfn(after)) == list(dst)
    assert await c.env.read(a, 2 * P) == ZERO_PAGE * 2
    with raises_errno(errno.EFAULT):
        await c.env.write(a, b"x")
    assert c.p.mm.rss == [2, 0, 0] and c.coh.m2r_calls == []


async def test_shared_pages_do_not_move_to_coherent_memory(c: C) -> None:
    a, data = await filled(c, 2, 4, flags=MAP_SHARED | MAP_ANONYMOUS)
    before = c.ptes(a, a + 2 * P)
    mig = await c.setup(a, a + 2 * P)
    assert list(mig.src_flags) == [V | M | W] * 2
    dst = c.coh.alloc(2)
    await c.k.migrate_pages(c.dev, mig.id, u64(dst), u8([V | W] * 2), b"")
    assert list(mig.src_flags) == [V | W] * 2  # refused: only anonymous memory moves to a device
    await c.k.migrate_finalize(c.dev, mig.id)
    assert (c.ptes(a, a + 2 * P) == before).all()
    assert sorted(c.coh.freed) == sorted(int(d) for d in dst)  # the unused destinations were freed
    assert c.pgmap.used_pages == 0 and (c.k.ram.flags[dst] == 0).all()
    assert await c.env.read(a, 2 * P) == data


async def test_coherent_destination_checks(c: C) -> None:
    k = c.k
    a, data = await filled(c, 2, 5)
    _, used = await c.to_coherent(a, a + P)
    other, other_dev, _ = await add_coherent(k, "coh1", 4, pid=c.p.pid)
    mig = await c.setup(a + P, a + 2 * P)
    free = int(c.coh.alloc(1)[0])
    for bad, err in (
        (int(used[0]), errno.EBUSY),  # in use
        (c.pgmap.end, errno.EINVAL),  # past the device's range
        (int(other.pgmap.base) + 1, errno.EINVAL),  # another coherent device's page
        (k.ram.span, errno.EINVAL),  # beyond the window
        (c.pgmap.base - 1, errno.EINVAL),  # a system frame
    ):
        with raises_errno(err):
            await k.migrate_pages(c.dev, mig.id, u64([bad]), u8([V | W]), b"")
    assert other.pgmap.used_pages == 0 and c.pgmap.used_pages == 1
    c.coh.dma_write([free], c.coh.dma_read(mig.src_pfns[:1]))
    await k.migrate_pages(c.dev, mig.id, u64([free]), u8([V | W]), b"")
    await k.migrate_finalize(c.dev, mig.id)
    assert list(c.pfns(a, a + 2 * P)) == [int(used[0]), free]
    assert await c.env.read(a, 2 * P) == data
    del other_dev


# ==== 3. what the selectors collect ===============================================================
async def test_select_system_does_not_collect_coherent_pages(c: C) -> None:
    a, data = await filled(c, 4, 6)
    _, dst = await c.to_coherent(a, a + 4 * P)
    before = c.ptes(a, a + 4 * P)
    for select in (SYS, SYS | DEVP, DEVP):
        mig = await c.setup(a, a + 4 * P, select)
        assert list(mig.src_flags) == [0] * 4 and mig.cpages == 0
        assert (c.ptes(a, a + 4 * P) == before).all()
        await c.k.migrate_finalize(c.dev, mig.id)
    # SELECT_DEVICE_COHERENT collects them (the owner's, not locked, not pinned).
    mig = await c.setup(a, a + 4 * P, SYS | COH)
    assert list(mig.src_flags) == [V | M | W] * 4 and list(mig.src_pfns) == list(dst)
    await c.k.migrate_finalize(c.dev, mig.id)  # nothing moves
    assert (c.ptes(a, a + 4 * P) == before).all()
    assert (c.k.ram.refcount[dst] == 1).all() and (c.k.ram.mapcount[dst] == 1).all()
    assert await c.env.read(a, 4 * P) == data and c.coh.freed == []


async def test_select_device_coherent_of_another_owner_collects_nothing(c: C) -> None:
    k = c.k
    a, data = await filled(c, 3, 7)
    _, dst = await c.to_coherent(a, a + 3 * P)
    before = c.ptes(a, a + 3 * P)
    other, other_dev, _ = await add_coherent(k, "coh1", 4, pid=c.p.pid)
    for dev in (other_dev, c.env.dev):  # another coherent device; a device without memory
        mig = await c.setup(a, a + 3 * P, COH | SYS | DEVP, dev=dev)
        assert list(mig.src_flags) == [0] * 3 and mig.cpages == 0
        await k.migrate_finalize(dev, mig.id)
    assert (c.ptes(a, a + 3 * P) == before).all() and other.freed == []
    # The other coherent device may migrate system pages to its memory next to them.
    b, bdata = await filled(c, 2, 8)
    _, odst = await c.to_coherent(b, b + 2 * P, coh=other)
    assert list(c.pfns(b, b + 2 * P)) == list(odst) and other.pgmap.contains(odst).all()
    assert await c.env.read(a, 3 * P) == data and await c.env.read(b, 2 * P) == bdata
    assert c.coh.m2r_calls == [] and other.m2r_calls == []
    del dst


async def test_pinned_or_locked_coherent_pages_are_not_collected(c: C) -> None:
    k = c.k
    a, data = await filled(c, 3, 9)
    _, dst = await c.to_coherent(a, a + 3 * P)
    pin = await k.pin_user_pages(c.p.pid, a + P, 1, write=True, longterm=False, hold=True)
    assert k.ram.pincount[dst[1]] == 1 and k.ram.refcount[dst[1]] == 2
    assert c.pfns(a + P, a + 2 * P)[0] == dst[1]  # a short-term pin leaves it on the device
    mig = await c.setup(a, a + 3 * P, COH)
    assert list(mig.src_flags) == [V | M | W, 0, V | M | W]
    # Pages another migration collected are migration entries: not collected again.
    again = await c.setup(a, a + 3 * P, COH)
    assert list(again.src_flags) == [0, 0, 0]
    await k.migrate_finalize(c.dev, again.id)
    sel = (mig.src_flags & M) != 0
    await k.migrate_pages(c.dev, mig.id, u64(np.zeros(3)), u8(np.where(sel, V | SD, 0)),
                          c.coh.dma_read(mig.src_pfns[sel]))
    await k.migrate_finalize(c.dev, mig.id)
    pfns = c.pfns(a, a + 3 * P)
    assert pfns[1] == dst[1] and pfns[0] < k.ram.nframes and pfns[2] < k.ram.nframes
    assert sorted(c.coh.freed) == sorted([int(dst[0]), int(dst[2])])
    assert await c.env.read(a, 3 * P) == data
    k.unpin_user_pages(c.p.pid, pin)
    assert k.ram.refcount[dst[1]] == 1 and k.ram.pincount[dst[1]] == 0
    assert (await c.to_system(a + P, a + 2 * P)).cpages == 1  # unpinned: it moves now
    assert await c.env.read(a, 3 * P) == data and c.pgmap.used_pages == 0


async def test_filled_hole_destination_is_locked_until_finalize(c: C) -> None:
    """A hole filled with a coherent page at migrate_vma_pages is mapped (present) but
    locked until finalize: no other migration or eviction takes it meanwhile."""
    k = c.k
    a = await c.env.mmap(1)
    mig = await c.setup(a, a + P)
    dst = c.coh.alloc(1)
    c.coh.dma_write(dst, pattern(1, 32))
    await k.migrate_pages(c.dev, mig.id, u64(dst), u8([V | W]), b"")
    assert c.pfns(a, a + P)[0] == dst[0] and k.ram.flags[dst[0]] & PG_LOCKED
    assert await c.env.read(a, P) == pattern(1, 32)  # present: the CPU reads it, no wait
    other = await c.setup(a, a + P, COH)
    assert list(other.src_flags) == [0]  # the trylock fails
    await k.migrate_finalize(c.dev, other.id)
    await k.pin_user_pages(c.p.pid, a, 1, write=True, longterm=False, hold=False)
    with raises_errno(errno.EBUSY):  # the long-term pin cannot move a locked page
        await k.pin_user_pages(c.p.pid, a, 1, write=True, longterm=True, hold=True)
    await k.migrate_finalize(c.dev, mig.id)
    assert c.pfns(a, a + P)[0] == dst[0] and not k.ram.flags[dst[0]] & PG_LOCKED
    again = await c.setup(a, a + P, COH)
    assert list(again.src_flags) == [V | M | W]
    await k.migrate_finalize(c.dev, again.id)
    assert await c.env.read(a, P) == pattern(1, 32) and c.coh.freed == []


# ==== 4. migration back to system memory ============================================================
async def test_m2s_coherent_back_to_system(c: C) -> None:
    k, mm = c.k, c.p.mm
    a, data = await filled(c, 4, 10)
    frames = k.ram.used_frames
    _, dst = await c.to_coherent(a, a + 4 * P)
    assert k.ram.used_frames == frames - 4
    c.coh.dma_write(dst[:1], pattern(1, 11))  # the device wrote page 0
    expect = pattern(1, 11) + data[P:]
    c.env.fake.events.clear()
    mig = await c.setup(a, a + 4 * P, COH)
    assert list(mig.src_flags) == [V | M | W] * 4 and list(mig.src_pfns) == list(dst)
    assert [(e.event, e.owner) for e in c.env.fake.events] == [(Event.MIGRATE, c.dev.owner)]
    assert (pte_swp_type(c.ptes(a, a + 4 * P)) == SWP_MIGRATION).all()
    payload = c.coh.dma_read(mig.src_pfns)
    await k.migrate_pages(c.dev, mig.id, u64(np.zeros(4)), u8([V | SD] * 4), payload)
    assert c.coh.freed == []  # the sources are freed at finalize
    await k.migrate_finalize(c.dev, mig.id)
    after = c.ptes(a, a + 4 * P)
    assert present(after).all() and wbit(after).all() and (pte_pfn(after) < k.ram.nframes).all()
    assert sorted(c.coh.freed) == sorted(int(d) for d in dst) and c.pgmap.used_pages == 0
    assert (k.ram.flags[dst] == 0).all()
    assert mm.rss == [4, 0, 0] and k.ram.used_frames == frames
    assert await c.env.read(a, 4 * P) == expect and c.coh.m2r_calls == []


async def test_m2s_fills_holes_and_skips_system_pages(c: C) -> None:
    k = c.k
    a = await c.env.mmap(4)
    data = pattern(3, 12)
    await c.env.write(a, data)  # page 3 never touched
    _, dst = await c.to_coherent(a, a + P)
    mig = await c.setup(a, a + 4 * P, COH)
    assert list(mig.src_flags) == [V | M | W, 0, 0, M]  # system pages not selected; a hole always is
    payload = c.coh.dma_read(dst[:1]) + pattern(1, 13)
    await k.migrate_pages(c.dev, mig.id, u64(np.zeros(4)), u8([V | SD, 0, 0, V | SD]), payload)
    await k.migrate_finalize(c.dev, mig.id)
    assert (c.pfns(a, a + 4 * P) < k.ram.nframes).all()
    assert await c.env.read(a, 4 * P) == data + pattern(1, 13)
    assert c.coh.freed == [int(dst[0])] and c.p.mm.rss == [4, 0, 0]


async def test_m2s_of_a_forked_coherent_page_moves_it_for_both_mappers(c: C) -> None:
    """try_to_migrate(): the child's mapping of a collected coherent page is unmapped
    too (CLEAR there), and both map the one new system page, still copy-on-write."""
    k = c.k
    a, data = await filled(c, 2, 33)
    _, dst = await c.to_coherent(a, a + 2 * P)
    child = await k.fork(c.p.pid)
    _, child_dev, child_sub = await add_coherent(k, "coh1", 4, pid=child.pid)
    assert child_sub is not None
    child_ops = child_dev.ops
    assert isinstance(child_ops, CoherentDevice)
    child_ops.events.clear()
    mig = await c.to_system(a, a + 2 * P)
    assert list(mig.src_flags) == [V | M] * 2  # read-only since fork
    assert [(e.event, e.start, e.end, e.owner) for e in child_ops.events] == [(Event.CLEAR, a, a + 2 * P, 0)]
    home = c.pfns(a, a + 2 * P)
    assert (home < k.ram.nframes).all() and (c.pfns(a, a + 2 * P, child.mm) == home).all()
    assert (k.ram.mapcount[home] == 2).all() and not wbit(c.ptes(a, a + 2 * P, child.mm)).any()
    assert sorted(c.coh.freed) == sorted(int(d) for d in dst) and c.pgmap.used_pages == 0
    await c.env.write(a, b"parent")
    assert await c.env.read(a, 2 * P, pid=child.pid) == data
    assert child.mm.rss == [2, 0, 0] and c.p.mm.rss == [2, 0, 0]


async def test_eviction_of_coherent_pages(c: C) -> None:
    """migrate_device_range over a coherent device (dmirror's RELEASE): every mapping in
    every address space, CLEAR with no owner to every mirror (the owner's included),
    the device hands the contents over, forked pages stay shared. A pinned page is
    not taken."""
    k = c.k
    a, data = await filled(c, 4, 34)
    _, dst = await c.to_coherent(a, a + 4 * P)
    # Page 2 pinned before fork: the parent keeps it, the child gets a copy in RAM.
    pin = await k.pin_user_pages(c.p.pid, a + 2 * P, 1, write=False, longterm=False, hold=True)
    child = await k.fork(c.p.pid)
    await c.env.write(a + 3 * P, b"own copy")  # page 3: the parent's copy in RAM, the child's coherent
    c.coh.events.clear()
    c.env.fake.events.clear()
    ev = await k.evict_setup(c.dev)
    assert list(ev.src_pfns) == sorted(int(d) for d in dst[[0, 1, 3]])  # the pinned page stays
    assert list(ev.src_flags) == [V | M] * 3  # read-only everywhere after fork
    for fake in (c.coh, c.env.fake):
        assert [(e.event, e.start, e.end, e.owner) for e in fake.events] == [(Event.CLEAR, a, a + 2 * P, 0)]
    payload = c.coh.dma_read(ev.src_pfns)
    await k.migrate_pages(c.dev, ev.id, b"", u8([V | SD] * 3), payload)
    await k.migrate_finalize(c.dev, ev.id)
    parent, kid = c.pfns(a, a + 4 * P), c.pfns(a, a + 4 * P, child.mm)
    assert (parent[:2] == kid[:2]).all() and (parent[:2] < k.ram.nframes).all()  # one shared frame each
    assert kid[3] < k.ram.nframes and parent[3] not in (kid[3], dst[3])
    assert parent[2] == dst[2] and kid[2] < k.ram.nframes
    assert sorted(c.coh.freed) == sorted(int(d) for d in dst[[0, 1, 3]]) and c.pgmap.used_pages == 1
    expect = bytearray(data)
    expect[3 * P : 3 * P + 8] = b"own copy"
    assert await c.env.read(a, 4 * P) == bytes(expect)
    assert await c.env.read(a, 4 * P, pid=child.pid) == data
    k.unpin_user_pages(c.p.pid, pin)
    assert c.coh.m2r_calls == []


async def test_fence_rolls_back_m2s_and_keeps_the_data(c: C) -> None:
    """A coherent device fenced between pages and finalize: the coherent pages come
    back, and the core then moves them home itself."""
    k = c.k
    a, data = await filled(c, 2, 14)
    _, dst = await c.to_coherent(a, a + 2 * P)
    mig = await c.setup(a, a + 2 * P, COH)
    await k.migrate_pages(c.dev, mig.id, u64(np.zeros(2)), u8([V | SD] * 2), c.coh.dma_read(dst))
    k.fence_device(c.dev, "test")
    await drain(k)
    assert (c.pfns(a, a + 2 * P) < k.ram.nframes).all()
    assert await c.env.read(a, 2 * P) == data
    assert c.pgmap.used_pages == 0 and c.coh.freed == []  # a fenced device hears nothing
    assert not (k.ram.flags & PG_LOCKED).any() and not c.dev.migrations


# ==== 5. page_free ====================================================================================
async def test_munmap_madvise_and_exit_free_coherent_pages(c: C) -> None:
    k, mm = c.k, c.p.mm
    a, _ = await filled(c, 4, 15)
    _, dst = await c.to_coherent(a, a + 4 * P)
    c.coh.events.clear()
    await k.madvise(c.p.pid, a, P, MADV_DONTNEED)
    assert c.coh.freed == [int(dst[0])] and mm.rss == [3, 0, 0]
    assert await c.env.read(a, P) == ZERO_PAGE and c.coh.m2r_calls == []  # discarded, not migrated
    await k.munmap(c.p.pid, a + P, 2 * P)
    assert sorted(c.coh.freed) == sorted(int(d) for d in dst[:3]) and mm.rss == [1, 0, 0]
    assert c.pgmap.used_pages == 1
    assert [e.event for e in c.coh.events] == [Event.CLEAR, Event.UNMAP]
    await k.exit(c.p.pid)
    assert sorted(c.coh.freed) == sorted(int(d) for d in dst)
    assert mm.rss == [0, 0, 0] and c.pgmap.used_pages == 0 and not c.pgmap.mapcount.any()
    assert (k.ram.flags[dst] == 0).all() and c.coh.m2r_calls == []
    # Freed pages are the device's again: a new migration may use them.
    p2 = k.spawn("again")
    await k.open(p2.pid, "/dev/coh0", O_RDWR)
    b = await k.mmap(p2.pid, 0, 2 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    mig = await k.migrate_setup(c.dev, p2.pid, b, b + 2 * P, SYS)
    again = c.coh.alloc(2)
    assert set(again.tolist()) <= set(dst.tolist())
    await k.migrate_pages(c.dev, mig.id, u64(again), u8([V | W] * 2), b"")
    await k.migrate_finalize(c.dev, mig.id)
    c.coh.dma_write(again, pattern(2, 16))
    assert await k.read(p2.pid, b, 2 * P) == pattern(2, 16)


# ==== 6. fork and copy-on-write =======================================================================
async def test_fork_shares_coherent_pages_and_cow_copies_from_device_memory(c: C) -> None:
    k = c.k
    a, data = await filled(c, 2, 17)
    _, dst = await c.to_coherent(a, a + 2 * P)
    c.coh.events.clear()
    child = await k.fork(c.p.pid)
    assert [(e.event, e.start, e.end) for e in c.coh.events] == [(Event.PROTECTION_PAGE, a, a + 2 * P)]
    for mm in (c.p.mm, child.mm):
        ptes = c.ptes(a, a + 2 * P, mm)
        assert present(ptes).all() and not wbit(ptes).any() and list(pte_pfn(ptes)) == list(dst)
        assert mm.rss == [2, 0, 0]
    assert (k.ram.refcount[dst] == 2).all() and (k.ram.mapcount[dst] == 2).all()
    assert await c.env.read(a, 2 * P, pid=child.pid) == data  # read in place, no fault

    # The parent's write copies the coherent page straight into a new system page (CLEAR).
    c.coh.events.clear()
    await c.env.write(a + 8, b"parent")
    assert [(e.event, e.start, e.end) for e in c.coh.events] == [(Event.CLEAR, a, a + P)]
    parent_pfns = c.pfns(a, a + 2 * P)
    assert parent_pfns[0] < k.ram.nframes and parent_pfns[1] == dst[1]
    assert (k.ram.flags[parent_pfns[0]] & PG_ANON) != 0
    assert k.ram.refcount[dst[0]] == 1 and k.ram.mapcount[dst[0]] == 1
    assert (await c.env.read(a, P)) == data[:8] + b"parent" + data[14:P]
    assert await c.env.read(a, 2 * P, pid=child.pid) == data  # the child keeps the coherent page
    assert list(c.pfns(a, a + 2 * P, child.mm)) == list(dst)

    # The child's write to its page reuses it in place (its only mapping).
    await c.env.write(a + 16, b"child", pid=child.pid)
    assert c.pfns(a, a + P, child.mm)[0] == dst[0] and wbit(c.ptes(a, a + P, child.mm))[0]
    assert c.coh.dma_read(dst[:1]) == data[:16] + b"child" + data[21:P]
    assert (await c.env.read(a, P))[:16] == data[:8] + b"parent" + data[14:16]
    assert c.coh.m2r_calls == [] and c.coh.freed == []

    await k.exit(child.pid)
    assert c.coh.freed == [int(dst[0])]  # page 1 is still the parent's
    assert k.ram.refcount[dst[1]] == 1 and c.pgmap.used_pages == 1
    await c.env.write(a + P, b"mine")  # the parent's only mapping now: reused in place
    assert c.pfns(a + P, a + 2 * P)[0] == dst[1]
    assert await c.env.read(a + P, P) == b"mine" + data[P + 4 :]


async def test_other_device_write_fault_on_a_shared_coherent_page_copies_it(c: C) -> None:
    a, data = await filled(c, 1, 18)
    _, dst = await c.to_coherent(a, a + P)
    child = await c.k.fork(c.p.pid)
    r = await c.range_fault(a, a + P, HMM_PFN_REQ_FAULT)
    assert list(r.flags) == [HMM_PFN_VALID] and list(r.pfns) == list(dst)  # read-only, no fault
    # A write request COW-copies the page (its CLEAR collides with the fault: EBUSY once).
    with raises_errno(errno.EBUSY):
        await c.range_fault(a, a + P, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    copy = c.pfns(a, a + P)
    assert copy[0] < c.k.ram.nframes and wbit(c.ptes(a, a + P))[0]
    r = await c.range_fault(a, a + P, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    assert list(r.flags) == [HMM_PFN_VALID | HMM_PFN_WRITE] and list(r.pfns) == list(copy)
    assert c.env.dma_read(r.pfns) == data
    assert list(c.pfns(a, a + P, child.mm)) == list(dst) and c.coh.m2r_calls == []


# ==== 7. GUP: long-term and short-term pins ==========================================================
async def test_longterm_pin_moves_the_coherent_page_to_ram_first(c: C) -> None:
    k = c.k
    a, data = await filled(c, 3, 19)
    _, dst = await c.to_coherent(a, a + 3 * P)
    r = await c.range_fault(a, a + 3 * P, HMM_PFN_REQ_FAULT)  # fake0 mirrors the coherent pages
    assert list(r.pfns) == list(dst)
    c.env.fake.events.clear()
    c.coh.events.clear()
    frames = k.ram.used_frames

    # Short-term: stays on the device, nothing is raised.
    short = await k.pin_user_pages(c.p.pid, a + 2 * P, 1, write=True, longterm=False, hold=True)
    assert c.pfns(a + 2 * P, a + 3 * P)[0] == dst[2] and k.ram.pincount[dst[2]] == 1
    assert c.env.fake.events == [] and c.coh.events == [] and c.coh.freed == []

    # Long-term: the core copies the page to RAM (CLEAR, no owner, to every mirror,
    # the owner's included), frees the device page, and pins the new frame.
    pin = await k.pin_user_pages(c.p.pid, a, 1, write=True, longterm=True, hold=True)
    for fake in (c.env.fake, c.coh):
        assert [(e.event, e.start, e.end, e.owner) for e in fake.events] == [(Event.CLEAR, a, a + P, 0)]
    new = int(c.pfns(a, a + P)[0])
    assert new < k.ram.nframes and k.ram.pincount[new] == 1 and k.ram.refcount[new] == 2
    assert c.coh.freed == [int(dst[0])] and c.pgmap.used_pages == 2
    assert k.ram.used_frames == frames + 1
    assert await c.env.read(a, 3 * P) == data and c.coh.m2r_calls == []
    with raises_errno(errno.EFAULT):  # the grant over the old frame went with the CLEAR
        c.env.dma_read(dst[:1])
    assert c.env.dma_read(dst[1:]) == data[P:]  # the others' are still held

    # A long-term pin of a page already in RAM changes nothing.
    c.coh.events.clear()
    again = await k.pin_user_pages(c.p.pid, a, 1, write=True, longterm=True, hold=True)
    assert c.pfns(a, a + P)[0] == new and k.ram.pincount[new] == 2 and c.coh.events == []
    for pin_id in (pin, again, short):
        k.unpin_user_pages(c.p.pid, pin_id)
    assert k.ram.pincount[new] == 0 and k.ram.pincount[dst[2]] == 0 and k.ram.refcount[dst[2]] == 1
    # Without hold the pin is released at once, but the page stays in RAM.
    await k.pin_user_pages(c.p.pid, a + P, 1, write=False, longterm=True, hold=False)
    assert c.pfns(a + P, a + 2 * P)[0] < k.ram.nframes and sorted(c.coh.freed) == sorted([int(dst[0]), int(dst[1])])
    assert await c.env.read(a, 3 * P) == data


async def test_longterm_pin_of_a_coherent_page_someone_else_pins_is_ebusy(c: C) -> None:
    """migrate_device_coherent_folio fails on a page with extra references: the
    long-term pin fails with EBUSY and the page stays where it is."""
    k = c.k
    a, data = await filled(c, 1, 20)
    _, dst = await c.to_coherent(a, a + P)
    short = await k.pin_user_pages(c.p.pid, a, 1, write=True, longterm=False, hold=True)
    c.coh.events.clear()
    with raises_errno(errno.EBUSY):
        await k.pin_user_pages(c.p.pid, a, 1, write=True, longterm=True, hold=True)
    assert k.pins.keys() == {short} and c.coh.events == [] and c.coh.freed == []
    assert c.pfns(a, a + P)[0] == dst[0] and k.ram.pincount[dst[0]] == 1 and k.ram.refcount[dst[0]] == 2
    assert await c.env.read(a, P) == data
    c.coh.dma_write(dst, pattern(1, 21))  # what the short-term pin holder reaches is the CPU's page
    assert await c.env.read(a, P) == pattern(1, 21)
    k.unpin_user_pages(c.p.pid, short)
    await k.pin_user_pages(c.p.pid, a, 1, write=True, longterm=True, hold=False)
    assert c.pfns(a, a + P)[0] < k.ram.nframes and await c.env.read(a, P) == pattern(1, 21)
    assert c.coh.freed == [int(dst[0])]


async def test_longterm_readonly_pin_unshares_a_forked_coherent_page(c: C) -> None:
    """A read-only pin of a coherent page fork shares unshares it first
    (gup_must_unshare): the pinner gets a system copy of its own, read-only, so no
    eviction is needed; the child keeps the coherent page."""
    k = c.k
    a, data = await filled(c, 1, 22)
    _, dst = await c.to_coherent(a, a + P)
    child = await k.fork(c.p.pid)
    pin = await k.pin_user_pages(c.p.pid, a, 1, write=False, longterm=True, hold=True)
    new = c.pfns(a, a + P)
    assert new[0] < k.ram.nframes and k.pins[pin][1][0] == new[0] and k.ram.mapcount[new[0]] == 1
    assert not wbit(c.ptes(a, a + P)).any()
    assert c.pfns(a, a + P, child.mm)[0] == dst[0] and c.coh.freed == []
    await c.env.write(a, b"own")  # reused: the pinned page is the parent's own
    assert c.pfns(a, a + P)[0] == new[0] and bytes(k.ram.data[new[0]][:3]) == b"own"
    await c.env.write(a, b"kid", pid=child.pid)
    assert (await c.env.read(a, P, pid=child.pid))[:3] == b"kid" and (await c.env.read(a, P))[3:] == data[3:]
    k.unpin_user_pages(c.p.pid, pin)


# ==== 8. fencing a coherent device ======================================================================
async def test_fence_moves_coherent_pages_home_and_frees_the_window(c: C) -> None:
    k = c.k
    a, data = await filled(c, 4, 23)
    _, dst = await c.to_coherent(a, a + 4 * P)
    child = await k.fork(c.p.pid)  # page copies in two address spaces
    r = await c.range_fault(a, a + 4 * P, HMM_PFN_REQ_FAULT)
    assert list(r.pfns) == list(dst)
    base, npages = c.pgmap.base, c.pgmap.npages
    frames = k.ram.used_frames
    c.env.fake.events.clear()
    k.fence_device(c.dev, "test")
    await drain(k)
    for mm in (c.p.mm, child.mm):
        pfns = c.pfns(a, a + 4 * P, mm)
        assert (pfns < k.ram.nframes).all() and not wbit(c.ptes(a, a + 4 * P, mm)).any()
    assert (c.pfns(a, a + 4 * P) == c.pfns(a, a + 4 * P, child.mm)).all()  # still shared, COW
    assert k.ram.used_frames == frames + 4
    assert [(e.event, e.owner) for e in c.env.fake.events] == [(Event.CLEAR, 0)]
    assert c.coh.freed == [] and c.coh.m2r_calls == []  # a fenced device hears nothing
    assert await c.env.read(a, 4 * P) == data and await c.env.read(a, 4 * P, pid=child.pid) == data
    assert c.pgmap.used_pages == 0 and c.pgmap.dead and c.pgmap not in k.devmem.coherent
    assert k.devmem.lookup(base) is None
    with raises_errno(errno.EFAULT):  # the other device's grants went with the CLEAR
        c.env.dma_read(dst[:1])
    # The segment is free again: a new device of the same size gets it.
    fresh, fresh_dev, _ = await add_coherent(k, "coh9", npages, pid=c.p.pid)
    assert fresh.pgmap.base == base and k.devmem.lookup(base) is fresh.pgmap
    b, bdata = await filled(c, 2, 24)
    _, fdst = await c.to_coherent(b, b + 2 * P, coh=fresh)
    assert fresh.pgmap.contains(fdst).all()
    assert await c.env.read(b, 2 * P) == bdata and fresh.dma_read(fdst) == bdata
    await c.env.write(a, b"parent")  # COW between the processes as for any system page
    assert await c.env.read(a, P, pid=child.pid) == page(data, 0)
    del fresh_dev


async def test_fence_leaves_a_pinned_coherent_page_and_the_window_waits_for_it(c: C) -> None:
    k = c.k
    a, data = await filled(c, 2, 25)
    _, dst = await c.to_coherent(a, a + 2 * P)
    pin = await k.pin_user_pages(c.p.pid, a, 1, write=True, longterm=False, hold=True)
    base, npages = c.pgmap.base, c.pgmap.npages
    k.fence_device(c.dev, "test")
    await drain(k)
    pfns = c.pfns(a, a + 2 * P)
    assert pfns[0] == dst[0] and pfns[1] < k.ram.nframes  # the pinned page could not move
    assert await c.env.read(a, 2 * P) == data  # host-addressable: still readable, and writable
    await c.env.write(a, b"still here")
    assert c.pgmap.used_pages == 1 and c.pgmap in k.devmem.coherent
    other, _, _ = await add_coherent(k, "coh9", npages)
    assert other.pgmap.base == base + npages  # the segment is not reused while a page lives
    await k.munmap(c.p.pid, a, 2 * P)
    assert c.pgmap.used_pages == 1  # the pin still holds the frame
    k.unpin_user_pages(c.p.pid, pin)
    assert c.pgmap.used_pages == 0 and c.pgmap not in k.devmem.coherent and c.coh.freed == []
    third, _, _ = await add_coherent(k, "coh10", npages)
    assert third.pgmap.base == base


async def test_fence_rolls_back_m2d_into_coherent_memory(c: C) -> None:
    k, mm = c.k, c.p.mm
    a = await c.env.mmap(3)
    data = pattern(2, 26)
    await c.env.write(a, data)  # page 2 a hole
    before = c.ptes(a, a + 3 * P)
    frames, rss = k.ram.used_frames, list(mm.rss)
    mig = await c.setup(a, a + 3 * P)
    dst = c.coh.alloc(3)
    await k.migrate_pages(c.dev, mig.id, u64(dst), u8([V | W] * 3), b"")
    assert present(c.ptes(a + 2 * P, a + 3 * P)).all()  # the hole was filled at pages
    k.fence_device(c.dev, "test")
    await drain(k)
    # The migration entries are put back; the filled hole is a page now (mapped since
    # the pages step: it stays), and the fenced device's memory goes home with it.
    after = c.ptes(a, a + 3 * P)
    assert (after[:2] == before[:2]).all() and present(after[2:]).all() and pte_pfn(after)[2] < k.ram.nframes
    assert k.ram.used_frames == frames + 1 and mm.rss == [rss[0] + 1, *rss[1:]]
    assert c.pgmap.used_pages == 0 and not (k.ram.flags[dst] & PG_LOCKED).any() and c.coh.freed == []
    assert await c.env.read(a, 3 * P) == data + ZERO_PAGE


# ==== 9. MADV_COLLAPSE, pagemap, range faults ==========================================================
async def test_madv_collapse_refuses_a_span_with_coherent_memory(c: C) -> None:
    k = c.k
    a = await c.env.mmap(2 * PTRS_PER_PTE)
    w = (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    data = pattern(4, 27)
    await c.env.write(w, data)
    _, dst = await c.to_coherent(w + P, w + 2 * P)
    before = c.ptes(w, w + PMD_SIZE)
    with raises_errno(errno.EINVAL):
        await k.madvise(c.p.pid, a, 2 * PTRS_PER_PTE * P, MADV_COLLAPSE)
    assert (c.ptes(w, w + PMD_SIZE) == before).all() and (w >> 21) not in c.p.mm.pt.huge
    assert c.pfns(w + P, w + 2 * P)[0] == dst[0]
    assert await c.env.read(w, 4 * P) == data
    await c.to_system(w + P, w + 2 * P)  # back in RAM: the span collapses
    await k.madvise(c.p.pid, w, PMD_SIZE, MADV_COLLAPSE)
    assert (w >> 21) in c.p.mm.pt.huge and await c.env.read(w, 4 * P) == data


async def test_pagemap_of_coherent_pages(c: C) -> None:
    k = c.k
    a, _ = await filled(c, 3, 28)
    _, dst = await c.to_coherent(a, a + 2 * P)
    pm = k.pagemap(c.p.pid, a, 3)
    for i in range(2):
        e = int(pm[i])
        assert e & int(PM_PRESENT) and not e & int(PM_SWAP) and not e & int(PM_FILE)
        assert e & int(PM_MMAP_EXCLUSIVE)
        assert e & int(PM_PFRAME_MASK) == dst[i] and k.ram.nframes <= dst[i] < k.ram.span  # in the window
    assert int(pm[2]) & int(PM_PFRAME_MASK) < k.ram.nframes
    child = await k.fork(c.p.pid)
    pm = k.pagemap(c.p.pid, a, 2)
    assert all(int(e) & int(PM_PRESENT) and not int(e) & int(PM_MMAP_EXCLUSIVE) for e in pm)  # shared
    assert list(k.pagemap(child.pid, a, 2) & PM_PFRAME_MASK) == list(dst)


async def test_range_fault_reports_coherent_pages_valid_to_any_device(c: C) -> None:
    k = c.k
    a, data = await filled(c, 3, 29)
    _, dst = await c.to_coherent(a, a + 3 * P)
    await k.mprotect(c.p.pid, a + 2 * P, P, PROT_READ)  # page 2's PTE becomes read-only
    assert list(c.pfns(a, a + 3 * P)) == list(dst) and list(wbit(c.ptes(a, a + 3 * P))) == [True, True, False]
    other, other_dev, other_sub = await add_coherent(k, "coh1", 4, pid=c.p.pid)
    assert other_sub is not None
    for default in (HMM_PFN_REQ_FAULT, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, 0):
        for dev, sub in ((c.env.dev, c.env.sub), (c.dev, c.sub), (other_dev, other_sub)):
            for owner in (0, c.dev.owner, dev.owner):
                if default & HMM_PFN_REQ_WRITE:
                    with raises_errno(errno.EPERM):  # page 2's VMA is read-only: a write fault
                        await c.range_fault(a, a + 3 * P, default, owner, dev=dev, sub=sub)
                    r = await c.range_fault(a, a + 2 * P, default, owner, dev=dev, sub=sub)
                    assert list(r.flags) == [HMM_PFN_VALID | HMM_PFN_WRITE] * 2
                    assert list(r.pfns) == list(dst[:2])
                    continue
                r = await c.range_fault(a, a + 3 * P, default, owner, dev=dev, sub=sub)
                assert list(r.flags) == [HMM_PFN_VALID | HMM_PFN_WRITE] * 2 + [HMM_PFN_VALID]
                assert list(r.pfns) == list(dst)
    assert list(c.pfns(a, a + 3 * P)) == list(dst)  # nothing was faulted or moved
    assert c.coh.m2r_calls == [] and other.m2r_calls == []
    # The frames a range fault reported are the faulting device's to DMA.
    assert c.env.dma_read(dst) == data
    other.dma_write(dst[:1], pattern(1, 30))
    assert await c.env.read(a, P) == pattern(1, 30)
    violations = other_dev.violations
    with raises_errno(errno.EFAULT):  # read-only for it: no write grant
        other.dma_write(dst[2:3], ZERO_PAGE)
    # Without a grant another device may not touch a coherent page.
    b, _ = await filled(c, 1, 31)
    _, bdst = await c.to_coherent(b, b + P)
    with raises_errno(errno.EFAULT):
        other.dma_read(bdst)
    assert other_dev.violations == violations + 2
    # Its owner may always reach it.
    assert c.coh.dma_read(bdst) == pattern(1, 31)


async def test_two_long_term_pins_of_coherent_pages_do_not_deadlock(c: C) -> None:
    """A long-term pin holds its process's mmap lock while it moves coherent pages home,
    which takes every other process's lock (the rmap walk): ahead of their waiting
    writers. Two such pins, each held up by a migration in its own process while a
    munmap queues in each, used to wait on each other for good."""
    k = c.k
    p2 = k.spawn("p2")
    await k.open(p2.pid, "/dev/coh0", O_RDWR)
    addrs = {}
    for p in (c.p, p2):
        a = await k.mmap(p.pid, 0, 3 * P, RW, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        await k.write(p.pid, a, pattern(3, p.pid))
        mig = await k.migrate_setup(c.dev, p.pid, a, a + P, SYS)  # page 0 to coherent memory
        dst = c.coh.alloc(1)
        c.coh.dma_write(dst, c.coh.dma_read(mig.src_pfns))
        await k.migrate_pages(c.dev, mig.id, u64(dst), u8([V | W]), b"")
        await k.migrate_finalize(c.dev, mig.id)
        addrs[p.pid] = a
    # An open migration of page 1 in each process holds each pin up inside its GUP.
    held = {p.pid: await k.migrate_setup(c.dev, p.pid, addrs[p.pid] + P, addrs[p.pid] + 2 * P, SYS)
            for p in (c.p, p2)}
    pins = [asyncio.ensure_future(k.pin_user_pages(p.pid, addrs[p.pid], 2, write=True, longterm=True, hold=True))
            for p in (c.p, p2)]
    await settle()
    munmaps = [asyncio.ensure_future(k.munmap(p.pid, addrs[p.pid] + 2 * P, P)) for p in (c.p, p2)]
    await settle()
    for mig in held.values():
        await k.migrate_finalize(c.dev, mig.id)
    await asyncio.wait_for(asyncio.gather(*pins, *munmaps), 3)
    for p, pin in zip((c.p, p2), pins, strict=True):
        assert await k.read(p.pid, addrs[p.pid], 2 * P) == pattern(3, p.pid)[: 2 * P]
        k.unpin_user_pages(p.pid, pin.result())
