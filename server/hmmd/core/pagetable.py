"""CPU page tables: one numpy array of 512 PTEs per 2 MiB of address space.

A PTE is a uint64 laid out like a real one: flag bits low, the frame number from
bit 12 up. Non-present entries that still mean something (device-private,
migration, device-exclusive, lost) carry a swap type in bits 5..7 and keep the PFN
and the WRITE bit, as the kernel's swap entries do.

Only populated 2 MiB spans have a table; ``gather``/``scatter`` move a whole range
in and out as one flat array so that callers operate on gigabytes with a few
vector operations.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from hmm.abi import PAGE_SHIFT, PMD_SHIFT, PTRS_PER_PTE

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
SWP_LOST = 4  # the page lived on a device that is gone: access is SIGBUS


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


class PageTable:
    """The PTEs of one 2 MiB span. ``huge`` marks a PMD leaf (a THP mapping)."""

    __slots__ = ("pte", "huge")

    def __init__(self) -> None:
        self.pte = np.zeros(PTRS_PER_PTE, dtype=np.uint64)
        self.huge = False


class PageTables:
    """The page-table tree of one address space, sparse at 2 MiB granularity."""

    def __init__(self) -> None:
        self.tables: dict[int, PageTable] = {}

    def spans(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """Split [start, end) at 2 MiB boundaries: (table index, lo, hi, offset) where
        lo..hi index PTEs inside the table and offset indexes pages from start."""
        vpn, last = start >> PAGE_SHIFT, end >> PAGE_SHIFT
        off = 0
        while vpn < last:
            idx = vpn >> (PMD_SHIFT - PAGE_SHIFT)
            lo = vpn & (PTRS_PER_PTE - 1)
            hi = min(PTRS_PER_PTE, lo + (last - vpn))
            yield idx, lo, hi, off
            off += hi - lo
            vpn += hi - lo

    def gather(self, start: int, end: int) -> np.ndarray:
        """A copy of the PTEs of [start, end) (page-aligned); 0 where no table exists."""
        out = np.zeros((end - start) >> PAGE_SHIFT, dtype=np.uint64)
        tables = self.tables
        for idx, lo, hi, off in self.spans(start, end):
            t = tables.get(idx)
            if t is not None:
                out[off : off + hi - lo] = t.pte[lo:hi]
        return out

    def scatter(self, start: int, ptes: np.ndarray) -> None:
        """Store ``ptes`` at [start, start + len*4096). Empty tables are freed."""
        end = start + (len(ptes) << PAGE_SHIFT)
        tables = self.tables
        for idx, lo, hi, off in self.spans(start, end):
            chunk = ptes[off : off + hi - lo]
            t = tables.get(idx)
            if t is None:
                if not chunk.any():
                    continue
                t = tables[idx] = PageTable()
            t.pte[lo:hi] = chunk
            if not t.pte.any():
                del tables[idx]

    def populated(self, start: int, end: int) -> np.ndarray:
        """Per page of [start, end): True where a page table exists (PTE may be 0)."""
        out = np.zeros((end - start) >> PAGE_SHIFT, dtype=bool)
        for idx, lo, hi, off in self.spans(start, end):
            if idx in self.tables:
                out[off : off + hi - lo] = True
        return out

    def any_table(self, start: int, end: int) -> bool:
        return any(idx in self.tables for idx, _, _, _ in self.spans(start, end))

    def huge_mask(self, start: int, end: int) -> np.ndarray:
        """Per page of [start, end): True where the page is mapped by a PMD leaf."""
        out = np.zeros((end - start) >> PAGE_SHIFT, dtype=bool)
        for idx, lo, hi, off in self.spans(start, end):
            t = self.tables.get(idx)
            if t is not None and t.huge:
                out[off : off + hi - lo] = True
        return out

    def split_huge(self, start: int, end: int) -> None:
        """Split PMD leaves overlapping [start, end) into PTE tables (the PTEs stay)."""
        for idx, _, _, _ in self.spans(start, end):
            t = self.tables.get(idx)
            if t is not None:
                t.huge = False

    def clear(self) -> None:
        self.tables.clear()
