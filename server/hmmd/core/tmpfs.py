"""An in-daemon tmpfs: files whose contents live in a page cache of system frames.

Shared anonymous memory is a file here too (an unnamed shmem inode), as in Linux.
Files of the hugetlbfs mount are inodes of the same shape (hmmd.core.hugetlbfs).
An inode keeps the set of VMAs mapping it (the kernel's i_mmap) so that truncate
can find and zap every mapping of the pages it drops, and reclaim every mapping
of the pages it swaps out.

tmpfs pages are swap-backed, as shmem's: reclaim moves a cached page that nothing
maps any more (nor pins, nor locks) to a swap slot, and the page cache remembers
the slot (the kernel keeps a swap entry in the file's xarray). The next fault,
write or truncate of that page finds it there: a fault or a write swaps it back in,
a read copies it out of the slot, a truncate frees the slot.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from hmm.abi import PAGE_SHIFT, PAGE_SIZE
from hmm.errors import KernelError
from hmmd.core.physmem import PG_LOCKED, PhysMem
from hmmd.core.swap import SwapSpace

if TYPE_CHECKING:
    from hmmd.core.vma import Vma

MAX_FILE_SIZE = 1 << 40

_inode_numbers = itertools.count(1)


class Inode:
    """A tmpfs file: size in bytes and a page cache (file page -> frame, -1 if absent;
    ``swapped``: file page -> swap slot for the pages reclaim took)."""

    hugetlb = False  # a hugetlbfs file: its page cache holds whole huge pages

    def __init__(self, path: str | None, swap: SwapSpace | None, *, shmem: bool = False) -> None:
        self.ino = next(_inode_numbers)
        self.path = path
        self.shmem = shmem  # shared anonymous memory: counts as RssShmem
        self.size = 0
        self.cache = np.full(0, -1, dtype=np.int64)
        self.swap = swap  # where reclaim puts this file's pages (None: never, as hugetlbfs)
        self.swapped: dict[int, int] = {}
        self.mappings: set[Vma] = set()
        self.nlink = 1 if path else 0
        self.opens = 0

    @property
    def name(self) -> str:
        if self.shmem:
            return "/dev/zero (deleted)"
        return self.path or f"/tmp/#{self.ino} (deleted)"

    @property
    def npages(self) -> int:
        return (self.size + PAGE_SIZE - 1) >> PAGE_SHIFT

    def _grow_cache(self, npages: int) -> None:
        if npages > len(self.cache):
            grown = np.full(max(npages, 2 * len(self.cache)), -1, dtype=np.int64)
            grown[: len(self.cache)] = self.cache
            self.cache = grown

    def lookup_pages(self, first: int, n: int) -> np.ndarray:
        """The frames of file pages [first, first+n) in the page cache, -1 where absent."""
        self._grow_cache(first + n)
        return self.cache[first : first + n].copy()

    def find_or_create_pages(self, ram: PhysMem, first: int, n: int) -> np.ndarray:
        """The frames of file pages [first, first+n), allocating frames as needed:
        zeroed, or with the contents of a page swapped out (its slot is freed).
        ENOMEM (OutOfMemoryError) changes nothing."""
        self._grow_cache(first + n)
        view = self.cache[first : first + n]
        missing = np.flatnonzero(view < 0)
        if len(missing):
            frames = ram.alloc(len(missing))  # (one allocation: ENOMEM takes nothing)
            back = np.array([first + int(i) in self.swapped for i in missing], dtype=bool)
            if back.any():
                assert self.swap is not None
                slots = np.array([self.swapped.pop(first + int(i)) for i in missing[back]], dtype=np.int64)
                for frame, slot in zip(frames[back].tolist(), slots.tolist(), strict=True):
                    ram.data[frame] = self.swap.load(slot)
                self.swap.free(slots)
            view[missing] = frames
        return view.copy()

    def pread(self, ram: PhysMem, offset: int, length: int) -> bytes:
        if offset >= self.size:
            return b""
        length = min(length, self.size - offset)
        first, last = offset >> PAGE_SHIFT, (offset + length - 1) >> PAGE_SHIFT
        n = last - first + 1
        self._grow_cache(first + n)
        pfns = self.cache[first : first + n]
        buf = np.zeros((n, PAGE_SIZE), dtype=np.uint8)
        present = pfns >= 0
        buf[present] = ram.data[pfns[present]]
        if self.swapped:  # read out of the slot, as a read of a swapped-out page leaves it there
            assert self.swap is not None
            for i in np.flatnonzero(~present).tolist():
                slot = self.swapped.get(first + i)
                if slot is not None:
                    buf[i] = self.swap.load(slot)
        skip = offset - (first << PAGE_SHIFT)
        return buf.reshape(-1)[skip : skip + length].tobytes()

    def pwrite(self, ram: PhysMem, offset: int, data: bytes) -> None:
        if not data:
            return
        end = offset + len(data)
        if end > MAX_FILE_SIZE:
            raise KernelError(errno.EFBIG, "file too large")
        first, last = offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
        pfns = self.find_or_create_pages(ram, first, last - first + 1)
        flat = ram.data[pfns].reshape(-1)
        skip = offset - (first << PAGE_SHIFT)
        flat[skip : skip + len(data)] = np.frombuffer(data, dtype=np.uint8)
        ram.data[pfns] = flat.reshape(-1, PAGE_SIZE)
        self.size = max(self.size, end)

    def truncate_cache(self, ram: PhysMem, size: int) -> None:
        """Set the size; drop cached pages beyond it and zero the tail of the last one.

        Callers must have zapped every mapping of the dropped pages first.
        """
        keep = (size + PAGE_SIZE - 1) >> PAGE_SHIFT
        if keep < len(self.cache):
            dropped = self.cache[keep:]
            dropped = dropped[dropped >= 0]
            self.cache[keep:] = -1
            ram.put(dropped)
        self._free_swapped([page for page in self.swapped if page >= keep])
        tail = size & (PAGE_SIZE - 1)
        if tail and (size >> PAGE_SHIFT) < len(self.cache):
            pfn = self.cache[size >> PAGE_SHIFT]
            if pfn >= 0:
                ram.data[pfn, tail:] = 0
            elif (size >> PAGE_SHIFT) in self.swapped:
                assert self.swap is not None
                self.swap.load(self.swapped[size >> PAGE_SHIFT])[tail:] = 0
        self.size = size

    def hole(self, first: int, n: int) -> tuple[int, int]:
        """The file pages a hole punched over [first, first+n) takes out of the cache
        (every mapping of them is zapped first): here all of them."""
        return first, first + n

    def punch_hole(self, ram: PhysMem, first: int, n: int) -> None:
        """shmem_truncate_range() of file pages [first, first+n): their cached frames
        and swap slots go, the size stays (reads there see zeroes). Callers must have
        zapped every mapping of those pages first."""
        self._grow_cache(first + n)
        view = self.cache[first : first + n]
        dropped = view[view >= 0]
        view[:] = -1
        ram.put(dropped)
        self._free_swapped([page for page in self.swapped if first <= page < first + n])

    def release(self, ram: PhysMem) -> None:
        """Free the page cache (last link and last open gone, nothing maps it)."""
        present = self.cache[self.cache >= 0]
        ram.put(present)
        self.cache = np.full(0, -1, dtype=np.int64)
        self._free_swapped(list(self.swapped))

    def _free_swapped(self, pages: list[int]) -> None:
        if pages:
            assert self.swap is not None
            self.swap.free(np.array([self.swapped.pop(page) for page in pages], dtype=np.int64))

    # ---- reclaim ---------------------------------------------------------------------------
    def unmapped_pages(self, ram: PhysMem) -> np.ndarray:
        """The cached file pages reclaim may swap out as they are (see swap_out)."""
        return self._held_by_cache_alone(ram, np.flatnonzero(self.cache >= 0))

    def _held_by_cache_alone(self, ram: PhysMem, pages: np.ndarray) -> np.ndarray:
        """Those of ``pages`` cached and held by the cache alone: not mapped, pinned or
        locked. None of a file that is never swapped."""
        if self.swap is None:
            return pages[:0]
        pages = pages[self.cache[pages] >= 0]
        frames = self.cache[pages]
        return pages[(ram.refcount[frames] == 1) & ((ram.flags[frames] & PG_LOCKED) == 0)]

    def swap_out(self, ram: PhysMem, pages: np.ndarray) -> int:
        """shmem_writeout(): each of the file ``pages`` held by the cache alone goes to
        a new swap slot while swap has room, and leaves the cache. Returns the frames
        freed."""
        pages = self._held_by_cache_alone(ram, pages)
        if not len(pages):
            return 0
        assert self.swap is not None
        frames = self.cache[pages]
        slots = self.swap.store([ram.data[f] for f in frames.tolist()])
        pages, frames = pages[: len(slots)], frames[: len(slots)]
        self.swapped.update(zip(pages.tolist(), slots.tolist(), strict=True))
        self.cache[pages] = -1
        ram.put(frames)
        return len(frames)


class Tmpfs:
    """The namespace of named files."""

    def __init__(self) -> None:
        self.files: dict[str, Inode] = {}

    def lookup(self, path: str) -> Inode | None:
        return self.files.get(path)

    def create(self, path: str, make: Callable[[str], Inode]) -> Inode:
        """A new file at ``path`` (``make``: the filesystem's new inode)."""
        inode = make(path)
        self.files[path] = inode
        return inode
