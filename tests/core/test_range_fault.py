"""hmm_range_fault(): every row of the CPU-state table the core produces
(HMM-SEMANTICS.md §1.2), the request-flag rules, the fault stretch, sticky bits,
EBUSY and snapshots. Device-private, migration and exclusive rows come later."""

from __future__ import annotations

import errno

import numpy as np

from hmm.abi import (
    HMM_PFN_DMA_MAPPED,
    HMM_PFN_ERROR,
    HMM_PFN_P2PDMA,
    HMM_PFN_P2PDMA_BUS,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_SHARED,
    PROT_NONE,
    PROT_READ,
    PTRS_PER_PTE,
    Event,
)
from hmm.errors import KernelError
from hmmd.core.hmm import HmmResult
from hmmd.core.physmem import ZERO_PFN

from .conftest import ANON, RW, Env, P, pattern, present, raises_errno, writable

V, W, E = HMM_PFN_VALID, HMM_PFN_WRITE, HMM_PFN_ERROR
RF, RQW = HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE
BASE = 0x10_0000_0000  # 2 MiB aligned, far below the top-down allocations


def flags(res: HmmResult) -> list[int]:
    return [int(f) for f in res.flags]


def check_output(env: Env, res: HmmResult, start: int) -> None:
    """VALID pages report the CPU's frame; others report pfn 0; no large mappings."""
    n = len(res.flags)
    ptes = env.ptes(start, start + n * P)
    valid = (res.flags & V) != 0
    assert (res.pfns[valid] == (ptes[valid] >> np.uint64(12))).all()
    assert (present(ptes)[valid]).all()
    assert (res.pfns[~valid] == 0).all()
    assert (res.orders == 0).all()


async def fixed(env: Env, first: int, npages: int, prot: int = RW, flags: int = ANON) -> int:
    return await env.mmap(npages, prot=prot, flags=flags | MAP_FIXED, addr=BASE + first * P)


# ---- no VMA -------------------------------------------------------------------------------


async def test_hole_is_error_without_fault_and_efault_with_fault(env: Env) -> None:
    await fixed(env, 0, 2)
    await fixed(env, 4, 2)
    data = pattern(6, 1)
    await env.write(BASE, data[: 2 * P])
    await env.write(BASE + 4 * P, data[4 * P :])
    end = BASE + 6 * P

    res = await env.fault(BASE, end)
    assert flags(res) == [V | W, V | W, E, E, V | W, V | W]
    check_output(env, res, BASE)
    assert env.dma_read(res.pfns[[0, 1, 4, 5]]) == data[: 2 * P] + data[4 * P :]

    with raises_errno(errno.EFAULT):
        await env.fault(BASE, end, RF)
    # A fault asked only where there is a mapping is fine; the hole still reports ERROR.
    res = await env.fault(BASE, end, 0, RF, bytes([RF, RF, 0, 0, RF, RF]))
    assert flags(res) == [V | W, V | W, E, E, V | W, V | W]
    with raises_errno(errno.EFAULT):
        await env.fault(BASE, end, 0, RF, bytes([0, 0, 0, RF, 0, 0]))
    res = await env.fault(BASE + 2 * P, BASE + 4 * P)
    assert flags(res) == [E, E]


# ---- PROT_NONE --------------------------------------------------------------------------


async def test_prot_none_vma_is_error_for_the_whole_vma(env: Env) -> None:
    await fixed(env, 0, 6)
    data = pattern(6, 2)
    await env.write(BASE, data)
    await env.k.mprotect(env.p.pid, BASE + 2 * P, 3 * P, PROT_NONE)  # PTEs stay, VMA unreadable
    env.fake.take()
    end = BASE + 6 * P

    res = await env.fault(BASE, end)
    assert flags(res) == [V | W, V | W, E, E, E, V | W]
    check_output(env, res, BASE)
    with raises_errno(errno.EFAULT):
        await env.fault(BASE, end, RF)
    with raises_errno(errno.EFAULT):
        await env.fault(BASE, end, 0, RF, bytes([0, 0, 0, RF, 0, 0]))
    res = await env.fault(BASE, end, 0, RF, bytes([RF, RF, 0, 0, 0, RF]))
    assert flags(res) == [V | W, V | W, E, E, E, V | W]
    res = await env.fault(BASE, end, RF | RQW, snapshot=True)
    assert flags(res) == [V | W, V | W, E, E, E, V | W]
    assert env.fake.take() == []


