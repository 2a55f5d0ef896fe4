"""A gigabyte of anonymous memory is range-faulted in well under a second, and a
terabyte of address space that maps a few pages costs what it maps."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np

from hmm.abi import (
    CLEAR_REFS_ALL,
    CLEAR_REFS_SOFT_DIRTY,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_PAGEOUT,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_READ,
)
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import Kernel
from hmmd.core.reclaim import shrink

from .conftest import P, make_env, pattern

NPAGES = 262_144  # 1 GiB
LIMIT_S = 2.0


async def test_one_gib_range_fault_cold_and_present() -> None:
    env = await make_env(Kernel((NPAGES + 4096) * P))
    ram = env.k.ram
    base = ram.used_frames
    a = await env.mmap(NPAGES)
    end = a + NPAGES * P

    t0 = time.perf_counter()
    res = await env.fault(a, end, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    cold = time.perf_counter() - t0
    assert (res.flags == HMM_PFN_VALID | HMM_PFN_WRITE).all()
    assert len(np.unique(res.pfns)) == NPAGES
    assert env.mm.rss == [NPAGES, 0, 0]
    assert ram.used_frames == base + NPAGES
    assert env.fake.take() == []

    t0 = time.perf_counter()
    res2 = await env.fault(a, end, HMM_PFN_REQ_FAULT)
    warm = time.perf_counter() - t0
    assert (res2.flags == HMM_PFN_VALID | HMM_PFN_WRITE).all()
    assert (res2.pfns == res.pfns).all()

    # The bytes are real at both ends and in the middle.
    idx = np.array([0, NPAGES // 2, NPAGES - 1])
    env.dma_write(res2.pfns[idx], pattern(3, 1))
    for i, j in enumerate(idx):
        assert await env.read(a + int(j) * P, P) == pattern(3, 1)[i * P : (i + 1) * P]

    t0 = time.perf_counter()
    await env.k.munmap(env.p.pid, a, NPAGES * P)
    unmap = time.perf_counter() - t0
    assert ram.used_frames == base
    assert env.mm.rss == [0, 0, 0]
    print(f"\n1 GiB range fault: cold write {cold:.3f} s, present {warm:.3f} s, munmap {unmap:.3f} s")
    assert cold < LIMIT_S, f"cold range fault took {cold:.3f} s"
    assert warm < LIMIT_S, f"present range fault took {warm:.3f} s"
    assert unmap < LIMIT_S, f"munmap took {unmap:.3f} s"


async def test_one_gib_read_fault_maps_the_zero_page_quickly() -> None:
    env = await make_env(Kernel(64 << 20))  # no frames are needed for zero pages
    a = await env.mmap(NPAGES)
    t0 = time.perf_counter()
    res = await env.fault(a, a + NPAGES * P, HMM_PFN_REQ_FAULT)
    cold = time.perf_counter() - t0
    assert (res.flags == HMM_PFN_VALID).all() and not res.pfns.any()
    assert env.k.ram.used_frames == 1
    print(f"\n1 GiB zero-page range fault: {cold:.3f} s")
    assert cold < LIMIT_S


async def test_a_terabyte_mapping_of_four_pages_costs_what_it_maps() -> None:
    """Every whole-range operation visits the populated page tables only: over 1 TiB a
    dense walk would allocate 2 GiB of PTEs (and did, in munmap and clear_refs)."""
    env = await make_env(Kernel(64 << 20))
    k, pid, tib = env.k, env.p.pid, 1 << 40
    a = await env.mmap(tib // P)
    for i in range(4):
        await env.write(a + (i << 30), b"x")
    tracemalloc.start()
    try:
        await k.clear_refs(pid, CLEAR_REFS_ALL)
        await k.clear_refs(pid, CLEAR_REFS_SOFT_DIRTY)
        assert await k.compact_memory() == 4
        assert await shrink(env.mm, 10) == 4  # (all four swapped out, then back in below)
        assert await env.read(a + (3 << 30), 1) == b"x"
        child = await k.fork(pid)
        await k.mprotect(pid, a, tib, PROT_READ)
        await k.madvise(pid, a, tib, MADV_FREE)
        await k.madvise(pid, a, tib, MADV_PAGEOUT)
        b = await k.mremap(pid, a, tib, tib, MREMAP_MAYMOVE | MREMAP_FIXED, 1 << 42)
        await k.madvise(pid, b, tib, MADV_DONTNEED)
        await k.munmap(child.pid, a, tib)
        await k.munmap(pid, b, tib)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
    assert check_invariants(k) == []
