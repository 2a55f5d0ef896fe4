"""A small reference model of what hmmd and hmm-dmirror must do, for the
model-based tests (HMM-SEMANTICS.md, HMM-SELFTESTS.md §1).

The model keeps, per emulated process, its VMAs (start, end, prot, private or a
shared-memory object) and the contents of every page, with the kernel's sharing
rules: a private page is a ``Frame`` that fork shares and the first write copies
(COW); a MAP_SHARED page lives in its ``Shm`` object whatever maps it. Every
operation is given the outcome the system under test produced — a value, or the
``KernelError`` it raised — and the model asserts that outcome is allowed, then
applies its effect.

Bytes and errnos are exact. Some outcomes depend on state the kernel does not
specify precisely (which invalidations reach a device over exactly which range,
and so which device page-table entries survive), so the model also keeps
*knowledge* with explicit uncertainty, used only to judge outcomes that depend on
it:

* where a private frame lives (system RAM or device d), as a set of possibilities;
* per device and process, which dmirror page-table entries may exist (none, read,
  write, atomic), again as a set of possibilities;
* whether a PTE may be device-exclusive, and whether it is writable.

An outcome the knowledge cannot decide is accepted, and narrows the knowledge
(for instance, a failed device WRITE may or may not have written its first
pages: each such page may hold either content until the next read tells).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from hmm.abi import PAGE_SIZE, PMD_SHIFT, PROT_READ, PROT_WRITE
from hmm.errors import KernelError

P = PAGE_SIZE
ZERO = bytes(P)

# dmirror page-table entry possibilities
NONE, R, W, A = "none", "read", "write", "atomic"
NOTHING = frozenset({NONE})
SYS = -1  # a frame's place: system RAM (else a device index)

# SNAPSHOT bytes (HMM-SELFTESTS.md 1.6)
SNAP_ERROR, SNAP_NONE, SNAP_READ, SNAP_WRITE, SNAP_ZERO, SNAP_LOCAL = 0xFF, 0x00, 0x01, 0x02, 0x10, 0x20


class MismatchError(AssertionError):
    """The system under test did something the model does not allow."""


def pattern(seed: int, addr: int, npages: int) -> bytes:
    """``npages`` pages whose every 8 bytes name the seed and the page address."""
    out = np.empty((npages, P // 8), dtype="<u8")
    for i in range(npages):
        out[i] = ((seed & 0xFFFF) << 48) | ((addr + i * P) >> 12 << 8) | (np.arange(P // 8) & 0xFF)
    return out.tobytes()


def reply(got: object) -> tuple[int, bytes]:
    """A dmirror command's (cpages, data)."""
    assert isinstance(got, tuple)
    return int(got[0]), bytes(got[1])


def describe(data: bytes) -> str:
    """What a page (or a piece of one) holds, for messages."""
    if not any(data):
        return f"{len(data)} zero bytes"
    if len(data) < 8:
        return data.hex()
    w = int(np.frombuffer(data[:8], dtype="<u8")[0])
    return f"{len(data)} bytes of seed {w >> 48} page {((w >> 8) & ((1 << 40) - 1)) << 12:#x}"


@dataclass(eq=False)
class Frame:
    """A private anonymous page (one physical page, shared by fork until written)."""

    data: bytes
    alt: bytes | None = None  # another content it may hold: the model could not tell
    where: frozenset[int] = frozenset({SYS})
    zero: bool = False  # the shared zero page (read fault of an untouched page)

    def contents(self) -> set[bytes]:
        return {self.data} if self.alt is None else {self.data, self.alt}


@dataclass(eq=False)
class Shm:
    """A MAP_SHARED anonymous object: its pages by index (absent: zeros)."""

    size: int  # pages; mremap never changes it (past it: SIGBUS)
    pages: dict[int, Frame] = field(default_factory=dict)

    def frame(self, i: int) -> Frame:
        return self.pages.setdefault(i, Frame(ZERO))


@dataclass
class Vma:
    start: int
    end: int
    prot: int
    shm: Shm | None = None
    pgoff: int = 0  # first page of the shm object this VMA maps

    @property
    def readable(self) -> bool:
        return bool(self.prot & PROT_READ)

    @property
    def writable(self) -> bool:
        return bool(self.prot & PROT_WRITE)

    def shm_index(self, addr: int) -> int:
        return self.pgoff + (addr - self.start) // P

    def beyond_eof(self, addr: int) -> bool:
        """A page of a shared mapping past its object's end (mremap grew the mapping)."""
        return self.shm is not None and self.shm_index(addr) >= self.shm.size

    def part(self, start: int, end: int) -> Vma:
        return Vma(start, end, self.prot, self.shm, self.shm_index(start) if self.shm else 0)


@dataclass(eq=False)
class OpenFile:
    device: int
    file_id: int
    refs: int = 1


