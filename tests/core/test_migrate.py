"""Migration to and from DEVICE_PRIVATE memory (HMM-SEMANTICS.md §1.3, §1.4, §2.2,
and the §1.2 rows for device-private and migration entries).

``GpuDevice`` is a driver with device-private memory: it keeps the contents of
its pages in a dict, allocates destinations among its free page-map pages, copies
system pages with DMA while a migration holds them, and implements
``migrate_to_ram`` through the kernel's migrate_setup/pages/finalize with the fault
token, as dmirror does. Every move is checked against real byte patterns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gc
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import pytest

from hmm.abi import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    O_CREAT,
    O_RDWR,
    PROT_READ,
    Event,
)
from hmmd.core import fault
from hmmd.core.device import Device
from hmmd.core.devmem import MemoryKind
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import REPLY_OVERHEAD, Kernel
from hmmd.core.migrate import Migration
from hmmd.core.notifier import IntervalNotifier
from hmmd.core.pagetable import PTE_PRESENT, PTE_WRITE, SWP_DEVICE_PRIVATE, SWP_MIGRATION, pte_pfn, pte_swp_type
from hmmd.core.physmem import PG_LOCKED, ZERO_PFN

from .conftest import (
    RW,
    SHM,
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

SYS = MIGRATE_VMA_SELECT_SYSTEM
DEVP = MIGRATE_VMA_SELECT_DEVICE_PRIVATE
V, M, W = MIGRATE_PFN_VALID, MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE
GPU_PAGES = 64
UNKNOWN_DST_BITS = (0x04, 0x20, 0x80)  # no MIGRATE_PFN_* flag


def u64(a) -> bytes:  # type: ignore[no-untyped-def]
    return np.asarray(a, dtype="<u8").tobytes()


def u8(a) -> bytes:  # type: ignore[no-untyped-def]
    return np.asarray(a, dtype=np.uint8).tobytes()


class GpuDevice(FakeDevice):
    """A FakeDevice with DEVICE_PRIVATE memory held in a dict (device PFN -> page)."""

    def __init__(self) -> None:
        super().__init__()
        self.k: Kernel | None = None
        self.dev: Device | None = None
        self.mem: dict[int, bytes] = {}
        self.freed: list[int] = []
        self.m2r_calls: list[tuple[int, int, int]] = []  # (pid, addr, pfn)
        self.fail_m2r = False
        self.leave_open = False
        self.presetup: list[bool] = []  # per migrate_to_ram: was the migration handed over set up?
        self.m2r_hook: Callable[[int, int, int, int], Awaitable[None]] | None = None

    def page_free(self, pfns: np.ndarray) -> None:
        for pfn in pfns:
            self.freed.append(int(pfn))
            self.mem.pop(int(pfn), None)

    def alloc(self, n: int) -> np.ndarray:
        assert self.dev is not None and self.dev.pgmap is not None
        free = np.flatnonzero(self.dev.pgmap.refcount == 0)[:n]
        assert len(free) == n, "device memory exhausted"
        return (free + self.dev.pgmap.base).astype(np.int64)

    async def migrate_to_ram(self, pid: int, addr: int, pfn: int, token: int, migration: Migration | None) -> bool:
        """dmirror_devmem_fault(): one page home, through the kernel's migrate_vma."""
        assert self.k is not None and self.dev is not None
        self.m2r_calls.append((pid, addr, pfn))
        if self.m2r_hook is not None:
            await self.m2r_hook(pid, addr, pfn, token)
        if self.fail_m2r:
            return False
        self.presetup.append(migration is not None)
        mig = migration if migration is not None else await self.k.migrate_setup(self.dev, pid, addr, addr + P,
                                                                                 DEVP, token)
        if self.leave_open:
            return True  # forgets to finish the migration it was handed
        sel = (mig.src_flags & M) != 0
        data = b"".join(self.mem[int(p)] for p in mig.src_pfns[sel])
        flags = np.where(sel, V | MIGRATE_PFN_SYSTEM_DATA, 0)
        await self.k.migrate_pages(self.dev, mig.id, u64(np.zeros(mig.npages)), u8(flags), data)
        await self.k.migrate_finalize(self.dev, mig.id)
        return True  # like dmirror: 0 even if the page did not move; the core re-checks


@dataclass
class G(DeviceRig):
    """The conftest env (a process that opened /dev/fake0, a plain mirror of its
    whole address space) plus /dev/gpu0 with device-private memory, opened by the
    same process and mirroring it with its own notifier."""

    env: Env
    gpu: GpuDevice
    dev: Device
    sub: IntervalNotifier

    async def setup(self, start: int, end: int, select: int = SYS, pid: int | None = None) -> Migration:
        return await self.k.migrate_setup(self.dev, self.p.pid if pid is None else pid, start, end, select)

    def copy_out(self, mig: Migration, dst: np.ndarray) -> None:
        """The driver's copy to device memory: DMA-read each source, zero-fill holes."""
        for i in np.flatnonzero(dst):
            if mig.src_flags[i] & V:
                self.gpu.mem[int(dst[i])] = b"".join(self.k.dma_read(self.dev, u64([mig.src_pfns[i]])))
            else:
                self.gpu.mem[int(dst[i])] = ZERO_PAGE

    async def to_device(self, start: int, end: int, skip: tuple[int, ...] = ()) -> tuple[Migration, np.ndarray]:
        """A whole M2D: setup(SYSTEM), copy, pages, finalize. Returns the destinations."""
        mig = await self.setup(start, end)
        sel = (mig.src_flags & M) != 0
        sel[list(skip)] = False
        dst = np.zeros(mig.npages, dtype=np.int64)
        dst[sel] = self.gpu.alloc(int(sel.sum()))
        self.copy_out(mig, dst)
        await self.k.migrate_pages(self.dev, mig.id, u64(dst), u8(np.where(sel, V | W, 0)), b"")
        await self.k.migrate_finalize(self.dev, mig.id)
        return mig, dst

    async def range_fault(self, start: int, end: int, default: int, owner: int, *, dev: Device | None = None,
                          sub: IntervalNotifier | None = None):  # type: ignore[no-untyped-def]
        dev, sub = dev or self.dev, sub or self.sub
        seq = await self.k.read_begin(dev, sub.id)
        return await self.k.range_fault(dev, sub.id, seq, start, end, default, 0, b"", owner)


async def make_g(k: Kernel | None = None) -> G:
    env = await make_env(k)
    gpu = GpuDevice()
    dev, sub = await add_device(env.k, "gpu0", gpu, MemoryKind.DEVICE_PRIVATE, GPU_PAGES, env.p.pid)
    assert sub is not None
    gpu.k, gpu.dev = env.k, dev
    return G(env, gpu, dev, sub)


@pytest.fixture
async def g() -> G:
    return await make_g()


def swp(ptes: np.ndarray) -> np.ndarray:
    return pte_swp_type(ptes)


def wbit(ptes: np.ndarray) -> np.ndarray:
    return (ptes & PTE_WRITE) != 0


def is_present(ptes: np.ndarray) -> np.ndarray:
    return (ptes & PTE_PRESENT) != 0


async def settle() -> None:
    """Let every runnable task (and the migration's lock release) run."""
    for _ in range(20):
        await asyncio.sleep(0)


async def filled(g: G, npages: int, seed: int, flags: int = MAP_PRIVATE | MAP_ANONYMOUS) -> tuple[int, bytes]:
    a = await g.env.mmap(npages, flags=flags)
    data = pattern(npages, seed)
    await g.env.write(a, data)
    return a, data


# ==== 1. M2D of anonymous pages =====================================================
async def test_m2d_anonymous_src_flags_dma_and_device_entries(g: G) -> None:
    k, mm, n = g.k, g.p.mm, 8
    base_frames = k.ram.used_frames
    a = await g.env.mmap(n)
    data = pattern(5, 1)
    await g.env.write(a, data)  # pages 0..4 written
    # Page 4's PTE becomes read-only: soft-dirty tracking write-protects every page,
    # and pages 0..3 are written again.
    await k.clear_refs(g.p.pid, 4)
    await g.env.write(a, data[: 4 * P])
    assert await g.env.read(a + 5 * P, P) == ZERO_PAGE  # page 5: the zero page; 6, 7: never touched
    before = g.ptes(a, a + n * P)
    assert list(wbit(before)[:5]) == [True] * 4 + [False]
    assert pte_pfn(before)[5] == ZERO_PFN and before[6] == before[7] == 0
    assert mm.rss == [5, 0, 0]
    assert k.ram.used_frames == base_frames + 5

    mig = await g.setup(a, a + n * P)
    assert list(mig.src_flags) == [V | M | W] * 4 + [V | M] + [M] * 3
    assert mig.cpages == 8
    assert list(mig.src_pfns[:5]) == list(pte_pfn(before)[:5]) and not mig.src_pfns[5:].any()
    during = g.ptes(a, a + n * P)
    assert (swp(during[:5]) == SWP_MIGRATION).all()
    assert list(wbit(during[:5])) == [True] * 4 + [False]  # the migration entry remembers WRITE
    assert during[5] == before[5] and during[6] == during[7] == 0  # holes and zero page untouched
    # The device may read the collected frames while the migration holds them.
    for i in range(5):
        assert b"".join(k.dma_read(g.dev, u64([mig.src_pfns[i]]))) == page(data, i)

    dst = g.gpu.alloc(n)
    g.copy_out(mig, dst)
    await k.migrate_pages(g.dev, mig.id, u64(dst), u8([V | W] * n), b"")
    assert list(mig.src_flags) == [V | M | W] * 4 + [V | M] + [M] * 3  # everything will migrate
    mid = g.ptes(a, a + n * P)
    assert (swp(mid[5:]) == SWP_DEVICE_PRIVATE).all() and list(pte_pfn(mid[5:])) == list(dst[5:])
    assert mm.rss == [8, 0, 0]  # the three holes were filled at pages
    await k.migrate_finalize(g.dev, mig.id)

    after = g.ptes(a, a + n * P)
    assert (swp(after) == SWP_DEVICE_PRIVATE).all() and not is_present(after).any()
    assert list(pte_pfn(after)) == list(dst)
    # WRITE from the original PTE; filled holes are writable because the VMA is.
    assert list(wbit(after)) == [True] * 4 + [False] + [True] * 3
    assert k.ram.used_frames == base_frames  # the five system frames were freed
    assert mm.rss == [8, 0, 0]  # moved pages unchanged, +1 per filled hole (zero page included)
    idx = g.pgmap.index(dst)
    assert (g.pgmap.refcount[idx] == 1).all() and (g.pgmap.mapcount[idx] == 1).all()
    assert g.pgmap.used_pages == n
    for i in range(5):
        assert g.gpu.mem[int(dst[i])] == page(data, i)
    assert g.gpu.freed == []
    # After finalize the old frames are no longer the device's to read.
    violations = g.dev.violations
    for i in range(5):
        with raises_errno(errno.EFAULT):
            k.dma_read(g.dev, u64([mig.src_pfns[i]]))
    assert g.dev.violations == violations + 5
    assert mig.id not in g.dev.migrations and mig.id not in mm.migrations


