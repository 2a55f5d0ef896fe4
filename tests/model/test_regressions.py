"""Short, fixed scenarios for the bugs the model-based tests found, on the core
with hmm-dmirror's driver attached in process (``tests/model/local.py``)."""

from __future__ import annotations

import asyncio
import errno

import numpy as np
import pytest

from hmm.abi import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_MAYMOVE,
    O_RDWR,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from hmm.dmirror.device import CMD_MIGRATE_TO_DEV, CMD_READ, CMD_WRITE, Dmirror
from hmm.errors import KernelError
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import Kernel
from hmmd.core.pagetable import pte_pfn

from .local import LocalConnection

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


def pattern(seed: int, addr: int, npages: int) -> bytes:
    return b"".join(np.full(P, (seed * 31 + (addr >> 12) + i) % 251 + 1, dtype=np.uint8).tobytes()
                    for i in range(npages))


async def setup(npages: int = 4) -> tuple[Kernel, Dmirror, int, int, int]:
    k = Kernel(8 << 20, coherent_bytes=0)
    dm = LocalConnection.attach(k, "dm0", 256)
    p = k.spawn("parent")
    _, fid = await k.open(p.pid, "/dev/dm0", O_RDWR)
    addr = await k.mmap(p.pid, 0, npages * P, RW, ANON, -1, 0)
    await k.write(p.pid, addr, pattern(1, addr, npages))
    return k, dm, p.pid, fid, addr


async def test_migration_leaves_no_record_in_a_fork_relative_that_no_longer_maps_the_page() -> None:
    """MIGRATE_TO_DEV of a page shared with one child, after another child broke
    COW: the second child's address space, which maps none of the pages, kept the
    migration on record after finalize (found by the state machine: "address space
    of pid 2: 1 migration(s) open"); a fault there waiting for a migration would then
    wait for the next one of that address space."""
    k, dm, parent, fid, addr = await setup()
    sharer = (await k.fork(parent)).pid
    writer = (await k.fork(parent)).pid
    await k.write(writer, addr, b"x")  # its own copy: it no longer maps the parent's page
    r = await dm.command(fid, CMD_MIGRATE_TO_DEV, addr, 1)
    assert r.cpages == 1
    assert check_invariants(k) == []
    assert await k.read(writer, addr, 1) == b"x"
    assert await k.read(sharer, addr, P) == pattern(1, addr, 1)
    assert await k.read(parent, addr, P) == pattern(1, addr, 1)
    assert check_invariants(k) == []


# ---- known divergences, kept as strict xfails: each passes once fixed ------------------

