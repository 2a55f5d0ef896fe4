"""The CPU fault handler (handle_mm_fault) and CPU loads and stores.

``handle_mm_fault`` makes a span of one VMA present (and writable for a write
fault), a whole span at a time: zero page on an anonymous read, a fresh zeroed
page on an anonymous write, the page cache for file and shmem mappings, and
copy-on-write — which raises CLEAR over the pages it replaces — for shared or
read-only private pages. Page reuse (an anonymous page the mapping owns:
PageAnonExclusive, or the only reference to it) and write-enabling a shared mapping
change no frame and raise nothing. An unshare fault (a read-only pin's
FAULT_FLAG_UNSHARE) gives the mapping a page of its own the same way, but read-only.

Callers hold the mmap lock (read is enough) and have checked the VMA's permissions.
"""

from __future__ import annotations

import errno

import numpy as np

from hmm.abi import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT, PMD_SIZE, PTRS_PER_PTE, TASK_SIZE, Event
from hmm.errors import KernelError
from hmmd.core import rmap
from hmmd.core.mm import RSS_ANON, VM_MAYWRITE, AddressSpace, make_present, page_align
from hmmd.core.pagetable import (
    PTE_DIRTY,
    PTE_SOFT_DIRTY,
    PTE_WRITE,
    PTE_YOUNG,
    SWP_DEVICE_EXCLUSIVE,
    SWP_DEVICE_PRIVATE,
    SWP_MIGRATION,
    SWP_SWAP,
    pte_pfn,
    pte_present,
    pte_swp_type,
)
from hmmd.core.physmem import PG_ANON, PG_ANON_EXCLUSIVE, ZERO_PFN, OutOfMemoryError, PhysMem
from hmmd.core.vma import VM_HUGEPAGE, VM_HUGETLB, VM_MIXEDMAP, VM_NOHUGEPAGE, Vma

MAX_FAULT_RETRIES = 10_000
ACCESS_PIECE_PAGES = 512  # a CPU access goes through memory this much at a time, at most


# What an unshare fault (FAULT_FLAG_UNSHARE, from a read-only pin) must make the
# mapping's own: anonymous pages it may share; with FOLL_LONGTERM in a copy-on-write
# mapping, any page it does not own (the zero page, page-cache pages) too (v6.2+).
UNSHARE_ANON = 1
UNSHARE_LONGTERM = 2


def must_unshare(ram: PhysMem, ptes: np.ndarray, longterm_cow: bool = False) -> np.ndarray:
    """gup_must_unshare(), per PTE: a present anonymous page the mapping may not own
    alone (not PageAnonExclusive), which a read-only pin must unshare first; with
    ``longterm_cow`` (a long-term pin in a private mapping) any present page that is
    not an exclusive anonymous one, the zero page and page-cache pages included."""
    pfns = pte_pfn(ptes)
    out = pte_present(ptes) & (pfns < ram.span)
    if not longterm_cow:
        out &= pfns != ZERO_PFN
    p = pfns[out]
    flags = ram.flags[p] & (PG_ANON | PG_ANON_EXCLUSIVE)
    out[out] = flags != (PG_ANON | PG_ANON_EXCLUSIVE) if longterm_cow else flags == PG_ANON
    return out


def _longterm_cow(vma: Vma, unshare: int) -> bool:
    """Whether an unshare of this reach in ``vma`` covers every page it does not own."""
    return unshare == UNSHARE_LONGTERM and not vma.shared and bool(vma.flags & VM_MAYWRITE)


def _reusable(ram: PhysMem, pfns: np.ndarray) -> np.ndarray:
    """do_wp_page()'s reuse test, per present page of a private mapping: an
    anonymous page marked exclusive, pinned or not, or one nobody else maps or holds
    (wp_can_reuse_anon_folio); the caller marks the reused ones exclusive."""
    flags = ram.flags[pfns]
    alone = (pfns != ZERO_PFN) & ((flags & PG_ANON) != 0) & (ram.refcount[pfns] == 1) & (ram.mapcount[pfns] == 1)
    return ((flags & PG_ANON_EXCLUSIVE) != 0) | alone


