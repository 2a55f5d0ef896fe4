"""hugetlbfs: files whose page cache holds whole huge pages from the hugetlb pool.

Files under the mount at ``/dev/hugepages`` and the unnamed file behind a shared
``MAP_HUGETLB|MAP_ANONYMOUS`` mapping are ``HugetlbInode``s. Their page cache is
tmpfs's (one entry per 4 KiB file page) but is filled a huge page at a time with
the 512 aligned frames of one pool page, so every mapping maps whole huge pages by
PMD, and a huge page goes back to the pool when the last reference on its frames
(the cache's, a mapping's) is put.

What differs from tmpfs, as in Linux (fs/hugetlbfs): the size changes only in whole
huge pages (ftruncate EINVAL otherwise, hugetlbfs_setattr); write(2) is refused with
EINVAL (no write_iter); a writable mmap extends the file over the mapping; mmap
offsets are huge-page aligned. A shared mapping reserves the pool pages its range of
the file still lacks (hugetlb_reserve_pages, ENOMEM when the pool cannot promise
them); the file keeps those reservations until its pages are faulted in, it is
truncated below them, or it goes; a fault with no page left to take is SIGBUS.
"""

from __future__ import annotations

import errno

import numpy as np

from hmm.abi import PAGE_SHIFT, PMD_SIZE
from hmm.errors import KernelError
from hmmd.core.physmem import HUGETLB_PAGES, PhysMem
from hmmd.core.tmpfs import Inode

HUGETLBFS_MOUNT = "/dev/hugepages"
HPAGE_SIZE = PMD_SIZE


def on_hugetlbfs(path: str) -> bool:
    """Whether ``path`` is the hugetlbfs mount or a file under it."""
    return path == HUGETLBFS_MOUNT or path.startswith(HUGETLBFS_MOUNT + "/")


class HugetlbInode(Inode):
    """A hugetlbfs file. ``anon``: the unnamed file of a shared anonymous mapping
    (counted as shared memory, RssShmem, like other shared anonymous memory)."""

    hugetlb = True

    def __init__(self, path: str | None, *, anon: bool = False) -> None:
        super().__init__(path, None, shmem=anon)  # (hugetlb pages are never swapped)
        self.anon = anon
        # File pages heading huge pages the pool promised to this file (reservations
        # of its shared mappings) that are not in the cache yet.
        self.resv: set[int] = set()

    @property
    def name(self) -> str:
        if self.anon:
            return "/anon_hugepage (deleted)"
        return self.path or f"{HUGETLBFS_MOUNT}/#{self.ino} (deleted)"

    @staticmethod
    def _huge_span(first: int, n: int) -> tuple[int, int]:
        """File pages [first, first+n) widened to whole huge pages."""
        lo = first - first % HUGETLB_PAGES
        hi = -(-(first + n) // HUGETLB_PAGES) * HUGETLB_PAGES
        return lo, hi

    def find_or_create_pages(self, ram: PhysMem, first: int, n: int) -> np.ndarray:
        """The frames of file pages [first, first+n), adding every huge page they touch
        that is not cached yet from the pool. EFAULT (SIGBUS) when the pool is empty;
        huge pages added before that stay in the cache."""
        lo, hi = self._huge_span(first, n)
        self._grow_cache(hi)
        for h in range(lo, hi, HUGETLB_PAGES):
            if self.cache[h] < 0:
                frames = ram.alloc_hugetlb(reserved=h in self.resv)
                if frames is None:
                    raise KernelError(errno.EFAULT, "the hugetlb pool is empty (SIGBUS)")
                self.resv.discard(h)
                self.cache[h : h + HUGETLB_PAGES] = frames
        return self.cache[first : first + n].copy()

    def reserve(self, ram: PhysMem, first: int, n: int) -> bool:
        """A shared mapping of file pages [first, first+n): reserve the huge pages of
        that range neither cached nor reserved yet. False, nothing reserved, when the
        pool cannot promise them all."""
        lo, hi = self._huge_span(first, n)
        self._grow_cache(hi)
        want = [h for h in range(lo, hi, HUGETLB_PAGES) if self.cache[h] < 0 and h not in self.resv]
        if not ram.hugetlb_reserve(len(want)):
            return False
        self.resv.update(want)
        return True

    def _unreserve_from(self, ram: PhysMem, first: int) -> None:
        gone = [h for h in self.resv if h >= first]
        self.resv.difference_update(gone)
        ram.hugetlb_unreserve(len(gone))

    def pwrite(self, ram: PhysMem, offset: int, data: bytes) -> None:
        raise KernelError(errno.EINVAL, "hugetlbfs files cannot be written with write(2); map them")

    def hole(self, first: int, n: int) -> tuple[int, int]:
        """The whole huge pages inside [first, first+n): what a hole punch takes out."""
        lo = -(-first // HUGETLB_PAGES) * HUGETLB_PAGES
        hi = (first + n) // HUGETLB_PAGES * HUGETLB_PAGES
        return lo, max(lo, hi)

    def punch_hole(self, ram: PhysMem, first: int, n: int) -> None:
        """hugetlbfs_punch_hole() of file pages [first, first+n): the whole huge pages
        inside leave the cache (back to the pool once unmapped: callers must have
        zapped every mapping of them first); the parts of huge pages at either end are
        zeroed in place, still mapped. The file's reservations of huge pages not in
        the cache stay, as its size does."""
        lo, hi = self.hole(first, n)
        end = first + n
        self._grow_cache(end)
        for a, b in ((first, min(end, lo)), (max(hi, lo), end)):
            frames = self.cache[a:b]
            ram.data[frames[frames >= 0]] = 0
        dropped = self.cache[lo:hi]
        ram.put(dropped[dropped >= 0])
        self.cache[lo:hi] = -1

    def truncate_cache(self, ram: PhysMem, size: int) -> None:
        """Set the size (whole huge pages, EINVAL otherwise) and drop the cached huge
        pages beyond it. Callers must have zapped every mapping of them first."""
        if size % HPAGE_SIZE:
            raise KernelError(errno.EINVAL, "a hugetlbfs file's size is a multiple of the huge page size")
        super().truncate_cache(ram, size)
        self._unreserve_from(ram, size >> PAGE_SHIFT)

    def release(self, ram: PhysMem) -> None:
        super().release(ram)
        self._unreserve_from(ram, 0)
