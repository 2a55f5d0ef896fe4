"""An in-daemon tmpfs: files whose contents live in a page cache of system frames.

Shared anonymous memory is a file here too (an unnamed shmem inode), as in Linux.
Files of the hugetlbfs mount are inodes of the same shape (hmmd.core.hugetlbfs).
An inode keeps the set of VMAs mapping it (the kernel's i_mmap) so that truncate
can find and zap every mapping of the pages it drops.
"""

from __future__ import annotations

import errno
import itertools
from typing import TYPE_CHECKING

import numpy as np

from hmm.abi import PAGE_SHIFT, PAGE_SIZE
from hmm.errors import KernelError
from hmmd.core.physmem import PhysMem

if TYPE_CHECKING:
    from hmmd.core.vma import Vma

MAX_FILE_SIZE = 1 << 40

_inode_numbers = itertools.count(1)


class Inode:
    """A tmpfs file: size in bytes and a page cache (file page -> frame, -1 if absent)."""

    hugetlb = False  # a hugetlbfs file: its page cache holds whole huge pages

    def __init__(self, path: str | None, *, shmem: bool = False) -> None:
        self.ino = next(_inode_numbers)
        self.path = path
        self.shmem = shmem  # shared anonymous memory: counts as RssShmem
        self.size = 0
        self.cache = np.full(0, -1, dtype=np.int64)
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
        """The frames of file pages [first, first+n), allocating zeroed ones as needed."""
        self._grow_cache(first + n)
        view = self.cache[first : first + n]
        missing = np.flatnonzero(view < 0)
        if len(missing):
            view[missing] = ram.alloc(len(missing))
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
        tail = size & (PAGE_SIZE - 1)
        if tail and (size >> PAGE_SHIFT) < len(self.cache):
            pfn = self.cache[size >> PAGE_SHIFT]
            if pfn >= 0:
                ram.data[pfn, tail:] = 0
        self.size = size

    def release(self, ram: PhysMem) -> None:
        """Free the page cache (last link and last open gone, nothing maps it)."""
        present = self.cache[self.cache >= 0]
        ram.put(present)
        self.cache = np.full(0, -1, dtype=np.int64)


class Tmpfs:
    """The namespace of named files."""

    def __init__(self) -> None:
        self.files: dict[str, Inode] = {}

    def lookup(self, path: str) -> Inode | None:
        return self.files.get(path)

    def create(self, path: str, kind: type[Inode] = Inode) -> Inode:
        """A new file at ``path`` (``kind``: the filesystem's inode class)."""
        inode = kind(path)
        self.files[path] = inode
        return inode
