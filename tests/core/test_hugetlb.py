"""Shared and file-backed hugetlb: MAP_SHARED|MAP_ANONYMOUS|MAP_HUGETLB (an unnamed
hugetlbfs file) and files under /dev/hugepages, whose page cache holds whole huge
pages from the pool. Shared mappings share the file's huge pages (across fork and
between processes), private ones copy a whole huge page on the first write; sizes
change in whole huge pages; truncate zaps mappings with CLEAR, and so does a hole
MADV_REMOVE punches (whole huge pages out, the ends zeroed); range faults report
order 9; migration and device-exclusive access refuse hugetlb; every huge page goes
back to the pool when its last user goes."""

from __future__ import annotations

import errno

import numpy as np

from hmm.abi import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    MADV_REMOVE,
    MAP_ANONYMOUS,
    MAP_HUGETLB,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
    MIGRATE_VMA_SELECT_SYSTEM,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    O_CREAT,
    O_RDONLY,
    O_RDWR,
    O_TMPFILE,
    PMD_ORDER,
    PMD_SIZE,
    PROT_READ,
    PTRS_PER_PTE,
    Event,
)
from hmmd.core.gup import PM_FILE, PM_PFRAME_MASK, PM_PRESENT
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import Kernel
from hmmd.core.physmem import PG_HUGETLB
from hmmd.core.vma import VM_HUGETLB

from .conftest import RAM_BYTES, RW, Env, P, make_env, pattern, raises_errno

H = PTRS_PER_PTE  # 4 KiB pages in a huge page
POOL = 4
SHARED_ANON = MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB


async def hugetlb_env() -> Env:
    return await make_env(Kernel(RAM_BYTES, hugetlb_pages=POOL))