async def handle_mm_fault(mm: AddressSpace, vma: Vma, start: int, end: int, write: bool,
                          unshare: int = 0) -> None:
    """Fault in [start, end) of ``vma``. EFAULT for file pages beyond EOF (SIGBUS);
    ENOMEM when system memory runs out. Pages already good enough are left alone.
    ``unshare`` (a read fault only; UNSHARE_ANON or UNSHARE_LONGTERM): pages the
    mapping may share with another (must_unshare) become its own
    (FAULT_FLAG_UNSHARE), copied if they must be, read-only.
    EFAULT in an address space the OOM reaper has been at (check_stable_address_space)."""
    if mm.unstable:
        raise KernelError(errno.EFAULT, "the address space is being reaped (OOM): nothing is faulted in")
    ram = mm.ram
    if vma.flags & VM_HUGETLB:
        await _fault_hugetlb(mm, vma, start, end, write, unshare)
        return
    if vma.is_anonymous and vma.flags & VM_HUGEPAGE and not vma.flags & VM_NOHUGEPAGE:
        _fault_huge(mm, vma, start, end, write)
    longterm_cow = _longterm_cow(vma, unshare)
    if (write or unshare) and mm.pt.huge:
        # do_huge_pmd_wp_page(): a read-only THP the process owns alone (exclusive, or
        # held by nothing else) is reused whole, made writable by a write; any other
        # read-only huge mapping (the huge zero page, a THP fork shared) is split, as
        # is a shared THP an unshare meets, and the 4 KiB path copies what it needs.
        split = []
        for table, lo, hi, _ in mm.pt.spans(start, end):
            if table not in mm.pt.huge:
                continue
            part = mm.pt.tables[table][lo:hi]
            if write:
                met = not (part & PTE_WRITE).all()
            else:
                met = bool(must_unshare(ram, part, longterm_cow).any())
            if met and not _reuse_huge(mm, vma, table << PMD_SHIFT, write):
                split.append(table)
        for table in split:
            await mm.split_huge_pmds(table << PMD_SHIFT, (table + 1) << PMD_SHIFT, whole=True)
    ptes = mm.pt.gather(start, end)
    present = pte_present(ptes)
    writable = (ptes & PTE_WRITE) != 0
    empty = ptes == 0
    need_new = empty
    if write:
        need_wp = present & ~writable
    elif unshare and not vma.shared:
        need_wp = must_unshare(ram, ptes, longterm_cow)
    else:
        need_wp = np.zeros_like(present)
    if not need_new.any() and not need_wp.any():
        return
    cow = np.zeros_like(present)

    if need_new.any():
        idx = np.flatnonzero(need_new)
        if vma.flags & VM_MIXEDMAP:
            raise KernelError(errno.EFAULT, "a driver mapping's page is gone and it has no fault handler (SIGBUS)")
        if vma.is_anonymous:
            if write:
                mm.anon_vma_prepare(vma)
                pfns = ram.alloc(len(idx))
                ram.flags[pfns] |= PG_ANON | PG_ANON_EXCLUSIVE
                ram.map(pfns)
                ptes[idx] = make_present(pfns, True, True)
                mm._add_rss(RSS_ANON, len(idx))
            else:
                ptes[idx] = make_present(np.full(len(idx), ZERO_PFN), False, False)
        else:
            inode = vma.file
            assert inode is not None
            first_page = vma.file_page(start)
            pages = first_page + idx
            if pages.max() >= inode.npages:
                raise KernelError(errno.EFAULT, "access beyond the end of the mapped file (SIGBUS)")
            cache = inode.find_or_create_pages(ram, first_page, (end - start) >> PAGE_SHIFT)[idx]
            if vma.shared:
                ram.get(cache)
                ram.map(cache)
                ptes[idx] = make_present(cache, vma.writable, write)
                mm._account(vma, cache, +1)
            elif write:  # private file mapping written before it was read: copy now
                mm.anon_vma_prepare(vma)
                pfns = ram.alloc(len(idx), zero=False)
                ram.copy(pfns, cache)
                ram.flags[pfns] |= PG_ANON | PG_ANON_EXCLUSIVE
                ram.map(pfns)
                ptes[idx] = make_present(pfns, True, True)
                mm._add_rss(RSS_ANON, len(idx))
            else:
                ram.get(cache)
                ram.map(cache)
                ptes[idx] = make_present(cache, False, False)
                mm._account(vma, cache, +1)

    if need_wp.any():
        idx = np.flatnonzero(need_wp)
        pfns = pte_pfn(ptes[idx])
        if vma.shared:
            ptes[idx] |= PTE_WRITE | PTE_DIRTY | PTE_SOFT_DIRTY
        else:
            reusable = _reusable(ram, pfns)
            ram.flags[pfns[reusable]] |= PG_ANON_EXCLUSIVE
            if write:  # (an unshare leaves a page it keeps read-only)
                ptes[idx[reusable]] |= PTE_WRITE | PTE_DIRTY | PTE_SOFT_DIRTY
            cow[idx[~reusable]] = True

    mm.pt.scatter(start, ptes)  # COW pages are unchanged here; _cow_runs replaces them
    if cow.any():
        mm.anon_vma_prepare(vma)
        await _cow_runs(mm, vma, start, np.flatnonzero(cow), unshare=not write)


