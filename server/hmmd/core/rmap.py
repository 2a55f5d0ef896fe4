"""Reverse mapping: from pages to the CPU entries that map them.

hmmd keeps no per-page rmap; the few operations that need one — eviction, and
migrating a page fork left mapped in several address spaces — scan the page
tables of the address spaces that can map it (every process for device memory,
the fork family of an anonymous page), one vector test per 2 MiB table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hmm.abi import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:  # (the mm uses runs() below)
    from hmmd.core.mm import AddressSpace


@dataclass(eq=False)
class Mapping:
    """Entries of one address space: their addresses, frames and PTEs before a change."""

    mm: AddressSpace
    addrs: np.ndarray
    pfns: np.ndarray
    orig: np.ndarray


def find(mm: AddressSpace, match: Callable[[np.ndarray], np.ndarray], start: int = 0,
         end: int = 1 << 64) -> tuple[np.ndarray, np.ndarray]:
    """(addresses, PTEs) of every entry of ``mm`` in [start, end) for which
    ``match(ptes)`` is True."""
    addrs, ptes = [], []
    for lo, hi in mm.pt.populated_runs(start, end):
        run = mm.pt.gather(lo, hi)
        hit = np.flatnonzero(match(run))
        if len(hit):
            addrs.append(lo + (hit << PAGE_SHIFT))
            ptes.append(run[hit])
    if not addrs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    return np.concatenate(addrs).astype(np.int64), np.concatenate(ptes)


def runs(addrs: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive pages in sorted ``addrs``."""
    if not len(addrs):
        return []
    breaks = np.flatnonzero(np.diff(addrs) != PAGE_SIZE) + 1
    return [(int(r[0]), int(r[-1]) + PAGE_SIZE) for r in np.split(addrs, breaks)]


def store(mm: AddressSpace, addrs: np.ndarray, entries: np.ndarray) -> None:
    """Write ``entries`` at the (sorted) ``addrs`` of ``mm``, a run at a time."""
    for start, end in runs(addrs):
        sel = (addrs >= start) & (addrs < end)
        ptes = mm.pt.gather(start, end)
        ptes[(addrs[sel] - start) >> PAGE_SHIFT] = entries[sel]
        mm.pt.scatter(start, ptes)