async def test_m2d_holes_in_read_only_vma_are_read_only_entries(g: G) -> None:
    a = await g.env.mmap(2, prot=PROT_READ)
    mig, dst = await g.to_device(a, a + 2 * P)
    assert list(mig.src_flags) == [M, M]
    after = g.ptes(a, a + 2 * P)
    assert (swp(after) == SWP_DEVICE_PRIVATE).all() and not wbit(after).any()
    assert list(pte_pfn(after)) == list(dst)
    assert g.p.mm.rss == [2, 0, 0]


# ==== 2. the MIGRATE invalidation ===================================================
async def test_migrate_event_carries_the_owner(g: G) -> None:
    other = g.env.fake
    a, _ = await filled(g, 4, 2)
    g.gpu.events.clear()
    other.events.clear()
    mig = await g.setup(a, a + 4 * P)
    for fake in (g.gpu, other):
        assert [(e.event, e.start, e.end, e.owner) for e in fake.events] == [(Event.MIGRATE, a, a + 4 * P, g.dev.owner)]
    assert g.env.dev.owner != g.dev.owner  # the other device sees the migrating owner, not its own
    dst = g.gpu.alloc(4)
    g.copy_out(mig, dst)
    await g.k.migrate_pages(g.dev, mig.id, u64(dst), u8([V] * 4), b"")
    await g.k.migrate_finalize(g.dev, mig.id)
    assert len(other.events) == 1  # no hole to fill: pages and finalize raise nothing

    # With holes, migrate_vma_pages raises a second MIGRATE (same owner) to insert them.
    b = await g.env.mmap(3)
    await g.env.write(b, pattern(1, 3))
    other.events.clear()
    await g.to_device(b, b + 3 * P)
    # ... from the first hole to the end of the range.
    assert [(e.event, e.start, e.end, e.owner) for e in other.events] == [
        (Event.MIGRATE, b, b + 3 * P, g.dev.owner), (Event.MIGRATE, b + P, b + 3 * P, g.dev.owner)]

    # migrate_to_ram's own migration carries the owner too.
    other.events.clear()
    assert await g.env.read(b, P) == pattern(1, 3)
    assert [(e.event, e.start, e.end, e.owner) for e in other.events] == [(Event.MIGRATE, b, b + P, g.dev.owner)]


# ==== 3. range faults on device-private pages =======================================
async def test_owner_range_fault_reports_device_pfn_without_fault(g: G) -> None:
    a, data = await filled(g, 3, 4)
    _, dst = await g.to_device(a, a + 3 * P)
    g.gpu.events.clear()
    r = await g.range_fault(a, a + 3 * P, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, g.dev.owner)
    assert list(r.flags) == [HMM_PFN_VALID | HMM_PFN_WRITE] * 3
    assert list(r.pfns) == list(dst)
    assert g.gpu.m2r_calls == [] and g.gpu.events == []  # nothing was faulted

    # Read-only VMA: the entries lose WRITE; REQ_WRITE is then reported, not faulted.
    await g.k.mprotect(g.p.pid, a, 3 * P, PROT_READ)
    ptes = g.ptes(a, a + 3 * P)
    assert (swp(ptes) == SWP_DEVICE_PRIVATE).all() and not wbit(ptes).any()
    r = await g.range_fault(a, a + 3 * P, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, g.dev.owner)
    assert list(r.flags) == [HMM_PFN_VALID] * 3  # returns 0: no EPERM, no fault
    assert list(r.pfns) == list(dst)
    assert g.gpu.m2r_calls == []
    assert all(g.gpu.mem[int(d)] == page(data, i) for i, d in enumerate(dst))


async def test_other_device_range_fault_migrates_to_ram(g: G) -> None:
    env = g.env
    a, data = await filled(g, 3, 5)
    _, dst = await g.to_device(a, a + 3 * P)
    # No fault requested: another owner's device page is "0", not ERROR, and nothing moves.
    for owner in (0, env.dev.owner):
        r = await g.range_fault(a, a + 3 * P, 0, owner, dev=env.dev, sub=env.sub)
        assert list(r.flags) == [0, 0, 0] and not r.pfns.any()
    # The owner's own flag does not make the other device see the page either.
    assert g.gpu.m2r_calls == []

    # REQ_FAULT on page 1: the owner's migrate_to_ram runs for it and — the fault
    # stretch runs to the end of the walk chunk — for page 2, which asked for nothing;
    # page 0 stays. The MIGRATE invalidation collides with the faulting device's
    # notifier, so the first call is EBUSY.
    req = u8([0, HMM_PFN_REQ_FAULT, 0])
    seq = await env.read_begin()
    with raises_errno(errno.EBUSY):
        await g.k.range_fault(env.dev, env.sub.id, seq, a, a + 3 * P, 0, HMM_PFN_REQ_FAULT, req, 0)
    assert g.gpu.m2r_calls == [(g.p.pid, a + P, int(dst[1])), (g.p.pid, a + 2 * P, int(dst[2]))]
    seq = await env.read_begin()
    r = await g.k.range_fault(env.dev, env.sub.id, seq, a, a + 3 * P, 0, HMM_PFN_REQ_FAULT, req, 0)
    assert len(g.gpu.m2r_calls) == 2
    assert list(r.flags) == [0, HMM_PFN_VALID | HMM_PFN_WRITE, HMM_PFN_VALID | HMM_PFN_WRITE]
    ptes = g.ptes(a, a + 3 * P)
    assert is_present(ptes[1:]).all() and r.pfns[1:].tolist() == pte_pfn(ptes)[1:].tolist()
    assert (r.pfns[1:] < g.k.ram.nframes).all()
    assert env.dma_read(r.pfns[1:]) == data[P:]
    assert g.gpu.freed == [int(dst[1]), int(dst[2])]
    assert swp(ptes[0]) == SWP_DEVICE_PRIVATE


async def test_a_range_fault_stretch_brings_the_callers_own_device_pages_home(g: G) -> None:
    """An own device-private page is reported, never faulted, when it is the one that
    needs a fault; but one after the first page that needs a fault in the walk chunk
    gets handle_mm_fault too, which knows no owner: the owner's migrate_to_ram runs."""
    a = await g.env.mmap(3)
    await g.env.write(a + P, pattern(2, 6))
    _, dst = await g.to_device(a + P, a + 3 * P)
    req = u8([HMM_PFN_REQ_FAULT, 0, 0])  # page 0 is empty: a read fault
    seq = await g.k.read_begin(g.dev, g.sub.id)
    with raises_errno(errno.EBUSY):  # (the pages' MIGRATE windows collided with the range)
        await g.k.range_fault(g.dev, g.sub.id, seq, a, a + 3 * P, 0, HMM_PFN_REQ_FAULT, req, g.dev.owner)
    seq = await g.k.read_begin(g.dev, g.sub.id)
    r = await g.k.range_fault(g.dev, g.sub.id, seq, a, a + 3 * P, 0, HMM_PFN_REQ_FAULT, req, g.dev.owner)
    assert g.gpu.m2r_calls == [(g.p.pid, a + P, int(dst[0])), (g.p.pid, a + 2 * P, int(dst[1]))]
    assert r.flags.tolist() == [HMM_PFN_VALID] + [HMM_PFN_VALID | HMM_PFN_WRITE] * 2
    assert is_present(g.ptes(a, a + 3 * P)).all() and g.pgmap.used_pages == 0
    assert b"".join(g.k.dma_read(g.dev, r.pfns[1:].astype("<u8").tobytes())) == pattern(2, 6)


async def test_other_device_range_fault_sigbus_is_efault(g: G) -> None:
    env = g.env
    a, _ = await filled(g, 1, 33)
    await g.to_device(a, a + P)
    g.gpu.fail_m2r = True
    with raises_errno(errno.EFAULT):
        await g.range_fault(a, a + P, HMM_PFN_REQ_FAULT, 0, dev=env.dev, sub=env.sub)
    assert len(g.gpu.m2r_calls) == 1 and swp(g.ptes(a, a + P))[0] == SWP_DEVICE_PRIVATE


# ==== 4. CPU access: migrate_to_ram ===================================================
async def test_cpu_read_and_write_migrate_each_page_once(g: G) -> None:
    k, mm = g.k, g.p.mm
    a, data = await filled(g, 4, 6)
    frames = k.ram.used_frames
    _, dst = await g.to_device(a, a + 4 * P)
    assert k.ram.used_frames == frames - 4
    assert await g.env.read(a + 100, 2 * P - 200) == data[100 : 2 * P - 100]  # pages 0 and 1
    assert g.gpu.m2r_calls == [(g.p.pid, a, int(dst[0])), (g.p.pid, a + P, int(dst[1]))]
    assert sorted(g.gpu.freed) == sorted(int(d) for d in dst[:2])
    await g.env.write(a + 2 * P + 10, b"hello")  # page 2
    assert len(g.gpu.m2r_calls) == 3 and g.gpu.m2r_calls[2][1:] == (a + 2 * P, int(dst[2]))
    assert await g.env.read(a, 4 * P) == data[: 2 * P + 10] + b"hello" + data[2 * P + 15 :]
    assert len(g.gpu.m2r_calls) == 4  # page 3 by the last read; nothing more
    assert await g.env.read(a, 4 * P) == data[: 2 * P + 10] + b"hello" + data[2 * P + 15 :]
    assert len(g.gpu.m2r_calls) == 4
    ptes = g.ptes(a, a + 4 * P)
    assert is_present(ptes).all() and wbit(ptes).all() and (pte_pfn(ptes) < k.ram.nframes).all()
    assert sorted(g.gpu.freed) == sorted(int(d) for d in dst) and g.gpu.mem == {}
    assert g.pgmap.used_pages == 0 and not g.pgmap.mapcount.any()
    assert mm.rss == [4, 0, 0] and k.ram.used_frames == frames


