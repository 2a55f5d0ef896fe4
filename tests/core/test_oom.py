"""The OOM killer and its reaper (HMM-SEMANTICS.md §2.1 guarantee 7): the victim's
private memory is emptied under non-blockable UNMAP invalidations, which a device
may refuse; a refused or locked-out pass is tried again, then the victim exits. And
out_of_memory(): the killer choosing its victim (oom_badness, oom_score_adj) when
reclaim cannot make room for an allocation."""

from __future__ import annotations

import asyncio
import errno

import numpy as np
import pytest

from hmm.abi import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_VALID,
    MAP_SHARED,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    O_CREAT,
    O_RDWR,
    ULONG_MAX,
    Event,
)
from hmm.errors import KernelError
from hmmd.core import kernel as kernel_module
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import OOM_REAP_PASSES, Kernel

from .conftest import Env, FakeDevice, P, make_env, pattern, raises_errno
from .test_coherent import drain
from .test_migrate import make_g


@pytest.fixture(autouse=True)
def quick_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_module, "OOM_REAP_INTERVAL_S", 0.01)


async def filled(env: Env, npages: int, seed: int, pid: int | None = None, **kw) -> int:  # type: ignore[no-untyped-def]
    a = await env.mmap(npages, pid=pid, **kw)
    await env.write(a, pattern(npages, seed), pid=pid)
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


# ---- the OOM killer choosing its victim (out_of_memory) ------------------------------------
RAM_PAGES = 128


async def tight_env(**kw) -> Env:  # type: ignore[no-untyped-def]
    """128 frames and no swap: reclaim cannot help, the OOM killer must."""
    return await make_env(Kernel(RAM_PAGES * P, swap_bytes=0, **kw))


async def test_an_allocation_reclaim_cannot_satisfy_kills_the_process_with_most_memory_and_goes_on() -> None:
    """out_of_memory(): the victim is the process with the most resident pages (the
    newest of equals); it is reaped and exits, then the allocation is tried again and
    succeeds. The others keep every page."""
    env = await tight_env()
    k = env.k
    a = await filled(env, 10, 5)
    small, big = k.spawn("small"), k.spawn("big")
    s_addr = await filled(env, 20, 6, pid=small.pid)
    await filled(env, 70, 7, pid=big.pid)
    b = await env.mmap(40)
    env.fake.take()
    await env.write(b, pattern(40, 8))  # 30 frames short: big goes

    assert k.oom_kills == 1 and big.pid not in k.processes and small.pid in k.processes
    with raises_errno(errno.ESRCH):
        await env.read(0, 1, pid=big.pid)
    assert await env.read(a, 10 * P) == pattern(10, 5) and await env.read(b, 40 * P) == pattern(40, 8)
    assert await env.read(s_addr, 20 * P, pid=small.pid) == pattern(20, 6)
    assert env.fake.take() == []  # the victim's exit reached no mirror of this process
    assert check_invariants(k) == []


async def test_the_process_whose_own_access_runs_short_is_the_victim_it_gets_enomem_then_dies() -> None:
    """The faulting process has the most memory: its access fails at once (it holds
    the mmap lock the reaper needs), and the reaper — non-blockable UNMAP to its
    mirror — and its exit follow as soon as it lets go."""
    env = await tight_env()
    k = env.k
    other = k.spawn("other")
    await filled(env, 10, 9, pid=other.pid)
    a = await env.mmap(160)
    env.fake.take()
    with raises_errno(errno.ENOMEM):
        await env.write(a, pattern(160, 10))
    await drain(k)
    assert k.oom_kills == 1 and env.p.pid not in k.processes and other.pid in k.processes
    events = [(e.event, e.blockable) for e in env.fake.events]
    assert events[0] == (Event.UNMAP, False) and events[-2:] == [(Event.RELEASE, True), (Event.UNMAP, True)]
    assert await env.read(0, 0, pid=other.pid) == b""
    assert check_invariants(k) == []


async def test_while_a_victim_is_dying_no_other_is_chosen() -> None:
    """A process killed by Process.OomKill, whose reaping a device refuses, is still
    dying: an allocation waits for its exit rather than killing another, then goes on."""
    env = await tight_env()
    k = env.k
    await k.remove_notifier(env.dev, env.sub.id)
    refusing = FakeDevice()
    refusing.refuse = True
    dev = k.register_device("refusing", refusing)
    dying, bystander = k.spawn("dying"), k.spawn("bystander")
    await k.open(dying.pid, "/dev/refusing", O_RDWR)
    d_addr = await filled(env, 60, 11, pid=dying.pid)
    await k.insert_notifier(dev, dying.pid, d_addr, 60 * P)
    await filled(env, 50, 12, pid=bystander.pid)  # the biggest once the dying one is gone
    kill = asyncio.ensure_future(k.oom_kill(dying.pid))
    await asyncio.sleep(0)
    assert dying.killed and dying.pid in k.processes
    a = await env.mmap(30)
    await env.write(a, pattern(30, 13))  # short of frames while the reaper keeps trying

    reaped = await kill
    assert (reaped.complete, reaped.passes) == (False, OOM_REAP_PASSES)
    assert k.oom_kills == 0 and bystander.pid in k.processes
    assert await env.read(a, 30 * P) == pattern(30, 13)
    assert check_invariants(k) == []


