"""migrate_vma: move the pages of a range between system RAM and device memory.

The kernel's three steps (mm/migrate_device.c):

1. ``migrate_vma_setup`` collects the range inside a MIGRATE invalidation carrying
   the caller's owner, and replaces each collected page's PTE with a migration
   entry (holes and the zero page are collected without touching their PTE);
2. the driver copies, then ``migrate_vma_pages`` checks every destination and
   fills holes;
3. ``migrate_vma_finalize`` points each migration entry at its new page, or puts
   the original back, and drops the references of whatever lost.

A ``Migration`` holds the mmap read lock from setup to finalize — across several
requests from the device — unless it runs inside a CPU fault (migrate_to_ram),
whose lock it borrows. CPU and range faults that meet a migration entry wait for
finalize (``AddressSpace.wait_migration``).
"""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass, field

import numpy as np

from hmm.abi import (
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_DEVICE_COHERENT,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    PAGE_SHIFT,
    PAGE_SIZE,
    Event,
)
from hmm.errors import KernelError
from hmmd.core import rmap
from hmmd.core.devmem import DevicePageMap, MemoryKind
from hmmd.core.mm import RSS_ANON, AddressSpace, make_present
from hmmd.core.pagetable import (
    PTE_WRITE,
    SWP_DEVICE_PRIVATE,
    SWP_MIGRATION,
    pte_pfn,
    pte_present,
    pte_swp_type,
    swp_flags,
)
from hmmd.core.physmem import PG_ANON, PG_LOCKED, ZERO_PFN
from hmmd.core.rmap import Mapping
from hmmd.core.vma import VM_DONTEXPAND, VM_HUGETLB, VM_IO, VM_MIXEDMAP, VM_PFNMAP, Vma

_migration_ids = itertools.count(1)


def device_private_pte(pfns: np.ndarray, write: np.ndarray | bool) -> np.ndarray:
    entries = (pfns.astype(np.uint64) << np.uint64(PAGE_SHIFT)) | swp_flags(SWP_DEVICE_PRIVATE)
    return np.where(write, entries | PTE_WRITE, entries).astype(np.uint64)


@dataclass(eq=False)
class Migration:
    """struct migrate_vma, plus what finalize needs to restore."""

    mm: AddressSpace
    vma: Vma
    start: int
    end: int
    owner: int
    pgmap: DevicePageMap | None
    src_pfns: np.ndarray  # int64
    src_flags: np.ndarray  # uint8 MIGRATE_PFN_*
    orig: np.ndarray  # original PTE where a migration entry was installed, else 0
    holds_lock: bool
    id: int = field(default_factory=lambda: next(_migration_ids))
    # After migrate_vma_pages: the destination of each entry that will move (0: none),
    # and the holes already filled with their new page.
    dst_pfns: np.ndarray | None = None
    filled: np.ndarray | None = None
    pages_done: bool = False
    finalized: bool = False
    # Mappings of the collected pages in other address spaces of the fork family
    # (try_to_migrate), and those address spaces, whose mmap read locks the
    # caller took for the migration.
    others: list[Mapping] = field(default_factory=list)
    family: list[AddressSpace] = field(default_factory=list)

    @property
    def npages(self) -> int:
        return len(self.src_flags)

    @property
    def cpages(self) -> int:
        return int(np.count_nonzero(self.src_flags & MIGRATE_PFN_MIGRATE))


