"""Address spaces (struct mm_struct) and the memory system calls that change them.

Every public ``sys_*`` coroutine takes the mmap lock itself (for writing) and
follows invariant 1: it opens an invalidation window over what it is about to
change, waits for every overlapping notifier, changes the page tables, and only
then closes the window. Helpers named ``_zap``/``_move`` assume the lock is held
and the window is open.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
from collections.abc import Awaitable, Callable, Collection, Iterable

import numpy as np

from hmm.abi import (
    CLEAR_REFS_ALL,
    CLEAR_REFS_ANON,
    CLEAR_REFS_MAPPED,
    CLEAR_REFS_MM_HIWATER_RSS,
    CLEAR_REFS_SOFT_DIRTY,
    MADV_COLD,
    MADV_COLLAPSE,
    MADV_DODUMP,
    MADV_DOFORK,
    MADV_DONTDUMP,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_DONTNEED_LOCKED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_KEEPONFORK,
    MADV_NOHUGEPAGE,
    MADV_NORMAL,
    MADV_PAGEOUT,
    MADV_RANDOM,
    MADV_SEQUENTIAL,
    MADV_WILLNEED,
    MADV_WIPEONFORK,
    MAP_ANONYMOUS,
    MAP_DENYWRITE,
    MAP_EXECUTABLE,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_HUGETLB,
    MAP_LOCKED,
    MAP_NONBLOCK,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    MAP_STACK,
    MAP_TYPE,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_SHIFT,
    PMD_SIZE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    PTRS_PER_PTE,
    TASK_SIZE,
    ULONG_MAX,
    Event,
)
from hmm.errors import KernelError
from hmmd.core import rmap
from hmmd.core.devmem import DeviceMemory
from hmmd.core.hugetlbfs import HugetlbInode
from hmmd.core.notifier import InvalidateWindow, MmNotifiers, NotifierRange
from hmmd.core.pagetable import (
    PTE_DIRTY,
    PTE_PRESENT,
    PTE_SOFT_DIRTY,
    PTE_WRITE,
    PTE_YOUNG,
    SWP_DEVICE_EXCLUSIVE,
    SWP_DEVICE_PRIVATE,
    SWP_SWAP,
    PageTables,
    pte_pfn,
    pte_present,
    pte_swp_type,
)
from hmmd.core.physmem import PG_ANON, PG_ANON_EXCLUSIVE, PG_LOCKED, ZERO_PFN, PhysMem
from hmmd.core.reclaim import page_out, page_out_file_mapping
from hmmd.core.rwsem import RwSemaphore
from hmmd.core.swap import SwapSpace
from hmmd.core.tmpfs import Inode
from hmmd.core.vma import (
    VM_DONTCOPY,
    VM_DONTDUMP,
    VM_DONTEXPAND,
    VM_HUGEPAGE,
    VM_HUGETLB,
    VM_IO,
    VM_MIXEDMAP,
    VM_NOHUGEPAGE,
    VM_PFNMAP,
    VM_PROT_MASK,
    VM_RAND_READ,
    VM_SEQ_READ,
    VM_SHARED,
    VM_SOFTDIRTY,
    VM_SPECIAL,
    VM_WIPEONFORK,
    VM_WRITE,
    AnonVma,
    Vma,
    VmaTree,
)

# The flags do_mmap() knows without MAP_SHARED_VALIDATE; any other bit is ignored.
MAP_LEGACY_FLAGS = (MAP_FIXED | MAP_ANONYMOUS | MAP_GROWSDOWN | MAP_DENYWRITE | MAP_EXECUTABLE | MAP_LOCKED
                    | MAP_NORESERVE | MAP_POPULATE | MAP_NONBLOCK | MAP_STACK | MAP_HUGETLB | MAP_FIXED_NOREPLACE)
MMAP_MIN_ADDR = 0x10000
MMAP_BASE = 0x7F00_0000_0000  # top-down allocation starts below this

# vm_flags bits only the mm uses: may a later mprotect add these permissions?
VM_MAYREAD = 0x10
VM_MAYWRITE = 0x20
VM_MAYEXEC = 0x40
VM_MAY_MASK = VM_MAYREAD | VM_MAYWRITE | VM_MAYEXEC

RSS_ANON, RSS_FILE, RSS_SHMEM = 0, 1, 2

_mm_ids = itertools.count(1)

# madvise_vma_behavior(): the advice that only changes vm_flags, as (set, clear).
_ADVICE_FLAGS = {
    MADV_NORMAL: (0, VM_SEQ_READ | VM_RAND_READ),
    MADV_SEQUENTIAL: (VM_SEQ_READ, VM_RAND_READ),
    MADV_RANDOM: (VM_RAND_READ, VM_SEQ_READ),
    MADV_DONTFORK: (VM_DONTCOPY, 0),
    MADV_DOFORK: (0, VM_DONTCOPY),
    MADV_WIPEONFORK: (VM_WIPEONFORK, 0),
    MADV_KEEPONFORK: (0, VM_WIPEONFORK),
    MADV_DONTDUMP: (VM_DONTDUMP, 0),
    MADV_DODUMP: (0, VM_DONTDUMP),
    MADV_HUGEPAGE: (VM_HUGEPAGE, VM_NOHUGEPAGE),
    MADV_NOHUGEPAGE: (VM_NOHUGEPAGE, VM_HUGEPAGE),
}


def page_align(n: int) -> int:
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def madvise_end(addr: int, length: int) -> int:
    """is_valid_madvise(): the page-aligned end of a madvise range (``addr`` itself
    for a zero length: nothing to do). EINVAL for an unaligned start or a range that
    wraps. A range beyond TASK_SIZE is unmapped memory (ENOMEM from the walk)."""
    if addr & (PAGE_SIZE - 1):
        raise KernelError(errno.EINVAL, "madvise start is not page-aligned")
    if length < 0 or addr + page_align(length) > ULONG_MAX:
        # PAGE_ALIGN(len) rounds to 0, or start + len wraps.
        raise KernelError(errno.EINVAL, "madvise range wraps around the address space")
    return addr + page_align(length)


def check_range(addr: int, length: int, *, what: str = "range") -> int:
    """Common argument checks: page-aligned start, non-zero length, inside TASK_SIZE.
    Returns the page-aligned end. EINVAL otherwise."""
    if addr & (PAGE_SIZE - 1):
        raise KernelError(errno.EINVAL, f"{what} start {addr:#x} is not page-aligned")
    if length <= 0:
        raise KernelError(errno.EINVAL, f"{what} length must be positive")
    end = addr + page_align(length)
    if end > TASK_SIZE:
        raise KernelError(errno.EINVAL, f"{what} [{addr:#x}, {end:#x}) leaves the user address space")
    return end


class AddressSpace:
    """One mm: VMAs, page tables, the mmap lock, notifier subscriptions, rss."""

    def __init__(self, ram: PhysMem, devmem: DeviceMemory, swap: SwapSpace) -> None:
        self.id = next(_mm_ids)
        self.pid = 0  # the owning process, for messages and tools
        self.ram = ram
        self.devmem = devmem
        self.swap = swap
        self.migrations: dict[int, object] = {}  # open migrate_vma sessions by id
        self._migration_wq: asyncio.Future[None] | None = None
        self.vmas = VmaTree()
        self.pt = PageTables()
        self.lock = RwSemaphore()
        self.notifiers = MmNotifiers(self)
        self.users = 1  # mm_users: 0 once the process exited
        self.unstable = False  # MMF_UNSTABLE: the OOM reaper has been at it; faults fail
        self.rss = [0, 0, 0]
        self.swapents = 0  # MM_SWAPENTS: entries of pages swapped out (VmSwap)
        self.rss_peak = 0
        # mm->hugetlb_usage (HugetlbPages), in base pages: hugetlb pages are never in rss.
        self.hugetlb_usage = 0
        self.reclaim_hand = 0  # where the next reclaim pass over this mm starts (reclaim.shrink)
        # Direct reclaim, given by the kernel: frees frames for a fault short of them
        # (at least the shortfall, when it can); the pages it freed.
        self.reclaim: Callable[[int], Awaitable[int]] | None = None
        # Kernel.out_of_memory, when reclaim frees nothing: True to try the allocation again.
        self.out_of_memory: Callable[[Collection[AddressSpace], AddressSpace], Awaitable[bool]] | None = None
        # Private hugetlb mappings' reservations, by PMD index (addr >> PMD_SHIFT): the
        # huge pages this mm's mmaps reserved (not inherited by fork, as in Linux,
        # where the mapping that reserved owns them), and those of them still promised
        # by the pool, not yet faulted in.
        self.hugetlb_owned: set[int] = set()
        self.hugetlb_resv: set[int] = set()

    def __repr__(self) -> str:
        return f"<mm {self.id}>"

    @property
    def alive(self) -> bool:
        return self.users > 0

    def anon_vma_prepare(self, vma: Vma) -> None:
        if vma.anon_vma is None:
            vma.anon_vma = AnonVma()
            vma.anon_vma.members.add(self)

    async def wait_migration(self) -> None:
        """Sleep until some migration of this mm finalizes (a fault met a migration
        entry; the caller looks again)."""
        if not self.migrations:
            return
        if self._migration_wq is None:
            self._migration_wq = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._migration_wq)

    def wake_migration_waiters(self) -> None:
        if self._migration_wq is not None:
            if not self._migration_wq.done():
                self._migration_wq.set_result(None)
            self._migration_wq = None

    def _add_rss(self, kind: int, n: int) -> None:
        self.rss[kind] += n
        self.rss_peak = max(self.rss_peak, sum(self.rss))

    def invalidate(
        self, start: int, end: int, event: Event, *, owner: int = 0, blockable: bool = True
    ) -> InvalidateWindow:
        """``async with mm.invalidate(...)``: an mmu notifier window over [start, end)."""
        return self.notifiers.invalidate(NotifierRange(self, start, end, event, owner, blockable))

    # ---- page-table helpers (mmap lock held, window open) --------------------------
    def frames(self, op: str, pfns: np.ndarray) -> None:
        """``op`` (map, unmap, get or put) on each frame: PhysMem's for system and
        device-coherent frames, DeviceMemory's for device-private pages."""
        dev = self.devmem.is_device(pfns)
        if not dev.any():
            getattr(self.ram, op)(pfns)
            return
        if (~dev).any():
            getattr(self.ram, op)(pfns[~dev])
        getattr(self.devmem, op)(pfns[dev])

    def _rss_kind(self, vma: Vma, pfns: np.ndarray) -> np.ndarray:
        """Per frame: RSS_ANON for anonymous pages, else the file kind of the VMA."""
        file_kind = RSS_SHMEM if vma.file is not None and vma.file.shmem else RSS_FILE
        return np.where(self.ram.flags[pfns] & PG_ANON, RSS_ANON, file_kind)

    def _account(self, vma: Vma, pfns: np.ndarray, sign: int) -> None:
        """Count ``pfns`` mapped (+1) or unmapped (-1) in ``vma``: in rss, or in
        hugetlb_usage for a hugetlb mapping (hugetlb_count_add/sub)."""
        if vma.flags & VM_HUGETLB:
            self.hugetlb_usage += sign * len(pfns)
        elif len(pfns):
            counts = np.bincount(self._rss_kind(vma, pfns), minlength=3)
            for kind in range(3):
                if counts[kind]:
                    self._add_rss(kind, sign * int(counts[kind]))

    def _zap(self, vma: Vma, start: int, end: int, *, even_cows: bool = True) -> None:
        """zap_page_range(): drop every entry in [start, end) of ``vma``. Device
        pages are dropped too (their data is discarded, not migrated back). Without
        ``even_cows`` only the file's page cache pages go: a private mapping's own
        pages (copies made on write, and what became of them) stay."""
        for s, e in self.pt.populated_runs(start, end):
            self._zap_run(vma, s, e, even_cows)

    def _zap_run(self, vma: Vma, start: int, end: int, even_cows: bool) -> None:
        ptes = kept = self.pt.gather(start, end)
        if not even_cows:
            pfns = pte_pfn(ptes)
            cache = pte_present(ptes) & (pfns != ZERO_PFN)
            cache[cache] = (self.ram.flags[pfns[cache]] & PG_ANON) == 0
            ptes, kept = np.where(cache, ptes, np.uint64(0)), np.where(cache, np.uint64(0), ptes)
        swp = pte_swp_type(ptes)
        mapped = pte_present(ptes) | (swp == SWP_DEVICE_EXCLUSIVE)  # an exclusive entry keeps its frame
        if mapped.any():
            pfns = pte_pfn(ptes[mapped])
            pfns = pfns[pfns != ZERO_PFN]
            self._account(vma, pfns, -1)
            self.ram.unmap(pfns)
            self.ram.put(pfns)
        device = swp == SWP_DEVICE_PRIVATE
        if device.any():
            pfns = pte_pfn(ptes[device])
            self._add_rss(RSS_ANON, -len(pfns))
            self.devmem.unmap(pfns)
            self.devmem.put(pfns)
        self._free_swap(ptes)
        if ptes.any():
            self.pt.scatter(start, np.zeros_like(ptes) if even_cows else kept)

    def _free_swap(self, ptes: np.ndarray) -> None:
        """free_swap_and_cache() for the swap entries among ``ptes`` (the caller clears them)."""
        swapped = pte_swp_type(ptes) == SWP_SWAP
        if swapped.any():
            self.swap.free(pte_pfn(ptes[swapped]))
            self.swapents -= int(swapped.sum())

    async def split_huge_pmds(self, start: int, end: int, *, whole: bool = False) -> None:
        """split_huge_pmd() of the PMD leaves [start, end) cuts (with ``whole``: of
        every leaf it overlaps): a CLEAR over the leaf's 2 MiB first
        (__split_huge_pmd), then its pages are mapped by PTEs; a mirror that mapped
        the leaf large must fault them again. A leaf the range covers whole stays:
        the kernel zaps or changes a PMD whole, under the caller's own invalidation
        (hmmd's callers that work page by page then split it silently,
        PageTables.split_huge). A CPU fault or GUP that splits a leaf passes
        ``whole``."""
        for idx in self.pt.huge_spans(start, end):
            lo = idx << PMD_SHIFT
            if idx in self.pt.huge and (whole or lo < start or lo + PMD_SIZE > end):
                async with self.invalidate(lo, lo + PMD_SIZE, Event.CLEAR):
                    self.pt.huge.discard(idx)

    def _reserve_hugetlb(self, start: int, length: int, shared: Inode | None, offset: int) -> None:
        """hugetlb_reserve_pages() for a new mapping: every huge page it may fault in
        is promised by the pool now, or the mmap fails with ENOMEM. A shared mapping
        reserves in its file what the file lacks; a private one, all of its pages."""
        if shared is not None:
            assert isinstance(shared, HugetlbInode)
            if not shared.reserve(self.ram, offset >> PAGE_SHIFT, length >> PAGE_SHIFT):
                raise KernelError(errno.ENOMEM, "the hugetlb pool cannot promise the mapping's huge pages")
            return
        idx = range(start >> PMD_SHIFT, (start + length) >> PMD_SHIFT)
        if not self.ram.hugetlb_reserve(len(idx)):
            raise KernelError(errno.ENOMEM, f"{len(idx)} huge pages asked, {self.ram.hugetlb_free} free in the pool "
                                            f"and {self.ram.hugetlb_reserved} of them promised")
        self.hugetlb_owned.update(idx)
        self.hugetlb_resv.update(idx)

    def _unreserve_hugetlb(self, start: int, end: int) -> None:
        """A private hugetlb range goes: its reservations not used yet go back."""
        idx = set(range(start >> PMD_SHIFT, end >> PMD_SHIFT))
        unused = self.hugetlb_resv & idx
        self.hugetlb_resv -= unused
        self.hugetlb_owned -= idx
        self.ram.hugetlb_unreserve(len(unused))

    def _restore_hugetlb(self, start: int, end: int) -> None:
        """Private huge pages zapped by MADV_DONTNEED get their reservation back
        (Linux restores it, so a later fault does not find the pool taken), as far
        as the pool can promise them again."""
        for i in sorted(set(range(start >> PMD_SHIFT, end >> PMD_SHIFT)) & self.hugetlb_owned - self.hugetlb_resv):
            if not self.ram.hugetlb_reserve(1):
                break
            self.hugetlb_resv.add(i)

    def _unmap_vmas(self, vmas: Iterable[Vma]) -> None:
        for vma in vmas:
            if vma.flags & VM_HUGETLB and not vma.shared:
                self._unreserve_hugetlb(vma.start, vma.end)
            self._zap(vma, vma.start, vma.end)
            self.vmas.remove(vma)
            if vma.file is not None:
                vma.file.mappings.discard(vma)
                inode = vma.file
                if not inode.mappings and not inode.opens and not inode.nlink:
                    inode.release(self.ram)  # shmem or unlinked file: last reference gone
            if vma.anon_vma is not None and not any(v.anon_vma is vma.anon_vma for v in self.vmas):
                vma.anon_vma.members.discard(self)

    def _check_huge_alignment(self, start: int, end: int) -> None:
        """A hugetlb mapping can only be cut at huge page boundaries (EINVAL)."""
        for vma in self.vmas.overlapping(start, end):
            if vma.flags & VM_HUGETLB and ((max(start, vma.start) | min(end, vma.end)) & (PMD_SIZE - 1)):
                raise KernelError(errno.EINVAL, "hugetlb mappings change in whole huge pages only")

    async def _do_munmap(self, start: int, end: int) -> None:
        self._check_huge_alignment(start, end)
        if not self.vmas.overlapping(start, end):
            return
        await self.split_huge_pmds(start, end)  # (__split_vma, before the VMAs are cut)
        self.pt.split_huge(start, end)
        vmas = self.vmas.isolate(start, end)
        async with self.invalidate(vmas[0].start, vmas[-1].end, Event.UNMAP):
            self._unmap_vmas(vmas)

    def _vmas_covering(self, start: int, end: int) -> list[Vma]:
        """The VMAs covering [start, end) with no hole; ENOMEM on a hole."""
        vmas = self.vmas.overlapping(start, end)
        pos = start
        for vma in vmas:
            if vma.start > pos:
                break
            pos = vma.end
        if pos < end:
            raise KernelError(errno.ENOMEM, f"[{start:#x}, {end:#x}) is not fully mapped")
        return vmas

    def _check_alive(self) -> None:
        if not self.alive:
            raise KernelError(errno.ESRCH, "the process has exited")

    # ---- mmap / munmap ---------------------------------------------------------------
    async def sys_mmap(
        self, addr: int, length: int, prot: int, flags: int, file: Inode | None, offset: int,
        *, file_writable: bool = True, file_readable: bool = True, device: bool = False,
    ) -> int:
        """mmap(2). ``file`` is the inode behind the fd (None with MAP_ANONYMOUS). With
        ``device`` the fd is a device handle: like dmirror's mmap, every page gets a
        freshly zeroed ordinary page at once (a VM_MIXEDMAP mapping), mapped read-only
        in a private mapping; a page zapped later has no fault handler (SIGBUS).

        EINVAL for bad flags, zero length or an unaligned offset or fixed address;
        EACCES for a file opened without the access the mapping needs; EEXIST for
        MAP_FIXED_NOREPLACE over a mapping; ENOMEM when nothing fits.
        """
        if length <= 0:
            raise KernelError(errno.EINVAL, "mmap length must be positive")
        if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC):
            raise KernelError(errno.EINVAL, f"unknown prot bits {prot:#x}")
        mtype = flags & MAP_TYPE
        if mtype == MAP_SHARED_VALIDATE and not flags & MAP_ANONYMOUS:
            # As do_mmap(): flags other than these are refused here, ignored with MAP_SHARED.
            if flags & ~(MAP_TYPE | MAP_LEGACY_FLAGS):
                raise KernelError(errno.EOPNOTSUPP, f"mmap flags {flags & ~(MAP_TYPE | MAP_LEGACY_FLAGS):#x} "
                                  "not supported here")
            mtype = MAP_SHARED
        if mtype not in (MAP_SHARED, MAP_PRIVATE):
            raise KernelError(errno.EINVAL, "exactly one of MAP_SHARED and MAP_PRIVATE is needed")
        if flags & MAP_GROWSDOWN and flags & MAP_ANONYMOUS and mtype == MAP_SHARED:
            raise KernelError(errno.EINVAL, "MAP_GROWSDOWN of shared memory")
        if offset & (PAGE_SIZE - 1):
            raise KernelError(errno.EINVAL, "mmap offset is not page-aligned")
        length = page_align(length)
        if length > TASK_SIZE:
            raise KernelError(errno.ENOMEM, "mapping larger than the address space")
        anonymous = bool(flags & MAP_ANONYMOUS)
        # A hugetlbfs file maps hugetlb with or without MAP_HUGETLB; any other file
        # (or a device) with it is EINVAL, as in ksys_mmap_pgoff().
        hugetlb_file = not anonymous and file is not None and file.hugetlb
        if flags & MAP_HUGETLB and not anonymous and not hugetlb_file:
            raise KernelError(errno.EINVAL, "MAP_HUGETLB needs anonymous memory or a hugetlbfs file")
        hugetlb = bool(flags & MAP_HUGETLB) or hugetlb_file
        if hugetlb:
            length = (length + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
        if not anonymous and not device:
            if file is None:
                raise KernelError(errno.EBADF, "a file mapping needs a file")
            if not file_readable:
                raise KernelError(errno.EACCES, "file not open for reading")
            if mtype == MAP_SHARED and prot & PROT_WRITE and not file_writable:
                raise KernelError(errno.EACCES, "shared writable mapping of a file not open for writing")
            if offset + length > (1 << 52):
                raise KernelError(errno.EOVERFLOW, "file offset too large")
        if hugetlb and hugetlb_file and offset & (PMD_SIZE - 1):
            raise KernelError(errno.EINVAL, "a hugetlbfs mapping's offset must be huge-page aligned")
        fixed = bool(flags & (MAP_FIXED | MAP_FIXED_NOREPLACE))
        async with self.lock.write():
            self._check_alive()
            if fixed:
                if addr & (PAGE_SIZE - 1) or (hugetlb and addr & (PMD_SIZE - 1)):
                    raise KernelError(errno.EINVAL, "MAP_FIXED address is not (huge) page-aligned")
                if addr < MMAP_MIN_ADDR or addr + length > TASK_SIZE:
                    raise KernelError(errno.EPERM if addr < MMAP_MIN_ADDR else errno.ENOMEM,
                                      f"fixed mapping [{addr:#x}, +{length:#x}) not allowed")
                if self.vmas.overlapping(addr, addr + length):
                    if flags & MAP_FIXED_NOREPLACE:
                        raise KernelError(errno.EEXIST, "MAP_FIXED_NOREPLACE over an existing mapping")
                    await self._do_munmap(addr, addr + length)
                start = addr
            else:
                thp = anonymous and mtype == MAP_PRIVATE and not addr
                start = self._get_unmapped_area(addr, length, PMD_SIZE if hugetlb else _area_align(thp, length))
            # A new mapping is soft-dirty as a whole (__mmap_complete): a tracker must see
            # memory unmapped and mapped again in place as new.
            vm_flags = (prot & VM_PROT_MASK) | VM_MAY_MASK | VM_SOFTDIRTY | (VM_HUGETLB if hugetlb else 0)
            if flags & MAP_STACK:  # (no THP for thread stacks, v6.7+)
                vm_flags |= VM_NOHUGEPAGE
            if mtype == MAP_SHARED:
                vm_flags |= VM_SHARED
                if not anonymous and not file_writable:
                    vm_flags &= ~VM_MAYWRITE
            if anonymous and mtype == MAP_SHARED:
                # Shared anonymous memory is an unnamed shmem file, or hugetlbfs file.
                file = HugetlbInode(None, anon=True) if hugetlb else Inode(None, self.swap, shmem=True)
                file.size = length
                offset = 0
            elif anonymous:
                file = None
            if hugetlb and not flags & MAP_NORESERVE:  # (NORESERVE elsewhere: no commit accounting here)
                self._reserve_hugetlb(start, length, file if vm_flags & VM_SHARED else None, offset)
            if hugetlb_file and vm_flags & VM_WRITE and file is not None:
                # A writable mapping extends a hugetlbfs file over it once its pages are
                # reserved (hugetlbfs_file_mmap): the file cannot be written any other way.
                file.size = max(file.size, offset + length)
            if device:
                vm_flags |= VM_MIXEDMAP | VM_DONTEXPAND
                frames = self.ram.alloc(length >> PAGE_SHIFT)  # first: ENOMEM maps nothing
            vma = Vma(start, start + length, vm_flags, file, offset >> PAGE_SHIFT, None, self)
            self.vmas.insert(vma)
            if file is not None:
                file.mappings.add(vma)
            if device:
                self.ram.map(frames)
                self.pt.scatter(start, make_present(frames, vma.shared and vma.writable, False))
                self._add_rss(RSS_FILE, len(frames))
            return start

    def _get_unmapped_area(self, hint: int, length: int, align: int = PAGE_SIZE) -> int:
        if hint and not hint & (align - 1) and hint >= MMAP_MIN_ADDR and hint + length <= TASK_SIZE:
            if not self.vmas.overlapping(hint, hint + length):
                return hint
        start = self.vmas.find_gap(length + align - PAGE_SIZE, MMAP_MIN_ADDR, MMAP_BASE)
        if start is None:
            raise KernelError(errno.ENOMEM, "no room in the address space")
        return (start + align - 1) & ~(align - 1)

    async def sys_munmap(self, addr: int, length: int) -> None:
        """munmap(2): UNMAP over the mapped part of the range, then free. EINVAL on bad args."""
        end = check_range(addr, length, what="munmap")
        async with self.lock.write():
            self._check_alive()
            await self._do_munmap(addr, end)

    # ---- mprotect -------------------------------------------------------------------------
    async def sys_mprotect(self, addr: int, length: int, prot: int) -> None:
        """mprotect(2): PROTECTION_VMA over populated ranges; write-protects PTEs when
        write permission goes. ENOMEM on unmapped parts, EACCES if the mapping may not
        gain the permission."""
        if addr & (PAGE_SIZE - 1):
            raise KernelError(errno.EINVAL, "mprotect start is not page-aligned")
        if length == 0:
            return
        # As do_mprotect_pkey(): a range that wraps or leaves the address space is
        # unmapped memory (ENOMEM); the prot bits are checked after the length.
        end = addr + page_align(length)
        if length < 0 or end > TASK_SIZE:
            raise KernelError(errno.ENOMEM, f"mprotect [{addr:#x}, {end:#x}) leaves the user address space")
        if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC):
            raise KernelError(errno.EINVAL, f"unknown prot bits {prot:#x}")
        async with self.lock.write():
            self._check_alive()
            # As do_mprotect_pkey(): the mappings are changed one after the other, so a
            # hole (ENOMEM) or a mapping that may not gain the permission (EACCES) ends
            # the call after the mappings before it were changed.
            stop, error = end, None
            pos = addr
            for vma in self.vmas.overlapping(addr, end):
                if vma.start > pos:
                    break
                if prot & PROT_WRITE and not vma.flags & VM_MAYWRITE:
                    stop, error = pos, KernelError(errno.EACCES, "mapping of a read-only file cannot become writable")
                    break
                pos = vma.end
            if error is None and pos < end:
                stop, error = pos, KernelError(errno.ENOMEM, f"[{addr:#x}, {end:#x}) is not fully mapped")
            # As mprotect_fixup(), mapping by mapping: one whose protection stays the
            # same is left alone (not split, no invalidation).
            changing = [(max(addr, v.start), min(stop, v.end)) for v in self.vmas.overlapping(addr, stop)
                        if (v.flags ^ prot) & VM_PROT_MASK]
            for lo, hi in changing:
                self._check_huge_alignment(lo, hi)
            for lo, hi in changing:
                await self.split_huge_pmds(lo, hi)  # (a whole leaf changes protection whole)
                vmas = self.vmas.isolate(lo, hi)
                if self.pt.any_table(lo, hi):
                    async with self.invalidate(lo, hi, Event.PROTECTION_VMA):
                        self._set_prot(vmas, prot)
                else:
                    self._set_prot(vmas, prot)
                self._merge(vmas)
            if error is not None:
                raise error

    def _merge(self, vmas: list[Vma]) -> None:
        """vma_merge() after a change: each VMA with its neighbours (one merged away
        by an earlier one is skipped)."""
        for vma in vmas:
            if any(v is vma for v in self.vmas):
                self.vmas.try_merge(vma)

    def _set_prot(self, vmas: list[Vma], prot: int) -> None:
        """change_protection(): write permission going write-protects every PTE;
        coming, it is given back where a write fault would take nothing (v6.1+,
        MM_CP_TRY_CHANGE_WRITABLE): every present page of a shared mapping (hmmd
        does no write-notify), and a private mapping's anonymous pages it owns
        alone, PageAnonExclusive, pinned or not (can_change_pte_writable; soft-dirty
        ones only, while soft-dirty is tracked)."""
        ram = self.ram
        for vma in vmas:
            vma.flags = (vma.flags & ~VM_PROT_MASK) | (prot & VM_PROT_MASK)
            for lo, hi in self.pt.populated_runs(vma.start, vma.end):
                ptes = self.pt.gather(lo, hi)
                if not prot & PROT_WRITE:
                    if (ptes & PTE_WRITE).any():
                        self.pt.scatter(lo, _wrprotect(ptes))
                    continue
                up = pte_present(ptes) & ((ptes & PTE_WRITE) == 0)
                if not vma.shared and up.any():
                    pfns = pte_pfn(ptes[up])
                    ok = pfns != ZERO_PFN
                    ok[ok] = (ram.flags[pfns[ok]] & PG_ANON_EXCLUSIVE) != 0
                    if not vma.flags & VM_SOFTDIRTY:
                        ok &= (ptes[up] & PTE_SOFT_DIRTY) != 0
                    up[up] = ok
                    if self.pt.huge and up.any():  # a PMD leaf changes whole (one WRITE bit)
                        leaf = np.flatnonzero(self.pt.huge_mask(lo, hi))
                        table = (lo + (leaf << PAGE_SHIFT)) >> PMD_SHIFT
                        for t in np.unique(table).tolist():
                            up[leaf[table == t]] = up[leaf[table == t]].all()
                if up.any():
                    self.pt.scatter(lo, np.where(up, ptes | PTE_WRITE, ptes))

    # ---- madvise -----------------------------------------------------------------------------
    async def sys_madvise(self, addr: int, length: int, advice: int) -> None:
        """madvise(2) of the advice that stays within this mm: DONTNEED(_LOCKED) (zap),
        FREE (anonymous only; clean), PAGEOUT (reclaim to swap), COLD (reclaim takes
        the pages first: _deactivate), WILLNEED (a hint: nothing to do here past the
        checks), COLLAPSE, and the advice that only sets vm_flags (_ADVICE_FLAGS;
        DONTFORK and WIPEONFORK are what fork honours). POPULATE_* and REMOVE are the
        kernel's (they reach past this mm's lock). EINVAL for other advice; ENOMEM if
        part of the range is unmapped (the mapped parts are still advised); a mapping
        that refuses the advice stops the walk there with its errno (EINVAL), those
        before it advised."""
        if advice not in _ADVICE_FLAGS and advice not in (
                MADV_DONTNEED, MADV_DONTNEED_LOCKED, MADV_FREE, MADV_PAGEOUT, MADV_COLD, MADV_WILLNEED,
                MADV_COLLAPSE):
            raise KernelError(errno.EINVAL, f"unknown madvise advice {advice}")
        end = madvise_end(addr, length)
        if end == addr:
            return
        async with self.lock.write():
            self._check_alive()
            vmas = self.vmas.overlapping(addr, end)
            if advice in (MADV_DONTNEED, MADV_DONTNEED_LOCKED, MADV_FREE):  # (no mlock here: the same)
                for vma in vmas:
                    if vma.flags & (VM_PFNMAP | VM_IO):
                        raise KernelError(errno.EINVAL, "madvise on a special mapping")
                    if advice == MADV_FREE and (not vma.is_anonymous or vma.flags & VM_HUGETLB):
                        raise KernelError(errno.EINVAL, "MADV_FREE works on private anonymous memory only")
                    if vma.flags & VM_HUGETLB and max(addr, vma.start) & (PMD_SIZE - 1):
                        raise KernelError(errno.EINVAL, "MADV_DONTNEED of hugetlb starts at a huge page")
                for vma in vmas:
                    s, e = max(addr, vma.start), min(end, vma.end)
                    if vma.flags & VM_HUGETLB:
                        # Whole huge pages only, rounded down: never more than was asked.
                        e &= ~(PMD_SIZE - 1)
                        if e <= s:
                            continue
                    async with self.invalidate(s, e, Event.CLEAR):
                        await self.split_huge_pmds(s, e)  # (zap_pmd_range splits what the range cuts)
                        self.pt.split_huge(s, e)
                        if advice != MADV_FREE:
                            self._zap(vma, s, e)
                            if vma.flags & VM_HUGETLB and not vma.shared:
                                self._restore_hugetlb(s, e)
                        else:
                            for lo, hi in self.pt.populated_runs(s, e):
                                ptes = self.pt.gather(lo, hi)
                                self._free_swap(ptes)  # a swapped-out page is dropped, as a lazily freed one
                                ptes[pte_swp_type(ptes) == SWP_SWAP] = 0
                                self.pt.scatter(lo, ptes & ~(PTE_DIRTY | PTE_YOUNG))
            elif advice == MADV_PAGEOUT:
                for vma in vmas:
                    if vma.flags & (VM_HUGETLB | VM_PFNMAP | VM_IO):  # can_madv_lru_vma()
                        raise KernelError(errno.EINVAL, "MADV_PAGEOUT of a hugetlb or special mapping")
                for vma in vmas:
                    s, e = max(addr, vma.start), min(end, vma.end)
                    await self.split_huge_pmds(s, e)  # (page_out splits the rest)
                    if vma.is_anonymous:
                        addrs, _ = rmap.find(self, pte_present, s, e)
                        await page_out(self, vma, addrs)
                    else:
                        await page_out_file_mapping(self, vma, s, e)
            elif advice == MADV_COLLAPSE:
                for vma in vmas:
                    await self._collapse(vma, max(addr, vma.start), min(end, vma.end))
            elif advice == MADV_COLD:
                for vma in vmas:
                    if vma.flags & (VM_HUGETLB | VM_PFNMAP):  # can_madv_lru_vma()
                        raise KernelError(errno.EINVAL, "MADV_COLD of a hugetlb or special mapping")
                    await self._deactivate(max(addr, vma.start), min(end, vma.end))
            elif advice in _ADVICE_FLAGS:
                await self._advise_flags(vmas, addr, end, advice)
            # (MADV_WILLNEED: read-ahead and swap-in ahead of use; nothing to do here.)
            self._vmas_covering(addr, end)

    async def _deactivate(self, start: int, end: int) -> None:
        """madvise_cold() of [start, end) in one mapping: the pages this process alone
        maps go to the tail of the inactive list. With a clock for the LRU (reclaim's
        shrink), that is their accessed bits cleared: reclaim takes them before any
        page used since its last pass. A THP the range cuts is split first (a CLEAR
        over its 2 MiB, as split_folio's unmap); one the range covers is aged whole.
        Pages mapped elsewhere too (fork, another mapper of a file page), the zero
        page and device pages are left alone (folio_likely_mapped_shared,
        vm_normal_folio). No invalidation: mirrors do not track access."""
        def own(ptes: np.ndarray) -> np.ndarray:
            pfns = pte_pfn(ptes)
            ok = pte_present(ptes) & (pfns != ZERO_PFN) & (pfns < self.ram.nframes)
            ok[ok] = self.ram.mapcount[pfns[ok]] == 1
            return ok

        for idx in self.pt.huge_spans(start, end):
            lo = idx << PMD_SHIFT
            if (lo < start or lo + PMD_SIZE > end) and own(self.pt.gather(lo, lo + PMD_SIZE)).all():
                async with self.invalidate(lo, lo + PMD_SIZE, Event.CLEAR):
                    self.pt.huge.discard(idx)
        for lo, hi in self.pt.populated_runs(start, end):
            ptes = self.pt.gather(lo, hi)
            old = own(ptes)
            for idx in self.pt.huge_spans(lo, hi):  # a THP still mapped shared stays as it is
                h0 = (max(lo, idx << PMD_SHIFT) - lo) >> PAGE_SHIFT
                h1 = (min(hi, (idx + 1) << PMD_SHIFT) - lo) >> PAGE_SHIFT
                if not old[h0:h1].all():
                    old[h0:h1] = False
            ptes[old] &= ~PTE_YOUNG
            self.pt.scatter(lo, ptes)

    async def _advise_flags(self, vmas: list[Vma], addr: int, end: int, advice: int) -> None:
        """madvise_update_vma(): each mapping of [addr, end) whose flags the advice
        changes is cut to the range and changed (a mapping the advice does not
        change is left whole), then merged with its neighbours. A mapping that
        refuses the advice (EINVAL) stops the walk there."""
        set_flags, clear_flags = _ADVICE_FLAGS[advice]
        changed: list[Vma] = []
        try:
            for vma in vmas:
                if advice == MADV_DOFORK and vma.flags & VM_IO:
                    raise KernelError(errno.EINVAL, "MADV_DOFORK of a VM_IO mapping")
                if advice == MADV_WIPEONFORK and not (vma.is_anonymous and not vma.flags & VM_HUGETLB):
                    raise KernelError(errno.EINVAL, "MADV_WIPEONFORK works on private anonymous memory only")
                if advice == MADV_DODUMP and vma.flags & VM_SPECIAL and not vma.flags & VM_HUGETLB:
                    raise KernelError(errno.EINVAL, "MADV_DODUMP of a driver mapping")
                flags = (vma.flags | set_flags) & ~clear_flags
                if flags == vma.flags:
                    continue
                s, e = max(addr, vma.start), min(end, vma.end)
                self._check_huge_alignment(s, e)  # (hugetlb_vm_op_split)
                await self.split_huge_pmds(s, e)  # a VMA boundary cannot cut a PMD
                (piece,) = self.vmas.isolate(s, e)
                piece.flags = flags
                changed.append(piece)
        finally:
            self._merge(changed)

    async def _collapse(self, vma: Vma, start: int, end: int) -> None:
        """MADV_COLLAPSE (madvise_collapse): each whole 2 MiB span of anonymous memory
        in [start, end) is copied into one new order-9 folio mapped by a PMD, inside a
        CLEAR: its present pages (those fork shares too: the other process keeps
        them), its swapped-out pages (swapped in: the slots lose this reference) and
        zeroes for the rest. Every span is tried; if one could not be, the last
        failure's errno: EINVAL for a span with nothing mapped or with entries that
        are not pages (device-private, migration, device-exclusive) or device memory,
        EAGAIN for a page something else holds (a pin: its refcount is not its
        mapcount), ENOMEM (at once) without a free 2 MiB block. EINVAL for
        VM_NOHUGEPAGE."""
        if not vma.is_anonymous:
            raise KernelError(errno.EINVAL, "MADV_COLLAPSE works on anonymous memory only")
        if vma.flags & VM_NOHUGEPAGE:
            raise KernelError(errno.EINVAL, "MADV_NOHUGEPAGE mapping")
        first = (start + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
        last_fail: KernelError | None = None
        for h in range(first, end - PMD_SIZE + 1, PMD_SIZE):
            if (h >> PMD_SHIFT) in self.pt.huge:
                continue  # already huge
            if (h >> PMD_SHIFT) not in self.pt.tables:
                last_fail = KernelError(errno.EINVAL, f"nothing is mapped in the span at {h:#x}")
                continue
            async with self.invalidate(h, h + PMD_SIZE, Event.CLEAR):
                ptes = self.pt.gather(h, h + PMD_SIZE)
                present = pte_present(ptes)
                pfns = pte_pfn(ptes)
                real = present & (pfns != ZERO_PFN)
                swapped = pte_swp_type(ptes) == SWP_SWAP
                if (pfns[real] >= self.ram.nframes).any() or (~present & (ptes != 0) & ~swapped).any():
                    last_fail = KernelError(errno.EINVAL, f"the span at {h:#x} maps device memory or no page")
                    continue
                if (self.ram.refcount[pfns[real]] != self.ram.mapcount[pfns[real]]).any():
                    last_fail = KernelError(errno.EAGAIN, f"the span at {h:#x} holds a page something else holds")
                    continue
                frames = self.ram.alloc_contig(PTRS_PER_PTE)
                if frames is None:
                    raise KernelError(errno.ENOMEM, "no free 2 MiB block")
                self.ram.copy(frames[real], pfns[real])  # empty and zero pages stay zero
                slots = pfns[swapped]
                for frame, slot in zip(frames[swapped].tolist(), slots.tolist(), strict=True):
                    self.ram.data[frame] = self.swap.load(slot)
                self.swap.free(slots)
                self.swapents -= len(slots)
                self.ram.flags[frames] |= PG_ANON | PG_ANON_EXCLUSIVE
                self.ram.map(frames)
                self.anon_vma_prepare(vma)
                self.pt.scatter(h, make_present(frames, vma.writable, True))
                self.pt.huge.add(h >> PMD_SHIFT)
                self._add_rss(RSS_ANON, PTRS_PER_PTE - int(real.sum()))
                self.ram.unmap(pfns[real])
                self.ram.put(pfns[real])
        if last_fail is not None:
            raise last_fail

    # ---- mremap --------------------------------------------------------------------------------
    async def sys_mremap(self, old_addr: int, old_len: int, new_len: int, flags: int, new_addr: int) -> int:
        """mremap(2) with MREMAP_MAYMOVE, MREMAP_FIXED and MREMAP_DONTUNMAP.

        A move raises UNMAP over the old range and carries the pages over (no copy),
        each entry marked soft-dirty; the moved or grown mapping keeps its flags
        (VM_SOFTDIRTY included: only mmap makes a mapping new). A shrink unmaps the
        tail, across mappings too. EINVAL for bad flags or overlapping ranges; EFAULT
        if what moves or grows is not one mapping, or is a driver's mapping
        (VM_DONTEXPAND) that would grow; EPERM for a fixed target below the lowest
        mappable address; ENOMEM if it cannot grow in place and may not move.
        """
        if flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP):
            raise KernelError(errno.EINVAL, f"unknown mremap flags {flags:#x}")
        if old_addr & (PAGE_SIZE - 1):
            raise KernelError(errno.EINVAL, "old address is not page-aligned")
        if flags & (MREMAP_FIXED | MREMAP_DONTUNMAP) and not flags & MREMAP_MAYMOVE:
            raise KernelError(errno.EINVAL, "MREMAP_FIXED and MREMAP_DONTUNMAP need MREMAP_MAYMOVE")
        # PAGE_ALIGN() of a length within a page of 2^64 is 0, as in C.
        old_len, new_len = page_align(old_len) & ULONG_MAX, page_align(new_len) & ULONG_MAX
        if new_len == 0:
            raise KernelError(errno.EINVAL, "new length must be positive")
        if flags & MREMAP_DONTUNMAP and old_len != new_len:
            raise KernelError(errno.EINVAL, "MREMAP_DONTUNMAP cannot resize")
        if flags & MREMAP_FIXED and new_addr & (PAGE_SIZE - 1):
            raise KernelError(errno.EINVAL, "new address is not page-aligned")
        async with self.lock.write():
            self._check_alive()
            # No VMA lies beyond TASK_SIZE: an old range there is EFAULT, as in Linux.
            vma = self.vmas.find(old_addr)
            if vma is not None and vma.flags & VM_HUGETLB:
                # Whole huge pages only, and never grown (its pool pages were counted at mmap).
                old_len = (old_len + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
                new_len = (new_len + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
                if (old_addr | (new_addr if flags & MREMAP_FIXED else 0)) & (PMD_SIZE - 1):
                    raise KernelError(errno.EINVAL, "a hugetlb mapping moves at huge page boundaries")
                if new_len > old_len:
                    raise KernelError(errno.EINVAL, "a hugetlb mapping cannot grow")
                if flags & MREMAP_DONTUNMAP:
                    raise KernelError(errno.EINVAL, "MREMAP_DONTUNMAP on a hugetlb mapping")
            if vma is None:
                raise KernelError(errno.EFAULT, f"nothing is mapped at {old_addr:#x}")
            if old_len == 0:  # Linux duplicates a shared mapping here; not modelled
                raise KernelError(errno.EINVAL, "old length must be positive")
            moves = bool(flags & (MREMAP_FIXED | MREMAP_DONTUNMAP))
            if moves:  # mremap_to()
                if new_addr + new_len > TASK_SIZE:
                    raise KernelError(errno.EINVAL, "new range leaves the address space")
                if new_addr < old_addr + old_len and old_addr < new_addr + new_len:
                    raise KernelError(errno.EINVAL, "old and new ranges overlap")
                if flags & MREMAP_DONTUNMAP and vma.flags & (VM_DONTEXPAND | VM_PFNMAP):
                    raise KernelError(errno.EINVAL, "MREMAP_DONTUNMAP of a driver's mapping")
            elif new_len <= old_len:  # a shrink only unmaps the tail, across mappings too
                if new_len < old_len:
                    if old_addr + old_len > TASK_SIZE:  # (do_vmi_munmap)
                        raise KernelError(errno.EINVAL, "the old range leaves the address space")
                    await self._do_munmap(old_addr + new_len, old_addr + old_len)
                return old_addr
            # vma_to_resize(): what moves or grows is one mapping, and not a driver's.
            if old_addr + min(old_len, new_len) > vma.end:
                raise KernelError(errno.EFAULT, "the old range is not a single mapping")
            if new_len > old_len and vma.flags & (VM_DONTEXPAND | VM_PFNMAP):
                raise KernelError(errno.EFAULT, "a driver's mapping cannot grow")
            if flags & MREMAP_FIXED and new_addr < MMAP_MIN_ADDR:  # (as mmap: security_mmap_addr)
                raise KernelError(errno.EPERM, f"{new_addr:#x} is below the lowest mappable address")
            if flags & MREMAP_FIXED:
                await self._do_munmap(new_addr, new_addr + new_len)
                if new_len < old_len:
                    await self._do_munmap(old_addr + new_len, old_addr + old_len)
                    old_len = new_len
                return await self._move(old_addr, old_len, new_addr, new_len, flags)
            align = _area_align(vma.is_anonymous and not vma.shared, new_len)
            if flags & MREMAP_DONTUNMAP:  # always moves, as mremap_to() does
                target = self._get_unmapped_area(0, new_len, align)
                return await self._move(old_addr, old_len, target, new_len, flags)
            # Grow: in place if the old range ends the VMA and the space after is free.
            if old_addr + old_len == vma.end and not self.vmas.overlapping(vma.end, old_addr + new_len) \
                    and old_addr + new_len <= TASK_SIZE:
                vma.end = old_addr + new_len
                # A shared object keeps the size mmap gave it (Linux): past it, SIGBUS.
                return old_addr
            if not flags & MREMAP_MAYMOVE:
                raise KernelError(errno.ENOMEM, "cannot grow in place and MREMAP_MAYMOVE not given")
            target = self._get_unmapped_area(0, new_len, align)
            return await self._move(old_addr, old_len, target, new_len, flags)

    async def _move(self, old_addr: int, old_len: int, new_addr: int, new_len: int, flags: int) -> int:
        old_end = old_addr + old_len
        (src,) = self.vmas.isolate(old_addr, old_end)
        moved = src.clone(src.start, src.end)  # same file offset as the source
        moved.start, moved.end = new_addr, new_addr + new_len
        # Hugetlb pages move whole (aligned at both ends): they stay PMD mappings, and
        # a private mapping's reservations move with them. So does a THP the range holds
        # whole when it lands 2 MiB-aligned (move_huge_pmd); others are split.
        whole_pmds = bool(src.flags & VM_HUGETLB) or not (new_addr - old_addr) % PMD_SIZE
        if src.flags & VM_HUGETLB and not src.shared and not flags & MREMAP_DONTUNMAP:
            shift = (new_addr - old_addr) >> PMD_SHIFT
            for held in (self.hugetlb_owned, self.hugetlb_resv):
                moving = {i for i in held if old_addr >> PMD_SHIFT <= i < old_end >> PMD_SHIFT}
                held -= moving
                held |= {i + shift for i in moving}
        async with self.invalidate(old_addr, old_end, Event.UNMAP):
            await self.split_huge_pmds(old_addr, old_end)  # (move_page_tables splits what it cuts)
            huge = self.pt.huge_spans(old_addr, old_end) if whole_pmds else []
            self.pt.split_huge(old_addr, old_end)
            runs = [(lo, self.pt.gather(lo, hi)) for lo, hi in self.pt.populated_runs(old_addr, old_end)]
            for lo, ptes in runs:
                self.pt.scatter(lo, np.zeros_like(ptes))
            for lo, ptes in runs:
                # move_soft_dirty_pte(): a tracker must see the pages moved.
                self.pt.scatter(lo - old_addr + new_addr, np.where(ptes != 0, ptes | PTE_SOFT_DIRTY, ptes))
            for idx in huge:
                self.pt.huge.add(((idx << PMD_SHIFT) - old_addr + new_addr) >> PMD_SHIFT)
            self.vmas.insert(moved)
            if moved.file is not None:
                moved.file.mappings.add(moved)
            if not flags & MREMAP_DONTUNMAP:
                self.vmas.remove(src)
                if src.file is not None:
                    src.file.mappings.discard(src)
        return new_addr

    # ---- fork ------------------------------------------------------------------------------
    async def fork(self) -> AddressSpace:
        """dup_mmap(): a copy-on-write copy. The parent's COW VMAs that hold anonymous
        pages get PROTECTION_PAGE while their PTEs are write-protected and copied.
        A VM_DONTCOPY mapping (MADV_DONTFORK) is left out of the child, a
        VM_WIPEONFORK one (MADV_WIPEONFORK) is given to it empty; neither is touched
        in the parent."""
        async with self.lock.write():
            self._check_alive()
            child = AddressSpace(self.ram, self.devmem, self.swap)
            try:
                for vma in self.vmas:
                    if vma.flags & VM_DONTCOPY:
                        continue
                    cvma = vma.clone(vma.start, vma.end)
                    cvma.hugetlb_unmapped = False  # a child starts with no reservation state
                    cvma.mm = child
                    if vma.flags & VM_WIPEONFORK:
                        cvma.anon_vma = None  # a clean slate: the child faults in zeroes
                    child.vmas.insert(cvma)
                    if cvma.file is not None:
                        cvma.file.mappings.add(cvma)
                    if cvma.anon_vma is not None:
                        cvma.anon_vma.members.add(child)
                    # vma_needs_copy(): anonymous pages, or a driver's mapping (no fault
                    # handler would fill it again); the others fault in from their file.
                    if not (cvma.anon_vma is not None or vma.flags & (VM_PFNMAP | VM_MIXEDMAP)):
                        continue
                    if vma.shared:  # not copy-on-write: copied as it is, nothing announced
                        self._copy_ptes(vma, child)
                        continue
                    async with self.invalidate(vma.start, vma.end, Event.PROTECTION_PAGE):
                        await self._split_pinned_thps(vma)
                        self._copy_ptes(vma, child)
            except BaseException:
                child._unmap_vmas(list(child.vmas))  # nobody mirrors the child yet
                child.users = 0
                raise
            child.rss_peak = sum(child.rss)
            return child

    async def _split_pinned_thps(self, vma: Vma) -> None:
        """copy_huge_pmd(): a THP with a pinned page cannot be shared with the child;
        its PMD is split (announced, split_huge_pmds) and its pages copied one by one."""
        if vma.flags & VM_HUGETLB:
            return  # (a hugetlb page is copied whole)
        for idx in self.pt.huge_spans(vma.start, vma.end):
            ptes = self.pt.tables[idx]
            frames = pte_pfn(ptes[pte_present(ptes)])
            frames = frames[frames != ZERO_PFN]
            frames = frames[(self.ram.flags[frames] & PG_ANON) != 0]
            if (self.ram.pincount[frames] > 0).any():
                await self.split_huge_pmds(idx << PMD_SHIFT, (idx + 1) << PMD_SHIFT, whole=True)

    def _restore_exclusive(self, vma: Vma) -> None:
        """fork(): the parent's device-exclusive entries become present again (no event
        of their own: the PROTECTION_PAGE window covers it); exclusivity is lost. A
        page still locked by its device makes fork fail with ENOMEM (the trylock)."""
        for start, end in self.pt.populated_runs(vma.start, vma.end):
            self._restore_exclusive_run(vma, start, end)

    def _restore_exclusive_run(self, vma: Vma, start: int, end: int) -> None:
        ptes = self.pt.gather(start, end)
        excl = np.flatnonzero(pte_swp_type(ptes) == SWP_DEVICE_EXCLUSIVE)
        if not len(excl):
            return
        pfns = pte_pfn(ptes[excl])
        if any(self.ram.locks.is_locked(int(p)) for p in pfns):
            raise KernelError(errno.ENOMEM, "a device-exclusive page is locked by its device")
        ptes[excl] = make_present(pfns, vma.writable, True) | (ptes[excl] & PTE_SOFT_DIRTY)
        self.pt.scatter(start, ptes)

    def _copy_ptes(self, vma: Vma, child: AddressSpace) -> None:
        """copy_page_range(): the child shares every page; private anonymous pages and
        device-private entries become read-only in both (copy-on-write)."""
        self._restore_exclusive(vma)
        for start, end in self.pt.populated_runs(vma.start, vma.end):
            self._copy_run(vma, child, start, end)

    def _copy_run(self, vma: Vma, child: AddressSpace, start: int, end: int) -> None:
        ptes = self.pt.gather(start, end)
        present = pte_present(ptes)
        device = pte_swp_type(ptes) == SWP_DEVICE_PRIVATE
        swapped = pte_swp_type(ptes) == SWP_SWAP
        # The child's entries are the parent's (write-protected where copy-on-write),
        # soft-dirty bit included: copy_present_pte() and copy_nonpresent_pte() copy it.
        if swapped.any():  # swap_duplicate(): both name the slot; each swaps in its own copy
            child.pt.scatter(start, np.where(swapped, ptes, np.uint64(0)))
            self.swap.dup(pte_pfn(ptes[swapped]))
            child.swapents += int(swapped.sum())
        if not present.any() and not device.any():
            return
        pfns = pte_pfn(ptes)
        real = present & (pfns != ZERO_PFN)
        anon = real.copy()
        anon[real] = (self.ram.flags[pfns[real]] & PG_ANON) != 0
        # A pinned anonymous page cannot be shared: the child gets its own copy now
        # and the parent keeps its page as it is, exclusive (page_try_dup_anon_rmap
        # fails); the others are shared and lose their exclusive mark.
        pinned = anon.copy()
        pinned[anon] = self.ram.pincount[pfns[anon]] > 0
        hugetlb = bool(vma.flags & VM_HUGETLB)
        if hugetlb and pinned.any():
            # A hugetlb page is one folio: a pin on any page of it pins it all, and
            # the child's copy is a huge page from the pool (ENOMEM: fork fails).
            pinned = np.repeat(pinned.reshape(-1, PTRS_PER_PTE).any(axis=1), PTRS_PER_PTE) & anon
            copies = self._hugetlb_copies(int(pinned.sum()) // PTRS_PER_PTE)
        cow = (anon & ~pinned) | device
        ptes[cow] = _wrprotect(ptes[cow])
        self.pt.scatter(start, ptes)
        child_ptes = np.where(present | device | swapped, ptes, np.uint64(0))
        if pinned.any():
            if not hugetlb:
                copies = self.ram.alloc(int(pinned.sum()), zero=False)
            self.ram.copy(copies, pfns[pinned])
            self.ram.flags[copies] |= PG_ANON | PG_ANON_EXCLUSIVE
            self.ram.map(copies)
            child_ptes[pinned] = make_present(copies, vma.writable, True)
            child._account(vma, copies, +1)
        child.pt.scatter(start, child_ptes)
        # PMD leaves are shared whole (copy_huge_pmd), device-private PMDs included
        # (one with a pinned page was split first: _split_pinned_thps).
        for idx in self.pt.huge_spans(start, end):
            if idx in child.pt.tables:
                child.pt.huge.add(idx)
        shared = pfns[real & ~pinned]
        self.ram.flags[shared] &= np.uint8(~PG_ANON_EXCLUSIVE & 0xFF)
        self.ram.get(shared)
        self.ram.map(shared)
        child._account(vma, shared, +1)
        if device.any():
            dpfns = pfns[device]
            self.devmem.get(dpfns)
            self.devmem.map(dpfns)
            child._add_rss(RSS_ANON, len(dpfns))

    def _hugetlb_copies(self, n: int) -> np.ndarray:
        """The frames of ``n`` huge pages from the pool; ENOMEM (nothing taken) if short."""
        parts: list[np.ndarray] = []
        for _ in range(n):
            frames = self.ram.alloc_hugetlb()
            if frames is None:
                for taken in parts:
                    self.ram.put(taken)
                raise KernelError(errno.ENOMEM, "no huge page for the child's copy of a pinned hugetlb page")
            parts.append(frames)
        return np.concatenate(parts)

    # ---- pages that may move (compaction, MADV_PAGEOUT) and page-table queries ----------------
    def movable(self, start: int, end: int) -> np.ndarray:
        """Per page of [start, end): whether compaction or reclaim may move it now."""
        return self.movable_entries(start + (np.arange((end - start) >> PAGE_SHIFT) << PAGE_SHIFT),
                                    self.pt.gather(start, end))

    def movable_entries(self, addrs: np.ndarray, ptes: np.ndarray) -> np.ndarray:
        """Per entry (``ptes`` at ``addrs``): whether its page may move now — anonymous,
        mapped only here, held by nothing else (not pinned, not locked), not the zero
        page, not mapped by a PMD."""
        pfns = pte_pfn(ptes)
        ram = self.ram
        out = pte_present(ptes) & (pfns != ZERO_PFN) & (pfns < ram.nframes)
        if self.pt.huge:
            out &= ~np.isin(addrs >> PMD_SHIFT, list(self.pt.huge))
        p = pfns[out]
        out[out] = ((ram.flags[p] & PG_ANON) != 0) & ((ram.flags[p] & PG_LOCKED) == 0) & (ram.mapcount[p] == 1) \
            & (ram.refcount[p] == 1)
        return out

    def pages_where(self, select: Callable[[Vma, np.ndarray, np.ndarray], np.ndarray]
                    ) -> list[tuple[Vma, np.ndarray, np.ndarray]]:
        """(mapping, addresses, PTEs) of the present pages ``select(vma, addrs, ptes)``
        picks in each mapping; the populated page tables only (a mapping may be far
        larger than what it maps)."""
        addrs, ptes = rmap.find(self, pte_present)
        out = []
        for vma in self.vmas:
            lo, hi = np.searchsorted(addrs, [vma.start, vma.end])
            if hi > lo:
                keep = select(vma, addrs[lo:hi], ptes[lo:hi])
                if keep.any():
                    out.append((vma, addrs[lo:hi][keep], ptes[lo:hi][keep]))
        return out

    # ---- OOM reaper and exit -------------------------------------------------------------------
    async def oom_reap(self) -> tuple[bool, int]:
        """One pass of the OOM reaper (__oom_reap_task_mm): empty every anonymous or
        private mapping (not hugetlb, not special) inside a non-blockable UNMAP window
        each. A device may refuse such a window: that mapping stays as it is and the
        pass is incomplete. The mmap lock is only tried, and for writing (the kernel
        reads it, but hmmd's zap never meets a migration's entries): a migration or a
        fault holding it fails the pass. Returns (every mapping reaped, pages freed)."""
        if not self.lock.try_acquire_write():
            return False, 0
        try:
            self.unstable = True
            before, complete = sum(self.rss), True
            for vma in list(self.vmas):
                if vma.flags & (VM_HUGETLB | VM_PFNMAP | VM_IO) or not (vma.is_anonymous or not vma.shared):
                    continue
                self.pt.split_huge(vma.start, vma.end)
                try:
                    async with self.invalidate(vma.start, vma.end, Event.UNMAP, blockable=False):
                        self._zap(vma, vma.start, vma.end)
                except KernelError as e:
                    if e.errno != errno.EAGAIN:
                        raise
                    complete = False  # refused: the window is closed, the mapping untouched
            return complete, before - sum(self.rss)
        finally:
            await self.lock.release_write()

    async def exit_mmap(self) -> None:
        """The last user went away: RELEASE to every notifier, UNMAP, free everything."""
        async with self.lock.write():
            if not self.alive:
                return
            self.users = 0
            async with self.invalidate(0, ULONG_MAX, Event.RELEASE):
                pass
            vmas = list(self.vmas)
            if vmas:
                async with self.invalidate(0, ULONG_MAX, Event.UNMAP):
                    self._unmap_vmas(vmas)
            self.pt.clear()

    # ---- clear_refs --------------------------------------------------------------------------
    async def clear_refs(self, value: int) -> None:
        """/proc/pid/clear_refs. 4 resets soft-dirty: SOFT_DIRTY over [0, ULONG_MAX),
        VM_SOFTDIRTY and every entry's bit cleared, and every present PTE
        write-protected so the next write marks it again — but for a pinned page of a
        copy-on-write mapping mapped by a PTE, left as it is (clear_soft_dirty's
        pte_is_pinned: write-protecting it would invite a copy away from the pin; a
        PMD leaf is write-protected whole all the same)."""
        if value not in (CLEAR_REFS_ALL, CLEAR_REFS_ANON, CLEAR_REFS_MAPPED,
                         CLEAR_REFS_SOFT_DIRTY, CLEAR_REFS_MM_HIWATER_RSS):
            raise KernelError(errno.EINVAL, f"unknown clear_refs value {value}")
        async with self.lock.write():
            self._check_alive()
            if value == CLEAR_REFS_MM_HIWATER_RSS:
                self.rss_peak = sum(self.rss)
                return
            if value != CLEAR_REFS_SOFT_DIRTY:
                for vma in self.vmas:
                    if value == CLEAR_REFS_ANON and not vma.is_anonymous:
                        continue
                    if value == CLEAR_REFS_MAPPED and vma.is_anonymous:
                        continue
                    for lo, hi in self.pt.populated_runs(vma.start, vma.end):
                        self.pt.scatter(lo, self.pt.gather(lo, hi) & ~PTE_YOUNG)
                return
            async with self.invalidate(0, ULONG_MAX, Event.SOFT_DIRTY):
                for vma in self.vmas:
                    vma.flags &= ~VM_SOFTDIRTY
                    for lo, hi in self.pt.populated_runs(vma.start, vma.end):
                        ptes = self.pt.gather(lo, hi)
                        present = pte_present(ptes)
                        clear = present.copy()
                        if vma.is_cow:
                            pfns = pte_pfn(ptes)
                            clear &= (self.ram.pincount[np.where(clear, pfns, ZERO_PFN)] == 0) \
                                | (pfns == ZERO_PFN) | self.pt.huge_mask(lo, hi)
                        ptes[clear] &= ~(PTE_SOFT_DIRTY | PTE_WRITE)
                        ptes[~present] &= ~PTE_SOFT_DIRTY  # swap-like entries: their bit only
                        self.pt.scatter(lo, ptes)

    # ---- truncate and hole punch (called by the kernel for every mm mapping the file) -------
    async def zap_file_range(self, inode: Inode, first_page: int, end_page: int, *, even_cows: bool) -> None:
        """unmap_mapping_range(): zap every mapping of file pages [first_page,
        end_page) in this mm, with CLEAR. ``even_cows`` (truncate): private COW
        copies too; without (a hole punch), those stay."""
        async with self.lock.write():
            for vma in [v for v in self.vmas if v.file is inode]:
                s_page, e_page = max(first_page, vma.pgoff), min(end_page, vma.pgoff + vma.npages)
                if s_page >= e_page:
                    continue
                s = vma.start + ((s_page - vma.pgoff) << PAGE_SHIFT)
                e = vma.start + ((e_page - vma.pgoff) << PAGE_SHIFT)
                if not self.pt.any_table(s, e):
                    continue
                self.pt.split_huge(s, e)
                async with self.invalidate(s, e, Event.CLEAR):
                    self._zap(vma, s, e, even_cows=even_cows)

    async def remove_targets(self, addr: int, end: int) -> tuple[list[tuple[Inode, int, int]], KernelError | None]:
        """MADV_REMOVE's walk of [addr, end) (madvise_remove): the file pages behind
        each mapping, in order, as (inode, first page, pages), up to the first
        mapping that refuses — a private anonymous one (EINVAL: no file), one not
        shared and writable (EACCES; a private hugetlb one too, whose file is
        hugetlbfs's), a driver's (ENODEV: its file cannot be punched) — and the error
        to raise once those are done: that refusal, else ENOMEM if part of the range
        is unmapped."""
        async with self.lock.read():
            self._check_alive()
            targets: list[tuple[Inode, int, int]] = []
            for vma in self.vmas.overlapping(addr, end):
                shared_writable = vma.shared and bool(vma.flags & VM_MAYWRITE)  # vma_is_shared_maywrite()
                if vma.flags & VM_MIXEDMAP and vma.file is None:
                    return targets, KernelError(errno.ENODEV if shared_writable else errno.EACCES,
                                                "MADV_REMOVE of a driver mapping")
                if vma.file is None and not vma.flags & VM_HUGETLB:
                    return targets, KernelError(errno.EINVAL, "MADV_REMOVE works on file and shared mappings only")
                if not shared_writable or vma.file is None:
                    return targets, KernelError(errno.EACCES, "MADV_REMOVE needs a shared writable mapping")
                s, e = max(addr, vma.start), min(end, vma.end)
                targets.append((vma.file, vma.file_page(s), (e - s) >> PAGE_SHIFT))
            try:
                self._vmas_covering(addr, end)
            except KernelError as e:
                return targets, e
            return targets, None

    # ---- introspection -------------------------------------------------------------------------
    def maps(self) -> list[Vma]:
        return list(self.vmas)

    def page_state(self, start: int, end: int) -> np.ndarray:
        """The raw PTEs of [start, end) (for tests and tools)."""
        return self.pt.gather(start, end)


def _wrprotect(ptes: np.ndarray) -> np.ndarray:
    """``ptes`` write-protected. A writable device-private entry made read-only loses
    its soft-dirty bit, as in change_pte_range() and copy_nonpresent_pte() (only
    checkpoint/restore reads it, and it does not care about device pages)."""
    device_w = (pte_swp_type(ptes) == SWP_DEVICE_PRIVATE) & ((ptes & PTE_WRITE) != 0)
    return np.where(device_w, ptes & ~PTE_SOFT_DIRTY, ptes) & ~PTE_WRITE


def _area_align(anon_private: bool, length: int) -> int:
    """Where get_unmapped_area() puts a new private anonymous mapping, or one mremap
    moves, when no address is hinted: a length of whole 2 MiB blocks lands on a PMD
    boundary, so that THPs can map it (thp_get_unmapped_area); anything else on a
    page."""
    return PMD_SIZE if anon_private and not length & (PMD_SIZE - 1) else PAGE_SIZE


def make_present(pfns: np.ndarray, write: bool | np.ndarray, dirty: bool | np.ndarray) -> np.ndarray:
    """Present PTEs for ``pfns``; ``write`` and ``dirty`` per page or for all."""
    entries = (pfns.astype(np.uint64) << np.uint64(PAGE_SHIFT)) | (PTE_PRESENT | PTE_YOUNG)
    entries |= np.where(write, PTE_WRITE, np.uint64(0)).astype(np.uint64)
    entries |= np.where(dirty, PTE_DIRTY | PTE_SOFT_DIRTY, np.uint64(0)).astype(np.uint64)
    return entries

