"""The OOM killer over the wire (Process.OomKill): a device (an SDK connection in this
test process) mirrors a process of a real hmmd; the reaper's non-blockable UNMAP
reaches it before anything is freed, its DMA rights go with it, and a device that
is in the middle of a fault refuses it — the reaper tries again, and the device's
sequence stays in step with the daemon's all along (protocol gap 13)."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from hmm.abi import PAGE_SIZE, ULONG_MAX, Event
from hmm.admin import AdminClient
from hmm.device import DeviceConnection
from hmm.errors import KernelError
from hmm.mirror import Mirror
from hmm.process import Proc, ProcessClient
from tests.e2e.recorder import Recorder, recording_device
from tests.procs import Program

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