async def migrate_vma_setup(
    mm: AddressSpace, start: int, end: int, select: int, owner: int, pgmap: DevicePageMap | None,
    *, fault_pfn: int | None = None, holds_lock: bool = True, family: list[AddressSpace] | None = None,
) -> Migration:
    """Collect [start, end) (page-aligned, one VMA). The caller holds the mmap read
    lock, which the migration keeps until finalize if ``holds_lock``, and those of
    ``family``: the other address spaces fork made share the VMA's anonymous pages.
    A collected page they map too is unmapped there (CLEAR) and moves for all.

    EINVAL: no VMA, a range outside it, a hugetlb or special VMA, an empty range, or
    a ``fault_pfn`` that is not one of the range's device-private pages.
    """
    if end <= start or start & (PAGE_SIZE - 1) or end & (PAGE_SIZE - 1):
        raise KernelError(errno.EINVAL, "empty or unaligned migration range")
    vma = mm.vmas.find(start)
    if vma is None or end > vma.end:
        raise KernelError(errno.EINVAL, f"[{start:#x}, {end:#x}) is not inside one mapping")
    if vma.flags & (VM_IO | VM_PFNMAP | VM_MIXEDMAP | VM_DONTEXPAND | VM_HUGETLB):
        raise KernelError(errno.EINVAL, "cannot migrate a special or hugetlb mapping")
    ram = mm.ram
    n = (end - start) >> PAGE_SHIFT
    src_pfns = np.zeros(n, dtype=np.int64)
    src_flags = np.zeros(n, dtype=np.uint8)
    orig = np.zeros(n, dtype=np.uint64)
    mm.pt.split_huge(start, end)

    async with mm.invalidate(start, end, Event.MIGRATE, owner=owner):
        ptes = mm.pt.gather(start, end)
        pfns = pte_pfn(ptes)
        present = pte_present(ptes)
        swp = pte_swp_type(ptes)
        writable = (ptes & PTE_WRITE) != 0
        if fault_pfn is not None:
            hit = (swp == SWP_DEVICE_PRIVATE) & (pfns == fault_pfn)
            if not hit.any():
                raise KernelError(errno.EINVAL, "the faulting page is not a device-private page of this range")

        holes = ptes == 0
        if vma.is_anonymous:
            src_flags[holes] = MIGRATE_PFN_MIGRATE
        system = present & (pfns < ram.nframes)

        def take_frames(page: np.ndarray) -> None:
            # Pinned pages (extra references) and pages another migration locked
            # (the folio trylock fails) are not collected.
            idx = np.flatnonzero(page)
            p = pfns[idx]
            cache_ref = ((ram.flags[p] & PG_ANON) == 0).astype(np.int32)
            ok = (ram.refcount[p] == ram.mapcount[p] + cache_ref) & ((ram.flags[p] & PG_LOCKED) == 0)
            take = idx[ok]
            src_pfns[take] = pfns[take]
            src_flags[take] = MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE

        if select & MIGRATE_VMA_SELECT_SYSTEM:
            zero = system & (pfns == ZERO_PFN)
            src_flags[zero] = MIGRATE_PFN_MIGRATE
            take_frames(system & (pfns != ZERO_PFN))
        coherent = pgmap is not None and pgmap.kind == MemoryKind.DEVICE_COHERENT
        if select & MIGRATE_VMA_SELECT_DEVICE_COHERENT and coherent:
            assert pgmap is not None
            take_frames(present & pgmap.contains(pfns))
        if select & MIGRATE_VMA_SELECT_DEVICE_PRIVATE and pgmap is not None and not coherent:
            dev = (swp == SWP_DEVICE_PRIVATE) & pgmap.contains(pfns)
            idx = np.flatnonzero(dev)
            take = idx[~pgmap.locked[pgmap.index(pfns[idx])]]
            src_pfns[take] = pfns[take]
            src_flags[take] = MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE
        collected = (src_flags & MIGRATE_PFN_VALID) != 0
        src_flags[collected & writable] |= MIGRATE_PFN_WRITE

        # Migration entries replace the collected pages; they keep the reference.
        idx = np.flatnonzero(collected)
        if len(idx):
            orig[idx] = ptes[idx]
            entries = (ptes[idx] & (PTE_WRITE | ~np.uint64((1 << PAGE_SHIFT) - 1))) | swp_flags(SWP_MIGRATION)
            ptes[idx] = entries.astype(np.uint64)
            mm.pt.scatter(start, ptes)
            mm.frames("unmap", src_pfns[idx])

    mig = Migration(mm, vma, start, end, owner, pgmap, src_pfns, src_flags, orig, holds_lock)
    mm.migrations[mig.id] = mig
    await _unmap_family(mig, family or [])
    return mig


def _mapcount(mm: AddressSpace, pfns: np.ndarray) -> np.ndarray:
    dev = mm.devmem.is_device(pfns)
    out = np.zeros(len(pfns), dtype=np.int64)
    out[~dev] = mm.ram.mapcount[pfns[~dev]]
    for pgmap, group in mm.devmem.group(pfns[dev]):
        out[np.flatnonzero(dev)[np.isin(pfns[dev], group)]] = pgmap.mapcount[pgmap.index(group)]
    return out


