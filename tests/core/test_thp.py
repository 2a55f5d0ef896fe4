"""Transparent huge pages: MADV_HUGEPAGE faults map order-9 folios by PMD (the huge
zero page for reads), range faults report order 9, and partial changes, writes to
read-only huge mappings and migration split them — a split announced to mirrors by
a CLEAR over the whole 2 MiB (__split_huge_pmd). MADV_COLLAPSE builds one."""

from __future__ import annotations

import errno

import numpy as np

from hmm.abi import (
    CLEAR_REFS_SOFT_DIRTY,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    MADV_COLLAPSE,
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    MADV_PAGEOUT,
    MAP_ANONYMOUS,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PMD_ORDER,
    PMD_SIZE,
    PROT_READ,
    PTRS_PER_PTE,
    Event,
)
from hmmd.core.invariants import check_invariants
from hmmd.core.pagetable import PTE_WRITE, pte_pfn
from hmmd.core.physmem import ZERO_PFN

from .conftest import SHM, Env, P, pattern, raises_errno

H = PTRS_PER_PTE
C, PV, U, X = Event.CLEAR, Event.PROTECTION_VMA, Event.UNMAP, Event.EXCLUSIVE


async def thp_window(env: Env) -> int:
    """A 2 x PMD anonymous mapping advised MADV_HUGEPAGE; the aligned PMD inside it."""
    a = await env.mmap(2 * H)
    await env.k.madvise(env.p.pid, a, 2 * H * P, MADV_HUGEPAGE)
    return (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)


async def test_whole_2mib_anonymous_mappings_land_on_a_pmd_boundary(env: Env) -> None:
    """thp_get_unmapped_area(): a private anonymous mapping, or an mremap move, of whole
    2 MiB blocks with no address hinted is PMD-aligned (so MADV_HUGEPAGE can fault
    it as THPs from its first byte); other lengths, shared memory and a free hint
    are placed as before."""
    k, pid = env.k, env.p.pid
    await env.mmap(3)  # leaves the next free address unaligned
    a = await env.mmap(2 * H)
    assert a % PMD_SIZE == 0
    await k.madvise(pid, a, 2 * PMD_SIZE, MADV_HUGEPAGE)
    await env.write(a, b"thp")
    assert (a >> 21) in env.mm.pt.huge
    odd = await env.mmap(H + 1)
    assert odd == a - (H + 1) * P  # right below, top-down, on a page
    shared = await env.mmap(H, flags=SHM)
    assert shared == odd - PMD_SIZE
    hint = shared - 64 * PMD_SIZE + 5 * P
    assert await env.mmap(H, addr=hint) == hint
    small = await env.mmap(4)
    moved = await k.mremap(pid, small, 4 * P, PMD_SIZE, MREMAP_MAYMOVE, 0)
    assert moved % PMD_SIZE == 0


async def test_write_fault_maps_an_order_9_folio(env: Env) -> None:
    w = await thp_window(env)
    await env.write(w + 5, b"thp")
    assert (w >> 21) in env.mm.pt.huge
    pfns = pte_pfn(env.ptes(w, w + PMD_SIZE))
    assert pfns[0] % H == 0 and (np.diff(pfns) == 1).all()  # one aligned, contiguous folio
    assert env.mm.rss[0] == H
    res = await env.fault(w, w + PMD_SIZE, HMM_PFN_REQ_FAULT)
    assert (res.orders == PMD_ORDER).all() and (res.flags == HMM_PFN_VALID | HMM_PFN_WRITE).all()


async def test_mremap_moves_a_whole_thp_landing_aligned_and_splits_one_that_does_not(env: Env) -> None:
    """move_page_tables() moves a PMD the range holds whole when the move keeps 2 MiB
    alignment (move_huge_pmd): still one order-9 mapping there. Otherwise it splits."""
    k, pid = env.k, env.p.pid
    w = await thp_window(env)
    data = pattern(H, 33)
    await env.write(w, data)
    for target, kept in ((w + 8 * PMD_SIZE, True), (w + 16 * PMD_SIZE + P, False)):
        env.fake.take()
        got = await k.mremap(pid, w, PMD_SIZE, PMD_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, target)
        assert got == target and env.fake.take() == [(U, w, w + PMD_SIZE)]
        res = await env.fault(target, target + PMD_SIZE, HMM_PFN_REQ_FAULT)
        assert ((target >> 21) in env.mm.pt.huge) is kept
        assert (res.orders == (PMD_ORDER if kept else 0)).all()
        assert await env.read(target, PMD_SIZE) == data
        w = target