def one_huge_page(env: Env, addr: int, mm=None) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The frames mapped at [addr, addr + 2 MiB), checked to be one aligned pool page
    mapped by a PMD."""
    pfns = env.pfns(addr, addr + PMD_SIZE, mm)
    assert pfns[0] % H == 0 and (np.diff(pfns) == 1).all()
    assert ((env.k.ram.flags[pfns] & PG_HUGETLB) != 0).all()
    assert (addr >> 21) in (mm or env.mm).pt.huge
    return pfns


async def hugetlbfs_file(env: Env, name: str, hpages: int, pid: int | None = None) -> int:
    fd, _ = await env.k.open(env.p.pid if pid is None else pid, f"/dev/hugepages/{name}", O_CREAT | O_RDWR)
    await env.k.ftruncate(env.p.pid if pid is None else pid, fd, hpages * PMD_SIZE)
    return fd


async def test_shared_anonymous_hugetlb_is_shared_across_fork_both_ways() -> None:
    env = await hugetlb_env()
    k = env.k
    a = await env.mmap(2 * H, flags=SHARED_ANON)
    assert a % PMD_SIZE == 0 and k.ram.hugetlb_free == POOL  # nothing taken before a fault
    vma = env.mm.vmas.find(a)
    assert vma is not None and vma.flags & VM_HUGETLB and vma.file is not None
    assert vma.file.name == "/anon_hugepage (deleted)"
    await env.write(a, pattern(4, 1))
    assert k.ram.hugetlb_free == POOL - 1
    parent_frames = one_huge_page(env, a)
    assert env.mm.rss == [0, 0, 0] and env.mm.hugetlb_usage == H  # HugetlbPages, never rss

    child = await k.fork(env.p.pid)
    assert await env.read(a, 4 * P, pid=child.pid) == pattern(4, 1)
    assert (one_huge_page(env, a, child.mm) == parent_frames).all()  # the same page, no copy
    await env.write(a + P, pattern(1, 2), pid=child.pid)  # the child writes, the parent sees it
    assert await env.read(a + P, P) == pattern(1, 2)
    await env.write(a + PMD_SIZE + 7 * P, pattern(1, 3))  # the parent faults the 2nd page, the child sees it
    assert await env.read(a + PMD_SIZE + 7 * P, P, pid=child.pid) == pattern(1, 3)
    assert (one_huge_page(env, a + PMD_SIZE, child.mm) == one_huge_page(env, a + PMD_SIZE)).all()
    assert k.ram.hugetlb_free == POOL - 2  # still one page per huge page: no COW
    assert check_invariants(k) == []

    await k.exit(child.pid)
    assert k.ram.hugetlb_free == POOL - 2 and await env.read(a + P, P) == pattern(1, 2)
    await k.munmap(env.p.pid, a, 2 * PMD_SIZE)  # the last mapping of the unnamed file
    assert k.ram.hugetlb_free == POOL and env.mm.hugetlb_usage == 0
    assert check_invariants(k) == []


async def test_shared_anonymous_hugetlb_needs_the_pool_at_mmap() -> None:
    env = await hugetlb_env()
    with raises_errno(errno.ENOMEM):
        await env.mmap((POOL + 1) * H, flags=SHARED_ANON)
    a = await env.mmap(POOL * H, flags=SHARED_ANON)
    for bad in (lambda: env.k.munmap(env.p.pid, a, P), lambda: env.k.mprotect(env.p.pid, a + P, P, PROT_READ)):
        with raises_errno(errno.EINVAL):  # only in whole huge pages
            await bad()
    await env.k.munmap(env.p.pid, a + PMD_SIZE, PMD_SIZE)
    assert env.mm.vmas.find(a + 2 * PMD_SIZE) is not None and env.mm.vmas.find(a + PMD_SIZE) is None


async def test_hugetlbfs_file_is_shared_between_processes_and_seen_by_pread() -> None:
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    fd = await hugetlbfs_file(env, "shared", 2)
    m = await env.mmap(2 * H, flags=MAP_SHARED, fd=fd)
    other = k.spawn("other")
    ofd, _ = await k.open(other.pid, "/dev/hugepages/shared", O_RDWR)
    om = await k.mmap(other.pid, 0, 2 * PMD_SIZE, RW, MAP_SHARED, ofd, 0)
    assert om % PMD_SIZE == 0 and other.mm.vmas.find(om).flags & VM_HUGETLB  # type: ignore[union-attr]

    await env.write(m + 3 * P, pattern(2, 4))
    assert await k.read(other.pid, om + 3 * P, 2 * P) == pattern(2, 4)
    await k.write(other.pid, om + PMD_SIZE, pattern(1, 5))
    assert await env.read(m + PMD_SIZE, P) == pattern(1, 5)
    assert await k.pread(pid, fd, 3 * P, 2 * P) == pattern(2, 4)
    assert await k.pread(pid, fd, PMD_SIZE, P) == pattern(1, 5)
    for h in (0, PMD_SIZE):
        assert (one_huge_page(env, m + h) == one_huge_page(env, om + h, other.mm)).all()
    assert k.ram.hugetlb_free == POOL - 2

    # pagemap reports the frames, as file pages.
    entries = k.pagemap(pid, m, H)
    assert (entries & PM_PRESENT).all() and (entries & PM_FILE).all()
    assert ((entries & PM_PFRAME_MASK).astype(np.int64) == env.pfns(m, m + PMD_SIZE)).all()
    assert env.mm.hugetlb_usage == 2 * H and other.mm.hugetlb_usage == 2 * H
    assert check_invariants(k) == []

    # The page cache keeps the huge pages while the file exists.
    await k.exit(other.pid)
    await k.munmap(pid, m, 2 * PMD_SIZE)
    await k.close(pid, fd)
    assert k.ram.hugetlb_free == POOL - 2
    fd, _ = await k.open(pid, "/dev/hugepages/shared", O_RDWR)
    m = await env.mmap(2 * H, prot=PROT_READ, flags=MAP_SHARED, fd=fd)
    assert await env.read(m + 3 * P, 2 * P) == pattern(2, 4)
    await k.ftruncate(pid, fd, 0)
    assert k.ram.hugetlb_free == POOL
    assert check_invariants(k) == []


async def test_writable_mmap_extends_the_file_and_faults_past_eof_are_sigbus() -> None:
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    fd, _ = await k.open(pid, "/dev/hugepages/grow", O_CREAT | O_RDWR)
    ro = await env.mmap(H, prot=PROT_READ, flags=MAP_SHARED, fd=fd)  # a read-only one does not
    with raises_errno(errno.EFAULT):
        await env.read(ro, 1)
    m = await env.mmap(1, flags=MAP_SHARED, fd=fd, offset=PMD_SIZE)  # rounded to one huge page
    assert k.tmpfs.lookup("/dev/hugepages/grow").size == 2 * PMD_SIZE  # type: ignore[union-attr]
    await env.write(m, b"second")
    assert await env.read(ro, 1) == b"\0"  # within the file now: a zeroed huge page
    assert await k.pread(pid, fd, PMD_SIZE, 6) == b"second"
    assert await k.pread(pid, fd, 2 * PMD_SIZE, 6) == b""
    priv = await env.mmap(2 * H, prot=PROT_READ, flags=MAP_PRIVATE, fd=fd, offset=PMD_SIZE)
    assert await env.read(priv, 6) == b"second"
    with raises_errno(errno.EFAULT):  # the second huge page of the mapping is past EOF
        await env.read(priv + PMD_SIZE, 1)


async def test_einval_paths_of_hugetlbfs() -> None:
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    fd = await hugetlbfs_file(env, "f", 1)
    for size in (P, PMD_SIZE + P, PMD_SIZE // 2):
        with raises_errno(errno.EINVAL):  # hugetlbfs_setattr: whole huge pages only
            await k.ftruncate(pid, fd, size)
    assert k.tmpfs.lookup("/dev/hugepages/f").size == PMD_SIZE  # type: ignore[union-attr]
    for offset in (P, PMD_SIZE // 2):
        with raises_errno(errno.EINVAL):
            await env.mmap(H, flags=MAP_SHARED, fd=fd, offset=offset)
    for data in (b"x", b""):
        with raises_errno(errno.EINVAL):  # no write_iter
            await k.pwrite(pid, fd, 0, data)
    rd, _ = await k.open(pid, "/dev/hugepages/f", O_RDONLY)
    with raises_errno(errno.EBADF):  # not open for writing comes first
        await k.pwrite(pid, rd, 0, b"x")
    assert await k.pread(pid, rd, 0, 4) == bytes(4)  # a hole reads as zeros
    tmp, _ = await k.open(pid, "/tmp/plain", O_CREAT | O_RDWR)
    await k.ftruncate(pid, tmp, P)
    with raises_errno(errno.EINVAL):  # MAP_HUGETLB on a file that is not hugetlbfs
        await env.mmap(1, flags=MAP_SHARED | MAP_HUGETLB, fd=tmp)
    with raises_errno(errno.EISDIR):
        await k.open(pid, "/dev/hugepages", O_RDWR)
    with raises_errno(errno.ENOENT):
        await k.open(pid, "/dev/hugepages/missing", O_RDWR)
    # MAP_HUGETLB on a hugetlbfs file is allowed and changes nothing.
    m = await env.mmap(H, flags=MAP_SHARED | MAP_HUGETLB, fd=fd)
    await env.write(m, b"ok")
    assert await k.pread(pid, rd, 0, 2) == b"ok"


async def test_private_mapping_of_a_file_huge_page_copies_it_on_the_first_write() -> None:
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    fd = await hugetlbfs_file(env, "cow", 2)
    shared = await env.mmap(2 * H, flags=MAP_SHARED, fd=fd)
    data = pattern(H, 6)
    await env.write(shared, data)  # only the first huge page is in the file's cache
    file_frames = one_huge_page(env, shared)
    priv = await env.mmap(2 * H, flags=MAP_PRIVATE, fd=fd)
    assert await env.read(priv, PMD_SIZE) == data
    assert (one_huge_page(env, priv) == file_frames).all()  # a read maps the file's page
    assert not (env.ptes(priv, priv + PMD_SIZE) & np.uint64(2)).any()  # read-only
    assert k.ram.hugetlb_free == POOL - 1
    res = await env.fault(priv, priv + PMD_SIZE, HMM_PFN_REQ_FAULT)
    assert (res.orders == PMD_ORDER).all() and (res.flags == HMM_PFN_VALID).all()

    env.fake.take()
    await env.write(priv + 5 * P, b"private")
    assert env.fake.take() == [(Event.CLEAR, priv, priv + PMD_SIZE)]  # the whole huge page
    copy = one_huge_page(env, priv)
    assert not np.isin(copy, file_frames).any() and k.ram.hugetlb_free == POOL - 2
    assert await env.read(priv + 5 * P, 7) == b"private"
    assert await env.read(priv + 5 * P + 7, P - 7) == data[5 * P + 7 : 6 * P]
    assert await k.pread(pid, fd, 5 * P, P) == data[5 * P : 6 * P]  # the file is unchanged
    assert await env.read(shared + 5 * P, 7) == data[5 * P : 5 * P + 7]
    await env.write(priv + 6 * P, b"again")  # the copy is ours alone now: no second copy
    assert env.fake.take() == [] and k.ram.hugetlb_free == POOL - 2
    assert env.mm.hugetlb_usage == 2 * H  # the copy, and the file page mapped by the shared one

    # A hole of the file: a private read gets a page of its own, not the file's.
    assert await env.read(priv + PMD_SIZE, 4) == bytes(4)
    assert k.ram.hugetlb_free == POOL - 3
    await env.write(shared + PMD_SIZE, b"late")
    assert await env.read(priv + PMD_SIZE, 4) == bytes(4)
    assert check_invariants(k) == []

    await k.munmap(pid, priv, 2 * PMD_SIZE)
    assert k.ram.hugetlb_free == POOL - 2  # both private pages went back
    assert check_invariants(k) == []


async def test_truncate_zaps_every_mapping_with_clear_and_returns_the_pages() -> None:
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    fd = await hugetlbfs_file(env, "trunc", 3)
    m = await env.mmap(3 * H, flags=MAP_SHARED, fd=fd)
    await env.write(m, pattern(1, 7))
    await env.write(m + PMD_SIZE, pattern(1, 8))
    await env.write(m + 2 * PMD_SIZE, pattern(1, 9))
    priv = await env.mmap(H, flags=MAP_PRIVATE, fd=fd, offset=2 * PMD_SIZE)
    await env.write(priv, b"copy")  # a private copy of the last page
    res = await env.fault(m, m + 3 * PMD_SIZE, HMM_PFN_REQ_FAULT)  # the device maps the file
    assert (res.orders == PMD_ORDER).all()
    assert k.ram.hugetlb_free == POOL - 4
    env.fake.take()

    await k.ftruncate(pid, fd, PMD_SIZE)
    assert sorted(env.fake.take()) == sorted([(Event.CLEAR, m + PMD_SIZE, m + 3 * PMD_SIZE),
                                              (Event.CLEAR, priv, priv + PMD_SIZE)])
    assert k.ram.hugetlb_free == POOL - 1  # two file pages and the private copy
    assert not env.ptes(m + PMD_SIZE, m + 3 * PMD_SIZE).any()
    with raises_errno(errno.EFAULT):
        await env.read(m + PMD_SIZE, 1)
    with raises_errno(errno.EFAULT):
        await env.read(priv, 1)
    assert await env.read(m, P) == pattern(1, 7)
    assert env.mm.hugetlb_usage == H
    assert check_invariants(k) == []

    await k.ftruncate(pid, fd, 2 * PMD_SIZE)  # growing again: a hole, zero when faulted
    assert await env.read(m + PMD_SIZE, P) == bytes(P)
    await k.exit(pid)
    assert k.ram.hugetlb_free == POOL - 2  # the file still holds its two pages


async def test_madv_remove_punches_whole_huge_pages_and_zeroes_the_ends() -> None:
    """hugetlbfs_punch_hole: the huge page wholly inside the range leaves the file,
    every mapping of it zapped with CLEAR (a private copy of it too); the parts of
    the huge pages at either end are zeroed in place and stay mapped."""
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    fd = await hugetlbfs_file(env, "punch", 3)
    m = await env.mmap(3 * H, flags=MAP_SHARED, fd=fd)
    data = pattern(3 * H, 4)
    await env.write(m, data)
    ends = one_huge_page(env, m), one_huge_page(env, m + 2 * PMD_SIZE)
    priv = await env.mmap(H, flags=MAP_PRIVATE, fd=fd, offset=PMD_SIZE)
    await env.write(priv, b"copy")  # a private copy of the middle huge page
    await env.fault(m, m + 3 * PMD_SIZE, HMM_PFN_REQ_FAULT)  # the device maps the file
    assert k.ram.hugetlb_free == 0
    env.fake.take()

    start, end = m + PMD_SIZE - 3 * P, m + 2 * PMD_SIZE + 2 * P
    await k.madvise(pid, start, end - start, MADV_REMOVE)
    assert sorted(env.fake.take()) == sorted([(Event.CLEAR, m + PMD_SIZE, m + 2 * PMD_SIZE),
                                              (Event.CLEAR, priv, priv + PMD_SIZE)])
    assert k.ram.hugetlb_free == 2  # the file's middle page and the private copy
    assert (one_huge_page(env, m) == ends[0]).all() and (one_huge_page(env, m + 2 * PMD_SIZE) == ends[1]).all()
    want = bytearray(data)
    want[start - m : end - m] = bytes(end - start)
    assert await env.read(m, PMD_SIZE) == want[:PMD_SIZE]
    assert await env.read(m + 2 * PMD_SIZE, PMD_SIZE) == want[2 * PMD_SIZE :]
    assert await k.pread(pid, fd, PMD_SIZE - 3 * P, 5 * P) == bytes(5 * P)
    assert await env.read(m + PMD_SIZE, P) == bytes(P)  # a new pool page, zeroed
    assert await env.read(priv, 4) == bytes(4)
    assert check_invariants(k) == []

    # Within one huge page nothing leaves the file: the range is only zeroed.
    env.fake.take()
    await k.madvise(pid, m + 5 * P, 2 * P, MADV_REMOVE)
    assert env.fake.take() == [] and (one_huge_page(env, m) == ends[0]).all()
    assert await env.read(m + 4 * P, 4 * P) == data[4 * P : 5 * P] + bytes(2 * P) + data[7 * P : 8 * P]
    # Private hugetlb mappings have a file, hugetlbfs's, but no shared one: EACCES.
    anon = await env.mmap(H, flags=MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB)
    for addr in (anon, priv):
        with raises_errno(errno.EACCES):
            await k.madvise(pid, addr, PMD_SIZE, MADV_REMOVE)
    await k.exit(pid)
    assert check_invariants(k) == []


async def test_unnamed_hugetlbfs_file_goes_back_to_the_pool_after_close_and_munmap() -> None:
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    fd, _ = await k.open(pid, "/dev/hugepages", O_TMPFILE | O_RDWR)
    await k.ftruncate(pid, fd, 2 * PMD_SIZE)
    m = await env.mmap(2 * H, flags=MAP_SHARED, fd=fd)
    await env.write(m, b"a")
    await env.write(m + PMD_SIZE, b"b")
    await k.close(pid, fd)
    assert k.ram.hugetlb_free == POOL - 2 and await env.read(m + PMD_SIZE, 1) == b"b"
    await k.munmap(pid, m, PMD_SIZE)
    assert k.ram.hugetlb_free == POOL - 2  # the other mapping keeps the file
    await k.munmap(pid, m + PMD_SIZE, PMD_SIZE)
    assert k.ram.hugetlb_free == POOL and k.ram.used_frames == 1
    assert check_invariants(k) == []


async def test_shared_mapping_of_cached_pages_needs_no_pool() -> None:
    env = await hugetlb_env()
    k = env.k
    fd = await hugetlbfs_file(env, "full", POOL)
    m = await env.mmap(POOL * H, flags=MAP_SHARED, fd=fd)
    for i in range(POOL):
        await env.write(m + i * PMD_SIZE, b"x")
    assert k.ram.hugetlb_free == 0
    again = await env.mmap(POOL * H, prot=PROT_READ, flags=MAP_SHARED, fd=fd)  # shares the cached pages
    assert await env.read(again + (POOL - 1) * PMD_SIZE, 1) == b"x"
    with raises_errno(errno.ENOMEM):  # a private mapping may need pages of its own
        await env.mmap(H, flags=MAP_PRIVATE, fd=fd)
    with raises_errno(errno.ENOMEM):
        await env.mmap(H, flags=SHARED_ANON)


async def test_madv_dontneed_drops_whole_huge_pages_and_shared_data_stays() -> None:
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    a = await env.mmap(2 * H, flags=SHARED_ANON)
    await env.write(a, b"kept")
    await env.write(a + PMD_SIZE, b"also")
    with raises_errno(errno.EINVAL):
        await k.madvise(pid, a + P, P, MADV_DONTNEED)
    env.fake.take()
    await k.madvise(pid, a, PMD_SIZE + P, MADV_DONTNEED)  # rounded down to the first huge page
    assert env.fake.take() == [(Event.CLEAR, a, a + PMD_SIZE)]
    assert not env.ptes(a, a + PMD_SIZE).any() and (a + PMD_SIZE) >> 21 in env.mm.pt.huge
    assert await env.read(a, 4) == b"kept"  # the file still has it
    assert k.ram.hugetlb_free == POOL - 2
    assert check_invariants(k) == []


async def test_madv_hugepage_advises_hugetlb_in_whole_huge_pages_only() -> None:
    """MADV_HUGEPAGE and MADV_NOHUGEPAGE split the mappings they advise: a hugetlb one
    only at a huge page boundary (EINVAL, nothing advised), as hugetlb_vm_op_split.
    They used to cut it anywhere, leaving 4 KiB hugetlb mappings under a PMD."""
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    a = await env.mmap(2 * H, flags=SHARED_ANON)
    await env.write(a, b"kept")
    for advice in (MADV_HUGEPAGE, MADV_NOHUGEPAGE):
        with raises_errno(errno.EINVAL):
            await k.madvise(pid, a, P, advice)
        with raises_errno(errno.EINVAL):
            await k.madvise(pid, a + P, PMD_SIZE, advice)
    assert [(v.start, v.end) for v in env.mm.vmas] == [(a, a + 2 * PMD_SIZE)]
    await k.madvise(pid, a, PMD_SIZE, MADV_HUGEPAGE)  # whole huge pages: fine
    assert [(v.start, v.end) for v in env.mm.vmas] == [(a, a + PMD_SIZE), (a + PMD_SIZE, a + 2 * PMD_SIZE)]
    assert await env.read(a, 4) == b"kept" and check_invariants(k) == []


async def test_every_kind_faults_at_order_9_and_refuses_migration_and_exclusive_access() -> None:
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    fd = await hugetlbfs_file(env, "kinds", 2)
    kinds = {
        "shared anonymous": await env.mmap(H, flags=SHARED_ANON),
        "shared file": await env.mmap(H, flags=MAP_SHARED, fd=fd),
        "private file": await env.mmap(H, flags=MAP_PRIVATE, fd=fd, offset=PMD_SIZE),
        "private anonymous": await env.mmap(H, flags=MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB),
    }
    for kind, a in kinds.items():
        res = await env.fault(a, a + PMD_SIZE, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
        assert (res.orders == PMD_ORDER).all(), kind
        assert (res.flags == HMM_PFN_VALID | HMM_PFN_WRITE).all(), kind
        assert (res.pfns.astype(np.int64) == one_huge_page(env, a)).all(), kind
        snap = await env.fault(a + 3 * P, a + 5 * P, snapshot=True)
        assert (snap.orders == PMD_ORDER).all(), kind
        with raises_errno(errno.EINVAL):
            await k.migrate_setup(env.dev, pid, a, a + P, MIGRATE_VMA_SELECT_SYSTEM)
        with raises_errno(errno.EOPNOTSUPP):
            await k.make_exclusive(env.dev, pid, a, 1, True)
    assert k.ram.hugetlb_free == 0
    assert check_invariants(k) == []
    await k.exit(pid)
    assert k.ram.hugetlb_free == POOL - 1  # the file keeps its page; the private ones went back


async def test_mremap_moves_whole_huge_pages_and_never_grows() -> None:
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    a = await env.mmap(2 * H, flags=SHARED_ANON)
    await env.write(a, b"first")
    await env.write(a + PMD_SIZE, b"second")
    frames = env.pfns(a, a + 2 * PMD_SIZE)
    target = await env.mmap(2 * H, flags=SHARED_ANON)  # a free, aligned place to move to
    await k.munmap(pid, target, 2 * PMD_SIZE)
    with raises_errno(errno.EINVAL):
        await k.mremap(pid, a, 2 * PMD_SIZE, 3 * PMD_SIZE, MREMAP_MAYMOVE, 0)
    with raises_errno(errno.EINVAL):
        await k.mremap(pid, a, 2 * PMD_SIZE, 2 * PMD_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, target + P)
    env.fake.take()
    moved = await k.mremap(pid, a, 2 * PMD_SIZE, 2 * PMD_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, target)
    assert moved == target and env.fake.take() == [(Event.UNMAP, a, a + 2 * PMD_SIZE)]
    assert (one_huge_page(env, target) == frames[:H]).all()
    res = await env.fault(target, target + 2 * PMD_SIZE, HMM_PFN_REQ_FAULT)
    assert (res.orders == PMD_ORDER).all()
    assert await env.read(target + PMD_SIZE, 6) == b"second"
    assert await k.mremap(pid, target, 2 * PMD_SIZE, P, 0, 0) == target  # shrinks to one huge page
    assert await env.read(target, 5) == b"first"
    assert k.ram.hugetlb_free == POOL - 2  # the unnamed file keeps its pages while mapped
    assert check_invariants(k) == []
    await k.munmap(pid, target, PMD_SIZE)
    assert k.ram.hugetlb_free == POOL


async def test_fork_copies_a_pinned_private_huge_page_into_a_pool_page() -> None:
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    a = await env.mmap(H, flags=MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB)
    await env.write(a + 9 * P, pattern(1, 11))
    pin = await k.pin_user_pages(pid, a + 9 * P, 1, write=True, longterm=False, hold=True)
    child = await k.fork(pid)
    copy = one_huge_page(env, a, child.mm)
    assert not np.isin(copy, env.pfns(a, a + PMD_SIZE)).any() and k.ram.hugetlb_free == POOL - 2
    assert await env.read(a + 9 * P, P, pid=child.pid) == pattern(1, 11)
    assert check_invariants(k) == []
    await k.exit(child.pid)
    hog = await env.mmap((POOL - 1) * H, flags=SHARED_ANON)
    await env.write(hog, b"x" * (POOL - 1) * PMD_SIZE)
    with raises_errno(errno.ENOMEM):  # no pool page for the child's copy: fork fails
        await k.fork(pid)
    assert k.ram.hugetlb_free == 0
    k.unpin_user_pages(pid, pin)
    await k.exit(pid)
    assert k.ram.hugetlb_free == POOL and check_invariants(k) == []


# ---- reservations (hugetlb_reserve_pages) ----------------------------------------------
PRIVATE_HUGE = MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB


async def test_mmap_reserves_the_pool_so_a_later_fault_never_finds_it_taken() -> None:
    """Two mappings that together need more than the pool: the second mmap fails
    (ENOMEM), not a fault of the first one later (SIGBUS). Faults take the pages the
    mapping reserved; munmap gives back what was never faulted in."""
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    a = await env.mmap(3 * H, flags=PRIVATE_HUGE)
    assert k.ram.hugetlb_reserved == 3 and k.ram.hugetlb_free == POOL  # promised, not taken
    with raises_errno(errno.ENOMEM):
        await env.mmap(2 * H, flags=PRIVATE_HUGE)
    with raises_errno(errno.ENOMEM):
        await env.mmap(2 * H, flags=SHARED_ANON)
    b = await env.mmap(H, flags=SHARED_ANON)  # the one page left
    assert k.ram.hugetlb_reserved == 4
    for i in range(3):
        await env.write(a + i * PMD_SIZE, pattern(1, i))
    await env.write(b, pattern(1, 9))
    assert k.ram.hugetlb_reserved == 0 and k.ram.hugetlb_free == 0
    await k.munmap(pid, b, PMD_SIZE)
    c = await env.mmap(H, flags=PRIVATE_HUGE)  # b's page is back in the pool
    await k.munmap(pid, c, PMD_SIZE)  # never faulted: its reservation goes back
    assert k.ram.hugetlb_reserved == 0 and k.ram.hugetlb_free == 1
    assert [await env.read(a + i * PMD_SIZE, P) for i in range(3)] == [pattern(1, i) for i in range(3)]
    await k.munmap(pid, a, 3 * PMD_SIZE)
    assert k.ram.hugetlb_free == POOL and k.ram.hugetlb_reserved == 0
    assert check_invariants(k) == []
    k.ram.hugetlb_reserved = 1  # a promise no mapping holds: the invariants see it
    assert check_invariants(k) == ["1 huge pages reserved in the pool, mappings and files hold 0"]
    k.ram.hugetlb_reserved = 0


async def test_reservations_follow_partial_munmap_mremap_and_madv_dontneed() -> None:
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    a = await env.mmap(4 * H, flags=PRIVATE_HUGE)
    await env.write(a, pattern(1, 1))  # takes the reservation of the first huge page
    await k.munmap(pid, a + 3 * PMD_SIZE, PMD_SIZE)  # one unused reservation goes
    assert k.ram.hugetlb_reserved == 2 and k.ram.hugetlb_free == POOL - 1
    # MADV_DONTNEED frees the page and restores its reservation (as Linux does), so the
    # next fault there cannot lose the page to another mapping meanwhile.
    await k.madvise(pid, a, PMD_SIZE, MADV_DONTNEED)
    assert k.ram.hugetlb_reserved == 3 and k.ram.hugetlb_free == POOL
    with raises_errno(errno.ENOMEM):
        await env.mmap(2 * H, flags=PRIVATE_HUGE)
    assert await env.read(a, P) == bytes(P)  # a fresh zeroed page, from the reservation
    assert k.ram.hugetlb_reserved == 2
    # Moved, the mapping keeps its reservations: its unfaulted pages still fault in.
    dst = a + 16 * PMD_SIZE
    moved = await k.mremap(pid, a, 3 * PMD_SIZE, 3 * PMD_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, dst)
    assert moved == dst and k.ram.hugetlb_reserved == 2
    await env.write(dst + 2 * PMD_SIZE, pattern(1, 5))
    assert k.ram.hugetlb_reserved == 1 and await env.read(dst + 2 * PMD_SIZE, P) == pattern(1, 5)
    await k.exit(pid)
    assert k.ram.hugetlb_reserved == 0 and k.ram.hugetlb_free == POOL
    assert check_invariants(k) == []


async def test_a_file_reserves_once_for_all_its_shared_mappings_until_truncated() -> None:
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    fd = await hugetlbfs_file(env, "resv", 3)
    a = await k.mmap(pid, 0, 3 * PMD_SIZE, RW, MAP_SHARED, fd, 0)
    b = await k.mmap(pid, 0, 3 * PMD_SIZE, RW, MAP_SHARED, fd, 0)  # the same pages: nothing more
    assert k.ram.hugetlb_reserved == 3
    await env.write(b + PMD_SIZE, pattern(1, 2))
    assert k.ram.hugetlb_reserved == 2 and await env.read(a + PMD_SIZE, P) == pattern(1, 2)
    await k.munmap(pid, a, 3 * PMD_SIZE)
    await k.munmap(pid, b, 3 * PMD_SIZE)
    assert k.ram.hugetlb_reserved == 2  # the file keeps them while it exists
    with raises_errno(errno.ENOMEM):
        await env.mmap(2 * H, flags=PRIVATE_HUGE)
    with raises_errno(errno.ENOMEM):  # a writable mapping past the end that cannot be reserved ...
        await k.mmap(pid, 0, (POOL + 1) * PMD_SIZE, RW, MAP_SHARED, fd, 0)
    assert k.tmpfs.lookup("/dev/hugepages/resv").size == 3 * PMD_SIZE  # type: ignore[union-attr]  # ... nor grows the file
    await k.ftruncate(pid, fd, PMD_SIZE)  # the faulted page and the reservation past the size go back
    assert k.ram.hugetlb_reserved == 1 and k.ram.hugetlb_free == POOL  # the first page: still promised
    c = await env.mmap(3 * H, flags=PRIVATE_HUGE)
    assert k.ram.hugetlb_reserved == 4
    await k.munmap(pid, c, 3 * PMD_SIZE)
    await k.close(pid, fd)  # still linked: the file and its reservation stay
    assert k.ram.hugetlb_reserved == 1
    assert check_invariants(k) == []


async def test_map_noreserve_promises_nothing_and_cannot_take_promised_pages() -> None:
    """MAP_NORESERVE: the mmap needs no free pool pages; each fault takes an unpromised
    page or is SIGBUS, even while the pool still holds pages promised to others."""
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    greedy = await env.mmap((POOL + 2) * H, flags=PRIVATE_HUGE | MAP_NORESERVE)  # more than the pool
    assert k.ram.hugetlb_reserved == 0
    a = await env.mmap((POOL - 1) * H, flags=PRIVATE_HUGE)
    await env.write(greedy, pattern(1, 1))  # the one page nobody was promised
    with raises_errno(errno.EFAULT):  # SIGBUS: what is left is promised to a
        await env.write(greedy + PMD_SIZE, pattern(1, 2))
    for i in range(POOL - 1):
        await env.write(a + i * PMD_SIZE, pattern(1, i))  # a's faults never fail
    assert k.ram.hugetlb_free == 0 and k.ram.hugetlb_reserved == 0
    await k.munmap(pid, greedy, (POOL + 2) * PMD_SIZE)
    shared = await env.mmap(2 * H, flags=SHARED_ANON | MAP_NORESERVE)
    await env.write(shared, pattern(1, 3))
    assert k.ram.hugetlb_reserved == 0 and await env.read(shared, P) == pattern(1, 3)
    assert check_invariants(k) == []


async def test_the_reserving_process_keeps_its_page_when_the_pool_runs_dry_after_fork() -> None:
    """Fork shares a private huge page; with the pool empty, the child (no reservation)
    cannot copy it on a write (SIGBUS), while the parent, which reserved it, takes it:
    the child loses its mapping (CLEAR) and any later fault there is SIGBUS."""
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    a = await env.mmap(H, flags=PRIVATE_HUGE)
    await env.write(a, pattern(1, 1))
    child = await k.fork(pid)
    rest = await env.mmap((POOL - 1) * H, flags=PRIVATE_HUGE)
    for i in range(POOL - 1):
        await env.write(rest + i * PMD_SIZE, pattern(1, 7))
    assert k.ram.hugetlb_free == 0
    with raises_errno(errno.EFAULT):
        await env.write(a, pattern(1, 2), pid=child.pid)
    assert await env.read(a, P, pid=child.pid) == pattern(1, 1)  # still shared, read-only
    await env.write(a, pattern(1, 3))  # the owner's write: no copy, the child's mapping goes
    assert await env.read(a, P) == pattern(1, 3)
    assert not child.mm.pt.gather(a, a + PMD_SIZE).any() and child.mm.hugetlb_usage == 0
    with raises_errno(errno.EFAULT):
        await env.read(a, P, pid=child.pid)
    assert k.ram.hugetlb_free == 0 and check_invariants(k) == []
    grandchild = await k.fork(child.pid)  # a fork starts afresh (its own fault still finds the pool empty)
    assert child.mm.vmas.find(a).hugetlb_unmapped and not grandchild.mm.vmas.find(a).hugetlb_unmapped
    with raises_errno(errno.EFAULT):
        await env.read(a, P, pid=grandchild.pid)
    for p in (grandchild.pid, child.pid, pid):
        await k.exit(p)
    assert k.ram.hugetlb_free == POOL and k.ram.hugetlb_reserved == 0


async def test_random_hugetlb_workload_keeps_the_pool_promises() -> None:
    """Random mmap / munmap / mremap / MADV_DONTNEED / MADV_REMOVE / writes / fork / exit over private,
    shared and MAP_NORESERVE hugetlb mappings (seeded, 500 steps): after every step the
    invariants hold (the pool's promises are exactly what mappings and files hold, never
    more than it has free), and a fault of a page a mapping still has reserved never
    fails; at the end every page and promise is back."""
    import random

    pool = 8
    env = await make_env(Kernel(RAM_BYTES, hugetlb_pages=pool))
    k = env.k
    rnd = random.Random(7)
    maps: dict[int, list[tuple[int, int, bool]]] = {env.p.pid: []}  # pid -> (addr, huge pages, shared)
    reserved_faults = punched = 0
    for step in range(500):
        pid = rnd.choice(list(maps))
        mm = k.process(pid).mm
        op = rnd.random()
        try:
            if op < 0.2:
                n = rnd.randint(1, 3)
                shared = rnd.random() < 0.3
                flags = (SHARED_ANON if shared else PRIVATE_HUGE) | (MAP_NORESERVE if rnd.random() < 0.2 else 0)
                maps[pid].append((await env.mmap(n * H, flags=flags, pid=pid), n, shared))
            elif op < 0.3 and maps[pid]:
                a, n, shared = maps[pid].pop(rnd.randrange(len(maps[pid])))
                if n > 1 and rnd.random() < 0.5:  # only the last huge page goes
                    await k.munmap(pid, a + (n - 1) * PMD_SIZE, PMD_SIZE)
                    maps[pid].append((a, n - 1, shared))
                else:
                    await k.munmap(pid, a, n * PMD_SIZE)
            elif op < 0.35 and maps[pid]:
                i = rnd.randrange(len(maps[pid]))
                a, n, shared = maps[pid][i]
                to = a + (64 + rnd.randrange(64)) * PMD_SIZE
                if not mm.vmas.overlapping(to, to + n * PMD_SIZE):
                    maps[pid][i] = (await k.mremap(pid, a, n * PMD_SIZE, n * PMD_SIZE,
                                                   MREMAP_MAYMOVE | MREMAP_FIXED, to), n, shared)
            elif op < 0.45 and maps[pid]:
                a, n, shared = rnd.choice(maps[pid])
                if shared and rnd.random() < 0.8:  # a hole punched anywhere, ends zeroed
                    lo = rnd.randrange(n * H)
                    await k.madvise(pid, a + lo * P, rnd.randint(1, n * H - lo) * P, MADV_REMOVE)
                    punched += 1
                else:
                    await k.madvise(pid, a + rnd.randrange(n) * PMD_SIZE, PMD_SIZE, MADV_DONTNEED)
            elif op < 0.85 and maps[pid]:
                a, n, shared = rnd.choice(maps[pid])
                h = a + rnd.randrange(n) * PMD_SIZE
                vma = mm.vmas.find(h)
                assert vma is not None
                promised = (h >> 21) in mm.hugetlb_resv or (
                    shared and vma.file is not None and vma.file_page(h) in vma.file.resv)  # type: ignore[attr-defined]
                empty = not mm.pt.gather(h, h + PMD_SIZE).any()
                try:
                    await env.write(h + rnd.randrange(H) * P, pattern(1, step), pid=pid)
                except Exception:
                    assert not (promised and empty), f"step {step}: a reserved page failed to fault in"
                    raise
                reserved_faults += promised and empty
            elif op < 0.92 and len(maps) < 4:
                child = await k.fork(pid)
                maps[child.pid] = list(maps[pid])
            elif pid != env.p.pid:
                await k.exit(pid)
                del maps[pid]
        except Exception as e:  # the workload's own ENOMEM and SIGBUS are expected
            if getattr(e, "errno", None) not in (errno.ENOMEM, errno.EFAULT):
                raise
        assert check_invariants(k) == [], f"after step {step}"
    assert reserved_faults >= 12 and punched >= 8  # the property and the punches were exercised
    for pid in sorted(maps, reverse=True):
        await k.exit(pid)
    assert k.ram.hugetlb_free == pool and k.ram.hugetlb_reserved == 0


async def test_hugetlb_pages_count_in_hugetlb_usage_never_in_rss() -> None:
    """hugetlb_count_add/sub (HugetlbPages in /proc/pid/status): a fault, a COW copy,
    fork and munmap change mm->hugetlb_usage; MM_ANONPAGES/FILEPAGES/SHMEMPAGES
    (VmRSS, and so its high-water mark) never see a hugetlb page."""
    env = await hugetlb_env()
    k, pid = env.k, env.p.pid
    priv = await k.mmap(pid, 0, PMD_SIZE, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0)
    shared = await k.mmap(pid, 0, PMD_SIZE, RW, SHARED_ANON, -1, 0)
    await env.write(priv, b"p")
    await env.write(shared, b"s")
    assert env.mm.rss == [0, 0, 0] and env.mm.rss_peak == 0 and env.mm.hugetlb_usage == 2 * H
    child = await k.fork(pid)
    assert child.mm.hugetlb_usage == H  # the private page (the shared one faults in later)
    await env.write(priv, b"q", pid=child.pid)  # the child's own copy of the private page
    await env.read(shared, 1, pid=child.pid)
    assert child.mm.rss == [0, 0, 0] and child.mm.hugetlb_usage == 2 * H
    await k.munmap(pid, priv, PMD_SIZE)
    assert env.mm.hugetlb_usage == H
    assert check_invariants(k) == []
