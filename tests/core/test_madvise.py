"""madvise(2) advice beyond DONTNEED/FREE/PAGEOUT/THP (those are in test_events,
test_reclaim and test_thp): the hints, the flags fork honours, MADV_POPULATE_* and
MADV_REMOVE, with the errnos of mm/madvise.c."""

from __future__ import annotations

import errno

import numpy as np

from hmm.abi import (
    MADV_COLD,
    MADV_DODUMP,
    MADV_DOFORK,
    MADV_DONTDUMP,
    MADV_DONTFORK,
    MADV_KEEPONFORK,
    MADV_NORMAL,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_RANDOM,
    MADV_REMOVE,
    MADV_SEQUENTIAL,
    MADV_WILLNEED,
    MADV_WIPEONFORK,
    MAP_PRIVATE,
    MAP_SHARED,
    O_CREAT,
    O_RDWR,
    PROT_READ,
    Event,
)
from hmmd.core.pagetable import PTE_WRITE, PTE_YOUNG, pte_pfn
from hmmd.core.physmem import ZERO_PFN
from hmmd.core.vma import VM_DONTCOPY, VM_RAND_READ, VM_SEQ_READ, VM_WIPEONFORK

from .conftest import SHM, ZERO_PAGE, Env, P, page, pattern, present, raises_errno


async def test_hints_change_no_page_and_raise_no_event(env: Env) -> None:
    """NORMAL, RANDOM, SEQUENTIAL, WILLNEED, COLD, DONTDUMP/DODUMP, KEEPONFORK: 0, the
    data and the page tables as they were (but for COLD's accessed bits:
    test_reclaim.py), nothing announced."""
    k, pid = env.k, env.p.pid
    a = await env.mmap(8)
    data = pattern(8, 1)
    await env.write(a, data)
    before = env.ptes(a, a + 8 * P).copy()
    env.fake.take()
    for advice in (MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED, MADV_COLD, MADV_DONTDUMP,
                   MADV_DODUMP, MADV_KEEPONFORK):
        await k.madvise(pid, a + 2 * P, 4 * P, advice)
    assert env.fake.take() == []
    before[2:6] &= ~PTE_YOUNG  # COLD's pages: reclaim takes them first
    assert (env.ptes(a, a + 8 * P) == before).all()
    assert await env.read(a, 8 * P) == data
    await k.madvise(pid, a, 8 * P, MADV_NORMAL)
    assert [(v.start, v.end) for v in env.mm.maps() if v.start <= a < v.end] == [(a, a + 8 * P)]  # merged back


async def test_hints_over_a_hole_are_enomem_after_advising_the_mapped_part(env: Env) -> None:
    k, pid = env.k, env.p.pid
    a = await env.mmap(8)
    await env.k.munmap(pid, a + 4 * P, 4 * P)
    for advice in (MADV_WILLNEED, MADV_COLD):
        with raises_errno(errno.ENOMEM):
            await k.madvise(pid, a, 8 * P, advice)
    with raises_errno(errno.ENOMEM):
        await k.madvise(pid, a, 8 * P, MADV_RANDOM)
    (vma,) = [v for v in env.mm.maps() if v.start == a]
    assert vma.end == a + 4 * P and vma.flags & VM_RAND_READ
    with raises_errno(errno.EINVAL):
        await k.madvise(pid, a, 8 * P, 12)  # MADV_MERGEABLE: no KSM here, as CONFIG_KSM=n


async def test_flag_advice_cuts_the_mapping_to_the_range(env: Env) -> None:
    k, pid = env.k, env.p.pid
    a = await env.mmap(8)
    await k.madvise(pid, a + 2 * P, 2 * P, MADV_SEQUENTIAL)
    spans = [(v.start - a, v.end - a, bool(v.flags & VM_SEQ_READ)) for v in env.mm.maps() if a <= v.start < a + 8 * P]
    assert spans == [(0, 2 * P, False), (2 * P, 4 * P, True), (4 * P, 8 * P, False)]
    await k.madvise(pid, a + 2 * P, 2 * P, MADV_RANDOM)  # replaces SEQUENTIAL
    (mid,) = [v for v in env.mm.maps() if v.start == a + 2 * P]
    assert mid.flags & VM_RAND_READ and not mid.flags & VM_SEQ_READ