def _reuse_huge(mm: AddressSpace, vma: Vma, h: int, write: bool) -> bool:
    """The reuse branch of do_huge_pmd_wp_page() for the THP mapped at ``h``: if the
    process owns it alone, it is marked exclusive and, for a write, made writable
    by its PMD (no invalidation: only permissions grow). False: it must be split."""
    if vma.shared or (write and not vma.writable):
        return False
    ptes = mm.pt.gather(h, h + PMD_SIZE)
    pfns = pte_pfn(ptes)
    if not (pte_present(ptes) & (pfns < mm.ram.nframes)).all() or not _reusable(mm.ram, pfns).all():
        return False
    mm.ram.flags[pfns] |= PG_ANON_EXCLUSIVE
    if write:
        mm.pt.scatter(h, ptes | PTE_WRITE | PTE_DIRTY | PTE_SOFT_DIRTY)
    return True


async def _fault_hugetlb(mm: AddressSpace, vma: Vma, start: int, end: int, write: bool, unshare: int) -> None:
    """hugetlb_fault(): whole huge pages mapped by PMD and never split. A shared
    mapping maps the file's huge page (a new one from the pool joins its page cache)
    and a write only makes it writable. A private mapping maps the file's page
    read-only if the file has one, else a fresh anonymous page; a write to a page it
    does not own alone copies the whole huge page (hugetlb_wp), as does an unshare of
    one it may share. SIGBUS (EFAULT) past the end of the file or when the pool is empty."""
    for h in range(start & ~(PMD_SIZE - 1), end, PMD_SIZE):
        ptes = mm.pt.gather(h, h + PMD_SIZE)
        if ptes.any():
            if write and not (ptes & PTE_WRITE).all():
                await _hugetlb_wp(mm, vma, h, ptes, unshare=False)
            elif unshare and not vma.shared and must_unshare(mm.ram, ptes[:1], _longterm_cow(vma, unshare))[0]:
                await _hugetlb_wp(mm, vma, h, ptes, unshare=True)
            continue
        if vma.hugetlb_unmapped:
            raise KernelError(errno.EFAULT, "a huge page of this mapping went to the process that reserved it, "
                                            "the pool being empty (SIGBUS)")
        if vma.file is None:  # private anonymous
            frames = _hugetlb_alloc(mm, h)
            mm.anon_vma_prepare(vma)
            _hugetlb_map(mm, vma, h, frames, write and vma.writable, write)
            continue
        inode = vma.file
        first = vma.file_page(h)
        if first >= inode.npages:
            raise KernelError(errno.EFAULT, "access beyond the end of the hugetlbfs file (SIGBUS)")
        if vma.shared:
            cache = inode.find_or_create_pages(mm.ram, first, PTRS_PER_PTE)
            mm.ram.get(cache)
            _hugetlb_map(mm, vma, h, cache, vma.writable, write)
            continue
        cache = inode.lookup_pages(first, PTRS_PER_PTE)
        if cache[0] < 0:
            # Not in the file: a private page of its own (not added to the cache).
            frames = _hugetlb_alloc(mm, h)
            mm.anon_vma_prepare(vma)
            _hugetlb_map(mm, vma, h, frames, write and vma.writable, write)
        elif write:  # written before read: copy the file's page now, nothing to invalidate
            frames = _hugetlb_alloc(mm, h)
            mm.ram.copy(frames, cache)
            mm.anon_vma_prepare(vma)
            _hugetlb_map(mm, vma, h, frames, True, True)
        else:
            mm.ram.get(cache)
            _hugetlb_map(mm, vma, h, cache, False, False)


