"""Eviction of device memory (migrate_device_range / _pages / _finalize).

Eviction empties a device without knowing virtual addresses: it starts from the
device's pages in use, finds every CPU entry mapping them (in every address
space: a page forked into a child is mapped twice), and replaces each with a
migration entry inside a CLEAR invalidation with no owner — every mirror, the
owner's included, must drop its mappings. The device then hands over each page's
contents; finalize points every former mapping at the new system page, which the
mappings share (a forked page stays shared, copy-on-write). Used by dmirror's
RELEASE and close, and by a device detaching gracefully.

Device-coherent pages are RAM's frames, so the core can copy them itself
(``migrate_device_coherent``): for a long-term pin (migrate_device_coherent_folio)
and when a coherent device is fenced — its memory was host-addressable, so
nothing is lost.

Each affected address space's mmap read lock is held from setup to finalize, as
for migrate_vma, so faults on the migration entries wait for finalize.
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
    PAGE_SHIFT,
    PAGE_SIZE,
    Event,
)
from hmm.errors import KernelError
from hmmd.core import rmap
from hmmd.core.devmem import DevicePageMap, MemoryKind
from hmmd.core.mm import AddressSpace, make_present
from hmmd.core.pagetable import (
    PTE_SOFT_DIRTY,
    PTE_WRITE,
    SWP_DEVICE_PRIVATE,
    SWP_MIGRATION,
    pte_pfn,
    pte_present,
    pte_swp_type,
    swp_flags,
)
from hmmd.core.physmem import PG_ANON, PG_LOCKED, Contents, PhysMem
from hmmd.core.rmap import Mapping

_eviction_ids = itertools.count(1 << 32)  # distinct from migrate_vma ids


@dataclass(eq=False)
class Eviction:
    pgmap: DevicePageMap
    src_pfns: np.ndarray  # the device pages collected, one entry each
    src_flags: np.ndarray
    mappings: list[Mapping]
    id: int = field(default_factory=lambda: next(_eviction_ids))
    dst: np.ndarray | None = None  # the new system frame of each collected page
    finalized: bool = False
    holds_lock: bool = True
    locked_mms: list[AddressSpace] = field(default_factory=list)  # whose mmap read locks it holds

    @property
    def npages(self) -> int:
        return len(self.src_pfns)

    @property
    def cpages(self) -> int:
        return int(np.count_nonzero(self.src_flags & MIGRATE_PFN_MIGRATE))

    @property
    def mms(self) -> list[AddressSpace]:
        return list({id(m.mm): m.mm for m in self.mappings}.values())


async def migrate_device_setup(pgmap: DevicePageMap, mms: list[AddressSpace],
                               only: np.ndarray | None = None, span: tuple[int, int] | None = None) -> Eviction:
    """migrate_device_range over every page of ``pgmap`` in use, or those among the
    device PFNs [lo, hi) of ``span`` (migrate_device_pfns over ``only``). The caller
    holds the mmap read lock of each of ``mms`` (every live address space that may
    map them)."""
    mappings: list[Mapping] = []
    coherent = pgmap.kind == MemoryKind.DEVICE_COHERENT
    # A page a migration holds locked (a hole its pages step filled), or a CPU fault
    # (migrate_to_ram), fails the trylock.
    movable = ~(pgmap.locked | pgmap.faulting)
    if coherent and mms:
        # migrate_device_unmap(): a coherent page someone else holds (a GUP pin, an
        # extra reference) or a migration has locked is not taken — taken before
        # anything is unmapped, when every reference should be a mapping's.
        locked = (mms[0].ram.flags[pgmap.base : pgmap.end] & PG_LOCKED) != 0
        movable &= (pgmap.refcount == pgmap.mapcount) & ~locked
    if span is not None:
        movable[: span[0] - pgmap.base] = False
        movable[span[1] - pgmap.base :] = False

    def ours(ptes: np.ndarray) -> np.ndarray:
        pfns = pte_pfn(ptes)
        kind = pte_present(ptes) if coherent else pte_swp_type(ptes) == SWP_DEVICE_PRIVATE
        hit = kind & pgmap.contains(pfns)
        hit[hit] = movable[pgmap.index(pfns[hit])]
        return hit if only is None else hit & np.isin(pfns, only)

    # Registered in an address space before its first migration entry: a fault that
    # meets the entry waits for this eviction (the next run's CLEAR may take a while).
    empty = np.zeros(0, dtype=np.int64)
    ev = Eviction(pgmap, empty, empty.astype(np.uint8), mappings)
    for mm in mms:
        addrs, _ = rmap.find(mm, ours)
        for start, end in rmap.runs(addrs):
            await mm.split_huge_pmds(start, end)  # a device PMD the run cuts: CLEAR over its 2 MiB first
            async with mm.invalidate(start, end, Event.CLEAR):
                ptes = mm.pt.gather(start, end)
                idx = np.flatnonzero(ours(ptes))
                if not len(idx):
                    continue
                mm.pt.split_huge(start, end)  # evicted page by page: a device PMD is split
                mm.migrations[ev.id] = ev
                orig = ptes[idx].copy()
                ptes[idx] = (orig & (PTE_WRITE | PTE_SOFT_DIRTY | ~np.uint64((1 << PAGE_SHIFT) - 1))) \
                    | swp_flags(SWP_MIGRATION)
                mm.pt.scatter(start, ptes)
                pfns_hit = pte_pfn(orig)
                mm.frames("unmap", pfns_hit)
                mappings.append(Mapping(mm, start + (idx << PAGE_SHIFT), pfns_hit, orig))
    mapped = np.unique(np.concatenate([m.pfns for m in mappings])) if mappings else np.zeros(0, dtype=np.int64)
    writable = set()
    for m in mappings:
        writable.update(m.pfns[(m.orig & PTE_WRITE) != 0].tolist())
    flags = np.full(len(mapped), MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE, dtype=np.uint8)
    flags[np.isin(mapped, list(writable))] |= MIGRATE_PFN_WRITE
    ev.src_pfns, ev.src_flags = mapped.astype(np.int64), flags
    return ev


def migrate_device_pages(ev: Eviction, dst_flags: np.ndarray, data: Contents, ram: PhysMem) -> None:
    """The device's contents for collected pages (VALID|SYSTEM_DATA entries, in order),
    copied into new system frames. May be called several times, each carrying some
    of the pages (a message cannot hold a whole device); a page given no data by
    finalize is not evicted. EINVAL for a page given data twice."""
    if ev.finalized:
        raise KernelError(errno.EINVAL, "the eviction is finalized")
    if len(dst_flags) != ev.npages:
        raise KernelError(errno.EINVAL, f"dst needs {ev.npages} entries")
    want = ((dst_flags & MIGRATE_PFN_VALID) != 0) & ((dst_flags & MIGRATE_PFN_SYSTEM_DATA) != 0)
    if len(data) != int(want.sum()) * PAGE_SIZE:
        raise KernelError(errno.EINVAL, f"data must hold {int(want.sum())} pages")
    if ev.dst is None:
        ev.dst = np.zeros(ev.npages, dtype=np.int64)
    if (ev.dst[want] != 0).any():
        raise KernelError(errno.EINVAL, "a page was given its data already")
    if want.any():
        frames = ram.alloc(int(want.sum()), zero=False)
        ram.write(frames, data)
        ram.flags[frames] |= PG_ANON
        ev.dst[want] = frames


def migrate_device_finalize(ev: Eviction, *, rollback: bool = False) -> None:
    """Point every former mapping at the new frame of its page — one frame shared by
    all of them — or restore the device entries; then drop the references of what
    lost. RSS is unchanged (device pages already counted as anonymous memory)."""
    if ev.finalized:
        return
    given = ev.dst if ev.dst is not None else np.zeros(ev.npages, dtype=np.int64)
    dst = np.zeros_like(given) if rollback else given  # rolled back: the frames given go unused
    ev.src_flags[dst == 0] &= ~np.uint8(MIGRATE_PFN_MIGRATE)
    moved_old, moved_new = [], []
    for m in ev.mappings:
        new = dst[np.searchsorted(ev.src_pfns, m.pfns)]
        moved = new != 0
        write = (m.orig & PTE_WRITE) != 0
        entries = make_present(new, write, write) | (m.orig & PTE_SOFT_DIRTY)  # (remove_migration_pte)
        rmap.store(m.mm, m.addrs, np.where(moved, entries, m.orig).astype(np.uint64))
        m.mm.ram.map(new[moved])
        m.mm.frames("map", m.pfns[~moved])
        moved_old.append(m.pfns[moved])
        moved_new.append(new[moved])
    if ev.mappings:
        mm = ev.mappings[0].mm
        old, new = np.concatenate(moved_old), np.concatenate(moved_new)
        mm.ram.mark_exclusive_if_mapped_once(new)
        if len(new):
            # Each new frame came with one reference; every further mapping takes one.
            frames, counts = np.unique(new, return_counts=True)
            mm.ram.get(np.repeat(frames, counts - 1))
            mm.frames("put", old)
        unused = given[(given != 0) & ~np.isin(given, new)]
        if len(unused):
            mm.ram.put(unused)
    ev.finalized = True
    for mm in ev.mms:
        mm.migrations.pop(ev.id, None)
        mm.wake_migration_waiters()


async def migrate_device_coherent(pgmap: DevicePageMap, mms: list[AddressSpace], ram: PhysMem,
                                  only: np.ndarray | None = None) -> int:
    """Move coherent pages (all in use, or ``only``) to system RAM with the core's own
    copy; the caller holds the mmap read locks of ``mms``. Returns how many moved."""
    assert pgmap.kind == MemoryKind.DEVICE_COHERENT
    ev = await migrate_device_setup(pgmap, mms, only)
    if ev.npages:
        want = (ev.src_flags & MIGRATE_PFN_MIGRATE) != 0
        flags = np.where(want, MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA, 0).astype(np.uint8)
        try:
            migrate_device_pages(ev, flags, ram.data[ev.src_pfns[want]].reshape(-1), ram)
        except BaseException:  # no frames for them (ENOMEM): every page stays where it was
            migrate_device_finalize(ev, rollback=True)
            raise
    migrate_device_finalize(ev)
    return ev.cpages
