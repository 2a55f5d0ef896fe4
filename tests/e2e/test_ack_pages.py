"""migrate_to_ram with the pages step in the ack (capability "ack-pages") and without.

hmmd runs as its own process; the device is this test process (the SDK). Its driver
brings the faulting page home with MigratePages(finalize) inside MigrateToRam, as
dmirror does. With "ack-pages" granted that request rides on the ack (no unary
call); a daemon that did not grant it (an older one) gets a MigratePages call before
the ack. Either way the CPU reads the device's bytes and the device page is freed.
"""

from __future__ import annotations

import asyncio
import errno
import uuid

import numpy as np
import pytest

from hmm.abi import (
    MEMORY_DEVICE_PRIVATE,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_VMA_SELECT_SYSTEM,
    PAGE_SIZE,
)
from hmm.admin import AdminClient
from hmm.device import DeviceConnection, Driver, FaultRequest
from hmm.errors import KernelError
from hmm.process import ProcessClient
from tests.procs import Program

P = PAGE_SIZE
N = 4


class HomeDriver(Driver):
    """Keeps its pages in a dict; migrate_to_ram copies the faulting page home."""

    wants_fault_migration = True

    def __init__(self) -> None:
        self.conn: DeviceConnection | None = None
        self.mem: dict[int, bytes] = {}
        self.freed: list[int] = []

    async def migrate_to_ram(self, fault: FaultRequest) -> bool:
        assert self.conn is not None and fault.migration is not None
        mig = fault.migration
        sel = (mig.src_flags & (MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)) == (MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE)
        data = b"".join(self.mem[int(p)] for p in mig.src_pfns[sel])
        flags = np.where(sel, MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA, 0).astype(np.uint8)
        moved = await self.conn.migrate_pages(mig, np.zeros(len(sel), dtype=np.uint64), flags, data, finalize=True)
        return bool((moved & MIGRATE_PFN_MIGRATE).any())

    def page_free(self, pfns: np.ndarray) -> None:
        self.freed.extend(int(p) for p in pfns)


@pytest.mark.parametrize("granted", [True, False], ids=["in-the-ack", "older-daemon"])
async def test_a_touch_brings_the_page_home_with_or_without_ack_pages(hmmd: Program, cpu: ProcessClient,
                                                                       granted: bool) -> None:
    driver, name = HomeDriver(), f"ackp_{uuid.uuid4().hex[:8]}"
    conn = await DeviceConnection.connect(hmmd.address, name, driver, memory=MEMORY_DEVICE_PRIVATE,
                                          memory_pages=2 * N)
    driver.conn = conn
    assert "ack-pages" in conn.capabilities
    if not granted:  # what the SDK sees from a daemon that predates Ack.pages
        conn.capabilities = tuple(c for c in conn.capabilities if c != "ack-pages")
    calls = 0
    unary = conn.stub.MigratePages

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return unary(*args, **kwargs)

    conn.stub.MigratePages = counted  # type: ignore[method-assign]
    proc = await cpu.spawn("ackp")
    try:
        buf = await proc.mmap(N * P)
        data = bytes((i * 7 + 3) % 251 for i in range(N * P))
        await proc.write(buf, data)
        await proc.open(f"/dev/{name}")
        # To the device: setup, copy, pages + finalize.
        mig = await conn.migrate_setup(proc.pid, buf, buf + N * P, MIGRATE_VMA_SELECT_SYSTEM)
        dst = np.arange(N, dtype=np.uint64) + np.uint64(conn.device_pfn_base)
        got = await conn.dma_read(mig.src_pfns)
        for i in range(N):
            driver.mem[int(dst[i])] = got[i * P:(i + 1) * P]
        await conn.migrate_pages(mig, dst, np.full(N, MIGRATE_PFN_VALID, dtype=np.uint8), finalize=True)
        assert calls == 1
        # Each touch brings one page home through migrate_to_ram.
        for i in range(N):
            assert await proc.read(buf + i * P, P) == data[i * P:(i + 1) * P]
        assert calls == 1 + (0 if granted else N)  # the pages step rode on the ack, or was a call
        deadline = asyncio.get_running_loop().time() + 5
        while len(driver.freed) < N and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert sorted(driver.freed) == [int(p) for p in dst]
        st = (await AdminClient(cpu.channel).stats()).device(name)
        assert st.memory_used_pages == 0 and st.migrate_to_ram_latency.count == N and st.violations == 0
    finally:
        await proc.exit()
        await conn.close()


class ForgetfulDriver(HomeDriver):
    """Brings the page home flagged VALID only (SYSTEM_DATA forgotten), with its data."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[int] = []

    async def migrate_to_ram(self, fault: FaultRequest) -> bool:
        assert self.conn is not None and fault.migration is not None
        mig = fault.migration
        data = b"".join(self.mem[int(p)] for p in mig.src_pfns)
        try:
            await self.conn.migrate_pages(mig, np.zeros(mig.npages, dtype=np.uint64),
                                          np.full(mig.npages, MIGRATE_PFN_VALID, np.uint8), data, finalize=True)
        except KernelError as e:
            self.errors.append(e.errno)
            raise
        return True


async def test_a_pages_step_the_daemon_would_refuse_in_the_ack_is_refused_to_the_driver(
        hmmd: Program, cpu: ProcessClient) -> None:
    """With the pages step riding on the ack, a request the daemon refuses for certain
    (data without SYSTEM_DATA) raises EINVAL in the driver's own call: it looked
    like success, and only the daemon's log said why the access then failed."""
    driver, name = ForgetfulDriver(), f"ackbad_{uuid.uuid4().hex[:8]}"
    conn = await DeviceConnection.connect(hmmd.address, name, driver, memory=MEMORY_DEVICE_PRIVATE, memory_pages=2)
    driver.conn = conn
    proc = await cpu.spawn("ackbad")
    try:
        buf = await proc.mmap(P)
        await proc.write(buf, b"z" * P)
        await proc.open(f"/dev/{name}")
        mig = await conn.migrate_setup(proc.pid, buf, buf + P, MIGRATE_VMA_SELECT_SYSTEM)
        driver.mem[conn.device_pfn_base] = await conn.dma_read(mig.src_pfns)
        await conn.migrate_pages(mig, np.array([conn.device_pfn_base], np.uint64),
                                 np.full(1, MIGRATE_PFN_VALID, np.uint8), finalize=True)
        with pytest.raises(KernelError) as e:
            await proc.read(buf, P)
        assert e.value.errno == errno.EFAULT and driver.errors == [errno.EINVAL]
    finally:
        await proc.exit()
        await conn.close()
