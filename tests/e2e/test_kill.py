"""kill -9 of a device at every protocol step: idle, mid-invalidation, between
migrate setup and finalize, with a migration's contents half streamed, during
migrate_to_ram, during eviction.

Each time: the CPU operation that involved the device completes within the
deadline; no system page is lost or corrupted (a migration in flight rolls back);
pages that lived only on the dead device are lost and accessing them fails with
EFAULT (SIGBUS); the daemon's invariants hold; another device mirroring the same
process never notices; and when the process exits every frame comes back."""

from __future__ import annotations

import asyncio
import errno
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hmm.abi import PAGE_SIZE, PROT_READ, Event
from hmm.admin import AdminClient
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import CMD_READ
from hmm.errors import KernelError
from hmm.process import Proc, ProcessClient
from tests.conftest import HMMD_ARGS
from tests.procs import Program, start

DEADLINE_S = float(HMMD_ARGS[HMMD_ARGS.index("--callback-deadline-ms") + 1]) / 1000
N = 8  # pages the victim device takes
W = 4  # pages the witness device mirrors


def ints(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.int32)


def pattern(npages: int, seed: int) -> np.ndarray:
    return (np.arange(npages * 1024, dtype=np.int32) * 7 + seed).astype(np.int32)


async def read_fails(proc: Proc, addr: int) -> None:
    with pytest.raises(KernelError) as e:
        await proc.read(addr, 4)
    assert e.value.errno == errno.EFAULT


@pytest.mark.parametrize("mode", ["idle", "invalidate", "setup", "stream", "fault", "evict"])
async def test_kill_at_each_protocol_step(
    hmmd: Program, cpu: ProcessClient, dmirror_factory, tmp_path: Path, mode: str
) -> None:
    admin = AdminClient(cpu.channel)
    used_before = (await admin.stats()).ram_used_frames
    proc = await cpu.spawn(f"victim-{mode}")
    buf = await proc.mmap(N * PAGE_SIZE)
    await proc.write(buf, pattern(N, 1).tobytes())
    wbuf = await proc.mmap(W * PAGE_SIZE)
    await proc.write(wbuf, pattern(W, 2).tobytes())

    wprog, (wname,) = dmirror_factory(1)
    witness = DmirrorClient(wprog.address)
    wfile = (await proc.open(f"/dev/{wname}"))[1]
    assert (await witness.command(wfile, CMD_READ, wbuf, W)).cpages == W

    name = f"kill_{mode}"
    dev = start(name, [sys.executable, "-m", "tests.e2e.stuck_device", hmmd.address, name, mode, hex(buf), str(N)],
                tmp_path)
    op: asyncio.Future[object] | None = None
    try:
        await proc.open(f"/dev/{name}")
        step = {"setup": "setup done", "evict": "evict setup done", "stream": "stream started"}.get(mode, "migrated")
        await asyncio.to_thread(dev.wait_line, step, 30)  # a busy machine starts Python slowly
        await witness.events(wfile, clear=True)
        if mode == "invalidate":
            op = asyncio.ensure_future(proc.mprotect(buf, N * PAGE_SIZE, PROT_READ))
            await asyncio.to_thread(dev.wait_line, "in invalidate")
        elif mode == "fault":
            op = asyncio.ensure_future(proc.read(buf, 4))
            await asyncio.to_thread(dev.wait_line, "in migrate_to_ram")
        elif mode in ("setup", "stream", "evict"):
            # The migration holds the mmap lock (setup) or the page (stream, evict):
            # a CPU access to a collected page waits for it.
            op = asyncio.ensure_future(proc.read(buf + PAGE_SIZE, 4))
            await asyncio.sleep(0.2)
            assert not op.done()
            assert (await admin.stats()).device(name).migrations_open == 1
        t0 = time.monotonic()
        dev.signal(signal.SIGKILL)
        if op is not None:
            try:
                await asyncio.wait_for(op, DEADLINE_S + 2)
            except KernelError as e:
                assert mode in ("fault", "stream", "evict") and e.errno == errno.EFAULT, e
            assert time.monotonic() - t0 < DEADLINE_S + 1
    finally:
        dev.stop()

    st = (await admin.stats()).device(name)
    assert not st.alive and st.migrations_open == 0
    if mode == "setup":
        # Rolled back: the pages never left system memory, contents intact.
        assert (ints(await proc.read(buf, N * PAGE_SIZE)) == pattern(N, 1)).all()
    else:
        # They lived only on the dead device: every access fails, each on its own.
        for i in range(N):
            await read_fails(proc, buf + i * PAGE_SIZE)
    assert await admin.check_invariants() == []
    # The witness never noticed: no event but the CPU operation's own (on a range
    # it does not map), and its pages are as they were.
    events = await witness.events(wfile, clear=True)
    if mode == "invalidate":
        assert [(e.event, e.start, e.end, e.mapped_pages) for e in events] == [
            (Event.PROTECTION_VMA, buf, buf + N * PAGE_SIZE, 0)]
    else:
        assert events == []
    assert (ints((await witness.command(wfile, CMD_READ, wbuf, W)).data) == pattern(W, 2)).all()
    assert (await admin.stats()).device(wname).alive
    # Dropping lost pages works, and every frame comes back at exit.
    await proc.munmap(buf, N * PAGE_SIZE)
    assert await admin.check_invariants() == []
    await proc.exit()
    await witness.close()
    for _ in range(50):
        if (await admin.stats()).ram_used_frames == used_before:
            break
        await asyncio.sleep(0.05)
    assert (await admin.stats()).ram_used_frames == used_before
