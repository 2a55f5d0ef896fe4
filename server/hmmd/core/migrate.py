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

Compound (THP) migration, with MIGRATE_VMA_SELECT_COMPOUND: a whole, PMD-aligned
2 MiB span of the range that is a THP, the huge zero page, an unpopulated span of
a THP-enabled anonymous mapping, or one of the caller's device-private PMDs or
coherent THPs is collected as one compound entry instead of being split. Inside,
every array stays per page (``page_pfns``/``page_flags``, and the heads of the
compound entries); the device sees the kernel's form (``src_pfns``/``src_flags``):
the head carries MIGRATE_PFN_COMPOUND and the 511 entries after it are 0. A
compound destination (512 aligned device pages, or SYSTEM_DATA for a new THP)
moves it whole and finalize maps it by PMD again; per-page destinations split it.
"""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass, field

import numpy as np

from hmm.abi import (
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_COMPOUND,
    MIGRATE_VMA_SELECT_DEVICE_COHERENT,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SHIFT,
    PMD_SIZE,
    PTRS_PER_PTE,
    Event,
)
from hmm.errors import KernelError
from hmmd.core import rmap
from hmmd.core.devmem import DevicePageMap, MemoryKind
from hmmd.core.mm import RSS_ANON, AddressSpace, make_present
from hmmd.core.pagetable import (
    PTE_SOFT_DIRTY,
    PTE_WRITE,
    SWP_DEVICE_PRIVATE,
    SWP_MIGRATION,
    pmd_shape,
    pte_pfn,
    pte_present,
    pte_swp_type,
    swp_flags,
)
from hmmd.core.physmem import PG_ANON, PG_LOCKED, ZERO_PFN, Contents, OutOfMemoryError, page_rows
from hmmd.core.rmap import Mapping
from hmmd.core.vma import (
    VM_DONTEXPAND,
    VM_HUGEPAGE,
    VM_HUGETLB,
    VM_IO,
    VM_MIXEDMAP,
    VM_NOHUGEPAGE,
    VM_PFNMAP,
    Vma,
)

H = PTRS_PER_PTE  # pages of a compound (order-9) entry

_migration_ids = itertools.count(1)


def device_private_pte(pfns: np.ndarray, write: np.ndarray | bool) -> np.ndarray:
    entries = (pfns.astype(np.uint64) << np.uint64(PAGE_SHIFT)) | swp_flags(SWP_DEVICE_PRIVATE)
    return np.where(write, entries | PTE_WRITE, entries).astype(np.uint64)


@dataclass(eq=False)
class Migration:
    """struct migrate_vma, plus what finalize needs to restore. Per page inside;
    ``src_pfns``/``src_flags`` are what the device sees (compound entries folded)."""

    mm: AddressSpace
    vma: Vma
    start: int
    end: int
    owner: int
    pgmap: DevicePageMap | None
    page_pfns: np.ndarray  # int64, the source of every page (compound entries unfolded)
    page_flags: np.ndarray  # uint8 MIGRATE_PFN_* of every page (never COMPOUND)
    orig: np.ndarray  # original PTE where a migration entry was installed, else 0
    holds_lock: bool
    # Page index of each compound entry's head (it covers 512 pages from there).
    heads: list[int] = field(default_factory=list)
    # PMD leaves split for compound entries, mapped by PMD again if nothing of them moves.
    was_huge: list[int] = field(default_factory=list)
    id: int = field(default_factory=lambda: next(_migration_ids))
    # After migrate_vma_pages: the destination of each entry that will move (0: none),
    # the holes already filled with their new page, and the compound entries that
    # move whole (finalize maps them by PMD).
    dst_pfns: np.ndarray | None = None
    filled: np.ndarray | None = None
    whole: list[int] = field(default_factory=list)
    pages_done: bool = False
    finalized: bool = False
    # A pages step is running (it waits for its MIGRATE window): finalize must wait,
    # and a roll-back asked for meanwhile (time limit, device gone) happens after it.
    stepping: bool = False
    rollback_pending: bool = False
    # Mappings of the collected pages in other address spaces of the fork family
    # (try_to_migrate), and those address spaces, whose mmap read locks the
    # caller took for the migration.
    others: list[Mapping] = field(default_factory=list)
    family: list[AddressSpace] = field(default_factory=list)

    @property
    def npages(self) -> int:
        return len(self.page_flags)

    @property
    def cpages(self) -> int:
        """Pages still migrating (a compound entry counts its 512)."""
        return int(np.count_nonzero(self.page_flags & MIGRATE_PFN_MIGRATE))

    def _tails(self) -> np.ndarray:
        tails = np.zeros(self.npages, dtype=bool)
        for h in self.heads:
            tails[h + 1 : h + H] = True
        return tails

    @property
    def src_pfns(self) -> np.ndarray:
        """The kernel's src PFNs: a compound entry is its head's PFN, then 511 zeros."""
        if not self.heads:
            return self.page_pfns
        return np.where(self._tails(), 0, self.page_pfns)

    @property
    def src_flags(self) -> np.ndarray:
        """The kernel's src flags: a compound head has MIGRATE_PFN_COMPOUND, its tail 0."""
        if not self.heads:
            return self.page_flags
        out = np.where(self._tails(), np.uint8(0), self.page_flags).astype(np.uint8)
        out[self.heads] |= np.uint8(MIGRATE_PFN_COMPOUND)
        return out


