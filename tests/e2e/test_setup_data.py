"""MigrateSetup with_data (capability "migrate-setup-data") between real processes.

hmmd runs as its own process; the device is this test process (the SDK, or the raw
stubs for what the SDK never sends). The setup's reply carries the contents of the
collected system pages, exactly what a DmaRead of them would return; the pages then
move with one MigratePages(finalize) and come home with the same bytes. Asking
without the capability, for more than one reply can carry, or when the read fails
is an error that leaves nothing collected. Every reply is bounded by the message
limit the device negotiated, an eviction's too (evicted in ranges of device PFNs).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest

from hmm.abi import (
    MEMORY_DEVICE_PRIVATE,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    PAGE_SIZE,
    PROTOCOL_VERSION,
)
from hmm.admin import AdminClient
from hmm.channel import insecure_channel
from hmm.device import DeviceConnection, Driver
from hmm.errors import KernelError
from hmm.process import Proc, ProcessClient
from hmm.v1 import device_pb2 as dpb
from hmm.v1 import device_pb2_grpc
from tests.procs import Program

P = PAGE_SIZE
N = 64
HOLE, ZERO = 5, 9  # never touched; read once (maps the zero page)


def pattern(npages: int = N) -> np.ndarray:
    return (np.arange(npages * P // 4, dtype=np.uint32) * 2654435761 + 7).view(np.uint8).reshape(npages, P)


def name() -> str:
    return f"sd_{uuid.uuid4().hex[:10]}"


class Rig:
    def __init__(self, conn: DeviceConnection, proc: Proc, buf: int, dev: str, admin: AdminClient) -> None:
        self.conn, self.proc, self.buf, self.dev, self.admin = conn, proc, buf, dev, admin

    async def open_migrations(self) -> int:
        return (await self.admin.stats()).device(self.dev).migrations_open

    async def collected(self) -> int:
        """How many pages a plain setup collects now (then puts back)."""
        mig = await self.conn.migrate_setup(self.proc.pid, self.buf, self.buf + N * P, MIGRATE_VMA_SELECT_SYSTEM)
        await self.conn.migrate_finalize(mig)
        return int(np.count_nonzero(mig.src_flags & MIGRATE_PFN_VALID))


async def make_rig(hmmd: Program, cpu: ProcessClient, shm_bytes: int = 0, **connect: Any) -> Rig:
    """A device with 2N pages of memory, and a process that opened it with N pages
    written with pattern() but for HOLE (never touched) and ZERO (the zero page)."""
    dev = name()
    conn = await DeviceConnection.connect(hmmd.address, dev, Driver(), memory=MEMORY_DEVICE_PRIVATE,
                                          memory_pages=2 * N, shm_bytes=shm_bytes, **connect)
    proc = await cpu.spawn("setup-data")
    buf = await proc.mmap(N * P)
    data = pattern()
    for i in range(N):
        if i not in (HOLE, ZERO):
            await proc.write(buf + i * P, data[i].tobytes())
    assert await proc.read(buf + ZERO * P, 4) == b"\0" * 4
    await proc.open(f"/dev/{dev}")
    return Rig(conn, proc, buf, dev, AdminClient(cpu.channel))


@pytest.fixture
async def rig(hmmd: Program, cpu: ProcessClient) -> AsyncIterator[Rig]:
    r = await make_rig(hmmd, cpu)
    yield r
    assert (await r.admin.stats()).device(r.dev).violations == 0
    await r.proc.exit()
    await r.conn.close()


@pytest.mark.parametrize("shm", [False, True], ids=["in-reply", "sdk-reads-through-shm"])
async def test_setup_carries_the_contents_and_they_move_both_ways(hmmd: Program, cpu: ProcessClient,
                                                                  shm: bool) -> None:
    r = await make_rig(hmmd, cpu, shm_bytes=N * P if shm else 0)
    c = r.conn
    assert "migrate-setup-data" in c.capabilities
    mig = await c.migrate_setup(r.proc.pid, r.buf, r.buf + N * P, MIGRATE_VMA_SELECT_SYSTEM, with_data=True)
    present = [i for i in range(N) if i not in (HOLE, ZERO)]
    assert mig.cpages == N and list(c.data_pages(mig)) == present
    assert mig.data is not None and (mig.data == pattern()[present]).all()
    dst = np.arange(N, dtype=np.uint64) + np.uint64(c.device_pfn_base)
    moved = await c.migrate_pages(mig, dst, np.full(N, MIGRATE_PFN_VALID | MIGRATE_PFN_WRITE, dtype=np.uint8),
                                  finalize=True)
    assert (moved & MIGRATE_PFN_MIGRATE).all()
    stored = np.zeros((N, P), dtype=np.uint8)
    stored[present] = mig.data
    # Home, from what the device stored: the CPU reads the pattern (the hole and the
    # zero page as zeros).
    home = await c.migrate_setup(r.proc.pid, r.buf, r.buf + N * P, MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
                                 with_data=True)
    assert home.cpages == N and home.data is not None and not len(home.data)  # device-private: no contents
    flags = np.full(N, MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA | MIGRATE_PFN_WRITE, dtype=np.uint8)
    moved = await c.migrate_pages(home, np.zeros(N, dtype=np.uint64), flags, stored.tobytes(), finalize=True)
    assert (moved & MIGRATE_PFN_MIGRATE).all()
    expect = pattern().copy()
    expect[[HOLE, ZERO]] = 0
    assert await r.proc.read(r.buf, N * P) == expect.tobytes()
    stats = (await r.admin.stats()).device(r.dev)
    assert stats.violations == 0 and stats.migrations_open == 0
    await r.proc.exit()
    await c.close()


async def test_reply_data_equals_dma_read(rig: Rig) -> None:
    c = rig.conn
    mig = await c.migrate_setup(rig.proc.pid, rig.buf, rig.buf + N * P, MIGRATE_VMA_SELECT_SYSTEM, with_data=True)
    try:
        pfns = mig.src_pfns[c.data_pages(mig)]
        assert mig.data is not None and mig.data.tobytes() == await c.dma_read(pfns)
    finally:
        await c.migrate_finalize(mig)
    assert await rig.open_migrations() == 0


async def errno_of_setup(rig: Rig, stub: device_pb2_grpc.DeviceStub, md: tuple[tuple[str, str], ...],
                         npages: int = N) -> int:
    req = dpb.MigrateSetupRequest(pid=rig.proc.pid, start=rig.buf, end=rig.buf + npages * P,
                                  select=MIGRATE_VMA_SELECT_SYSTEM, with_data=True)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.MigrateSetup(req, metadata=md)
    return int(dict(e.value.trailing_metadata() or ()).get("hmm-errno-value", -1))


@contextlib.asynccontextmanager
async def raw_device(address: str, proc: Proc, **hello: Any) -> AsyncIterator[RawDevice]:
    """A device speaking the raw stubs, with only the capabilities it names (an older
    SDK, another language), opened by ``proc`` (its FileOpen acked)."""
    dev = name()
    ch = insecure_channel(address)
    stub = device_pb2_grpc.DeviceStub(ch)
    call = stub.Connect()
    try:
        await call.write(dpb.DeviceMessage(hello=dpb.Hello(version_major=PROTOCOL_VERSION[0], name=dev, **hello)))
        w = (await call.read()).welcome
        opening = asyncio.ensure_future(proc.open(f"/dev/{dev}"))
        msg = await call.read()
        assert msg.WhichOneof("msg") == "file_open"
        await call.write(dpb.DeviceMessage(ack=dpb.Ack(id=msg.id, ok=True)))
        await opening
        yield RawDevice(dev, stub, w, (("hmm-session", w.session),))
    finally:
        call.cancel()
        await ch.close()


@dataclass
class RawDevice:
    name: str
    stub: device_pb2_grpc.DeviceStub
    welcome: dpb.Welcome
    metadata: tuple[tuple[str, str], ...]


async def test_without_the_capability_einval_and_nothing_collected(hmmd: Program, rig: Rig) -> None:
    """An old device never sends with_data; one that does without asking for the
    capability gets EINVAL before anything is collected."""
    async with raw_device(hmmd.address, rig.proc, capabilities=["dma"]) as raw:
        assert "migrate-setup-data" not in raw.welcome.capabilities
        assert await errno_of_setup(rig, raw.stub, raw.metadata) == errno.EINVAL
        assert (await rig.admin.stats()).device(raw.name).migrations_open == 0
        assert await rig.collected() == N - 2  # every written page: nothing was left collected


async def test_more_than_one_reply_can_carry_einval(rig: Rig) -> None:
    c = rig.conn
    big = 16384  # x (4096 + 9) bytes: over the 64 MiB message limit
    buf = await rig.proc.mmap(big * P)
    req = dpb.MigrateSetupRequest(pid=rig.proc.pid, start=buf, end=buf + big * P, select=MIGRATE_VMA_SELECT_SYSTEM,
                                  with_data=True)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.stub.MigrateSetup(req, metadata=c._metadata)
    assert dict(e.value.trailing_metadata() or ()).get("hmm-errno-value") == str(errno.EINVAL)
    assert await rig.open_migrations() == 0
    # The SDK reads such a range with DmaRead after the setup instead.
    mig = await c.migrate_setup(rig.proc.pid, buf, buf + big * P, MIGRATE_VMA_SELECT_SYSTEM, with_data=True)
    await c.migrate_finalize(mig)
    assert mig.data is not None and not len(mig.data)  # never written: no system page to read


async def test_a_failed_read_rolls_the_migration_back(rig: Rig) -> None:
    await rig.admin.inject_faults(rig.dev, fail_dma=1)
    with pytest.raises(KernelError) as e:
        await rig.conn.migrate_setup(rig.proc.pid, rig.buf, rig.buf + N * P, MIGRATE_VMA_SELECT_SYSTEM,
                                     with_data=True)
    assert e.value.errno == errno.EIO
    assert await rig.open_migrations() == 0
    assert await rig.collected() == N - 2
    assert await rig.proc.read(rig.buf, P) == pattern()[0].tobytes()


async def test_replies_are_bounded_by_the_limit_the_device_negotiated(hmmd: Program, rig: Rig) -> None:
    """A device that asked for a smaller message limit than the daemon's (Hello
    max_message_bytes) is refused, up front and with EINVAL, any call whose reply
    could not fit it — where it would otherwise get a reply its channel rejects after
    the daemon did the work. Replies that fit are served."""
    limit = 1 << 20
    async with raw_device(hmmd.address, rig.proc, capabilities=["dma", "migrate-setup-data"],
                          max_message_bytes=limit, memory=dpb.MEMORY_DEVICE_PRIVATE, memory_pages=N) as raw:
        assert raw.welcome.limits.max_message_bytes == limit
        stub, md, pid = raw.stub, raw.metadata, rig.proc.pid
        big = 512  # pages: 2 MiB of contents
        buf = await rig.proc.mmap(big * P)
        await rig.proc.write(buf, bytes(range(256)) * (big * P // 256))

        async def errno_of(call: Any, req: Any) -> int:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(req, metadata=md)
            return int(dict(e.value.trailing_metadata() or ()).get("hmm-errno-value", -1))

        # A setup with its contents: 512 x (4096 + 9) bytes do not fit; 64 pages do.
        req = dpb.MigrateSetupRequest(pid=pid, start=buf, end=buf + big * P, select=MIGRATE_VMA_SELECT_SYSTEM,
                                      with_data=True)
        assert await errno_of(stub.MigrateSetup, req) == errno.EINVAL
        assert (await rig.admin.stats()).device(raw.name).migrations_open == 0  # nothing collected
        req.end = buf + 64 * P
        r = await stub.MigrateSetup(req, metadata=md)
        assert len(r.data) == 64 * P and r.data[:256] == bytes(range(256))
        # DmaRead of the collected frames: 64 pages fit, 512 (the same frames repeated) do not.
        pfns = np.frombuffer(r.src_pfns, dtype="<u8")
        assert (await stub.DmaRead(dpb.DmaReadRequest(pfns=pfns.tobytes()), metadata=md)).data == r.data
        assert await errno_of(stub.DmaRead, dpb.DmaReadRequest(pfns=np.tile(pfns, 8).tobytes())) == errno.EINVAL
        await stub.MigrateFinalize(dpb.MigrationRef(migration_id=r.migration_id), metadata=md)
        # A range fault answers 10 bytes a page: ~100,000 pages do not fit 1 MiB.
        sub = await stub.InsertNotifier(dpb.InsertNotifierRequest(pid=pid, start=0, length=1 << 47), metadata=md)
        seq = (await stub.ReadBegin(dpb.NotifierRef(notifier_id=sub.notifier_id), metadata=md)).seq
        fault = dpb.RangeFaultRequest(notifier_id=sub.notifier_id, notifier_seq=seq, start=buf,
                                      end=buf + (limit // 10) * P)
        assert await errno_of(stub.RangeFault, fault) == errno.EINVAL
        fault.end = buf + big * P
        assert len((await stub.RangeFault(fault, metadata=md)).pfns) == 8 * big
        assert (await rig.admin.stats()).device(raw.name).violations == 0


async def test_an_eviction_is_bounded_by_the_limit_the_device_negotiated(hmmd: Program, rig: Rig) -> None:
    """EvictSetup lists 9 bytes per mapped device page: with more pages in use than
    the device's negotiated limit can list, evicting the whole memory is refused up
    front (EINVAL, nothing unmapped), and evicting it in ranges of device PFNs
    (migrate_device_range's start and npages) brings every page home, contents
    intact."""
    limit, n, mem = 16384, 2000, 2400  # room for (16384 - 64) / 9 = 1813 entries a reply
    async with raw_device(hmmd.address, rig.proc, capabilities=["dma"], max_message_bytes=limit,
                          memory=dpb.MEMORY_DEVICE_PRIVATE, memory_pages=mem) as raw:
        stub, md, pid, base = raw.stub, raw.metadata, rig.proc.pid, raw.welcome.device_pfn_base
        buf = await rig.proc.mmap(n * P)  # never touched: holes, which the device fills itself
        contents = pattern(n)  # what the device's pages hold (written by the device)
        for lo in range(0, n, 500):  # setups the limit can carry
            r = await stub.MigrateSetup(dpb.MigrateSetupRequest(pid=pid, start=buf + lo * P, end=buf + (lo + 500) * P,
                                                                select=MIGRATE_VMA_SELECT_SYSTEM), metadata=md)
            assert r.cpages == 500
            dst = np.arange(base + lo, base + lo + 500, dtype="<u8")
            await stub.MigratePages(dpb.MigratePagesRequest(
                migration_id=r.migration_id, dst_pfns=dst.tobytes(),
                dst_flags=bytes([MIGRATE_PFN_VALID | MIGRATE_PFN_WRITE]) * 500, finalize=True), metadata=md)

        async def used() -> int:
            return int((await rig.admin.stats()).device(raw.name).memory_used_pages)

        assert await used() == n
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.EvictSetup(dpb.EvictSetupRequest(), metadata=md)
        assert dict(e.value.trailing_metadata() or ()).get("hmm-errno-value") == str(errno.EINVAL)
        assert (await rig.admin.stats()).device(raw.name).migrations_open == 0
        assert await used() == n
        for lo in range(0, mem, 600):
            ev = await stub.EvictSetup(dpb.EvictSetupRequest(start_pfn=base + lo, npages=min(600, mem - lo)),
                                       metadata=md)
            src = np.frombuffer(ev.src_pfns, dtype="<u8")
            assert src.tolist() == list(range(base + lo, base + min(lo + 600, n)))
            rows = contents[(src - base).astype(np.int64)]
            await stub.MigratePages(dpb.MigratePagesRequest(
                migration_id=ev.migration_id, dst_flags=bytes([MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA]) * len(src),
                data=rows.tobytes(), finalize=True), metadata=md)
        assert await used() == 0
        assert await rig.proc.read(buf, n * P) == contents.tobytes()
