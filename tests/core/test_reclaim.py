"""Direct reclaim under memory pressure (HMM-SEMANTICS.md §1.1: CLEAR for "reclaim
and swap-out"): an allocation that finds too few free frames swaps pages out —
the oldest first, by a clock over the PTE young bits — after a CLEAR to every
mirror, and the operation goes on; ENOMEM, with nothing invalidated, when nothing
can go. Data survives every round trip through swap."""

from __future__ import annotations

import errno

import numpy as np

from hmm.abi import (
    CLEAR_REFS_ALL,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    MADV_COLD,
    MADV_HUGEPAGE,
    MAP_FIXED,
    MAP_HUGETLB,
    PMD_SIZE,
    Event,
)
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import Kernel
from hmmd.core.pagetable import PTE_YOUNG, SWP_SWAP, pte_pfn, pte_present, pte_swp_type
from hmmd.core.reclaim import SWAP_CLUSTER_MAX, shrink

from .conftest import ANON, Env, P, make_env, pattern, raises_errno
from .test_coherent import C, add_coherent, drain
from .test_migrate import make_g
from .test_thp import H

RAM_PAGES = 128  # the kernel's RAM in these tests; its watermark is SWAP_CLUSTER_MAX pages


async def small_env(swap_pages: int = 1024, oom_killer: bool = True) -> Env:
    return await make_env(Kernel(RAM_PAGES * P, swap_bytes=swap_pages * P, oom_killer=oom_killer))


async def filled(env: Env, npages: int, seed: int) -> tuple[int, bytes]:
    a = await env.mmap(npages)
    data = pattern(npages, seed)
    await env.write(a, data)
    return a, data


def swapped(env: Env, addr: int, npages: int) -> list[bool]:
    return (pte_swp_type(env.ptes(addr, addr + npages * P)) == SWP_SWAP).tolist()


def young(env: Env, addr: int, npages: int) -> list[bool]:
    return ((env.ptes(addr, addr + npages * P) & PTE_YOUNG) != 0).tolist()


async def test_pressure_swaps_out_the_pages_not_used_lately_after_a_clear() -> None:
    env = await small_env()
    a, data = await filled(env, 80, 1)
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_ALL)  # every page old ...
    assert await env.read(a, 10 * P) == data[: 10 * P]  # ... but the first ten, used again
    env.fake.take()
    b, bdata = await filled(env, 80, 2)  # does not fit: reclaim, and the write goes on
    # The clock from the start: b's new pages and a's first ten are young, passed over
    # (and aged); the old ones after them are taken, in order.
    k = env.k.reclaimer.reclaimed
    assert k >= 80 - 47 and env.k.reclaimer.stalls >= 1
    assert swapped(env, a, 80) == [False] * 10 + [True] * k + [False] * (70 - k)
    assert young(env, a, 10) == [False] * 10
    clears = env.fake.take()  # each run of them invalidated before it went, nothing else
    assert {e for e, _, _ in clears} == {Event.CLEAR} and sum(end - start for _, start, end in clears) == k * P
    assert min(start for _, start, _ in clears) == a + 10 * P and max(end for _, _, end in clears) == a + (10 + k) * P
    assert env.k.swap.used == k and env.mm.swapents == k
    assert await env.read(b, 80 * P) == bdata and await env.read(a, 80 * P) == data
    assert check_invariants(env.k) == []


async def test_the_clock_ages_young_pages_takes_old_ones_and_moves_on() -> None:
    env = await small_env()
    a, data = await filled(env, 80, 3)  # just written: every page young
    assert await shrink(env.mm, 10) == 0  # a whole sweep: every page aged, none taken
    assert young(env, a, 80) == [False] * 80 and env.mm.reclaim_hand == 0
    assert await shrink(env.mm, 10) == 10  # now the first ten go
    assert swapped(env, a, 80) == [True] * 10 + [False] * 70 and env.mm.reclaim_hand == a + 10 * P
    assert await env.read(a + 10 * P, 2 * P) == data[10 * P : 12 * P]  # used again: a second chance
    assert await shrink(env.mm, 5) == 5  # from the hand on, the two young pages passed over
    assert swapped(env, a, 20) == [True] * 10 + [False] * 2 + [True] * 5 + [False] * 3
    assert young(env, a + 10 * P, 2) == [False] * 2 and env.mm.reclaim_hand == a + 17 * P
    assert await shrink(env.mm, 100) == 80 - 15  # every page left: old by now
    assert await env.read(a, 80 * P) == data
    assert check_invariants(env.k) == []