async def test_unpopulated_prot_none_vma_is_error(env: Env) -> None:
    a = await env.mmap(3, prot=PROT_NONE)
    res = await env.fault(a, a + 3 * P)
    assert flags(res) == [E, E, E]
    with raises_errno(errno.EFAULT):
        await env.fault(a, a + 3 * P, RF)
    assert not env.ptes(a, a + 3 * P).any()


# ---- empty PTE --------------------------------------------------------------------------


async def test_empty_pte_is_zero_without_fault(env: Env) -> None:
    a = await env.mmap(4)
    res = await env.fault(a, a + 4 * P)
    assert flags(res) == [0, 0, 0, 0]
    check_output(env, res, a)
    assert not env.ptes(a, a + 4 * P).any()


async def test_empty_pte_read_fault_maps_the_zero_page(env: Env) -> None:
    a = await env.mmap(4)
    res = await env.fault(a, a + 4 * P, RF)
    assert flags(res) == [V] * 4
    assert (res.pfns == ZERO_PFN).all()
    check_output(env, res, a)
    assert env.dma_read(res.pfns) == bytes(4 * P)
    assert env.mm.rss == [0, 0, 0]
    assert env.fake.take() == []


async def test_empty_pte_write_fault_allocates_writable_pages(env: Env) -> None:
    a = await env.mmap(4)
    res = await env.fault(a, a + 4 * P, RF | RQW)
    assert flags(res) == [V | W] * 4
    assert (res.pfns != ZERO_PFN).all() and len(set(res.pfns.tolist())) == 4
    check_output(env, res, a)
    assert env.fake.take() == []  # nothing was replaced: no invalidation, no EBUSY
    assert env.mm.rss == [4, 0, 0]
    data = pattern(4, 3)
    env.dma_write(res.pfns, data)  # the device writes through its grant ...
    assert await env.read(a, 4 * P) == data  # ... and the CPU sees the bytes


# ---- present pages ----------------------------------------------------------------------


async def test_present_writable_page_is_valid_write(env: Env) -> None:
    a = await env.mmap(3)
    data = pattern(3, 4)
    await env.write(a, data)
    for default in (0, RF, RF | RQW):
        res = await env.fault(a, a + 3 * P, default)
        assert flags(res) == [V | W] * 3
        check_output(env, res, a)
        assert env.dma_read(res.pfns) == data
    assert env.fake.take() == []


async def test_present_read_only_page_is_valid_and_write_request_reuses_it(env: Env) -> None:
    a = await env.mmap(3)
    data = pattern(3, 5)
    await env.write(a, data)
    before = env.pfns(a, a + 3 * P)
    await env.k.clear_refs(env.p.pid, 4)  # soft-dirty tracking write-protects the PTEs
    env.fake.take()
    res = await env.fault(a, a + 3 * P, RF)
    assert flags(res) == [V] * 3
    check_output(env, res, a)
    res = await env.fault(a, a + 3 * P, RF | RQW)
    assert flags(res) == [V | W] * 3
    assert (res.pfns == before).all()  # exclusive anonymous pages are reused, not copied
    assert env.fake.take() == []
    assert env.dma_read(res.pfns) == data


# ---- zero page --------------------------------------------------------------------------


async def test_zero_page_write_request_breaks_cow_and_collides_with_itself(env: Env) -> None:
    a = await env.mmap(1)
    assert await env.read(a, P) == bytes(P)
    env.fake.take()
    res = await env.fault(a, a + P)
    assert flags(res) == [V] and res.pfns[0] == ZERO_PFN
    res = await env.fault(a, a + P, RF)
    assert flags(res) == [V] and res.pfns[0] == ZERO_PFN

    s = await env.read_begin()
    with raises_errno(errno.EBUSY):  # the COW invalidated our own notifier
        await env.fault(a, a + P, RF | RQW, seq=s)
    assert env.fake.take() == [(Event.CLEAR, a, a + P)]
    assert env.pfns(a, a + P)[0] != ZERO_PFN and writable(env.ptes(a, a + P)).all()

    res = await env.fault(a, a + P, RF | RQW)  # fresh read_begin: succeeds
    assert flags(res) == [V | W] and res.pfns[0] != ZERO_PFN
    check_output(env, res, a)
    assert env.fake.take() == []
    assert env.dma_read(res.pfns) == bytes(P)
    env.dma_write(res.pfns, pattern(1, 6))
    assert await env.read(a, P) == pattern(1, 6)


