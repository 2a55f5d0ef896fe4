"""Reclaim of tmpfs and shmem pages (HMM-SEMANTICS.md §1.1, CLEAR from "reclaim and
swap-out"): a file page is unmapped from every process that maps it, each mirror
told by a CLEAR first, then leaves its page cache for a swap slot the file keeps;
the next fault or write brings it back, a read copies it out, a truncate frees the
slot. Shared memory stays shared through the round trip. Hugetlb pages never go."""

from __future__ import annotations

import numpy as np

from hmm.abi import (
    CLEAR_REFS_ALL,
    MADV_PAGEOUT,
    MAP_ANONYMOUS,
    MAP_HUGETLB,
    MAP_PRIVATE,
    MAP_SHARED,
    O_RDWR,
    O_TMPFILE,
    Event,
)
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import Kernel
from hmmd.core.mm import RSS_ANON, RSS_FILE, RSS_SHMEM
from hmmd.core.pagetable import SWP_SWAP, pte_swp_type
from hmmd.core.reclaim import shrink
from hmmd.core.tmpfs import Inode

from .conftest import Env, P, make_env, pattern
from .test_reclaim import RAM_PAGES, small_env

SHARED = MAP_SHARED | MAP_ANONYMOUS


def inode_at(env: Env, addr: int, pid: int | None = None) -> Inode:
    mm = env.k.process(env.p.pid if pid is None else pid).mm
    vma = mm.vmas.find(addr)
    assert vma is not None and vma.file is not None
    return vma.file


async def shared_filled(env: Env, npages: int, seed: int) -> tuple[int, bytes]:
    a = await env.mmap(npages, flags=SHARED)
    data = pattern(npages, seed)
    await env.write(a, data)
    return a, data


async def tmpfile(env: Env, npages: int, seed: int) -> tuple[int, bytes]:
    """An unnamed tmpfs file written with pwrite (its pages cached, mapped by no one)."""
    fd, _ = await env.k.open(env.p.pid, "/tmp", O_TMPFILE | O_RDWR)
    data = pattern(npages, seed)
    await env.k.pwrite(env.p.pid, fd, 0, data)
    return fd, data


async def test_shared_memory_goes_from_the_page_cache_to_swap_after_a_clear_and_comes_back() -> None:
    env = await small_env()
    a, data = await shared_filled(env, 20, 1)
    inode = inode_at(env, a)
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_ALL)
    env.fake.take()
    assert env.mm.rss[RSS_SHMEM] == 20
    assert await shrink(env.mm, 8) == 8
    assert env.fake.take() == [(Event.CLEAR, a, a + 8 * P)]
    assert (env.ptes(a, a + 8 * P) == 0).all()  # a file entry is cleared, not a swap entry
    assert sorted(inode.swapped) == list(range(8)) and (inode.cache[:8] == -1).all()
    assert env.k.swap.used == 8 and env.mm.swapents == 0 and env.mm.rss[RSS_SHMEM] == 12
    assert check_invariants(env.k) == []
    assert await env.read(a, 20 * P) == data  # faulted back in from the slots, which are freed
    assert not inode.swapped and env.k.swap.used == 0 and env.mm.rss[RSS_SHMEM] == 20
    assert check_invariants(env.k) == []


async def test_a_page_shared_by_two_processes_goes_from_both_and_stays_shared() -> None:
    env = await small_env()
    a, data = await shared_filled(env, 20, 2)
    child = await env.k.fork(env.p.pid)
    assert await env.read(a, 20 * P, pid=child.pid) == data  # mapped in the child too
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_ALL)
    await env.k.clear_refs(child.pid, CLEAR_REFS_ALL)
    env.fake.take()
    assert await env.k.direct_reclaim(1) == 20  # the shortfall and the watermark: all 20
    assert (env.ptes(a, a + 20 * P) == 0).all() and (env.ptes(a, a + 20 * P, child.mm) == 0).all()
    assert env.k.swap.used == 20 and all(env.k.swap.refs(s) == 1 for s in inode_at(env, a).swapped.values())
    assert {e for e, _, _ in env.fake.take()} == {Event.CLEAR}
    assert check_invariants(env.k) == []
    # Back in, one frame for both: a store by the child is seen by the parent.
    assert await env.read(a, 20 * P, pid=child.pid) == data
    await env.write(a + 3 * P, b"child", pid=child.pid)
    assert await env.read(a + 3 * P, 5) == b"child"
    assert env.pfns(a + 3 * P, a + 4 * P) == env.pfns(a + 3 * P, a + 4 * P, child.mm)
    assert check_invariants(env.k) == []