def _hugetlb_map(mm: AddressSpace, vma: Vma, h: int, frames: np.ndarray, writable: bool, dirty: bool) -> None:
    """Map one huge page at ``h`` by PMD; ``frames`` already hold the mapping's reference."""
    mm.ram.map(frames)
    mm._account(vma, frames, +1)
    mm.pt.scatter(h, make_present(frames, writable, dirty))
    mm.pt.huge.add(h >> PMD_SHIFT)


async def _hugetlb_wp(mm: AddressSpace, vma: Vma, h: int, ptes: np.ndarray, unshare: bool) -> None:
    """A write to the read-only huge page mapped at ``h``: a shared mapping makes it
    writable; a private one reuses a page only it maps (by mapcount alone, as the
    kernel does for hugetlb), or gets a copy of the whole huge page inside a CLEAR (a
    file's page, or one fork shares). With ``unshare`` the page it ends up owning
    stays read-only."""
    pfns = pte_pfn(ptes)
    if vma.shared:
        mm.pt.scatter(h, ptes | PTE_WRITE | PTE_DIRTY | PTE_SOFT_DIRTY)
        return
    if mm.ram.flags[pfns[0]] & PG_ANON and mm.ram.mapcount[pfns[0]] == 1:
        mm.ram.flags[pfns] |= PG_ANON_EXCLUSIVE
        if not unshare:
            mm.pt.scatter(h, make_present(pfns, True, True))
        return
    async with mm.invalidate(h, h + PMD_SIZE, Event.CLEAR):
        if not (mm.pt.gather(h, h + PMD_SIZE) == ptes).all():
            return  # it changed meanwhile: the caller looks again
        try:
            copy = _hugetlb_alloc(mm, h)
        except KernelError:
            if not ((h >> PMD_SHIFT) in mm.hugetlb_owned and mm.ram.flags[pfns[0]] & PG_ANON):
                raise
            # The pool is empty, but this mapping reserved the page: the forked mappings
            # sharing it lose it instead (unmap_ref_private) and this one keeps it.
            await _unmap_from_children(mm, vma, pfns)
            if mm.ram.mapcount[pfns[0]] != 1:
                raise
            mm.ram.flags[pfns] |= PG_ANON_EXCLUSIVE
            if not unshare and (mm.pt.gather(h, h + PMD_SIZE) == ptes).all():
                mm.pt.scatter(h, make_present(pfns, True, True))
            return
        mm.ram.copy(copy, pfns)
        mm.anon_vma_prepare(vma)
        mm._account(vma, pfns, -1)
        mm.ram.unmap(pfns)
        mm.ram.put(pfns)
        _hugetlb_map(mm, vma, h, copy, not unshare, not unshare)