def fault_range(mm: AddressSpace, addr: int) -> tuple[int, int, int]:
    """migrate_to_ram's range and selectors for a CPU fault at ``addr``: the faulting
    page, or the whole 2 MiB block (SELECT_COMPOUND) when the CPU maps it by PMD."""
    page = addr & ~(PAGE_SIZE - 1)
    h = page & ~(PMD_SIZE - 1)
    vma = mm.vmas.find(page)
    if (h >> PMD_SHIFT) in mm.pt.huge and vma is not None and vma.start <= h and h + PMD_SIZE <= vma.end:
        return h, h + PMD_SIZE, MIGRATE_VMA_SELECT_DEVICE_PRIVATE | MIGRATE_VMA_SELECT_COMPOUND
    return page, page + PAGE_SIZE, MIGRATE_VMA_SELECT_DEVICE_PRIVATE


def thp_enabled(vma: Vma) -> bool:
    """Whether a fault in ``vma`` would map a THP (hmmd's THP mode is "madvise")."""
    return bool(vma.is_anonymous and vma.flags & VM_HUGEPAGE and not vma.flags & VM_NOHUGEPAGE)


async def migrate_vma_setup(
    mm: AddressSpace, start: int, end: int, select: int, owner: int, pgmap: DevicePageMap | None,
    *, fault_pfn: int | None = None, holds_lock: bool = True, family: list[AddressSpace] | None = None,
) -> Migration:
    """Collect [start, end) (page-aligned, one VMA). The caller holds the mmap read
    lock, which the migration keeps until finalize if ``holds_lock``, and those of
    ``family``: the other address spaces fork made share the VMA's anonymous pages.
    A collected page they map too is unmapped there (CLEAR) and moves for all.

    With MIGRATE_VMA_SELECT_COMPOUND a whole aligned 2 MiB span stays one compound
    entry when it is a THP of collectable system pages (SELECT_SYSTEM), the huge zero
    page (SELECT_SYSTEM), unpopulated in a THP-enabled anonymous mapping, or a PMD
    of the caller's own device-private or coherent pages (their selector). Any other
    PMD leaf whose pages are collected is split.

    EINVAL: no VMA, a range outside it, a hugetlb or special VMA, an empty range.
    EAGAIN: ``fault_pfn`` is no longer one of the range's device-private pages —
    another migration took it meanwhile (the fault waits for it and looks again).
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
    heads: list[int] = []
    was_huge: list[int] = []
    split: list[int] = []

    async with mm.invalidate(start, end, Event.MIGRATE, owner=owner):
        ptes = mm.pt.gather(start, end)
        pfns = pte_pfn(ptes)
        present = pte_present(ptes)
        swp = pte_swp_type(ptes)
        writable = (ptes & PTE_WRITE) != 0
        if fault_pfn is not None:
            hit = (swp == SWP_DEVICE_PRIVATE) & (pfns == fault_pfn)
            if not hit.any():  # (the folio lock) another migration took it first: fault again
                raise KernelError(errno.EAGAIN, "the faulting page is being or was migrated meanwhile")

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
            locked = pgmap.locked[pgmap.index(pfns[idx])]
            if fault_pfn is None:  # (a fault's migration may take pages other faults wait on)
                locked |= pgmap.faulting[pgmap.index(pfns[idx])]
            take = idx[~locked]
            src_pfns[take] = pfns[take]
            src_flags[take] = MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE
        collected = (src_flags & MIGRATE_PFN_VALID) != 0
        src_flags[collected & writable] |= MIGRATE_PFN_WRITE

        # Compound entries: whole aligned spans, every page of them collected.
        if select & MIGRATE_VMA_SELECT_COMPOUND:
            first = (start + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
            for h in range(first, end - PMD_SIZE + 1, PMD_SIZE):
                i = (h - start) >> PAGE_SHIFT
                seg = slice(i, i + H)
                if not (src_flags[seg] & MIGRATE_PFN_MIGRATE).all():
                    continue
                leaf = (h >> PMD_SHIFT) in mm.pt.huge and pmd_shape(ptes[seg])
                if leaf or (holes[seg].all() and thp_enabled(vma)):
                    heads.append(i)
                    if leaf:
                        was_huge.append(h >> PMD_SHIFT)
        # Every other PMD leaf with a page collected is split (the compound ones
        # lose their mark too while migration entries stand in for them).
        for leaf_idx in mm.pt.huge_spans(start, end):
            lo = max(start, leaf_idx << PMD_SHIFT) - start
            hi = min(end, (leaf_idx + 1) << PMD_SHIFT) - start
            if (src_flags[lo >> PAGE_SHIFT : hi >> PAGE_SHIFT] & MIGRATE_PFN_MIGRATE).any():
                mm.pt.huge.discard(leaf_idx)
                if leaf_idx not in was_huge:
                    split.append(leaf_idx)

        # Migration entries replace the collected pages; they keep the reference.
        idx = np.flatnonzero(collected)
        if len(idx):
            orig[idx] = ptes[idx]
            # (pte_swp_mksoft_dirty: the entry keeps the page's soft-dirty bit)
            entries = (ptes[idx] & (PTE_WRITE | PTE_SOFT_DIRTY | ~np.uint64((1 << PAGE_SHIFT) - 1))) \
                | swp_flags(SWP_MIGRATION)
            ptes[idx] = entries.astype(np.uint64)
            mm.pt.scatter(start, ptes)
            mm.frames("unmap", src_pfns[idx])

    mig = Migration(mm, vma, start, end, owner, pgmap, src_pfns, src_flags, orig, holds_lock, heads, was_huge)
    mm.migrations[mig.id] = mig
    # The leaves the collect walk split get __split_huge_pmd's CLEAR over their 2 MiB
    # (now that the migration is registered: a fault meeting its entries waits for it).
    for leaf_idx in split:
        async with mm.invalidate(leaf_idx << PMD_SHIFT, (leaf_idx + 1) << PMD_SHIFT, Event.CLEAR):
            pass
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
    invalidation (a PMD leaf there that a run cuts is split first, with its own
    CLEAR over the 2 MiB). A page with a mapping that cannot be found does not
    migrate, nor does the rest of its compound entry."""
    if not family:
        return
    mm = mig.mm
    collected = np.flatnonzero(mig.orig != 0)
    shared = collected[_mapcount(mm, mig.page_pfns[collected]) > 0]
    if not len(shared):
        return
    wanted = mig.page_pfns[shared]

    def theirs(ptes: np.ndarray) -> np.ndarray:
        mapped = pte_present(ptes) | (pte_swp_type(ptes) == SWP_DEVICE_PRIVATE)
        return mapped & np.isin(pte_pfn(ptes), wanted)

    for other in family:
        if other is mm or not other.alive:
            continue
        addrs, _ = rmap.find(other, theirs)
        # Registered there before the first migration entry: a fault that meets one
        # waits for this migration (the next run's CLEAR may take a while).
        other.migrations[mig.id] = mig
        for start, end in rmap.runs(addrs):
            await other.split_huge_pmds(start, end)  # (split_folio: TTU_SPLIT_HUGE_PMD where a run cuts a PMD)
            async with other.invalidate(start, end, Event.CLEAR):
                ptes = other.pt.gather(start, end)
                idx = np.flatnonzero(theirs(ptes))
                if not len(idx):
                    continue
                other.pt.split_huge(start, end)  # (a PMD the run covers whole: under this CLEAR)
                old = ptes[idx].copy()
                ptes[idx] = (old & (PTE_WRITE | PTE_SOFT_DIRTY | ~np.uint64((1 << PAGE_SHIFT) - 1))) \
                    | swp_flags(SWP_MIGRATION)
                other.pt.scatter(start, ptes)
                other.frames("unmap", pte_pfn(old))
                mig.others.append(Mapping(other, start + (idx << PAGE_SHIFT), pte_pfn(old), old))
        if not any(m.mm is other for m in mig.others):  # finalize forgets it only where it left entries
            del other.migrations[mig.id]
    # Still mapped somewhere: not migratable (finalize puts every entry back).
    stuck = shared[_mapcount(mm, mig.page_pfns[shared]) > 0]
    mig.page_flags[stuck] = 0
    if len(stuck) and mig.heads:
        for h in list(mig.heads):
            if ((stuck >= h) & (stuck < h + H)).any():
                mig.heads.remove(h)  # a folio moves whole or not at all
                mig.page_flags[h : h + H] = 0


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


