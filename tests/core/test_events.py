"""Every CPU operation raises the invalidation the kernel raises, over the exact
range, and only before the page tables change (HMM-SEMANTICS.md §1.1 events,
§2.1 guarantee 1)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from hmm.abi import (
    CLEAR_REFS_ALL,
    CLEAR_REFS_ANON,
    CLEAR_REFS_MAPPED,
    CLEAR_REFS_MM_HIWATER_RSS,
    CLEAR_REFS_SOFT_DIRTY,
    HMM_PFN_REQ_FAULT,
    MADV_DONTNEED,
    MADV_FREE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    O_CREAT,
    O_RDWR,
    PROT_NONE,
    PROT_READ,
    ULONG_MAX,
    Event,
)
from hmm.errors import KernelError
from hmmd.core.pagetable import PTE_SOFT_DIRTY
from hmmd.core.physmem import ZERO_PFN
from hmmd.core.vma import VM_SOFTDIRTY

from .conftest import (
    ANON,
    RW,
    ZERO_PAGE,
    Env,
    FakeDevice,
    P,
    make_env,
    page,
    pattern,
    present,
    raises_errno,
    writable,
)

UNMAP, CLEAR = Event.UNMAP, Event.CLEAR
PVMA, PPAGE = Event.PROTECTION_VMA, Event.PROTECTION_PAGE


async def filled(env: Env, npages: int, seed: int, **kw) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    """A fresh mapping written with a pattern (so every page is present and writable)."""
    a = await env.mmap(npages, **kw)
    data = pattern(npages, seed)
    await env.write(a, data)
    assert await env.read(a, npages * P) == data
    return a, data


async def tmpfile(env: Env, path: str, data: bytes) -> int:
    fd, _ = await env.k.open(env.p.pid, path, O_CREAT | O_RDWR)
    await env.k.pwrite(env.p.pid, fd, 0, data)
    return fd


# ---- munmap ---------------------------------------------------------------------------------


async def test_munmap_sends_unmap_over_exact_range(env: Env) -> None:
    a, data = await filled(env, 8, 1)
    env.fake.take()
    await env.k.munmap(env.p.pid, a + 3 * P, 2 * P)
    assert env.fake.take() == [(UNMAP, a + 3 * P, a + 5 * P)]
    assert await env.read(a, 3 * P) == data[: 3 * P]
    assert await env.read(a + 5 * P, 3 * P) == data[5 * P :]
    for off in (3, 4):
        with raises_errno(errno.EFAULT):
            await env.read(a + off * P, 1)
    assert not present(env.ptes(a + 3 * P, a + 5 * P)).any()
    assert env.fake.take() == []


async def test_munmap_of_unmapped_range_sends_nothing(env: Env) -> None:
    a, data = await filled(env, 4, 2)
    await env.k.munmap(env.p.pid, a, 4 * P)
    env.fake.take()
    await env.k.munmap(env.p.pid, a, 4 * P)  # already gone: succeeds, nothing raised
    await env.k.munmap(env.p.pid, 0x10_0000_0000, 64 * P)  # never mapped
    assert env.fake.take() == []


async def test_munmap_partly_mapped_range_unmaps_only_the_mapping(env: Env) -> None:
    a, data = await filled(env, 4, 3)
    env.fake.take()
    await env.k.munmap(env.p.pid, a - 8 * P, 10 * P)  # 8 unmapped pages, then 2 mapped ones
    assert env.fake.take() == [(UNMAP, a, a + 2 * P)]
    assert await env.read(a + 2 * P, 2 * P) == data[2 * P :]


async def test_map_fixed_over_mapping_sends_unmap(env: Env) -> None:
    a, data = await filled(env, 6, 4)
    env.fake.take()
    b = await env.mmap(2, addr=a + 2 * P, flags=ANON | MAP_FIXED)
    assert b == a + 2 * P
    assert env.fake.take() == [(UNMAP, a + 2 * P, a + 4 * P)]
    assert await env.read(a + 2 * P, 2 * P) == bytes(2 * P)  # the new mapping is empty
    assert await env.read(a, 2 * P) == data[: 2 * P]
    assert await env.read(a + 4 * P, 2 * P) == data[4 * P :]


async def test_map_fixed_on_free_range_sends_nothing(env: Env) -> None:
    await env.mmap(4, addr=0x10_0000_0000, flags=ANON | MAP_FIXED)
    assert env.fake.take() == []


# ---- mprotect -------------------------------------------------------------------------------


async def test_mprotect_populated_sends_protection_vma(env: Env) -> None:
    a, data = await filled(env, 4, 5)
    env.fake.take()
    await env.k.mprotect(env.p.pid, a + P, 2 * P, PROT_READ)
    assert env.fake.take() == [(PVMA, a + P, a + 3 * P)]
    assert not writable(env.ptes(a + P, a + 3 * P)).any()
    assert writable(env.ptes(a, a + P)).all()
    assert await env.read(a, 4 * P) == data
    with raises_errno(errno.EFAULT):
        await env.write(a + P, b"x")
    await env.write(a, b"ok")  # the untouched part is still writable
    assert await env.read(a, 2) == b"ok"
    await env.k.mprotect(env.p.pid, a + P, 2 * P, RW)
    assert env.fake.take() == [(PVMA, a + P, a + 3 * P)]
    await env.write(a + P, b"again")
    assert await env.read(a + P, 5) == b"again"
    assert await env.read(a + 2 * P, 2 * P) == data[2 * P :]


async def test_mprotect_leaves_the_mappings_whose_protection_stays_alone(env: Env) -> None:
    """mprotect_fixup() returns early for a mapping whose protection does not change:
    no split, no PROTECTION_VMA (a mirror's range fault is not made to retry)."""
    a, data = await filled(env, 4, 7)
    env.fake.take()
    await env.k.mprotect(env.p.pid, a, 4 * P, RW)
    assert env.fake.take() == []
    await env.k.mprotect(env.p.pid, a + 2 * P, 2 * P, PROT_READ)
    env.fake.take()
    await env.k.mprotect(env.p.pid, a, 4 * P, PROT_READ)  # only [a, a + 2P) changes
    assert env.fake.take() == [(PVMA, a, a + 2 * P)]
    assert len(env.mm.vmas.overlapping(a, a + 4 * P)) == 1  # merged again
    assert await env.read(a, 4 * P) == data


async def test_mprotect_gives_write_back_where_a_write_fault_would_take_nothing(env: Env) -> None:
    """Write permission coming back makes writable (v6.1+ MM_CP_TRY_CHANGE_WRITABLE)
    the private anonymous pages the process owns (PageAnonExclusive), and every
    page of a shared mapping; not a page fork shared — even once the child is gone,
    until a write fault takes it back — nor one soft-dirty tracking has not seen
    written since clear_refs."""
    k, pid = env.k, env.p.pid
    a, _ = await filled(env, 3, 8)
    shm = await env.mmap(1, flags=MAP_SHARED | MAP_ANONYMOUS)
    await env.write(shm, b"s")

    async def read_only_then_rw() -> None:
        for start, n in ((a, 3), (shm, 1)):
            await k.mprotect(pid, start, n * P, PROT_READ)
            await k.mprotect(pid, start, n * P, RW)

    await read_only_then_rw()
    assert writable(env.ptes(a, a + 3 * P)).all() and writable(env.ptes(shm, shm + P)).all()
    child = await k.fork(pid)
    await read_only_then_rw()
    assert not writable(env.ptes(a, a + 3 * P)).any()  # the child maps them too
    assert writable(env.ptes(shm, shm + P)).all()
    await k.exit(child.pid)
    await read_only_then_rw()
    assert not writable(env.ptes(a, a + 3 * P)).any()  # no one else's, but fork took the mark
    before = env.pfns(a, a + P)
    await env.write(a, b"mine")  # the fault reuses the page (nothing else holds it) and marks it
    assert (env.pfns(a, a + P) == before).all()
    await read_only_then_rw()
    assert writable(env.ptes(a, a + 3 * P)).tolist() == [True, False, False]
    await k.clear_refs(pid, 4)
    await env.write(a + 2 * P, b"seen")
    await k.mprotect(pid, a, 3 * P, PROT_READ)
    await k.mprotect(pid, a, 3 * P, RW)
    assert writable(env.ptes(a, a + 3 * P)).tolist() == [False, False, True]


async def test_mprotect_gives_write_back_in_a_new_mapping_whatever_the_pte_s_soft_dirty_bit(env: Env) -> None:
    """A mapping not clear_ref'd since mmap has VM_SOFTDIRTY: soft-dirty tracking is
    off there (vma_soft_dirty_enabled()), so the PTE's own bit is not asked for."""
    k, pid = env.k, env.p.pid
    a, _ = await filled(env, 2, 9)
    await k.mprotect(pid, a, 2 * P, PROT_READ)
    env.mm.pt.scatter(a, env.ptes(a, a + 2 * P) & ~PTE_SOFT_DIRTY)  # (no call leaves just that)
    assert env.mm.vmas.find(a).flags & VM_SOFTDIRTY
    await k.mprotect(pid, a, 2 * P, RW)
    assert writable(env.ptes(a, a + 2 * P)).all()


async def test_mprotect_unpopulated_sends_nothing(env: Env) -> None:
    a = await env.mmap(4)
    await env.k.mprotect(env.p.pid, a, 4 * P, PROT_READ)
    await env.k.mprotect(env.p.pid, a, 4 * P, PROT_NONE)
    await env.k.mprotect(env.p.pid, a, 4 * P, RW)
    assert env.fake.take() == []
    assert await env.read(a, P) == ZERO_PAGE


# ---- madvise --------------------------------------------------------------------------------


async def test_madvise_dontneed_sends_clear_and_zaps(env: Env) -> None:
    a, data = await filled(env, 6, 6)
    env.fake.take()
    await env.k.madvise(env.p.pid, a + P, 3 * P, MADV_DONTNEED)
    assert env.fake.take() == [(CLEAR, a + P, a + 4 * P)]
    assert not env.ptes(a + P, a + 4 * P).any()
    assert await env.read(a + P, 3 * P) == bytes(3 * P)  # private anonymous: zero-fill again
    assert await env.read(a, P) == page(data, 0)
    assert await env.read(a + 4 * P, 2 * P) == data[4 * P :]


async def test_madvise_free_sends_clear(env: Env) -> None:
    a, data = await filled(env, 4, 7)
    env.fake.take()
    await env.k.madvise(env.p.pid, a, 2 * P, MADV_FREE)
    assert env.fake.take() == [(CLEAR, a, a + 2 * P)]
    # hmmd models no reclaim: lazily freed pages keep their contents until reused.
    assert await env.read(a, 4 * P) == data
    await env.write(a, b"dirty again")
    assert await env.read(a, 11) == b"dirty again"


async def test_madvise_free_on_non_anonymous_is_einval(env: Env) -> None:
    shm, sdata = await filled(env, 2, 8, flags=MAP_SHARED | MAP_ANONYMOUS)
    fd = await tmpfile(env, "/f", pattern(2, 9))
    f = await env.mmap(2, flags=MAP_PRIVATE, fd=fd)
    await env.read(f, 2 * P)
    env.fake.take()
    for addr in (shm, f):
        with raises_errno(errno.EINVAL):
            await env.k.madvise(env.p.pid, addr, 2 * P, MADV_FREE)
    assert env.fake.take() == []
    assert await env.read(shm, 2 * P) == sdata
    assert await env.read(f, 2 * P) == pattern(2, 9)


# ---- mremap ---------------------------------------------------------------------------------


async def test_mremap_move_sends_unmap_and_carries_pages(env: Env) -> None:
    await env.mmap(1)  # a blocker right above the next mapping: it cannot grow in place
    a, data = await filled(env, 4, 10)
    old_pfns = env.pfns(a, a + 4 * P)
    rss = list(env.mm.rss)
    env.fake.take()
    b = await env.k.mremap(env.p.pid, a, 4 * P, 8 * P, MREMAP_MAYMOVE, 0)
    assert b != a
    assert env.fake.take() == [(UNMAP, a, a + 4 * P)]
    assert (env.pfns(b, b + 4 * P) == old_pfns).all()  # moved, not copied
    assert env.mm.rss == rss
    assert await env.read(b, 4 * P) == data
    assert await env.read(b + 4 * P, 4 * P) == bytes(4 * P)
    with raises_errno(errno.EFAULT):
        await env.read(a, 1)
    assert not env.ptes(a, a + 4 * P).any()


async def test_mremap_fixed_unmaps_target_then_moves(env: Env) -> None:
    a, data = await filled(env, 4, 11)
    t, _ = await filled(env, 4, 12)
    env.fake.take()
    b = await env.k.mremap(env.p.pid, a, 4 * P, 4 * P, MREMAP_MAYMOVE | MREMAP_FIXED, t)
    assert b == t
    assert env.fake.take() == [(UNMAP, t, t + 4 * P), (UNMAP, a, a + 4 * P)]
    assert await env.read(t, 4 * P) == data
    with raises_errno(errno.EFAULT):
        await env.read(a, 1)


async def test_mremap_dontunmap_leaves_old_range_mapped_and_empty(env: Env) -> None:
    a, data = await filled(env, 4, 13)
    env.fake.take()
    b = await env.k.mremap(env.p.pid, a, 4 * P, 4 * P, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, 0)
    assert b != a
    assert env.fake.take() == [(UNMAP, a, a + 4 * P)]
    assert await env.read(b, 4 * P) == data
    assert any(v.start <= a and a + 4 * P <= v.end for v in env.mm.maps())
    assert not env.ptes(a, a + 4 * P).any()
    assert await env.read(a, 4 * P) == bytes(4 * P)
    await env.write(a, b"old range")
    assert await env.read(a, 9) == b"old range"
    assert await env.read(b, 4 * P) == data


async def test_mremap_shrink_unmaps_tail_and_grow_in_place_sends_nothing(env: Env) -> None:
    a, data = await filled(env, 4, 14)
    env.fake.take()
    assert await env.k.mremap(env.p.pid, a, 4 * P, 2 * P, 0, 0) == a
    assert env.fake.take() == [(UNMAP, a + 2 * P, a + 4 * P)]
    assert await env.k.mremap(env.p.pid, a, 2 * P, 4 * P, 0, 0) == a  # room above it again
    assert env.fake.take() == []
    assert await env.read(a, 4 * P) == data[: 2 * P] + bytes(2 * P)


async def test_mremap_move_of_file_mapping_keeps_the_file_offset(env: Env) -> None:
    """A moved file mapping faults the same file pages it mapped before the move."""
    fdata = pattern(8, 15)
    fd = await tmpfile(env, "/moved", fdata)
    await env.mmap(1)  # blocker
    a = await env.mmap(4, flags=MAP_SHARED, fd=fd, offset=2 * P)
    assert await env.read(a, P) == page(fdata, 2)  # page 0 populated, 1..3 not
    b = await env.k.mremap(env.p.pid, a, 4 * P, 6 * P, MREMAP_MAYMOVE, 0)
    assert b != a
    assert await env.read(b, 6 * P) == fdata[2 * P :]
    low = 0x10_0000_0000  # a move to a lower address (negative offset delta)
    c = await env.k.mremap(env.p.pid, b, 6 * P, 6 * P, MREMAP_MAYMOVE | MREMAP_FIXED, low)
    assert c == low
    await env.k.madvise(env.p.pid, c, 6 * P, MADV_DONTNEED)
    assert await env.read(c, 6 * P) == fdata[2 * P :]


async def test_mremap_move_of_shared_anonymous_keeps_its_pages(env: Env) -> None:
    await env.mmap(1)  # blocker
    a, data = await filled(env, 4, 16, flags=MAP_SHARED | MAP_ANONYMOUS)
    b = await env.k.mremap(env.p.pid, a, 4 * P, 8 * P, MREMAP_MAYMOVE, 0)
    assert b != a
    await env.k.madvise(env.p.pid, b, 8 * P, MADV_DONTNEED)  # drop the PTEs; the shmem pages stay
    assert await env.read(b, 4 * P) == data
    # The object keeps the size mmap gave it, as in Linux: the grown part is past its end.
    with pytest.raises(KernelError) as e:
        await env.read(b + 4 * P, 1)
    assert e.value.errno == errno.EFAULT


# ---- fork / COW -----------------------------------------------------------------------------


async def test_fork_sends_protection_page_per_private_vma_with_anon_pages(env: Env) -> None:
    fd = await tmpfile(env, "/ro", pattern(2, 17))
    a, adata = await filled(env, 4, 18)  # private, written: PROTECTION_PAGE
    untouched = await env.mmap(4, prot=PROT_READ)  # private, never touched: nothing
    read_only = await env.mmap(4)  # private, only read (zero page): nothing
    assert await env.read(read_only, 4 * P) == bytes(4 * P)
    s, sdata = await filled(env, 4, 19, flags=MAP_SHARED | MAP_ANONYMOUS)  # shared: nothing
    f = await env.mmap(2, flags=MAP_PRIVATE, fd=fd)  # private file, only read: nothing
    assert await env.read(f, 2 * P) == pattern(2, 17)
    d, ddata = await filled(env, 3, 20)  # private, written: PROTECTION_PAGE
    assert len({a, untouched, read_only, s, f, d}) == 6
    env.fake.take()
    child = await env.k.fork(env.p.pid)
    assert env.fake.take() == sorted([(PPAGE, a, a + 4 * P), (PPAGE, d, d + 3 * P)], key=lambda t: t[1])
    # The parent's COW pages are write-protected; the shared mapping is not.
    assert not writable(env.ptes(a, a + 4 * P)).any()
    assert not writable(env.ptes(d, d + 3 * P)).any()
    assert writable(env.ptes(s, s + 4 * P)).all()
    for pid in (env.p.pid, child.pid):
        assert await env.read(a, 4 * P, pid=pid) == adata
        assert await env.read(d, 3 * P, pid=pid) == ddata
        assert await env.read(s, 4 * P, pid=pid) == sdata
        assert await env.read(f, 2 * P, pid=pid) == pattern(2, 17)
        assert await env.read(untouched, P, pid=pid) == ZERO_PAGE
    assert env.fake.take() == []  # reads raise nothing


async def test_fork_without_anonymous_pages_sends_nothing(env: Env) -> None:
    await env.mmap(4)
    s, _ = await filled(env, 2, 21, flags=MAP_SHARED | MAP_ANONYMOUS)
    env.fake.take()
    await env.k.fork(env.p.pid)
    assert env.fake.take() == []


async def test_cow_write_after_fork_sends_clear_and_isolates(env: Env) -> None:
    a, data = await filled(env, 4, 22)
    child = await env.k.fork(env.p.pid)
    shared = env.pfns(a, a + 4 * P)
    assert (env.pfns(a, a + 4 * P, child.mm) == shared).all()
    env.fake.take()

    await env.write(a + 2 * P + 100, b"parent!")
    assert env.fake.take() == [(CLEAR, a + 2 * P, a + 3 * P)]
    mine = bytearray(data)
    mine[2 * P + 100 : 2 * P + 107] = b"parent!"
    assert await env.read(a, 4 * P) == bytes(mine)
    assert await env.read(a, 4 * P, pid=child.pid) == data
    assert env.pfns(a + 2 * P, a + 3 * P)[0] != shared[2]
    assert env.pfns(a + 2 * P, a + 3 * P, child.mm)[0] == shared[2]

    # The child breaks COW on page 1 in its own mm: the parent's notifier hears nothing.
    await env.write(a + P, b"child!", pid=child.pid)
    assert env.fake.take() == []
    assert await env.read(a + P, P) == page(data, 1)
    # Page 1 is now the parent's alone: its write reuses the page, no copy, no event.
    before = env.pfns(a + P, a + 2 * P)[0]
    await env.write(a + P, b"reuse")
    assert env.fake.take() == []
    assert env.pfns(a + P, a + 2 * P)[0] == before
    assert (await env.read(a + P, 6, pid=child.pid)) == b"child!"
    assert (await env.read(a + P, 5)) == b"reuse"


async def test_cow_in_child_is_seen_by_a_notifier_on_the_child(env: Env) -> None:
    a, data = await filled(env, 2, 23)
    child = await env.k.fork(env.p.pid)  # inherits the open /dev/fake0
    csub = await env.k.insert_notifier(env.dev, child.pid, a, 2 * P)
    env.fake.take()
    await env.write(a + P, b"c", pid=child.pid)
    assert env.fake.take() == [(CLEAR, a + P, a + 2 * P)]
    assert env.fake.events == []
    await env.k.remove_notifier(env.dev, csub.id)


async def test_write_to_zero_page_sends_clear(env: Env) -> None:
    a = await env.mmap(3)
    assert await env.read(a, P) == ZERO_PAGE
    ptes = env.ptes(a, a + 3 * P)
    assert present(ptes[:1]).all() and not writable(ptes[:1]).any()
    assert env.pfns(a, a + P)[0] == ZERO_PFN
    assert not ptes[1:].any()
    env.fake.take()
    data = pattern(3, 24)
    await env.write(a, data)  # page 0 replaces the zero page, pages 1-2 are fresh
    assert env.fake.take() == [(CLEAR, a, a + P)]
    assert await env.read(a, 3 * P) == data
    assert (env.pfns(a, a + 3 * P) != ZERO_PFN).all()


# ---- clear_refs -----------------------------------------------------------------------------


async def test_clear_refs_soft_dirty_sends_soft_dirty_over_everything(env: Env) -> None:
    a, data = await filled(env, 2, 25)
    env.fake.take()
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_SOFT_DIRTY)
    assert env.fake.take() == [(Event.SOFT_DIRTY, 0, ULONG_MAX)]
    assert ULONG_MAX == 2**64 - 1
    assert not writable(env.ptes(a, a + 2 * P)).any()
    assert await env.read(a, 2 * P) == data
    await env.write(a, b"sd")  # the page is exclusive: re-enabled without a copy or event
    assert env.fake.take() == []
    assert await env.read(a, 2) == b"sd"


