"""The OOM killer and its reaper (HMM-SEMANTICS.md §2.1 guarantee 7): the victim's
private memory is emptied under non-blockable UNMAP invalidations, which a device
may refuse; a refused or locked-out pass is tried again, then the victim exits."""

from __future__ import annotations

import asyncio
import errno

import numpy as np
import pytest

from hmm.abi import HMM_PFN_REQ_FAULT, HMM_PFN_VALID, MAP_SHARED, O_CREAT, O_RDWR, ULONG_MAX, Event
from hmm.errors import KernelError
from hmmd.core import kernel as kernel_module
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import OOM_REAP_PASSES

from .conftest import Env, FakeDevice, P, make_env, pattern, raises_errno
from .test_migrate import make_g


@pytest.fixture(autouse=True)
def quick_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_module, "OOM_REAP_INTERVAL_S", 0.01)


async def filled(env: Env, npages: int, seed: int, **kw) -> int:  # type: ignore[no-untyped-def]
    a = await env.mmap(npages, **kw)
    await env.write(a, pattern(npages, seed))
    return a


def in_use(env: Env) -> int:
    return int(np.count_nonzero(env.k.ram.refcount))


async def test_the_reaper_empties_private_memory_under_non_blockable_unmaps_then_the_victim_exits(env: Env) -> None:
    idle = in_use(env)
    anon = await filled(env, 8, 1)
    fd, _ = await env.k.open(env.p.pid, "/tmp/oom-shared", O_RDWR | O_CREAT)
    await env.k.ftruncate(env.p.pid, fd, 4 * P)
    shared = await filled(env, 4, 2, flags=MAP_SHARED, fd=fd)  # page cache: the reaper leaves it
    env.fake.take()

    reaped = await env.k.oom_kill(env.p.pid)

    assert (reaped.complete, reaped.passes, reaped.pages) == (True, 1, 8)
    events = env.fake.events
    assert [(e.event, e.start, e.end, e.blockable) for e in events[:1]] == [(Event.UNMAP, anon, anon + 8 * P, False)]
    assert all(not (e.start <= shared < e.end) for e in events[:1])
    # then the exit, as ever: RELEASE and UNMAP over everything, blockable
    assert [(e.event, e.start, e.end, e.blockable) for e in events[1:]] == [
        (Event.RELEASE, 0, ULONG_MAX, True), (Event.UNMAP, 0, ULONG_MAX, True)]
    with raises_errno(errno.ESRCH):
        await env.read(anon, 1)
    assert in_use(env) == idle + 4  # the file keeps its pages
    assert check_invariants(env.k) == []


async def test_a_refused_mapping_stays_and_the_reaper_tries_again_until_it_gives_up() -> None:
    env = await make_env()
    await env.k.remove_notifier(env.dev, env.sub.id)
    refusing = FakeDevice()
    refusing.refuse = True
    dev = env.k.register_device("refusing", refusing)
    await env.k.open(env.p.pid, "/dev/refusing", O_RDWR)
    idle = in_use(env)
    kept = await filled(env, 4, 3)
    freed = await filled(env, 6, 4)
    await env.k.insert_notifier(dev, env.p.pid, kept, 4 * P)

    reaped = await env.k.oom_kill(env.p.pid)

    assert (reaped.complete, reaped.passes, reaped.pages) == (False, OOM_REAP_PASSES, 6)
    unmaps = [e for e in refusing.events if not e.blockable]
    assert [(e.event, e.start, e.end) for e in unmaps] == [(Event.UNMAP, kept, kept + 4 * P)] * OOM_REAP_PASSES
    assert [e.event for e in refusing.events[OOM_REAP_PASSES:]] == [Event.RELEASE, Event.UNMAP]
    assert not any(e.start <= freed < e.end for e in unmaps)
    assert in_use(env) == idle  # the exit freed what the reaper could not
    assert check_invariants(env.k) == []


async def test_once_the_reaper_has_been_at_it_a_range_fault_faults_nothing_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_module, "OOM_REAP_INTERVAL_S", 0.2)
    env = await make_env()
    refusing = FakeDevice()
    refusing.refuse = True
    dev = env.k.register_device("refusing", refusing)
    await env.k.open(env.p.pid, "/dev/refusing", O_RDWR)
    kept = await filled(env, 2, 7)
    reaped = await filled(env, 3, 8)
    await env.k.insert_notifier(dev, env.p.pid, kept, 2 * P)
    victim = asyncio.create_task(env.k.oom_kill(env.p.pid))
    while not refusing.events:  # the first pass: the second mapping is empty now
        await asyncio.sleep(0.005)
    assert not env.ptes(reaped, reaped + 3 * P).any()
    with raises_errno(errno.EFAULT):  # MMF_UNSTABLE: nothing comes back to life
        await env.fault(reaped, reaped + 3 * P, HMM_PFN_REQ_FAULT)
    snap = await env.fault(kept, kept + 2 * P, snapshot=True)  # what is still mapped can be looked at
    assert (snap.flags & HMM_PFN_VALID).all()
    assert check_invariants(env.k) == []  # the victim is still counted while it is reaped
    with raises_errno(errno.ESRCH):  # but no call reaches it
        await env.read(kept, 1)
    monkeypatch.setattr(kernel_module, "OOM_REAP_INTERVAL_S", 0.01)
    assert not (await victim).complete
    assert check_invariants(env.k) == []


async def test_a_pass_that_finds_the_mmap_lock_held_fails_and_a_later_one_reaps(env: Env) -> None:
    a = await filled(env, 5, 5)
    await env.mm.lock.acquire_read()  # a fault or a migration in progress
    victim = asyncio.create_task(env.k.oom_kill(env.p.pid))
    await asyncio.sleep(0.035)
    assert not victim.done()
    env.fake.take()
    await env.mm.lock.release_read()
    reaped = await victim
    assert reaped.complete and 2 <= reaped.passes < OOM_REAP_PASSES and reaped.pages == 5
    assert env.fake.take()[0] == (Event.UNMAP, a, a + 5 * P)
    assert check_invariants(env.k) == []


async def test_device_private_pages_are_reaped_and_freed_to_their_device() -> None:
    g = await make_g()
    a = await g.env.mmap(4)
    await g.env.write(a, pattern(4, 6))
    await g.to_device(a, a + 4 * P)
    on_device = set((g.pgmap.base + np.flatnonzero(g.pgmap.refcount)).tolist())
    assert len(on_device) == 4

    reaped = await g.k.oom_kill(g.p.pid)

    assert reaped.complete and reaped.pages == 4
    assert set(g.gpu.freed) == on_device and not g.pgmap.refcount.any()
    assert g.gpu.m2r_calls == []  # reaped, not brought home
    assert check_invariants(g.k) == []


async def test_oom_kill_of_no_process_is_esrch(env: Env) -> None:
    with raises_errno(errno.ESRCH):
        await env.k.oom_kill(99999)


async def test_the_victim_exits_even_if_reaping_fails(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    await filled(env, 2, 9)

    async def broken() -> tuple[bool, int]:
        raise KernelError(errno.ENOMEM, "no memory to reap with")

    monkeypatch.setattr(env.mm, "oom_reap", broken)
    with raises_errno(errno.ENOMEM):
        await env.k.oom_kill(env.p.pid)
    assert env.p.pid not in env.k.processes and not env.mm.alive
    assert check_invariants(env.k) == []
