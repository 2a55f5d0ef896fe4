"""What a fenced device leaves behind: nothing large, and for good nothing but its
record (the last FENCED_KEPT fenced, one per name). Its DMA counters go at fencing,
its private page map with the last page a process still maps, its coherent window
once the core has moved its pages home; then the kernel forgets the device."""

from __future__ import annotations

import asyncio
import errno

import numpy as np

from hmm.abi import HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, MIGRATE_PFN_VALID, MIGRATE_PFN_WRITE
from hmmd.core.devmem import MemoryKind
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import FENCED_KEPT, Kernel

from .conftest import RAM_BYTES, FakeDevice, P, raises_errno
from .test_coherent import add_coherent, drain, filled, make_c
from .test_migrate import filled as filled_g
from .test_migrate import make_g

CYCLES = 3 * FENCED_KEPT


async def test_connect_and_fence_cycles_leave_nothing_behind() -> None:
    """A device that comes and goes (each time under a new name, with private memory)
    costs nothing once gone: the registry, the page maps and the records stay bounded."""
    k = Kernel(RAM_BYTES)
    live = k.register_device("steady", FakeDevice(), MemoryKind.DEVICE_PRIVATE, 64)
    fenced = []
    for i in range(CYCLES):
        dev = k.register_device(f"churn{i}", FakeDevice(), MemoryKind.DEVICE_PRIVATE, 1 << 20)
        k.fence_device(dev, "test")
        fenced.append(dev)
    await drain(k)
    assert k.devices == {live.id: live} and list(k.devmem.maps) == [live.id]
    assert k.fenced_total == CYCLES
    # Every fenced device's large state is gone, listed or not: the DMA counters (RAM's
    # size each) and its page map's counts (its memory's size).
    for dev in fenced:
        assert dev.retired and not dev.alive
        assert dev.grants.readable.nbytes == dev.grants.writable.nbytes == 0
        assert dev.pgmap is not None and dev.pgmap.refcount.nbytes == dev.pgmap.locked.nbytes == 0
    # Stats lists the live device and the most recent FENCED_KEPT fenced ones, by id.
    listed = k.listed_devices()
    assert listed == [live, *fenced[-FENCED_KEPT:]]
    assert [d.fenced_reason for d in listed[1:]] == ["test"] * FENCED_KEPT
    # A device that reconnects under one name keeps one record: its last.
    for _ in range(5):
        k.fence_device(k.register_device("flappy", FakeDevice()), "flap")
    last = k.register_device("flappy", FakeDevice())
    k.fence_device(last, "last flap")
    await drain(k)
    assert [d for d in k.listed_devices() if d.name == "flappy"] == [last]
    assert len(k.listed_devices()) == 1 + FENCED_KEPT and k.fenced_total == CYCLES + 6
    assert check_invariants(k) == []


async def test_a_fenced_device_holds_no_dma_rights() -> None:
    g = await make_g()
    a, _ = await filled_g(g, 2, 3)
    r = await g.range_fault(a, a + 2 * P, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, 0)
    g.k.dma_read(g.dev, r.pfns.astype("<u8").tobytes())
    g.k.fence_device(g.dev, "test")
    with raises_errno(errno.EFAULT):
        g.k.dma_read(g.dev, r.pfns.astype("<u8").tobytes())
    with raises_errno(errno.EFAULT):
        g.k.dma_write(g.dev, r.pfns[:1].astype("<u8").tobytes(), bytes(P))
    assert g.dev.violations == 2


