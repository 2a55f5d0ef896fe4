"""rss counters (anon/file/shmem = AddressSpace.rss[0/1/2]), frame usage with no
leaks, and refcount/mapcount of pages shared by fork, COW and the page cache."""

from __future__ import annotations

import errno

from hmm.abi import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    MADV_DONTNEED,
    MAP_PRIVATE,
    MAP_SHARED,
    O_CREAT,
    O_RDWR,
    O_TMPFILE,
)
from hmmd.core.mm import RSS_ANON, RSS_FILE, RSS_SHMEM
from hmmd.core.physmem import ZERO_PFN

from .conftest import SHM, Env, P, pattern, raises_errno


def test_rss_indices() -> None:
    assert (RSS_ANON, RSS_FILE, RSS_SHMEM) == (0, 1, 2)


async def file_with(env: Env, path: str, npages: int, seed: int) -> int:
    fd, _ = await env.k.open(env.p.pid, path, O_CREAT | O_RDWR)
    await env.k.pwrite(env.p.pid, fd, 0, pattern(npages, seed))
    return fd


async def test_rss_after_faults_and_munmap(env: Env) -> None:
    mm = env.mm
    assert mm.rss == [0, 0, 0]
    anon = await env.mmap(4)
    await env.write(anon, pattern(3, 1))  # 3 pages written
    await env.read(anon + 3 * P, P)  # 1 zero page: not counted
    assert mm.rss == [3, 0, 0]
    fd = await file_with(env, "/f", 4, 2)
    shared_file = await env.mmap(2, flags=MAP_SHARED, fd=fd)
    await env.read(shared_file, 2 * P)
    assert mm.rss == [3, 2, 0]
    shm = await env.mmap(4, flags=SHM)
    await env.write(shm, pattern(4, 3))
    assert mm.rss == [3, 2, 4]
    private_file = await env.mmap(2, flags=MAP_PRIVATE, fd=fd, offset=2 * P)
    await env.read(private_file, 2 * P)  # page cache pages mapped read-only
    assert mm.rss == [3, 4, 4]
    await env.write(private_file, b"cow")  # COW: one file page becomes an anonymous copy
    assert mm.rss == [4, 3, 4]
    assert mm.rss_peak == 11
    await env.k.madvise(env.p.pid, anon, 2 * P, MADV_DONTNEED)
    assert mm.rss == [2, 3, 4]
    await env.k.munmap(env.p.pid, private_file, 2 * P)
    assert mm.rss == [1, 2, 4]
    await env.k.munmap(env.p.pid, shm, 4 * P)
    await env.k.munmap(env.p.pid, shared_file, 2 * P)
    await env.k.munmap(env.p.pid, anon, 4 * P)
    assert mm.rss == [0, 0, 0]
    assert mm.rss_peak == 11