# ---- read-only VMA ----------------------------------------------------------------------


async def test_write_request_on_read_only_vma_is_eperm(env: Env) -> None:
    a = await env.mmap(2, prot=PROT_READ)
    with raises_errno(errno.EPERM):
        await env.fault(a, a + 2 * P, RF | RQW)
    with raises_errno(errno.EPERM):
        await env.fault(a, a + 2 * P, RF, RQW, bytes([0, RQW]))
    res = await env.fault(a, a + 2 * P, RF)
    assert flags(res) == [V, V]
    with raises_errno(errno.EPERM):  # present but read-only: still EPERM
        await env.fault(a, a + 2 * P, RF | RQW)
    res = await env.fault(a, a + 2 * P, RF | RQW, snapshot=True)
    assert flags(res) == [V, V]
    assert env.fake.take() == []


# ---- request flags ----------------------------------------------------------------------


async def _read_only_ptes(env: Env, npages: int, seed: int) -> tuple[int, bytes, np.ndarray]:
    """A writable VMA whose pages are present, exclusive and write-protected."""
    a = await fixed(env, 0, npages)
    data = pattern(npages, seed)
    await env.write(a, data)
    await env.k.clear_refs(env.p.pid, 4)  # soft-dirty tracking write-protects them
    env.fake.take()
    return a, data, env.pfns(a, a + npages * P)


async def test_mask_without_write_ignores_per_page_write_requests(env: Env) -> None:
    a, data, pfns = await _read_only_ptes(env, 8, 7)
    req = bytes([0, 0, 0, RF | RQW, 0, 0, 0, 0])
    res = await env.fault(a, a + 8 * P, RF, 0, req)
    assert flags(res) == [V] * 8
    assert not writable(env.ptes(a, a + 8 * P)).any()


async def test_mask_with_write_makes_only_the_requested_stretch_writable(env: Env) -> None:
    a, data, pfns = await _read_only_ptes(env, 8, 8)
    req = bytes([0, 0, 0, RQW, 0, 0, 0, 0])
    res = await env.fault(a, a + 8 * P, RF, RQW, req)
    # Page 3 asked for write; the write fault runs from it to the end of the chunk.
    assert flags(res) == [V, V, V, V | W, V | W, V | W, V | W, V | W]
    assert (res.pfns == pfns).all()
    check_output(env, res, a)
    assert env.fake.take() == []
    assert env.dma_read(res.pfns) == data


async def test_per_page_fault_request_with_mask(env: Env) -> None:
    a = await fixed(env, 0, 8)
    await env.write(a, b"t")  # page 0 present: the page table exists
    res = await env.fault(a, a + 8 * P, 0, RF | RQW, bytes([0, 0, 0, 0, 0, 0, RF | RQW, 0]))
    assert flags(res) == [V | W, 0, 0, 0, 0, 0, V | W, V | W]
    check_output(env, res, a)


async def test_write_request_without_fault_request_faults_nothing(env: Env) -> None:
    a = await env.mmap(4)
    res = await env.fault(a, a + 4 * P, RQW)  # no REQ_FAULT anywhere
    assert flags(res) == [0] * 4
    res = await env.fault(a, a + 4 * P, 0, RF | RQW, bytes([RQW] * 4))
    assert flags(res) == [0] * 4
    res = await env.fault(a, a + 4 * P, 0, 0, bytes([RF | RQW] * 4))  # mask drops everything
    assert flags(res) == [0] * 4
    assert not env.ptes(a, a + 4 * P).any()


# ---- the fault stretch ------------------------------------------------------------------