async def _unmap_family(mig: Migration, family: list[AddressSpace]) -> None:
    """try_to_migrate(): a collected page still mapped elsewhere (fork shared it) is
    unmapped from the other address spaces of its family, each inside a CLEAR
    invalidation. A page with a mapping that cannot be found does not migrate."""
    if not family:
        return
    mm = mig.mm
    collected = np.flatnonzero(mig.orig != 0)
    shared = collected[_mapcount(mm, mig.src_pfns[collected]) > 0]
    if not len(shared):
        return
    wanted = mig.src_pfns[shared]

    def theirs(ptes: np.ndarray) -> np.ndarray:
        mapped = pte_present(ptes) | (pte_swp_type(ptes) == SWP_DEVICE_PRIVATE)
        return mapped & np.isin(pte_pfn(ptes), wanted)

    for other in family:
        if other is mm or not other.alive:
            continue
        addrs, _ = rmap.find(other, theirs)
        for start, end in rmap.runs(addrs):
            async with other.invalidate(start, end, Event.CLEAR):
                ptes = other.pt.gather(start, end)
                idx = np.flatnonzero(theirs(ptes))
                if not len(idx):
                    continue
                old = ptes[idx].copy()
                ptes[idx] = (old & (PTE_WRITE | ~np.uint64((1 << PAGE_SHIFT) - 1))) | swp_flags(SWP_MIGRATION)
                other.pt.scatter(start, ptes)
                other.frames("unmap", pte_pfn(old))
                mig.others.append(Mapping(other, start + (idx << PAGE_SHIFT), pte_pfn(old), old))
        other.migrations[mig.id] = mig
    # Still mapped somewhere: not migratable (finalize puts every entry back).
    stuck = shared[_mapcount(mm, mig.src_pfns[shared]) > 0]
    mig.src_flags[stuck] = 0


def _lock(mm: AddressSpace, pfns: np.ndarray, locked: bool, holder: object) -> None:
    """Take or release the page lock of migration destinations (system or device)."""
    dev = mm.devmem.is_device(pfns)
    sys_pfns = pfns[~dev]
    if len(sys_pfns):
        if locked:
            mm.ram.locks.lock(sys_pfns, holder)
        else:
            mm.ram.locks.unlock(sys_pfns, holder)
    if dev.any():
        for pgmap, group in mm.devmem.group(pfns[dev]):
            pgmap.locked[pgmap.index(group)] = locked


async def migrate_vma_pages(mig: Migration, dst_pfns: np.ndarray, dst_flags: np.ndarray, data: bytes) -> None:
    """Check every destination; fill holes. Entries that keep MIGRATE will migrate.

    ``dst_flags`` VALID with a device PFN names one of the caller's free device pages;
    VALID|SYSTEM_DATA asks for a new system page holding the next 4096 bytes of
    ``data``. EINVAL for destinations that are not the caller's free pages, or data
    of the wrong length; nothing changes then.
    """
    mm, ram = mig.mm, mig.mm.ram
    if mig.pages_done or mig.finalized:
        raise KernelError(errno.EINVAL, "migrate_vma_pages was already called for this migration")
    n = mig.npages
    if len(dst_pfns) != n or len(dst_flags) != n:
        raise KernelError(errno.EINVAL, f"dst needs {n} entries")
    migrating = (mig.src_flags & MIGRATE_PFN_MIGRATE) != 0
    want = migrating & ((dst_flags & MIGRATE_PFN_VALID) != 0)
    from_data = want & ((dst_flags & MIGRATE_PFN_SYSTEM_DATA) != 0)
    to_device = want & ~from_data
    if len(data) != int(from_data.sum()) * PAGE_SIZE:
        raise KernelError(errno.EINVAL, f"data must hold {int(from_data.sum())} pages")
    if int(from_data.sum()) > ram.free_frames:  # before taking device pages: nothing changes
        raise KernelError(errno.ENOMEM, f"out of system memory for {int(from_data.sum())} destination pages")
    if to_device.any():
        if mig.pgmap is None:
            raise KernelError(errno.EINVAL, "this device has no memory to migrate to")
        mig.pgmap.take_free(dst_pfns[to_device])
        if mig.pgmap.kind == MemoryKind.DEVICE_COHERENT:
            ram.flags[dst_pfns[to_device]] |= PG_ANON
    dst = np.zeros(n, dtype=np.int64)
    dst[to_device] = dst_pfns[to_device]
    if from_data.any():
        frames = ram.alloc(int(from_data.sum()))
        ram.data[frames] = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        ram.flags[frames] |= PG_ANON
        dst[from_data] = frames
    # Destinations stay locked until finalize (a filled hole is mapped before then).
    _lock(mm, dst[want], True, mig)

    keep = want.copy()
    has_src = (mig.src_flags & MIGRATE_PFN_VALID) != 0
    if to_device.any():  # only anonymous memory moves to a device: page-cache sources stay
        src = np.where(has_src & (mig.src_pfns < ram.nframes), mig.src_pfns, ZERO_PFN)
        keep &= ~(to_device & has_src & (mig.src_pfns < ram.nframes) & ((ram.flags[src] & PG_ANON) == 0))

    # Holes and the zero page get their new page now, if the CPU did not fill them first,
    # inside one MIGRATE window from the first of them to the end (as the kernel does).
    filled = np.zeros(n, dtype=bool)
    holes = np.flatnonzero(keep & ~has_src)
    if len(holes):
        async with mm.invalidate(mig.start + (int(holes[0]) << PAGE_SHIFT), mig.end, Event.MIGRATE,
                                 owner=mig.owner):
            ptes = mm.pt.gather(mig.start, mig.end)
            cur = ptes[holes]
            empty = (cur == 0) | (pte_present(cur) & (pte_pfn(cur) == ZERO_PFN))
            ok = holes[empty] if mig.vma.is_anonymous else holes[:0]
            keep[np.setdiff1d(holes, ok)] = False
            if len(ok):
                new = dst[ok]
                ptes[ok] = _new_entries(mm, new, mig.vma.writable)
                mm.pt.scatter(mig.start, ptes)
                mm.frames("map", new)
                mm._add_rss(RSS_ANON, len(ok))
                mm.anon_vma_prepare(mig.vma)
                filled[ok] = True

    unused = want & ~keep
    if unused.any():  # an unused destination is released (a device page goes back to its owner)
        _lock(mm, dst[unused], False, mig)
        mm.frames("put", dst[unused])
    dst[~keep] = 0
    mig.src_flags[migrating & ~keep] &= ~np.uint8(MIGRATE_PFN_MIGRATE)
    mig.dst_pfns, mig.filled, mig.pages_done = dst, filled, True


