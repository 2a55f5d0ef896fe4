"""tmpfs files: pread/pwrite, shared and private file mappings, shared anonymous
memory across fork, and the errnos of the file calls."""

from __future__ import annotations

import errno

import numpy as np

from hmm.abi import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    MAP_PRIVATE,
    MAP_SHARED,
    O_CREAT,
    O_RDONLY,
    O_RDWR,
    O_TRUNC,
    O_WRONLY,
    Event,
)
from hmmd.core.physmem import PG_ANON

from .conftest import RW, SHM, Env, P, page, pattern, raises_errno


async def test_pwrite_pread_round_trip(env: Env) -> None:
    k, pid = env.k, env.p.pid
    fd, fid = await k.open(pid, "/data", O_CREAT | O_RDWR)
    assert fid > 0
    data = pattern(3, 1)
    await k.pwrite(pid, fd, 0, data)
    assert await k.pread(pid, fd, 0, 3 * P) == data
    await k.pwrite(pid, fd, 5000, b"hello, page boundary" * 300)  # spans pages, unaligned
    expect = bytearray(data)
    expect[5000 : 5000 + 6000] = b"hello, page boundary" * 300
    assert await k.pread(pid, fd, 0, 3 * P) == bytes(expect)
    assert await k.pread(pid, fd, 4999, 7) == bytes(expect[4999:5006])
    assert await k.pread(pid, fd, 3 * P, 10) == b""  # at EOF
    assert await k.pread(pid, fd, 3 * P - 4, 100) == bytes(expect[-4:])  # short read
    await k.pwrite(pid, fd, 10 * P, b"tail")  # sparse: the gap reads zero
    assert await k.pread(pid, fd, 3 * P, 7 * P) == bytes(7 * P)
    assert await k.pread(pid, fd, 10 * P, 100) == b"tail"
    # Another open of the same path sees the same file.
    fd2, _ = await k.open(pid, "/data", O_RDONLY)
    assert await k.pread(pid, fd2, 0, 3 * P) == bytes(expect)
    assert await k.pread(pid, fd, 0, 0) == b""


async def test_file_call_errnos(env: Env) -> None:
    k, pid = env.k, env.p.pid
    with raises_errno(errno.ENOENT):
        await k.open(pid, "/missing", O_RDWR)
    with raises_errno(errno.EINVAL):
        await k.open(pid, "relative", O_CREAT | O_RDWR)
    with raises_errno(errno.EINVAL):
        await k.open(pid, "/x", O_CREAT | 3)  # O_ACCMODE is not an access mode
    with raises_errno(errno.ENOENT):
        await k.open(pid, "/dev/nonexistent", O_RDWR)
    wo, _ = await k.open(pid, "/w", O_CREAT | O_WRONLY)
    ro, _ = await k.open(pid, "/w", O_RDONLY)
    with raises_errno(errno.EBADF):
        await k.pread(pid, wo, 0, 1)
    with raises_errno(errno.EBADF):
        await k.pwrite(pid, ro, 0, b"x")
    with raises_errno(errno.EBADF):
        await k.pread(pid, 77, 0, 1)
    with raises_errno(errno.EINVAL):
        await k.pwrite(pid, wo, -1, b"x")
    with raises_errno(errno.EINVAL):
        await k.pread(pid, ro, -1, 1)
    with raises_errno(errno.EINVAL):  # the device is not a regular file
        await k.pread(pid, 3, 0, 1)
    with raises_errno(errno.EINVAL):
        await k.ftruncate(pid, ro, 0)
    with raises_errno(errno.EINVAL):
        await k.ftruncate(pid, wo, -1)
    with raises_errno(errno.EFBIG):
        await k.ftruncate(pid, wo, 1 << 50)
    with raises_errno(errno.EBADF):
        await k.close(pid, 77)
    await k.close(pid, wo)
    with raises_errno(errno.EBADF):
        await k.close(pid, wo)


async def test_open_trunc_empties_the_file(env: Env) -> None:
    k, pid = env.k, env.p.pid
    fd, _ = await k.open(pid, "/t", O_CREAT | O_RDWR)
    await k.pwrite(pid, fd, 0, pattern(2, 2))
    m = await env.mmap(2, flags=MAP_SHARED, fd=fd)
    assert await env.read(m, 2 * P) == pattern(2, 2)
    env.fake.take()
    fd2, _ = await k.open(pid, "/t", O_TRUNC | O_RDWR)
    assert env.fake.take() == [(Event.CLEAR, m, m + 2 * P)]
    assert await k.pread(pid, fd2, 0, P) == b""
    with raises_errno(errno.EFAULT):
        await env.read(m, 1)


