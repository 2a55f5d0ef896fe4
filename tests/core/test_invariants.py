"""The invariant checker: silent after real workloads, loud after each kind of
corruption it exists to catch."""

from __future__ import annotations

import numpy as np
import pytest

from hmm.abi import HMM_PFN_REQ_FAULT, MAP_ANONYMOUS, MAP_SHARED, O_CREAT, O_RDWR, PROT_READ
from hmmd.core.invariants import check_invariants
from hmmd.core.pagetable import PTE_PRESENT, pte_pfn
from hmmd.core.physmem import PG_ANON, PG_ANON_EXCLUSIVE

from .conftest import RW, Env, P, pattern
from .test_migrate import G, filled, make_g


@pytest.fixture
async def g() -> G:
    return await make_g()


async def workload(g: G) -> tuple[int, int]:
    """Anonymous, file and shared memory, a fork, a migration to the device and a
    range fault: every kind of count in use."""
    env, k, pid = g.env, g.k, g.p.pid
    a, _ = await filled(g, 16, 1)
    fd, _ = await k.open(pid, "/inv-file", O_CREAT | O_RDWR)
    await k.pwrite(pid, fd, 0, pattern(4, 2))
    f = await k.mmap(pid, 0, 4 * P, RW, MAP_SHARED, fd, 0)
    await env.read(f, 4 * P)
    s = await k.mmap(pid, 0, 4 * P, RW, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
    await env.write(s, pattern(4, 3))
    child = await k.fork(pid)
    await k.write(child.pid, a, b"x" * P)  # COW break in the child
    await g.to_device(a + 8 * P, a + 12 * P)
    await g.range_fault(a, a + 4 * P, HMM_PFN_REQ_FAULT, 0)
    await k.mprotect(pid, a, 2 * P, PROT_READ)
    return a, child.pid


async def test_silent_after_a_workload_and_after_teardown(g: G) -> None:
    a, child = await workload(g)
    assert check_invariants(g.k) == []
    await g.k.munmap(g.p.pid, a, 4 * P)
    await g.k.exit(child)
    assert check_invariants(g.k) == []
    await g.k.exit(g.p.pid)
    assert check_invariants(g.k) == []


async def test_reports_a_frame_refcount_and_mapcount_off_by_one(g: G) -> None:
    a, _ = await workload(g)
    pfn = int(pte_pfn(g.p.mm.pt.gather(a, a + P))[0])
    g.k.ram.refcount[pfn] += 1
    assert any(f"refcount of frame {pfn}" in m for m in check_invariants(g.k))
    g.k.ram.refcount[pfn] -= 1
    g.k.ram.mapcount[pfn] += 1
    assert any(f"mapcount of frame {pfn}" in m for m in check_invariants(g.k))


async def test_reports_an_anon_exclusive_mark_on_a_shared_or_file_page(g: G) -> None:
    a, _ = await filled(g, 1, 7)
    await g.k.fork(g.p.pid)
    pfn = int(pte_pfn(g.env.ptes(a, a + P))[0])
    g.k.ram.flags[pfn] |= PG_ANON_EXCLUSIVE
    assert any(f"frame {pfn} is marked anon-exclusive but mapped 2 times" in m for m in check_invariants(g.k))
    g.k.ram.flags[pfn] &= ~np.uint8(PG_ANON)
    assert any(f"frame {pfn} is marked anon-exclusive but is not anonymous" in m for m in check_invariants(g.k))


async def test_reports_a_lost_frame_and_wrong_rss(env: Env) -> None:
    a = await env.mmap(4)
    await env.write(a, pattern(4, 5))
    mm = env.p.mm
    ptes = mm.pt.gather(a, a + 4 * P)
    ptes[0] = 0  # the entry vanishes without its frame being put: a leak
    mm.pt.scatter(a, ptes)
    report = check_invariants(env.k)
    assert any("RSS of pid" in m for m in report)
    assert any("refcount of frame" in m for m in report)


async def test_reports_device_page_counts(g: G) -> None:
    a, _ = await workload(g)
    g.dev.pgmap.refcount[0] += 1  # type: ignore[union-attr]
    assert any("device" in m and "refcount" in m for m in check_invariants(g.k))


async def test_reports_a_bad_huge_mark_and_dma_rights(g: G) -> None:
    a, _ = await workload(g)
    g.p.mm.pt.huge.add(a >> 21)  # 4 KiB pages are not a PMD mapping
    assert any("PMD mapping" in m for m in check_invariants(g.k))
    g.p.mm.pt.huge.discard(a >> 21)
    g.dev.grants.readable[1] += 1
    assert any("DMA rights" in m for m in check_invariants(g.k))


async def test_reports_an_open_migration(g: G) -> None:
    a, _ = await filled(g, 4, 7)
    mig = await g.setup(a, a + 4 * P)
    assert any("migration(s) open" in m for m in check_invariants(g.k))
    g.k._end_migration(g.dev, mig, rollback=True)
    assert check_invariants(g.k) == []
    assert bool((g.p.mm.pt.gather(a, a + 4 * P) & PTE_PRESENT).all())
    assert np.array_equal(np.frombuffer(await g.env.read(a, 4 * P), dtype=np.uint8),
                          np.frombuffer(pattern(4, 7), dtype=np.uint8))