@pytest.mark.parametrize("value", [CLEAR_REFS_ALL, CLEAR_REFS_ANON, CLEAR_REFS_MAPPED, CLEAR_REFS_MM_HIWATER_RSS])
async def test_other_clear_refs_values_send_nothing(env: Env, value: int) -> None:
    a, data = await filled(env, 2, 26)
    env.fake.take()
    await env.k.clear_refs(env.p.pid, value)
    assert env.fake.take() == []
    assert await env.read(a, 2 * P) == data


async def test_clear_refs_unknown_value_is_einval(env: Env) -> None:
    with raises_errno(errno.EINVAL):
        await env.k.clear_refs(env.p.pid, 6)
    assert env.fake.take() == []


# ---- exit -----------------------------------------------------------------------------------


async def test_exit_sends_release_once_per_notifier_then_unmap() -> None:
    log: list = []
    env = await make_env()
    env.fake.log = log
    fake_b = FakeDevice(log)
    dev_b = env.k.register_device("fakeB", fake_b)
    await env.k.open(env.p.pid, "/dev/fakeB", O_RDWR)
    a, _ = await filled(env, 4, 27)
    sub2 = await env.k.insert_notifier(env.dev, env.p.pid, a, 4 * P)
    sub3 = await env.k.insert_notifier(dev_b, env.p.pid, 0x1000_0000, 0x1000)  # nothing mapped there
    ids = {env.sub.id, sub2.id, sub3.id}
    log.clear()
    env.fake.events.clear()
    await env.k.exit(env.p.pid)

    releases, unmaps = log[:3], log[3:]
    assert [e.event for e in releases] == [Event.RELEASE] * 3
    assert {e.notifier for e in releases} == ids
    assert all((e.start, e.end, e.blockable) == (0, ULONG_MAX, True) for e in releases)
    assert [e.event for e in unmaps] == [Event.UNMAP] * 3
    assert {e.notifier for e in unmaps} == ids
    assert all((e.start, e.end) == (0, ULONG_MAX) for e in unmaps)
    assert len({e.cur_seq for e in releases}) == 1
    assert unmaps[0].cur_seq > releases[0].cur_seq
    assert len(fake_b.released) == 1 and len(env.fake.released) == 1
    with raises_errno(errno.ESRCH):
        await env.read(a, 1)