async def test_without_room_in_swap_enomem_and_nothing_invalidated() -> None:
    env = await small_env(swap_pages=0, oom_killer=False)  # (with it: test_oom.py)
    a, data = await filled(env, 100, 6)
    env.fake.take()
    b = await env.mmap(40)
    with raises_errno(errno.ENOMEM):
        await env.write(b, pattern(40, 7))
    assert env.fake.take() == []
    assert (env.k.reclaimer.stalls, env.k.reclaimer.reclaimed) == (1, 0)
    assert not any(swapped(env, a, 100)) and await env.read(a, 100 * P) == data
    assert check_invariants(env.k) == []


async def test_a_write_larger_than_free_memory_swaps_its_own_first_pages_out() -> None:
    env = await small_env()
    a = await env.mmap(200)
    data = pattern(200, 26)
    await env.write(a, data)  # in pieces, as a CPU's copy goes: the first ones go to swap for the last
    assert env.k.reclaimer.reclaimed and sum(swapped(env, a, 200)) == env.k.swap.used
    assert not any(swapped(env, a + 184 * P, 16))  # the last piece is in RAM
    assert await env.read(a, 200 * P) == data
    assert check_invariants(env.k) == []


async def test_swap_filling_up_takes_what_fits_then_enomem() -> None:
    env = await small_env(swap_pages=50, oom_killer=False)
    a, data = await filled(env, 100, 8)
    b = await env.mmap(90)
    with raises_errno(errno.ENOMEM):  # 90 pages need more than the swap's 50 can free
        await env.write(b, pattern(90, 9))
    assert env.k.swap.used == 50 and sum(swapped(env, a, 100)) + sum(swapped(env, b, 90)) == 50
    await env.k.munmap(env.p.pid, b, 90 * P)
    assert await env.read(a, 100 * P) == data
    assert check_invariants(env.k) == []


async def test_pinned_pages_stay() -> None:
    env = await small_env()
    a, data = await filled(env, 100, 10)
    pin = await env.k.pin_user_pages(env.p.pid, a, 100, write=False, longterm=False, hold=True)
    env.fake.take()
    c = await env.mmap(40)
    await env.write(c, pattern(40, 11))  # what it needs comes from its own pages
    assert not any(swapped(env, a, 100)) and any(swapped(env, c, 40))
    assert all(c <= start < end <= c + 40 * P for _, start, end in env.fake.take())
    env.k.unpin_user_pages(env.p.pid, pin)
    await filled(env, 40, 12)
    assert any(swapped(env, a, 100)) and await env.read(a, 100 * P) == data
    assert check_invariants(env.k) == []


async def test_a_page_fork_shares_goes_from_every_mapping_to_one_slot() -> None:
    env = await small_env()
    a, data = await filled(env, 100, 12)
    child = await env.k.fork(env.p.pid)  # every page mapped by two processes
    env.fake.take()
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_ALL)
    await env.k.clear_refs(child.pid, CLEAR_REFS_ALL)
    freed = await env.k.direct_reclaim(10)
    assert freed == 10 + SWAP_CLUSTER_MAX  # frames: each gone from both mappings
    mine, theirs = env.ptes(a, a + 100 * P), env.ptes(a, a + 100 * P, child.mm)
    gone = pte_swp_type(mine) == SWP_SWAP
    assert gone.sum() == freed and (gone == (pte_swp_type(theirs) == SWP_SWAP)).all()
    assert (pte_pfn(mine[gone]) == pte_pfn(theirs[gone])).all()  # one slot, named twice
    assert all(env.k.swap.refs(int(slot)) == 2 for slot in pte_pfn(mine[gone]))
    assert (env.mm.swapents, child.mm.swapents) == (freed, freed)
    assert {e for e, _, _ in env.fake.take()} == {Event.CLEAR}  # the parent's mirror heard of it
    assert await env.read(a, 100 * P) == data and await env.read(a, 100 * P, pid=child.pid) == data
    assert check_invariants(env.k) == []


async def test_a_page_fork_shares_stays_while_a_mapper_is_busy() -> None:
    env = await small_env()
    a, data = await filled(env, 100, 13)
    child = await env.k.fork(env.p.pid)
    b, _ = await filled(env, 10, 14)  # the parent's own pages
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_ALL)
    assert child.mm.lock.try_acquire_write()  # (an mmap, say, in progress in the child)
    try:
        assert await env.k.direct_reclaim(100) == 10  # only what the parent alone maps
    finally:
        await child.mm.lock.release_write()
    assert not any(swapped(env, a, 100)) and all(swapped(env, b, 10))
    assert await env.read(a, 100 * P, pid=child.pid) == data
    assert check_invariants(env.k) == []