async def test_one_access_brings_many_device_pages_home(g: G, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each device page is one migrate_to_ram; the fault loop's retry budget must not
    cap how many pages one read or write may span."""
    monkeypatch.setattr(fault, "MAX_FAULT_RETRIES", 2)
    a, data = await filled(g, 8, 36)
    await g.to_device(a, a + 8 * P)
    assert await g.env.read(a, 8 * P) == data
    await g.to_device(a, a + 8 * P)
    await g.env.write(a, pattern(8, 37))
    assert len(g.gpu.m2r_calls) == 16
    assert await g.env.read(a, 8 * P) == pattern(8, 37)


async def test_concurrent_reads_of_one_page_migrate_it_once(g: G) -> None:
    a, data = await filled(g, 2, 7)
    _, dst = await g.to_device(a, a + 2 * P)
    offsets = [0, 8, 100, 1000, 4000]
    got = await asyncio.gather(*(g.env.read(a + P + o, 64) for o in offsets))
    assert got == [data[P + o : P + o + 64] for o in offsets]
    assert g.gpu.m2r_calls == [(g.p.pid, a + P, int(dst[1]))]
    assert g.gpu.freed == [int(dst[1])]
    assert swp(g.ptes(a, a + P))[0] == SWP_DEVICE_PRIVATE  # page 0 untouched


async def test_migrate_to_ram_with_the_migration_set_up_by_the_daemon(g: G) -> None:
    """Capability migrate-to-ram-setup: the page's migration arrives set up (its own
    MIGRATE event already raised); the device only copies and finishes it."""
    a, data = await filled(g, 2, 9)
    _, dst = await g.to_device(a, a + 2 * P)
    g.dev.wants_fault_migration = True
    assert await g.env.read(a + P, P) == page(data, 1)
    assert g.gpu.presetup == [True]
    assert g.gpu.freed == [int(dst[1])] and g.dev.migrations == {}
    assert is_present(g.ptes(a + P, a + 2 * P)).all()


@pytest.mark.parametrize("presetup", [True, False], ids=["set-up-by-the-daemon", "set-up-with-the-token"])
async def test_a_migration_left_open_in_migrate_to_ram_is_rolled_back(g: G, presetup: bool) -> None:
    """A migration of the faulting page the device has not finished when it answers
    is rolled back then (it borrows the fault's mmap lock, which the fault is about
    to give back), not at its time limit: the access is EFAULT at once."""
    a, data = await filled(g, 2, 10)
    _, dst = await g.to_device(a, a + 2 * P)
    before = g.ptes(a, a + 2 * P)
    g.dev.wants_fault_migration = presetup
    g.gpu.leave_open = True
    with raises_errno(errno.EFAULT):
        await asyncio.wait_for(g.env.read(a, 1), 2)
    assert g.dev.migrations == {} and (g.ptes(a, a + 2 * P) == before).all()
    assert g.gpu.mem[int(dst[0])] == page(data, 0) and g.gpu.freed == []
    g.gpu.leave_open = False
    assert await g.env.read(a, 2 * P) == data  # and it works once the device behaves


async def test_migrate_to_ram_failure_is_sigbus(g: G) -> None:
    a, data = await filled(g, 2, 8)
    _, dst = await g.to_device(a, a + 2 * P)
    before = g.ptes(a, a + 2 * P)
    g.gpu.fail_m2r = True
    with raises_errno(errno.EFAULT):
        await g.env.read(a, 1)
    with raises_errno(errno.EFAULT):
        await g.env.write(a + P, b"x")
    assert len(g.gpu.m2r_calls) == 2
    assert (g.ptes(a, a + 2 * P) == before).all()  # still on the device
    assert g.pgmap.used_pages == 2 and g.gpu.freed == []
    assert g.gpu.mem[int(dst[0])] == page(data, 0)
    g.gpu.fail_m2r = False
    assert await g.env.read(a, 2 * P) == data


async def test_fenced_owner_page_access_is_efault(g: G) -> None:
    k = g.k
    a, _ = await filled(g, 2, 9)
    await g.to_device(a, a + 2 * P)
    k.fence_device(g.dev, "test")
    with raises_errno(errno.EFAULT):
        await g.env.read(a, P)
    with raises_errno(errno.EFAULT):
        await g.env.write(a + P, b"x")
    assert g.gpu.m2r_calls == []  # a fenced device is not called
    await k.munmap(g.p.pid, a, 2 * P)  # the entries can still be zapped
    assert g.p.mm.rss == [0, 0, 0] and g.pgmap.used_pages == 0
    assert g.gpu.freed == []  # ... without telling a fenced device


# ==== 5. M2S ===============================================================================
async def test_m2s_device_private_back_to_system(g: G) -> None:
    k, mm = g.k, g.p.mm
    a, data = await filled(g, 4, 10)
    frames = k.ram.used_frames
    _, dst = await g.to_device(a, a + 4 * P)
    g.gpu.mem[int(dst[0])] = pattern(1, 99)  # the device wrote page 0
    expect = pattern(1, 99) + data[P:]
    g.gpu.events.clear()
    g.env.fake.events.clear()
    mig = await g.setup(a, a + 4 * P, DEVP)
    assert list(mig.src_flags) == [V | M | W] * 4 and list(mig.src_pfns) == list(dst)
    assert [(e.event, e.owner) for e in g.env.fake.events] == [(Event.MIGRATE, g.dev.owner)]
    assert (swp(g.ptes(a, a + 4 * P)) == SWP_MIGRATION).all()
    # Device pages are not the device's to DMA: it copies from its own memory.
    payload = b"".join(g.gpu.mem[int(p)] for p in mig.src_pfns)
    await k.migrate_pages(g.dev, mig.id, u64(np.zeros(4)), u8([V | MIGRATE_PFN_SYSTEM_DATA] * 4), payload)
    await k.migrate_finalize(g.dev, mig.id)
    ptes = g.ptes(a, a + 4 * P)
    assert is_present(ptes).all() and wbit(ptes).all() and (pte_pfn(ptes) < k.ram.nframes).all()
    assert sorted(g.gpu.freed) == sorted(int(d) for d in dst) and g.pgmap.used_pages == 0
    assert mm.rss == [4, 0, 0] and k.ram.used_frames == frames
    assert g.gpu.m2r_calls == []
    assert await g.env.read(a, 4 * P) == expect
    assert g.gpu.m2r_calls == []


async def test_m2s_selects_only_device_pages_and_fills_holes(g: G) -> None:
    k, mm = g.k, g.p.mm
    a = await g.env.mmap(4)
    data = pattern(3, 11)
    await g.env.write(a, data)  # pages 0..2; page 3 never touched
    _, dst = await g.to_device(a, a + P)  # page 0 on the device
    mig = await g.setup(a, a + 4 * P, DEVP)
    # A system page is not selected by DEVICE_PRIVATE; an anonymous hole always is.
    assert list(mig.src_flags) == [V | M | W, 0, 0, M]
    payload = g.gpu.mem[int(dst[0])] + pattern(1, 12)
    await k.migrate_pages(g.dev, mig.id, u64(np.zeros(4)),
                          u8([V | MIGRATE_PFN_SYSTEM_DATA, 0, 0, V | MIGRATE_PFN_SYSTEM_DATA]), payload)
    await k.migrate_finalize(g.dev, mig.id)
    assert mm.rss == [4, 0, 0]
    assert is_present(g.ptes(a, a + 4 * P)).all()
    assert await g.env.read(a, 4 * P) == data + pattern(1, 12)
    assert g.gpu.freed == [int(dst[0])] and g.gpu.m2r_calls == []


# ==== 6. pages that do not migrate ========================================================
async def _refused_to_device(g: G, a: int, npages: int, data: bytes) -> None:
    k = g.k
    before = g.ptes(a, a + npages * P)
    rss = list(g.p.mm.rss)
    frames = k.ram.used_frames
    mig = await g.setup(a, a + npages * P)
    assert list(mig.src_flags) == [V | M | W] * npages  # collected ...
    assert (swp(g.ptes(a, a + npages * P)) == SWP_MIGRATION).all()
    dst = g.gpu.alloc(npages)
    g.copy_out(mig, dst)
    await k.migrate_pages(g.dev, mig.id, u64(dst), u8([V | W] * npages), b"")
    assert list(mig.src_flags) == [V | W] * npages  # ... but refused: MIGRATE cleared
    await k.migrate_finalize(g.dev, mig.id)
    assert (g.ptes(a, a + npages * P) == before).all()  # the originals are back
    assert g.p.mm.rss == rss and k.ram.used_frames == frames
    assert g.pgmap.used_pages == 0 and sorted(g.gpu.freed) == sorted(int(d) for d in dst)  # unused dst released
    assert await g.env.read(a, npages * P) == data
    assert g.gpu.m2r_calls == []


async def test_shared_anonymous_pages_do_not_move_to_device(g: G) -> None:
    a, data = await filled(g, 2, 13, flags=SHM)
    assert g.p.mm.rss == [0, 0, 2]
    await _refused_to_device(g, a, 2, data)


async def test_shared_file_pages_do_not_move_to_device(g: G) -> None:
    k, pid = g.k, g.p.pid
    fd, _ = await k.open(pid, "/f", O_CREAT | O_RDWR)
    data = pattern(2, 14)
    await k.pwrite(pid, fd, 0, data)
    a = await g.env.mmap(2, flags=MAP_SHARED, fd=fd)
    await g.env.write(a, data)  # populated, writable
    await _refused_to_device(g, a, 2, data)
    assert await k.pread(pid, fd, 0, 2 * P) == data


async def test_empty_ptes_of_file_and_shmem_vmas_are_not_collected(g: G) -> None:
    k, pid = g.k, g.p.pid
    fd, _ = await k.open(pid, "/f", O_CREAT | O_RDWR)
    await k.pwrite(pid, fd, 0, pattern(2, 15))
    for flags, kw in ((SHM, {}), (MAP_SHARED, {"fd": fd}), (MAP_PRIVATE, {"fd": fd})):
        a = await g.env.mmap(2, flags=flags, **kw)
        mig = await g.setup(a, a + 2 * P, SYS | DEVP)  # a successful setup that collects nothing
        assert list(mig.src_flags) == [0, 0] and mig.cpages == 0
        assert (g.ptes(a, a + 2 * P) == 0).all()
        await k.migrate_pages(g.dev, mig.id, u64(g.gpu.alloc(2)), u8([V, V]), b"")
        await k.migrate_finalize(g.dev, mig.id)
        assert (g.ptes(a, a + 2 * P) == 0).all() and g.pgmap.used_pages == 0


async def test_pages_shared_after_fork_are_collected_from_every_mapper(g: G) -> None:
    """try_to_migrate(): a page fork shared is unmapped from the other address space
    too (CLEAR there), and a migration that does not happen puts both back."""
    k = g.k
    a, data = await filled(g, 2, 16)
    child = await k.fork(g.p.pid)
    before = {mm: g.ptes(a, a + 2 * P, mm) for mm in (g.p.mm, child.mm)}
    assert (k.ram.mapcount[pte_pfn(before[g.p.mm])] == 2).all()
    mig = await g.setup(a, a + 2 * P)
    assert mig.cpages == 2 and all(f & MIGRATE_PFN_VALID for f in mig.src_flags)
    for mm in (g.p.mm, child.mm):
        assert (swp(g.ptes(a, a + 2 * P, mm)) == SWP_MIGRATION).all()
    await k.migrate_finalize(g.dev, mig.id)  # no destinations: nothing moves
    for mm in (g.p.mm, child.mm):
        assert (g.ptes(a, a + 2 * P, mm) == before[mm]).all()
    assert (k.ram.mapcount[pte_pfn(before[g.p.mm])] == 2).all()
    assert await g.env.read(a, 2 * P) == data
    assert await g.env.read(a, 2 * P, pid=child.pid) == data


async def test_shared_pages_move_to_the_device_for_both_mappers(g: G) -> None:
    k = g.k
    a, data = await filled(g, 2, 17)
    child = await k.fork(g.p.pid)
    _, dst = await g.to_device(a, a + 2 * P)
    for mm in (g.p.mm, child.mm):
        ptes = g.ptes(a, a + 2 * P, mm)
        assert (swp(ptes) == SWP_DEVICE_PRIVATE).all() and list(pte_pfn(ptes)) == list(dst)
        assert not wbit(ptes).any()  # both entries were read-only (COW)
    idx = g.pgmap.index(dst)
    assert (g.pgmap.refcount[idx] == 2).all() and (g.pgmap.mapcount[idx] == 2).all()
    assert k.ram.used_frames == 1  # the system copies are gone (only the zero page)
    assert await g.env.read(a, 2 * P, pid=child.pid) == data
    assert await g.env.read(a, 2 * P) == data


async def test_dst_zero_skips_the_page(g: G) -> None:
    k = g.k
    a, data = await filled(g, 3, 17)
    before = g.ptes(a, a + 3 * P)
    mig, dst = await g.to_device(a, a + 3 * P, skip=(1,))
    assert list(mig.src_flags) == [V | M | W, V | W, V | M | W]
    ptes = g.ptes(a, a + 3 * P)
    assert ptes[1] == before[1]
    assert (swp(ptes[[0, 2]]) == SWP_DEVICE_PRIVATE).all() and list(pte_pfn(ptes[[0, 2]])) == [dst[0], dst[2]]
    assert k.ram.refcount[pte_pfn(before)[1]] == 1 and k.ram.mapcount[pte_pfn(before)[1]] == 1
    assert g.pgmap.used_pages == 2 and g.gpu.freed == []
    assert await g.env.read(a + P, P) == page(data, 1)
    assert g.gpu.m2r_calls == []
    assert await g.env.read(a, 3 * P) == data


async def test_bad_destinations_change_nothing(g: G) -> None:
    k = g.k
    a, data = await filled(g, 3, 18)
    _, used = await g.to_device(a, a + P)  # page 0 holds a device page
    busy = int(used[0])
    mig = await g.setup(a + P, a + 3 * P)
    during = g.ptes(a, a + 3 * P)
    refs = g.pgmap.refcount.copy()
    free1, free2 = (int(x) for x in g.gpu.alloc(2))
    flags = u8([V | W, V | W])
    other_gpu = GpuDevice()
    other_dev = k.register_device("gpu1", other_gpu, MemoryKind.DEVICE_PRIVATE, 4)
    assert other_dev.pgmap is not None
    cases = [
        ([busy, free1], errno.EBUSY),  # still in use
        ([free1, free1], errno.EINVAL),  # used twice
        ([free1, g.pgmap.end], errno.EINVAL),  # past the device's range
        ([g.pgmap.base - 1, free1], errno.EINVAL),  # before it
        ([free1, other_dev.pgmap.base], errno.EINVAL),  # another device's page
        ([free1, 5], errno.EINVAL),  # a system frame
    ]
    for bad, err in cases:
        with raises_errno(err):
            await k.migrate_pages(g.dev, mig.id, u64(bad), flags, b"")
        assert (g.ptes(a, a + 3 * P) == during).all()
        assert (g.pgmap.refcount == refs).all()
        assert list(mig.src_flags) == [V | M | W] * 2
    with raises_errno(errno.EINVAL):  # wrong number of entries
        await k.migrate_pages(g.dev, mig.id, u64([free1]), u8([V]), b"")
    with raises_errno(errno.EINVAL):  # SYSTEM_DATA without the data
        await k.migrate_pages(g.dev, mig.id, u64([0, 0]), u8([V | MIGRATE_PFN_SYSTEM_DATA] * 2), b"")
    for bit in UNKNOWN_DST_BITS:
        with raises_errno(errno.EINVAL):
            await k.migrate_pages(g.dev, mig.id, u64([free1, free2]), u8([V | W, V | W | bit]), b"")
    assert (g.ptes(a, a + 3 * P) == during).all()
    assert (g.pgmap.refcount == refs).all() and g.gpu.freed == []
    # The same migration still completes.
    dst = np.array([free1, free2])
    g.copy_out(mig, dst)
    await k.migrate_pages(g.dev, mig.id, u64(dst), flags, b"")
    with raises_errno(errno.EINVAL):  # pages only once
        await k.migrate_pages(g.dev, mig.id, u64(dst), flags, b"")
    await k.migrate_finalize(g.dev, mig.id)
    assert list(pte_pfn(g.ptes(a, a + 3 * P))) == [busy, free1, free2]
    assert g.pgmap.used_pages == 3
    assert await g.env.read(a, 3 * P) == data


async def test_enomem_at_pages_changes_nothing() -> None:
    g = await make_g(Kernel(24 * P, swap_bytes=0, oom_killer=False))  # no swap, no OOM killer: ENOMEM
    k = g.k
    a, data = await filled(g, 2, 38)
    _, dst = await g.to_device(a, a + P)  # page 0 on the device, page 1 in RAM
    hog = await g.env.mmap(32)
    with raises_errno(errno.ENOMEM):
        for i in range(32):
            await g.env.write(hog + i * P, b"x")
    assert k.ram.free_frames == 0
    mig = await g.setup(a, a + 2 * P, SYS | DEVP)
    assert list(mig.src_flags) == [V | M | W] * 2
    refs = g.pgmap.refcount.copy()
    free = int(g.gpu.alloc(1)[0])
    flags = u8([V | MIGRATE_PFN_SYSTEM_DATA, V | W])
    with raises_errno(errno.ENOMEM):  # page 0 needs a system frame; page 1's device page is not taken
        await k.migrate_pages(g.dev, mig.id, u64([0, free]), flags, g.gpu.mem[int(dst[0])])
    assert (g.pgmap.refcount == refs).all() and not g.pgmap.locked.any()
    await k.migrate_finalize(g.dev, mig.id)
    assert list(pte_pfn(g.ptes(a, a + P))) == [dst[0]] and g.pgmap.used_pages == 1
    assert await g.env.read(a + P, P) == page(data, 1)


# ==== 7. setup errors ================================================================
async def test_setup_errors(g: G) -> None:
    k, pid = g.k, g.p.pid
    a = await g.env.mmap(6)
    await k.munmap(pid, a + 3 * P, P)  # [a, a+3P) and [a+4P, a+6P)
    for start, end in (
        (a, a + 6 * P),  # across a hole
        (a + 2 * P, a + 5 * P),
        (a + 3 * P, a + 4 * P),  # no VMA at all
        (a - P, a + P),  # starts before the VMA
        (a, a),  # empty
        (a + P, a),  # negative
        (a + 1, a + P),  # unaligned start
        (a, a + P + 1),  # unaligned end
    ):
        with raises_errno(errno.EINVAL):
            await g.setup(start, end)
    b = await g.env.mmap(4)
    await k.mprotect(pid, b + 2 * P, 2 * P, PROT_READ)  # two VMAs
    with raises_errno(errno.EINVAL):
        await g.setup(b, b + 4 * P)
    with raises_errno(errno.EINVAL):
        await g.setup(a, a + P, 1 << 7)  # unknown selector bit
    stranger = k.spawn("stranger")
    c = await k.mmap(stranger.pid, 0, P, RW, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    with raises_errno(errno.EPERM):
        await g.setup(c, c + P, pid=stranger.pid)
    with raises_errno(errno.EINVAL):
        await k.migrate_setup(g.dev, pid, a, a + P, DEVP, fault_token=12345)
    with raises_errno(errno.ESRCH):
        await g.setup(a, a + P, pid=999)
    # Unknown migration ids, and another device's migration.
    with raises_errno(errno.ENOENT):
        await k.migrate_pages(g.dev, 777, u64([0]), u8([0]), b"")
    with raises_errno(errno.ENOENT):
        await k.migrate_finalize(g.dev, 777)
    mig = await g.setup(a, a + P)
    with raises_errno(errno.ENOENT):
        await k.migrate_finalize(g.env.dev, mig.id)
    await k.migrate_finalize(g.dev, mig.id)
    with raises_errno(errno.ENOENT):
        await k.migrate_finalize(g.dev, mig.id)
    await settle()
    assert not g.p.mm.lock.locked  # no failed setup kept the mmap lock
    await asyncio.wait_for(k.munmap(pid, a, 6 * P), 1)


async def test_fault_token_is_bound_to_the_fault(g: G) -> None:
    """The token lends the faulting context's lock to the page's owner, for a range
    containing the faulting address, while migrate_to_ram runs."""
    k = g.k
    a, data = await filled(g, 3, 34)
    _, dst = await g.to_device(a, a + P)
    evil = GpuDevice()
    evil_dev = k.register_device("gpu1", evil, MemoryKind.DEVICE_PRIVATE, 4)  # never opened by the process
    seen: list[int] = []

    async def hook(pid: int, addr: int, pfn: int, token: int) -> None:
        seen.append(token)
        with raises_errno(errno.EINVAL):  # another device may not use it
            await k.migrate_setup(evil_dev, pid, a, a + 3 * P, SYS, token)
        with raises_errno(errno.EINVAL):  # the range must contain the faulting address
            await k.migrate_setup(g.dev, pid, a + P, a + 3 * P, SYS, token)

    g.gpu.m2r_hook = hook
    assert await g.env.read(a, 3 * P) == data
    assert len(seen) == 1 and g.gpu.freed == [int(dst[0])]
    with raises_errno(errno.EINVAL):  # expired with the fault
        await k.migrate_setup(g.dev, g.p.pid, a, a + P, DEVP, seen[0])
    assert is_present(g.ptes(a, a + 3 * P)).all()


# ==== 8. rollback ====================================================================
async def test_fence_between_setup_and_finalize_rolls_back(g: G) -> None:
    k, mm = g.k, g.p.mm
    a = await g.env.mmap(4)
    data = pattern(2, 19)
    await g.env.write(a, data)
    await g.env.read(a + 2 * P, P)  # zero page; page 3 a hole
    before = g.ptes(a, a + 4 * P)
    frames, rss = k.ram.used_frames, list(mm.rss)
    mig = await g.setup(a, a + 4 * P)
    assert (swp(g.ptes(a, a + 2 * P)) == SWP_MIGRATION).all()
    k.fence_device(g.dev, "test")
    await settle()
    assert (g.ptes(a, a + 4 * P) == before).all()
    assert k.ram.used_frames == frames and mm.rss == rss and g.pgmap.used_pages == 0
    assert (k.ram.mapcount[pte_pfn(before[:2])] == 1).all() and (k.ram.refcount[pte_pfn(before[:2])] == 1).all()
    assert not mm.migrations and not g.dev.migrations
    with raises_errno(errno.ENOENT):
        await k.migrate_finalize(g.dev, mig.id)
    assert await g.env.read(a, 4 * P) == data + ZERO_PAGE * 2
    await asyncio.wait_for(k.munmap(g.p.pid, a, 4 * P), 1)  # the mmap lock was released
    assert k.ram.used_frames == frames - 2


async def test_fence_between_pages_and_finalize_rolls_back(g: G) -> None:
    k, mm = g.k, g.p.mm
    a = await g.env.mmap(4)
    data = pattern(2, 20)
    await g.env.write(a, data)
    await g.env.read(a + 2 * P, P)  # zero page; page 3 a hole
    before = g.ptes(a, a + 4 * P)
    frames, rss = k.ram.used_frames, list(mm.rss)
    mig = await g.setup(a, a + 4 * P)
    dst = g.gpu.alloc(4)
    g.copy_out(mig, dst)
    await k.migrate_pages(g.dev, mig.id, u64(dst), u8([V | W] * 4), b"")
    assert mm.rss == [4, 0, 0] and g.pgmap.used_pages == 4
    k.fence_device(g.dev, "test")
    await settle()
    after = g.ptes(a, a + 4 * P)
    assert (after[:2] == before[:2]).all()
    assert (after[2:] == 0).all()  # the filled zero page and hole are emptied again
    assert mm.rss == rss and k.ram.used_frames == frames
    assert g.pgmap.used_pages == 0 and not g.pgmap.mapcount.any()
    assert g.gpu.freed == []  # a fenced device hears nothing
    assert await g.env.read(a, 4 * P) == data + ZERO_PAGE * 2
    await asyncio.wait_for(k.munmap(g.p.pid, a, 4 * P), 1)
    assert mm.rss == [0, 0, 0] and k.ram.used_frames == frames - 2


async def test_fence_rolls_back_m2s(g: G) -> None:
    k, mm = g.k, g.p.mm
    a, data = await filled(g, 2, 35)
    _, dst = await g.to_device(a, a + 2 * P)
    before = g.ptes(a, a + 2 * P)
    frames = k.ram.used_frames
    mig = await g.setup(a, a + 2 * P, DEVP)
    payload = b"".join(g.gpu.mem[int(p)] for p in mig.src_pfns)
    await k.migrate_pages(g.dev, mig.id, u64(np.zeros(2)), u8([V | MIGRATE_PFN_SYSTEM_DATA] * 2), payload)
    assert k.ram.used_frames == frames + 2
    k.fence_device(g.dev, "test")
    assert (g.ptes(a, a + 2 * P) == before).all()  # the device entries are back
    idx = g.pgmap.index(dst)
    assert (g.pgmap.refcount[idx] == 1).all() and (g.pgmap.mapcount[idx] == 1).all()
    assert k.ram.used_frames == frames and mm.rss == [2, 0, 0]  # the new frames were freed
    assert not (k.ram.flags & PG_LOCKED).any() and not g.pgmap.locked.any()
    with raises_errno(errno.EFAULT):  # their device is gone
        await g.env.read(a, P)
    await k.munmap(g.p.pid, a, 2 * P)
    assert g.pgmap.used_pages == 0 and mm.rss == [0, 0, 0] and g.gpu.freed == []


# ==== 9. the migration holds the mmap lock ================================================
async def test_munmap_waits_for_finalize(g: G) -> None:
    k, mm = g.k, g.p.mm
    a, _ = await filled(g, 2, 21)
    mig = await g.setup(a, a + 2 * P)
    dst = g.gpu.alloc(2)
    g.copy_out(mig, dst)
    unmap = asyncio.create_task(k.munmap(g.p.pid, a, 2 * P))
    await settle()
    assert not unmap.done()
    await k.migrate_pages(g.dev, mig.id, u64(dst), u8([V | W] * 2), b"")
    await settle()
    assert not unmap.done()
    assert (swp(g.ptes(a, a + 2 * P)) == SWP_MIGRATION).all()
    await k.migrate_finalize(g.dev, mig.id)
    await asyncio.wait_for(unmap, 1)
    assert (g.ptes(a, a + 2 * P) == 0).all() and mm.rss == [0, 0, 0]
    assert sorted(g.gpu.freed) == sorted(int(d) for d in dst) and g.pgmap.used_pages == 0


async def test_cpu_read_waits_for_finalize(g: G) -> None:
    k = g.k
    a, data = await filled(g, 2, 22)
    mig = await g.setup(a, a + 2 * P)
    dst = g.gpu.alloc(2)
    g.copy_out(mig, dst)
    reader = asyncio.create_task(g.env.read(a + P, P))
    await settle()
    assert not reader.done()
    await k.migrate_pages(g.dev, mig.id, u64(dst), u8([V | W] * 2), b"")
    await settle()
    assert not reader.done()
    await k.migrate_finalize(g.dev, mig.id)
    assert await asyncio.wait_for(reader, 1) == page(data, 1)
    # The page had reached the device; the waiting read brought it home.
    assert g.gpu.m2r_calls == [(g.p.pid, a + P, int(dst[1]))]
    assert swp(g.ptes(a, a + P))[0] == SWP_DEVICE_PRIVATE


async def test_range_fault_waits_for_finalize(g: G) -> None:
    env, k = g.env, g.k
    a, data = await filled(g, 1, 23)
    mig = await g.setup(a, a + P)
    r = await g.range_fault(a, a + P, 0, 0, dev=env.dev, sub=env.sub)
    assert list(r.flags) == [0]  # a migration entry, no fault asked: 0
    fault = asyncio.create_task(g.range_fault(a, a + P, HMM_PFN_REQ_FAULT, 0, dev=env.dev, sub=env.sub))
    await settle()
    assert not fault.done()
    await k.migrate_finalize(g.dev, mig.id)  # nothing moves (no pages call)
    r = await asyncio.wait_for(fault, 1)
    assert list(r.flags) == [HMM_PFN_VALID | HMM_PFN_WRITE]
    assert env.dma_read(r.pfns) == data


async def test_filled_hole_is_locked_until_finalize(g: G) -> None:
    """A hole filled at migrate_vma_pages maps a destination that stays locked until
    finalize: a CPU fault on it waits (it does not call migrate_to_ram), and another
    migration does not collect it."""
    k, env = g.k, g.env
    a = await env.mmap(2)
    mig = await g.setup(a, a + 2 * P)
    dst = g.gpu.alloc(2)
    g.copy_out(mig, dst)
    await k.migrate_pages(g.dev, mig.id, u64(dst), u8([V | W] * 2), b"")
    assert (swp(g.ptes(a, a + 2 * P)) == SWP_DEVICE_PRIVATE).all()
    reader = asyncio.create_task(env.read(a, P))
    await settle()
    assert not reader.done() and g.gpu.m2r_calls == []
    other = await g.setup(a, a + 2 * P, SYS | DEVP)
    assert list(other.src_flags) == [0, 0]  # the trylock fails: not collected
    await k.migrate_finalize(g.dev, other.id)
    await settle()
    assert not reader.done()
    await k.migrate_finalize(g.dev, mig.id)
    assert await asyncio.wait_for(reader, 1) == ZERO_PAGE
    assert g.gpu.m2r_calls == [(g.p.pid, a, int(dst[0]))] and g.gpu.freed == [int(dst[0])]
    # Unlocked now: the owner may migrate the other one.
    again = await g.setup(a + P, a + 2 * P, DEVP)
    assert list(again.src_flags) == [V | M | W]
    await k.migrate_finalize(g.dev, again.id)


async def test_fence_rolls_back_a_filled_hole_a_cpu_fault_waits_on(g: G) -> None:
    k, mm = g.k, g.p.mm
    a = await g.env.mmap(1)
    mig = await g.setup(a, a + P)
    dst = g.gpu.alloc(1)
    g.copy_out(mig, dst)
    await k.migrate_pages(g.dev, mig.id, u64(dst), u8([V | W]), b"")
    reader = asyncio.create_task(g.env.read(a, P))
    await settle()
    assert not reader.done()
    k.fence_device(g.dev, "test")
    assert await asyncio.wait_for(reader, 1) == ZERO_PAGE  # the hole came back empty
    assert g.gpu.m2r_calls == [] and g.gpu.freed == []
    assert g.pgmap.used_pages == 0 and not g.pgmap.locked.any() and mm.rss == [0, 0, 0]


async def test_system_destination_is_locked_until_finalize(g: G) -> None:
    k, mm = g.k, g.p.mm
    a = await g.env.mmap(1)
    mig = await g.setup(a, a + P, DEVP)  # a hole is collected whatever the selector
    assert list(mig.src_flags) == [M]
    await k.migrate_pages(g.dev, mig.id, u64([0]), u8([V | MIGRATE_PFN_SYSTEM_DATA]), pattern(1, 30))
    ptes = g.ptes(a, a + P)
    assert is_present(ptes).all() and mm.rss == [1, 0, 0]
    other = await g.setup(a, a + P, SYS)
    assert list(other.src_flags) == [0]  # locked by the first migration
    await k.migrate_finalize(g.dev, other.id)
    await k.migrate_finalize(g.dev, mig.id)
    assert (g.ptes(a, a + P) == ptes).all()
    assert await g.env.read(a, P) == pattern(1, 30)
    again = await g.setup(a, a + P, SYS)
    assert list(again.src_flags) == [V | M | W]
    await k.migrate_finalize(g.dev, again.id)


async def test_cpu_fault_wins_the_race_for_a_hole(g: G) -> None:
    """A hole is collected without a migration entry: a CPU write fills it first,
    and migrate_vma_pages then leaves it alone (MIGRATE cleared, dst released)."""
    k, mm = g.k, g.p.mm
    a = await g.env.mmap(2)
    await g.env.write(a, pattern(1, 31))
    mig = await g.setup(a, a + 2 * P)
    assert list(mig.src_flags) == [V | M | W, M]
    await g.env.write(a + P, pattern(1, 32))  # the CPU fills the hole meanwhile
    dst = g.gpu.alloc(2)
    g.copy_out(mig, dst)
    await k.migrate_pages(g.dev, mig.id, u64(dst), u8([V | W] * 2), b"")
    assert list(mig.src_flags) == [V | M | W, 0]
    await k.migrate_finalize(g.dev, mig.id)
    ptes = g.ptes(a, a + 2 * P)
    assert swp(ptes)[0] == SWP_DEVICE_PRIVATE and is_present(ptes[1])
    assert g.gpu.freed == [int(dst[1])] and g.pgmap.used_pages == 1 and mm.rss == [2, 0, 0]
    assert await g.env.read(a, 2 * P) == pattern(1, 31) + pattern(1, 32)


# ==== 10. teardown and fork ================================================================
async def test_munmap_and_madvise_free_device_pages(g: G) -> None:
    k, mm = g.k, g.p.mm
    a, _ = await filled(g, 4, 24)
    _, dst = await g.to_device(a, a + 4 * P)
    g.gpu.events.clear()
    await k.madvise(g.p.pid, a, P, MADV_DONTNEED)
    assert g.gpu.freed == [int(dst[0])] and mm.rss == [3, 0, 0]
    assert await g.env.read(a, P) == ZERO_PAGE and g.gpu.m2r_calls == []  # discarded, not migrated
    await k.munmap(g.p.pid, a, 4 * P)
    assert sorted(g.gpu.freed) == sorted(int(d) for d in dst)
    assert mm.rss == [0, 0, 0] and g.pgmap.used_pages == 0 and not g.pgmap.mapcount.any()
    assert g.gpu.m2r_calls == [] and g.gpu.mem == {}
    assert [e.event for e in g.gpu.events] == [Event.CLEAR, Event.UNMAP]


async def test_exit_frees_device_pages(g: G) -> None:
    k = g.k
    a, _ = await filled(g, 3, 25)
    frames = k.ram.used_frames
    _, dst = await g.to_device(a, a + 3 * P)
    mm = g.p.mm
    await k.exit(g.p.pid)
    assert sorted(g.gpu.freed) == sorted(int(d) for d in dst)
    assert mm.rss == [0, 0, 0] and g.pgmap.used_pages == 0
    assert g.gpu.m2r_calls == []
    assert k.ram.used_frames == frames - 3


async def test_fork_copies_device_entries_read_only(g: G) -> None:
    k = g.k
    a, data = await filled(g, 2, 26)
    _, dst = await g.to_device(a, a + 2 * P)
    g.gpu.events.clear()
    child = await k.fork(g.p.pid)
    assert [(e.event, e.start, e.end) for e in g.gpu.events] == [(Event.PROTECTION_PAGE, a, a + 2 * P)]
    for mm in (g.p.mm, child.mm):
        ptes = g.ptes(a, a + 2 * P, mm)
        assert (swp(ptes) == SWP_DEVICE_PRIVATE).all() and not wbit(ptes).any()
        assert list(pte_pfn(ptes)) == list(dst)
        assert mm.rss == [2, 0, 0]
    idx = g.pgmap.index(dst)
    assert (g.pgmap.refcount[idx] == 2).all() and (g.pgmap.mapcount[idx] == 2).all()

    # The owner still reports its pages in the parent, now read-only.
    r = await g.range_fault(a, a + 2 * P, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, g.dev.owner)
    assert list(r.flags) == [HMM_PFN_VALID] * 2 and list(r.pfns) == list(dst)

    # The child touches the page: migrate_to_ram collects it from both address
    # spaces (CLEAR in the parent) and both map the new system page, read-only.
    assert await g.env.read(a, P, pid=child.pid) == page(data, 0)
    assert g.gpu.m2r_calls == [(child.pid, a, int(dst[0]))]
    home = g.ptes(a, a + P, child.mm)
    assert is_present(home).all() and not wbit(home).any()
    assert (g.ptes(a, a + P, g.p.mm) == home).all()
    assert k.ram.mapcount[pte_pfn(home)[0]] == 2 and k.ram.refcount[pte_pfn(home)[0]] == 2
    assert g.gpu.freed == [int(dst[0])]
    # The child's first write copies (COW): the parent keeps the data.
    await g.env.write(a, b"kid", pid=child.pid)
    assert await g.env.read(a, P) == page(data, 0)
    assert (await g.env.read(a, P, pid=child.pid))[:3] == b"kid"

    await k.exit(child.pid)
    assert child.mm.rss == [0, 0, 0]
    assert g.pgmap.refcount[idx[1]] == 1 and g.pgmap.mapcount[idx[1]] == 1
    # With the child gone the parent's remaining device page has one mapping: it
    # comes home read-only as its entry was; a write then reuses the page (no copy).
    assert await g.env.read(a, 2 * P) == data
    assert sorted(g.gpu.freed) == sorted(int(d) for d in dst)
    assert g.pgmap.used_pages == 0
    ptes = g.ptes(a, a + 2 * P)
    assert is_present(ptes).all() and not wbit(ptes).any()
    await g.env.write(a, b"new")
    after = g.ptes(a, a + 2 * P)
    assert pte_pfn(after)[0] == pte_pfn(ptes)[0] and wbit(after)[0]
    assert await g.env.read(a, 2 * P) == b"new" + data[3:]


async def test_exclusive_pages_left_locked_are_unlocked_after_the_limit(g: G) -> None:
    """A device that never calls UnlockPages cannot hang CPU faults: the lock expires."""
    a, data = await filled(g, 1, 11)
    g.k.limits = dataclasses.replace(g.k.limits, page_lock_timeout_s=0.05)
    pfns = await g.k.make_exclusive(g.dev, g.p.pid, a, 1, True)
    assert g.k.ram.locks.is_locked(int(pfns[0]))
    assert await asyncio.wait_for(g.env.read(a, P), 2) == data  # waits for the expiry, then restores
    assert not g.k.ram.locks.is_locked(int(pfns[0]))


async def test_the_lock_limit_of_one_make_exclusive_spares_a_later_lock(g: G) -> None:
    """A page unlocked and locked again by a later MakeExclusive keeps the new lock
    when the first call's limit passes (else the device's UnlockPages fails EINVAL)."""
    a, _ = await filled(g, 1, 15)
    g.k.limits = dataclasses.replace(g.k.limits, page_lock_timeout_s=0.5)
    pfns = await g.k.make_exclusive(g.dev, g.p.pid, a, 1, True)
    assert g.k.unlock_pages(g.dev, u64(pfns)) == 1
    await asyncio.sleep(0.25)
    again = await g.k.make_exclusive(g.dev, g.p.pid, a, 1, True)
    await asyncio.sleep(0.35)  # past the first call's limit, not the second's
    assert g.k.ram.locks.is_locked(int(again[0]))
    assert g.k.unlock_pages(g.dev, u64(again)) == 1


async def test_a_silent_own_migration_leaves_the_notifier_sequence(g: G) -> None:
    """own-migrate-silent: the device never hears its own MIGRATE events, so they do
    not move its notifier's sequence either; a sequence read before the migration
    still range-faults and passes the device's read_retry afterwards."""
    a, _ = await filled(g, 4, 16)
    g.dev.own_migrate_silent = True
    before = await g.k.read_begin(g.dev, g.sub.id)
    await g.to_device(a, a + 2 * P)
    assert g.sub.invalidate_seq == before
    assert await g.k.read_begin(g.dev, g.sub.id) == before
    r = await g.k.range_fault(g.dev, g.sub.id, before, a, a + 2 * P, 0, 0, b"", g.dev.owner)
    assert (r.flags & V).all()
    g.dev.own_migrate_silent = False  # a device that hears them stores the new sequence
    await g.to_device(a + 2 * P, a + 4 * P)
    assert g.sub.invalidate_seq != before