async def test_a_shared_page_stays_while_another_mapper_is_busy() -> None:
    env = await small_env()
    a, data = await shared_filled(env, 20, 3)
    child = await env.k.fork(env.p.pid)
    assert await env.read(a, 20 * P, pid=child.pid) == data
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_ALL)
    assert child.mm.lock.try_acquire_write()  # (an mmap in the child, say)
    try:
        assert await shrink(env.mm, 20) == 0
    finally:
        await child.mm.lock.release_write()
    assert env.k.swap.used == 0 and (pte_swp_type(env.ptes(a, a + 20 * P)) == 0).all()
    assert await env.read(a, 20 * P) == data
    assert check_invariants(env.k) == []


async def test_a_pinned_shared_page_stays() -> None:
    env = await small_env()
    a, data = await shared_filled(env, 20, 4)
    pin = await env.k.pin_user_pages(env.p.pid, a, 5, write=False, longterm=False, hold=True)
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_ALL)
    assert await shrink(env.mm, 20) == 15
    assert sorted(inode_at(env, a).swapped) == list(range(5, 20))
    assert (env.pfns(a, a + 5 * P) > 0).all()
    env.k.unpin_user_pages(env.p.pid, pin)
    assert await env.read(a, 20 * P) == data
    assert check_invariants(env.k) == []