async def test_every_process_takes_its_turn() -> None:
    env = await small_env()
    other = env.k.spawn("other")
    a, adata = await filled(env, 45, 13)
    o = await env.mmap(45, pid=other.pid)
    odata = pattern(45, 14)
    await env.write(o, odata, pid=other.pid)
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_ALL)
    await env.k.clear_refs(other.pid, CLEAR_REFS_ALL)
    assert await env.k.direct_reclaim(1) == 1 + SWAP_CLUSTER_MAX  # the first one from the first process
    assert sum(swapped(env, a, 45)) == 1 + SWAP_CLUSTER_MAX
    assert await env.k.direct_reclaim(1) == 1 + SWAP_CLUSTER_MAX  # the next one from the other
    assert sum(swapped(env, a, 45)) == 1 + SWAP_CLUSTER_MAX
    assert (pte_swp_type(env.ptes(o, o + 45 * P, other.mm)) == SWP_SWAP).sum() == 1 + SWAP_CLUSTER_MAX
    assert await env.k.direct_reclaim(20) == 2 * (45 - 1 - SWAP_CLUSTER_MAX)  # the first again, then the other
    assert sum(swapped(env, a, 45)) == 45
    assert await env.read(o, 45 * P, pid=other.pid) == odata and await env.read(a, 45 * P) == adata
    assert check_invariants(env.k) == []