async def _unmap_from_children(mm: AddressSpace, vma: Vma, pfns: np.ndarray) -> None:
    """Unmap the private huge page ``pfns`` from the other address spaces of
    ``vma``'s fork family (inside a CLEAR each, under their mmap read locks taken
    ahead of writers, as migration does), and mark their mappings so that a fault
    there is SIGBUS (HPAGE_RESV_UNMAPPED)."""
    if vma.anon_vma is None:
        return
    head = int(pfns[0])
    for other in sorted((o for o in vma.anon_vma.members if o is not mm and isinstance(o, AddressSpace) and o.alive),
                        key=lambda o: o.id):
        await other.lock.acquire_read(ahead_of_writers=True)
        try:
            addrs, _ = rmap.find(other, lambda t: pte_present(t) & (pte_pfn(t) == head))
            for a in addrs.tolist():
                ovma = other.vmas.find(a)
                if ovma is None or not ovma.flags & VM_HUGETLB or a & (PMD_SIZE - 1):
                    continue
                async with other.invalidate(a, a + PMD_SIZE, Event.CLEAR):
                    optes = other.pt.gather(a, a + PMD_SIZE)
                    if not (pte_present(optes) & (pte_pfn(optes) == pfns)).all():
                        continue  # changed meanwhile
                    other.pt.scatter(a, np.zeros_like(optes))
                    other.pt.huge.discard(a >> PMD_SHIFT)
                    other._account(ovma, pfns, -1)
                    other.ram.unmap(pfns)
                    other.ram.put(pfns)
                    ovma.hugetlb_unmapped = True
        finally:
            await other.lock.release_read()


def _hugetlb_alloc(mm: AddressSpace, h: int) -> np.ndarray:
    """A private (anonymous) huge page from the pool for the mapping at ``h``: the one
    reserved there if the reservation is still unused, else an unpromised one;
    EFAULT (SIGBUS) if there is none."""
    reserved = (h >> PMD_SHIFT) in mm.hugetlb_resv
    frames = mm.ram.alloc_hugetlb(reserved=reserved)
    if frames is None:
        raise KernelError(errno.EFAULT, "the hugetlb pool is empty (SIGBUS)")
    mm.hugetlb_resv.discard(h >> PMD_SHIFT)
    mm.ram.flags[frames] |= PG_ANON | PG_ANON_EXCLUSIVE
    return frames


def _fault_huge(mm: AddressSpace, vma: Vma, start: int, end: int, write: bool) -> None:
    """do_huge_pmd_anonymous_page(): every 2 MiB span the fault touches that lies whole
    inside the VMA and has no page table yet gets a PMD mapping — a new order-9 folio
    on a write, the huge zero page on a read. Falls back to 4 KiB pages when no
    aligned block is free."""
    first = max(vma.start, start & ~(PMD_SIZE - 1))
    for h in range(first, end, PMD_SIZE):
        if h & (PMD_SIZE - 1) or h + PMD_SIZE > vma.end or (h >> PMD_SHIFT) in mm.pt.tables:
            continue
        if write:
            frames = mm.ram.alloc_contig(PTRS_PER_PTE)
            if frames is None:
                return
            mm.ram.flags[frames] |= PG_ANON | PG_ANON_EXCLUSIVE
            mm.ram.map(frames)
            mm.anon_vma_prepare(vma)
            mm._add_rss(RSS_ANON, PTRS_PER_PTE)
            mm.pt.scatter(h, make_present(frames, vma.writable, True))
        else:
            mm.pt.scatter(h, make_present(np.full(PTRS_PER_PTE, ZERO_PFN), False, False))
        mm.pt.huge.add(h >> PMD_SHIFT)