async def test_fault_runs_from_the_first_needing_page_to_the_2mib_boundary(env: Env) -> None:
    n = 2 * PTRS_PER_PTE
    a = await fixed(env, 0, n)
    await env.write(a, b"A")
    await env.write(a + PTRS_PER_PTE * P, b"B")  # both 2 MiB chunks have a page table
    req = np.zeros(n, dtype=np.uint8)
    req[5] = RF
    res = await env.fault(a, a + n * P, 0, RF, req.tobytes())
    expect = np.zeros(n, dtype=np.uint8)
    expect[0] = V | W
    expect[5:PTRS_PER_PTE] = V  # faulted although they asked nothing: the zero page
    expect[PTRS_PER_PTE] = V | W
    assert (res.flags == expect).all()
    check_output(env, res, a)
    ptes = env.ptes(a, a + n * P)
    assert not ptes[1:5].any()
    assert present(ptes[5:PTRS_PER_PTE]).all() and (env.pfns(a + 5 * P, a + PTRS_PER_PTE * P) == ZERO_PFN).all()
    assert not ptes[PTRS_PER_PTE + 1 :].any()
    assert env.fake.take() == []


async def test_write_fault_stretch_allocates_to_the_2mib_boundary(env: Env) -> None:
    n = 2 * PTRS_PER_PTE
    a = await fixed(env, 0, n)
    await env.write(a, b"A")
    await env.write(a + PTRS_PER_PTE * P, b"B")
    assert env.mm.rss[0] == 2
    req = np.zeros(n, dtype=np.uint8)
    req[5] = RF | RQW
    res = await env.fault(a, a + n * P, 0, RF | RQW, req.tobytes())
    expect = np.zeros(n, dtype=np.uint8)
    expect[0] = V | W
    expect[5:PTRS_PER_PTE] = V | W
    expect[PTRS_PER_PTE] = V | W
    assert (res.flags == expect).all()
    check_output(env, res, a)
    assert env.mm.rss[0] == 2 + PTRS_PER_PTE - 5
    assert env.fake.take() == []


async def test_fault_stretch_stops_at_the_vma_end(env: Env) -> None:
    a = await fixed(env, 0, 4)
    b = await fixed(env, 4, 4, prot=PROT_READ)  # next VMA, same 2 MiB chunk
    await env.write(a, b"x")
    res = await env.fault(a, a + 8 * P, 0, RF, bytes([0, RF, 0, 0, 0, 0, 0, 0]))
    assert flags(res) == [V | W, V, V, V, 0, 0, 0, 0]
    assert not env.ptes(b, b + 4 * P).any()


async def test_fault_in_unpopulated_span_covers_the_whole_hole(env: Env) -> None:
    """No page table yet: hmm_vma_walk_hole faults the whole unpopulated span, from
    its start, with the combined need of its pages — pages before the one that
    asked are faulted too."""
    a = await fixed(env, 0, 16)
    res = await env.fault(a, a + 16 * P, 0, RF, bytes([0] * 6 + [RF] + [0] * 9))
    assert (res.flags == V).all()
    check_output(env, res, a)


async def test_hole_after_a_page_table_is_faulted_from_its_start(env: Env) -> None:
    """A populated 2 MiB chunk, then a chunk without a page table: the walk faults the
    first chunk from the needy page to its end, then the hole from its start."""
    n = 2 * PTRS_PER_PTE
    a = await fixed(env, 0, n)
    await env.write(a, b"A")  # only the first chunk has a page table
    req = np.zeros(n, dtype=np.uint8)
    req[PTRS_PER_PTE + 7] = RF | RQW  # one write request inside the hole
    res = await env.fault(a, a + n * P, 0, RF | RQW, req.tobytes())
    expect = np.zeros(n, dtype=np.uint8)
    expect[0] = V | W
    expect[PTRS_PER_PTE:] = V | W  # the whole hole, write-faulted (the combined need)
    assert (res.flags == expect).all()
    check_output(env, res, a)
    assert env.mm.rss[0] == 1 + PTRS_PER_PTE


# ---- sticky bits ------------------------------------------------------------------------


async def test_sticky_input_bits_are_copied_to_the_output(env: Env) -> None:
    await fixed(env, 0, 3)
    await env.write(BASE, pattern(3, 9))
    req = bytes([HMM_PFN_DMA_MAPPED, HMM_PFN_P2PDMA | RF, HMM_PFN_P2PDMA_BUS | HMM_PFN_DMA_MAPPED, HMM_PFN_DMA_MAPPED])
    for mask in (0, RF):  # whatever the mask says
        res = await env.fault(BASE, BASE + 4 * P, 0, mask, req)
        assert flags(res) == [
            V | W | HMM_PFN_DMA_MAPPED,
            V | W | HMM_PFN_P2PDMA,
            V | W | HMM_PFN_P2PDMA_BUS | HMM_PFN_DMA_MAPPED,
            E | HMM_PFN_DMA_MAPPED,  # page 3 is a hole
        ]
    res = await env.fault(BASE, BASE + 4 * P, 0, 0, req, snapshot=True)
    assert flags(res)[0] == V | W | HMM_PFN_DMA_MAPPED