async def test_a_migration_left_open_is_rolled_back_after_the_limit(g: G) -> None:
    """A live device that never finalizes cannot hold the mmap lock forever."""
    a, data = await filled(g, 2, 12)
    g.k.limits = dataclasses.replace(g.k.limits, migration_timeout_s=0.05)
    before = g.ptes(a, a + 2 * P)
    mig = await g.setup(a, a + 2 * P)
    await asyncio.wait_for(g.k.munmap(g.p.pid, a + P, P), 2)  # waits for the rollback, then runs
    assert g.dev.migrations == {}
    assert (g.ptes(a, a + P) == before[:1]).all()
    assert await g.env.read(a, P) == page(data, 0)
    with raises_errno(errno.ENOENT):
        await g.k.migrate_finalize(g.dev, mig.id)


async def test_a_finished_migration_is_not_kept_alive(g: G) -> None:
    """Its roll-back timer goes with it: a device migrating piece after piece must not
    have every finished piece's arrays held for --migration-timeout-ms."""
    a, _ = await filled(g, 4, 15)
    mig, _ = await g.to_device(a, a + 4 * P)
    home = await g.setup(a, a + 4 * P, DEVP)
    await g.k.migrate_finalize(g.dev, home.id)  # (ended without a pages step: all put back)
    refs = [weakref.ref(mig), weakref.ref(home)]
    del mig, home
    await asyncio.sleep(0)  # (the mmap lock is released in a task)
    gc.collect()
    assert [r() for r in refs] == [None, None]