async def test_mremap_growing_shared_memory_in_place_from_its_middle() -> None:
    """An in-place grow of a MAP_SHARED anonymous mapping from inside its VMA: the
    object keeps its size (found by the model-based tests when hmmd grew it), so the
    pages past it are SIGBUS, as in Linux."""
    k = Kernel(8 << 20, coherent_bytes=0)
    pid = k.spawn("p").pid
    addr = await k.mmap(pid, 0, 2 * P, RW, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
    await k.write(pid, addr, b"a" * 2 * P)
    assert await k.mremap(pid, addr + P, P, 4 * P, 0, 0) == addr + P  # in place, from the middle
    assert await k.read(pid, addr, 2 * P) == b"a" * 2 * P
    with pytest.raises(KernelError) as e:
        await k.read(pid, addr + 2 * P, 1)
    assert e.value.errno == errno.EFAULT


async def test_mremap_growing_shared_anonymous_memory_does_not_grow_the_object() -> None:
    k = Kernel(8 << 20, coherent_bytes=0)
    pid = k.spawn("p").pid
    addr = await k.mmap(pid, 0, 2 * P, RW, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
    new = await k.mremap(pid, addr, 2 * P, 4 * P, MREMAP_MAYMOVE, 0)
    with pytest.raises(KernelError) as e:
        await k.read(pid, new + 2 * P, 1)
    assert e.value.errno == errno.EFAULT


async def test_mprotect_over_a_hole_changes_the_mappings_before_it() -> None:
    k = Kernel(8 << 20, coherent_bytes=0)
    pid = k.spawn("p").pid
    addr = await k.mmap(pid, 0, 3 * P, RW, ANON, -1, 0)
    await k.munmap(pid, addr + 2 * P, P)
    with pytest.raises(KernelError) as e:
        await k.mprotect(pid, addr, 3 * P, PROT_READ)
    assert e.value.errno == errno.ENOMEM
    with pytest.raises(KernelError):
        await k.write(pid, addr, b"x")  # read-only now, in Linux


async def test_dmirror_write_to_its_own_read_only_device_page() -> None:
    k, dm, parent, fid, addr = await setup()
    await dm.command(fid, CMD_MIGRATE_TO_DEV, addr, 1)
    await k.fork(parent)  # the device-private entry becomes read-only in both
    r = await asyncio.wait_for(dm.command(fid, CMD_WRITE, addr, 1, pattern(2, addr, 1)), 2)
    assert r.cpages == 1
    assert await k.read(parent, addr, P) == pattern(2, addr, 1)


async def test_faults_on_a_fork_shared_device_page_with_a_writer_queued_do_not_deadlock() -> None:
    """Found by the coherence tester (bench/coherence.py --devices 4 --minutes 1
    --seed 3: an EXCLUSIVE hung for good, then every operation on the process).

    A device-private page D is shared by a parent and its child (migrated, then
    fork). The parent is inside a fault path holding its mmap read lock (an
    EXCLUSIVE, a range fault, a CPU access) and a writer (mprotect) queues on the
    parent's lock. The child faults D first: its migrate_to_ram sets the page's
    migration up, which takes the fork family's mmap read locks — the parent's
    waits behind the queued writer. Then the parent's fault reaches D and waits
    for the child's fault in flight on the same PFN. The writer waits for the
    parent's reader, the parent's reader for the child's fault, the child's fault
    for the writer: nothing moves again. (Linux's try_to_migrate walks the rmap
    and takes no other process's mmap lock.)"""
    k, dm, parent, fid, addr = await setup(2)
    await dm.command(fid, CMD_MIGRATE_TO_DEV, addr, 1)
    child = (await k.fork(parent)).pid
    mm = k.process(parent).mm
    pfn = int(pte_pfn(mm.page_state(addr, addr + P))[0])
    await mm.lock.acquire_read()  # the parent's fault path, under way
    writer = asyncio.ensure_future(k.mprotect(parent, addr + P, P, PROT_READ))
    await asyncio.sleep(0.01)
    child_read = asyncio.ensure_future(k.read(child, addr, 1))  # the child faults D first
    await asyncio.sleep(0.01)
    try:
        assert mm.devmem.on_fault is not None
        try:  # the parent's fault reaches D: it waits for the child's, or finds the page moved (EAGAIN: retry)
            await asyncio.wait_for(mm.devmem.on_fault(mm, addr, pfn), 2)
        except KernelError as e:
            assert e.errno == errno.EAGAIN
    finally:
        await mm.lock.release_read()
        await asyncio.wait_for(asyncio.gather(writer, child_read), 5)
    # The fix: the child's migration takes the parent's lock ahead of the queued writer,
    # as Linux's rmap walk takes none. Both see the page, at home.
    assert await k.read(parent, addr, P) == await k.read(child, addr, P) == pattern(1, addr, 2)[:P]


async def test_a_device_page_coming_home_leaves_another_processs_entry_at_that_address() -> None:
    """hmm-dmirror erased the address of a page brought home in every handle's table,
    also in processes that map something else there (found by the state machine: a
    WRITE that should have gone through the parent's entry found none). Only the
    handle the page was migrated by and the migrating process's handles lose it, as
    in the kernel's dmirror; a process mapping the page too would hear a CLEAR."""
    k, dm, parent, fid, addr = await setup(2)
    child = (await k.fork(parent)).pid
    _, child_fid = await k.open(child, "/dev/dm0", O_RDWR)
    await dm.command(fid, CMD_WRITE, addr, 1, pattern(2, addr, 1))  # the parent's own copy now, mapped here
    assert (await dm.command(child_fid, CMD_MIGRATE_TO_DEV, addr, 1)).cpages == 1  # the child's page
    assert await k.read(child, addr, P) == pattern(1, addr, 1)  # comes home through the device
    r = await dm.command(fid, CMD_READ, addr, 1)
    assert (r.faults, r.data) == (0, pattern(2, addr, 1))  # through the entry it kept
    assert check_invariants(k) == []