async def test_read_fault_maps_the_huge_zero_page_and_a_write_splits_it(env: Env) -> None:
    w = await thp_window(env)
    assert await env.read(w, 8) == bytes(8)
    assert (w >> 21) in env.mm.pt.huge
    assert (pte_pfn(env.ptes(w, w + PMD_SIZE)) == ZERO_PFN).all()
    assert env.mm.rss[0] == 0
    env.fake.take()
    await env.write(w + 3 * P, b"x")
    assert (w >> 21) not in env.mm.pt.huge
    assert env.fake.take() == [(Event.CLEAR, w, w + PMD_SIZE), (Event.CLEAR, w + 3 * P, w + 4 * P)]  # split, COW
    assert env.mm.rss[0] == 1
    assert await env.read(w + 3 * P, 1) == b"x"


async def test_partial_mprotect_splits_and_a_whole_one_keeps_it(env: Env) -> None:
    w = await thp_window(env)
    await env.write(w, b"a")
    await env.k.mprotect(env.p.pid, w, PMD_SIZE, PROT_READ)
    assert (w >> 21) in env.mm.pt.huge
    res = await env.fault(w, w + P, HMM_PFN_REQ_FAULT)
    assert list(res.flags) == [HMM_PFN_VALID] and list(res.orders) == [PMD_ORDER]
    await env.k.mprotect(env.p.pid, w, P, PROT_READ | 2)
    assert (w >> 21) not in env.mm.pt.huge


