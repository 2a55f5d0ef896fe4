"""Device memory (ZONE_DEVICE): the page maps devices declare and their pages.

A device declares its memory at hello: DEVICE_PRIVATE (the CPU cannot touch it)
or DEVICE_COHERENT, and a size. It gets a range of device PFNs of its own, far
above system RAM. The contents live in the device; the core tracks each page's
refcount and mapcount, as struct page does for ZONE_DEVICE memory:

* refcount 0: free — the driver may hand it out as a migration destination,
  which takes the first reference (a device page "starts with refcount 1");
* every CPU entry mapping it holds a reference and a map count;
* when the last reference goes, the owner hears ``page_free``.

The driver owns its allocator; the core only refuses a destination that is not
the device's own free page.
"""

from __future__ import annotations

import enum
import errno
import logging
from collections.abc import Awaitable, Callable

import numpy as np

from hmm.errors import KernelError
from hmmd.core.physmem import add_counts

log = logging.getLogger(__name__)

DEVICE_PFN_BASE = 1 << 40  # device PFNs start here; system RAM is far below
DEVICE_PFN_SPAN_SHIFT = 32  # each device's PFNs live in its own 2^32 block
MAX_DEVICE_PAGES = 1 << DEVICE_PFN_SPAN_SHIFT


class MemoryKind(enum.IntEnum):
    NONE = 0
    DEVICE_PRIVATE = 1
    DEVICE_COHERENT = 2


class DevicePageMap:
    """struct dev_pagemap of one device: its PFN range and page counts."""

    def __init__(self, device_id: int, owner: int, kind: MemoryKind, npages: int) -> None:
        if not 0 < npages <= MAX_DEVICE_PAGES:
            raise KernelError(errno.EINVAL, f"device memory must be 1..{MAX_DEVICE_PAGES} pages")
        self.device_id = device_id
        self.owner = owner
        self.kind = kind
        self.base = DEVICE_PFN_BASE + (device_id << DEVICE_PFN_SPAN_SHIFT)
        self.npages = npages
        self.refcount = np.zeros(npages, dtype=np.int32)
        self.mapcount = np.zeros(npages, dtype=np.int32)
        # The page lock: a migration's destination is locked from migrate_vma_pages
        # to finalize; CPU faults on it wait, and other migrations skip it.
        self.locked = np.zeros(npages, dtype=bool)
        self.dead = False  # the device is gone: its pages' contents are lost

    @property
    def end(self) -> int:
        return self.base + self.npages

    def contains(self, pfns: np.ndarray) -> np.ndarray:
        return (pfns >= self.base) & (pfns < self.end)

    def index(self, pfns: np.ndarray) -> np.ndarray:
        return (pfns - self.base).astype(np.int64)

    @property
    def used_pages(self) -> int:
        return int(np.count_nonzero(self.refcount))

    def take_free(self, pfns: np.ndarray) -> None:
        """The driver uses these free pages as migration destinations (refcount 0 -> 1).
        EINVAL unless every PFN is a distinct free page of this map."""
        if not self.contains(pfns).all():
            raise KernelError(errno.EINVAL, "destination is not a page of this device's memory")
        idx = self.index(pfns)
        if len(np.unique(idx)) != len(idx):
            raise KernelError(errno.EINVAL, "a destination page is used twice")
        if (self.refcount[idx] != 0).any():
            raise KernelError(errno.EBUSY, "a destination page is still in use")
        self.refcount[idx] = 1

    def is_locked(self, pfn: int) -> bool:
        return bool(self.locked[pfn - self.base])

    def get(self, pfns: np.ndarray) -> None:
        add_counts(self.refcount, self.index(pfns), 1)

    def put(self, pfns: np.ndarray) -> np.ndarray:
        """Drop one reference each; returns the PFNs that became free (for page_free)."""
        if not len(pfns):
            return pfns
        idx = self.index(pfns)
        add_counts(self.refcount, idx, -1)
        if (self.refcount[idx] < 0).any():
            raise AssertionError("device page refcount underflow")
        freed = np.unique(idx[self.refcount[idx] == 0])
        return freed + self.base

    def map(self, pfns: np.ndarray) -> None:
        add_counts(self.mapcount, self.index(pfns), 1)

    def unmap(self, pfns: np.ndarray) -> None:
        add_counts(self.mapcount, self.index(pfns), -1)


class DeviceMemory:
    """Every device's page map, found by PFN, and the two ways the core calls into
    a device about its memory (set by the kernel):

    * ``on_free(pgmap, pfns)``: pages whose last reference went (page_free);
    * ``on_fault(mm, addr, pfn)``: a CPU access to a device-private page
      (migrate_to_ram); returns when the page was moved, or raises EFAULT.
    """

    def __init__(self) -> None:
        self.maps: dict[int, DevicePageMap] = {}
        self.on_free: Callable[[DevicePageMap, np.ndarray], None] = lambda pgmap, pfns: None
        self.on_fault: Callable[[object, int, int], Awaitable[None]] | None = None

    def add(self, pgmap: DevicePageMap) -> None:
        self.maps[pgmap.device_id] = pgmap

    def lookup(self, pfn: int) -> DevicePageMap | None:
        if pfn < DEVICE_PFN_BASE:
            return None
        return self.maps.get((pfn - DEVICE_PFN_BASE) >> DEVICE_PFN_SPAN_SHIFT)

    def owners(self, pfns: np.ndarray) -> np.ndarray:
        """The owner tag of each device PFN (0 for anything else)."""
        out = np.zeros(len(pfns), dtype=np.int64)
        dev = pfns >= DEVICE_PFN_BASE
        if dev.any():
            ids = (pfns[dev] - DEVICE_PFN_BASE) >> DEVICE_PFN_SPAN_SHIFT
            lut = {i: (m.owner if (m := self.maps.get(int(i))) else 0) for i in np.unique(ids)}
            out[dev] = np.vectorize(lut.__getitem__, otypes=[np.int64])(ids)
        return out

    @staticmethod
    def is_device(pfns: np.ndarray) -> np.ndarray:
        return pfns >= DEVICE_PFN_BASE

    def group(self, pfns: np.ndarray) -> list[tuple[DevicePageMap, np.ndarray]]:
        """Device PFNs by page map."""
        if not len(pfns):
            return []
        ids = (pfns - DEVICE_PFN_BASE) >> DEVICE_PFN_SPAN_SHIFT
        first = int(ids[0])
        if (ids == first).all():  # the usual case: one device
            return [(self.maps[first], pfns)]
        return [(self.maps[int(i)], pfns[ids == i]) for i in np.unique(ids)]

    def map(self, pfns: np.ndarray) -> None:
        for pgmap, group in self.group(pfns):
            pgmap.map(group)

    def unmap(self, pfns: np.ndarray) -> None:
        for pgmap, group in self.group(pfns):
            pgmap.unmap(group)

    def get(self, pfns: np.ndarray) -> None:
        for pgmap, group in self.group(pfns):
            pgmap.get(group)

    def put(self, pfns: np.ndarray) -> None:
        """Drop references; the owner hears about pages that became free."""
        for pgmap, group in self.group(pfns):
            freed = pgmap.put(group)
            if len(freed):
                self.on_free(pgmap, freed)
