"""Virtual memory areas (struct vm_area_struct) and the sorted set of them in one mm."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hmm.abi import PAGE_SHIFT

if TYPE_CHECKING:
    from hmmd.core.tmpfs import Inode

# vm_flags bits we model (values as in include/linux/mm.h).
VM_READ = 0x1
VM_WRITE = 0x2
VM_EXEC = 0x4
VM_SHARED = 0x8
VM_IO = 0x4000
VM_SEQ_READ = 0x8000  # MADV_SEQUENTIAL (a read-ahead hint: nothing reads it here)
VM_RAND_READ = 0x10000  # MADV_RANDOM (likewise)
VM_DONTCOPY = 0x20000  # MADV_DONTFORK: fork leaves the mapping out of the child
VM_DONTEXPAND = 0x40000
VM_PFNMAP = 0x400
VM_MIXEDMAP = 0x10000000
VM_SOFTDIRTY = 0x8000000
VM_HUGEPAGE = 0x20000000
VM_NOHUGEPAGE = 0x40000000
VM_HUGETLB = 0x400000
VM_WIPEONFORK = 0x2000000  # MADV_WIPEONFORK: the child's mapping starts empty
VM_DONTDUMP = 0x4000000  # MADV_DONTDUMP (a core dump hint: nothing reads it here)
VM_PROT_MASK = VM_READ | VM_WRITE | VM_EXEC
VM_SPECIAL = VM_IO | VM_DONTEXPAND | VM_PFNMAP | VM_MIXEDMAP  # driver mappings


class AnonVma:
    """Ties together anonymous pages that fork shared between address spaces.

    A fork gives the child's private VMAs the parent's AnonVma, so a reverse-map
    walk can find every mm that may map a page of the family.
    """

    __slots__ = ("members",)

    def __init__(self) -> None:
        self.members: set[object] = set()


@dataclass(eq=False)
class Vma:
    """One mapping [start, end) with uniform flags and backing.

    ``file`` is the tmpfs inode behind a file or shared-anonymous (shmem) mapping;
    None for private anonymous memory. ``pgoff`` is the file page at ``start``.
    """

    start: int
    end: int
    flags: int
    file: Inode | None = None
    pgoff: int = 0
    anon_vma: AnonVma | None = None
    mm: object = field(default=None, repr=False)
    # HPAGE_RESV_UNMAPPED: the process that reserved this private hugetlb mapping's
    # pages took one back from this (forked) mapping; a fault here is then SIGBUS.
    hugetlb_unmapped: bool = False

    @property
    def npages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT

    @property
    def readable(self) -> bool:
        return bool(self.flags & VM_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & VM_WRITE)

    @property
    def shared(self) -> bool:
        return bool(self.flags & VM_SHARED)

    @property
    def is_anonymous(self) -> bool:
        """vma_is_anonymous(): private memory with no file or driver behind it."""
        return self.file is None and not self.flags & VM_MIXEDMAP

    @property
    def is_cow(self) -> bool:
        """is_cow_mapping(): private and may become writable."""
        return not self.shared

    def file_page(self, addr: int) -> int:
        return self.pgoff + ((addr - self.start) >> PAGE_SHIFT)

    def clone(self, start: int, end: int) -> Vma:
        """A copy limited to [start, end) (within this VMA), file offset adjusted."""
        pgoff = self.pgoff + ((start - self.start) >> PAGE_SHIFT) if self.file is not None else 0
        return Vma(start, end, self.flags, self.file, pgoff, self.anon_vma, self.mm, self.hugetlb_unmapped)

    def perms(self) -> str:
        return (
            ("r" if self.flags & VM_READ else "-")
            + ("w" if self.flags & VM_WRITE else "-")
            + ("x" if self.flags & VM_EXEC else "-")
            + ("s" if self.shared else "p")
        )


class VmaTree:
    """The VMAs of one mm, sorted by start and never overlapping."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._vmas: list[Vma] = []

    def __iter__(self) -> Iterator[Vma]:
        """A snapshot: callers may change the tree while they iterate."""
        return iter(list(self._vmas))

    def __len__(self) -> int:
        return len(self._vmas)

    def find(self, addr: int) -> Vma | None:
        """The VMA containing ``addr``, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and self._vmas[i].end > addr:
            return self._vmas[i]
        return None

    def next_after(self, addr: int) -> Vma | None:
        """The first VMA that ends above ``addr`` (it may contain addr)."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and self._vmas[i].end > addr:
            return self._vmas[i]
        i += 1
        return self._vmas[i] if i < len(self._vmas) else None

    def overlapping(self, start: int, end: int) -> list[Vma]:
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        out = []
        while i < len(self._vmas) and self._vmas[i].start < end:
            if self._vmas[i].end > start:
                out.append(self._vmas[i])
            i += 1
        return out

    def insert(self, vma: Vma) -> None:
        i = bisect.bisect_left(self._starts, vma.start)
        self._starts.insert(i, vma.start)
        self._vmas.insert(i, vma)

    def remove(self, vma: Vma) -> None:
        i = self._vmas.index(vma)
        del self._starts[i]
        del self._vmas[i]

    def split(self, vma: Vma, addr: int) -> tuple[Vma, Vma]:
        """Split ``vma`` at ``addr``; returns (low, high). ``vma`` becomes the low part."""
        assert vma.start < addr < vma.end
        high = vma.clone(addr, vma.end)
        vma.end = addr
        self.insert(high)
        if vma.file is not None:
            vma.file.mappings.add(high)
        return vma, high

    def isolate(self, start: int, end: int) -> list[Vma]:
        """Split VMAs so that [start, end) is covered by whole VMAs; return them."""
        out = []
        for vma in self.overlapping(start, end):
            if vma.start < start:
                _, vma = self.split(vma, start)
            if vma.end > end:
                vma, _ = self.split(vma, end)
            out.append(vma)
        return out

    def try_merge(self, vma: Vma) -> Vma:
        """Merge ``vma`` with compatible neighbours, as vma_merge() would. VM_SOFTDIRTY
        does not stop a merge (VM_IGNORE_MERGE) and stays on the merged VMA if
        either part had it (VM_STICKY in recent kernels): soft-dirty is never lost."""
        i = self._vmas.index(vma)
        if i + 1 < len(self._vmas) and _mergeable(vma, self._vmas[i + 1]):
            nxt = self._vmas[i + 1]
            vma.end = nxt.end
            vma.flags |= nxt.flags & VM_SOFTDIRTY
            self.remove(nxt)
            if nxt.file is not None:
                nxt.file.mappings.discard(nxt)
        if i > 0 and _mergeable(self._vmas[i - 1], vma):
            prev = self._vmas[i - 1]
            prev.end = vma.end
            prev.flags |= vma.flags & VM_SOFTDIRTY
            self.remove(vma)
            if vma.file is not None:
                vma.file.mappings.discard(vma)
            vma = prev
        return vma

    def find_gap(self, length: int, low: int, high: int) -> int | None:
        """Highest address a with [a, a+length) free inside [low, high) (top-down)."""
        top = high
        for vma in reversed(self._vmas):
            if vma.start >= top:
                continue
            if vma.end <= top and top - vma.end >= length and top - length >= low:
                return top - length
            top = min(top, vma.start)
        if top - length >= low:
            return top - length
        return None


def _mergeable(a: Vma, b: Vma) -> bool:
    if a.end != b.start or (a.flags ^ b.flags) & ~VM_SOFTDIRTY or a.file is not b.file or a.mm is not b.mm:
        return False
    if a.hugetlb_unmapped != b.hugetlb_unmapped:
        return False
    if a.anon_vma is not None and b.anon_vma is not None and a.anon_vma is not b.anon_vma:
        return False
    if a.file is not None and a.pgoff + a.npages != b.pgoff:
        return False
    # Do not merge anon VMAs of different fork families (anon_vma None vs set is fine).
    if (a.anon_vma is None) != (b.anon_vma is None):
        return False
    return True