async def test_a_private_file_mapping_loses_its_cache_pages_and_swaps_its_own() -> None:
    env = await small_env()
    fd, data = await tmpfile(env, 16, 5)
    a = await env.mmap(16, flags=MAP_PRIVATE, fd=fd)
    assert await env.read(a, 16 * P) == data  # the cache's pages, mapped read-only
    await env.write(a, b"mine" * (4 * P // 4))  # the first four: private copies (COW)
    mine = b"mine" * (4 * P // 4) + data[4 * P :]
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_ALL)
    assert env.mm.rss[RSS_ANON] == 4 and env.mm.rss[RSS_FILE] == 12
    assert await shrink(env.mm, 16) == 16
    swp = pte_swp_type(env.ptes(a, a + 16 * P))
    assert (swp[:4] == SWP_SWAP).all() and (env.ptes(a + 4 * P, a + 16 * P) == 0).all()
    assert env.mm.swapents == 4 and sorted(inode_at(env, a).swapped) == list(range(4, 16))
    assert env.mm.rss == [0, 0, 0]
    assert await env.read(a, 16 * P) == mine
    assert await env.k.pread(env.p.pid, fd, 0, 16 * P) == data  # the file never saw the copies
    assert check_invariants(env.k) == []


async def test_madv_pageout_takes_file_pages_mapped_only_here() -> None:
    env = await small_env()
    a, adata = await shared_filled(env, 8, 12)
    fd, fdata = await tmpfile(env, 8, 13)
    f = await env.mmap(8, flags=MAP_PRIVATE, fd=fd)
    assert await env.read(f, 8 * P) == fdata
    await env.write(f, b"copy")  # the first page: a private copy
    env.fake.take()
    await env.k.madvise(env.p.pid, a, 8 * P, MADV_PAGEOUT)
    await env.k.madvise(env.p.pid, f, 8 * P, MADV_PAGEOUT)
    assert env.fake.take() == [(Event.CLEAR, a, a + 8 * P), (Event.CLEAR, f, f + 8 * P)]
    assert len(inode_at(env, a).swapped) == 8 and len(inode_at(env, f).swapped) == 7
    assert swapped_entries(env, f, 8) == [True] + [False] * 7 and (env.ptes(f + P, f + 8 * P) == 0).all()
    assert env.mm.rss == [0, 0, 0] and env.k.swap.used == 16
    assert await env.read(a, 8 * P) == adata and await env.read(f, 8 * P) == b"copy" + fdata[4:]
    child = await env.k.fork(env.p.pid)  # shared memory now mapped twice: it stays
    assert await env.read(a, 8 * P, pid=child.pid) == adata
    await env.k.madvise(env.p.pid, a, 8 * P, MADV_PAGEOUT)
    assert not inode_at(env, a).swapped and (env.pfns(a, a + 8 * P) > 0).all()
    assert check_invariants(env.k) == []


def swapped_entries(env: Env, addr: int, npages: int) -> list[bool]:
    return (pte_swp_type(env.ptes(addr, addr + npages * P)) == SWP_SWAP).tolist()


async def test_file_pages_nobody_maps_go_too_and_read_write_truncate_and_close_find_them() -> None:
    env = await small_env()
    fd, data = await tmpfile(env, 40, 6)
    inode = next(i for i in env.k.inodes([env.mm]) if len(i.swapped) == 0 and i.size == 40 * P)
    assert await env.k.direct_reclaim(8) == 8 + 32  # nothing mapped: all from the page cache
    assert len(inode.swapped) == 40 and env.k.swap.used == 40
    assert await env.k.pread(env.p.pid, fd, 5 * P + 7, 2 * P) == data[5 * P + 7 : 7 * P + 7]
    assert len(inode.swapped) == 40  # a read copies out of the slots
    await env.k.pwrite(env.p.pid, fd, 10 * P + 100, b"new")  # a write brings its page back first
    assert 10 not in inode.swapped and inode.cache[10] >= 0
    data = data[: 10 * P + 100] + b"new" + data[10 * P + 103 :]
    assert await env.k.pread(env.p.pid, fd, 0, 40 * P) == data
    await env.k.ftruncate(env.p.pid, fd, 20 * P + 10)  # frees the slots beyond, zeroes the tail
    assert sorted(inode.swapped) == [p for p in range(21) if p != 10] and env.k.swap.used == 20
    await env.k.ftruncate(env.p.pid, fd, 21 * P)
    assert await env.k.pread(env.p.pid, fd, 0, 21 * P) == data[: 20 * P + 10] + bytes(P - 10)
    assert check_invariants(env.k) == []
    await env.k.close(env.p.pid, fd)  # the unnamed file goes: its slots are free again
    assert env.k.swap.used == 0
    assert check_invariants(env.k) == []


async def test_memory_pressure_takes_shared_and_private_pages_alike_and_the_data_survives() -> None:
    env = await small_env()
    s, sdata = await shared_filled(env, 60, 7)
    a = await env.mmap(30)
    adata = pattern(30, 8)
    await env.write(a, adata)
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_ALL)
    b = await env.mmap(60)
    bdata = pattern(60, 9)
    await env.write(b, bdata)  # 150 pages in a RAM of 128: the old ones go, of both kinds
    assert env.k.reclaimer.reclaimed >= 150 - RAM_PAGES
    assert (pte_swp_type(env.ptes(a, a + 30 * P)) == SWP_SWAP).any() and inode_at(env, s).swapped
    assert await env.read(s, 60 * P) == sdata and await env.read(a, 30 * P) == adata
    assert await env.read(b, 60 * P) == bdata
    assert check_invariants(env.k) == []


async def test_hugetlb_pages_never_go() -> None:
    env = await make_env(Kernel(1024 * P, hugetlb_pages=1, swap_bytes=1024 * P))
    h = await env.mmap(512, flags=SHARED | MAP_HUGETLB)
    data = pattern(512, 10)
    await env.write(h, data)
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_ALL)
    assert await env.k.direct_reclaim(10) == 0
    assert env.k.swap.used == 0 and not inode_at(env, h).swapped
    assert (env.pfns(h, h + 512 * P) == env.pfns(h, h + P)[0] + np.arange(512)).all()
    assert await env.read(h, 512 * P) == data
    assert check_invariants(env.k) == []


async def test_the_pages_of_unmapped_shared_memory_are_freed_with_it() -> None:
    env = await small_env()
    a, _ = await shared_filled(env, 20, 11)
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_ALL)
    assert await shrink(env.mm, 20) == 20 and env.k.swap.used == 20
    await env.k.munmap(env.p.pid, a, 20 * P)  # the unnamed shmem file's last mapping
    assert env.k.swap.used == 0
    assert check_invariants(env.k) == []
