"""Shared hugetlb mirrored across processes: a device (an SDK connection in this test
process) mirrors two processes of a real hmmd that share huge pages — a hugetlbfs
file under /dev/hugepages, and MAP_SHARED|MAP_ANONYMOUS|MAP_HUGETLB across fork.
Both mirrors see order-9 pages with the same frames and the data either process
wrote; truncate and munmap reach the device as CLEAR and UNMAP first."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest

from hmm.abi import (
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    MAP_ANONYMOUS,
    MAP_HUGETLB,
    MAP_SHARED,
    O_CREAT,
    O_RDWR,
    PAGE_SIZE,
    PMD_ORDER,
    PMD_SIZE,
    Event,
)
from hmm.admin import AdminClient
from hmm.device import DeviceConnection
from hmm.mirror import Mirror
from hmm.process import Proc, ProcessClient
from tests.e2e.recorder import Recorder, recording_device
from tests.procs import Program

P = PAGE_SIZE
H = PMD_SIZE // P


def pattern(npages: int, seed: int) -> bytes:
    return (np.arange(npages * P // 4, dtype=np.uint32) * 2654435761 + seed).astype(np.uint32).tobytes()


@pytest.fixture
async def device(hmmd: Program) -> AsyncIterator[tuple[DeviceConnection, Recorder, str]]:
    rec = Recorder(lambda mirror, rng: (mirror.pid, rng.event, rng.start, rng.end))
    async with recording_device(hmmd.address, "htlb", rec) as conn:
        yield conn, rec, conn.name


async def mirror_of(conn: DeviceConnection, proc: Proc, addr: int, npages: int) -> tuple[Mirror, np.ndarray]:
    """Mirror [addr, +npages) of ``proc`` and fault it in: the frames, checked to be
    order 9, valid and writable."""
    mirror = await conn.insert_notifier(proc.pid, addr, npages * P)
    async with mirror.fault(addr, addr + npages * P) as r:
        assert (r.orders == PMD_ORDER).all()
        assert (r.flags == HMM_PFN_VALID | HMM_PFN_WRITE).all()
        pfns = r.pfns.copy()
    assert (pfns[::H] % H == 0).all() and (np.diff(pfns.reshape(-1, H), axis=1) == 1).all()
    return mirror, pfns


async def settle(rec: Recorder, n: int) -> list[tuple[int, Event, int, int]]:
    """The invalidations, once ``n`` arrived (the acks precede the CPU call's reply,
    so they are there already; the wait only guards against scheduling)."""
    for _ in range(100):
        if len(rec.events) >= n:
            break
        await asyncio.sleep(0.01)
    return sorted(rec.take())


async def test_device_mirrors_a_hugetlbfs_file_shared_by_two_processes(
        cpu: ProcessClient, device: tuple[DeviceConnection, Recorder, str]) -> None:
    conn, rec, dev = device
    path = f"/dev/hugepages/e2e_{uuid.uuid4().hex[:8]}"
    a, b = await cpu.spawn("htlb-a"), await cpu.spawn("htlb-b")
    fa, _ = await a.open(path, O_CREAT | O_RDWR)
    fb, _ = await b.open(path, O_RDWR)
    await a.ftruncate(fa, 2 * PMD_SIZE)
    admin = AdminClient(cpu.channel)
    st0 = await admin.stats()
    ma = await a.mmap(2 * PMD_SIZE, flags=MAP_SHARED, fd=fa)
    mb = await b.mmap(2 * PMD_SIZE, flags=MAP_SHARED, fd=fb)
    st = await admin.stats()  # the file reserved its two huge pages once, for both mappings
    assert (st.hugetlb_reserved, st.hugetlb_free) == (st0.hugetlb_reserved + 2, st0.hugetlb_free)
    await a.write(ma, pattern(2 * H, 1))
    st = await admin.stats()  # faulted in: taken from the pool, no longer only promised
    assert (st.hugetlb_reserved, st.hugetlb_free) == (st0.hugetlb_reserved, st0.hugetlb_free - 2)
    for p in (a, b):
        await p.open(f"/dev/{dev}")
    _, pa = await mirror_of(conn, a, ma, 2 * H)
    _, pb = await mirror_of(conn, b, mb, 2 * H)
    assert (pa == pb).all()  # one page cache: the same frames in both
    assert await conn.dma_read(pb) == pattern(2 * H, 1)
    await b.write(mb + PMD_SIZE, pattern(H, 2))  # B's store, through the frames A maps too
    assert await conn.dma_read(pa[H:]) == pattern(H, 2)
    assert await a.pread(fa, PMD_SIZE, P) == pattern(1, 2)
    status = await b.status()
    assert "ht" in next(m for m in status.maps if m.start == mb).flags
    # Hugetlb memory counts as HugetlbPages, not rss (b maps both huge pages by now).
    assert status.hugetlb_pages == 2 * H and status.rss_file == status.rss_shmem == 0

    await a.ftruncate(fa, PMD_SIZE)  # the second huge page leaves both mappings
    assert await settle(rec, 2) == sorted([(a.pid, Event.CLEAR, ma + PMD_SIZE, ma + 2 * PMD_SIZE),
                                           (b.pid, Event.CLEAR, mb + PMD_SIZE, mb + 2 * PMD_SIZE)])
    await b.munmap(mb, PMD_SIZE)
    assert await settle(rec, 1) == [(b.pid, Event.UNMAP, mb, mb + PMD_SIZE)]
    assert await a.read(ma, 2 * P) == pattern(2 * H, 1)[: 2 * P]

    await a.ftruncate(fa, 0)  # give the pool its pages back
    for p in (a, b):
        await p.exit()
    assert await AdminClient(cpu.channel).check_invariants() == []


async def test_device_mirrors_shared_anonymous_hugetlb_across_fork(
        cpu: ProcessClient, device: tuple[DeviceConnection, Recorder, str]) -> None:
    conn, rec, dev = device
    parent = await cpu.spawn("htlb-parent")
    await parent.open(f"/dev/{dev}")
    m = await parent.mmap(PMD_SIZE, flags=MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB)
    await parent.write(m, pattern(H, 3))
    child = await parent.fork()  # inherits the open device
    await child.write(m + 5 * P, pattern(1, 4))  # shared: no copy-on-write
    assert await parent.read(m + 5 * P, P) == pattern(1, 4)
    _, pp = await mirror_of(conn, parent, m, H)
    _, pc = await mirror_of(conn, child, m, H)
    assert (pp == pc).all()
    expected = bytearray(pattern(H, 3))
    expected[5 * P : 6 * P] = pattern(1, 4)
    assert await conn.dma_read(pc) == bytes(expected)

    await child.exit()
    await settle(rec, 2)  # the child's RELEASE and UNMAP
    await parent.munmap(m, PMD_SIZE)
    assert await settle(rec, 1) == [(parent.pid, Event.UNMAP, m, m + PMD_SIZE)]
    await parent.exit()
    assert await AdminClient(cpu.channel).check_invariants() == []