async def test_dontfork_leaves_the_mapping_out_of_the_child(env: Env) -> None:
    k, pid = env.k, env.p.pid
    a = await env.mmap(4)
    b = await env.mmap(4)
    da, db = pattern(4, 2), pattern(4, 3)
    await env.write(a, da)
    await env.write(b, db)
    await k.madvise(pid, a, 4 * P, MADV_DONTFORK)
    assert [v.flags & VM_DONTCOPY for v in env.mm.maps() if v.start == a] == [VM_DONTCOPY]
    env.fake.take()
    child = await k.fork(pid)
    # Only b's pages were shared copy-on-write (write-protected under PROTECTION_PAGE).
    assert env.fake.take() == [(Event.PROTECTION_PAGE, b, b + 4 * P)]
    assert all(not (v.start < a + 4 * P and a < v.end) for v in child.mm.maps())
    with raises_errno(errno.EFAULT):
        await env.read(a, P, pid=child.pid)
    assert await env.read(b, 4 * P, pid=child.pid) == db
    assert await env.read(a, 4 * P) == da
    assert (env.ptes(a, a + 4 * P) & PTE_WRITE).all()  # the parent's pages were never shared
    await k.madvise(pid, a, 4 * P, MADV_DOFORK)
    child2 = await k.fork(pid)
    assert await env.read(a, 4 * P, pid=child2.pid) == da


async def test_wipeonfork_gives_the_child_an_empty_mapping(env: Env) -> None:
    k, pid = env.k, env.p.pid
    a = await env.mmap(4)
    data = pattern(4, 4)
    await env.write(a, data)
    await k.madvise(pid, a, 4 * P, MADV_WIPEONFORK)
    env.fake.take()
    child = await k.fork(pid)
    assert env.fake.take() == []  # nothing of the parent's was shared or write-protected
    assert (env.ptes(a, a + 4 * P) & PTE_WRITE).all()
    (cvma,) = [v for v in child.mm.maps() if v.start == a]
    assert cvma.end == a + 4 * P and cvma.flags & VM_WIPEONFORK  # inherited
    assert not present(env.ptes(a, a + 4 * P, child.mm)).any()
    assert await env.read(a, 4 * P, pid=child.pid) == bytes(4 * P)
    assert await env.read(a, 4 * P) == data
    assert child.mm.rss[0] == 0
    await k.madvise(pid, a, 4 * P, MADV_KEEPONFORK)
    child2 = await k.fork(pid)
    assert await env.read(a, 4 * P, pid=child2.pid) == data


async def test_wipeonfork_and_dodump_refuse_what_linux_refuses(env: Env) -> None:
    k, pid = env.k, env.p.pid
    s = await env.mmap(4, flags=SHM)
    with raises_errno(errno.EINVAL):
        await k.madvise(pid, s, 4 * P, MADV_WIPEONFORK)  # shared: only private anonymous memory
    fd, _ = await k.open(pid, "/f", O_CREAT | O_RDWR)
    await k.pwrite(pid, fd, 0, pattern(4, 5))
    f = await env.mmap(4, flags=MAP_PRIVATE, fd=fd)
    with raises_errno(errno.EINVAL):
        await k.madvise(pid, f, 4 * P, MADV_WIPEONFORK)  # a file behind it
    dev_fd = next(fd for fd, of in env.p.fds.items() if of.device is not None)
    d = await env.mmap(2, flags=MAP_SHARED, fd=dev_fd)  # /dev/fake0: a driver mapping
    with raises_errno(errno.EINVAL):
        await k.madvise(pid, d, 2 * P, MADV_DODUMP)  # VM_SPECIAL
    await k.madvise(pid, d, 2 * P, MADV_DONTDUMP)


async def test_populate_write_maps_every_page_writable(env: Env) -> None:
    k, pid = env.k, env.p.pid
    a = await env.mmap(8)
    await k.madvise(pid, a, 8 * P, MADV_POPULATE_WRITE)
    ptes = env.ptes(a, a + 8 * P)
    assert present(ptes).all() and (ptes & PTE_WRITE).all()
    assert (pte_pfn(ptes) != ZERO_PFN).all()
    assert env.mm.rss[0] == 8
    assert await env.read(a, 8 * P) == bytes(8 * P)


async def test_populate_read_maps_the_zero_page_and_file_pages(env: Env) -> None:
    k, pid = env.k, env.p.pid
    a = await env.mmap(4, prot=PROT_READ)
    await k.madvise(pid, a, 4 * P, MADV_POPULATE_READ)
    ptes = env.ptes(a, a + 4 * P)
    assert present(ptes).all() and (pte_pfn(ptes) == ZERO_PFN).all() and env.mm.rss[0] == 0
    fd, _ = await k.open(pid, "/f", O_CREAT | O_RDWR)
    data = pattern(2, 6)
    await k.pwrite(pid, fd, 0, data)
    f = await env.mmap(2, flags=MAP_SHARED, fd=fd)
    await k.madvise(pid, f, 2 * P, MADV_POPULATE_READ)
    assert present(env.ptes(f, f + 2 * P)).all() and env.mm.rss[2] + env.mm.rss[1] == 2