@dataclass(eq=False)
class Space:
    """One emulated process: its address space and what the devices know of it."""

    pid: int
    vmas: list[Vma] = field(default_factory=list)
    frames: dict[int, Frame] = field(default_factory=dict)
    wp: dict[int, bool | None] = field(default_factory=dict)  # PTE (or device-private entry) writable
    excl: dict[int, bool | None] = field(default_factory=dict)  # PTE may be device-exclusive
    tables: dict[int, dict[int, frozenset[str]]] = field(default_factory=dict)  # device -> page -> entries
    handles: dict[int, OpenFile] = field(default_factory=dict)  # device -> its own open of it
    files: list[OpenFile] = field(default_factory=list)  # every open file (own and inherited)

    def vma(self, addr: int) -> Vma | None:
        for v in self.vmas:
            if v.start <= addr < v.end:
                return v
        return None

    def overlapping(self, start: int, end: int) -> list[Vma]:
        return [v for v in self.vmas if v.start < end and start < v.end]

    def table(self, dev: int) -> dict[int, frozenset[str]]:
        return self.tables.setdefault(dev, {})


def pages(start: int, end: int) -> range:
    return range(start, end, P)


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise MismatchError(msg)


def expect_errno(got: object, allowed: set[int], what: str) -> None:
    names = sorted(errno.errorcode.get(e, str(e)) for e in allowed)
    if isinstance(got, KernelError):
        expect(got.errno in allowed, f"{what}: got {got.name} ({got}), model allows {names}")
    else:
        expect(0 in allowed, f"{what}: succeeded, model expects {names}")