def _spans(heads: list[int]) -> np.ndarray:
    """Page indices covered by the compound entries starting at ``heads``."""
    if not heads:
        return np.zeros(0, dtype=np.int64)
    return (np.asarray(heads, dtype=np.int64)[:, None] + np.arange(H)).reshape(-1)


async def migrate_vma_pages(mig: Migration, dst_pfns: np.ndarray, dst_flags: np.ndarray, data: Contents) -> None:
    """Check every destination; fill holes. Entries that keep MIGRATE will migrate.

    ``dst_flags`` VALID with a device PFN names one of the caller's free device pages;
    VALID|SYSTEM_DATA asks for a new system page holding the next 4096 bytes of
    ``data``. With COMPOUND too, the entry is a whole order-9 folio: 512 free device
    pages from an aligned PFN, or a new THP holding the next 512 pages of ``data``
    (512 single frames when no aligned block is free); the 511 entries after it must
    be 0. A compound destination moves a compound source whole and is refused for
    any other; a compound source given per-page destinations is split, each page
    moving on its own. EINVAL for destinations that are not the caller's free pages,
    a malformed compound entry, or data of the wrong length; nothing changes then.
    """
    mm, ram = mig.mm, mig.mm.ram
    if mig.pages_done or mig.finalized:
        raise KernelError(errno.EINVAL, "migrate_vma_pages was already called for this migration")
    n = mig.npages
    if len(dst_pfns) != n or len(dst_flags) != n:
        raise KernelError(errno.EINVAL, f"dst needs {n} entries")
    migrating = (mig.page_flags & MIGRATE_PFN_MIGRATE) != 0

    # Unfold compound destinations into one destination per page.
    flags = np.asarray(dst_flags, dtype=np.uint8) & ~np.uint8(MIGRATE_PFN_COMPOUND)
    dpfns = np.array(dst_pfns, dtype=np.int64)
    considered = migrating.copy()
    heads = set(mig.heads)
    whole: list[int] = []
    refused: list[int] = []
    comp = np.flatnonzero(((dst_flags & MIGRATE_PFN_COMPOUND) != 0) & ((dst_flags & MIGRATE_PFN_VALID) != 0)
                          & migrating)
    for i in comp.tolist():
        if i + H > n or dst_flags[i + 1 : i + H].any() or dpfns[i + 1 : i + H].any():
            raise KernelError(errno.EINVAL, f"compound destination {i} needs {H - 1} empty entries after it")
        if not dst_flags[i] & MIGRATE_PFN_SYSTEM_DATA:
            if dpfns[i] % H:
                raise KernelError(errno.EINVAL, f"compound destination {int(dpfns[i]):#x} is not {H}-page aligned")
            dpfns[i : i + H] = dpfns[i] + np.arange(H)
        flags[i : i + H] = flags[i]
        considered[i : i + H] = True
        (whole if i in heads else refused).append(i)
    refused_pages = np.zeros(n, dtype=bool)
    refused_pages[_spans(refused)] = True

    want = considered & ((flags & MIGRATE_PFN_VALID) != 0)
    from_data = want & ((flags & MIGRATE_PFN_SYSTEM_DATA) != 0)
    to_device = want & ~from_data
    if len(data) != int(from_data.sum()) * PAGE_SIZE:
        raise KernelError(errno.EINVAL, f"data must hold {int(from_data.sum())} pages")
    alloc = from_data & ~refused_pages  # a refused entry's data is skipped
    if int(alloc.sum()) > ram.free_frames:  # before taking device pages: nothing changes
        raise OutOfMemoryError(int(alloc.sum()) - ram.free_frames,
                          f"out of system memory for {int(alloc.sum())} destination pages")
    if to_device.any():
        if mig.pgmap is None:
            raise KernelError(errno.EINVAL, "this device has no memory to migrate to")
        mig.pgmap.take_free(dpfns[to_device])
        if mig.pgmap.kind == MemoryKind.DEVICE_COHERENT:
            ram.flags[dpfns[to_device]] |= PG_ANON
    dst = np.zeros(n, dtype=np.int64)
    dst[to_device] = dpfns[to_device]
    if alloc.any():
        # A copy only when some data is skipped.
        pages = data if alloc[from_data].all() else page_rows(data)[alloc[from_data]]
        frames = np.zeros(n, dtype=np.int64)
        for i in list(whole):  # a new THP: one aligned block, or single frames when none is free
            if alloc[i]:
                block = ram.alloc_contig(H, zero=False)  # (every frame gets its data below)
                if block is None:
                    block = ram.alloc(H, zero=False)
                    whole.remove(i)  # still moves, but as 512 single pages
                frames[i : i + H] = block
        rest = alloc & (frames == 0)
        if rest.any():
            frames[rest] = ram.alloc(int(rest.sum()), zero=False)
        new = frames[alloc]
        ram.write(new, pages)
        ram.flags[new] |= PG_ANON
        dst[alloc] = new
    want &= ~(from_data & refused_pages)  # skipped data: no page was made for it
    # Destinations stay locked until finalize (a filled hole is mapped before then).
    _lock(mm, dst[want], True, mig)

    keep = want & ~refused_pages
    has_src = (mig.page_flags & MIGRATE_PFN_VALID) != 0
    # Only anonymous memory moves: a page-cache (file, shmem) source keeps its page. The
    # kernel never moves one to a device; to a new system page it would move the page
    # cache entry over, which hmmd does not do (a new anonymous page in a shared mapping
    # would leave the file behind).
    system_src = has_src & (mig.page_pfns < ram.nframes)
    src = np.where(system_src, mig.page_pfns, ZERO_PFN)
    keep &= ~(system_src & ((ram.flags[src] & PG_ANON) == 0))
    for i in whole:  # a folio moves whole or not at all
        if not keep[i : i + H].all():
            keep[i : i + H] = False

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
            fits = np.zeros(n, dtype=bool)
            fits[holes[empty]] = mig.vma.is_anonymous
            for i in whole:  # a huge hole is filled by one PMD: every page must still be empty
                if keep[i] and not has_src[i] and not fits[i : i + H].all():
                    fits[i : i + H] = False
            ok = holes[fits[holes]]
            keep[np.setdiff1d(holes, ok)] = False
            if len(ok):
                new = dst[ok]
                ptes[ok] = _new_entries(mm, new, mig.vma.writable)
                for idx in mm.pt.huge_spans(mig.start, mig.end):  # a huge zero page a read fault put there
                    lo = max(mig.start, idx << PMD_SHIFT) - mig.start
                    hi = min(mig.end, (idx + 1) << PMD_SHIFT) - mig.start
                    if fits[lo >> PAGE_SHIFT : hi >> PAGE_SHIFT].any():
                        mm.pt.huge.discard(idx)
                mm.pt.scatter(mig.start, ptes)
                mm.frames("map", new)
                ram.mark_exclusive_if_mapped_once(new[new < ram.span])
                mm._add_rss(RSS_ANON, len(ok))
                mm.anon_vma_prepare(mig.vma)
                filled[ok] = True

    unused = want & ~keep
    if unused.any():  # an unused destination is released (a device page goes back to its owner)
        _lock(mm, dst[unused], False, mig)
        mm.frames("put", dst[unused])
    dst[~keep] = 0
    # A compound source with per-page destinations is split; one with none stays whole.
    for h in list(mig.heads):
        if h not in whole and want[h : h + H].any():
            mig.heads.remove(h)
    mig.whole = [i for i in whole if keep[i]]
    mig.page_flags[migrating & ~keep] &= ~np.uint8(MIGRATE_PFN_MIGRATE)
    mig.dst_pfns, mig.filled, mig.pages_done = dst, filled, True