async def test_unlock_pages_of_no_frame_is_einval_and_unlocks_nothing(g: G) -> None:
    """A PFN that is no frame (beyond RAM, 2^40, 2^64 - 1) is bad input: EINVAL and
    every lock kept (it once indexed past the frame table: an internal error). A
    frame that is not the device's lock is EINVAL too, the held ones unlocked all the
    same (a lock may expire, or its page be freed, under the device's feet)."""
    a, _ = await filled(g, 3, 16)
    pfns = await g.k.make_exclusive(g.dev, g.p.pid, a, 3, True)
    for bad in (g.k.ram.span + 7, 1 << 40, (1 << 64) - 1):
        with raises_errno(errno.EINVAL):
            g.k.unlock_pages(g.dev, u64(np.array([*pfns.tolist(), bad], dtype=np.uint64)))
        assert all(g.k.ram.locks.is_locked(int(p)) for p in pfns)
    assert g.k.unlock_pages(g.dev, u64(np.concatenate([pfns[:1], pfns[:1]]))) == 1  # named twice: one unlock
    free = int(g.k.ram.alloc(1)[0])  # a frame nobody locks
    with raises_errno(errno.EINVAL):
        g.k.unlock_pages(g.dev, u64(np.array([*pfns[1:].tolist(), free], dtype=np.uint64)))
    assert not any(g.k.ram.locks.is_locked(int(p)) for p in pfns)
    g.k.ram.put(np.array([free]))


