"""A sparse per-page table of uint64 entries, one numpy array per 2 MiB.

The mechanics behind the daemon's CPU page tables and a device's page table
(dmirror's): only populated 2 MiB spans have an array, and ranges move in and
out as one flat array so callers work on gigabytes with a few vector operations.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from hmm.abi import PAGE_SHIFT, PMD_SHIFT, PTRS_PER_PTE

_IDX_SHIFT = PMD_SHIFT - PAGE_SHIFT


class SparseTable:
    def __init__(self) -> None:
        self.tables: dict[int, np.ndarray] = {}

    @staticmethod
    def spans(start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """Split [start, end) at 2 MiB boundaries: (table index, lo, hi, offset) where
        lo..hi index entries inside the table and offset indexes pages from start."""
        vpn, last = start >> PAGE_SHIFT, end >> PAGE_SHIFT
        off = 0
        while vpn < last:
            idx = vpn >> _IDX_SHIFT
            lo = vpn & (PTRS_PER_PTE - 1)
            hi = min(PTRS_PER_PTE, lo + (last - vpn))
            yield idx, lo, hi, off
            off += hi - lo
            vpn += hi - lo

    def gather(self, start: int, end: int) -> np.ndarray:
        """A copy of the entries of [start, end) (page-aligned); 0 where none exist."""
        out = np.zeros((end - start) >> PAGE_SHIFT, dtype=np.uint64)
        tables = self.tables
        for idx, lo, hi, off in self.spans(start, end):
            t = tables.get(idx)
            if t is not None:
                out[off : off + hi - lo] = t[lo:hi]
        return out

    def scatter(self, start: int, entries: np.ndarray) -> None:
        """Store ``entries`` from ``start`` on; arrays that become all-zero are freed."""
        end = start + (len(entries) << PAGE_SHIFT)
        tables = self.tables
        for idx, lo, hi, off in self.spans(start, end):
            chunk = entries[off : off + hi - lo]
            t = tables.get(idx)
            if t is None:
                if not chunk.any():
                    continue
                t = tables[idx] = np.zeros(PTRS_PER_PTE, dtype=np.uint64)
            t[lo:hi] = chunk
            if not t.any():
                del tables[idx]
                self._freed(idx)

    def _freed(self, idx: int) -> None:
        """Hook: the array of 2 MiB span ``idx`` was freed."""

    def erase(self, start: int, end: int) -> np.ndarray:
        """Clear [start, end) (clipped to populated spans); returns the old entries
        of the populated spans only, concatenated."""
        old = []
        for idx in self._populated_indices(start, end):
            s, e = max(start, idx << PMD_SHIFT), min(end, (idx + 1) << PMD_SHIFT)
            t = self.tables[idx]
            lo, hi = (s >> PAGE_SHIFT) & (PTRS_PER_PTE - 1), ((e - 1) >> PAGE_SHIFT & (PTRS_PER_PTE - 1)) + 1
            old.append(t[lo:hi].copy())
            t[lo:hi] = 0
            if not t.any():
                del self.tables[idx]
                self._freed(idx)
        return np.concatenate(old) if old else np.zeros(0, dtype=np.uint64)

    def populated(self, start: int, end: int) -> np.ndarray:
        """Per page of [start, end): True where an array exists (the entry may be 0)."""
        out = np.zeros((end - start) >> PAGE_SHIFT, dtype=bool)
        for idx, lo, hi, off in self.spans(start, end):
            if idx in self.tables:
                out[off : off + hi - lo] = True
        return out

    def populated_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        """The pieces [s, e) of [start, end) that have arrays (runs of adjacent 2 MiB
        spans, clipped): every entry outside them is 0, so an operation on the
        entries of a vast, sparsely used range need visit only these."""
        out: list[tuple[int, int]] = []
        for idx in self._populated_indices(start, end):
            s, e = max(start, idx << PMD_SHIFT), min(end, (idx + 1) << PMD_SHIFT)
            if out and out[-1][1] == s:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
        return out

    def _populated_indices(self, start: int, end: int) -> list[int]:
        """Indices of the arrays overlapping [start, end), in order; walks whichever
        is smaller, the range or the populated set."""
        first, last = start >> PMD_SHIFT, (end - 1) >> PMD_SHIFT
        if last - first < len(self.tables):
            return [i for i in range(first, last + 1) if i in self.tables]
        return sorted(i for i in self.tables if first <= i <= last)

    def any_table(self, start: int, end: int) -> bool:
        return bool(self._populated_indices(start, end))

    def clear(self) -> None:
        for idx in list(self.tables):
            del self.tables[idx]
            self._freed(idx)