async def _cow_runs(mm: AddressSpace, vma: Vma, start: int, idx: np.ndarray, unshare: bool) -> None:
    """wp_page_copy() for each contiguous run of pages: CLEAR, then copy and replace;
    an unshare's copy is mapped read-only and clean, its soft-dirty bit kept."""
    ram = mm.ram
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    for run in np.split(idx, breaks):
        s = start + (int(run[0]) << PAGE_SHIFT)
        e = start + ((int(run[-1]) + 1) << PAGE_SHIFT)
        before = mm.pt.gather(s, e)
        async with mm.invalidate(s, e, Event.CLEAR):
            now = mm.pt.gather(s, e)
            # Another fault may have resolved some pages meanwhile (pte_same()).
            same = (now == before) & pte_present(now) & ((now & PTE_WRITE) == 0)
            if not same.any():
                continue
            sel = np.flatnonzero(same)
            old = pte_pfn(now[sel])
            new = ram.alloc(len(sel), zero=False)
            ram.copy(new, old)
            ram.flags[new] |= PG_ANON | PG_ANON_EXCLUSIVE
            ram.map(new)
            if unshare:
                now[sel] = make_present(new, False, False) | (now[sel] & PTE_SOFT_DIRTY)
            else:
                now[sel] = make_present(new, True, True)
            mm.pt.scatter(s, now)
            real = old[old != ZERO_PFN]
            mm._account(vma, real, -1)
            mm._add_rss(RSS_ANON, len(sel))
            ram.unmap(real)
            ram.put(real)


def check_access(mm: AddressSpace, first: int, last: int, write: bool) -> list[Vma]:
    """The VMAs covering [first, last), each allowing the access; EFAULT (SIGSEGV) if not."""
    vmas = mm.vmas.overlapping(first, last)
    pos = first
    for vma in vmas:
        if vma.start > pos:
            break
        if not vma.readable or (write and not vma.writable):
            raise KernelError(errno.EFAULT, f"{'write' if write else 'read'} at {pos:#x} not permitted (SIGSEGV)")
        pos = vma.end
    if pos < last:
        raise KernelError(errno.EFAULT, f"no mapping at {pos:#x} (SIGSEGV)")
    return vmas


async def migrate_to_ram(mm: AddressSpace, addr: int, pfn: int) -> None:
    """A fault on a device-private entry: the owning device moves the page back to
    system RAM (do_swap_page -> pgmap->ops->migrate_to_ram). EFAULT (SIGBUS) if the
    device cannot; the caller holds the mmap read lock and looks at the PTE again."""
    pgmap = mm.devmem.lookup(pfn)
    if pgmap is not None and pgmap.is_locked(pfn):
        # A migration's destination (a hole it filled) is locked until its finalize:
        # the page trylock fails, so wait as on a migration entry and look again.
        await mm.wait_migration()
        return
    if mm.devmem.on_fault is None:
        raise KernelError(errno.EFAULT, f"device page at {addr:#x} has no owner to fault it back (SIGBUS)")
    try:
        await mm.devmem.on_fault(mm, addr, pfn)
    except KernelError as e:
        if e.errno != errno.EAGAIN:
            raise
        # A fault on another page of the same device folio started migrating this
        # one first (the folio lock): wait as on a migration entry and look again.
        await mm.wait_migration()


async def restore_exclusive(mm: AddressSpace, addr: int) -> None:
    """A fault on a device-exclusive entry: wait for the page lock, then restore a
    present PTE (writable only if the VMA is, dirty, old) inside a CLEAR invalidation
    with no owner — how the device learns it lost the page."""
    addr &= PAGE_MASK
    pte = mm.pt.gather(addr, addr + PAGE_SIZE)
    if pte_swp_type(pte)[0] != SWP_DEVICE_EXCLUSIVE:
        return
    await mm.ram.locks.wait_unlocked(int(pte_pfn(pte)[0]))
    async with mm.invalidate(addr, addr + PAGE_SIZE, Event.CLEAR):
        now = mm.pt.gather(addr, addr + PAGE_SIZE)
        if pte_swp_type(now)[0] != SWP_DEVICE_EXCLUSIVE:
            return
        vma = mm.vmas.find(addr)
        restored = make_present(pte_pfn(now), vma is not None and vma.writable, True) & ~PTE_YOUNG
        mm.pt.scatter(addr, (restored | (now & PTE_SOFT_DIRTY)).astype(np.uint64))


