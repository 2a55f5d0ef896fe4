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
offsets are huge-page aligned; a fault that finds the pool empty is SIGBUS.
"""

from __future__ import annotations

import errno

import numpy as np

from hmm.abi import PMD_SIZE
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
        super().__init__(path, shmem=anon)
        self.anon = anon

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
                frames = ram.alloc_hugetlb()
                if frames is None:
                    raise KernelError(errno.EFAULT, "the hugetlb pool is empty (SIGBUS)")
                self.cache[h : h + HUGETLB_PAGES] = frames
        return self.cache[first : first + n].copy()

    def missing_huge_pages(self, first: int, n: int) -> int:
        """How many huge pages of file pages [first, first+n) are not cached: what a
        mapping of them must be able to take from the pool."""
        lo, hi = self._huge_span(first, n)
        self._grow_cache(hi)
        return int(np.count_nonzero(self.cache[lo:hi:HUGETLB_PAGES] < 0))

    def pwrite(self, ram: PhysMem, offset: int, data: bytes) -> None:
        raise KernelError(errno.EINVAL, "hugetlbfs files cannot be written with write(2); map them")

    def truncate_cache(self, ram: PhysMem, size: int) -> None:
        """Set the size (whole huge pages, EINVAL otherwise) and drop the cached huge
        pages beyond it. Callers must have zapped every mapping of them first."""
        if size % HPAGE_SIZE:
            raise KernelError(errno.EINVAL, "a hugetlbfs file's size is a multiple of the huge page size")
        super().truncate_cache(ram, size)