async def test_freeing_an_exclusive_page_drops_its_lock(g: G) -> None:
    """The process unmaps a page a device still holds locked: the freed frame's next
    user must not wait on that stale lock."""
    a, _ = await filled(g, 1, 13)
    pfns = await g.k.make_exclusive(g.dev, g.p.pid, a, 1, True)
    await g.k.munmap(g.p.pid, a, P)
    assert not g.k.ram.locks.is_locked(int(pfns[0]))
    with raises_errno(errno.EINVAL):  # nothing of the device's is locked any more
        g.k.unlock_pages(g.dev, u64(pfns))


async def test_own_migration_keeps_dma_rights_of_pages_that_stay(g: G) -> None:
    """The migrating device may ignore its own MIGRATE event: its rights over a page
    that does not move (pinned) survive; those over pages that moved are revoked."""
    a, data = await filled(g, 2, 14)
    s = await g.k.read_begin(g.dev, g.sub.id)
    r = await g.k.range_fault(g.dev, g.sub.id, s, a, a + 2 * P, HMM_PFN_REQ_FAULT, 0, b"", 0)
    pin = await g.k.pin_user_pages(g.p.pid, a + P, 1, write=False, longterm=False, hold=True)
    await g.to_device(a, a + 2 * P)  # page 0 moves, page 1 is pinned and stays
    with raises_errno(errno.EFAULT):
        g.k.dma_read(g.dev, u64(r.pfns[:1]))  # the moved page's old frame: revoked
    assert b"".join(g.k.dma_read(g.dev, u64(r.pfns[1:]))) == page(data, 1)  # the pinned one: still held
    g.k.unpin_user_pages(g.p.pid, pin)