def _new_entries(mm: AddressSpace, pfns: np.ndarray, write: np.ndarray | bool) -> np.ndarray:
    """CPU entries for new pages: device-private entries, or present system pages."""
    dev = mm.devmem.is_device(pfns)
    return np.where(dev, device_private_pte(pfns, write), make_present(pfns, write, write)).astype(np.uint64)


def _finalize_others(mig: Migration, dst: np.ndarray, moving: np.ndarray) -> None:
    """The other address spaces' entries of the collected pages: the new page (each
    mapping taking a reference of its own) or the original back."""
    if not mig.others:
        return
    where = {int(p): i for i, p in enumerate(mig.src_pfns) if mig.orig[i] != 0}
    for m in mig.others:
        i = np.array([where[int(p)] for p in m.pfns], dtype=np.int64)
        mv = moving[i]
        new = dst[i]
        write = (m.orig & PTE_WRITE) != 0
        rmap.store(m.mm, m.addrs, np.where(mv, _new_entries(m.mm, new, write), m.orig).astype(np.uint64))
        m.mm.frames("map", new[mv])
        m.mm.frames("get", new[mv])
        m.mm.frames("put", m.pfns[mv])
        m.mm.frames("map", m.pfns[~mv])


def migrate_vma_finalize(mig: Migration, *, rollback: bool = False) -> None:
    """Point each migration entry at its new page or restore the original, and drop
    the references of whatever lost (a device page whose last reference goes is
    freed to its owner). With ``rollback`` nothing moves and filled holes are
    emptied again: the device that started the migration is gone.
    Does not release the mmap lock; the caller does, if the migration held it."""
    if mig.finalized:
        return
    mm = mig.mm
    n = mig.npages
    dst = mig.dst_pfns if mig.dst_pfns is not None else np.zeros(n, dtype=np.int64)
    collected = mig.orig != 0
    moving = collected & (dst != 0) & ((mig.src_flags & MIGRATE_PFN_MIGRATE) != 0) & (not rollback)
    moved, back = np.flatnonzero(moving), np.flatnonzero(collected & ~moving)
    ptes = mm.pt.gather(mig.start, mig.end)
    if len(moved):
        ptes[moved] = _new_entries(mm, dst[moved], (mig.orig[moved] & PTE_WRITE) != 0)
        mm.frames("map", dst[moved])
    if len(back):
        ptes[back] = mig.orig[back]
        mm.frames("map", mig.src_pfns[back])
    undo = np.flatnonzero(mig.filled) if rollback and mig.filled is not None else np.zeros(0, dtype=np.int64)
    if len(undo):
        ptes[undo] = 0
        mm.frames("unmap", dst[undo])
        mm._add_rss(RSS_ANON, -len(undo))
    mm.pt.scatter(mig.start, ptes)
    _lock(mm, dst[dst != 0], False, mig)
    if len(moved):
        mm.frames("put", mig.src_pfns[moved])
    _finalize_others(mig, dst, moving)
    unused = np.flatnonzero(collected & (dst != 0) & ~moving)
    if len(unused):
        mm.frames("put", dst[unused])
    if len(undo):
        mm.frames("put", dst[undo])
    if rollback:
        mig.src_flags &= ~np.uint8(MIGRATE_PFN_MIGRATE)
    mig.finalized = True
    for space in {id(mm): mm, **{id(x.mm): x.mm for x in mig.others}}.values():
        space.migrations.pop(mig.id, None)
        space.wake_migration_waiters()