def swap_in(mm: AddressSpace, addr: int) -> None:
    """do_swap_page() on a swap entry: the page's contents into a new frame of this
    mm's own (writable where the mapping is; the slot loses a reference). EFAULT
    (SIGBUS) in an address space the OOM reaper has been at."""
    addr &= PAGE_MASK
    pte = mm.pt.gather(addr, addr + PAGE_SIZE)
    vma = mm.vmas.find(addr)
    if pte_swp_type(pte)[0] != SWP_SWAP or vma is None:
        return
    if mm.unstable:
        raise KernelError(errno.EFAULT, "the address space is being reaped (OOM): nothing is swapped in")
    slot = pte_pfn(pte)
    frame = mm.ram.alloc(1, zero=False)
    mm.ram.data[frame] = mm.swap.load(int(slot[0]))
    mm.ram.flags[frame] |= PG_ANON | PG_ANON_EXCLUSIVE
    mm.ram.map(frame)
    mm.anon_vma_prepare(vma)
    mm.pt.scatter(addr, make_present(frame, vma.writable, False) | (pte & PTE_SOFT_DIRTY))
    mm._add_rss(RSS_ANON, 1)
    mm.swap.free(slot)
    mm.swapents -= 1


async def resolve_special_entry(mm: AddressSpace, addr: int, pte: np.ndarray) -> None:
    """The fault path for a non-present, non-empty entry (do_swap_page): swap a page
    in, wait for a migration, bring a device-private page home, restore a
    device-exclusive one; anything else is a page lost with its device (EFAULT, SIGBUS)."""
    swp = pte_swp_type(pte)[0]
    if swp == SWP_SWAP:
        swap_in(mm, addr)
    elif swp == SWP_MIGRATION:
        await mm.wait_migration()
    elif swp == SWP_DEVICE_PRIVATE:
        await migrate_to_ram(mm, addr, int(pte_pfn(pte)[0]))
    elif swp == SWP_DEVICE_EXCLUSIVE:
        await restore_exclusive(mm, addr)
    else:
        raise KernelError(errno.EFAULT, f"page at {addr:#x} was lost with its device (SIGBUS)")


async def _special_entries(mm: AddressSpace, first: int, ptes: np.ndarray, bad: np.ndarray) -> bool:
    """Resolve the first non-present, non-empty entry among ``bad``; True if any."""
    special = np.flatnonzero(bad & (pte_swp_type(ptes) != 0))
    if not len(special):
        return False
    i = int(special[0])
    await resolve_special_entry(mm, first + (i << PAGE_SHIFT), ptes[i : i + 1])
    return True


async def fault_until_accessible(mm: AddressSpace, vmas: list[Vma], first: int, last: int, write: bool,
                                 unshare: int = 0) -> np.ndarray:
    """Fault until every page of [first, last) is present (and writable; with
    ``unshare``, no page it must unshare: must_unshare); the PTEs. Each pass resolves one
    special entry (a device page comes home one at a time), so the retry budget
    grows with the number of pages."""
    for _ in range(MAX_FAULT_RETRIES + 2 * ((last - first) >> PAGE_SHIFT)):
        ptes = mm.pt.gather(first, last)
        ok = pte_present(ptes)
        if write:
            ok &= (ptes & PTE_WRITE) != 0
        elif unshare:
            for vma in vmas:
                s, e = max(first, vma.start), min(last, vma.end)
                lo, hi = (s - first) >> PAGE_SHIFT, (e - first) >> PAGE_SHIFT
                ok[lo:hi] &= ~must_unshare(mm.ram, ptes[lo:hi], _longterm_cow(vma, unshare))
        if ok.all():
            return ptes
        try:
            if await _special_entries(mm, first, ptes, ~ok):
                continue
            for vma in vmas:
                s, e = max(first, vma.start), min(last, vma.end)
                sub = ~ok[(s - first) >> PAGE_SHIFT : (e - first) >> PAGE_SHIFT]
                if sub.any():
                    nz = np.flatnonzero(sub)
                    await handle_mm_fault(
                        mm, vma, s + (int(nz[0]) << PAGE_SHIFT), s + ((int(nz[-1]) + 1) << PAGE_SHIFT), write,
                        unshare,
                    )
        except OutOfMemoryError as e:
            # The allocation's direct reclaim (or, when it frees nothing, the OOM
            # killer's victim gone), then this loop looks again (what the failed step
            # did, it did whole); ENOMEM when neither helps.
            if (mm.reclaim is None or not await mm.reclaim(e.shortfall)) and (
                    mm.out_of_memory is None or not await mm.out_of_memory((mm,), mm)):
                raise KernelError(errno.ENOMEM, str(e.strerror)) from None
    raise KernelError(errno.EFAULT, "the fault did not settle")


