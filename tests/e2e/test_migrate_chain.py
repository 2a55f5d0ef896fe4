"""MigratePages with a chained setup (capability "migrate-chain") between real processes.

hmmd runs as its own process; the device is this test process (the SDK, or its raw
stubs for what the SDK never sends). A device that migrates a range piece by piece
finalizes each piece and sets the next one up in the same call: one call a piece
after the first setup. The pages move and come home with the same bytes as with
separate calls; a chained setup that fails reports its errno after the finalize it
followed; arguments that could never work are refused before anything is done.
"""

from __future__ import annotations

import asyncio
import errno
import uuid
from collections.abc import AsyncIterator

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
from hmm.device import DeviceConnection, Driver, Migration
from hmm.errors import KernelError
from hmm.process import Proc, ProcessClient
from hmm.v1 import device_pb2 as dpb
from hmm.v1 import device_pb2_grpc
from tests.procs import Program

P = PAGE_SIZE
N = 64
PIECE = 16
HOLE, ZERO = 5, 41  # never touched; read once (maps the zero page)


def pattern(npages: int = N) -> np.ndarray:
    return (np.arange(npages * P // 4, dtype=np.uint32) * 2246822519 + 3).view(np.uint8).reshape(npages, P)


class Rig:
    def __init__(self, conn: DeviceConnection, proc: Proc, buf: int, dev: str, admin: AdminClient) -> None:
        self.conn, self.proc, self.buf, self.dev, self.admin = conn, proc, buf, dev, admin
        self.calls = {"MigrateSetup": 0, "MigratePages": 0, "MigrateFinalize": 0, "DmaRead": 0}
        for method in self.calls:  # count the calls the SDK makes
            real = getattr(conn.stub, method)

            def counted(*a: object, _real: object = real, _m: str = method, **kw: object) -> object:
                self.calls[_m] += 1
                return _real(*a, **kw)  # type: ignore[operator]

            setattr(conn.stub, method, counted)

    def piece(self, k: int) -> tuple[int, int]:
        return self.buf + k * PIECE * P, self.buf + (k + 1) * PIECE * P

    async def stats(self):  # noqa: ANN201
        return (await self.admin.stats()).device(self.dev)


async def make_rig(hmmd: Program, cpu: ProcessClient, shm_bytes: int = 0) -> Rig:
    dev = f"ch_{uuid.uuid4().hex[:10]}"
    conn = await DeviceConnection.connect(hmmd.address, dev, Driver(), memory=MEMORY_DEVICE_PRIVATE,
                                          memory_pages=2 * N, shm_bytes=shm_bytes)
    proc = await cpu.spawn("chain")
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
    assert (await r.stats()).violations == 0
    await r.proc.exit()
    await r.conn.close()


def to_device(c: DeviceConnection, mig: Migration, first: int, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Store a piece's contents (page ``first`` + i of the buffer -> device page
    ``first`` + i, row ``first`` + i of ``stored``) and name the destinations."""
    moving = np.flatnonzero(mig.src_flags & MIGRATE_PFN_MIGRATE)
    assert mig.data is not None
    stored[first + c.data_pages(mig)] = mig.data
    dst = np.zeros(mig.npages, dtype=np.uint64)
    flags = np.zeros(mig.npages, dtype=np.uint8)
    dst[moving] = np.uint64(c.device_pfn_base) + (first + moving).astype(np.uint64)
    flags[moving] = MIGRATE_PFN_VALID | MIGRATE_PFN_WRITE
    return dst, flags


@pytest.mark.parametrize("mode", ["chained", "chained-shm", "two-calls"])
async def test_a_range_moves_piece_by_piece_and_home(hmmd: Program, cpu: ProcessClient, mode: str) -> None:
    r = await make_rig(hmmd, cpu, shm_bytes=2 * N * P if mode == "chained-shm" else 0)
    c = r.conn
    assert "migrate-chain" in c.capabilities
    if mode == "two-calls":  # a daemon without the capability: the SDK makes the calls one by one
        c.capabilities = tuple(x for x in c.capabilities if x != "migrate-chain")
    pieces = N // PIECE
    stored = np.zeros((N, P), dtype=np.uint8)
    mig = await c.migrate_setup(r.proc.pid, *r.piece(0), MIGRATE_VMA_SELECT_SYSTEM, with_data=True)
    for k in range(pieces):
        assert mig.cpages == PIECE and mig.start == r.piece(k)[0]
        dst, flags = to_device(c, mig, k * PIECE, stored)
        if k + 1 < pieces:
            done = mig
            mig = await c.migrate_pages_and_setup(done, dst, flags, pid=r.proc.pid, start=r.piece(k + 1)[0],
                                                  end=r.piece(k + 1)[1], select=MIGRATE_VMA_SELECT_SYSTEM,
                                                  with_data=True)
            assert (done.src_flags & MIGRATE_PFN_MIGRATE).all()
            assert (await r.stats()).migrations_open == 1  # the finished one is over, the next one open
        else:
            moved = await c.migrate_pages(mig, dst, flags, finalize=True)
            assert (moved & MIGRATE_PFN_MIGRATE).all()
    expect = pattern().copy()
    expect[[HOLE, ZERO]] = 0
    assert (stored == expect).all()
    s = await r.stats()
    assert s.migrations_open == 0 and s.violations == 0 and s.memory_used_pages == N
    if mode == "two-calls":
        assert r.calls["MigrateSetup"] == pieces and r.calls["MigratePages"] == pieces
    else:
        assert r.calls["MigrateSetup"] == 1 and r.calls["MigratePages"] == pieces
        assert r.calls["DmaRead"] == (pieces if mode == "chained-shm" else 0)  # through the area, else inline

    # Home, piece by piece from what the device stored: the CPU reads the pattern back.
    mig = await c.migrate_setup(r.proc.pid, *r.piece(0), MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
    for k in range(pieces):
        assert mig.cpages == PIECE
        flags = np.full(PIECE, MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA | MIGRATE_PFN_WRITE, dtype=np.uint8)
        data = stored[k * PIECE:(k + 1) * PIECE].tobytes()
        dst = np.zeros(PIECE, dtype=np.uint64)
        if k + 1 < pieces:
            done = mig
            mig = await c.migrate_pages_and_setup(done, dst, flags, data, pid=r.proc.pid, start=r.piece(k + 1)[0],
                                                  end=r.piece(k + 1)[1], select=MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
            assert (done.src_flags & MIGRATE_PFN_MIGRATE).all()
        else:
            assert (await c.migrate_pages(mig, dst, flags, data, finalize=True) & MIGRATE_PFN_MIGRATE).all()
    assert await r.proc.read(r.buf, N * P) == expect.tobytes()
    s = await r.stats()
    assert s.migrations_open == 0 and s.violations == 0
    await r.proc.exit()
    await c.close()


async def test_a_failed_chained_setup_reports_its_errno_after_the_finalize(rig: Rig, cpu: ProcessClient) -> None:
    c = rig.conn
    gone = await rig.proc.mmap(PIECE * P)
    await rig.proc.munmap(gone, PIECE * P)
    other = await cpu.spawn("not-opened")  # never opened the device: EPERM
    other_buf = await other.mmap(PIECE * P)
    stored = np.zeros((N, P), dtype=np.uint8)
    cases = [(rig.proc.pid, gone, errno.EINVAL),  # no mapping there
             (other.pid, other_buf, errno.EPERM),
             (rig.proc.pid, rig.piece(3)[0], errno.EIO)]  # reading the next piece's contents fails
    for k, (pid, start, err) in enumerate(cases):
        mig = await c.migrate_setup(rig.proc.pid, *rig.piece(k), MIGRATE_VMA_SELECT_SYSTEM, with_data=True)
        dst, flags = to_device(c, mig, k * PIECE, stored)
        if err == errno.EIO:
            await rig.admin.inject_faults(rig.dev, fail_dma=1)
        with pytest.raises(KernelError) as e:
            await c.migrate_pages_and_setup(mig, dst, flags, pid=pid, start=start, end=start + PIECE * P,
                                            select=MIGRATE_VMA_SELECT_SYSTEM, with_data=True)
        assert e.value.errno == err
        assert (mig.src_flags & MIGRATE_PFN_MIGRATE).all()  # the piece moved all the same
        assert (await rig.stats()).migrations_open == 0
        home = await c.migrate_setup(rig.proc.pid, *rig.piece(k), MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
        assert home.cpages == PIECE and (home.src_flags & MIGRATE_PFN_MIGRATE).all()  # on the device
        await c.migrate_pages(home, np.zeros(PIECE, dtype=np.uint64),
                              np.full(PIECE, MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA, dtype=np.uint8),
                              stored[k * PIECE:(k + 1) * PIECE].tobytes(), finalize=True)
    expect = pattern().copy()
    expect[[HOLE, ZERO]] = 0
    assert await rig.proc.read(rig.buf, 3 * PIECE * P) == expect[:3 * PIECE].tobytes()
    # The piece whose chained setup failed to read was put back whole: collectable again.
    again = await c.migrate_setup(rig.proc.pid, *rig.piece(3), MIGRATE_VMA_SELECT_SYSTEM)
    await c.migrate_finalize(again)
    assert again.cpages == PIECE and (again.src_flags & MIGRATE_PFN_VALID).all()
    await other.exit()


def errno_of(e: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> int:
    return int(dict(e.value.trailing_metadata() or ()).get("hmm-errno-value", -1))


def pages_request(c: DeviceConnection, mig: dpb.MigrateSetupReply | Migration, finalize: bool,
                  nxt: dpb.MigrateSetupRequest | None) -> dpb.MigratePagesRequest:
    """Every collected page to device page i."""
    flags = np.frombuffer(mig.src_flags, dtype=np.uint8) if isinstance(mig.src_flags, bytes) else mig.src_flags
    moving = (flags & MIGRATE_PFN_MIGRATE) != 0
    dst = np.where(moving, np.uint64(c.device_pfn_base) + np.arange(len(flags), dtype=np.uint64), 0)
    return dpb.MigratePagesRequest(migration_id=mig.id if isinstance(mig, Migration) else mig.migration_id,
                                   dst_pfns=dst.astype("<u8").tobytes(),
                                   dst_flags=np.where(moving, MIGRATE_PFN_VALID, 0).astype(np.uint8).tobytes(),
                                   finalize=finalize, next=nxt)


@pytest.mark.parametrize("bad", ["no-finalize", "selector", "fault-token", "empty", "unaligned", "too-big-for-data"])
async def test_bad_next_arguments_einval_and_nothing_done(rig: Rig, bad: str) -> None:
    c = rig.conn
    mig = await c.migrate_setup(rig.proc.pid, *rig.piece(0), MIGRATE_VMA_SELECT_SYSTEM)
    start, end = rig.piece(1)
    nxt = dpb.MigrateSetupRequest(pid=rig.proc.pid, start=start, end=end, select=MIGRATE_VMA_SELECT_SYSTEM)
    if bad == "selector":
        nxt.select = 1 << 7
    elif bad == "fault-token":
        nxt.fault_token = 1
    elif bad == "empty":
        nxt.end = nxt.start
    elif bad == "unaligned":
        nxt.start += 8
    elif bad == "too-big-for-data":
        nxt.end = nxt.start + 16384 * P  # x (4096 + 9) bytes: beyond one reply
        nxt.with_data = True
    req = pages_request(c, mig, bad != "no-finalize", nxt)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.stub.MigratePages(req, metadata=c._metadata)
    assert errno_of(e) == errno.EINVAL
    # Nothing was done: the migration is still open, no device page taken, and the
    # pages can still move (without a chained setup).
    s = await rig.stats()
    assert s.migrations_open == 1 and s.memory_used_pages == 0
    req.ClearField("next")
    req.finalize = True
    moved = np.frombuffer((await c.stub.MigratePages(req, metadata=c._metadata)).src_flags, dtype=np.uint8)
    assert (moved & MIGRATE_PFN_MIGRATE).all()  # (the hole too: a device page fills it)
    s = await rig.stats()
    assert s.migrations_open == 0 and s.memory_used_pages == PIECE


async def test_without_the_capability_einval_and_nothing_done(hmmd: Program, rig: Rig) -> None:
    """A device that did not ask for migrate-chain (an older SDK, another language)
    gets EINVAL for a chained setup, before anything is done."""
    dev = f"nc_{uuid.uuid4().hex[:8]}"
    ch = insecure_channel(hmmd.address)
    stub = device_pb2_grpc.DeviceStub(ch)
    call = stub.Connect()
    await call.write(dpb.DeviceMessage(hello=dpb.Hello(version_major=PROTOCOL_VERSION[0], name=dev,
                                                       capabilities=["dma"], memory=MEMORY_DEVICE_PRIVATE,
                                                       memory_pages=N)))
    w = (await call.read()).welcome
    assert "migrate-chain" not in w.capabilities
    try:
        opening = asyncio.ensure_future(rig.proc.open(f"/dev/{dev}"))
        msg = await call.read()
        assert msg.WhichOneof("msg") == "file_open"
        await call.write(dpb.DeviceMessage(ack=dpb.Ack(id=msg.id, ok=True)))
        await opening
        md = (("hmm-session", w.session),)
        setup = await stub.MigrateSetup(dpb.MigrateSetupRequest(pid=rig.proc.pid, start=rig.piece(0)[0],
                                                                end=rig.piece(0)[1], select=MIGRATE_VMA_SELECT_SYSTEM),
                                        metadata=md)
        nxt = dpb.MigrateSetupRequest(pid=rig.proc.pid, start=rig.piece(1)[0], end=rig.piece(1)[1],
                                      select=MIGRATE_VMA_SELECT_SYSTEM)
        fake = DeviceConnection.__new__(DeviceConnection)
        fake.device_pfn_base = w.device_pfn_base
        req = pages_request(fake, setup, True, nxt)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.MigratePages(req, metadata=md)
        assert errno_of(e) == errno.EINVAL
        stats = (await rig.admin.stats()).device(dev)
        assert stats.migrations_open == 1 and stats.memory_used_pages == 0
        req.ClearField("next")
        await stub.MigratePages(req, metadata=md)
        stats = (await rig.admin.stats()).device(dev)
        assert stats.migrations_open == 0 and stats.memory_used_pages == PIECE
    finally:
        call.cancel()
        await ch.close()
