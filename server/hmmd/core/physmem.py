"""System RAM: 4 KiB frames with real contents, an allocator, refcounts and mapcounts.

Frame 0 is the shared zero page: always allocated, never written, never freed.

Above the system frames [0, nframes) lies a window of device-coherent frames
[nframes, span): memory that belongs to devices (ZONE_DEVICE, MEMORY_DEVICE_COHERENT)
but that the CPU addresses like RAM, so it shares RAM's contents array and counts.
The allocator never hands these out; the owning device picks them as migration
destinations, and when one's last reference goes it is not recycled but handed to
``on_device_free`` (the owner's page_free).
Everything is a numpy array indexed by PFN, and every operation takes arrays of
PFNs, so populating or freeing a gigabyte is a handful of vector operations.

Contents live in one page-aligned anonymous mapping, so that a frame is exactly
one host page. An allocated frame always reads as zero, unless its caller writes
every byte of it at once (``alloc(zero=False)``: a copy, a migration's data). Freed
frames keep their contents, marked stale, while the free frames kept resident stay
under a budget, and are zeroed when handed out; long runs beyond the budget are
handed back to the host with MADV_DONTNEED (the daemon's memory shrinks, but the
next write to them faults every page in again). So a migration to a device frees
its sources without clearing them, and one home writes its new frames once.

Reference rules (the kernel's, simplified to what hmmd models):
* ``alloc`` returns frames with refcount 1 and mapcount 0 — that reference belongs
  to whoever asked (a page table that maps it, or a file's page cache);
* every additional holder takes a reference with ``get``; ``put`` drops one and
  returns frames whose refcount reached 0 to the free list;
* mapcount counts the page-table entries that map a frame.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import mmap
from collections.abc import Callable, Iterable

import numpy as np

from hmm.abi import PAGE_SIZE
from hmm.errors import KernelError

ZERO_PFN = 0

# Per-frame flag bits (folio flags we need).
PG_ANON = 0x1  # an anonymous page (counts as RssAnon); otherwise page cache
PG_LOCKED = 0x2  # folio lock held (see PageLocks)
PG_HUGETLB = 0x4  # part of a hugetlb page (counts against the hugetlb pool)
# PageAnonExclusive (v5.19+): an anonymous page that the one mapping it owns alone,
# so a write reuses it whatever extra references (pins) it has; fork clears it when
# it shares the page with the child.
PG_ANON_EXCLUSIVE = 0x8
HUGETLB_PAGES = 512  # frames per (2 MiB) hugetlb page

# Freed runs at least this long (16 MiB) may go back to the host instead of being
# zeroed: zeroing resident memory is far cheaper than faulting it in again on the
# next allocation (~0.4 against ~2.4 us a page here), so only big frees are worth
# shrinking the daemon for, and only beyond RESIDENT_FREE_MAX of free frames kept
# resident (a migration of 64 MiB there and back must not fault in its frames).
DONTNEED_MIN_RUN = 4096
RESIDENT_FREE_MAX = 256 << 20  # bytes, and at most 1/16 of RAM

PfnArray = np.ndarray  # int64 array of frame numbers
Buffer = bytes | memoryview | np.ndarray  # page contents in one piece: what np.frombuffer reads


class Parts:
    """Page contents that arrived in pieces (a stream's messages), kept as they came,
    so that they are copied once, into their frames, rather than joined first. A
    piece may end anywhere, mid-page too."""

    __slots__ = ("views", "nbytes")

    def __init__(self, pieces: Iterable[Buffer]) -> None:
        self.views = [np.frombuffer(p, dtype=np.uint8) for p in pieces]
        self.nbytes = sum(len(v) for v in self.views)

    def __len__(self) -> int:
        return self.nbytes

    def copy_into(self, out: np.ndarray) -> None:
        """The contents, in order, into ``out`` (flat uint8 of ``len(self)`` bytes)."""
        at = 0
        for v in self.views:
            out[at : at + len(v)] = v
            at += len(v)


Contents = Buffer | Parts  # page contents given to the core


def page_rows(data: Contents) -> np.ndarray:
    """``data`` as (pages, PAGE_SIZE) uint8 rows: a view, or for Parts one joined copy."""
    if isinstance(data, Parts):
        flat = np.empty(len(data), dtype=np.uint8)
        data.copy_into(flat)
    elif isinstance(data, np.ndarray):  # uint8, maybe strided (rows picked out)
        return data.reshape(-1, PAGE_SIZE)
    else:
        flat = np.frombuffer(data, dtype=np.uint8)
    return flat.reshape(-1, PAGE_SIZE)


def distinct(pfns: np.ndarray) -> np.ndarray:
    """``pfns`` sorted, without repeats (np.unique's result), at almost no cost when
    they already are — a migration's frames usually are — and a sort when not
    (np.unique hashes: ~4 times a sort here for 16,384 frames)."""
    if len(pfns) < 2 or (np.diff(pfns) > 0).all():
        return pfns
    s = np.sort(pfns)
    return s[np.concatenate(([True], s[1:] != s[:-1]))]


def run_of(pfns: np.ndarray) -> slice | None:
    """``pfns`` as a slice when they are consecutive ascending frames (two or more):
    one memcpy or memset instead of numpy's indexed copy, several times slower."""
    if len(pfns) > 1 and pfns[-1] - pfns[0] == len(pfns) - 1 and (np.diff(pfns) == 1).all():
        return slice(int(pfns[0]), int(pfns[-1]) + 1)
    return None


def add_counts(counts: np.ndarray, index: np.ndarray, delta: int) -> None:
    """``counts[index] += delta`` with repeated indices counted each time.

    np.add.at does this at ~50 ns an element; a bincount over the (usually
    narrow) span of the indices is several times faster for large batches.
    """
    if len(index) < 256:
        np.add.at(counts, index, counts.dtype.type(delta))  # a Python int takes a slow casting path
        return
    lo = int(index.min())
    bins = np.bincount(index - lo)
    counts[lo : lo + len(bins)] += (bins * delta).astype(counts.dtype)


class OutOfMemoryError(KernelError):
    """ENOMEM from the frame allocator: ``shortfall`` more free frames were needed.
    The kernel's operations that allocate take it to direct reclaim (Kernel.reclaim)."""

    def __init__(self, shortfall: int, message: str) -> None:
        super().__init__(errno.ENOMEM, message)
        self.shortfall = shortfall


class PageLocks:
    """Folio locks on system frames for holders that keep them across requests: a
    device between make_device_exclusive and unlocking, a migration between
    migrate_vma_pages and finalize. PG_LOCKED in the frame flags mirrors them, so a
    batch trylock (migrate_vma_setup) is one vector test; faults wait on a future,
    made only when someone waits (a migration locks thousands of frames nobody
    touches)."""

    def __init__(self, flags: np.ndarray) -> None:
        self._flags = flags
        # Per frame, the lock() call that holds it (0: unlocked). Each call is one
        # token: a later lock of the same frame is another lock (see tokens()).
        self._token = np.zeros(len(flags), dtype=np.int64)
        self._holders: dict[int, tuple[object, int]] = {}  # token -> (holder, frames it still locks)
        self._tokens = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[None]] = {}  # pfn -> resolved at unlock

    @property
    def held(self) -> int:
        """Frames locked now."""
        return sum(n for _, n in self._holders.values())

    def lock(self, pfns: np.ndarray, holder: object) -> None:
        """Lock the distinct frames ``pfns`` for ``holder``; one already locked stays
        its holder's."""
        free = pfns[self._token[pfns] == 0]
        if len(free):
            token = next(self._tokens)
            self._token[free] = token
            self._holders[token] = (holder, len(free))
            self._flags[free] |= PG_LOCKED

    def tokens(self, pfns: np.ndarray, holder: object) -> frozenset[int]:
        """The identities of the locks ``holder`` has on ``pfns`` now (for ``unlock``'s
        ``only``: a later lock of the same frame is another lock)."""
        return frozenset(t for t in np.unique(self._token[pfns]).tolist()
                         if t and self._holders[t][0] is holder)

    def unlock(self, pfns: np.ndarray, holder: object, only: frozenset[int] | None = None) -> int:
        """Release the locks ``holder`` has on ``pfns`` (with ``only``: those of them
        that ``tokens`` named); returns how many it released."""
        mine = [t for t, (h, _) in self._holders.items() if h is holder and (only is None or t in only)]
        if not mine or not len(pfns):
            return 0
        held = self._token[pfns]
        sel = held == mine[0] if len(mine) == 1 else np.isin(held, mine)
        released = distinct(pfns[sel])  # a frame named twice is released once
        self._release(released)
        return len(released)

    def unlock_all(self, holder: object) -> None:
        mine = [t for t, (h, _) in self._holders.items() if h is holder]
        if mine:
            self._release(np.flatnonzero(np.isin(self._token, mine)))

    def forget(self, pfns: PfnArray) -> None:
        """Frames being freed (distinct) drop any lock on them (their holder's unlock
        becomes a no-op)."""
        if self._holders:
            self._release(pfns[self._token[pfns] != 0])

    def _release(self, pfns: np.ndarray) -> None:
        """Unlock the distinct, locked frames ``pfns`` and wake their waiters."""
        if not len(pfns):
            return
        tokens = self._token[pfns]
        first = int(tokens[0])
        if len(tokens) == 1 or (tokens == first).all():  # the usual case: one lock() call's frames
            groups: list[tuple[int, int]] = [(first, len(tokens))]
        else:
            ids, counts = np.unique(tokens, return_counts=True)
            groups = list(zip(ids.tolist(), counts.tolist(), strict=True))
        for token, n in groups:
            holder, left = self._holders[token]
            if left == n:
                del self._holders[token]
            else:
                self._holders[token] = (holder, left - n)
        self._token[pfns] = 0
        self._flags[pfns] &= np.uint8(~PG_LOCKED & 0xFF)
        if self._waiters:
            for pfn in pfns.tolist():
                fut = self._waiters.pop(pfn, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    def is_locked(self, pfn: int) -> bool:
        return bool(self._token[pfn])

    async def wait_unlocked(self, pfn: int) -> None:
        while self._token[pfn]:
            fut = self._waiters.get(pfn)
            if fut is None or fut.done():
                fut = self._waiters[pfn] = asyncio.get_running_loop().create_future()
            await asyncio.shield(fut)


class PhysMem:
    """All system frames. Not thread-safe: the daemon's core runs on one event loop."""

    def __init__(self, nframes: int, hugetlb_pages: int = 0, device_frames: int = 0) -> None:
        if nframes < 2:
            raise ValueError("need at least two frames (one is the zero page)")
        self.nframes = nframes  # system RAM: frames [0, nframes)
        self.span = nframes + device_frames  # with the device-coherent window above it
        self.hugetlb_pages = hugetlb_pages  # the pool size (nr_hugepages), in 2 MiB pages
        self.hugetlb_reserved = 0  # free pool pages promised to mappings (resv_huge_pages)
        self.hugetlb_frames = 0  # frames of pool pages in use: those carrying PG_HUGETLB
        # Anonymous memory is backed lazily: untouched frames cost nothing.
        self._mem = mmap.mmap(-1, self.span * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.data = np.frombuffer(self._mem, dtype=np.uint8).reshape(self.span, PAGE_SIZE)
        self.refcount = np.zeros(self.span, dtype=np.int32)
        self.mapcount = np.zeros(self.span, dtype=np.int32)
        self.flags = np.zeros(self.span, dtype=np.uint8)
        self.pincount = np.zeros(self.span, dtype=np.int32)  # FOLL_PIN references (also in refcount)
        self.on_device_free: Callable[[PfnArray], None] = lambda pfns: None
        self.refcount[ZERO_PFN] = 1
        # Frames never handed out come from the top; freed ones are pushed on a
        # stack and handed out first.
        self._next_fresh = 1
        self._free = np.empty(nframes, dtype=np.int64)
        self._nfree = 0
        # Free frames still resident in the host, and the budget for keeping long
        # freed runs that way rather than handing them back (MADV_DONTNEED).
        self._resident = np.zeros(nframes, dtype=bool)
        self._nresident = 0
        # Free frames that still hold their last contents: zeroed when handed out,
        # unless the caller overwrites every byte (as the kernel skips __GFP_ZERO).
        self._stale = np.zeros(nframes, dtype=bool)
        self.resident_free_max = min(RESIDENT_FREE_MAX // PAGE_SIZE, nframes // 16)
        self.locks = PageLocks(self.flags)

    # ---- allocation ------------------------------------------------------------
    @property
    def free_frames(self) -> int:
        return self._nfree + (self.nframes - self._next_fresh)

    @property
    def used_frames(self) -> int:
        return self.nframes - self.free_frames

    def alloc(self, n: int, *, zero: bool = True) -> PfnArray:
        """Allocate ``n`` zeroed frames (refcount 1, mapcount 0, flags 0). ENOMEM if short.
        ``zero=False``: the caller writes every byte of them at once (a copy, a
        migration's data), so their old contents need not be cleared first."""
        if n > self.free_frames:
            raise OutOfMemoryError(n - self.free_frames,
                                   f"out of system memory: {n} frames asked, {self.free_frames} free")
        take = min(n, self._nfree)
        recycled = self._free[self._nfree - take : self._nfree].copy()
        self._nfree -= take
        if self._nresident:
            self._nresident -= int(np.count_nonzero(self._resident[recycled]))
            self._resident[recycled] = False
        self._clear_stale(recycled, zero)
        fresh = np.arange(self._next_fresh, self._next_fresh + (n - take), dtype=np.int64)
        self._next_fresh += n - take
        pfns = np.concatenate([recycled, fresh]) if take else fresh
        self.refcount[pfns] = 1
        self.mapcount[pfns] = 0
        self.flags[pfns] = 0
        return pfns

    def _clear_stale(self, pfns: PfnArray, zero: bool) -> None:
        """Recycled ``pfns`` are handed out: zero those holding old contents."""
        stale = pfns[self._stale[pfns]]
        if not len(stale):
            return
        self._stale[stale] = False
        if zero:
            run = run_of(stale)
            self.data[run if run is not None else stale] = 0

    def alloc_contig(self, n: int, *, zero: bool = True) -> PfnArray | None:
        """A naturally aligned block of ``n`` (a power of two) zeroed frames, for a
        large folio or a huge page: carved from never-used frames while there are
        some, else an aligned block whose frames were all freed (the buddy
        allocator's merged block); None when there is none (the caller falls back to
        single pages, or the huge page fault fails). ``zero`` as for alloc."""
        start = (self._next_fresh + n - 1) & ~(n - 1)
        if start + n <= self.nframes:
            skipped = np.arange(self._next_fresh, start, dtype=np.int64)  # fresh, so already zero
            self._free[self._nfree : self._nfree + len(skipped)] = skipped
            self._nfree += len(skipped)
            self._next_fresh = start + n
        else:
            found = self._take_free_block(n)
            if found is None:
                return None
            start = found
            self._clear_stale(np.arange(start, start + n, dtype=np.int64), zero)
        pfns = np.arange(start, start + n, dtype=np.int64)
        self.refcount[pfns] = 1
        self.mapcount[pfns] = 0
        self.flags[pfns] = 0
        return pfns

    def _take_free_block(self, n: int) -> int | None:
        """Remove the first aligned block of ``n`` frames that are all free from the
        free list; its first frame, or None."""
        free = self._free[: self._nfree]
        if len(free) < n:
            return None
        full = np.flatnonzero(np.bincount(free // n) == n)
        if not len(full):
            return None
        start = int(full[0]) * n
        kept = free[(free < start) | (free >= start + n)]
        self._free[: len(kept)] = kept
        self._nfree = len(kept)
        if self._nresident:
            self._nresident -= int(np.count_nonzero(self._resident[start : start + n]))
            self._resident[start : start + n] = False
        return start

    @property
    def hugetlb_free(self) -> int:
        """Free hugetlb pages of the pool."""
        return self.hugetlb_pages - self.hugetlb_frames // HUGETLB_PAGES

    def hugetlb_reserve(self, n: int) -> bool:
        """Promise ``n`` free pool pages to a mapping (hugetlb_acct_memory): False, and
        nothing promised, when fewer are free that no one was promised."""
        if n > self.hugetlb_free - self.hugetlb_reserved:
            return False
        self.hugetlb_reserved += n
        return True

    def hugetlb_unreserve(self, n: int) -> None:
        """Take back ``n`` promised pages that will not be faulted in."""
        if n > self.hugetlb_reserved:
            raise AssertionError("hugetlb reservation underflow")
        self.hugetlb_reserved -= n

    def alloc_hugetlb(self, reserved: bool = False) -> PfnArray | None:
        """One huge page from the pool: an aligned block of HUGETLB_PAGES zeroed frames
        marked PG_HUGETLB (refcount 1 each). ``reserved``: it is one of the promised
        pages (hugetlb_reserve), and the promise is kept by taking it; otherwise only
        a page no one was promised is taken. None when there is none (or no RAM for
        it). It goes back to the pool when its frames' last references are put."""
        if not reserved and self.hugetlb_free - self.hugetlb_reserved <= 0:
            return None
        frames = self.alloc_contig(HUGETLB_PAGES)
        if frames is not None:
            self.flags[frames] |= PG_HUGETLB
            self.hugetlb_frames += HUGETLB_PAGES
            if reserved:
                self.hugetlb_unreserve(1)
        return frames

    def get(self, pfns: PfnArray) -> None:
        """Take one reference on each frame (duplicates allowed)."""
        add_counts(self.refcount, pfns, 1)

    def put(self, pfns: PfnArray) -> None:
        """Drop one reference on each frame (duplicates allowed); free those at zero."""
        if len(pfns) == 0:
            return
        add_counts(self.refcount, pfns, -1)
        left = self.refcount[pfns]
        if (left < 0).any():
            raise AssertionError("frame refcount underflow")
        candidates = pfns[left == 0]
        if not len(candidates):
            return
        if len(candidates) == 1:  # one page (a fault's migration): nothing to sort or merge
            dead = candidates
        else:
            # Mark the dying frames, then collect them sorted and unique by scanning
            # their span: much cheaper than np.unique for large batches.
            self.refcount[candidates] = -1
            lo = int(candidates.min())
            dead = np.flatnonzero(self.refcount[lo : int(candidates.max()) + 1] == -1) + lo
            self.refcount[dead] = 0
        if (self.mapcount[dead] != 0).any():
            raise AssertionError("freeing a frame that is still mapped")
        self.locks.forget(dead)
        if self.hugetlb_frames:
            self.hugetlb_frames -= int(np.count_nonzero(self.flags[dead] & PG_HUGETLB))
        self.flags[dead] = 0
        device = dead >= self.nframes  # sorted: device frames come last
        if device.any():
            self.on_device_free(dead[device])
            dead = dead[~device]
        self._retire(dead)
        self._free[self._nfree : self._nfree + len(dead)] = dead
        self._nfree += len(dead)

    def _retire(self, pfns: PfnArray) -> None:
        """Freed frames (``pfns`` sorted and unique) keep their contents, marked
        stale (zeroed when handed out again, see alloc), while the resident free
        frames stay within ``resident_free_max``; long runs beyond that go back to
        the host (MADV_DONTNEED: they read as zero, and cost no memory)."""
        if len(pfns) < DONTNEED_MIN_RUN:  # no run can be long (a fault's single page)
            kept = pfns
        else:
            breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
            starts = np.concatenate(([0], breaks))
            lengths = np.diff(np.concatenate((starts, [len(pfns)])))
            long_runs = lengths >= DONTNEED_MIN_RUN
            budget = self.resident_free_max - self._nresident
            for s, n in zip(starts[long_runs].tolist(), lengths[long_runs].tolist(), strict=True):
                first = int(pfns[s])
                if n <= budget:  # kept resident: the next allocation faults nothing in
                    self._stale[first : first + n] = True
                    self._resident[first : first + n] = True
                    self._nresident += n
                    budget -= n
                else:
                    self._mem.madvise(mmap.MADV_DONTNEED, first * PAGE_SIZE, n * PAGE_SIZE)
            kept = pfns[np.repeat(~long_runs, lengths)]
        if len(kept):
            self._stale[kept] = True
            self._resident[kept] = True
            self._nresident += len(kept)

    # ---- mapping counts ----------------------------------------------------------
    def map(self, pfns: PfnArray) -> None:
        """Page-table entries were created for these frames (they already hold refs)."""
        add_counts(self.mapcount, pfns, 1)

    def unmap(self, pfns: PfnArray) -> None:
        add_counts(self.mapcount, pfns, -1)

    def mark_exclusive_if_mapped_once(self, pfns: PfnArray) -> None:
        """A migration's new anonymous frames ``pfns`` (system or coherent), mapped by
        now: one mapped once is its mapping's own (PageAnonExclusive), one mapped by
        several (fork shared its source) is not. The kernel carries the mark in the
        migration entry; hmmd keeps none for device-private pages, so a page mapped
        once after its fork's child went is taken as exclusive too."""
        self.flags[pfns[self.mapcount[pfns] == 1]] |= PG_ANON_EXCLUSIVE

    # ---- contents ----------------------------------------------------------------
    def copy(self, dst: PfnArray, src: PfnArray) -> None:
        self.data[dst] = self.data[src]

    def read(self, pfns: PfnArray) -> list[np.ndarray]:
        """The contents of ``pfns``, in order, as views of the frames, one per run of
        consecutive frames (for a message: it copies them once); when the frames are
        scattered (runs under 4 pages on average), one gathered copy instead. The
        views see later writes: use them before anything else runs."""
        if not len(pfns):
            return []
        breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
        if len(breaks) * 4 > len(pfns):
            return [self.data[pfns]]
        bounds = [0, *breaks.tolist(), len(pfns)]
        return [self.data[int(pfns[a]) : int(pfns[a]) + b - a] for a, b in zip(bounds, bounds[1:], strict=False)]

    def write(self, pfns: PfnArray, pages: Contents) -> None:
        """The frames ``pfns`` get ``pages`` (``len(pfns)`` pages of contents), in one
        memcpy (one per part) when the frames are a run, as recycled and fresh frames
        usually are."""
        run = run_of(pfns)
        if run is None:
            self.data[pfns] = page_rows(pages)
        elif isinstance(pages, Parts):
            pages.copy_into(self.data[run].reshape(-1))
        else:
            np.copyto(self.data[run], page_rows(pages))

    def read_into(self, pfns: PfnArray, out: np.ndarray) -> None:
        """Copy the contents of ``pfns`` into ``out`` (uint8, ``len(pfns) * PAGE_SIZE``
        bytes), in one copy whether or not the frames are contiguous."""
        dst = out.reshape(len(pfns), PAGE_SIZE)
        run = run_of(pfns)
        if run is not None:
            np.copyto(dst, self.data[run])
        else:
            np.take(self.data, pfns, axis=0, out=dst, mode="clip")  # "raise" would buffer: pfns are checked

    def is_device(self, pfns: PfnArray) -> np.ndarray:
        """Which of ``pfns`` are device-coherent frames."""
        return (pfns >= self.nframes) & (pfns < self.span)