async def test_eviction_of_a_device_pfn_range(g: G) -> None:
    """EvictSetup over npages device PFNs from start_pfn (migrate_device_range)
    collects only the mapped pages of that range; the others stay on the device."""
    k, base = g.k, g.pgmap.base
    a = await g.env.mmap(8)
    await g.env.write(a, pattern(8, 5))
    _, dst = await g.to_device(a, a + 8 * P)
    ev = await k.evict_setup(g.dev, int(dst[2]), 3)
    assert ev.src_pfns.tolist() == dst[2:5].tolist()
    data = b"".join(g.gpu.mem[int(p)] for p in ev.src_pfns)
    for bit in UNKNOWN_DST_BITS:  # refused before any page is taken
        with raises_errno(errno.EINVAL):
            await k.migrate_pages(g.dev, ev.id, b"", u8([V | MIGRATE_PFN_SYSTEM_DATA | bit] * 3), data)
    await k.migrate_pages(g.dev, ev.id, b"", u8([V | MIGRATE_PFN_SYSTEM_DATA] * 3), data)
    await k.migrate_finalize(g.dev, ev.id)
    swp = pte_swp_type(g.ptes(a, a + 8 * P))
    assert (swp[2:5] == 0).all() and (swp[[0, 1, 5, 6, 7]] == SWP_DEVICE_PRIVATE).all()
    assert g.pgmap.used_pages == 5
    assert await g.env.read(a, 8 * P) == pattern(8, 5)  # the rest comes home through migrate_to_ram
    # A range must lie in the memory; a start without npages is not "the whole memory".
    for start, n in ((base + 1, 0), (base - 1, 2), (g.pgmap.end - 1, 2), (base, 1 << 64)):
        with raises_errno(errno.EINVAL):
            await k.evict_setup(g.dev, start, n)
    assert not g.dev.migrations


async def test_an_eviction_whose_reply_cannot_fit_the_device_limit_is_einval(g: G) -> None:
    """The reply lists 9 bytes per mapped page: a range with more pages in use than the
    device's negotiated message limit can list is refused up front, nothing done;
    smaller ranges are served."""
    k = g.k
    a = await g.env.mmap(8)
    await g.env.write(a, pattern(8, 6))
    _, dst = await g.to_device(a, a + 8 * P)
    g.dev.max_message_bytes = REPLY_OVERHEAD + 9 * 5  # room for 5 entries
    with raises_errno(errno.EINVAL):
        await k.evict_setup(g.dev)
    assert not g.dev.migrations and g.pgmap.used_pages == 8
    assert (pte_swp_type(g.ptes(a, a + 8 * P)) == SWP_DEVICE_PRIVATE).all()  # no CLEAR, no entry changed
    lo = int(dst.min())
    for start, n in ((lo, 5), (lo + 5, 3)):
        ev = await k.evict_setup(g.dev, start, n)
        data = b"".join(g.gpu.mem[int(p)] for p in ev.src_pfns)
        await k.migrate_pages(g.dev, ev.id, b"", u8([V | MIGRATE_PFN_SYSTEM_DATA] * ev.npages), data)
        await k.migrate_finalize(g.dev, ev.id)
    assert g.pgmap.used_pages == 0
    assert (pte_swp_type(g.ptes(a, a + 8 * P)) == 0).all()
    assert await g.env.read(a, 8 * P) == pattern(8, 6)


async def test_an_eviction_rolled_back_after_its_pages_step_frees_the_new_frames(g: G) -> None:
    """An eviction that got its contents (new system frames) and is then rolled back
    (left open past the limit, or its caller gone) keeps the device pages mapped and
    frees the frames it allocated for them."""
    k = g.k
    a = await g.env.mmap(4)
    await g.env.write(a, pattern(4, 7))
    await g.to_device(a, a + 4 * P)
    used = k.ram.used_frames
    ev = await k.evict_setup(g.dev)
    data = b"".join(g.gpu.mem[int(p)] for p in ev.src_pfns)
    await k.migrate_pages(g.dev, ev.id, b"", u8([V | MIGRATE_PFN_SYSTEM_DATA] * 4), data)
    assert k.ram.used_frames == used + 4
    k.abandon_migration(g.dev, ev.id)
    assert k.ram.used_frames == used
    assert (pte_swp_type(g.ptes(a, a + 4 * P)) == SWP_DEVICE_PRIVATE).all() and g.pgmap.used_pages == 4
    assert check_invariants(k) == []
    assert await g.env.read(a, 4 * P) == pattern(4, 7)


async def test_eviction_skips_the_holes_an_open_migration_filled(g: G) -> None:
    """A hole migrate_vma_pages filled is a device page the migration holds locked
    until finalize: eviction's trylock fails and leaves it (migrate_device_range).
    It used to be evicted, and a roll-back of the migration then unmapped frames it
    did not own, underflowed the device page's count and kept the mmap lock."""
    k = g.k
    a = await g.env.mmap(4)
    await g.env.write(a + 2 * P, pattern(2, 8))
    _, moved = await g.to_device(a + 2 * P, a + 4 * P)  # two device pages no migration holds
    mig = await g.setup(a, a + 2 * P)  # two holes
    dst = g.gpu.alloc(2)
    for d in dst:
        g.gpu.mem[int(d)] = ZERO_PAGE
    await k.migrate_pages(g.dev, mig.id, u64(dst), u8([V | W] * 2), b"")
    ev = await k.evict_setup(g.dev)
    assert sorted(ev.src_pfns.tolist()) == sorted(moved.tolist())  # not the locked holes
    data = b"".join(g.gpu.mem[int(p)] for p in ev.src_pfns)
    await k.migrate_pages(g.dev, ev.id, b"", u8([V | MIGRATE_PFN_SYSTEM_DATA] * 2), data)
    await k.migrate_finalize(g.dev, ev.id)
    assert (pte_swp_type(g.ptes(a, a + 2 * P)) == SWP_DEVICE_PRIVATE).all()
    k.abandon_migration(g.dev, mig.id)  # the holes come back empty, the device pages free
    assert (g.ptes(a, a + 2 * P) == 0).all() and g.pgmap.used_pages == 0
    assert check_invariants(k) == []
    await asyncio.wait_for(k.munmap(g.p.pid, a, 4 * P), 1)  # no mmap lock left held


