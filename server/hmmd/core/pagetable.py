"""CPU page tables: one numpy array of 512 PTEs per 2 MiB of address space.

A PTE is a uint64 laid out like a real one: flag bits low, the frame number from
bit 12 up. Non-present entries that still mean something (device-private,
migration, device-exclusive, swapped out) carry a swap type in bits 5..7 and keep
the PFN (a swapped-out page: its swap slot) and the WRITE bit, as the kernel's swap
entries do.

Only populated 2 MiB spans have a table; ``gather``/``scatter`` move a whole range
in and out as one flat array so that callers operate on gigabytes with a few
vector operations.
"""

from __future__ import annotations

import numpy as np

from hmm.abi import PAGE_SHIFT, PMD_SHIFT, PTRS_PER_PTE
from hmm.sparse import SparseTable

PTE_PRESENT = np.uint64(1 << 0)
PTE_WRITE = np.uint64(1 << 1)
PTE_DIRTY = np.uint64(1 << 2)
PTE_SOFT_DIRTY = np.uint64(1 << 3)
PTE_YOUNG = np.uint64(1 << 4)
SWP_SHIFT = 5
SWP_MASK = np.uint64(0x7 << SWP_SHIFT)
PFN_SHIFT = np.uint64(12)
FLAGS_MASK = np.uint64((1 << 12) - 1)

# Swap types of non-present entries.
SWP_NONE = 0
SWP_DEVICE_PRIVATE = 1
SWP_MIGRATION = 2
SWP_DEVICE_EXCLUSIVE = 3
SWP_SWAP = 4  # a page reclaim swapped out: the PFN field is its swap slot


def make_pte(pfns: np.ndarray, flags: int | np.uint64) -> np.ndarray:
    return (pfns.astype(np.uint64) << PFN_SHIFT) | np.uint64(flags)


def pte_pfn(ptes: np.ndarray) -> np.ndarray:
    return (ptes >> PFN_SHIFT).astype(np.int64)


def pte_present(ptes: np.ndarray) -> np.ndarray:
    return (ptes & PTE_PRESENT) != 0


def pte_write(ptes: np.ndarray) -> np.ndarray:
    return (ptes & PTE_WRITE) != 0


def pte_swp_type(ptes: np.ndarray) -> np.ndarray:
    return ((ptes & SWP_MASK) >> np.uint64(SWP_SHIFT)).astype(np.uint8)


def swp_flags(swp_type: int) -> np.uint64:
    return np.uint64(swp_type << SWP_SHIFT)


def pmd_shape(ptes: np.ndarray) -> bool:
    """Whether the 512 PTEs of a 2 MiB span can stand for one PMD leaf: the huge zero
    page (present, read-only), or one naturally aligned order-9 folio — present
    frames, or device-private entries — with the same WRITE bit throughout."""
    if len(ptes) != PTRS_PER_PTE or not ptes[0]:
        return False
    pfns = pte_pfn(ptes)
    swp = pte_swp_type(ptes)
    present = pte_present(ptes)
    if present.all() and (swp == 0).all():
        if (pfns == 0).all():  # the huge zero page
            return not pte_write(ptes).any()
        kind_ok = True
    else:
        kind_ok = bool((~present).all() and (swp == SWP_DEVICE_PRIVATE).all())
    write = pte_write(ptes)
    return (kind_ok and pfns[0] % PTRS_PER_PTE == 0 and bool((np.diff(pfns) == 1).all())
            and bool((write == write[0]).all()))


class PageTables(SparseTable):
    """The page-table tree of one address space. ``huge`` holds the indices of the
    2 MiB spans mapped by a PMD leaf (a THP mapping) rather than a PTE table: a THP
    of system or device-coherent frames, the huge zero page, a hugetlb page, or a
    device-private PMD entry (a device folio of order 9). The PTEs of such a span
    are always stored per page and always have ``pmd_shape``; anything that would
    break that shape splits the span first (drops the mark)."""

    def __init__(self) -> None:
        super().__init__()
        self.huge: set[int] = set()

    def _freed(self, idx: int) -> None:
        self.huge.discard(idx)

    def huge_mask(self, start: int, end: int) -> np.ndarray:
        """Per page of [start, end): True where the page is mapped by a PMD leaf."""
        out = np.zeros((end - start) >> PAGE_SHIFT, dtype=bool)
        if self.huge:
            for idx, lo, hi, off in self.spans(start, end):
                if idx in self.huge:
                    out[off : off + hi - lo] = True
        return out

    def split_huge(self, start: int, end: int) -> None:
        """Split PMD leaves overlapping [start, end) into PTE tables (the PTEs stay)."""
        self.huge.difference_update(self.huge_spans(start, end))

    def huge_spans(self, start: int, end: int) -> list[int]:
        """Indices of the PMD leaves overlapping [start, end), in order (the leaves are
        looked at, not every 2 MiB of the range)."""
        if not self.huge:
            return []
        first, last = start >> PMD_SHIFT, (end - 1) >> PMD_SHIFT
        return sorted(idx for idx in self.huge if first <= idx <= last)

