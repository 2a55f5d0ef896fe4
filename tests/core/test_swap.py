"""Reclaim to swap (MADV_PAGEOUT) and swap-in (HMM-SEMANTICS.md §1.1: CLEAR for
reclaim and swap-out; §1.2: a range fault faults a swap entry in): a mirror hears
CLEAR before a page leaves its frame, the contents come back on the next CPU access
or faulting range fault, a snapshot sees nothing there meanwhile, and every slot is
given back."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from hmm.abi import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_PAGEOUT,
    MAP_ANONYMOUS,
    MAP_HUGETLB,
    MAP_PRIVATE,
    PMD_SIZE,
    PROT_READ,
    Event,
)
from hmmd.core.gup import PM_PRESENT, PM_SWAP, pagemap
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import Kernel
from hmmd.core.pagetable import SWP_SWAP, pte_present, pte_swp_type

from .conftest import RAM_BYTES, Env, P, make_env, page, pattern, raises_errno
from .test_migrate import make_g


async def filled(env: Env, npages: int, seed: int, **kw) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    a = await env.mmap(npages, **kw)
    data = pattern(npages, seed)
    await env.write(a, data)
    return a, data


async def page_out(env: Env, addr: int, npages: int) -> None:
    await env.k.madvise(env.p.pid, addr, npages * P, MADV_PAGEOUT)


def swapped(env: Env, addr: int, npages: int, mm=None) -> np.ndarray:  # type: ignore[no-untyped-def]
    return pte_swp_type(env.ptes(addr, addr + npages * P, mm)) == SWP_SWAP


def frames_in_use(env: Env) -> int:
    return int(np.count_nonzero(env.k.ram.refcount[: env.k.ram.nframes]))


async def test_page_out_sends_clear_frees_the_frames_and_a_read_swaps_in(env: Env) -> None:
    a, data = await filled(env, 6, 1)
    before = frames_in_use(env)
    env.fake.take()
    await page_out(env, a + P, 3)
    assert env.fake.take() == [(Event.CLEAR, a + P, a + 4 * P)]
    assert swapped(env, a, 6).tolist() == [False, True, True, True, False, False]
    assert frames_in_use(env) == before - 3 and env.k.swap.used == 3
    assert (env.mm.rss[0], env.mm.swapents) == (3, 3)
    snap = await env.fault(a, a + 6 * P, snapshot=True)  # nothing there until it is swapped in
    assert (snap.flags[1:4] & HMM_PFN_VALID).tolist() == [0, 0, 0]
    entries = pagemap(env.mm, a, 6)
    assert ((entries[1:4] & PM_SWAP) != 0).all() and not (entries[1:4] & PM_PRESENT).any()

    assert await env.read(a, 6 * P) == data  # the CPU swaps them in, no event
    assert env.fake.take() == []
    assert not swapped(env, a, 6).any() and env.k.swap.used == 0
    assert (env.mm.rss[0], env.mm.swapents) == (6, 0)
    assert check_invariants(env.k) == []


async def test_a_faulting_range_fault_swaps_in_and_a_write_needs_no_copy(env: Env) -> None:
    a, data = await filled(env, 4, 2)
    await page_out(env, a, 4)
    r = await env.fault(a, a + 4 * P, HMM_PFN_REQ_FAULT)
    assert (r.flags & (HMM_PFN_VALID | HMM_PFN_WRITE) == HMM_PFN_VALID | HMM_PFN_WRITE).all()
    assert env.dma_read(r.pfns) == data
    env.fake.take()
    await env.write(a, b"\x07" * P)  # its own page, writable already: no copy, no event
    assert env.fake.take() == []
    assert check_invariants(env.k) == []


async def test_a_range_fault_stretch_swaps_in_pages_that_asked_for_nothing(env: Env) -> None:
    """The fault runs from the first page that needs one to the end of the walk chunk,
    handle_mm_fault on each page (hmm_vma_fault): swapped pages after it are swapped
    in and empty ones get the zero page, though only page 0 asked."""
    a, data = await filled(env, 4, 4)
    await page_out(env, a, 2)
    await env.k.madvise(env.p.pid, a + 3 * P, P, MADV_DONTNEED)
    req = bytes([HMM_PFN_REQ_FAULT, 0, 0, 0])
    r = await env.fault(a, a + 4 * P, 0, HMM_PFN_REQ_FAULT, req)
    vw = HMM_PFN_VALID | HMM_PFN_WRITE
    assert r.flags.tolist() == [vw, vw, vw, HMM_PFN_VALID]
    assert not swapped(env, a, 4).any() and env.k.swap.used == 0
    assert env.dma_read(r.pfns[:3]) == data[: 3 * P]
    assert check_invariants(env.k) == []


async def test_swap_in_of_a_read_only_mapping_maps_read_only(env: Env) -> None:
    a, data = await filled(env, 2, 3)
    await page_out(env, a, 2)
    await env.k.mprotect(env.p.pid, a, 2 * P, PROT_READ)
    with raises_errno(errno.EPERM):  # refused before anything is swapped in
        await env.fault(a, a + 2 * P, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    assert swapped(env, a, 2).all()
    assert await env.read(a, 2 * P) == data
    assert pte_present(env.ptes(a, a + 2 * P)).all()
    assert not (env.ptes(a, a + 2 * P) & 2).any()  # PTE_WRITE


async def test_what_pageout_leaves_alone(env: Env) -> None:
    """Shared after fork, pinned, the zero page, holes, device pages: only pages
    mapped once and held by nothing else go to swap (shared memory mapped once goes
    too: test_reclaim_files.py)."""
    a, _ = await filled(env, 2, 4)
    child = await env.k.fork(env.p.pid)
    pinned, _ = await filled(env, 1, 5)
    pin = await env.k.pin_user_pages(env.p.pid, pinned, 1, write=False, longterm=False, hold=True)
    zero = await env.mmap(2)
    await env.read(zero, P)
    env.fake.take()
    for addr, n in ((a, 2), (pinned, 1), (zero, 2)):
        await page_out(env, addr, n)
        assert not swapped(env, addr, n).any()
    assert env.k.swap.used == 0
    env.k.unpin_user_pages(env.p.pid, pin)
    await env.k.exit(child.pid)
    await page_out(env, a, 2)  # mapped once now
    assert swapped(env, a, 2).all()
    assert check_invariants(env.k) == []


async def test_fork_shares_the_slot_and_each_swaps_in_its_own_copy(env: Env) -> None:
    a, data = await filled(env, 3, 7)
    await page_out(env, a, 3)
    child = await env.k.fork(env.p.pid)
    assert swapped(env, a, 3, child.mm).all() and child.mm.swapents == 3
    assert env.k.swap.used == 3 and all(n == 2 for n in env.k.swap.slots().values())
    await env.write(a, b"\x01" * P)  # the parent's copy
    assert await env.read(a, 3 * P, pid=child.pid) == data  # the child's, from the slots
    assert await env.read(a, P) == b"\x01" * P
    assert env.k.swap.used == 2  # page 0: both swapped in; 1 and 2: the parent still names them
    assert check_invariants(env.k) == []
    await env.k.exit(child.pid)
    await env.k.exit(env.p.pid)
    assert env.k.swap.used == 0


async def test_munmap_dontneed_free_and_exit_give_the_slots_back(env: Env) -> None:
    a, _ = await filled(env, 8, 8)
    await page_out(env, a, 8)
    await env.k.munmap(env.p.pid, a, 2 * P)
    await env.k.madvise(env.p.pid, a + 2 * P, 2 * P, 4)  # MADV_DONTNEED
    await env.k.madvise(env.p.pid, a + 4 * P, 2 * P, MADV_FREE)  # lazily freed: dropped
    assert env.k.swap.used == 2 and env.mm.swapents == 2
    assert await env.read(a + 2 * P, 4 * P) == bytes(4 * P)
    assert check_invariants(env.k) == []
    await env.k.exit(env.p.pid)
    assert env.k.swap.used == 0


async def test_mremap_carries_swap_entries(env: Env) -> None:
    a, data = await filled(env, 4, 9)
    await page_out(env, a, 4)
    b = await env.k.mremap(env.p.pid, a, 4 * P, 8 * P, 1, 0)  # MREMAP_MAYMOVE
    assert await env.read(b, 4 * P) == data
    assert check_invariants(env.k) == []


async def test_a_thp_is_split_and_paged_out(env: Env) -> None:
    a = await env.mmap(2 * PMD_SIZE // P)
    h = (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    await env.k.madvise(env.p.pid, h, PMD_SIZE, MADV_HUGEPAGE)
    data = pattern(PMD_SIZE // P, 10)
    await env.write(h, data)
    assert (h >> 21) in env.mm.pt.huge
    await page_out(env, h + PMD_SIZE // 2, PMD_SIZE // P // 2)
    assert (h >> 21) not in env.mm.pt.huge
    assert swapped(env, h, PMD_SIZE // P).sum() == PMD_SIZE // P // 2
    assert await env.read(h, PMD_SIZE) == data
    assert check_invariants(env.k) == []


async def test_hugetlb_is_einval_and_changes_nothing() -> None:
    env = await make_env(Kernel(RAM_BYTES, hugetlb_pages=1))
    a = await env.mmap(PMD_SIZE // P, flags=MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB)
    await env.write(a, b"x")
    with raises_errno(errno.EINVAL):
        await page_out(env, a, PMD_SIZE // P)
    assert await env.read(a, 1) == b"x"


async def test_a_full_swap_space_takes_what_fits() -> None:
    env = await make_env(Kernel(RAM_BYTES, swap_bytes=2 * P))
    a, data = await filled(env, 4, 11)
    await page_out(env, a, 4)
    assert swapped(env, a, 4).tolist() == [True, True, False, False]
    assert await env.read(a, 4 * P) == data
    assert check_invariants(env.k) == []


async def test_migration_leaves_swap_entries_and_device_pages_are_not_paged_out() -> None:
    g = await make_g()
    a = await g.env.mmap(4)
    await g.env.write(a, pattern(4, 12))
    await page_out(g.env, a, 2)
    mig, _ = await g.to_device(a, a + 4 * P)
    assert (mig.src_flags[:2] == 0).all()  # a swap entry is not collected
    assert swapped(g.env, a, 4).tolist() == [True, True, False, False]
    await page_out(g.env, a + 2 * P, 2)  # device-private entries: not reclaimable here
    assert not swapped(g.env, a + 2 * P, 2).any()
    assert await g.env.read(a, 4 * P) == pattern(4, 12)
    assert check_invariants(g.k) == []


@pytest.mark.parametrize("n", [1, 3])
async def test_soft_dirty_survives_swap(env: Env, n: int) -> None:
    a, _ = await filled(env, n, 13)
    await env.k.clear_refs(env.p.pid, 4)
    await env.write(a, b"y")  # page 0 dirty again
    await page_out(env, a, n)
    await env.read(a, n * P)
    dirty = (pagemap(env.mm, a, n) >> np.uint64(55)) & np.uint64(1)
    assert dirty.tolist() == [1] + [0] * (n - 1)
    assert page(await env.read(a, P), 0)[:1] == b"y"


async def test_an_oom_kill_gives_swap_slots_back_and_the_reaper_counts_resident_pages(env: Env) -> None:
    a, _ = await filled(env, 6, 14)
    await page_out(env, a, 4)
    reaped = await env.k.oom_kill(env.p.pid)
    assert reaped.complete and reaped.pages == 2  # resident pages; the swapped ones were not
    assert env.k.swap.used == 0
    assert check_invariants(env.k) == []
