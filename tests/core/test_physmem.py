"""System RAM: freed frames read as zero whether they were zeroed in place or handed
back to the host, within the resident budget; page locks wake their waiters and only
release the locks they name."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np

from hmmd.core.physmem import DONTNEED_MIN_RUN, PG_LOCKED, PageLocks, Parts, PhysMem, distinct, page_rows

P = 4096


def filled(ram: PhysMem, n: int) -> np.ndarray:
    pfns = ram.alloc(n)
    ram.data[pfns] = 0x5A
    return pfns


def test_freed_frames_read_as_zero_when_handed_out_again() -> None:
    ram = PhysMem(64 * DONTNEED_MIN_RUN)  # 1 GiB: the budget is 1/16 of it, 4 runs
    assert ram.resident_free_max == 4 * DONTNEED_MIN_RUN
    runs = [filled(ram, DONTNEED_MIN_RUN) for _ in range(6)]
    for pfns in runs:
        ram.put(pfns)
    assert ram._nresident == 4 * DONTNEED_MIN_RUN  # two runs went back to the host
    kept, returned = np.concatenate(runs[:4]), np.concatenate(runs[4:])
    assert (ram.data[kept] == 0x5A).all()  # not cleared when freed...
    assert not ram.data[returned].any()  # (MADV_DONTNEED: zero, and no memory)
    again = ram.alloc(6 * DONTNEED_MIN_RUN)
    assert ram._nresident == 0 and not ram.data[again].any()  # ...but when handed out
    assert sorted(again.tolist()) == sorted(np.concatenate(runs).tolist())


def test_short_runs_are_recycled_first_and_zeroed_unless_overwritten() -> None:
    ram = PhysMem(4 * DONTNEED_MIN_RUN)
    pfns = filled(ram, 64)
    ram.put(pfns[::2])  # 32 runs of one frame
    assert ram._nresident == 32 and (ram.data[pfns] == 0x5A).all()
    got = ram.alloc(32)
    assert sorted(got.tolist()) == sorted(pfns[::2].tolist()) and ram._nresident == 0
    assert not ram.data[got].any() and (ram.data[pfns[1::2]] == 0x5A).all()
    # A caller that writes every byte (a copy, a migration's data) skips the clearing.
    ram.data[got] = 0x33
    ram.put(got)
    mine = ram.alloc(32, zero=False)
    assert sorted(mine.tolist()) == sorted(got.tolist()) and (ram.data[mine] == 0x33).all()
    ram.put(mine)  # and the next zeroing allocation still clears them
    assert not ram.data[ram.alloc(32)].any()


async def test_page_locks_wake_waiters_and_release_only_their_own() -> None:
    flags = np.zeros(16, dtype=np.uint8)
    locks = PageLocks(flags)
    a, b = object(), object()
    locks.lock(np.arange(8), a)
    locks.lock(np.arange(4, 12), b)  # 4..7 stay a's
    assert (flags[:12] & PG_LOCKED).all() and not (flags[12:] & PG_LOCKED).any()
    first = locks.tokens(np.arange(8), a)
    waiter = asyncio.ensure_future(locks.wait_unlocked(5))
    await asyncio.sleep(0)
    assert locks.unlock(np.arange(4, 8), b) == 0  # not b's
    assert locks.unlock(np.arange(4, 6), a) == 2
    await asyncio.wait_for(waiter, 1)
    locks.lock(np.array([4]), a)  # a new lock: the old tokens do not name it
    assert locks.unlock(np.arange(8), a, first) == 6  # 0..3 and 6..7
    assert locks.is_locked(4) and not (flags[[0, 1, 2, 3, 5, 6, 7]] & PG_LOCKED).any()
    waiter = asyncio.ensure_future(locks.wait_unlocked(9))
    await asyncio.sleep(0)
    locks.forget(np.array([9]))  # freed: the waiter goes on
    await asyncio.wait_for(waiter, 1)
    assert not locks.is_locked(9)
    locks.unlock_all(a)
    locks.unlock_all(b)
    assert not locks.held and not locks._waiters


def test_write_fills_runs_and_scattered_frames() -> None:
    ram = PhysMem(1024)
    pfns = ram.alloc(8)
    pages = np.arange(8 * P, dtype=np.uint32).astype(np.uint8).reshape(8, P)
    ram.write(pfns, pages)  # a run
    assert (ram.data[pfns] == pages).all()
    order = pfns[[5, 1, 7]]
    ram.write(order, pages[:3][::-1])  # scattered
    assert (ram.data[order] == pages[:3][::-1]).all()


def test_parts_are_written_as_they_came_whatever_their_bounds() -> None:
    """A stream's parts end anywhere (mid-page too) and are copied straight into a
    run of frames, or joined once for scattered frames."""
    ram = PhysMem(1024)
    pages = np.random.default_rng(7).integers(0, 256, (6, P), dtype=np.uint8)
    flat = pages.reshape(-1).tobytes()
    cuts = [0, 1, P - 3, 2 * P, 2 * P + 5, 5 * P + 1, 6 * P]
    pieces = [memoryview(flat)[a:b] for a, b in itertools.pairwise(cuts)]
    parts = Parts([bytes(pieces[0]), pieces[1], np.frombuffer(pieces[2], dtype=np.uint8), *pieces[3:]])
    assert len(parts) == 6 * P
    assert (page_rows(parts) == pages).all()
    run = ram.alloc(6)
    ram.write(run, parts)
    assert (ram.data[run] == pages).all()
    scattered = ram.alloc(12)[::-2]
    ram.write(scattered, parts)
    assert (ram.data[scattered] == pages).all()


def test_contiguous_blocks_are_found_again_among_freed_frames() -> None:
    """Once never-used frames run out, an aligned block whose frames were all freed is
    a block again (a long-running daemon keeps getting huge pages and THPs)."""
    n = 512
    ram = PhysMem(5 * n)  # frame 0 is the zero page: blocks at n, 2n, 3n, 4n
    blocks = [ram.alloc_contig(n) for _ in range(4)]
    assert ram.alloc_contig(n) is None and ram.free_frames == n - 1
    for _ in range(20):  # many more cycles than RAM has blocks
        for b in blocks:
            assert b is not None
            ram.data[b] = 0x5A
            ram.put(b)
        blocks = [ram.alloc_contig(n) for _ in range(4)]
        for b in blocks:
            assert b is not None and b[0] % n == 0 and (np.diff(b) == 1).all()
            assert not ram.data[b].any() and (ram.refcount[b] == 1).all()  # zeroed, taken
        assert ram.alloc_contig(n) is None and ram.free_frames == n - 1
    # A block with one frame still in use is not free; its other frames are.
    for b in blocks:
        assert b is not None
        ram.put(b[1:] if b is blocks[0] else b)
    singles = ram.alloc(ram.free_frames - 3 * n)  # all but three blocks' worth
    whole = [b for b in blocks[1:] if not np.isin(b, singles).any()]
    got = [ram.alloc_contig(n) for _ in range(len(whole) + 1)]
    assert got[-1] is None
    assert sorted(int(g[0]) for g in got[:-1] if g is not None) == sorted(int(b[0]) for b in whole)


def test_distinct_is_np_unique() -> None:
    rng = np.random.default_rng(1)
    for a in (np.zeros(0, dtype=np.int64), np.array([5]), np.arange(10, 20), np.array([3, 3, 3]),
              rng.integers(0, 50, 200), np.arange(100)[::-1].copy()):
        assert np.array_equal(distinct(a), np.unique(a))
