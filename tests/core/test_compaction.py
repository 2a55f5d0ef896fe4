"""Memory compaction (HMM-SEMANTICS.md §1.1: CLEAR for NUMA/compaction migration):
movable pages change frames under a mirror, which hears CLEAR first and loses its
DMA rights to the old frames; what cannot move stays put."""

from __future__ import annotations

import asyncio
import errno

import numpy as np

from hmm.abi import HMM_PFN_REQ_FAULT, MADV_HUGEPAGE, MAP_ANONYMOUS, MAP_SHARED, PMD_SIZE, Event
from hmmd.core.invariants import check_invariants

from .conftest import Env, P, pattern, raises_errno
from .test_migrate import make_g


async def filled(env: Env, npages: int, seed: int, **kw) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    a = await env.mmap(npages, **kw)
    data = pattern(npages, seed)
    await env.write(a, data)
    return a, data


async def test_pages_move_to_new_frames_after_a_clear_and_keep_their_bytes(env: Env) -> None:
    a, data = await filled(env, 6, 1)
    r = await env.fault(a, a + 6 * P, HMM_PFN_REQ_FAULT)
    before = r.pfns.copy()
    env.fake.take()

    assert await env.k.compact_memory() == 6

    assert env.fake.take() == [(Event.CLEAR, a, a + 6 * P)]
    after = env.pfns(a, a + 6 * P)
    assert not np.isin(after, before).any()
    with raises_errno(errno.EFAULT):  # the right to the old frame went with the CLEAR
        env.dma_read(before[:1])
    r = await env.fault(a, a + 6 * P, HMM_PFN_REQ_FAULT)
    assert (r.pfns == after).all() and env.dma_read(r.pfns) == data
    assert await env.read(a, 6 * P) == data
    assert env.mm.rss[0] == 6 and check_invariants(env.k) == []


async def test_what_cannot_move_stays(env: Env) -> None:
    shared_by_fork, _ = await filled(env, 2, 2)
    child = await env.k.fork(env.p.pid)
    pinned, _ = await filled(env, 1, 3)
    pin = await env.k.pin_user_pages(env.p.pid, pinned, 1, write=False, longterm=False, hold=True)
    zero = await env.mmap(1)
    await env.read(zero, 1)
    shm, _ = await filled(env, 2, 4, flags=MAP_SHARED | MAP_ANONYMOUS)
    thp_area = await env.mmap(2 * PMD_SIZE // P)
    thp = (thp_area + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    await env.k.madvise(env.p.pid, thp, PMD_SIZE, MADV_HUGEPAGE)
    await env.write(thp, b"t" * PMD_SIZE)
    fixed = {a: env.pfns(a, a + n * P) for a, n in ((shared_by_fork, 2), (pinned, 1), (zero, 1), (shm, 2),
                                                     (thp, PMD_SIZE // P))}
    await env.k.compact_memory()
    for a, pfns in fixed.items():
        assert (env.pfns(a, a + len(pfns) * P) == pfns).all(), hex(a)
    env.k.unpin_user_pages(env.p.pid, pin)
    await env.k.exit(child.pid)
    assert check_invariants(env.k) == []


async def test_a_busy_address_space_is_skipped(env: Env) -> None:
    a, _ = await filled(env, 2, 5)
    await env.mm.lock.acquire_read()  # a migration or a fault holds it
    assert await env.k.compact_memory() == 0
    await env.mm.lock.release_read()
    assert await env.k.compact_memory() == 2


async def test_device_pages_are_not_moved() -> None:
    g = await make_g()
    a = await g.env.mmap(4)
    await g.env.write(a, pattern(4, 6))
    await g.to_device(a, a + 2 * P)
    while g.env.mm.lock.locked:  # finalize hands the mmap lock back in the background
        await asyncio.sleep(0)
    devpfns = g.env.pfns(a, a + 2 * P)
    assert await g.k.compact_memory() == 2
    assert (g.env.pfns(a, a + 2 * P) == devpfns).all()
    assert await g.env.read(a, 4 * P) == pattern(4, 6)
    assert check_invariants(g.k) == []