async def test_without_the_oom_killer_the_allocation_is_enomem_and_nothing_dies() -> None:
    env = await tight_env(oom_killer=False)
    k = env.k
    big = k.spawn("big")
    await filled(env, 100, 14, pid=big.pid)
    a = await env.mmap(40)
    with raises_errno(errno.ENOMEM):
        await env.write(a, pattern(40, 15))
    assert k.oom_kills == 0 and set(k.processes) == {env.p.pid, big.pid}
    assert check_invariants(k) == []


async def test_a_device_migration_home_that_runs_short_kills_another_process_and_completes() -> None:
    """The pages step of a migration to system memory (SYSTEM_DATA) allocates with
    the migration's mmap locks held: a victim elsewhere is killed and waited for."""
    g = await make_g(Kernel(RAM_PAGES * P, swap_bytes=0))
    k = g.k
    a = await filled(g.env, 16, 16)
    await g.to_device(a, a + 16 * P)
    hog = k.spawn("hog")
    await filled(g.env, k.ram.free_frames, 17, pid=hog.pid)
    assert k.ram.free_frames == 0
    assert await g.env.read(a, 16 * P) == pattern(16, 16)  # each page home through a fresh frame
    assert k.oom_kills == 1 and hog.pid not in k.processes
    assert check_invariants(k) == []


async def test_a_migration_home_holding_the_victims_mmap_lock_is_enomem_and_kills_no_one() -> None:
    """The process with the most memory is the one whose pages a device migrates home
    explicitly: the migration holds its mmap lock, so the killer cannot make room in
    time; the pages step is ENOMEM, nothing changes and no one is killed."""
    g = await make_g(Kernel(RAM_PAGES * P, swap_bytes=0))
    k = g.k
    a = await filled(g.env, 16, 18)
    _, dst = await g.to_device(a, a + 16 * P)
    k.spawn("small")
    await filled(g.env, k.ram.free_frames, 19)
    mig = await g.setup(a, a + 16 * P, MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
    data = b"".join(g.gpu.mem[int(p)] for p in dst)
    flags = np.full(16, MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA, dtype=np.uint8).tobytes()
    with raises_errno(errno.ENOMEM):
        await k.migrate_pages(g.dev, mig.id, bytes(16 * 8), flags, data)
    await k.migrate_finalize(g.dev, mig.id)
    assert k.oom_kills == 0 and len(k.processes) == 2
    assert list(g.env.pfns(a, a + 16 * P)) == list(dst) and await g.env.read(0, 0) == b""
    assert check_invariants(k) == []


async def test_oom_score_adj_steers_the_choice_and_fork_inherits_it() -> None:
    """/proc/<pid>/oom_score_adj: -1000 is never chosen, whatever its size; a positive
    one adds its thousandths of RAM + swap (next test); a fork child starts with the
    parent's."""
    env = await tight_env()
    k = env.k
    big, small = k.spawn("big"), k.spawn("small")
    await filled(env, 70, 20, pid=big.pid)
    await filled(env, 35, 21, pid=small.pid)
    k.set_oom_score_adj(big.pid, -1000)
    child = await k.fork(big.pid)
    assert child.oom_score_adj == -1000
    assert k.oom_badness(big) is None and k.oom_badness(small) == 35
    b = await env.mmap(40)
    await env.write(b, pattern(40, 22))  # short with ~23 pages here: small goes, not big
    assert k.oom_kills == 1 and small.pid not in k.processes and big.pid in k.processes
    with raises_errno(errno.EINVAL):
        k.set_oom_score_adj(big.pid, 1001)
    with raises_errno(errno.ESRCH):
        k.set_oom_score_adj(small.pid, 0)
    assert big.oom_score_adj == -1000
    assert check_invariants(k) == []


async def test_a_positive_oom_score_adj_makes_a_small_process_the_victim() -> None:
    env = await make_env(Kernel(4096 * P, swap_bytes=0))  # 4 pages per thousandth
    k = env.k
    big, small = k.spawn("big"), k.spawn("small")
    await filled(env, 2500, 23, pid=big.pid)
    await filled(env, 200, 24, pid=small.pid)
    k.set_oom_score_adj(small.pid, 600)  # 200 + 600 * 4 = 2600 > 2500
    assert (k.oom_badness(small), k.oom_badness(big)) == (2600, 2500)
    a = await env.mmap(1500)
    await env.write(a, pattern(1500, 25))  # short by ~100 frames: small goes
    assert k.oom_kills == 1 and small.pid not in k.processes and big.pid in k.processes
    assert check_invariants(k) == []


async def test_only_processes_that_may_not_be_chosen_left_is_enomem() -> None:
    env = await tight_env()
    k = env.k
    k.set_oom_score_adj(env.p.pid, -1000)
    a = await env.mmap(160)
    with raises_errno(errno.ENOMEM):
        await env.write(a, pattern(160, 26))
    assert k.oom_kills == 0 and env.p.pid in k.processes
