"""A device that leaves a setup call before it has the reply (it cancels, or its
connection goes) never learns the migration's id and cannot finalize it: the
daemon rolls it back as soon as the call ends, instead of holding the process's
mmap lock until --migration-timeout-ms (30 s) runs out.

hmmd runs as its own process; the devices are this test process. A second device
mirroring the range holds the setup's MIGRATE invalidation until the first device
has cancelled its call.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

from hmm.abi import (
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_VALID,
    MIGRATE_VMA_SELECT_SYSTEM,
    PAGE_SIZE,
    Event,
)
from hmm.device import DeviceConnection, Driver
from hmm.mirror import InvalidateRange, Mirror
from hmm.process import ProcessClient
from tests.e2e.test_setup_data import make_rig, pattern
from tests.procs import Program

P = PAGE_SIZE
PIECE = 16


class HoldsMigrations(Driver):
    """Acks a MIGRATE invalidation only when told to."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def invalidate(self, mirror: Mirror, rng: InvalidateRange) -> bool:
        if rng.event == Event.MIGRATE:
            self.entered.set()
            await self.release.wait()
        return True


@pytest.mark.parametrize("call", ["MigrateSetup", "chained"])
async def test_a_setup_whose_caller_left_is_rolled_back_at_once(hmmd: Program, cpu: ProcessClient,
                                                                call: str) -> None:
    r = await make_rig(hmmd, cpu)
    c, pid = r.conn, r.proc.pid
    holder = HoldsMigrations()
    other = await DeviceConnection.connect(hmmd.address, f"{r.dev}_h", holder)
    try:
        await r.proc.open(f"/dev/{r.dev}_h")
        held = r.buf + PIECE * P  # the second piece: its setup waits for the holder's ack
        await other.insert_notifier(pid, held, PIECE * P)
        if call == "MigrateSetup":
            setup = asyncio.ensure_future(c.migrate_setup(pid, held, held + PIECE * P, MIGRATE_VMA_SELECT_SYSTEM))
        else:  # the first piece moves, the chained setup of the second one is left
            mig = await c.migrate_setup(pid, r.buf, held, MIGRATE_VMA_SELECT_SYSTEM)
            moving = (mig.src_flags & MIGRATE_PFN_MIGRATE) != 0
            dst = np.where(moving, np.uint64(c.device_pfn_base) + np.arange(PIECE, dtype=np.uint64), 0)
            setup = asyncio.ensure_future(c.migrate_pages_and_setup(
                mig, dst, np.where(moving, MIGRATE_PFN_VALID, 0).astype(np.uint8), pid=pid, start=held,
                end=held + PIECE * P, select=MIGRATE_VMA_SELECT_SYSTEM))
        await asyncio.wait_for(holder.entered.wait(), 5)
        setup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await setup
        holder.release.set()  # the setup now completes in the daemon, with no one to hear it
        for _ in range(100):
            if (await r.admin.stats()).device(r.dev).migrations_open == 0:
                break
            await asyncio.sleep(0.02)
        stats = (await r.admin.stats()).device(r.dev)
        assert stats.migrations_open == 0 and stats.violations == 0
        assert stats.memory_used_pages == (PIECE if call == "chained" else 0)  # the first piece moved
        # Its pages are back: the CPU reads them, and can unmap them now (the mmap lock is free).
        assert await r.proc.read(held, PIECE * P) == pattern()[PIECE:2 * PIECE].tobytes()
        await asyncio.wait_for(r.proc.munmap(held, PIECE * P), 5)
        assert "left before it had migration" in hmmd.log_text()
    finally:
        holder.release.set()
        await other.close()
        await r.proc.exit()
        await c.close()