async def test_exit_without_mappings_sends_only_release(env: Env) -> None:
    await env.k.exit(env.p.pid)
    assert env.fake.take() == [(Event.RELEASE, 0, ULONG_MAX)]


# ---- truncate -------------------------------------------------------------------------------


async def test_ftruncate_shrink_sends_clear_and_access_beyond_eof_faults(env: Env) -> None:
    fdata = pattern(4, 28)
    fd = await tmpfile(env, "/trunc", fdata)
    a = await env.mmap(4, flags=MAP_SHARED, fd=fd)
    assert await env.read(a, 4 * P) == fdata
    env.fake.take()

    await env.k.ftruncate(env.p.pid, fd, 2 * P + 100)
    assert env.fake.take() == [(CLEAR, a + 3 * P, a + 4 * P)]
    assert await env.read(a, 2 * P) == fdata[: 2 * P]
    # The page holding EOF stays mapped; the part past EOF reads zero.
    assert await env.read(a + 2 * P, P) == fdata[2 * P : 2 * P + 100] + bytes(P - 100)
    with raises_errno(errno.EFAULT):
        await env.read(a + 3 * P, 1)
    with raises_errno(errno.EFAULT):
        await env.write(a + 3 * P, b"x")
    assert await env.k.pread(env.p.pid, fd, 0, 8 * P) == fdata[: 2 * P + 100]

    await env.k.ftruncate(env.p.pid, fd, P)
    assert env.fake.take() == [(CLEAR, a + P, a + 4 * P)]
    with raises_errno(errno.EFAULT):
        await env.read(a + P, 1)
    assert await env.read(a, P) == page(fdata, 0)

    await env.k.ftruncate(env.p.pid, fd, 4 * P)  # growing raises nothing; the new part is zero
    assert env.fake.take() == []
    assert await env.read(a, 4 * P) == page(fdata, 0) + bytes(3 * P)