async def test_partial_munmap_splits_and_keeps_the_rest(env: Env) -> None:
    w = await thp_window(env)
    data = pattern(H, 3)
    await env.write(w, data)
    await env.k.munmap(env.p.pid, w + PMD_SIZE // 2, PMD_SIZE // 2)
    assert (w >> 21) not in env.mm.pt.huge
    assert await env.read(w, PMD_SIZE // 2) == data[: PMD_SIZE // 2]
    assert env.mm.rss[0] == H // 2


async def test_fork_then_write_splits_and_copies_one_page(env: Env) -> None:
    w = await thp_window(env)
    data = pattern(H, 4)
    await env.write(w, data)
    child = await env.k.fork(env.p.pid)
    await env.write(w, b"parent")
    assert (w >> 21) not in env.mm.pt.huge
    assert await env.read(w, PMD_SIZE, pid=child.pid) == data
    assert (await env.read(w, 6)) == b"parent"


async def test_a_write_to_a_read_only_thp_the_process_owns_alone_reuses_it_whole(env: Env) -> None:
    """do_huge_pmd_wp_page()'s reuse branch: after clear_refs write-protected it, and
    after the child it was shared with exited, a write makes the whole PMD writable
    again: no split, no copy, nothing for a mirror to hear."""
    w = await thp_window(env)
    data = pattern(H, 5)
    await env.write(w, data)
    frames = pte_pfn(env.ptes(w, w + PMD_SIZE))
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_SOFT_DIRTY)
    assert not (env.ptes(w, w + PMD_SIZE) & PTE_WRITE).any()
    child = await env.k.fork(env.p.pid)
    await env.k.exit(child.pid)
    env.fake.take()
    await env.write(w + 7 * P, b"reused")
    ptes = env.ptes(w, w + PMD_SIZE)
    assert (w >> 21) in env.mm.pt.huge and (ptes & PTE_WRITE).all() and (pte_pfn(ptes) == frames).all()
    assert env.fake.take() == [] and env.mm.rss[0] == H
    assert await env.read(w, PMD_SIZE) == data[: 7 * P] + b"reused" + data[7 * P + 6 :]
    res = await env.fault(w, w + PMD_SIZE, HMM_PFN_REQ_FAULT)
    assert (res.orders == PMD_ORDER).all() and (res.flags == HMM_PFN_VALID | HMM_PFN_WRITE).all()
    check_invariants(env.k)


async def test_each_split_is_a_clear_over_the_whole_pmd_and_a_whole_change_splits_nothing(env: Env) -> None:
    """What a mirror hears when a PMD leaf [w, w + 2 MiB) is split, and when it is not."""
    split = (C, 0, PMD_SIZE)

    async def heard(op, *, fresh: bool = True):  # type: ignore[no-untyped-def]
        w = await thp_window(env)
        if fresh:
            await env.write(w, pattern(H, 6))
        env.fake.take()
        await op(w)
        return [(e, s - w, t - w) for e, s, t in env.fake.take()]

    pid = env.p.pid
    assert await heard(lambda w: env.k.mprotect(pid, w + P, P, PROT_READ)) == [split, (PV, P, 2 * P)]
    assert await heard(lambda w: env.k.mprotect(pid, w, PMD_SIZE, PROT_READ)) == [(PV, 0, PMD_SIZE)]
    assert await heard(lambda w: env.k.munmap(pid, w, P)) == [split, (U, 0, P)]
    assert await heard(lambda w: env.k.munmap(pid, w, PMD_SIZE)) == [(U, 0, PMD_SIZE)]
    # MADV_DONTNEED and mremap split inside their own window, as zap_pmd_range and
    # move_page_tables do.
    assert await heard(lambda w: env.k.madvise(pid, w + P, P, MADV_DONTNEED)) == [(C, P, 2 * P), split]
    assert await heard(lambda w: env.k.madvise(pid, w, PMD_SIZE, MADV_DONTNEED)) == [(C, 0, PMD_SIZE)]
    assert await heard(lambda w: env.k.madvise(pid, w, P, MADV_NOHUGEPAGE)) == [split]
    assert await heard(lambda w: env.k.mremap(pid, w, P, P, MREMAP_MAYMOVE | MREMAP_FIXED, w + 4 * PMD_SIZE)) \
        == [(U, 4 * PMD_SIZE, 4 * PMD_SIZE + P), (U, 0, P), split]
    # Reclaim takes a THP as base pages; device-exclusive access is GUP's FOLL_SPLIT_PMD.
    assert await heard(lambda w: env.k.madvise(pid, w, PMD_SIZE, MADV_PAGEOUT)) == [split, (C, 0, PMD_SIZE)]
    locked: list[np.ndarray] = []

    async def exclusive(w: int) -> None:
        locked.append(await env.k.make_exclusive(env.dev, pid, w + P, 1, True))

    assert await heard(exclusive) == [split, (X, P, 2 * P)]
    env.k.unlock_pages(env.dev, locked[0].astype("<u8").tobytes())
    assert check_invariants(env.k) == []


async def test_madv_collapse_builds_a_thp_with_the_data(env: Env) -> None:
    a = await env.mmap(2 * H)
    w = (a + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
    data = pattern(H, 5)
    await env.write(w, data[: PMD_SIZE - 7 * P])  # the last 7 pages stay empty
    env.fake.take()
    await env.k.madvise(env.p.pid, w, PMD_SIZE, MADV_COLLAPSE)
    assert (w >> 21) in env.mm.pt.huge
    assert env.fake.take() == [(Event.CLEAR, w, w + PMD_SIZE)]
    assert await env.read(w, PMD_SIZE) == data[: PMD_SIZE - 7 * P] + bytes(7 * P)
    assert env.mm.rss[0] == H
    res = await env.fault(w, w + PMD_SIZE, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    assert (res.orders == PMD_ORDER).all()


async def test_madv_collapse_tries_every_span_and_fails_with_the_last_failure(env: Env) -> None:
    """madvise_collapse(): a span that cannot be collapsed does not stop the others;
    the call then fails with the last failure's errno — EINVAL for a span with
    nothing mapped, EAGAIN for one with a pinned page. EINVAL for a mapping advised
    MADV_NOHUGEPAGE."""
    k, pid = env.k, env.p.pid
    w = await env.mmap(4 * H)  # spans w (a pinned page), w + 2M (fine), w + 4M (empty)
    assert w % PMD_SIZE == 0
    await env.write(w, pattern(H, 8))
    await env.write(w + PMD_SIZE, pattern(H, 9))
    pin = await k.pin_user_pages(pid, w + 3 * P, 1, write=True, longterm=False, hold=True)
    with raises_errno(errno.EAGAIN):
        await k.madvise(pid, w, 2 * PMD_SIZE, MADV_COLLAPSE)
    assert (w >> 21) not in env.mm.pt.huge and ((w + PMD_SIZE) >> 21) in env.mm.pt.huge
    assert await env.read(w + PMD_SIZE, PMD_SIZE) == pattern(H, 9)
    k.unpin_user_pages(pid, pin)
    with raises_errno(errno.EINVAL):  # the span at w + 4M has nothing mapped
        await k.madvise(pid, w, 3 * PMD_SIZE, MADV_COLLAPSE)
    assert (w >> 21) in env.mm.pt.huge and await env.read(w, PMD_SIZE) == pattern(H, 8)
    await k.madvise(pid, w, PMD_SIZE, MADV_NOHUGEPAGE)
    with raises_errno(errno.EINVAL):
        await k.madvise(pid, w, PMD_SIZE, MADV_COLLAPSE)


async def test_madv_collapse_copies_pages_fork_shares_and_swaps_in_swapped_ones(env: Env) -> None:
    """As hpage_collapse_scan_pmd() for MADV_COLLAPSE (no max_ptes_shared or
    max_ptes_swap limit): the child keeps the shared pages and its references to
    the swap slots; this process gets one THP with every byte."""
    k, pid = env.k, env.p.pid
    w = await env.mmap(H)
    data = pattern(H, 11)
    await env.write(w, data)
    await k.madvise(pid, w + 10 * P, 3 * P, MADV_PAGEOUT)
    child = await k.fork(pid)
    assert env.mm.swapents == child.mm.swapents == 3 and set(k.swap.slots().values()) == {2}
    env.fake.take()
    await k.madvise(pid, w, PMD_SIZE, MADV_COLLAPSE)
    assert (w >> 21) in env.mm.pt.huge and env.fake.take() == [(Event.CLEAR, w, w + PMD_SIZE)]
    assert (env.mm.swapents, child.mm.swapents, env.mm.rss[0]) == (0, 3, H)
    assert set(k.swap.slots().values()) == {1} and check_invariants(k) == []
    assert await env.read(w, PMD_SIZE) == data and await env.read(w, PMD_SIZE, pid=child.pid) == data
    assert k.swap.used == 0 and check_invariants(k) == []


# ---- hugetlb ------------------------------------------------------------------------------------


async def test_hugetlb_mapping_is_aligned_faulted_whole_and_never_split() -> None:
    from hmm.abi import MAP_HUGETLB, MAP_PRIVATE
    from hmm.errors import KernelError
    from hmmd.core.kernel import Kernel

    k = Kernel(64 << 20, hugetlb_pages=2)
    p = k.spawn("htlb")
    a = await k.mmap(p.pid, 0, P, PROT_READ | 2, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0)
    assert a % PMD_SIZE == 0 and k.ram.hugetlb_free == 2  # rounded to one huge page, not yet faulted
    await k.write(p.pid, a + 5 * P, b"h")
    assert k.ram.hugetlb_free == 1 and p.mm.hugetlb_usage == H and (a >> 21) in p.mm.pt.huge
    pfns = pte_pfn(p.mm.pt.gather(a, a + PMD_SIZE))
    assert pfns[0] % H == 0 and (np.diff(pfns) == 1).all()
    for bad in (lambda: k.munmap(p.pid, a, P), lambda: k.mprotect(p.pid, a, P, PROT_READ)):
        try:
            await bad()
            raise AssertionError("a hugetlb mapping was cut inside a huge page")
        except KernelError as e:
            assert e.errno == 22  # EINVAL
    child = await k.fork(p.pid)
    await k.write(p.pid, a, b"P")  # copy-on-write copies the whole huge page
    assert await k.read(child.pid, a + 5 * P, 1) == b"h" and await k.read(child.pid, a, 1) == b"\0"
    assert k.ram.hugetlb_free == 0
    await k.write(child.pid, a, b"C")  # the child's page is its own now: no copy
    assert k.ram.hugetlb_free == 0 and await k.read(p.pid, a, 1) == b"P"
    try:
        await k.mmap(p.pid, 0, PMD_SIZE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0)
        raise AssertionError("mapped beyond the pool")
    except KernelError as e:
        assert e.errno == 12  # ENOMEM
    await k.exit(child.pid)
    await k.exit(p.pid)
    assert k.ram.hugetlb_free == 2 and k.ram.used_frames == 1


async def test_hugetlb_is_reported_at_pmd_order_and_refuses_migration(env: Env) -> None:
    from hmm.abi import MAP_HUGETLB, MAP_PRIVATE, MIGRATE_VMA_SELECT_SYSTEM

    env.k.ram.hugetlb_pages = 1
    a = await env.k.mmap(env.p.pid, 0, PMD_SIZE, PROT_READ | 2, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0)
    res = await env.fault(a, a + PMD_SIZE, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    assert (res.orders == PMD_ORDER).all() and (res.flags == HMM_PFN_VALID | HMM_PFN_WRITE).all()
    await env.k.mprotect(env.p.pid, a, PMD_SIZE, PROT_READ)
    res = await env.fault(a, a + PMD_SIZE, HMM_PFN_REQ_FAULT)
    assert (res.orders == PMD_ORDER).all() and (res.flags == HMM_PFN_VALID).all()
    with raises_errno(errno.EINVAL):  # migrate_vma_setup refuses hugetlb
        await env.k.migrate_setup(env.dev, env.p.pid, a, a + P, MIGRATE_VMA_SELECT_SYSTEM)
