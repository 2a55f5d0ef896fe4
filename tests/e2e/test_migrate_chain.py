"""MigratePages with a chained setup (capability "migrate-chain") between real processes.

hmmd runs as its own process; the device is this test process (the SDK, or its raw
stubs for what the SDK never sends). A device that migrates a range piece by piece
finalizes each piece and sets the next one up in the same call: one call a piece
after the first setup. The pages move and come home with the same bytes as with
separate calls; a chained setup that fails reports its errno after the finalize it
followed; arguments that could never work are refused before anything is done.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from hmm.abi import (
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    PAGE_SIZE,
)
from hmm.device import DeviceConnection, Migration
from hmm.errors import KernelError
from hmm.process import ProcessClient
from hmm.v1 import device_pb2 as dpb
from tests.e2e.test_setup_data import HOLE, ZERO, N, Rig, make_rig, pattern, raw_device
from tests.procs import Program

P = PAGE_SIZE
PIECE = 16
CALLS = ("MigrateSetup", "MigratePages", "MigrateFinalize", "DmaRead")


def count_calls(conn: DeviceConnection, methods: tuple[str, ...] = CALLS) -> dict[str, int]:
    """Count the Device calls of ``methods`` the SDK makes from now on."""
    calls = dict.fromkeys(methods, 0)
    for method in methods:
        real = getattr(conn.stub, method)

        def counted(*a: object, _real: object = real, _m: str = method, **kw: object) -> object:
            calls[_m] += 1
            return _real(*a, **kw)  # type: ignore[operator]

        setattr(conn.stub, method, counted)
    return calls


def piece(rig: Rig, k: int) -> tuple[int, int]:
    return rig.buf + k * PIECE * P, rig.buf + (k + 1) * PIECE * P


async def stats(rig: Rig):  # noqa: ANN201
    return (await rig.admin.stats()).device(rig.dev)


@pytest.fixture
async def rig(hmmd: Program, cpu: ProcessClient) -> AsyncIterator[Rig]:
    r = await make_rig(hmmd, cpu)
    yield r
    assert (await stats(r)).violations == 0
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
    calls = count_calls(c)
    assert "migrate-chain" in c.capabilities
    if mode == "two-calls":  # a daemon without the capability: the SDK makes the calls one by one
        c.capabilities = tuple(x for x in c.capabilities if x != "migrate-chain")
    pieces = N // PIECE
    stored = np.zeros((N, P), dtype=np.uint8)
    mig = await c.migrate_setup(r.proc.pid, *piece(r, 0), MIGRATE_VMA_SELECT_SYSTEM, with_data=True)
    for k in range(pieces):
        assert mig.cpages == PIECE and mig.start == piece(r, k)[0]
        dst, flags = to_device(c, mig, k * PIECE, stored)
        if k + 1 < pieces:
            done = mig
            mig = await c.migrate_pages_and_setup(done, dst, flags, pid=r.proc.pid, start=piece(r, k + 1)[0],
                                                  end=piece(r, k + 1)[1], select=MIGRATE_VMA_SELECT_SYSTEM,
                                                  with_data=True)
            assert (done.src_flags & MIGRATE_PFN_MIGRATE).all()
            assert (await stats(r)).migrations_open == 1  # the finished one is over, the next one open
        else:
            moved = await c.migrate_pages(mig, dst, flags, finalize=True)
            assert (moved & MIGRATE_PFN_MIGRATE).all()
    expect = pattern().copy()
    expect[[HOLE, ZERO]] = 0
    assert (stored == expect).all()
    s = await stats(r)
    assert s.migrations_open == 0 and s.violations == 0 and s.memory_used_pages == N
    if mode == "two-calls":
        assert calls["MigrateSetup"] == pieces and calls["MigratePages"] == pieces
    else:
        assert calls["MigrateSetup"] == 1 and calls["MigratePages"] == pieces
        assert calls["DmaRead"] == (pieces if mode == "chained-shm" else 0)  # through the area, else inline

    # Home, piece by piece from what the device stored: the CPU reads the pattern back.
    mig = await c.migrate_setup(r.proc.pid, *piece(r, 0), MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
    for k in range(pieces):
        assert mig.cpages == PIECE
        flags = np.full(PIECE, MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA | MIGRATE_PFN_WRITE, dtype=np.uint8)
        data = stored[k * PIECE:(k + 1) * PIECE].tobytes()
        dst = np.zeros(PIECE, dtype=np.uint64)
        if k + 1 < pieces:
            done = mig
            mig = await c.migrate_pages_and_setup(done, dst, flags, data, pid=r.proc.pid, start=piece(r, k + 1)[0],
                                                  end=piece(r, k + 1)[1], select=MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
            assert (done.src_flags & MIGRATE_PFN_MIGRATE).all()
        else:
            assert (await c.migrate_pages(mig, dst, flags, data, finalize=True) & MIGRATE_PFN_MIGRATE).all()
    assert await r.proc.read(r.buf, N * P) == expect.tobytes()
    s = await stats(r)
    assert s.migrations_open == 0 and s.violations == 0
    await r.proc.exit()
    await c.close()


async def test_a_failed_chained_setup_reports_its_errno_after_the_finalize(rig: Rig) -> None:
    c = rig.conn
    gone = await rig.proc.mmap(PIECE * P)
    await rig.proc.munmap(gone, PIECE * P)
    stored = np.zeros((N, P), dtype=np.uint8)
    cases = [(rig.proc.pid, gone, errno.EINVAL),  # no mapping there (known only by looking)
             (rig.proc.pid, piece(rig, 3)[0], errno.EIO)]  # reading the next piece's contents fails
    for k, (pid, start, err) in enumerate(cases):
        mig = await c.migrate_setup(rig.proc.pid, *piece(rig, k), MIGRATE_VMA_SELECT_SYSTEM, with_data=True)
        dst, flags = to_device(c, mig, k * PIECE, stored)
        if err == errno.EIO:
            await rig.admin.inject_faults(rig.dev, fail_dma=1)
        with pytest.raises(KernelError) as e:
            await c.migrate_pages_and_setup(mig, dst, flags, pid=pid, start=start, end=start + PIECE * P,
                                            select=MIGRATE_VMA_SELECT_SYSTEM, with_data=True)
        assert e.value.errno == err
        assert (mig.src_flags & MIGRATE_PFN_MIGRATE).all()  # the piece moved all the same
        assert (await stats(rig)).migrations_open == 0
        home = await c.migrate_setup(rig.proc.pid, *piece(rig, k), MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
        assert home.cpages == PIECE and (home.src_flags & MIGRATE_PFN_MIGRATE).all()  # on the device
        await c.migrate_pages(home, np.zeros(PIECE, dtype=np.uint64),
                              np.full(PIECE, MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA, dtype=np.uint8),
                              stored[k * PIECE:(k + 1) * PIECE].tobytes(), finalize=True)
    expect = pattern().copy()
    expect[[HOLE, ZERO]] = 0
    assert await rig.proc.read(rig.buf, 2 * PIECE * P) == expect[:2 * PIECE].tobytes()
    # The piece whose chained setup failed to read was put back whole: collectable again.
    again = await c.migrate_setup(rig.proc.pid, *piece(rig, 3), MIGRATE_VMA_SELECT_SYSTEM)
    await c.migrate_finalize(again)
    assert again.cpages == PIECE and (again.src_flags & MIGRATE_PFN_VALID).all()


def errno_of(e: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> int:
    return int(dict(e.value.trailing_metadata() or ()).get("hmm-errno-value", -1))


def pages_request(device_pfn_base: int, migration_id: int, src_flags: np.ndarray, finalize: bool,
                  nxt: dpb.MigrateSetupRequest | None) -> dpb.MigratePagesRequest:
    """Every collected page i to device page i."""
    moving = (src_flags & MIGRATE_PFN_MIGRATE) != 0
    dst = np.where(moving, np.uint64(device_pfn_base) + np.arange(len(src_flags), dtype=np.uint64), 0)
    return dpb.MigratePagesRequest(migration_id=migration_id, dst_pfns=dst.astype("<u8").tobytes(),
                                   dst_flags=np.where(moving, MIGRATE_PFN_VALID, 0).astype(np.uint8).tobytes(),
                                   finalize=finalize, next=nxt)


@pytest.mark.parametrize("bad", ["no-finalize", "selector", "fault-token", "empty", "unaligned", "too-big-for-data",
                                 "not-opened", "no-process"])
async def test_bad_next_arguments_refused_and_nothing_done(rig: Rig, cpu: ProcessClient, bad: str) -> None:
    c = rig.conn
    mig = await c.migrate_setup(rig.proc.pid, *piece(rig, 0), MIGRATE_VMA_SELECT_SYSTEM)
    start, end = piece(rig, 1)
    nxt = dpb.MigrateSetupRequest(pid=rig.proc.pid, start=start, end=end, select=MIGRATE_VMA_SELECT_SYSTEM)
    err = errno.EINVAL
    other = await cpu.spawn("not-opened")  # a process that never opened the device
    if bad == "not-opened":
        nxt.pid, err = other.pid, errno.EPERM
        nxt.start = await other.mmap(PIECE * P)
        nxt.end = nxt.start + PIECE * P
    elif bad == "no-process":
        nxt.pid, err = 999_999, errno.ESRCH
    elif bad == "selector":
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
    req = pages_request(c.device_pfn_base, mig.id, mig.src_flags, bad != "no-finalize", nxt)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await c.stub.MigratePages(req, metadata=c._metadata)
    assert errno_of(e) == err
    # Nothing was done: the migration is still open, no device page taken, and the
    # pages can still move (without a chained setup).
    s = await stats(rig)
    assert s.migrations_open == 1 and s.memory_used_pages == 0
    req.ClearField("next")
    req.finalize = True
    moved = np.frombuffer((await c.stub.MigratePages(req, metadata=c._metadata)).src_flags, dtype=np.uint8)
    assert (moved & MIGRATE_PFN_MIGRATE).all()  # (the hole too: a device page fills it)
    s = await stats(rig)
    assert s.migrations_open == 0 and s.memory_used_pages == PIECE
    await other.exit()


async def test_without_the_capability_einval_and_nothing_done(hmmd: Program, rig: Rig) -> None:
    """A device that did not ask for migrate-chain (an older SDK, another language)
    gets EINVAL for a chained setup, before anything is done."""
    async with raw_device(hmmd.address, rig.proc, capabilities=["dma"], memory=dpb.MEMORY_DEVICE_PRIVATE,
                          memory_pages=N) as raw:
        assert "migrate-chain" not in raw.welcome.capabilities
        start, end = piece(rig, 0)
        setup = await raw.stub.MigrateSetup(dpb.MigrateSetupRequest(pid=rig.proc.pid, start=start, end=end,
                                                                    select=MIGRATE_VMA_SELECT_SYSTEM),
                                            metadata=raw.metadata)
        start, end = piece(rig, 1)
        nxt = dpb.MigrateSetupRequest(pid=rig.proc.pid, start=start, end=end, select=MIGRATE_VMA_SELECT_SYSTEM)
        req = pages_request(raw.welcome.device_pfn_base, setup.migration_id,
                            np.frombuffer(setup.src_flags, dtype=np.uint8), True, nxt)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await raw.stub.MigratePages(req, metadata=raw.metadata)
        assert errno_of(e) == errno.EINVAL
        s = (await rig.admin.stats()).device(raw.name)
        assert s.migrations_open == 1 and s.memory_used_pages == 0
        req.ClearField("next")
        await raw.stub.MigratePages(req, metadata=raw.metadata)
        s = (await rig.admin.stats()).device(raw.name)
        assert s.migrations_open == 0 and s.memory_used_pages == PIECE