def _new_entries(mm: AddressSpace, pfns: np.ndarray, write: np.ndarray | bool) -> np.ndarray:
    """CPU entries for new pages: device-private entries, or present system pages."""
    dev = mm.devmem.is_device(pfns)
    if not dev.any():  # the usual cases build one kind only
        return make_present(pfns, write, write)
    if dev.all():
        return device_private_pte(pfns, write)
    return np.where(dev, device_private_pte(pfns, write), make_present(pfns, write, write)).astype(np.uint64)


def _finalize_others(mig: Migration, dst: np.ndarray, moving: np.ndarray) -> None:
    """The other address spaces' entries of the collected pages: the new page (each
    mapping taking a reference of its own) or the original back."""
    if not mig.others:
        return
    where = {int(p): i for i, p in enumerate(mig.page_pfns) if mig.orig[i] != 0}
    for m in mig.others:
        i = np.array([where[int(p)] for p in m.pfns], dtype=np.int64)
        mv = moving[i]
        new = dst[i]
        write = (m.orig & PTE_WRITE) != 0
        moved = _new_entries(m.mm, new, write) | (m.orig & PTE_SOFT_DIRTY)
        rmap.store(m.mm, m.addrs, np.where(mv, moved, m.orig).astype(np.uint64))
        m.mm.frames("map", new[mv])
        m.mm.frames("get", new[mv])
        m.mm.frames("put", m.pfns[mv])
        m.mm.frames("map", m.pfns[~mv])