async def test_ftruncate_of_private_mapping_zaps_cow_copies(env: Env) -> None:
    fdata = pattern(2, 29)
    fd = await tmpfile(env, "/priv", fdata)
    a = await env.mmap(2, flags=MAP_PRIVATE, fd=fd)
    await env.write(a + P, b"private copy")
    env.fake.take()
    await env.k.ftruncate(env.p.pid, fd, P)
    assert env.fake.take() == [(CLEAR, a + P, a + 2 * P)]
    with raises_errno(errno.EFAULT):
        await env.read(a + P, 1)
    assert env.mm.rss[0] == 0


# ---- invalidate before change -----------------------------------------------------------------

OPS = ["munmap", "map_fixed", "mprotect", "dontneed", "free", "mremap", "fork", "cow", "zero_cow",
       "clear_refs", "exit", "truncate"]


@pytest.mark.parametrize("op", OPS)
async def test_invalidation_is_delivered_before_the_page_tables_change(op: str) -> None:
    """Inside the device's invalidate the CPU still maps the old pages with their old
    contents, and the device can still DMA them; afterwards it cannot."""
    env = await make_env()
    n = 4
    fd = -1
    if op == "truncate":
        data = pattern(n, 30)
        fd = await tmpfile(env, "/t", data)
        a = await env.mmap(n, flags=MAP_SHARED, fd=fd)
        assert await env.read(a, n * P) == data
    elif op == "zero_cow":
        a = await env.mmap(n)
        data = bytes(n * P)
        assert await env.read(a, n * P) == data
    else:
        a, data = await filled(env, n, 31)
    if op == "cow":
        await env.k.fork(env.p.pid)
    res = await env.fault(a, a + n * P, HMM_PFN_REQ_FAULT)
    granted = res.pfns.astype(np.int64)
    assert (granted == env.pfns(a, a + n * P)).all()
    assert env.dma_read(granted) == data
    old_ptes = env.ptes(a, a + n * P)
    env.fake.take()

    seen: list = []

    def hook(sub, rng, cur_seq):  # type: ignore[no-untyped-def]
        if not seen:
            seen.append((rng.event, rng.start, rng.end, env.ptes(a, a + n * P), env.dma_read(granted)))

    env.fake.hook = hook
    pid = env.p.pid
    if op == "munmap":
        await env.k.munmap(pid, a + P, 2 * P)
    elif op == "map_fixed":
        await env.mmap(2, addr=a + P, flags=ANON | MAP_FIXED)
    elif op == "mprotect":
        await env.k.mprotect(pid, a, n * P, PROT_READ)
    elif op == "dontneed":
        await env.k.madvise(pid, a + P, 2 * P, MADV_DONTNEED)
    elif op == "free":
        await env.k.madvise(pid, a, n * P, MADV_FREE)
    elif op == "mremap":
        await env.k.mremap(pid, a, n * P, n * P, MREMAP_MAYMOVE | MREMAP_FIXED, 0x10_0000_0000)
    elif op == "fork":
        await env.k.fork(pid)
    elif op in ("cow", "zero_cow"):
        await env.write(a + P, b"new bytes")
    elif op == "clear_refs":
        await env.k.clear_refs(pid, CLEAR_REFS_SOFT_DIRTY)
    elif op == "exit":
        await env.k.exit(pid)
    elif op == "truncate":
        await env.k.ftruncate(pid, fd, P)

    assert seen, "no invalidation reached the device"
    event, s, e, ptes_in_cb, data_in_cb = seen[0]
    assert (ptes_in_cb == old_ptes).all(), "page tables changed before the invalidation was acknowledged"
    assert data_in_cb == data
    assert not (env.ptes(a, a + n * P) == old_ptes).all(), "the operation changed nothing"
    # The device lost its DMA rights over the invalidated pages.
    lo, hi = max(a, s), min(a + n * P, e)
    inval = granted[(lo - a) // P : (hi - a) // P]
    assert len(inval)
    if op == "zero_cow":  # the other pages still hold (valid) grants on the zero page
        assert env.dev.grants.readable[ZERO_PFN] == n - 1
        return
    with raises_errno(errno.EFAULT):
        env.dma_read(inval)
    assert env.dev.violations == 1