async def test_shared_file_mapping_sees_pwrite_and_cpu_writes_reach_pread(env: Env) -> None:
    k, pid = env.k, env.p.pid
    fd, _ = await k.open(pid, "/shared", O_CREAT | O_RDWR)
    await k.pwrite(pid, fd, 0, pattern(4, 3))
    m = await env.mmap(4, flags=MAP_SHARED, fd=fd)
    assert await env.read(m, 4 * P) == pattern(4, 3)
    await k.pwrite(pid, fd, P + 10, b"via pwrite")  # the mapped page is the page cache
    assert await env.read(m + P + 10, 10) == b"via pwrite"
    await env.write(m + 3 * P, page(pattern(1, 4), 0))
    assert await k.pread(pid, fd, 3 * P, P) == pattern(1, 4)
    # A second process mapping the file shares the same pages.
    other = k.spawn("other")
    ofd, _ = await k.open(other.pid, "/shared", O_RDWR)
    om = await k.mmap(other.pid, 0, 4 * P, 3, MAP_SHARED, ofd, 0)
    assert await k.read(other.pid, om + 3 * P, P) == pattern(1, 4)
    await k.write(other.pid, om, b"from other")
    assert await env.read(m, 10) == b"from other"
    assert await k.pread(pid, fd, 0, 10) == b"from other"
    await k.read(other.pid, om, 4 * P)
    assert (env.pfns(m, m + 4 * P) == env.pfns(om, om + 4 * P, other.mm)).all()


