"""/proc/pid/pagemap's soft-dirty and exclusive bits (fs/proc/task_mmu.c): a new
mapping is soft-dirty as a whole until clear_refs, mremap and migration carry the
bit with the page, and only a present page can be mapped exclusively."""

from __future__ import annotations

import numpy as np

from hmm.abi import (
    CLEAR_REFS_SOFT_DIRTY,
    MADV_PAGEOUT,
    MAP_FIXED,
    MAP_HUGETLB,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PMD_SIZE,
)
from hmmd.core.gup import PM_MMAP_EXCLUSIVE, PM_PRESENT, PM_SOFT_DIRTY, PM_SWAP, pagemap
from hmmd.core.kernel import Kernel
from hmmd.core.vma import VM_SOFTDIRTY

from .conftest import ANON, RAM_BYTES, RW, P, make_env
from .test_migrate import make_g


def bits(entries: np.ndarray, mask: np.uint64) -> list[bool]:
    return [bool(int(e) & int(mask)) for e in entries]


async def test_a_new_mapping_is_soft_dirty_everywhere_until_clear_refs() -> None:
    """VM_SOFTDIRTY (__mmap_complete): written page, zero page and hole alike."""
    g = await make_g()
    env = g.env
    a = await env.mmap(4)
    await env.write(a, b"x")
    await env.read(a + P, P)  # the zero page
    await env.write(a + 3 * P, b"y")
    await g.to_device(a + 3 * P, a + 4 * P)  # page 2 stays a hole
    assert bits(pagemap(env.mm, a, 4), PM_SOFT_DIRTY) == [True] * 4
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_SOFT_DIRTY)
    assert not env.mm.vmas.find(a).flags & VM_SOFTDIRTY
    assert bits(pagemap(env.mm, a, 4), PM_SOFT_DIRTY) == [False] * 4  # the device entry's bit too
    await env.write(a + P, b"z")
    assert bits(pagemap(env.mm, a, 4), PM_SOFT_DIRTY) == [False, True, False, False]


async def test_only_a_present_normal_page_is_mapped_exclusively() -> None:
    """PM_MMAP_EXCLUSIVE needs PM_PRESENT and a page (not the zero page)."""
    g = await make_g()
    env = g.env
    a = await env.mmap(3)
    await env.write(a, b"x")
    await env.read(a + P, P)
    await env.write(a + 2 * P, b"y")
    await g.to_device(a + 2 * P, a + 3 * P)
    pm = pagemap(env.mm, a, 3)
    assert bits(pm, PM_PRESENT) == [True, True, False] and bits(pm, PM_SWAP) == [False, False, True]
    assert bits(pm, PM_MMAP_EXCLUSIVE) == [True, False, False]


async def test_fork_gives_the_child_the_parents_soft_dirty_bits() -> None:
    """copy_present_pte() and copy_nonpresent_pte() copy the entry, bit included, and
    the VMA's VM_SOFTDIRTY; only a writable device-private entry made read-only loses
    its bit, in both (the kernel does not preserve it there)."""
    g = await make_g()
    env = g.env
    a = await env.mmap(5)
    await env.write(a, b"dirty before clear_refs")
    await env.write(a + 4 * P, b"device")
    await g.to_device(a + 4 * P, a + 5 * P)
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_SOFT_DIRTY)
    await env.write(a + P, b"dirty")
    await env.write(a + 2 * P, b"to swap")
    await env.k.madvise(env.p.pid, a + 2 * P, P, MADV_PAGEOUT)
    await env.write(a + 3 * P, b"device, dirty")
    await g.to_device(a + 3 * P, a + 4 * P)
    before = pagemap(env.mm, a, 5)
    assert bits(before, PM_SWAP) == [False, False, True, True, True]
    assert bits(before, PM_SOFT_DIRTY) == [False, True, True, True, False]
    child = await env.k.fork(env.p.pid)
    want = [False, True, True, False, False]
    assert bits(pagemap(child.mm, a, 5), PM_SOFT_DIRTY) == want
    assert bits(pagemap(env.mm, a, 5), PM_SOFT_DIRTY) == want
    b = await env.k.mmap(env.p.pid, 0, P, RW, ANON, -1, 0)  # a new mapping: VM_SOFTDIRTY, the child's too
    child2 = await env.k.fork(env.p.pid)
    assert bits(pagemap(child2.mm, b, 1), PM_SOFT_DIRTY) == [True]


