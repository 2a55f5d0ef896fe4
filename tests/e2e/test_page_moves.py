"""Pages leaving their frames under a mirror, over the wire: MADV_PAGEOUT (reclaim to
swap) and memory compaction, on a process a device mirrors (an SDK connection in this
test process, hmmd its own process). The device hears CLEAR before a page leaves its
frame and loses its DMA right to it; its next faulting range fault finds the page
again (swapped in, or at its new frame) with the same contents; pagemap, the process
status and hmmctl show the state in between."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from collections.abc import AsyncIterator

import numpy as np
import pytest

from hmm.abi import HMM_PFN_VALID, MADV_PAGEOUT, PAGE_SIZE, Event
from hmm.admin import AdminClient
from hmm.device import DeviceConnection
from hmm.errors import KernelError
from hmm.mirror import Mirror
from hmm.process import Proc, ProcessClient
from tests.e2e.recorder import Recorder, recording_device
from tests.procs import Program

P = PAGE_SIZE
N = 8
PM_PRESENT, PM_SWAP = 1 << 63, 1 << 62


@pytest.fixture
async def device(hmmd: Program) -> AsyncIterator[tuple[DeviceConnection, Recorder]]:
    rec = Recorder()
    async with recording_device(hmmd.address, "swap", rec) as conn:
        yield conn, rec


async def mirrored(cpu: ProcessClient, conn: DeviceConnection, rec: Recorder,
                   seed: int) -> tuple[Proc, int, bytes, Mirror, np.ndarray]:
    """A process with N pages of random bytes, mirrored and faulted in by ``conn``:
    (process, address, bytes, mirror, frames); no event recorded yet."""
    proc = await cpu.spawn(f"moved{seed}")
    await proc.open(f"/dev/{conn.name}")
    a = await proc.mmap(N * P)
    data = np.random.default_rng(seed).integers(0, 256, N * P, dtype=np.uint8).tobytes()
    await proc.write(a, data)
    mirror = await conn.insert_notifier(proc.pid, a, N * P)
    async with mirror.fault(a, a + N * P) as r:
        pfns = r.pfns.copy()
    rec.events.clear()
    return proc, a, data, mirror, pfns


async def test_pageout_of_mirrored_memory_and_the_device_faulting_it_back(
        hmmd: Program, cpu: ProcessClient, device: tuple[DeviceConnection, Recorder]) -> None:
    conn, rec = device
    proc, a, data, mirror, pfns = await mirrored(cpu, conn, rec, 5)

    await proc.madvise(a + 2 * P, 4 * P, MADV_PAGEOUT)

    assert rec.events == [(Event.CLEAR, a + 2 * P, a + 6 * P)]
    with pytest.raises(KernelError) as e:
        await conn.dma_read(pfns[2:3])  # its right went with the CLEAR
    assert e.value.errno == errno.EFAULT
    entries = await proc.pagemap(a, N)
    assert [bool(x & PM_SWAP) for x in entries.tolist()] == [False] * 2 + [True] * 4 + [False] * 2
    status = await proc.status()
    assert (status.swap, status.rss_anon) == (4, N - 4)
    stats = await AdminClient(cpu.channel).stats()
    assert stats.swap_used_pages >= 4 and stats.swap_pages == 1 << 18  # hmmd's default --swap 1G
    text = subprocess.run([sys.executable, "-m", "hmmd.ctl", "pagemap", str(proc.pid), hex(a), str(N), "--json",
                           "--kernel", hmmd.address], capture_output=True, text=True, timeout=60, check=True).stdout
    assert [p["kind"] for p in json.loads(text)][1:7] == ["system"] + ["swapped"] * 4 + ["system"]
    async with mirror.fault(a, a + N * P, snapshot=True) as r:
        assert (r.flags[2:6] & HMM_PFN_VALID).tolist() == [0] * 4  # nothing there until swapped in

    async with mirror.fault(a, a + N * P) as r:  # the device's fault swaps them in
        assert (r.flags & HMM_PFN_VALID).all()
        again = r.pfns.copy()
    assert await conn.dma_read(again) == data
    assert (await proc.status()).swap == 0
    assert await AdminClient(cpu.channel).check_invariants() == []
    await proc.exit()


async def test_compaction_moves_mirrored_pages_after_a_clear(
        hmmd: Program, cpu: ProcessClient, device: tuple[DeviceConnection, Recorder]) -> None:
    conn, rec = device
    proc, a, data, mirror, before = await mirrored(cpu, conn, rec, 6)

    assert await AdminClient(cpu.channel).compact_memory() >= N  # (other processes' pages move too)

    assert (Event.CLEAR, a, a + N * P) in rec.events
    with pytest.raises(KernelError) as e:
        await conn.dma_read(before[:1])
    assert e.value.errno == errno.EFAULT
    async with mirror.fault(a, a + N * P) as r:
        after = r.pfns.copy()
    assert not np.isin(after, before).any()
    assert await conn.dma_read(after) == data
    assert await AdminClient(cpu.channel).check_invariants() == []
    await proc.exit()