def migrate_vma_finalize(mig: Migration, *, rollback: bool = False) -> None:
    """Point each migration entry at its new page or restore the original, and drop
    the references of whatever lost (a device page whose last reference goes is
    freed to its owner). A compound entry that moved whole is mapped by PMD; a PMD
    leaf split for one that did not move at all is mapped by PMD again. With
    ``rollback`` (the device is gone, or left it open too long) no migration entry
    moves, and holes the pages step filled with device-private pages are emptied
    again: still locked, no one but their device can have used them. Holes filled
    with system or coherent pages stay, as migrate_vma_insert_page left them: mapped
    and maybe written already or mapped by another device's mirror, they could only
    go inside an invalidation, losing what was written.
    Does not release the mmap lock; the caller does, if the migration held it."""
    if mig.finalized:
        return
    mm = mig.mm
    n = mig.npages
    dst = mig.dst_pfns if mig.dst_pfns is not None else np.zeros(n, dtype=np.int64)
    collected = mig.orig != 0
    moving = collected & (dst != 0) & ((mig.page_flags & MIGRATE_PFN_MIGRATE) != 0) & (not rollback)
    moved, back = np.flatnonzero(moving), np.flatnonzero(collected & ~moving)
    ptes = mm.pt.gather(mig.start, mig.end)
    if len(moved):
        # remove_migration_pte(): the new entry keeps the old one's soft-dirty bit.
        ptes[moved] = _new_entries(mm, dst[moved], (mig.orig[moved] & PTE_WRITE) != 0) \
            | (mig.orig[moved] & PTE_SOFT_DIRTY)
        mm.frames("map", dst[moved])
    if len(back):
        ptes[back] = mig.orig[back]
        mm.frames("map", mig.page_pfns[back])
    undo = np.flatnonzero(mig.filled & mm.devmem.is_device(dst)) if rollback and mig.filled is not None \
        else np.zeros(0, dtype=np.int64)
    if len(undo):
        ptes[undo] = 0
        mm.frames("unmap", dst[undo])
        mm._add_rss(RSS_ANON, -len(undo))
    mm.pt.scatter(mig.start, ptes)
    _remap_huge(mig, moving, rollback)
    _lock(mm, dst[dst != 0], False, mig)
    if len(moved):
        mm.frames("put", mig.page_pfns[moved])
    _finalize_others(mig, dst, moving)
    new = dst[moved]
    mm.ram.mark_exclusive_if_mapped_once(new[new < mm.ram.span])
    unused = np.flatnonzero(collected & (dst != 0) & ~moving)
    if len(unused):
        mm.frames("put", dst[unused])
    if len(undo):
        mm.frames("put", dst[undo])
    if rollback:
        mig.page_flags &= ~np.uint8(MIGRATE_PFN_MIGRATE)
    mig.finalized = True
    for space in {id(mm): mm, **{id(x.mm): x.mm for x in mig.others}}.values():
        space.migrations.pop(mig.id, None)
        space.wake_migration_waiters()


def _remap_huge(mig: Migration, moving: np.ndarray, rollback: bool) -> None:
    """PMD marks at finalize: a compound entry that moved whole (or a huge hole
    filled whole), and a split leaf none of whose pages changed."""
    mm = mig.mm
    changed = moving.copy()
    if mig.filled is not None and not rollback:
        changed |= mig.filled
    spans = [] if rollback else [mig.start + (i << PAGE_SHIFT) for i in mig.whole if changed[i : i + H].all()]
    for idx in mig.was_huge:
        i = ((idx << PMD_SHIFT) - mig.start) >> PAGE_SHIFT
        if not changed[i : i + H].any():
            spans.append(idx << PMD_SHIFT)
    for h in spans:
        if pmd_shape(mm.pt.gather(h, h + PMD_SIZE)):
            mm.pt.huge.add(h >> PMD_SHIFT)
