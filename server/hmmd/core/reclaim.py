"""Reclaim: what the page allocator does when it runs out of frames, and how a page
goes to swap (also for MADV_PAGEOUT).

An operation that allocates system frames (a fault, a page coming home from a
device, fork's copies of pinned pages) gets OutOfMemoryError from PhysMem when too
few are free. A CPU access's fault loop then reclaims (Kernel.direct_reclaim) and
looks again; an operation marked ``reclaims`` has pages swapped out and runs again.
Both stand for __alloc_pages_slowpath retrying after try_to_free_pages, and fail
with ENOMEM only when reclaim frees nothing (or after MAX_RECLAIM_RETRIES rounds).

Reclaim takes anonymous and tmpfs/shmem pages (``shrink``: one address space's
pass): not pinned, locked or on a device; a THP split first; a page fork shares,
or a file page several processes map, from every process that maps it. Each run
of them is invalidated (CLEAR) in every mirror first (``page_out``). So a device
mirroring a process sees its pages taken under memory pressure, and faults them
back in, as on a loaded machine. File pages nothing maps go too (tmpfs:
Inode.swap_out); hugetlb pages never.

When reclaim cannot help, the OOM killer picks a process to kill
(Kernel.out_of_memory) and the operation tries again once it has exited; with the
killer off, or nothing left to kill, the operation fails with ENOMEM (a range fault's
-ENOMEM; a CPU access fails with EFAULT, as SIGBUS, when a device cannot bring its
page home). ``Process.OomKill`` kills a process of the caller's choosing.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

import numpy as np

from hmm.abi import PAGE_SHIFT, PAGE_SIZE, Event
from hmmd.core import rmap
from hmmd.core.pagetable import PTE_SOFT_DIRTY, PTE_YOUNG, SWP_SWAP, make_pte, pte_pfn, pte_present, swp_flags
from hmmd.core.physmem import PG_ANON, PG_LOCKED, ZERO_PFN, OutOfMemoryError
from hmmd.core.vma import VM_HUGETLB, VM_MIXEDMAP

if TYPE_CHECKING:
    from hmmd.core.mm import AddressSpace
    from hmmd.core.tmpfs import Inode
    from hmmd.core.vma import Vma

SWAP_CLUSTER_MAX = 32  # the fewest pages a reclaim aims for beyond the shortfall
WATERMARK_FRACTION = 256  # ... and at least this part of RAM (the gap up to a "high watermark")
MAX_RECLAIM_RETRIES = 16  # rounds of reclaim and retry for one operation (the page allocator's)

P = ParamSpec("P")
R = TypeVar("R")


class Reclaimer:
    """Chooses where pages are reclaimed from and counts what it did."""

    def __init__(self, nframes: int) -> None:
        self.target_extra = max(SWAP_CLUSTER_MAX, nframes // WATERMARK_FRACTION)
        self.stalls = 0  # allocstall: allocations that had to reclaim
        self.reclaimed = 0  # pgsteal_direct: pages their reclaim swapped out
        self._last_mm = 0  # the address space the last reclaim ended in

    async def reclaim(self, mms: list[AddressSpace], shortfall: int, page_cache: Callable[[int], int]) -> int:
        """Swap out pages until ``shortfall`` frames and the watermark's worth more are
        free. The address spaces take turns, starting after the one the last reclaim
        ended in; two sweeps over them, since a first sweep only takes pages not
        accessed lately (shrink, below) and ages the rest for the second.
        Between the sweeps, ``page_cache(n)`` swaps out up to n file pages nothing
        maps (as old as can be: no access bit says otherwise) and returns how many.
        Returns the pages swapped out: 0 when nothing could go."""
        self.stalls += 1
        want = shortfall + self.target_extra
        mms = sorted(mms, key=lambda m: m.id)
        first = next((i for i, m in enumerate(mms) if m.id > self._last_mm), 0)
        turn = mms[first:] + mms[:first]
        got = 0
        for sweep in range(2):
            for mm in turn:
                if got >= want:
                    break
                n = await shrink(mm, want - got)
                if n:
                    got += n
                    self._last_mm = mm.id
            if sweep == 0 and got < want:
                got += page_cache(want - got)
        self.reclaimed += got
        return got


async def reclaiming(kernel: Any, op: Callable[[], Awaitable[R]], held: Collection[AddressSpace] = ()) -> R:
    """Run ``op()``; on OutOfMemoryError reclaim — or, when reclaim frees nothing, let
    the OOM killer make room (Kernel.out_of_memory) — and run it again (a fresh call
    each time), until it succeeds, neither helps, or MAX_RECLAIM_RETRIES rounds have
    passed. ``op`` must be safe to run again after failing with ENOMEM (a fault keeps
    what it faulted in; a migration step changes nothing). ``held``: the address
    spaces whose mmap locks the caller holds meanwhile (an open migration's)."""
    for _ in range(MAX_RECLAIM_RETRIES):
        try:
            return await op()
        except OutOfMemoryError as e:
            if not await kernel.direct_reclaim(e.shortfall) and not await kernel.out_of_memory(held):
                raise
    return await op()


def reclaims(
    fn: Callable[Concatenate[Any, P], Awaitable[R]],
) -> Callable[Concatenate[Any, P], Awaitable[R]]:
    """Decorate a Kernel operation that allocates frames: ``reclaiming`` runs it."""

    @functools.wraps(fn)
    async def call(kernel: Any, *args: P.args, **kwargs: P.kwargs) -> R:
        return await reclaiming(kernel, lambda: fn(kernel, *args, **kwargs))

    return call


# ---- one address space's pages to swap (mm/vmscan.c, mm/rmap.c) -----------------------
@dataclass
class SwapBatch:
    """The pages one reclaim pass swaps out (their frames), and the slot each frame got
    at its first mapping: a page fork shares goes to one slot from every mapping."""

    frames: np.ndarray
    slots: dict[int, int] = field(default_factory=dict)


def _reclaimable_entries(mm: AddressSpace, ptes: np.ndarray) -> np.ndarray:
    """Per entry: whether reclaim may swap its page out now — an anonymous page in
    RAM, not the zero page, not locked, held by its mappings alone (not pinned);
    fork may have shared it, and a THP is split first."""
    pfns = pte_pfn(ptes)
    ram = mm.ram
    out = pte_present(ptes) & (pfns != ZERO_PFN) & (pfns < ram.nframes)
    p = pfns[out]
    out[out] = ((ram.flags[p] & PG_ANON) != 0) & ((ram.flags[p] & PG_LOCKED) == 0) \
        & (ram.refcount[p] == ram.mapcount[p])
    return out


def _reclaimable(mm: AddressSpace, vma: Vma, _: np.ndarray, ptes: np.ndarray) -> np.ndarray:
    """Per present entry of ``vma``: whether reclaim may take its page now — an
    anonymous page (_reclaimable_entries), or in a mapping of a tmpfs or shmem
    file a page of its page cache held by the cache and its mappings alone.
    Nothing of hugetlb or driver mappings."""
    if vma.flags & (VM_HUGETLB | VM_MIXEDMAP):
        return np.zeros(len(ptes), dtype=bool)
    out = _reclaimable_entries(mm, ptes)
    if vma.file is not None and vma.file.swap is not None:
        ram = mm.ram
        pfns = pte_pfn(ptes)
        cached = ~out & pte_present(ptes) & (pfns != ZERO_PFN) & (pfns < ram.nframes)
        p = pfns[cached]
        cached[cached] = ((ram.flags[p] & (PG_ANON | PG_LOCKED)) == 0) & (ram.refcount[p] == ram.mapcount[p] + 1)
        out |= cached
    return out


async def shrink(mm: AddressSpace, want: int) -> int:
    """Direct reclaim's pass over this mm: up to ``want`` of its anonymous and
    tmpfs/shmem pages go to swap, while it has room (_reclaimable; THPs split). A
    clock stands in for the kernel's LRU lists: from where the last pass stopped,
    wrapping around, a page not accessed since it was last passed (PTE not young)
    is taken, and one accessed loses that bit and is passed over: its second
    chance, in the next pass. A page mapped elsewhere too — one fork shares, a
    file page — goes from every address space that may map it first (the fork
    family, the file's mappers: try_to_unmap's rmap walk), then from this one; it
    stays if one of them cannot be locked. A file page then leaves its page cache
    for swap (Inode.swap_out). The mmap locks are only tried, and for reading:
    the kernel's reclaim takes none, so a fault of this mm that holds it (waiting
    for a device's migrate_to_ram, say) must not keep its pages from reclaim.
    Returns the frames freed."""
    want = min(want, mm.swap.npages - mm.swap.used)
    if want <= 0 or not mm.lock.try_acquire_read():
        return 0
    others: list[AddressSpace] = []
    try:
        if not mm.alive:
            return 0
        pages = mm.pages_where(lambda vma, addrs, ptes: _reclaimable(mm, vma, addrs, ptes))
        if not pages:
            return 0
        addrs = np.concatenate([a for _, a, _ in pages])
        ptes = np.concatenate([p for _, _, p in pages])
        young = (ptes & PTE_YOUNG) != 0
        order = np.roll(np.arange(len(addrs)), -int(np.searchsorted(addrs, mm.reclaim_hand)))
        old, passed = np.flatnonzero(~young[order]), np.flatnonzero(young[order])
        if len(old) >= want:  # the hand stops after the last page taken
            old = old[:want]
            passed = passed[passed < old[-1]]
            mm.reclaim_hand = int(addrs[order[old[-1]]]) + PAGE_SIZE
        _clear_young(mm, addrs[order[passed]])  # (a whole sweep: the hand is back where it was)
        chosen = np.sort(order[old])
        take, frames = addrs[chosen], pte_pfn(ptes[chosen])
        shared = frames[mm.ram.mapcount[frames] > 1]
        if len(shared):
            family = {m for v, _, _ in pages if v.anon_vma is not None for m in v.anon_vma.members}
            family |= {w.mm for v, _, _ in pages if v.file is not None for w in v.file.mappings}
            for other in sorted(cast("set[AddressSpace]", family - {mm}), key=lambda m: m.id):
                if other.alive and not other.lock.try_acquire_read():
                    keep = mm.ram.mapcount[frames] == 1  # (shared ones stay: a mapper is busy)
                    take, frames, shared = take[keep], frames[keep], shared[:0]
                    break
                if other.alive:
                    others.append(other)
        cached = _file_pages(mm, pages, take)  # (before their entries go)
        batch = SwapBatch(frames)
        freed = 0
        if len(shared):  # (a file page may be mapped twice here too)
            mine, _ = rmap.find(mm, lambda t: pte_present(t) & np.isin(pte_pfn(t), shared))
            take = np.union1d(take, mine)
        for each in [*others, mm] if len(shared) else [mm]:
            hit = take if each is mm else rmap.find(each, lambda t: pte_present(t) & np.isin(pte_pfn(t), shared))[0]
            for vma in list(each.vmas):
                lo, hi = np.searchsorted(hit, [vma.start, vma.end])
                if hi > lo:
                    freed += await page_out(each, vma, hit[lo:hi], batch)
        for inode, file_pages in cached:
            freed += inode.swap_out(mm.ram, file_pages)
        return freed
    finally:
        for other in others:
            await other.lock.release_read()
        await mm.lock.release_read()


def _file_pages(mm: AddressSpace, pages: list[tuple[Vma, np.ndarray, np.ndarray]], take: np.ndarray
                ) -> list[tuple[Inode, np.ndarray]]:
    """Of the pages at ``take`` (sorted) among ``pages``, the page-cache ones: their
    files and file page numbers."""
    out = []
    for vma, addrs, ptes in pages:
        if vma.file is None:
            continue
        sel = np.isin(addrs, take)
        sel[sel] = (mm.ram.flags[pte_pfn(ptes[sel])] & PG_ANON) == 0
        if sel.any():
            out.append((vma.file, vma.pgoff + ((addrs[sel] - vma.start) >> PAGE_SHIFT)))
    return out


def _clear_young(mm: AddressSpace, addrs: np.ndarray) -> None:
    """ptep_test_and_clear_young() on the pages at ``addrs``: no invalidation (the
    kernel only asks secondary MMUs that track access, which mirrors do not)."""
    for lo, hi in rmap.runs(np.sort(addrs)):
        mm.pt.scatter(lo, mm.pt.gather(lo, hi) & ~PTE_YOUNG)


async def page_out(mm: AddressSpace, vma: Vma, addrs: np.ndarray, batch: SwapBatch | None = None) -> int:
    """Swap out what may go among the pages at ``addrs`` (ascending, in ``vma``): a
    CLEAR window over each run of them (try_to_unmap), the pages out inside it. A
    THP among them is split first and goes as base pages (the kernel may swap the
    folio whole; the pages and their contents are the same). Without ``batch``
    (MADV_PAGEOUT) only pages mapped here alone go; with it (reclaim), a page fork
    shares too, its other mappings having gone the same way or going next, and
    file pages lose this mapping (the caller swaps them out of the page cache
    once no mapping is left). Returns the anonymous frames freed."""
    out = 0
    for lo, hi in rmap.runs(addrs):
        await mm.split_huge_pmds(lo, hi, whole=True)  # (split_folio: the THP goes as base pages)
        async with mm.invalidate(lo, hi, Event.CLEAR):
            out += _page_out_run(mm, vma, lo, hi, batch)
    return out


def _page_out_run(mm: AddressSpace, vma: Vma, start: int, end: int, batch: SwapBatch | None = None) -> int:
    """Inside the CLEAR window over [start, end): each anonymous page that may go
    (see page_out) gets a swap entry — a new slot with its contents while swap has
    room, or the slot ``batch`` gave its frame at another mapping — and loses
    this mapping; a file page of ``batch`` loses it too. Anything else stays.
    Returns the anonymous frames freed."""
    ptes = mm.pt.gather(start, end)
    ram = mm.ram
    unmapped = False
    if batch is None:
        idx = np.flatnonzero(mm.movable(start, end))
    else:
        idx = np.flatnonzero(_reclaimable_entries(mm, ptes) & np.isin(pte_pfn(ptes), batch.frames))
        if vma.file is not None:
            unmapped = _unmap_cached(mm, vma, ptes, batch.frames)
    slots = batch.slots if batch is not None else {}
    pfns = pte_pfn(ptes[idx])
    new = [pfn for pfn in pfns.tolist() if pfn not in slots]  # (a frame is mapped once in an mm)
    stored = mm.swap.store([ram.data[pfn] for pfn in new]).tolist()  # each with its first reference
    slots.update(zip(new, stored, strict=False))
    has = np.array([pfn in slots for pfn in pfns.tolist()], dtype=bool)
    idx, pfns = idx[has], pfns[has]
    if not len(idx):
        if unmapped:
            mm.pt.scatter(start, ptes)
        return 0
    named = np.array([slots[pfn] for pfn in pfns.tolist()], dtype=np.int64)
    fresh = set(new[: len(stored)])
    mm.swap.dup(np.array([slots[pfn] for pfn in pfns.tolist() if pfn not in fresh], dtype=np.int64))
    ptes[idx] = make_pte(named, swp_flags(SWP_SWAP)) | (ptes[idx] & PTE_SOFT_DIRTY)
    mm.pt.scatter(start, ptes)
    mm._account(vma, pfns, -1)
    ram.unmap(pfns)
    ram.put(pfns)
    mm.swapents += len(idx)
    return int(np.count_nonzero(ram.refcount[pfns] == 0))


async def page_out_file_mapping(mm: AddressSpace, vma: Vma, start: int, end: int) -> None:
    """MADV_PAGEOUT of [start, end) of a file mapping: what it maps alone and
    reclaim may take — page-cache pages (they leave the cache for swap once this
    was their last mapping) and private copies — goes (madvise_cold_or_pageout:
    pages mapped elsewhere too are skipped)."""
    addrs, ptes = rmap.find(mm, pte_present, start, end)
    keep = _reclaimable(mm, vma, addrs, ptes)
    keep[keep] = mm.ram.mapcount[pte_pfn(ptes[keep])] == 1
    addrs, ptes = addrs[keep], ptes[keep]
    cached = _file_pages(mm, [(vma, addrs, ptes)], addrs)
    await page_out(mm, vma, addrs, SwapBatch(pte_pfn(ptes)))
    for inode, pages in cached:
        inode.swap_out(mm.ram, pages)


def _unmap_cached(mm: AddressSpace, vma: Vma, ptes: np.ndarray, frames: np.ndarray) -> bool:
    """Clear the entries of file ``vma`` among ``ptes`` that map page-cache pages
    among ``frames`` (try_to_unmap of a file folio: no swap entry, the page cache
    keeps the page). The caller writes ``ptes`` back. Whether any was cleared."""
    pfns = pte_pfn(ptes)
    hit = pte_present(ptes) & np.isin(pfns, frames)
    hit[hit] = (mm.ram.flags[pfns[hit]] & PG_ANON) == 0
    if not hit.any():
        return False
    gone = pfns[hit]
    ptes[hit] = 0
    mm._account(vma, gone, -1)
    mm.ram.unmap(gone)
    mm.ram.put(gone)
    return True
