"""The OOM killer over the wire (Process.OomKill): a device (an SDK connection in this
test process) mirrors a process of a real hmmd; the reaper's non-blockable UNMAP
reaches it before anything is freed, its DMA rights go with it, and a device that
is in the middle of a fault refuses it — the reaper tries again, and the device's
sequence stays in step with the daemon's all along (protocol gap 13). And the killer
choosing its victim when an allocation runs out of room (--oom-killer on, the
default; off: ENOMEM), steered by Process.SetOomScoreAdj."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from hmm.abi import PAGE_SIZE, ULONG_MAX, Event
from hmm.admin import AdminClient
from hmm.device import DeviceConnection
from hmm.errors import KernelError
from hmm.mirror import Mirror
from hmm.process import Proc, ProcessClient
from tests.e2e.recorder import Recorder, recording_device
from tests.procs import Program, start_hmmd

P = PAGE_SIZE
N = 16


@pytest.fixture
async def device(hmmd: Program) -> AsyncIterator[tuple[DeviceConnection, Recorder]]:
    rec = Recorder(lambda _, rng: (rng.event, rng.start, rng.end, rng.blockable))
    async with recording_device(hmmd.address, "oom", rec) as conn:
        yield conn, rec


async def mirrored(cpu: ProcessClient, conn: DeviceConnection) -> tuple[Proc, int, Mirror, np.ndarray]:
    """A process with N written pages, mirrored and faulted in by ``conn``."""
    proc = await cpu.spawn("oom-victim")
    await proc.open(f"/dev/{conn.name}")
    a = await proc.mmap(N * P)
    await proc.write(a, bytes(range(256)) * (N * P // 256))
    mirror = await conn.insert_notifier(proc.pid, a, N * P)
    async with mirror.fault(a, a + N * P, write=True) as r:
        pfns = r.pfns.copy()
    return proc, a, mirror, pfns


async def test_the_reaper_unmaps_without_blocking_revokes_dma_and_the_victim_exits(
        cpu: ProcessClient, device: tuple[DeviceConnection, Recorder]) -> None:
    conn, rec = device
    proc, a, mirror, pfns = await mirrored(cpu, conn)
    assert len(await conn.dma_read(pfns[:1])) == P
    rec.events.clear()

    r = await proc.oom_kill()

    assert (r.reaped, r.passes, r.pages_reaped) == (True, 1, N)
    assert rec.events == [(Event.UNMAP, a, a + N * P, False), (Event.RELEASE, 0, ULONG_MAX, True),
                          (Event.UNMAP, 0, ULONG_MAX, True)]
    with pytest.raises(KernelError) as e:
        await conn.dma_read(pfns[:1])
    assert e.value.errno == errno.EFAULT
    with pytest.raises(KernelError) as e:
        await proc.read(a, 1)
    assert e.value.errno == errno.ESRCH
    assert await AdminClient(cpu.channel).check_invariants() == []


async def test_a_device_in_a_fault_refuses_and_stays_in_step_until_a_later_pass_reaps(
        cpu: ProcessClient, device: tuple[DeviceConnection, Recorder]) -> None:
    conn, rec = device
    proc, a, mirror, _ = await mirrored(cpu, conn)
    before = mirror.seq
    rec.events.clear()
    async with mirror.lock:  # a fault of the device's own is between read_begin and its page tables
        victim = asyncio.create_task(proc.oom_kill())
        deadline = time.monotonic() + 5
        while mirror.seq == before:  # the SDK refused a pass (and stored its cur_seq)
            assert time.monotonic() < deadline and not victim.done()
            await asyncio.sleep(0.005)
        assert rec.events == []  # refused before the driver was asked
        listed = {p.pid: p for p in await AdminClient(cpu.channel).processes()}
        assert not listed[proc.pid].alive  # listed, as killed, until it has exited
        # A fault taken now must get through read_retry: the device's sequence is the
        # daemon's, although the refused window never reached the driver.
        for _ in range(3):  # (a next pass, 100 ms on, may come in between: retry then)
            seq = await conn.read_begin(mirror)
            if not mirror.read_retry(seq):
                break
        else:
            pytest.fail(f"read_retry fails after a refusal: device {mirror.seq}, daemon {seq}")
    r = await asyncio.wait_for(victim, 10)
    assert r.reaped and 2 <= r.passes <= 10 and r.pages_reaped == N
    assert proc.pid not in {p.pid for p in await AdminClient(cpu.channel).processes()}
    assert rec.events[0] == (Event.UNMAP, a, a + N * P, False)
    assert await AdminClient(cpu.channel).check_invariants() == []


@pytest.mark.parametrize("killer", ["on", "off"])
async def test_an_allocation_without_room_kills_the_process_with_most_memory_or_is_enomem(
        tmp_path: Path, killer: str) -> None:
    """No swap, 1 MiB of RAM: a write that reclaim cannot make room for. The OOM killer
    (on by default) picks the process with the most memory; its mirror hears the
    reaper's non-blockable UNMAP, then its exit; the write goes on. With
    ``--oom-killer off`` the write is ENOMEM and nothing dies."""
    daemon = start_hmmd(tmp_path, "--ram", "1M", "--swap", "0", "--oom-killer", killer, name=f"hmmd-oom-{killer}")
    rec = Recorder(lambda _, rng: (rng.event, rng.start, rng.end, rng.blockable))
    try:
        async with ProcessClient.connect(daemon.address) as cpu, \
                recording_device(daemon.address, "oomk", rec) as conn:
            hog = await cpu.spawn("hog")
            await hog.open(f"/dev/{conn.name}")
            h = await hog.mmap(180 * P)
            await hog.write(h, b"h" * 180 * P)
            mirror = await conn.insert_notifier(hog.pid, h, 180 * P)
            async with mirror.fault(h, h + 180 * P):
                pass
            rec.events.clear()
            proc = await cpu.spawn("grower")
            a = await proc.mmap(100 * P)
            admin = AdminClient(cpu.channel)
            if killer == "off":
                with pytest.raises(KernelError) as e:
                    await proc.write(a, b"g" * 100 * P)
                assert e.value.errno == errno.ENOMEM
                assert rec.events == [] and await hog.read(h, 2) == b"hh"
                assert (await admin.stats()).oom_kills == 0
                return
            await proc.write(a, b"g" * 100 * P)
            assert await proc.read(a + 99 * P, 2) == b"gg"
            assert rec.events == [(Event.UNMAP, h, h + 180 * P, False), (Event.RELEASE, 0, ULONG_MAX, True),
                                  (Event.UNMAP, 0, ULONG_MAX, True)]
            with pytest.raises(KernelError) as e:
                await hog.read(h, 1)
            assert e.value.errno == errno.ESRCH
            st = await admin.stats()
            assert st.oom_kills == 1 and st.processes == 1
            assert await admin.check_invariants() == []
    finally:
        assert daemon.stop() == 0, daemon.log_text()
    assert (f"Out of memory: killed process {hog.pid} (hog)" in daemon.log_text()) is (killer == "on")


async def test_oom_score_adj_is_set_shown_and_inherited(cpu: ProcessClient) -> None:
    proc = await cpu.spawn("adj")
    assert (await proc.status()).oom_score_adj == 0
    await proc.set_oom_score_adj(-1000)
    child = await proc.fork()
    assert (await proc.status()).oom_score_adj == (await child.status()).oom_score_adj == -1000
    with pytest.raises(KernelError) as e:
        await proc.set_oom_score_adj(1001)
    assert e.value.errno == errno.EINVAL
    assert (await proc.status()).oom_score_adj == -1000
    await child.exit()
    await proc.exit()
