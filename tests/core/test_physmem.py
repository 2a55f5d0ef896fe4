"""System RAM: freed frames read as zero whether they were zeroed in place or handed
back to the host, within the resident budget; page locks wake their waiters and only
release the locks they name."""

from __future__ import annotations

import asyncio

import numpy as np

from hmmd.core.physmem import DONTNEED_MIN_RUN, PG_LOCKED, PageLocks, PhysMem

P = 4096


def filled(ram: PhysMem, n: int) -> np.ndarray:
    pfns = ram.alloc(n)
    ram.data[pfns] = 0x5A
    return pfns


def test_freed_frames_read_as_zero_in_and_beyond_the_resident_budget() -> None:
    ram = PhysMem(64 * DONTNEED_MIN_RUN)  # 1 GiB: the budget is 1/16 of it, 4 runs
    assert ram.resident_free_max == 4 * DONTNEED_MIN_RUN
    runs = [filled(ram, DONTNEED_MIN_RUN) for _ in range(6)]
    for pfns in runs:
        ram.put(pfns)
    assert ram._nresident == 4 * DONTNEED_MIN_RUN  # two runs went back to the host
    assert not ram.data[np.concatenate(runs)].any()
    again = ram.alloc(6 * DONTNEED_MIN_RUN)
    assert ram._nresident == 0 and not ram.data[again].any()
    assert sorted(again.tolist()) == sorted(np.concatenate(runs).tolist())


def test_short_runs_are_zeroed_and_recycled_first() -> None:
    ram = PhysMem(4 * DONTNEED_MIN_RUN)
    pfns = filled(ram, 64)
    ram.put(pfns[::2])  # 32 runs of one frame
    assert ram._nresident == 32 and not ram.data[pfns[::2]].any() and (ram.data[pfns[1::2]] == 0x5A).all()
    got = ram.alloc(32)
    assert sorted(got.tolist()) == sorted(pfns[::2].tolist()) and ram._nresident == 0


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
    assert not locks._held and not locks._waiters


def test_write_fills_runs_and_scattered_frames() -> None:
    ram = PhysMem(1024)
    pfns = ram.alloc(8)
    pages = np.arange(8 * P, dtype=np.uint32).astype(np.uint8).reshape(8, P)
    ram.write(pfns, pages)  # a run
    assert (ram.data[pfns] == pages).all()
    order = pfns[[5, 1, 7]]
    ram.write(order, pages[:3][::-1])  # scattered
    assert (ram.data[order] == pages[:3][::-1]).all()
