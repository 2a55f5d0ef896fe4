"""Device memory (ZONE_DEVICE): the page maps devices declare and their pages.

A device declares its memory at hello: DEVICE_PRIVATE (the CPU cannot touch it)
or DEVICE_COHERENT, and a size. It gets a range of PFNs of its own:

* private pages get device PFNs far above system RAM; their contents live in the
  device, and CPU page tables hold non-present device-private entries for them;
* coherent pages are frames of the device-coherent window of ``PhysMem`` (just
  above system RAM): the CPU maps them with ordinary present entries and reads and
  writes them in place, the device reaches them through DMA to its own PFNs, and
  their counts are RAM's (``PhysMem.on_device_free`` reports the freed ones).

The core tracks each page's refcount and mapcount, as struct page does for
ZONE_DEVICE memory:

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
from hmmd.core.physmem import PhysMem, add_counts, distinct

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

    def __init__(self, device_id: int, owner: int, kind: MemoryKind, npages: int,
                 ram: PhysMem | None = None, base: int = 0) -> None:
        """A private map, or with ``ram`` and ``base`` a coherent one over frames
        [base, base + npages) of RAM's device-coherent window."""
        if not 0 < npages <= MAX_DEVICE_PAGES:
            raise KernelError(errno.EINVAL, f"device memory must be 1..{MAX_DEVICE_PAGES} pages")
        self.device_id = device_id
        self.owner = owner
        self.kind = kind
        self.npages = npages
        if ram is not None:
            self.base = base
            self.refcount = ram.refcount[base : base + npages]  # views: RAM keeps the counts
            self.mapcount = ram.mapcount[base : base + npages]
        else:
            self.base = DEVICE_PFN_BASE + (device_id << DEVICE_PFN_SPAN_SHIFT)
            self.refcount = np.zeros(npages, dtype=np.int32)
            self.mapcount = np.zeros(npages, dtype=np.int32)
        # The page lock: a migration's destination is locked from migrate_vma_pages
        # to finalize; CPU faults on it wait, and other migrations skip it.
        self.locked = np.zeros(npages, dtype=bool)
        # A CPU fault's migrate_to_ram holds the faulting page's lock (do_swap_page):
        # an eviction or a device's own migration skips it; a fault's migration not.
        self.faulting = np.zeros(npages, dtype=bool)
        self.dead = False  # the device is gone: its pages' contents are lost
        self.lost = 0  # dead and private: its pages still referenced (the map goes at 0)

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
        if len(distinct(idx)) != len(idx):
            raise KernelError(errno.EINVAL, "a destination page is used twice")
        if (self.refcount[idx] != 0).any():
            raise KernelError(errno.EBUSY, "a destination page is still in use")
        self.refcount[idx] = 1

    def release(self) -> None:
        """The map is gone and none of its pages is referenced: drop its counts (a
        private map's are the size of the device's memory; a coherent map's are views
        of RAM's window, which another device may get next)."""
        self.refcount = self.mapcount = np.zeros(0, dtype=np.int32)
        self.locked = self.faulting = np.zeros(0, dtype=bool)

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
        return distinct(idx[self.refcount[idx] == 0]) + self.base  # a page put twice in one batch is freed once

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

    def __init__(self, ram: PhysMem) -> None:
        self.ram = ram
        self.maps: dict[int, DevicePageMap] = {}
        self.coherent: list[DevicePageMap] = []  # by base, in RAM's device-coherent window
        self.on_free: Callable[[DevicePageMap, np.ndarray], None] = lambda pgmap, pfns: None
        self.on_fault: Callable[[object, int, int], Awaitable[None]] | None = None

    def add(self, pgmap: DevicePageMap) -> None:
        self.maps[pgmap.device_id] = pgmap

    def add_coherent(self, device_id: int, owner: int, npages: int) -> DevicePageMap:
        """memremap_pages() of coherent memory: the first gap of the window that fits
        (a gap is only reused once every page of the map before was freed). ENOMEM
        when the window is full."""
        live = sorted(self.coherent, key=lambda m: m.base)
        base = self.ram.nframes
        for m in live:
            if m.base - base >= npages:
                break
            base = m.end
        if base + npages > self.ram.span:
            raise KernelError(errno.ENOMEM, f"no room for {npages} coherent pages in the device-coherent window "
                              f"({self.ram.span - self.ram.nframes} pages; hmmd --coherent-memory)")
        pgmap = DevicePageMap(device_id, owner, MemoryKind.DEVICE_COHERENT, npages, self.ram, base)
        self.coherent.append(pgmap)
        self.maps[device_id] = pgmap
        return pgmap

    def remove(self, pgmap: DevicePageMap) -> None:
        """The device is gone: its map goes once none of its pages is referenced any
        more (checked again as they are freed). Coherent frames return to the window
        then; private PFNs are never reused (each device id has its own block)."""
        pgmap.dead = True
        if pgmap.kind == MemoryKind.DEVICE_COHERENT:
            if not pgmap.used_pages and pgmap in self.coherent:
                self.coherent.remove(pgmap)
                self._forget(pgmap)
            return
        pgmap.lost = pgmap.used_pages
        if not pgmap.lost:
            self._forget(pgmap)

    def _forget(self, pgmap: DevicePageMap) -> None:
        del self.maps[pgmap.device_id]
        pgmap.release()

    def lookup(self, pfn: int) -> DevicePageMap | None:
        if pfn < DEVICE_PFN_BASE:
            for m in self.coherent:
                if m.base <= pfn < m.end:
                    return m
            return None
        return self.maps.get((pfn - DEVICE_PFN_BASE) >> DEVICE_PFN_SPAN_SHIFT)

    def coherent_freed(self, pfns: np.ndarray) -> None:
        """PhysMem's on_device_free: coherent frames lost their last reference."""
        for m in list(self.coherent):
            mine = pfns[m.contains(pfns)]
            if len(mine):
                if m.dead:
                    self.remove(m)
                else:
                    self.on_free(m, mine)

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
        """Which of ``pfns`` are device-private pages (coherent ones are RAM's frames)."""
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
            if pgmap.dead:  # no one to tell; the map goes with its last page
                pgmap.lost -= len(freed)
                if not pgmap.lost:
                    self._forget(pgmap)
            elif len(freed):
                self.on_free(pgmap, freed)
