"""Direct reclaim under memory pressure (HMM-SEMANTICS.md §1.1: CLEAR for "reclaim
and swap-out"): an allocation that finds too few free frames swaps pages out —
the oldest first, by a clock over the PTE young bits — after a CLEAR to every
mirror, and the operation goes on; ENOMEM, with nothing invalidated, when nothing
can go. Data survives every round trip through swap."""

from __future__ import annotations

import errno

import numpy as np

from hmm.abi import CLEAR_REFS_ALL, HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_PFN_VALID, Event
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import Kernel
from hmmd.core.pagetable import PTE_YOUNG, SWP_SWAP, pte_present, pte_swp_type
from hmmd.core.reclaim import SWAP_CLUSTER_MAX

from .conftest import Env, P, make_env, pattern, raises_errno
from .test_coherent import C, add_coherent, drain
from .test_migrate import make_g

RAM_PAGES = 128  # the kernel's RAM in these tests; its watermark is SWAP_CLUSTER_MAX pages


async def small_env(swap_pages: int = 1024) -> Env:
    return await make_env(Kernel(RAM_PAGES * P, swap_bytes=swap_pages * P))


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
    shortfall = 80 - env.k.ram.free_frames
    want = shortfall + SWAP_CLUSTER_MAX
    env.fake.take()
    b, bdata = await filled(env, 80, 2)  # does not fit: reclaim, then the write goes on
    # The clock from the start: the ten young pages passed over (and aged), the old ones taken.
    assert swapped(env, a, 80) == [False] * 10 + [True] * want + [False] * (70 - want)
    assert young(env, a, 10) == [False] * 10
    assert env.fake.take() == [(Event.CLEAR, a + 10 * P, a + (10 + want) * P)]  # before the pages went
    assert (env.k.reclaimer.stalls, env.k.reclaimer.reclaimed) == (1, want)
    assert env.k.swap.used == want and env.mm.swapents == want
    assert await env.read(b, 80 * P) == bdata
    assert check_invariants(env.k) == []


async def test_all_pages_young_the_second_sweep_takes_them_and_the_hand_moves_on() -> None:
    env = await small_env()
    a, data = await filled(env, 80, 3)  # just written: every page young
    want = 60 - env.k.ram.free_frames + SWAP_CLUSTER_MAX
    await filled(env, 60, 4)
    assert swapped(env, a, 80) == [True] * want + [False] * (80 - want)
    assert young(env, a + want * P, 80 - want) == [False] * (80 - want)  # the first sweep aged them all
    assert env.mm.reclaim_hand == a + want * P
    # The next reclaim starts where this one stopped, not at the first page again.
    await filled(env, env.k.ram.free_frames + 1, 5)
    more = 1 + SWAP_CLUSTER_MAX
    assert swapped(env, a, 80) == [True] * (want + more) + [False] * (80 - want - more)
    assert env.mm.reclaim_hand == a + (want + more) * P
    assert await env.read(a, 80 * P) == data  # swapped back in, which takes more out
    assert check_invariants(env.k) == []


async def test_without_room_in_swap_enomem_and_nothing_invalidated() -> None:
    env = await small_env(swap_pages=0)
    a, data = await filled(env, 100, 6)
    env.fake.take()
    b = await env.mmap(40)
    with raises_errno(errno.ENOMEM):
        await env.write(b, pattern(40, 7))
    assert env.fake.take() == []
    assert (env.k.reclaimer.stalls, env.k.reclaimer.reclaimed) == (1, 0)
    assert not any(swapped(env, a, 100)) and await env.read(a, 100 * P) == data
    assert check_invariants(env.k) == []


async def test_swap_filling_up_takes_what_fits_then_enomem() -> None:
    env = await small_env(swap_pages=50)
    a, data = await filled(env, 100, 8)
    b = await env.mmap(90)
    with raises_errno(errno.ENOMEM):  # 90 pages need more than the swap's 50 can free
        await env.write(b, pattern(90, 9))
    assert env.k.swap.used == 50 and sum(swapped(env, a, 100)) == 50
    assert await env.read(a, 50 * P) == data[: 50 * P]  # (swap-in frees slots, takes frames)
    assert check_invariants(env.k) == []


async def test_pinned_pages_stay() -> None:
    env = await small_env()
    a, data = await filled(env, 100, 10)
    pin = await env.k.pin_user_pages(env.p.pid, a, 100, write=False, longterm=False, hold=True)
    env.fake.take()
    c = await env.mmap(40)
    with raises_errno(errno.ENOMEM):
        await env.write(c, pattern(40, 11))
    assert env.fake.take() == [] and env.k.swap.used == 0
    env.k.unpin_user_pages(env.p.pid, pin)
    await env.write(c, pattern(40, 11))
    assert any(swapped(env, a, 100)) and await env.read(a, 100 * P) == data
    assert check_invariants(env.k) == []


async def test_pages_fork_shares_stay() -> None:
    env = await small_env()
    a, data = await filled(env, 100, 12)
    child = await env.k.fork(env.p.pid)  # every page mapped by two processes
    env.fake.take()
    c = await env.mmap(40)
    with raises_errno(errno.ENOMEM):
        await env.write(c, pattern(40, 13))
    assert env.fake.take() == [] and env.k.swap.used == 0
    await env.k.exit(child.pid)  # the parent's alone again: they may go
    await env.write(c, pattern(40, 13))
    assert any(swapped(env, a, 100)) and await env.read(a, 100 * P) == data
    assert check_invariants(env.k) == []


async def test_every_process_takes_its_turn() -> None:
    env = await small_env()
    other = env.k.spawn("other")
    a, adata = await filled(env, 45, 13)
    o = await env.mmap(45, pid=other.pid)
    odata = pattern(45, 14)
    await env.write(o, odata, pid=other.pid)
    free = env.k.ram.free_frames
    await filled(env, free + 1, 15)  # the first reclaim takes from the first process
    first = sum(swapped(env, a, 45))
    assert first == 1 + SWAP_CLUSTER_MAX
    await filled(env, env.k.ram.free_frames + 1, 16)  # the next one from the other
    assert sum(swapped(env, a, 45)) == first
    assert (pte_swp_type(env.ptes(o, o + 45 * P, other.mm)) == SWP_SWAP).sum() == 1 + SWAP_CLUSTER_MAX
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


async def test_a_write_larger_than_memory_fails_in_bounded_time() -> None:
    env = await small_env()
    a = await env.mmap(RAM_PAGES + 10)
    with raises_errno(errno.ENOMEM):
        await env.write(a, b"\1" * ((RAM_PAGES + 10) * P))
    assert env.k.reclaimer.stalls <= 16
    assert check_invariants(env.k) == []
    assert np.count_nonzero(env.k.ram.refcount[1:]) <= RAM_PAGES


async def coherent_pages_and_a_full_ram(npages: int, swap_pages: int) -> tuple[C, int, bytes, np.ndarray]:
    """A process with ``npages`` of its pages on a coherent device (which mirrors it)
    and every RAM frame taken by its other pages: (rig, address, contents, frames)."""
    k = Kernel(RAM_PAGES * P, coherent_bytes=64 * P, swap_bytes=swap_pages * P)
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
