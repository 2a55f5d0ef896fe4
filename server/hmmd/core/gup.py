"""get_user_pages / pin_user_pages, and /proc/pid/pagemap.

GUP faults pages in (writable with FOLL_WRITE) and takes a reference on each
frame. Device-private pages cannot be pinned or even referenced by the CPU
side: GUP faults them home first (migrate_to_ram); a device-exclusive entry is
restored. A pin (FOLL_PIN) also counts in ``pincount``: a pinned page fails the
reference check of migrate_vma and is copied for the child at fork. A read-only
pin first unshares an anonymous page the process may share (after fork), so the
pinned page stays the one the process maps and writes (gup_must_unshare); a
long-term one in a private mapping unshares any page the process does not own —
the zero page, a file's page — into a read-only page of its own (v6.2+).

A pagemap entry is the kernel's: bit 63 present, 62 swapped (a non-present entry
that still means a page: device-private, migration, device-exclusive), 61 file
or shared memory, 56 mapped exclusively (present pages only), 55 soft-dirty (the
entry's bit, or every page of a mapping with VM_SOFTDIRTY), bits 0-54 the frame
number of a present page (or, for a swap-like entry, its type and offset).
"""

from __future__ import annotations

import errno

import numpy as np

from hmm.abi import PAGE_SHIFT, PAGE_SIZE
from hmm.errors import KernelError
from hmmd.core.fault import UNSHARE_ANON, UNSHARE_LONGTERM, access_pieces, check_access, fault_until_accessible
from hmmd.core.mm import AddressSpace, madvise_end
from hmmd.core.pagetable import PTE_SOFT_DIRTY, pte_pfn, pte_present, pte_swp_type
from hmmd.core.physmem import PG_ANON, ZERO_PFN
from hmmd.core.vma import VM_HUGETLB, VM_IO, VM_PFNMAP, VM_SOFTDIRTY

PM_PRESENT = np.uint64(1 << 63)
PM_SWAP = np.uint64(1 << 62)
PM_FILE = np.uint64(1 << 61)
PM_MMAP_EXCLUSIVE = np.uint64(1 << 56)
PM_SOFT_DIRTY = np.uint64(1 << 55)
PM_PFRAME_MASK = np.uint64((1 << 55) - 1)
SWP_TYPE_BITS = 5  # MAX_SWAPFILES_SHIFT: the swap offset sits above the type


async def get_user_pages(mm: AddressSpace, start: int, npages: int, *, write: bool, pin: bool,
                         longterm: bool = False) -> np.ndarray:
    """Fault [start, start + npages pages) in and take a reference on each frame (and a
    pin with ``pin``; FOLL_LONGTERM with ``longterm``). The caller holds the mmap read
    lock. EFAULT where the process could not access the page that way."""
    end = start + (npages << PAGE_SHIFT)
    vmas = check_access(mm, start, end, write)
    unshare = 0 if write or not pin else UNSHARE_LONGTERM if longterm else UNSHARE_ANON
    ptes = await fault_until_accessible(mm, vmas, start, end, write, unshare=unshare)
    pfns = pte_pfn(ptes)
    if (pfns >= mm.ram.span).any():  # (fault_until_accessible brought device-private pages home)
        raise KernelError(errno.EFAULT, "a device-private page cannot be pinned")
    mm.ram.get(pfns)
    if pin:
        np.add.at(mm.ram.pincount, pfns, 1)
    return pfns


async def faultin_page_range(mm: AddressSpace, start: int, length: int, *, write: bool) -> None:
    """MADV_POPULATE_READ/WRITE: fault [start, start + length) in as a read (or
    write) GUP would, taking no reference, mapping after mapping, under the mmap
    read lock. ENOMEM at an unmapped address or when memory runs out; EINVAL at a
    mapping that does not allow the access, or VM_IO/VM_PFNMAP (check_vma_flags);
    EFAULT where the fault fails (SIGBUS). What came before the failure stays
    faulted in. EINVAL for an unaligned start or a range that wraps."""
    end = madvise_end(start, length)
    if end == start:
        return
    async with mm.lock.read():
        if not mm.alive:
            raise KernelError(errno.ESRCH, "the process has exited")
        pos = start
        while pos < end:
            vma = mm.vmas.find(pos)
            if vma is None:
                raise KernelError(errno.ENOMEM, f"no mapping at {pos:#x}")
            if vma.flags & (VM_IO | VM_PFNMAP) or not (vma.writable if write else vma.readable):
                raise KernelError(errno.EINVAL, f"the mapping at {pos:#x} does not allow the "
                                                f"{'write' if write else 'read'}")
            hi = min(end, vma.end)
            for s, e in access_pieces(mm, pos, hi):
                try:
                    await fault_until_accessible(mm, [vma], s, e, write)
                except KernelError as err:
                    if err.errno != errno.EFAULT:
                        raise
                    # GUP goes page by page: the pages before the one that fails stay.
                    for page in range(s, e, PAGE_SIZE):
                        await fault_until_accessible(mm, [vma], page, page + PAGE_SIZE, write)
                    raise
            pos = hi


def put_user_pages(mm: AddressSpace, pfns: np.ndarray, *, pin: bool) -> None:
    if pin:
        np.subtract.at(mm.ram.pincount, pfns, 1)
    mm.ram.put(pfns)


def pagemap(mm: AddressSpace, start: int, npages: int) -> np.ndarray:
    """/proc/pid/pagemap entries for [start, start + npages pages)."""
    end = start + (npages << PAGE_SHIFT)
    ptes = mm.pt.gather(start, end)
    out = np.zeros(npages, dtype=np.uint64)
    present = pte_present(ptes)
    swp = pte_swp_type(ptes)
    special = ~present & (swp != 0)
    pfns = pte_pfn(ptes)
    ram = mm.ram
    system = present & (pfns < ram.span)  # system and device-coherent frames
    out[present] = PM_PRESENT | (pfns[present].astype(np.uint64) & PM_PFRAME_MASK)
    out[special] = PM_SWAP | ((swp[special].astype(np.uint64) | (pfns[special].astype(np.uint64) << np.uint64(
        SWP_TYPE_BITS))) & PM_PFRAME_MASK)
    normal = system & (pfns != ZERO_PFN)  # vm_normal_page(): the zero page has no page behind it
    file_page = normal & ((ram.flags[np.where(normal, pfns, 0)] & PG_ANON) == 0)
    out[file_page] |= PM_FILE
    # Exclusively mapped: present pages only (a non-present entry is not in the mapcount).
    mapcount = np.zeros(npages, dtype=np.int64)
    mapcount[normal] = ram.mapcount[pfns[normal]]
    out[normal & (mapcount == 1)] |= PM_MMAP_EXCLUSIVE
    soft_dirty = (ptes & PTE_SOFT_DIRTY) != 0
    for vma in mm.vmas.overlapping(start, end):
        lo = max(0, (vma.start - start) >> PAGE_SHIFT)
        hi = min(npages, (vma.end - start) >> PAGE_SHIFT)
        if vma.flags & VM_SOFTDIRTY:  # a new mapping: every page of it, holes included
            soft_dirty[lo:hi] = True
        elif vma.flags & VM_HUGETLB:  # pagemap_hugetlb_range() reads VM_SOFTDIRTY only
            soft_dirty[lo:hi] = False
    out[soft_dirty] |= PM_SOFT_DIRTY
    return out
