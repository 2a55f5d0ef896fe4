"""hmm_range_fault(): report, and on request fault in, the CPU state of a range.

Per page the effective request is ``(requests & pfn_flags_mask) | default_flags``.
A page needs a write fault if REQ_WRITE is asked and the CPU entry is not
writable, a read fault if REQ_FAULT is asked and it is not valid. Faults run from
the first page that needs one to the end of the walk chunk — the next 2 MiB
boundary, or through a whole span without page tables — with that page's kind of
fault (for an unpopulated span: the combined need) on every page of the stretch,
whatever it asked for, and the walk restarts at the first page without output.
Every iteration first checks the notifier sequence: the caller sees EBUSY only
when an invalidation collided with the range.

Callers hold the mmap read lock.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import numpy as np

from hmm.abi import (
    HMM_PFN_ERROR,
    HMM_PFN_INOUT_FLAGS,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_MASK,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    PAGE_SHIFT,
    PAGE_SIZE,
    PMD_ORDER,
    PMD_SIZE,
)
from hmm.errors import KernelError
from hmmd.core.fault import handle_mm_fault, resolve_special_entry
from hmmd.core.mm import AddressSpace
from hmmd.core.notifier import IntervalNotifier, MmNotifiers
from hmmd.core.pagetable import (
    PTE_WRITE,
    SWP_DEVICE_PRIVATE,
    pte_pfn,
    pte_present,
    pte_swp_type,
)
from hmmd.core.vma import VM_IO, VM_PFNMAP, Vma


@dataclass
class HmmRange:
    """struct hmm_range. ``requests`` holds one byte of HMM_PFN_* request bits per page."""

    notifier: IntervalNotifier
    notifier_seq: int
    start: int
    end: int
    default_flags: int = 0
    pfn_flags_mask: int = 0
    requests: np.ndarray | None = None
    dev_private_owner: int = 0

    @property
    def npages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT


@dataclass
class HmmResult:
    pfns: np.ndarray  # uint64 per page; meaningful where flags has VALID
    flags: np.ndarray  # uint8 HMM_PFN_* output bits per page
    orders: np.ndarray  # uint8 map order per page


async def hmm_range_fault(mm: AddressSpace, rng: HmmRange) -> HmmResult:
    """Fill the output for every page of ``rng``, faulting where requested.

    EBUSY: the notifier was invalidated since ``notifier_seq``. EFAULT: a page that
    must become valid cannot (no VMA, no read permission, VM_IO/PFNMAP, SIGBUS).
    EPERM: a write fault in a VMA without write permission. ENOMEM.
    """
    n = rng.npages
    inputs = rng.requests if rng.requests is not None else np.zeros(n, dtype=np.uint8)
    req = ((inputs & np.uint8(rng.pfn_flags_mask)) | np.uint8(rng.default_flags)) & np.uint8(HMM_PFN_REQ_MASK)
    sticky = inputs & np.uint8(HMM_PFN_INOUT_FLAGS)
    out_pfns = np.zeros(n, dtype=np.uint64)
    out_flags = np.zeros(n, dtype=np.uint8)
    out_orders = np.zeros(n, dtype=np.uint8)
    sub = rng.notifier

    pos = rng.start
    guard = 0
    while True:
        if MmNotifiers.read_retry(sub, rng.notifier_seq):
            raise KernelError(errno.EBUSY, "the range was invalidated since read_begin")
        if sub.subs.invalidating and rng.notifier_seq == sub.subs.invalidate_seq:
            # The open window's own sequence (read_begin never returns it: it waits):
            # a result now could name pages the window is about to free.
            raise KernelError(errno.EBUSY, "notifier_seq is an open invalidation window's; use read_begin")
        if pos >= rng.end:
            break
        guard += 1
        if guard > n + 10_000:
            raise KernelError(errno.EFAULT, "range fault made no progress")
        i0 = (pos - rng.start) >> PAGE_SHIFT
        vma = mm.vmas.find(pos)
        if vma is None:
            nxt = mm.vmas.next_after(pos)
            hole_end = min(rng.end, nxt.start) if nxt is not None else rng.end
            j = (hole_end - rng.start) >> PAGE_SHIFT
            if (req[i0:j] & HMM_PFN_REQ_FAULT).any():
                raise KernelError(errno.EFAULT, f"no mapping at {pos:#x}")
            out_flags[i0:j] = HMM_PFN_ERROR
            pos = hole_end
            continue
        span_end = min(vma.end, rng.end)
        j = (span_end - rng.start) >> PAGE_SHIFT
        r = req[i0:j]
        if not vma.readable or vma.flags & (VM_IO | VM_PFNMAP):
            if (r & HMM_PFN_REQ_FAULT).any():
                raise KernelError(errno.EFAULT, f"mapping at {pos:#x} is not readable")
            out_flags[i0:j] = HMM_PFN_ERROR
            pos = span_end
            continue

        ptes = mm.pt.gather(pos, span_end)
        swp = pte_swp_type(ptes)
        # Device-private pages of dev_private_owner are reported as they are and
        # never faulted, even for a write request on a read-only entry (a PMD of
        # them too, at order 9).
        own = np.zeros(len(ptes), dtype=bool)
        device = swp == SWP_DEVICE_PRIVATE
        if rng.dev_private_owner and device.any():
            own[device] = mm.devmem.owners(pte_pfn(ptes[device])) == rng.dev_private_owner
        huge = mm.pt.huge_mask(pos, span_end) if mm.pt.huge else np.zeros(len(ptes), dtype=bool)
        # Another owner's device-private PMD is an error unless it is faulted.
        foreign_pmd = device & ~own & huge
        valid = pte_present(ptes) | own
        cpu_write = valid & ((ptes & PTE_WRITE) != 0)
        want_fault = ((r & HMM_PFN_REQ_FAULT) != 0) & ~own
        need_write = want_fault & ((r & HMM_PFN_REQ_WRITE) != 0) & ~cpu_write
        need = need_write | (want_fault & ~valid)

        first = int(np.argmax(need)) if need.any() else j - i0
        write_fault = False
        if first < j - i0:
            # The walk chunk the first needy page falls in: from that page to the
            # next 2 MiB boundary in a page table, or the whole span without page
            # tables around it (hmm_vma_walk_hole faults from the hole's start).
            populated = mm.pt.populated(pos, span_end)
            if huge[first]:
                # A PMD mapping: from its first page in the walk, with the combined need.
                pmd = pos + (first << PAGE_SHIFT)
                fault_from = max(0, first - ((pmd % PMD_SIZE) >> PAGE_SHIFT))
                fault_to = min(j - i0, first + ((PMD_SIZE - (pmd % PMD_SIZE)) >> PAGE_SHIFT))
                write_fault = bool(need_write[fault_from:fault_to].any())
                if swp[first] != 0:
                    fault_from = first  # a special entry is resolved at the page that needs it
            elif populated[first]:
                fault_from = first
                fault_to = min(j - i0, first + ((PMD_SIZE - ((pos + (first << PAGE_SHIFT)) % PMD_SIZE)) >> PAGE_SHIFT))
                write_fault = bool(need_write[first])
            else:
                before = np.flatnonzero(populated[:first])
                after = np.flatnonzero(populated[first:])
                fault_from = int(before[-1]) + 1 if len(before) else 0
                fault_to = first + int(after[0]) if len(after) else j - i0
                write_fault = bool(need_write[fault_from:fault_to].any())
            first = fault_from
        k = i0 + first
        out_flags[i0:k] = np.where(
            valid[:first], HMM_PFN_VALID | np.where(cpu_write[:first], HMM_PFN_WRITE, 0),
            np.where(foreign_pmd[:first], HMM_PFN_ERROR, 0),
        ).astype(np.uint8)
        out_pfns[i0:k] = np.where(valid[:first], pte_pfn(ptes[:first]), 0).astype(np.uint64)
        out_orders[i0:k] = np.where(valid[:first] & huge[:first], PMD_ORDER, 0)
        if first == j - i0:
            pos = span_end
            continue

        fpos = pos + (first << PAGE_SHIFT)
        if write_fault and not vma.writable:  # (hmm_vma_fault: before anything is faulted)
            raise KernelError(errno.EPERM, f"write fault at {fpos:#x} in a mapping without write permission")
        await _fault_stretch(mm, vma, fpos, pos + (fault_to << PAGE_SHIFT), write_fault)
        pos = fpos

    out_flags |= sticky
    return HmmResult(out_pfns, out_flags, out_orders)


async def _fault_stretch(mm: AddressSpace, vma: Vma, start: int, end: int, write: bool) -> None:
    """hmm_vma_fault(): handle_mm_fault on every page of [start, end) in order, whatever
    it asked for — runs of empty and present pages at once, each non-present entry on
    its own: a swap entry is swapped in, a migration waited for, a device-private page
    brought home by its owner's migrate_to_ram (even the caller's own: only the walk
    knows the owner), a device-exclusive entry restored. The first failure ends it."""
    pos = start
    while pos < end:
        special = np.flatnonzero(pte_swp_type(mm.pt.gather(pos, end)) != 0)
        stop = pos + (int(special[0]) << PAGE_SHIFT) if len(special) else end
        if stop > pos:
            await handle_mm_fault(mm, vma, pos, stop, write)
        if stop < end:
            await resolve_special_entry(mm, stop, mm.pt.gather(stop, stop + PAGE_SIZE))
        pos = stop + PAGE_SIZE