async def test_sticky_bits_on_a_faulted_page(env: Env) -> None:
    a = await env.mmap(2)
    res = await env.fault(a, a + 2 * P, RF | RQW, 0, bytes([HMM_PFN_DMA_MAPPED, 0]))
    assert flags(res) == [V | W | HMM_PFN_DMA_MAPPED, V | W]


# ---- EBUSY ------------------------------------------------------------------------------


async def test_ebusy_when_the_notifier_was_invalidated_since_read_begin(env: Env) -> None:
    a = await env.mmap(4)
    await env.write(a, pattern(4, 10))
    other = await env.mmap(1)
    await env.write(other, b"o")
    s = await env.read_begin()
    await env.k.munmap(env.p.pid, other, P)  # outside the faulted range, inside the notifier
    for default in (0, RF):
        with raises_errno(errno.EBUSY):
            await env.fault(a, a + 4 * P, default, seq=s)
    s2 = await env.read_begin()
    assert s2 != s
    res = await env.fault(a, a + 4 * P, RF, seq=s2)
    assert flags(res) == [V | W] * 4


async def test_invalidation_outside_the_notifier_does_not_collide(env: Env) -> None:
    a = await env.mmap(2)
    await env.write(a, pattern(2, 11))
    other = await env.mmap(1)
    await env.write(other, b"o")
    narrow = await env.k.insert_notifier(env.dev, env.p.pid, a, 2 * P)
    s = await env.read_begin(narrow)
    await env.k.munmap(env.p.pid, other, P)
    res = await env.fault(a, a + 2 * P, RF, seq=s, sub=narrow)
    assert flags(res) == [V | W] * 2
    await env.k.madvise(env.p.pid, a, P, MADV_DONTNEED)  # inside the narrow notifier
    with raises_errno(errno.EBUSY):
        await env.fault(a, a + 2 * P, 0, seq=s, sub=narrow)


# ---- snapshot ---------------------------------------------------------------------------


async def test_snapshot_never_faults(env: Env) -> None:
    await fixed(env, 0, 2)  # empty
    await fixed(env, 2, 1)
    await env.read(BASE + 2 * P, 1)  # zero page
    await fixed(env, 3, 1)
    await env.write(BASE + 3 * P, b"w")  # present, writable
    await fixed(env, 4, 1, prot=PROT_READ)  # read-only, empty
    await fixed(env, 5, 1, prot=PROT_NONE)
    # page 6: hole
    await fixed(env, 7, 1, flags=MAP_SHARED | MAP_ANONYMOUS)  # shared, empty
    before = env.ptes(BASE, BASE + 8 * P)
    rss = list(env.mm.rss)
    env.fake.take()
    res = await env.fault(BASE, BASE + 8 * P, RF | RQW, RF | RQW, bytes([RF | RQW] * 8), snapshot=True)
    assert flags(res) == [0, 0, V, V | W, 0, E, E, 0]
    check_output(env, res, BASE)
    assert (env.ptes(BASE, BASE + 8 * P) == before).all()
    assert env.mm.rss == rss
    assert env.fake.take() == []


async def test_the_open_windows_own_sequence_is_refused(env: Env) -> None:
    """A device that range-faults with the cur_seq its Invalidate carried, while that
    window is open, gets EBUSY: read_begin never hands out an open window's sequence,
    and a result now could name pages the window is about to free (and grant DMA to
    them). The window here is a copy-on-write fault's, which holds only the mmap read
    lock, so the range fault can run inside it."""
    a = await fixed(env, 0, 1)
    assert await env.read(a, 1) == b"\0"  # the zero page
    outcome: list[object] = []

    async def during(sub, rng, cur_seq):  # type: ignore[no-untyped-def]
        try:  # (an exception here would be swallowed by the invalidation window)
            outcome.append(await env.fault(a, a + P, 0, seq=cur_seq))
        except KernelError as e:
            outcome.append(e.errno)

    env.fake.hook = during
    await env.write(a, b"x")  # COW of the zero page: CLEAR
    assert outcome == [errno.EBUSY]
