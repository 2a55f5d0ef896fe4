"""Device-exclusive access (make_device_exclusive, the v6.15+ single-page API).

A device asks for exclusive access to anonymous pages (atomics on a device without
a coherent bus); a private file mapping's copy-on-write copies count as anonymous.
Each page is faulted in writable, an EXCLUSIVE
invalidation carrying the requester's owner goes out over it, and its PTE
becomes a device-exclusive entry that keeps the frame. The page comes back
*locked* (the kernel's folio lock): the driver maps it, then unlocks it. Until
then a CPU fault on it waits.

Afterwards any CPU access (or a range fault that needs the page) restores a
present PTE — writable only if the VMA allows, dirty — inside a CLEAR
invalidation with no owner, which is how the device learns it lost the page.
"""

from __future__ import annotations

import errno

import numpy as np

from hmm.abi import PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT, Event
from hmm.errors import KernelError
from hmmd.core.fault import handle_mm_fault, resolve_special_entry
from hmmd.core.mm import AddressSpace
from hmmd.core.pagetable import (
    PTE_SOFT_DIRTY,
    PTE_WRITE,
    SWP_DEVICE_EXCLUSIVE,
    pte_pfn,
    pte_present,
    pte_swp_type,
    swp_flags,
)
from hmmd.core.physmem import PG_ANON
from hmmd.core.vma import VM_HUGETLB

MAX_TRIES = 100


async def make_device_exclusive(mm: AddressSpace, start: int, npages: int, owner: int, holder: object) -> np.ndarray:
    """Make [start, start + npages pages) device-exclusive; returns the frames, locked
    for ``holder``. The caller holds the mmap read lock.

    EOPNOTSUPP: the page faulted in is not anonymous, or hugetlb; EFAULT: no mapping or no write
    permission (the GUP fault fails); ENOMEM. Pages converted before an error are
    unlocked again and stay exclusive.
    """
    done: list[int] = []
    try:
        for i in range(npages):
            done.append(await _one(mm, start + (i << PAGE_SHIFT), owner, holder))
    except BaseException:
        mm.ram.locks.unlock(np.array(done, dtype=np.int64), holder)
        raise
    return np.array(done, dtype=np.int64)


async def _one(mm: AddressSpace, addr: int, owner: int, holder: object) -> int:
    locks = mm.ram.locks
    for _ in range(MAX_TRIES):
        vma = mm.vmas.find(addr)
        if vma is None or not vma.writable:
            raise KernelError(errno.EFAULT, f"cannot fault {addr:#x} in writable")
        if vma.flags & VM_HUGETLB:
            raise KernelError(errno.EOPNOTSUPP, f"{addr:#x} is hugetlb memory")
        pte = mm.pt.gather(addr, addr + PAGE_SIZE)
        if not (pte_present(pte)[0] and pte[0] & PTE_WRITE):
            if pte_swp_type(pte)[0] != 0:  # exclusive to another device, device-private or migrating
                await resolve_special_entry(mm, addr, pte)
                continue
            await handle_mm_fault(mm, vma, addr, addr + PAGE_SIZE, True)
            continue
        pfn = int(pte_pfn(pte)[0])
        if not mm.ram.flags[pfn] & PG_ANON:
            # Decided by the page GUP faulted in writable: page cache (a shared file or
            # shmem mapping) is refused, a private mapping's copy-on-write copy is not.
            raise KernelError(errno.EOPNOTSUPP, f"{addr:#x} is not anonymous memory")
        if locks.is_locked(pfn):
            await locks.wait_unlocked(pfn)
            continue
        if addr >> PMD_SHIFT in mm.pt.huge:  # GUP's FOLL_SPLIT_PMD: one page becomes exclusive
            await mm.split_huge_pmds(addr, addr + PAGE_SIZE, whole=True)
            continue
        async with mm.invalidate(addr, addr + PAGE_SIZE, Event.EXCLUSIVE, owner=owner):
            now = mm.pt.gather(addr, addr + PAGE_SIZE)
            if not (pte_present(now)[0] and now[0] & PTE_WRITE) or int(pte_pfn(now)[0]) != pfn \
                    or addr >> PMD_SHIFT in mm.pt.huge:
                continue  # the page changed meanwhile: start again
            entry = (now & (PTE_SOFT_DIRTY | PTE_WRITE | ~np.uint64((1 << PAGE_SHIFT) - 1))) | swp_flags(
                SWP_DEVICE_EXCLUSIVE)
            mm.pt.scatter(addr, entry.astype(np.uint64))
            locks.lock(np.array([pfn]), holder)
        return pfn
    raise KernelError(errno.EBUSY, f"{addr:#x} kept changing")