async def test_range_fault_allocations_are_accounted(env: Env) -> None:
    a = await env.mmap(4)
    await env.fault(a, a + 4 * P, HMM_PFN_REQ_FAULT)
    assert env.mm.rss == [0, 0, 0]  # zero pages
    with raises_errno(errno.EBUSY):  # COW of the zero pages collides with our own notifier
        await env.fault(a, a + 2 * P, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    assert env.mm.rss == [2, 0, 0]  # the stretch ends with the range
    await env.fault(a, a + 2 * P, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    assert env.mm.rss == [2, 0, 0]
    await env.fault(a + 2 * P, a + 4 * P, HMM_PFN_REQ_FAULT)
    assert env.mm.rss == [2, 0, 0]


async def test_fork_child_rss(env: Env) -> None:
    anon = await env.mmap(4)
    await env.write(anon, pattern(3, 4))
    await env.read(anon + 3 * P, P)
    shm = await env.mmap(2, flags=SHM)
    await env.write(shm, pattern(2, 5))
    fd = await file_with(env, "/g", 2, 6)
    pf = await env.mmap(2, flags=MAP_PRIVATE, fd=fd)
    await env.read(pf, 2 * P)
    assert env.mm.rss == [3, 2, 2]
    child = await env.k.fork(env.p.pid)
    # Only VMAs with anonymous pages are copied; the rest fault again in the child.
    assert child.mm.rss == [3, 0, 0]
    assert env.mm.rss == [3, 2, 2]
    assert await env.read(shm, 2 * P, pid=child.pid) == pattern(2, 5)
    assert await env.read(pf, 2 * P, pid=child.pid) == pattern(2, 6)
    assert child.mm.rss == [3, 2, 2]
    await env.write(anon, b"c", pid=child.pid)  # COW in the child: still 3 anonymous pages
    assert child.mm.rss == [3, 2, 2]
    await env.k.exit(child.pid)
    assert child.mm.rss == [0, 0, 0]
    assert env.mm.rss == [3, 2, 2]


async def test_frames_return_to_baseline_after_munmap(env: Env) -> None:
    ram = env.k.ram
    base = ram.used_frames
    assert base == 1  # the zero page
    a = await env.mmap(8)
    await env.write(a, pattern(8, 7))
    assert ram.used_frames == base + 8
    await env.k.munmap(env.p.pid, a, 8 * P)
    assert ram.used_frames == base
    # Shared anonymous memory is freed with its last mapping.
    s = await env.mmap(4, flags=SHM)
    await env.write(s, pattern(4, 8))
    assert ram.used_frames == base + 4
    await env.k.munmap(env.p.pid, s, 2 * P)
    assert ram.used_frames == base + 4  # still mapped by the other half
    await env.k.munmap(env.p.pid, s + 2 * P, 2 * P)
    assert ram.used_frames == base
    # Zero pages cost nothing.
    z = await env.mmap(16)
    assert await env.read(z, 16 * P) == bytes(16 * P)
    assert ram.used_frames == base
    await env.k.munmap(env.p.pid, z, 16 * P)
    assert ram.used_frames == base


async def test_named_file_pages_stay_in_the_page_cache(env: Env) -> None:
    ram = env.k.ram
    base = ram.used_frames
    fd = await file_with(env, "/h", 3, 9)
    assert ram.used_frames == base + 3
    m = await env.mmap(3, flags=MAP_PRIVATE, fd=fd)
    await env.write(m, pattern(3, 10))  # three private copies
    assert ram.used_frames == base + 6
    await env.k.munmap(env.p.pid, m, 3 * P)
    assert ram.used_frames == base + 3
    await env.k.close(env.p.pid, fd)
    assert ram.used_frames == base + 3  # the file still exists
    await env.k.ftruncate(env.p.pid, (await env.k.open(env.p.pid, "/h", O_RDWR))[0], 0)
    assert ram.used_frames == base


async def test_unlinked_tmpfile_is_freed_with_its_last_mapping(env: Env) -> None:
    ram = env.k.ram
    base = ram.used_frames
    fd, _ = await env.k.open(env.p.pid, "/tmp", O_TMPFILE | O_RDWR)
    await env.k.ftruncate(env.p.pid, fd, 4 * P)
    m = await env.mmap(4, flags=MAP_SHARED, fd=fd)
    await env.write(m, pattern(4, 11))
    assert ram.used_frames == base + 4
    await env.k.close(env.p.pid, fd)
    assert await env.read(m, 4 * P) == pattern(4, 11)  # the mapping keeps it alive
    await env.k.munmap(env.p.pid, m, 4 * P)
    assert ram.used_frames == base


async def test_frames_return_to_baseline_after_exit(env: Env) -> None:
    ram = env.k.ram
    base = ram.used_frames
    a = await env.mmap(4)
    await env.write(a, pattern(4, 12))
    s = await env.mmap(2, flags=SHM)
    await env.write(s, pattern(2, 13))
    child = await env.k.fork(env.p.pid)
    await env.write(a, b"child", pid=child.pid)  # one private copy for the child
    await env.read(s, 2 * P, pid=child.pid)
    assert ram.used_frames == base + 4 + 1 + 2
    await env.k.exit(env.p.pid)
    assert env.mm.rss == [0, 0, 0]
    assert ram.used_frames == base + 4 + 2  # the child still maps its pages and the shmem
    assert await env.read(s, 2 * P, pid=child.pid) == pattern(2, 13)
    await env.k.exit(child.pid)
    assert child.mm.rss == [0, 0, 0]
    assert ram.used_frames == base


async def test_refcount_and_mapcount_through_fork_and_cow(env: Env) -> None:
    ram = env.k.ram
    a = await env.mmap(2)
    await env.write(a, pattern(2, 14))
    p0, p1 = env.pfns(a, a + 2 * P)
    assert (ram.refcount[p0], ram.mapcount[p0]) == (1, 1)
    child = await env.k.fork(env.p.pid)
    for pfn in (p0, p1):
        assert (ram.refcount[pfn], ram.mapcount[pfn]) == (2, 2)
    await env.write(a, b"parent")  # the parent breaks COW on page 0
    n0 = env.pfns(a, a + P)[0]
    assert n0 != p0
    assert (ram.refcount[n0], ram.mapcount[n0]) == (1, 1)
    assert (ram.refcount[p0], ram.mapcount[p0]) == (1, 1)  # now the child's alone
    assert env.pfns(a, a + P, child.mm)[0] == p0
    await env.write(a, b"child", pid=child.pid)  # sole owner: reused, no copy
    assert env.pfns(a, a + P, child.mm)[0] == p0
    assert (ram.refcount[p0], ram.mapcount[p0]) == (1, 1)
    used = ram.used_frames
    await env.k.exit(child.pid)
    assert (ram.refcount[p0], ram.mapcount[p0]) == (0, 0)
    assert (ram.refcount[p1], ram.mapcount[p1]) == (1, 1)
    assert ram.used_frames == used - 1
    assert await env.read(a, 2 * P) == b"parent" + pattern(2, 14)[6:]


async def test_refcount_of_shared_and_page_cache_pages(env: Env) -> None:
    ram = env.k.ram
    s = await env.mmap(1, flags=SHM)
    await env.write(s, b"shm")
    pfn = env.pfns(s, s + P)[0]
    assert (ram.refcount[pfn], ram.mapcount[pfn]) == (2, 1)  # page cache + one mapping
    child = await env.k.fork(env.p.pid)
    assert (ram.refcount[pfn], ram.mapcount[pfn]) == (2, 1)  # shared VMAs are not copied
    assert await env.read(s, 3, pid=child.pid) == b"shm"
    assert (ram.refcount[pfn], ram.mapcount[pfn]) == (3, 2)
    await env.k.munmap(env.p.pid, s, P)
    assert (ram.refcount[pfn], ram.mapcount[pfn]) == (2, 1)
    await env.k.exit(child.pid)
    assert (ram.refcount[pfn], ram.mapcount[pfn]) == (0, 0)


async def test_zero_page_is_never_counted(env: Env) -> None:
    ram = env.k.ram
    a = await env.mmap(8)
    await env.read(a, 8 * P)
    child = await env.k.fork(env.p.pid)
    await env.read(a, 8 * P, pid=child.pid)
    assert (ram.refcount[ZERO_PFN], ram.mapcount[ZERO_PFN]) == (1, 0)
    await env.k.exit(child.pid)
    await env.k.exit(env.p.pid)
    assert (ram.refcount[ZERO_PFN], ram.mapcount[ZERO_PFN]) == (1, 0)
    assert ram.used_frames == 1