async def test_device_writes_to_a_shared_file_page_reach_the_file(env: Env) -> None:
    k, pid = env.k, env.p.pid
    fd, _ = await k.open(pid, "/devfile", O_CREAT | O_RDWR)
    await k.ftruncate(pid, fd, 2 * P)
    m = await env.mmap(2, flags=MAP_SHARED, fd=fd)
    res = await env.fault(m, m + 2 * P, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    assert [int(f) for f in res.flags] == [HMM_PFN_VALID | HMM_PFN_WRITE] * 2
    env.dma_write(res.pfns, pattern(2, 5))
    assert await k.pread(pid, fd, 0, 2 * P) == pattern(2, 5)
    assert await env.read(m, 2 * P) == pattern(2, 5)
    assert env.mm.rss == [0, 2, 0]


async def test_private_file_mapping_is_copy_on_write(env: Env) -> None:
    k, pid = env.k, env.p.pid
    fd, _ = await k.open(pid, "/private", O_CREAT | O_RDWR)
    data = pattern(3, 6)
    await k.pwrite(pid, fd, 0, data)
    priv = await env.mmap(3, flags=MAP_PRIVATE, fd=fd)
    shared = await env.mmap(3, flags=MAP_SHARED, fd=fd)
    assert await env.read(priv, 3 * P) == data
    assert await env.read(shared, 3 * P) == data
    cache = env.pfns(priv, priv + 3 * P)
    assert (cache == env.pfns(shared, shared + 3 * P)).all()  # reads map the page cache
    env.fake.take()

    await env.write(priv + P, b"private")
    assert env.fake.take() == [(Event.CLEAR, priv + P, priv + 2 * P)]
    assert env.pfns(priv + P, priv + 2 * P)[0] != cache[1]
    assert await env.read(priv + P, 7) == b"private"
    assert await k.pread(pid, fd, 0, 3 * P) == data  # the file is unchanged
    assert await env.read(shared, 3 * P) == data

    # Later file changes show through pages never written privately, not through the copy.
    await k.pwrite(pid, fd, 0, b"A" * 3 * P)
    assert await env.read(priv, 3) == b"AAA"
    assert await env.read(priv + P, 7) == b"private"
    assert await env.read(priv + P + 7, P - 7) == page(data, 1)[7:]
    assert await env.read(priv + 2 * P, 3) == b"AAA"


async def test_private_file_write_before_read_copies_the_file_page(env: Env) -> None:
    k, pid = env.k, env.p.pid
    fd, _ = await k.open(pid, "/wbr", O_CREAT | O_RDWR)
    data = pattern(1, 7)
    await k.pwrite(pid, fd, 0, data)
    priv = await env.mmap(1, flags=MAP_PRIVATE, fd=fd)
    await env.write(priv + 100, b"xyz")
    expect = data[:100] + b"xyz" + data[103:]
    assert await env.read(priv, P) == expect
    assert await k.pread(pid, fd, 0, P) == data
    assert env.mm.rss == [1, 0, 0]


async def test_shared_anonymous_memory_stays_shared_across_fork(env: Env) -> None:
    s = await env.mmap(2, flags=SHM)
    await env.write(s, pattern(2, 8))
    child = await env.k.fork(env.p.pid)
    assert await env.read(s, 2 * P, pid=child.pid) == pattern(2, 8)
    await env.write(s + 10, b"child wrote", pid=child.pid)
    assert await env.read(s + 10, 11) == b"child wrote"
    await env.write(s + P, b"parent wrote")
    assert await env.read(s + P, 12, pid=child.pid) == b"parent wrote"
    assert (env.pfns(s, s + 2 * P) == env.pfns(s, s + 2 * P, child.mm)).all()
    # A grandchild shares it too, even after the parent exits.
    grandchild = await env.k.fork(child.pid)
    await env.k.exit(env.p.pid)
    await env.write(s, b"gc", pid=grandchild.pid)
    assert await env.read(s, 2, pid=child.pid) == b"gc"


async def test_private_anonymous_memory_is_isolated_across_fork(env: Env) -> None:
    a = await env.mmap(2)
    data = pattern(2, 9)
    await env.write(a, data)
    child = await env.k.fork(env.p.pid)
    await env.write(a, b"C" * P, pid=child.pid)
    await env.write(a + P, b"P" * P)
    assert await env.read(a, 2 * P) == data[:P] + b"P" * P
    assert await env.read(a, 2 * P, pid=child.pid) == b"C" * P + data[P:]
    # Never-written private memory: each side gets its own pages.
    z = await env.mmap(1)
    child2 = await env.k.fork(env.p.pid)
    await env.write(z, b"only parent")
    assert await env.read(z, 11, pid=child2.pid) == bytes(11)
    assert not np.intersect1d(env.pfns(z, z + P), env.pfns(z, z + P, child2.mm)).any()


async def test_mmap_of_a_device_handle_gets_zeroed_read_only_pages(env: Env) -> None:
    """Like dmirror's mmap: ordinary zeroed pages at once (VM_MIXEDMAP), read-only in a
    private writable mapping, counted as file pages; a write copies; migration refuses."""
    from hmm.abi import MAP_PRIVATE, MIGRATE_VMA_SELECT_SYSTEM
    from hmmd.core.pagetable import PTE_WRITE, pte_present

    devfd = next(fd for fd, f in env.p.fds.items() if f.device is not None)
    a = await env.k.mmap(env.p.pid, 0, 2 * P, RW, MAP_PRIVATE, devfd, 0)
    ptes = env.mm.page_state(a, a + 2 * P)
    assert pte_present(ptes).all() and not (ptes & PTE_WRITE).any()
    assert env.mm.rss == [0, 2, 0]
    assert await env.read(a, 2 * P) == bytes(2 * P)
    with raises_errno(errno.EINVAL):
        await env.k.migrate_setup(env.dev, env.p.pid, a, a + P, MIGRATE_VMA_SELECT_SYSTEM)
    await env.write(a, b"cow")
    assert await env.read(a, 3) == b"cow"
    assert env.mm.rss == [1, 1, 0]


async def test_fork_copies_a_device_handle_mapping(env: Env) -> None:
    """vma_needs_copy() holds for a driver's mapping (VM_MIXEDMAP) without any
    anonymous page: nothing could fault it in again. The child maps the same pages —
    a private mapping inside PROTECTION_PAGE, copy-on-write; a shared one as it is,
    with no event. The child used to get empty entries, and SIGBUS on first touch."""
    devfd = next(fd for fd, f in env.p.fds.items() if f.device is not None)
    a = await env.k.mmap(env.p.pid, 0, 2 * P, RW, MAP_PRIVATE, devfd, 0)
    b = await env.k.mmap(env.p.pid, 0, 2 * P, RW, MAP_SHARED, devfd, 0)
    await env.write(b, b"shared")
    env.fake.take()
    child = await env.k.fork(env.p.pid)
    assert [(e, s, t) for e, s, t in env.fake.take() if s <= b < t or s <= a < t] == \
        [(Event.PROTECTION_PAGE, a, a + 2 * P)]
    assert (env.pfns(a, a + 2 * P, child.mm) == env.pfns(a, a + 2 * P)).all()
    assert (env.pfns(b, b + 2 * P, child.mm) == env.pfns(b, b + 2 * P)).all()
    assert child.mm.rss == env.mm.rss == [0, 4, 0]
    assert await env.read(a, 2 * P, pid=child.pid) == bytes(2 * P)
    await env.write(a, b"child", pid=child.pid)  # private: the child's own copy
    assert await env.read(a, 5) == bytes(5)
    await env.write(b + P, b"both", pid=child.pid)  # shared: the parent sees it
    assert await env.read(b, 6) + await env.read(b + P, 4) == b"sharedboth"


async def test_exclusive_access_to_a_private_file_mapping_takes_its_copy(env: Env) -> None:
    """make_device_exclusive judges the page GUP faulted in writable, not the mapping:
    in a private file mapping that is the copy-on-write copy (anonymous), which may
    become exclusive, the file unchanged; a shared mapping's page cache may not
    (EOPNOTSUPP). Private file mappings used to be refused whole."""
    k, pid = env.k, env.p.pid
    fd, _ = await k.open(pid, "/excl", O_CREAT | O_RDWR)
    data = pattern(2, 21)
    await k.pwrite(pid, fd, 0, data)
    a = await env.mmap(2, flags=MAP_PRIVATE, fd=fd)
    await env.write(a + P, b"written")  # page 1: already its own copy; page 0: the file's page
    pfns = await k.make_exclusive(env.dev, pid, a, 2, True)
    assert (env.k.ram.flags[pfns] & PG_ANON).all()
    k.unlock_pages(env.dev, pfns.astype("<u8").tobytes())
    assert await env.read(a, 2 * P) == page(data, 0) + b"written" + page(data, 1)[7:]  # restored, CLEAR
    assert await k.pread(pid, fd, 0, 2 * P) == data
    s = await env.mmap(1, flags=MAP_SHARED, fd=fd)
    with raises_errno(errno.EOPNOTSUPP):
        await k.make_exclusive(env.dev, pid, s, 1, True)
    assert await k.pread(pid, fd, 0, 2 * P) == data