async def test_a_range_fault_whose_interval_reclaim_invalidated_is_ebusy_then_works() -> None:
    env = await small_env()
    a, _ = await filled(env, 100, 17)
    b = await env.mmap(40)
    seq = await env.read_begin()
    with raises_errno(errno.EBUSY):  # reclaim's CLEAR of a hit this notifier during the fault
        await env.fault(b, b + 40 * P, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, seq=seq)
    r = await env.fault(b, b + 40 * P, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    assert (r.flags & HMM_PFN_VALID).all()
    assert check_invariants(env.k) == []


async def test_a_device_page_coming_home_reclaims_while_the_cpu_fault_holds_the_mmap_lock() -> None:
    g = await make_g(Kernel(RAM_PAGES * P, swap_bytes=1024 * P))
    env = g.env
    a, data = await filled(env, 20, 18)
    await g.to_device(a, a + 20 * P)  # 20 frames free again ...
    await filled(env, env.k.ram.free_frames, 19)  # ... and taken by the same process
    assert env.k.ram.free_frames == 0
    # The CPU read faults under the mmap lock; the device's copy home needs frames:
    # reclaim must take this very process's pages, with that lock held.
    assert await env.read(a, 20 * P) == data
    assert env.k.reclaimer.reclaimed >= 20 and len(g.gpu.m2r_calls) == 20
    assert pte_present(env.ptes(a, a + 20 * P)).all()
    assert check_invariants(env.k) == []


async def coherent_pages_and_a_full_ram(npages: int, swap_pages: int) -> tuple[C, int, bytes, np.ndarray]:
    """A process with ``npages`` of its pages on a coherent device (which mirrors it)
    and every RAM frame taken by its other pages: (rig, address, contents, frames).
    No OOM killer: what a full RAM does without it."""
    k = Kernel(RAM_PAGES * P, coherent_bytes=64 * P, swap_bytes=swap_pages * P, oom_killer=False)
    env = await make_env(k)
    coh, dev, sub = await add_coherent(k, "coh0", pid=env.p.pid)
    assert sub is not None
    c = C(env, coh, dev, sub)
    a, data = await filled(env, npages, 20)
    _, dst = await c.to_coherent(a, a + npages * P)
    await filled(env, k.ram.free_frames, 21)
    assert k.ram.free_frames == 0
    return c, a, data, dst


async def test_coherent_memory_going_away_into_a_full_ram() -> None:
    """A fenced coherent device's pages move home (as the kernel's eviction, which
    cannot fail): reclaim makes room; without swap they stay, intact, in its window."""
    for swap_pages in (1024, 0):
        c, a, data, dst = await coherent_pages_and_a_full_ram(32, swap_pages)
        k, env = c.k, c.env
        k.fence_device(c.dev, "test")
        await drain(k)
        pfns = env.pfns(a, a + 32 * P)
        if swap_pages:
            assert (pfns < k.ram.nframes).all() and c.pgmap not in k.devmem.coherent
            assert k.reclaimer.reclaimed >= 32
        else:  # nothing could make room: the pages stay where they were, the window waits
            assert (pfns == dst).all() and c.pgmap.dead and c.pgmap in k.devmem.coherent
        assert await env.read(a, 32 * P) == data
        await k.munmap(env.p.pid, a, 32 * P)
        assert c.pgmap not in k.devmem.coherent
        assert check_invariants(k) == []


async def test_a_longterm_pin_of_coherent_pages_without_room_changes_nothing() -> None:
    c, a, data, dst = await coherent_pages_and_a_full_ram(8, 0)
    k, env = c.k, c.env
    with raises_errno(errno.ENOMEM):  # FOLL_LONGTERM must move them to RAM first: no room
        await k.pin_user_pages(env.p.pid, a, 8, write=True, longterm=True, hold=True)
    assert (env.pfns(a, a + 8 * P) == dst).all() and not k.pins
    assert int(k.ram.pincount.sum()) == 0 and await env.read(a, 8 * P) == data
    assert check_invariants(k) == []


async def test_a_thp_is_split_and_its_pages_go() -> None:
    env = await make_env(Kernel(1024 * P, swap_bytes=1024 * P))
    a = await env.mmap(768, flags=ANON | MAP_FIXED, addr=1 << 30)  # a 2 MiB-aligned THP, then 256 pages
    await env.k.madvise(env.p.pid, a, 768 * P, MADV_HUGEPAGE)
    data = pattern(768, 24)
    await env.write(a, data)
    (huge,) = env.mm.pt.huge
    env.fake.take()
    await filled(env, env.k.ram.free_frames + 64, 25)
    assert huge not in env.mm.pt.huge and any(swapped(env, huge << 21, 512))  # split, then some pages went
    assert sum(swapped(env, a, 768)) == env.k.swap.used
    assert {e for e, _, _ in env.fake.take()} == {Event.CLEAR}
    assert await env.read(a, 768 * P) == data
    assert check_invariants(env.k) == []


async def test_madv_cold_pages_are_the_first_reclaim_takes() -> None:
    """madvise_cold(): the range's pages go to the inactive tail — their accessed bits
    cleared, without an invalidation — so the next reclaim takes them and passes over
    the pages used since; pages a fork child shares keep their bit until the parent's
    COW makes them its own."""
    env = await small_env()
    a, data = await filled(env, 80, 4)  # just written: every page young
    child = await env.k.fork(env.p.pid)
    await env.write(a + 60 * P, data[60 * P : 70 * P])  # COW: pages 60-69 the parent's alone again
    env.fake.take()
    await env.k.madvise(env.p.pid, a + 40 * P, 40 * P, MADV_COLD)
    assert env.fake.take() == []
    assert young(env, a, 80) == [True] * 60 + [False] * 10 + [True] * 10  # shared ones untouched
    assert await shrink(env.mm, 10) == 10  # from the hand (0): the cold pages, not a second pass
    assert swapped(env, a, 80) == [False] * 60 + [True] * 10 + [False] * 10
    assert young(env, a, 80) == [False] * 60 + [False] * 10 + [True] * 10  # (passed over: aged)
    assert await env.read(a, 80 * P) == data
    await env.k.exit(child.pid)
    assert check_invariants(env.k) == []


async def test_madv_cold_ages_a_thp_it_covers_whole_and_splits_one_it_cuts() -> None:
    env = await make_env(Kernel(64 << 20))
    a = await env.mmap(4 * H)
    await env.k.madvise(env.p.pid, a, 4 * H * P, MADV_HUGEPAGE)
    w = (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    data = pattern(2 * H, 5)
    await env.write(w, data)
    assert {w >> 21, (w >> 21) + 1} <= env.mm.pt.huge
    env.fake.take()
    await env.k.madvise(env.p.pid, w, PMD_SIZE + PMD_SIZE // 2, MADV_COLD)
    assert env.fake.take() == [(Event.CLEAR, w + PMD_SIZE, w + 2 * PMD_SIZE)]  # the cut one split, under a CLEAR
    assert (w >> 21) in env.mm.pt.huge and (w >> 21) + 1 not in env.mm.pt.huge
    assert young(env, w, 2 * H) == [False] * (H + H // 2) + [True] * (H // 2)
    assert await env.read(w, 2 * PMD_SIZE) == data
    assert check_invariants(env.k) == []


async def test_madv_cold_leaves_the_zero_page_and_refuses_hugetlb() -> None:
    env = await make_env(Kernel(64 << 20, hugetlb_pages=1))
    a = await env.mmap(8)
    assert await env.read(a, 8 * P) == bytes(8 * P)  # the zero page, mapped 8 times
    await env.k.madvise(env.p.pid, a, 8 * P, MADV_COLD)
    assert young(env, a, 8) == [True] * 8
    h = await env.mmap(H, flags=ANON | MAP_HUGETLB)
    with raises_errno(errno.EINVAL):
        await env.k.madvise(env.p.pid, h, H * P, MADV_COLD)