async def test_populate_errnos(env: Env) -> None:
    """EINVAL where the mapping does not allow the access; ENOMEM at a hole; EFAULT
    where the fault would be SIGBUS. What came before the failure is populated."""
    k, pid = env.k, env.p.pid
    r = await env.mmap(2, prot=PROT_READ)
    with raises_errno(errno.EINVAL):
        await k.madvise(pid, r, 2 * P, MADV_POPULATE_WRITE)
    a = await env.mmap(4)
    await k.munmap(pid, a + 2 * P, 2 * P)
    with raises_errno(errno.ENOMEM):
        await k.madvise(pid, a, 4 * P, MADV_POPULATE_WRITE)
    assert present(env.ptes(a, a + 2 * P)).all()
    fd, _ = await k.open(pid, "/short", O_CREAT | O_RDWR)
    await k.pwrite(pid, fd, 0, b"x")  # one page long
    f = await env.mmap(3, flags=MAP_SHARED, fd=fd)
    with raises_errno(errno.EFAULT):
        await k.madvise(pid, f, 3 * P, MADV_POPULATE_READ)
    assert present(env.ptes(f, f + P)).all()


async def test_remove_punches_a_hole_in_shared_memory_for_every_mapping(env: Env) -> None:
    """The pages leave every mapping (a CLEAR over the caller's) and the file: both
    processes read zeroes there, the rest stays; the page cache frames are freed."""
    k, pid = env.k, env.p.pid
    s = await env.mmap(8, flags=SHM)
    data = pattern(8, 7)
    await env.write(s, data)
    child = await k.fork(pid)
    assert await env.read(s, 8 * P, pid=child.pid) == data
    free_before = k.ram.free_frames
    env.fake.take()
    await k.madvise(pid, s + 2 * P, 4 * P, MADV_REMOVE)
    assert env.fake.take() == [(Event.CLEAR, s + 2 * P, s + 6 * P)]
    assert k.ram.free_frames == free_before + 4
    assert env.mm.rss[2] == 4 and child.mm.rss[2] == 4
    expect = data[: 2 * P] + bytes(4 * P) + data[6 * P :]
    assert await env.read(s, 8 * P) == expect
    assert await env.read(s, 8 * P, pid=child.pid) == expect


async def test_remove_keeps_the_copies_of_private_mappings(env: Env) -> None:
    k, pid = env.k, env.p.pid
    fd, _ = await k.open(pid, "/f", O_CREAT | O_RDWR)
    data = pattern(4, 8)
    await k.pwrite(pid, fd, 0, data)
    shared = await env.mmap(4, flags=MAP_SHARED, fd=fd)
    private = await env.mmap(4, flags=MAP_PRIVATE, fd=fd)
    await env.read(private, 4 * P)
    await env.write(private + P, b"c" * P)  # page 1: a private copy
    env.fake.take()
    await k.madvise(pid, shared, 4 * P, MADV_REMOVE)
    got = env.fake.take()
    assert (Event.CLEAR, shared, shared + 4 * P) in got and (Event.CLEAR, private, private + 4 * P) in got
    assert await env.read(private, 4 * P) == ZERO_PAGE + b"c" * P + ZERO_PAGE * 2
    assert await k.pread(pid, fd, 0, 4 * P) == bytes(4 * P)  # the size stays


async def test_remove_refuses_what_linux_refuses(env: Env) -> None:
    k, pid = env.k, env.p.pid
    a = await env.mmap(4)
    await env.write(a, pattern(4, 9))
    with raises_errno(errno.EINVAL):
        await k.madvise(pid, a, 4 * P, MADV_REMOVE)  # private anonymous
    assert await env.read(a, P) == page(pattern(4, 9), 0)
    fd, _ = await k.open(pid, "/f", O_CREAT | O_RDWR)
    await k.pwrite(pid, fd, 0, pattern(4, 10))
    f = await env.mmap(4, flags=MAP_PRIVATE, fd=fd)
    with raises_errno(errno.EACCES):
        await k.madvise(pid, f, 4 * P, MADV_REMOVE)  # not a shared writable mapping
    s = await env.mmap(4, flags=SHM)
    await env.write(s, pattern(4, 11))
    await k.munmap(pid, s + 2 * P, 2 * P)
    with raises_errno(errno.ENOMEM):
        await k.madvise(pid, s, 4 * P, MADV_REMOVE)  # the mapped part is punched all the same
    assert await env.read(s, 2 * P) == bytes(2 * P)
    assert np.array_equal(present(env.ptes(s, s + 2 * P)), [True, True])