async def test_a_roll_back_leaves_a_hole_filled_with_a_system_page(g: G) -> None:
    """A hole the pages step filled with a system page is mapped at once (present,
    writable, as migrate_vma_insert_page leaves it): the CPU may write it, another
    device may mirror it. A roll-back keeps it. It used to empty it with no
    invalidation: the write was lost and the mirror kept DMA rights to a freed frame."""
    k, env = g.k, g.env
    a = await env.mmap(1)
    mig = await g.setup(a, a + P, DEVP)  # the hole is collected whatever the selector
    await k.migrate_pages(g.dev, mig.id, u64([0]), u8([V | MIGRATE_PFN_SYSTEM_DATA]), pattern(1, 30))
    r = await env.fault(a, a + P, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    await env.write(a, pattern(1, 31))
    k.abandon_migration(g.dev, mig.id)
    assert env.dma_read(r.pfns) == pattern(1, 31)  # still the page, still the mirror's
    assert await env.read(a, P) == pattern(1, 31)
    assert check_invariants(k) == []


async def test_a_cpu_fault_on_a_run_an_eviction_already_took_waits_for_it(g: G) -> None:
    """An eviction takes the pages run by run, each inside its CLEAR; a fault on a run
    already taken meets migration entries and must wait for the eviction's finalize.
    The eviction used to be registered only after the last run, so the fault spun
    and failed (EFAULT, SIGBUS) while a later run's CLEAR was still being acked."""
    k, env = g.k, g.env
    a, data = await filled(g, 3, 7)
    await g.to_device(a, a + 3 * P)
    assert await env.read(a + P, P) == page(data, 1)  # page 1 home: the device pages are two runs
    gate, entered = asyncio.Event(), asyncio.Event()

    async def slow_second_run(sub: IntervalNotifier, rng, cur_seq: int) -> None:  # type: ignore[no-untyped-def]
        if rng.event == Event.CLEAR and rng.start == a + 2 * P:
            entered.set()
            await gate.wait()

    env.fake.hook = slow_second_run
    evicting = asyncio.ensure_future(k.evict_setup(g.dev))
    await asyncio.wait_for(entered.wait(), 2)
    reader = asyncio.ensure_future(env.read(a, P))
    await settle()
    assert not reader.done()  # waiting, not failed
    gate.set()
    ev = await asyncio.wait_for(evicting, 2)
    payload = b"".join(g.gpu.mem[int(p)] for p in ev.src_pfns)
    await k.migrate_pages(g.dev, ev.id, b"", u8([V | MIGRATE_PFN_SYSTEM_DATA] * ev.npages), payload)
    await k.migrate_finalize(g.dev, ev.id)
    assert await asyncio.wait_for(reader, 2) == page(data, 0)
    assert await env.read(a, 3 * P) == data


async def test_an_eviction_leaves_the_page_a_cpu_fault_is_bringing_home(g: G) -> None:
    """migrate_to_ram runs with the faulting page locked (do_swap_page): an eviction
    meanwhile skips it, and the device's own setup with the fault token still gets
    it. The eviction used to take it: that setup failed (EAGAIN), which a device
    over gRPC turns into a failed access (SIGBUS)."""
    k = g.k
    a, data = await filled(g, 2, 11)
    _, dst = await g.to_device(a, a + 2 * P)
    gate, entered = asyncio.Event(), asyncio.Event()

    async def held_up(pid: int, addr: int, pfn: int, token: int) -> None:
        entered.set()
        await gate.wait()

    g.gpu.m2r_hook = held_up
    reader = asyncio.ensure_future(g.env.read(a, P))
    await asyncio.wait_for(entered.wait(), 2)
    ev = await k.evict_setup(g.dev)
    assert ev.src_pfns.tolist() == [int(dst[1])]  # not the faulting page
    g.gpu.m2r_hook = None
    gate.set()
    assert await asyncio.wait_for(reader, 2) == page(data, 0)
    await k.migrate_pages(g.dev, ev.id, b"", u8([V | MIGRATE_PFN_SYSTEM_DATA]), g.gpu.mem[int(dst[1])])
    await k.migrate_finalize(g.dev, ev.id)
    assert await g.env.read(a, 2 * P) == data and g.pgmap.used_pages == 0


async def test_the_invariant_checker_accounts_for_open_migrations(g: G) -> None:
    """What an open migration holds — its pages' migration entries (still in RSS, as
    the kernel's), the destinations its pages step took, device pages under
    migration, an eviction's new frames — is counted: with migrations open at any
    step, the checker reports only that they are open (and the page locks held)."""
    k, pid = g.k, g.p.pid
    a, _ = await filled(g, 2, 13)
    opened = [f"address space of pid {pid}: 1 migration(s) open"]
    mig = await g.setup(a, a + 2 * P)
    assert check_invariants(k) == opened
    await k.migrate_pages(g.dev, mig.id, u64(g.gpu.alloc(2)), u8([V, V]), b"")
    assert check_invariants(k) == opened
    g.copy_out(mig, np.asarray(mig.dst_pfns))
    await k.migrate_finalize(g.dev, mig.id)
    assert check_invariants(k) == []
    home = await k.migrate_setup(g.dev, pid, a, a + 2 * P, DEVP)  # device pages under migration
    assert check_invariants(k) == opened
    await k.migrate_pages(g.dev, home.id, u64([0, 0]), u8([V | MIGRATE_PFN_SYSTEM_DATA] * 2), b"\1" * 2 * P)
    assert check_invariants(k) == [*opened, "2 page lock(s) held"]
    await k.migrate_finalize(g.dev, home.id)
    await g.to_device(a, a + 2 * P)
    ev = await k.evict_setup(g.dev)
    await k.migrate_pages(g.dev, ev.id, b"", u8([V | MIGRATE_PFN_SYSTEM_DATA] * 2), b"\2" * 2 * P)
    assert check_invariants(k) == opened
    await k.migrate_finalize(g.dev, ev.id)
    assert check_invariants(k) == []


async def test_unpin_while_the_process_exits_leaves_the_pin_to_the_exit(g: G) -> None:
    """An unpin that meets the process half way through exit (gone from the process
    table, its address space still being torn down) is ESRCH and changes nothing:
    the exit releases the pin. It used to drop the pin's record first and then fail,
    so the pin's references were never given back."""
    k = g.k
    a = await g.env.mmap(2)
    await g.env.write(a, pattern(2, 14))
    child = await k.fork(g.p.pid)  # maps it too, copy-on-write
    await k.insert_notifier(g.env.dev, child.pid, 0, 1 << 47)  # whose RELEASE holds the exit below
    pin = await k.pin_user_pages(child.pid, a, 2, write=False, longterm=False, hold=True)
    tearing = asyncio.Event()
    resume = asyncio.Event()

    async def hold_release(sub, rng, cur_seq):  # type: ignore[no-untyped-def]
        if rng.event == Event.RELEASE and rng.mm is child.mm:
            tearing.set()
            await resume.wait()

    g.env.fake.hook = hold_release
    exiting = asyncio.create_task(k.exit(child.pid))
    await asyncio.wait_for(tearing.wait(), 2)
    with raises_errno(errno.ESRCH):
        k.unpin_user_pages(child.pid, pin)
    resume.set()
    await asyncio.wait_for(exiting, 2)
    assert k.pins == {} and check_invariants(k) == []


async def test_the_invariant_checker_counts_a_page_cache_page_under_migration_as_file_memory(g: G) -> None:
    """A collected page-cache page (it will not move: finalize puts it back) is file
    memory in RSS while its migration entry stands."""
    k, pid = g.k, g.p.pid
    fd, _ = await k.open(pid, "/tmp/under-migration", O_RDWR | O_CREAT)
    await k.ftruncate(pid, fd, 2 * P)
    a = await k.mmap(pid, 0, 2 * P, RW, MAP_SHARED, fd, 0)
    await g.env.write(a, pattern(2, 15))
    mig = await g.setup(a, a + 2 * P)
    assert (mig.src_flags & V).all()  # collected
    assert check_invariants(k) == [f"address space of pid {pid}: 1 migration(s) open"]
    await k.migrate_finalize(g.dev, mig.id)
    assert check_invariants(k) == [] and await g.env.read(a, 2 * P) == pattern(2, 15)


async def test_a_page_cache_page_does_not_move_to_a_new_system_page(g: G) -> None:
    """A collected page of a shared file mapping given a SYSTEM_DATA destination keeps
    its page (MIGRATE cleared, the destination freed): a new anonymous page there
    would leave the file, and every other mapping of it, behind."""
    k, pid = g.k, g.p.pid
    fd, _ = await k.open(pid, "/tmp/stays", O_RDWR | O_CREAT)
    await k.ftruncate(pid, fd, 2 * P)
    a = await k.mmap(pid, 0, 2 * P, RW, MAP_SHARED, fd, 0)
    await g.env.write(a, pattern(2, 16))
    before, used = g.ptes(a, a + 2 * P), k.ram.used_frames
    mig = await g.setup(a, a + 2 * P)
    assert (mig.src_flags & (V | M) == V | M).all()  # collected
    await k.migrate_pages(g.dev, mig.id, u64([0, 0]), u8([V | MIGRATE_PFN_SYSTEM_DATA] * 2), b"\3" * 2 * P)
    assert not (mig.src_flags & M).any()
    await k.migrate_finalize(g.dev, mig.id)
    assert (g.ptes(a, a + 2 * P) == before).all() and k.ram.used_frames == used
    await g.env.write(a, b"through the mapping")
    assert await k.pread(pid, fd, 0, 19) == b"through the mapping"
    assert check_invariants(k) == []


async def test_a_migration_is_not_ended_under_its_running_pages_step(g: G) -> None:
    """A pages step that fills holes waits for its MIGRATE window. Meanwhile a finalize
    is EBUSY, a second pages step EINVAL, and a roll-back (time limit, caller gone)
    waits for the step, after which the step fails with ENOENT: every destination is
    given back. A finalize in that window used to end the migration under the step,
    which then left its destinations locked and allocated for good."""
    k = g.k
    a = await g.env.mmap(2)  # never touched: holes, filled at the pages step
    mig = await g.setup(a, a + 2 * P)
    in_window, resume = asyncio.Event(), asyncio.Event()

    async def hold(sub, rng, cur_seq):  # type: ignore[no-untyped-def]
        if rng.event == Event.MIGRATE:
            in_window.set()
            await resume.wait()

    g.env.fake.hook = hold
    free = int(np.count_nonzero(g.pgmap.refcount == 0))
    step = asyncio.create_task(k.migrate_pages(g.dev, mig.id, u64(g.gpu.alloc(2)), u8([V, V]), b""))
    await asyncio.wait_for(in_window.wait(), 2)
    with raises_errno(errno.EBUSY):
        await k.migrate_finalize(g.dev, mig.id)
    with raises_errno(errno.EINVAL):
        await k.migrate_pages(g.dev, mig.id, u64([0, 0]), u8([0, 0]), b"")
    k.abandon_migration(g.dev, mig.id)
    assert mig.id in g.dev.migrations  # not under the step
    resume.set()
    with raises_errno(errno.ENOENT):
        await asyncio.wait_for(step, 2)
    await settle()
    assert not g.dev.migrations and int(np.count_nonzero(g.pgmap.refcount == 0)) == free
    assert not g.pgmap.locked.any() and not g.ptes(a, a + 2 * P).any()
    assert check_invariants(k) == []
