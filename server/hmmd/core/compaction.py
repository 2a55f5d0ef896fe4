"""Memory compaction (/proc/sys/vm/compact_memory, Admin.CompactMemory): pages move
to new frames, their contents and PTE bits with them, after a CLEAR to every
mirror. A device that mirrors them must fault them again to learn the new frames,
as after the kernel's try_to_migrate. Only what nothing else holds moves:
anonymous pages mapped once, not pinned, locked or mapped by a PMD."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hmm.abi import Event
from hmmd.core import rmap
from hmmd.core.pagetable import FLAGS_MASK, make_pte, pte_pfn
from hmmd.core.physmem import PG_ANON, PG_ANON_EXCLUSIVE
from hmmd.core.vma import VM_HUGETLB

if TYPE_CHECKING:
    from hmmd.core.mm import AddressSpace
    from hmmd.core.vma import Vma


async def compact(mm: AddressSpace) -> int:
    """Memory compaction's part in this mm: every movable page — anonymous, mapped
    only here, held by nothing else (not pinned, not locked), not the zero page,
    not mapped by a PMD — moves to a new frame, a CLEAR window over each run of
    them first (try_to_migrate). The mmap lock is only tried: a busy mm moves
    nothing (compaction skips what it cannot lock). Returns the pages moved."""
    if not mm.lock.try_acquire_write():
        return 0
    moved = 0
    try:
        for _, addrs, _ in _movable_pages(mm):
            for lo, hi in rmap.runs(addrs):
                async with mm.invalidate(lo, hi, Event.CLEAR):
                    moved += _move_frames(mm, lo, hi)
    finally:
        await mm.lock.release_write()
    return moved


def _movable_pages(mm: AddressSpace) -> list[tuple[Vma, np.ndarray, np.ndarray]]:
    def movable(vma: Vma, addrs: np.ndarray, ptes: np.ndarray) -> np.ndarray:
        if not vma.is_anonymous or vma.flags & VM_HUGETLB:
            return np.zeros(len(ptes), dtype=bool)
        return mm.movable_entries(addrs, ptes)

    return mm.pages_where(movable)


def _move_frames(mm: AddressSpace, start: int, end: int) -> int:
    """Inside a CLEAR window: the movable pages of [start, end) to new frames, with
    their contents and every PTE bit but the frame number."""
    ptes = mm.pt.gather(start, end)
    idx = np.flatnonzero(mm.movable(start, end))[: mm.ram.free_frames]  # (no room: they stay)
    if not len(idx):
        return 0
    old = pte_pfn(ptes[idx])
    new = mm.ram.alloc(len(idx), zero=False)
    mm.ram.copy(new, old)
    mm.ram.flags[new] |= mm.ram.flags[old] & (PG_ANON | PG_ANON_EXCLUSIVE)  # (movable: anonymous)
    mm.ram.map(new)
    ptes[idx] = make_pte(new, 0) | (ptes[idx] & FLAGS_MASK)
    mm.pt.scatter(start, ptes)
    mm.ram.unmap(old)
    mm.ram.put(old)
    return len(idx)