async def test_mremap_marks_every_moved_entry_soft_dirty() -> None:
    """move_soft_dirty_pte(): present and swap-like entries; a hole stays clean."""
    g = await make_g()
    env = g.env
    a = await env.mmap(3)
    await env.write(a, b"x")
    await env.write(a + 2 * P, b"y")
    await g.to_device(a + 2 * P, a + 3 * P)
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_SOFT_DIRTY)
    b = await env.k.mremap(env.p.pid, a, 3 * P, 3 * P, MREMAP_MAYMOVE | MREMAP_FIXED, a + 16 * P)
    assert bits(pagemap(env.mm, b, 3), PM_SOFT_DIRTY) == [True, False, True]
    assert await env.read(b, 1) == b"x"


async def test_mremap_growing_in_place_keeps_the_mapping_s_flags() -> None:
    """Only mmap makes a mapping new: the grown part of a clear_ref'd mapping is clean
    (vma_merge_extend() keeps vm_flags)."""
    g = await make_g()
    env = g.env
    a = await env.mmap(2)
    await env.k.clear_refs(env.p.pid, CLEAR_REFS_SOFT_DIRTY)
    assert await env.k.mremap(env.p.pid, a, 2 * P, 4 * P, 0, 0) == a
    assert bits(pagemap(env.mm, a, 4), PM_SOFT_DIRTY) == [False] * 4


async def test_migration_keeps_the_soft_dirty_bit_both_ways() -> None:
    """pte_swp_mksoft_dirty() in the collect walk and remove_migration_pte(): a
    read-only soft-dirty page goes to the device and comes back soft-dirty, a clean
    one clean."""
    g = await make_g()
    env, k = g.env, g.env.k
    a = await env.mmap(2)
    await env.write(a, b"xy")
    await env.write(a + P, b"z")
    await k.clear_refs(env.p.pid, CLEAR_REFS_SOFT_DIRTY)
    await env.write(a, b"w")  # page 0 soft-dirty again, page 1 not
    child = await k.fork(env.p.pid)  # both read-only now (copy-on-write) ...
    await k.exit(child.pid)  # ... and mapped here only again
    await g.to_device(a, a + 2 * P)
    pm = pagemap(env.mm, a, 2)
    assert bits(pm, PM_SWAP) == [True, True] and bits(pm, PM_SOFT_DIRTY) == [True, False]
    assert await env.read(a, 2 * P) == b"wy" + bytes(P - 2) + b"z" + bytes(P - 1)  # migrate_to_ram
    pm = pagemap(env.mm, a, 2)
    assert bits(pm, PM_PRESENT) == [True, True] and bits(pm, PM_SOFT_DIRTY) == [True, False]


async def test_merging_ignores_vm_softdirty_and_keeps_it() -> None:
    """VM_SOFTDIRTY does not stop a merge (VM_IGNORE_MERGE); the merged mapping keeps
    it (VM_STICKY): a clear_ref'd mapping and a new one beside it become one."""
    g = await make_g()
    env, k, pid = g.env, g.env.k, g.env.p.pid
    a = await env.mmap(2)
    await k.clear_refs(pid, CLEAR_REFS_SOFT_DIRTY)
    b = await env.mmap(2, flags=ANON | MAP_FIXED, addr=a + 2 * P)
    await k.mprotect(pid, b, 2 * P, 1)  # PROT_READ: different flags, no merge
    assert len(env.mm.vmas.overlapping(a, a + 4 * P)) == 2
    await k.mprotect(pid, b, 2 * P, RW)
    (vma,) = env.mm.vmas.overlapping(a, a + 4 * P)
    assert (vma.start, vma.end) == (a, a + 4 * P) and vma.flags & VM_SOFTDIRTY
    assert bits(pagemap(env.mm, a, 4), PM_SOFT_DIRTY) == [True] * 4


async def test_hugetlb_pagemap_reports_the_mapping_s_soft_dirty_only() -> None:
    """pagemap_hugetlb_range() looks at VM_SOFTDIRTY, never the huge PTE's bit."""
    env = await make_env(Kernel(RAM_BYTES, hugetlb_pages=2))
    k, pid = env.k, env.p.pid
    h = await k.mmap(pid, 0, PMD_SIZE, RW, ANON | MAP_HUGETLB, -1, 0)
    await env.write(h, b"h")
    assert all(bits(pagemap(env.mm, h, 512), PM_SOFT_DIRTY))
    await k.clear_refs(pid, CLEAR_REFS_SOFT_DIRTY)
    await env.write(h, b"i")  # the write fault sets the huge PTE's bit again
    assert not any(bits(pagemap(env.mm, h, 512), PM_SOFT_DIRTY))