async def test_a_dead_private_map_goes_with_the_last_page_mapping_it() -> None:
    g = await make_g()
    k, pgmap = g.k, g.pgmap
    a, _ = await filled_g(g, 4, 9)
    await g.to_device(a, a + 4 * P)
    k.fence_device(g.dev, "test")
    await drain(k)
    # The device is forgotten; its pages, still mapped, are lost: every touch is SIGBUS.
    assert g.dev.id not in k.devices and k.fenced == {"gpu0": g.dev}
    assert k.devmem.maps[g.dev.id] is pgmap and pgmap.dead and pgmap.used_pages == pgmap.lost == 4
    with raises_errno(errno.EFAULT):
        await g.env.read(a + P, 1)
    assert check_invariants(k) == []
    child = await k.fork(g.p.pid)  # a second mapping of each page: one reference more, same pages
    await k.munmap(g.p.pid, a, 3 * P)
    assert pgmap.lost == 4 and check_invariants(k) == []
    await k.exit(child.pid)
    assert pgmap.lost == 1 and k.devmem.maps[g.dev.id] is pgmap and check_invariants(k) == []
    await k.munmap(g.p.pid, a + 3 * P, P)
    assert g.dev.id not in k.devmem.maps and pgmap.refcount.nbytes == pgmap.mapcount.nbytes == 0
    assert k.devmem.lookup(pgmap.base) is None and check_invariants(k) == []
    assert g.gpu.freed == []  # a fenced device hears nothing


async def test_a_fenced_coherent_device_is_forgotten_once_its_pages_are_home() -> None:
    c = await make_c()
    k = c.k
    a, data = await filled(c, 4, 23)
    await c.to_coherent(a, a + 4 * P)
    pgmap = c.pgmap
    k.fence_device(c.dev, "test")
    assert c.dev.id in k.devices  # until its pages are home (the eviction's trace names it)
    await drain(k)
    assert c.dev.id not in k.devices and k.fenced == {"coh0": c.dev}
    assert c.dev.id not in k.devmem.maps and pgmap not in k.devmem.coherent
    assert pgmap.refcount.nbytes == 0 and pgmap.used_pages == 0
    assert await c.env.read(a, 4 * P) == data
    # Its window goes to the next device; the record of the fenced one does not see its pages.
    coh1, new, _ = await add_coherent(k, "coh1", pid=c.p.pid)
    assert new.pgmap is not None and new.pgmap.base == pgmap.base
    await c.to_coherent(a, a + 4 * P, coh=coh1)
    assert new.pgmap.used_pages == 4 and pgmap.used_pages == 0
    assert check_invariants(k) == []


async def test_a_pages_step_running_at_fencing_keeps_the_device_until_it_ends() -> None:
    """A migration rolled back when its pages step ends still names the device (the
    invariant checker counts what it holds): the device, retired meanwhile, is
    forgotten when the step ends, not before."""
    g = await make_g()
    k = g.k
    await k.remove_notifier(g.dev, g.sub.id)  # nothing to remove: retired at once
    a = await g.env.mmap(2)  # holes: the pages step fills them inside a window
    mig = await g.setup(a, a + 2 * P)
    seen: list[tuple[bool, bool]] = []

    async def fence(sub, rng, seq) -> None:  # type: ignore[no-untyped-def]
        k.fence_device(g.dev, "died mid-step")
        for _ in range(10):
            await asyncio.sleep(0)
        seen.append((g.dev.retired, g.dev.id in k.devices and mig.id in g.dev.migrations))

    g.env.fake.hook = fence
    dst = g.gpu.alloc(2)
    g.copy_out(mig, dst)
    flags = np.full(2, MIGRATE_PFN_VALID | MIGRATE_PFN_WRITE, dtype=np.uint8)
    with raises_errno(errno.ENOENT):  # rolled back when its step ends
        await k.migrate_pages(g.dev, mig.id, dst.astype("<u8").tobytes(), flags.tobytes(), b"")
    await drain(k)
    assert seen == [(True, True)]
    assert g.dev.id not in k.devices and g.dev.migrations == {} and k.fenced == {"gpu0": g.dev}
    assert g.dev.id not in k.devmem.maps  # the step's destinations went with the roll-back
    assert await g.env.read(a, 2 * P) == bytes(2 * P) and check_invariants(k) == []