def _page_span(addr: int, length: int) -> tuple[int, int]:
    if addr < 0 or addr + length > TASK_SIZE:
        raise KernelError(errno.EFAULT, f"[{addr:#x}, +{length}) is outside the user address space (SIGSEGV)")
    return addr & PAGE_MASK, page_align(addr + length)


def access_pieces(mm: AddressSpace, first: int, last: int) -> list[tuple[int, int]]:
    """[first, last) in the pieces a CPU access goes through one after the other, as a
    CPU's copy goes page by page: 2 MiB, or an eighth of RAM when that is less, so an
    access larger than free memory works — reclaim may take the pieces already done."""
    step = min(ACCESS_PIECE_PAGES, max(16, mm.ram.nframes // 8)) << PAGE_SHIFT
    return [(s, min(last, s + step)) for s in range(first, last, step)]


async def cpu_read(mm: AddressSpace, addr: int, length: int) -> bytes:
    """A CPU load of ``length`` bytes at ``addr``. EFAULT where the process would fault."""
    if length == 0:
        return b""
    first, last = _page_span(addr, length)
    out = np.empty(((last - first) >> PAGE_SHIFT, PAGE_SIZE), dtype=np.uint8)
    async with mm.lock.read():
        if not mm.alive:
            raise KernelError(errno.ESRCH, "the process has exited")
        vmas = check_access(mm, first, last, False)
        for s, e in access_pieces(mm, first, last):
            ptes = await fault_until_accessible(mm, vmas, s, e, False)
            mm.pt.scatter(s, ptes | PTE_YOUNG)
            np.take(mm.ram.data, pte_pfn(ptes), axis=0, out=out[(s - first) >> PAGE_SHIFT : (e - first) >> PAGE_SHIFT])
    skip = addr - first
    return out.reshape(-1)[skip : skip + length].tobytes()


async def cpu_write(mm: AddressSpace, addr: int, data: bytes) -> None:
    """A CPU store of ``data`` at ``addr``; the pages become dirty and soft-dirty.
    EFAULT, with nothing written, where the mappings do not allow it; a page that
    cannot be brought in (lost with its device, the process being OOM-reaped) stops
    the store there, what came before it written, as a CPU's copy stops at its fault."""
    if not data:
        return
    first, last = _page_span(addr, len(data))
    src = np.frombuffer(data, dtype=np.uint8)
    ram = mm.ram
    async with mm.lock.read():
        if not mm.alive:
            raise KernelError(errno.ESRCH, "the process has exited")
        vmas = check_access(mm, first, last, True)
        for s, e in access_pieces(mm, first, last):
            ptes = await fault_until_accessible(mm, vmas, s, e, True)
            pfns = pte_pfn(ptes)
            lo, hi = max(addr, s), min(addr + len(data), e)  # this piece's bytes
            part = src[lo - addr : hi - addr]
            if lo == s and hi == e:
                ram.data[pfns] = part.reshape(-1, PAGE_SIZE)
            else:
                pages = ram.data[pfns]
                pages.reshape(-1)[lo - s : hi - s] = part
                ram.data[pfns] = pages
            mm.pt.scatter(s, ptes | PTE_DIRTY | PTE_SOFT_DIRTY | PTE_YOUNG)