class Model:
    """The reference model. ``ndevices`` dmirror devices with device-private memory."""

    def __init__(self, ndevices: int) -> None:
        self.ndevices = ndevices
        self.spaces: dict[int, Space] = {}

    # ---- helpers -------------------------------------------------------------------
    def space(self, pid: int) -> Space:
        return self.spaces[pid]

    def mappers(self, frame: Frame) -> Iterator[tuple[Space, int]]:
        for s in self.spaces.values():
            for addr, f in s.frames.items():
                if f is frame:
                    yield s, addr

    def refs(self, frame: Frame) -> int:
        return sum(1 for _ in self.mappers(frame))

    def first_bad(self, s: Space, start: int, end: int, *, write: bool) -> tuple[int, int] | None:
        """(page, errno) of the first page a range fault cannot make valid (writable)."""
        for a in pages(start, end):
            v = s.vma(a)
            if v is None or not v.readable or v.beyond_eof(a):
                return a, errno.EFAULT
            if write and not v.writable:
                return a, errno.EPERM
        return None

    def covered(self, s: Space, start: int, end: int) -> bool:
        return all(s.vma(a) is not None for a in pages(start, end))

    def page(self, s: Space, addr: int) -> Frame | None:
        """The frame behind a mapped page: its shm object's, or the private one (None:
        never touched)."""
        v = s.vma(addr)
        assert v is not None
        if v.shm is not None:
            return v.shm.frame(v.shm_index(addr))
        return s.frames.get(addr)

    def contents(self, s: Space, addr: int) -> set[bytes]:
        f = self.page(s, addr)
        return {ZERO} if f is None else f.contents()

    def observe(self, s: Space, addr: int, data: bytes, what: str, lo: int = 0, hi: int = P) -> None:
        """Bytes [lo, hi) of a page were read: check them and resolve any doubt."""
        allowed = self.contents(s, addr)
        matches = [d for d in allowed if d[lo:hi] == data]
        expect(bool(matches), f"{what}: bytes [{lo}, {hi}) of page {addr:#x} of pid {s.pid} hold "
               f"{describe(data)}, model allows {[describe(d[lo:hi]) for d in allowed]}")
        f = self.page(s, addr)
        if f is not None and len(matches) == 1:
            f.data, f.alt = matches[0], None

    def set_entries(self, s: Space, dev: int, start: int, end: int, poss: frozenset[str]) -> None:
        t = s.table(dev)
        for a in pages(start, end):
            if poss == NOTHING:
                t.pop(a, None)
            else:
                t[a] = poss

    def entries(self, s: Space, dev: int, addr: int) -> frozenset[str]:
        poss = s.table(dev).get(addr, NOTHING)
        f = s.frames.get(addr)
        if f is not None and SYS not in f.where and dev not in f.where:
            return NOTHING  # on another device: its migration erased our entry
        return poss

    def clear(self, s: Space, start: int, end: int) -> None:
        """An invalidation certainly erased every device's entries over [start, end)."""
        for d in list(s.tables):
            self.set_entries(s, d, start, end, NOTHING)

    def perturb(self, s: Space, start: int, end: int, *, keep: int | None = None) -> None:
        """An invalidation may have erased every device's entries (but ``keep``'s)."""
        for d, t in s.tables.items():
            if d == keep:
                continue
            for a in pages(start, end):
                if a in t:
                    t[a] = t[a] | NOTHING

    def perturb_frame(self, frame: Frame, *, keep: tuple[Space, int] | None = None) -> None:
        """The frame moved or was unmapped in every address space mapping it."""
        for s, a in list(self.mappers(frame)):
            if keep is not None and s is keep[0] and a == keep[1]:
                continue
            self.perturb(s, a, a + P)

    def clear_frame(self, frame: Frame) -> None:
        for s, a in list(self.mappers(frame)):
            self.clear(s, a, a + P)

    def bring_home(self, s: Space, addr: int, *, faulting_device: int | None = None) -> None:
        """A fault (CPU, or a range fault of ``faulting_device``) on a private page: a
        device page of another device comes back to RAM for every mapper; an
        exclusive entry is restored."""
        f = s.frames.get(addr)
        if f is not None:
            others = f.where - {SYS, faulting_device}
            if others:
                certain = len(f.where) == 1
                (self.clear_frame if certain else self.perturb_frame)(f)
                f.where = (f.where & {faulting_device}) | {SYS} if faulting_device is not None else frozenset({SYS})
        x = s.excl.get(addr, False)
        if x is not False:
            (self.clear if x else self.perturb)(s, addr, addr + P)
            s.excl.pop(addr, None)
            v = s.vma(addr)
            s.wp[addr] = v is not None and v.writable

    def write_fault(self, s: Space, addr: int) -> Frame:
        """A write fault on a private page: afterwards the page is this space's own,
        writable, in RAM (unless own device memory the caller keeps)."""
        self.bring_home(s, addr)
        f = s.frames.get(addr)
        if f is None:
            f = s.frames[addr] = Frame(ZERO)
            s.wp[addr] = True
            return f
        if f.zero or self.refs(f) > 1:
            self.clear(s, addr, addr + P)  # COW: CLEAR over the page
            f = s.frames[addr] = Frame(f.data, f.alt, frozenset({SYS}))
            s.wp[addr] = True
            return f
        if s.wp.get(addr) is not True:
            self.perturb(s, addr, addr + P)
            s.wp[addr] = True
        return f

    def read_fault(self, s: Space, addr: int, *, device: int | None = None) -> None:
        self.bring_home(s, addr, faulting_device=device)
        if addr not in s.frames:
            s.frames[addr] = Frame(ZERO, zero=True)
            s.wp[addr] = False

    def drop(self, s: Space, start: int, end: int) -> None:
        """Zap private pages of [start, end) (munmap, DONTNEED, exit)."""
        for a in pages(start, end):
            s.frames.pop(a, None)
            s.wp.pop(a, None)
            s.excl.pop(a, None)
        self.clear(s, start, end)

    def unmap(self, s: Space, start: int, end: int) -> None:
        out: list[Vma] = []
        for v in s.vmas:
            if v.end <= start or end <= v.start:
                out.append(v)
                continue
            if v.start < start:
                out.append(v.part(v.start, start))
            if end < v.end:
                out.append(v.part(end, v.end))
        s.vmas = sorted(out, key=lambda v: v.start)
        self.drop(s, start, end)

    # ---- processes --------------------------------------------------------------------
    def spawn(self, pid: int) -> None:
        self.spaces[pid] = Space(pid)

    def fork(self, parent: int, child: int) -> None:
        s = self.space(parent)
        c = Space(child, vmas=[v.part(v.start, v.end) for v in s.vmas])
        for v in s.vmas:
            if v.shm is not None:
                continue
            for a in pages(v.start, v.end):
                f = s.frames.get(a)
                if f is not None:
                    c.frames[a] = f
                    c.wp[a] = False
                    s.wp[a] = False
                    if not f.zero:
                        self.clear(s, a, a + P)  # the VMA has an anon_vma: PROTECTION_PAGE
                s.excl.pop(a, None)  # exclusive entries are restored at fork
            self.perturb(s, v.start, v.end)
        for of in s.files:
            of.refs += 1
            c.files.append(of)
        self.spaces[child] = c

    def exit(self, pid: int) -> None:
        s = self.spaces.pop(pid)
        self._forget_space(s)
        for of in s.files:
            of.refs -= 1
            if of.refs == 0:
                self.evict(of.device)

    def _forget_space(self, s: Space) -> None:
        s.frames.clear()
        s.tables.clear()

    def evict(self, dev: int) -> None:
        """A handle of ``dev`` was closed: every page on the device comes home; CLEAR
        reaches every mirror of those pages."""
        for s in list(self.spaces.values()):
            for a, f in list(s.frames.items()):
                if dev in f.where:
                    if f.where == {dev}:
                        self.clear(s, a, a + P)
                    else:
                        self.perturb(s, a, a + P)
        for s in self.spaces.values():
            for f in s.frames.values():
                if dev in f.where:
                    f.where = (f.where - {dev}) | {SYS}

    def open(self, pid: int, dev: int, file_id: int) -> None:
        of = OpenFile(dev, file_id)
        s = self.space(pid)
        s.handles[dev] = of
        s.files.append(of)
        s.tables[dev] = {}

    # ---- memory system calls --------------------------------------------------------
    def mmap(self, pid: int, addr: int, npages: int, prot: int, shared: bool, fixed: bool, got: object) -> None:
        s = self.space(pid)
        expect(not isinstance(got, KernelError), f"mmap failed: {got}")
        assert isinstance(got, int)
        end = got + npages * P
        expect(got % P == 0, f"mmap returned an unaligned {got:#x}")
        if fixed:
            expect(got == addr, f"MAP_FIXED at {addr:#x} returned {got:#x}")
            self.unmap(s, addr, end)
        else:
            expect(not s.overlapping(got, end), f"mmap returned {got:#x}, which overlaps a mapping")
        s.vmas.append(Vma(got, end, prot, Shm(npages) if shared else None))
        s.vmas.sort(key=lambda v: v.start)

    def munmap(self, pid: int, addr: int, length: int, got: object) -> None:
        if length <= 0:
            expect_errno(got, {errno.EINVAL}, "munmap of an empty range")
            return
        expect_errno(got, {0}, f"munmap [{addr:#x}, +{length:#x})")
        self.unmap(self.space(pid), addr, addr + length)

    def mprotect(self, pid: int, addr: int, length: int, prot: int, got: object) -> None:
        s = self.space(pid)
        end = addr + length
        if not self.covered(s, addr, end):
            # Linux changes the VMAs before the first hole; hmmd changes nothing. The
            # machine only asks this where both agree (the range starts in a hole).
            expect_errno(got, {errno.ENOMEM}, f"mprotect [{addr:#x}, {end:#x}) over a hole")
            return
        expect_errno(got, {0}, f"mprotect [{addr:#x}, {end:#x})")
        # A mapping that already has ``prot`` is left as it is: not split, nothing
        # announced (mprotect_fixup); the others' parts in range change, after an
        # invalidation.
        out: list[Vma] = []
        changed: list[tuple[int, int]] = []
        for v in s.vmas:
            if v.end <= addr or end <= v.start or v.prot == prot:
                out.append(v)
                continue
            if v.start < addr:
                out.append(v.part(v.start, addr))
            mid = v.part(max(v.start, addr), min(v.end, end))
            mid.prot = prot
            out.append(mid)
            changed.append((mid.start, mid.end))
            if end < v.end:
                out.append(v.part(end, v.end))
        s.vmas = sorted(out, key=lambda v: v.start)
        for lo, hi in changed:
            for a in pages(lo, hi):
                if a in s.frames:
                    if not prot & PROT_WRITE:
                        s.wp[a] = False
                    elif s.wp.get(a) is not True:
                        s.wp[a] = None  # Linux may make an exclusive anonymous page writable at once
            self.clear(s, lo, hi)

    def madvise_dontneed(self, pid: int, addr: int, length: int, got: object) -> None:
        s = self.space(pid)
        end = addr + length
        expect_errno(got, {0} if self.covered(s, addr, end) else {errno.ENOMEM}, f"MADV_DONTNEED [{addr:#x}, {end:#x})")
        for v in s.overlapping(addr, end):
            lo, hi = max(v.start, addr), min(v.end, end)
            if v.shm is None:
                self.drop(s, lo, hi)
            else:
                self.clear(s, lo, hi)

    def mremap_check(self, s: Space, old: int, old_len: int) -> int | None:
        """The errno an mremap of [old, old + old_len) fails with before any move
        (EFAULT: not inside one mapping), else None."""
        v = s.vma(old)
        if v is None or old + old_len > v.end:
            return errno.EFAULT
        return None

    def mremap(self, pid: int, old: int, old_len: int, new_len: int, *, maymove: bool, fixed_to: int | None,
               got: object) -> None:
        s = self.space(pid)
        what = f"mremap({old:#x}, {old_len:#x}, {new_len:#x}, maymove={maymove}, to={fixed_to})"
        err = self.mremap_check(s, old, old_len)
        if err is not None:
            expect_errno(got, {err}, what)
            return
        v = s.vma(old)
        assert v is not None
        if fixed_to is not None:
            if fixed_to < old + old_len and old < fixed_to + new_len:
                expect_errno(got, {errno.EINVAL}, what + " onto itself")
                return
            expect_errno(got, {0}, what)
            expect(got == fixed_to, f"{what} returned {got:#x}")
            self.unmap(s, fixed_to, fixed_to + new_len)
            if new_len < old_len:
                self.unmap(s, old + new_len, old + old_len)
                old_len = new_len
            self._move(s, old, old_len, fixed_to, new_len)
            return
        if new_len <= old_len:
            expect_errno(got, {0}, what)
            expect(got == old, f"{what} returned {got:#x}")
            if new_len < old_len:
                self.unmap(s, old + new_len, old + old_len)
            return
        free_after = old + old_len == v.end and not s.overlapping(v.end, old + new_len)
        if free_after:
            expect_errno(got, {0}, what)
            expect(got == old, f"{what} grew in place at {got:#x}, not {old:#x}")
            v.end = old + new_len
            return
        if not maymove:
            expect_errno(got, {errno.ENOMEM}, what + " cannot grow in place")
            return
        expect_errno(got, {0}, what)
        assert isinstance(got, int)
        expect(got % P == 0 and not s.overlapping(got, got + new_len), f"{what} moved onto a mapping at {got:#x}")
        self._move(s, old, old_len, got, new_len)

    def _move(self, s: Space, old: int, old_len: int, new: int, new_len: int) -> None:
        v = s.vma(old)
        assert v is not None
        moved = v.part(old, old + old_len)
        moved.start, moved.end = new, new + new_len
        keep = {a: (s.frames.pop(a, None), s.wp.pop(a, None), s.excl.pop(a, None)) for a in pages(old, old + old_len)}
        self.unmap(s, old, old + old_len)
        for a, (f, w, x) in keep.items():
            b = new + (a - old)
            if f is not None:
                s.frames[b] = f
                s.wp[b] = w
            if x is not None and x is not False:
                s.excl[b] = x
        s.vmas.append(moved)
        s.vmas.sort(key=lambda v: v.start)
        self.clear(s, new, new + new_len)

    # ---- CPU accesses --------------------------------------------------------------------
    def cpu_access_errno(self, s: Space, addr: int, length: int, write: bool) -> int | None:
        for a in pages(addr & ~(P - 1), addr + length):
            v = s.vma(a)
            if v is None or not v.readable or (write and not v.writable) or v.beyond_eof(a):
                return errno.EFAULT
        return None

    def cpu_read(self, pid: int, addr: int, length: int, got: object) -> None:
        s = self.space(pid)
        what = f"CPU read [{addr:#x}, +{length:#x}) of pid {pid}"
        err = self.cpu_access_errno(s, addr, length, False)
        if err is not None:
            expect_errno(got, {err}, what)
            return
        expect(isinstance(got, bytes) and len(got) == length, f"{what}: got {got!r:.200}")
        assert isinstance(got, bytes)
        first = addr & ~(P - 1)
        for a in pages(first, addr + length):
            if s.vma(a).shm is None:  # type: ignore[union-attr]
                self.read_fault(s, a)
        for a in pages(first, addr + length):
            lo, hi = max(addr, a) - a, min(addr + length, a + P) - a
            self.observe(s, a, got[a + lo - addr : a + hi - addr], what, lo, hi)

    def cpu_write(self, pid: int, addr: int, data: bytes, got: object) -> None:
        s = self.space(pid)
        what = f"CPU write [{addr:#x}, +{len(data):#x}) of pid {pid}"
        err = self.cpu_access_errno(s, addr, len(data), True)
        if err is not None:
            expect_errno(got, {err}, what)
            return
        expect_errno(got, {0}, what)
        for a in pages(addr & ~(P - 1), addr + len(data)):
            lo = max(addr, a) - a
            hi = min(addr + len(data), a + P) - a
            piece = data[max(addr, a) - addr : min(addr + len(data), a + P) - addr]
            v = s.vma(a)
            assert v is not None
            f = v.shm.frame(v.shm_index(a)) if v.shm is not None else self.write_fault(s, a)
            f.data = f.data[:lo] + piece + f.data[hi:]
            if f.alt is not None:
                f.alt = f.alt[:lo] + piece + f.alt[hi:]
            f.zero = False

    # ---- dmirror commands --------------------------------------------------------------
    def dev_read(self, pid: int, dev: int, addr: int, npages: int, got: object) -> None:
        s = self.space(pid)
        end = addr + npages * P
        what = f"dmirror{dev} READ [{addr:#x}, {end:#x}) of pid {pid}"
        bad = self.first_bad(s, addr, end, write=False)
        # The copy loop goes up to the first page without an entry; the fault pass
        # then covers the rest, an atomic entry of this device's included (the range
        # fault takes the page back from it, as the kernel's dmirror_fault does).
        last = bad[0] if bad else end
        self._stretch_home(s, dev, addr, last, write=False)
        stopped = False  # the copy loop may have stopped before this page
        for a in pages(addr, last):
            poss = self.entries(s, dev, a)
            if s.vma(a).shm is not None:  # type: ignore[union-attr]
                stopped = stopped or NONE in poss
                continue
            if poss == {A} and not stopped:
                continue  # copied through its atomic entry: nothing faulted
            stopped = stopped or NONE in poss
            was = s.excl.get(a, False)
            self.read_fault(s, a, device=dev)
            if A in poss and was is not False:
                s.excl[a] = None
        self.perturb(s, addr, end, keep=dev)
        if bad is not None:
            expect_errno(got, {bad[1]}, what)
            self.perturb(s, addr, bad[0])
            return
        expect(not isinstance(got, KernelError), f"{what}: {got}")
        cpages, data = reply(got)
        expect(cpages == npages and len(data) == npages * P, f"{what}: cpages {cpages}, {len(data)} bytes")
        t = s.table(dev)
        for i, a in enumerate(pages(addr, end)):
            self.observe(s, a, data[i * P : (i + 1) * P], what)
            old = t.get(a, NOTHING)
            t[a] = frozenset({A}) if old == {A} else (old - NOTHING) | {R, W}

    def write_blocked(self, pid: int, dev: int, addr: int, npages: int) -> bool:
        """Whether a WRITE of ``dev`` could meet one of its own device pages whose
        device-private entry is read-only: the range fault reports such a page
        VALID without WRITE and faults nothing (HMM-SEMANTICS.md §1.2), and
        hmm-dmirror's copy loop then retries forever (see test_state_machine.py)."""
        s = self.space(pid)
        for a in pages(addr, addr + npages * P):
            f = s.frames.get(a)
            if f is not None and dev in f.where and s.wp.get(a) is not True:
                return True
        return False

    def dev_write(self, pid: int, dev: int, addr: int, data: bytes, got: object) -> None:
        s = self.space(pid)
        npages = len(data) // P
        end = addr + npages * P
        what = f"dmirror{dev} WRITE [{addr:#x}, {end:#x}) of pid {pid}"
        bad = self.first_bad(s, addr, end, write=True)
        self.perturb(s, addr, end, keep=dev)
        if bad is None:
            expect_errno(got, {0}, what)
            self._stretch_home(s, dev, addr, end, write=True)
            for i, a in enumerate(pages(addr, end)):
                self._dev_store(s, dev, a, data[i * P : (i + 1) * P])
            self.set_entries(s, dev, addr, end, frozenset({W}))
            return
        expect_errno(got, {bad[1]}, what)
        # The copy loop wrote the pages that had writable entries, up to the first
        # that had none; then the fault pass over the rest failed at the bad page.
        written: bool | None = True
        t = s.table(dev)
        for i, a in enumerate(pages(addr, bad[0])):
            f = s.frames.get(a)
            poss = self.entries(s, dev, a)
            v = s.vma(a)
            assert v is not None
            if v.shm is None and (f is None or f.zero or self.refs(f) > 1 or s.wp.get(a) is False):
                poss = NOTHING  # no writable entry can exist for a page the CPU cannot write
            if W not in poss:
                written = False
            elif poss != {W} and written:
                written = None
            new = data[i * P : (i + 1) * P]
            if written is True:
                self._dev_store(s, dev, a, new)
            elif written is None:
                self._dev_store(s, dev, a, new, maybe=True)
            elif v.shm is None:
                self.write_fault(s, a)  # the failed fault pass faulted it (COW, zero fill)
            t[a] = t.get(a, NOTHING) | NOTHING
        self.perturb(s, addr, bad[0])

    def _stretch_home(self, s: Space, dev: int, addr: int, end: int, *, write: bool) -> None:
        """A READ's or WRITE's fault pass (from the first page without an entry the
        copy loop can use) that faults a page in faults the rest of its 2 MiB too
        (hmm_vma_fault): this device's own pages there may come home."""
        stopped = False  # the copy loop may have stopped before this page
        faulted: int | None = None  # the 2 MiB block where the fault pass may have faulted a page
        for a in pages(addr, end):
            poss = self.entries(s, dev, a)
            stopped = stopped or (poss != {W} if write else NONE in poss)
            if not stopped:
                continue
            v, f = s.vma(a), s.frames.get(a)
            own = f is not None and dev in f.where and SYS not in f.where
            if own and faulted == a >> PMD_SHIFT:
                assert f is not None
                self.perturb_frame(f)
                f.where = f.where | {SYS}
            elif v is not None and (v.shm is not None or f is None or f.where - {SYS, dev}
                                    or s.excl.get(a, False) is not False
                                    or write and (f.zero or s.wp.get(a) is not True or self.refs(f) > 1)):
                faulted = a >> PMD_SHIFT  # (perhaps) not present, or not writable for a WRITE: faulted

    def _dev_store(self, s: Space, dev: int, a: int, new: bytes, *, maybe: bool = False) -> None:
        v = s.vma(a)
        assert v is not None
        f: Frame | None
        if v.shm is not None:
            f = v.shm.frame(v.shm_index(a))
        else:
            f = s.frames.get(a)
            if f is not None and dev in f.where and s.wp.get(a) is True and self.refs(f) == 1:
                s.excl.pop(a, None)  # written in place, in device memory if it is there
            else:
                f = self.write_fault(s, a)
        if maybe:
            f.alt = new
        else:
            f.data, f.alt = new, None
        f.zero = False

    def migrate_check(self, s: Space, addr: int, end: int) -> bool:
        """MIGRATE_TO_DEV/SYS walk pieces that must start in readable mappings."""
        return all((v := s.vma(a)) is not None and v.readable for a in pages(addr, end))

    def migrate_to_dev(self, pid: int, dev: int, addr: int, npages: int, got: object) -> None:
        s = self.space(pid)
        end = addr + npages * P
        what = f"dmirror{dev} MIGRATE_TO_DEV [{addr:#x}, {end:#x}) of pid {pid}"
        if not self.migrate_check(s, addr, end):
            expect_errno(got, {errno.EINVAL}, what)
            # The pieces before the first that starts outside a readable mapping moved
            # (docs/protocol.md 16.2; both devices do, as the kernel's driver): a hole
            # among them is now a page of this device.
            moved_end = next(a for a in pages(addr, end) if (v := s.vma(a)) is None or not v.readable)
            self._moved_to_dev(s, dev, addr, moved_end)
            return
        allowed: set[int] = set()
        must_fail = False
        may_fail = False
        for a in pages(addr, end):
            v = s.vma(a)
            assert v is not None
            f = s.frames.get(a)
            x = s.excl.get(a, False)
            if v.shm is not None:
                collected: bool | None = False
            elif f is None or (f.where == {SYS} and x is False):
                collected = True
            elif SYS not in f.where or x is True:
                collected = False
            else:
                collected = None
            if collected is True:
                continue
            poss = self.entries(s, dev, a)
            if poss == NOTHING:
                if collected is False:
                    must_fail = True
                else:
                    may_fail = True
            elif NONE in poss:
                may_fail = True
        allowed = {errno.ENOENT} if must_fail else ({0, errno.ENOENT} if may_fail else {0})
        expect_errno(got, allowed, what)
        self._moved_to_dev(s, dev, addr, end)
        if not isinstance(got, KernelError):
            cpages, data = reply(got)
            expect(cpages == npages and len(data) == npages * P, f"{what}: cpages {cpages}, {len(data)} bytes")
            for i, a in enumerate(pages(addr, end)):
                self.observe(s, a, data[i * P : (i + 1) * P], what)

    def _moved_to_dev(self, s: Space, dev: int, addr: int, end: int) -> None:
        """MIGRATE_TO_DEV's migrations over [addr, end): every page that could be
        collected is now ``dev``'s (a hole, a zero-page mapping: a zeroed page of
        its), one that may have been is perhaps; other devices' entries may be gone."""
        t = s.table(dev)
        self.perturb(s, addr, end, keep=dev)
        for a in pages(addr, end):
            v = s.vma(a)
            assert v is not None
            if v.shm is not None:
                continue
            f = s.frames.get(a)
            x = s.excl.get(a, False)
            if f is None:
                s.frames[a] = Frame(ZERO, where=frozenset({dev}))
                s.wp[a] = v.writable
                t[a] = frozenset({R})
                continue
            if f.where == {SYS} and x is False:
                if f.zero:
                    f = s.frames[a] = Frame(ZERO, where=frozenset({dev}))
                    s.wp[a] = None
                else:
                    self.perturb_frame(f, keep=(s, a))
                    f.where = frozenset({dev})
                t[a] = frozenset({R, W})
            elif SYS in f.where and x is not True:
                self.perturb_frame(f, keep=(s, a))
                f.where = f.where | {dev}
                t[a] = t.get(a, NOTHING) | {R, W}

    def migrate_to_sys(self, pid: int, dev: int, addr: int, npages: int, got: object) -> None:
        s = self.space(pid)
        end = addr + npages * P
        what = f"dmirror{dev} MIGRATE_TO_SYS [{addr:#x}, {end:#x}) of pid {pid}"
        if not self.migrate_check(s, addr, end):
            expect_errno(got, {errno.EINVAL}, what)
            self.perturb(s, addr, end, keep=dev)
            for a in pages(addr, end):
                f = s.frames.get(a)
                if f is not None and dev in f.where:
                    f.where = f.where | {SYS}
                    self.perturb_frame(f)
            return
        lo = hi = 0
        for a in pages(addr, end):
            f = s.frames.get(a)
            if f is not None and dev in f.where:
                hi += 1
                lo += f.where == {dev}
        expect(not isinstance(got, KernelError), f"{what}: {got}")
        cpages = reply(got)[0]
        expect(lo <= cpages <= hi, f"{what}: {cpages} pages moved, model expects {lo}..{hi}")
        # Every piece's setup raised a MIGRATE over it, whatever it collected: the
        # other devices' entries there are gone (this device ignores its own).
        for d in s.tables:
            if d != dev:
                self.set_entries(s, d, addr, end, NOTHING)
        for a in pages(addr, end):  # every page of ours moved (nothing can refuse)
            f = s.frames.get(a)
            if f is not None and dev in f.where:
                (self.clear_frame if f.where == {dev} else self.perturb_frame)(f)
                f.where = (f.where - {dev}) | {SYS}

    def exclusive(self, pid: int, dev: int, addr: int, npages: int, got: object) -> None:
        s = self.space(pid)
        end = addr + npages * P
        what = f"dmirror{dev} EXCLUSIVE [{addr:#x}, {end:#x}) of pid {pid}"
        bad: tuple[int, int] | None = None
        for a in pages(addr, end):
            v = s.vma(a)
            if v is None or not v.writable or not v.readable:
                bad = (a, errno.EFAULT)
                break
            if v.shm is not None:
                bad = (a, errno.EOPNOTSUPP)
                break
        stop = bad[0] if bad else end
        for a in pages(addr, stop):
            self.write_fault(s, a)
            s.excl[a] = True
            for d in list(s.tables):
                self.set_entries(s, d, a, a + P, NOTHING)
        if bad is not None:
            expect_errno(got, {bad[1]}, what)
            return
        expect(not isinstance(got, KernelError), f"{what}: {got}")
        cpages, data = reply(got)
        expect(cpages == npages and len(data) == npages * P, f"{what}: cpages {cpages}, {len(data)} bytes")
        for i, a in enumerate(pages(addr, end)):
            self.observe(s, a, data[i * P : (i + 1) * P], what)
        self.set_entries(s, dev, addr, end, frozenset({A}))

    def check_exclusive(self, pid: int, dev: int, addr: int, npages: int, got: object) -> None:
        s = self.space(pid)
        end = addr + npages * P
        what = f"dmirror{dev} CHECK_EXCLUSIVE [{addr:#x}, {end:#x}) of pid {pid}"
        t = s.table(dev)
        certain = any(t.get(a, NOTHING) == {A} for a in pages(addr, end))
        possible = any(A in t.get(a, NOTHING) for a in pages(addr, end))
        expect_errno(got, {errno.EPERM} if certain else ({0, errno.EPERM} if possible else {0}), what)
        if not isinstance(got, KernelError):
            for a in pages(addr, end):
                if a in t and A in t[a]:
                    t[a] = t[a] - {A} or NOTHING
                    if t[a] == NOTHING:
                        del t[a]

    def snapshot(self, pid: int, dev: int, addr: int, npages: int, got: object) -> None:
        s = self.space(pid)
        end = addr + npages * P
        what = f"dmirror{dev} SNAPSHOT [{addr:#x}, {end:#x}) of pid {pid}"
        expect(not isinstance(got, KernelError), f"{what}: {got}")
        cpages, data = reply(got)
        expect(cpages == npages and len(data) == npages, f"{what}: cpages {cpages}, {len(data)} bytes")
        for i, a in enumerate(pages(addr, end)):
            b = data[i]
            v = s.vma(a)
            if v is None or not v.readable:
                expect(b == SNAP_ERROR, f"{what}: page {a:#x} (no readable mapping) is {b:#04x}, not 0xff")
                continue
            expect(b != SNAP_ERROR, f"{what}: page {a:#x} is mapped readable, snapshot says 0xff")
            if v.shm is not None:
                allowed_shm = (SNAP_NONE,) if v.beyond_eof(a) else (SNAP_NONE, SNAP_READ, SNAP_WRITE)
                expect(b in allowed_shm, f"{what}: shared page {a:#x} is {b:#04x}")
                continue
            f = s.frames.get(a)
            allowed: set[int] = set()
            wp = s.wp.get(a)
            access = {SNAP_WRITE} if wp is True else {SNAP_READ} if wp is False else {SNAP_READ, SNAP_WRITE}
            if f is None:
                allowed.add(SNAP_NONE)
            elif f.zero:
                allowed.add(SNAP_ZERO | SNAP_READ)
            else:
                if SYS in f.where:
                    allowed |= access
                if dev in f.where:
                    allowed |= {SNAP_LOCAL | x for x in access}
                if f.where - {SYS, dev}:
                    allowed.add(SNAP_NONE)
            if s.excl.get(a, False) is not False:
                allowed.add(SNAP_NONE)
                if s.excl.get(a) is True:
                    allowed = {SNAP_NONE}
            expect(b in allowed, f"{what}: page {a:#x} is {b:#04x}, model allows {sorted(hex(x) for x in allowed)}")
            if f is not None and not f.zero:
                if b & 0xF0 == SNAP_LOCAL:
                    f.where = frozenset({dev})
                elif b in (SNAP_READ, SNAP_WRITE):
                    f.where = frozenset({SYS})
                    s.excl.pop(a, None)
                if b & 0x0F in (SNAP_READ, SNAP_WRITE):
                    s.wp[a] = b & 0x0F == SNAP_WRITE
