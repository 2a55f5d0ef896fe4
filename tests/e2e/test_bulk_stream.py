"""Page contents beyond one message as streams (capability "bulk-stream") between real processes.

hmmd runs as its own process; the device is this test process (the SDK, or its raw
stubs for what the SDK never sends). A device whose negotiated message limit holds
15 pages migrates 64 in one migration: it reads the collected pages with one
DmaReadStream and sends them home with one MigratePagesStream, and the bytes are the
same as the CPU wrote. Bad streams are refused with EINVAL (or ENOENT) and change
nothing: the migration stays open, and still moves every page afterwards. An
invalidation acked while a DmaReadStream is under way ends it with EFAULT.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest

from hmm import bulk
from hmm.abi import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_VALID,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    PAGE_SIZE,
)
from hmm.device import Migration
from hmm.process import ProcessClient
from hmm.v1 import device_pb2 as dpb
from hmm.v1.device_pb2_grpc import DeviceStub
from tests.e2e.test_migrate_chain import count_calls
from tests.e2e.test_setup_data import HOLE, ZERO, N, Rig, make_rig, pattern, raw_device
from tests.procs import Program

P = PAGE_SIZE
LIMIT = 64 << 10  # the device's message limit: 15 pages of contents a message


async def stats(r: Rig):  # noqa: ANN201
    return (await r.admin.stats()).device(r.dev)


async def setup(r: Rig, select: int = MIGRATE_VMA_SELECT_SYSTEM) -> Migration:
    return await r.conn.migrate_setup(r.proc.pid, r.buf, r.buf + N * P, select)


@pytest.fixture
async def rig(hmmd: Program, cpu: ProcessClient) -> AsyncIterator[Rig]:
    r = await make_rig(hmmd, cpu, max_message_bytes=LIMIT)
    assert "bulk-stream" in r.conn.capabilities and r.conn.max_message_bytes == LIMIT
    yield r
    assert (await stats(r)).violations == 0
    await r.proc.exit()
    await r.conn.close()


def expected() -> np.ndarray:
    out = pattern().copy()
    out[[HOLE, ZERO]] = 0
    return out


async def to_device(r: Rig) -> np.ndarray:
    """Migrate the 64 pages to the device (device page i holds page i); what it stored."""
    c = r.conn
    mig = await setup(r)
    assert mig.cpages == N
    stored = np.zeros((N, P), dtype=np.uint8)
    present = np.flatnonzero(mig.src_flags & MIGRATE_PFN_VALID)
    got = np.empty((len(present), P), dtype=np.uint8)
    await c.dma_read_into(mig.src_pfns[present], got)
    stored[present] = got
    dst = np.arange(N, dtype=np.uint64) + np.uint64(c.device_pfn_base)
    moved = await c.migrate_pages(mig, dst, np.full(N, MIGRATE_PFN_VALID | MIGRATE_PFN_WRITE, np.uint8),
                                  finalize=True)
    assert (moved & MIGRATE_PFN_MIGRATE).all()
    return stored


def home_flags() -> np.ndarray:
    return np.full(N, MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA | MIGRATE_PFN_WRITE, dtype=np.uint8)


async def test_one_migration_of_more_than_a_message_both_ways(rig: Rig) -> None:
    c = rig.conn
    calls = count_calls(c, ("DmaRead", "DmaReadStream", "MigratePages", "MigratePagesStream"))
    stored = await to_device(rig)
    assert (stored == expected()).all()
    assert calls == {"DmaRead": 0, "DmaReadStream": 1, "MigratePages": 1, "MigratePagesStream": 0}
    home = await setup(rig, MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
    assert home.cpages == N
    moved = await c.migrate_pages(home, np.zeros(N, dtype=np.uint64), home_flags(), stored, finalize=True)
    assert (moved & MIGRATE_PFN_MIGRATE).all()
    assert calls["MigratePagesStream"] == 1 and calls["MigratePages"] == 1
    assert await rig.proc.read(rig.buf, N * P) == expected().tobytes()
    s = await stats(rig)
    assert s.migrations_open == 0 and s.memory_used_pages == 0


async def test_dma_read_stream_parts_and_errors(hmmd: Program, rig: Rig) -> None:
    c, md = rig.conn, rig.conn._metadata
    mig = await setup(rig)
    try:
        pfns = mig.src_pfns[mig.src_flags & MIGRATE_PFN_VALID != 0]
        raw = pfns.astype("<u8").tobytes()
        parts = [r.data for r in [x async for x in c.stub.DmaReadStream(
            dpb.DmaReadStreamRequest(pfns=raw[:10 * 8], chunk_pages=4), metadata=md)]]
        assert [len(p) for p in parts] == [4 * P, 4 * P, 2 * P]
        assert b"".join(parts) == await c.dma_read(pfns[:10])
        whole = [len(r.data) for r in [x async for x in c.stub.DmaReadStream(
            dpb.DmaReadStreamRequest(pfns=raw), metadata=md)]]  # 0: as many as one reply holds
        room = (LIMIT - 64) // P
        assert whole == [room * P] * (len(pfns) // room) + [len(pfns) % room * P]

        async def errno_of(req: dpb.DmaReadStreamRequest, stub: Any = c.stub, md: Any = md) -> tuple[int, int]:
            got = 0
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in stub.DmaReadStream(req, metadata=md):
                    got += 1
            return int(dict(e.value.trailing_metadata() or ()).get("hmm-errno-value", -1)), got

        assert await errno_of(dpb.DmaReadStreamRequest(pfns=raw, chunk_pages=room + 1)) == (errno.EINVAL, 0)
        assert await errno_of(dpb.DmaReadStreamRequest()) == (errno.EINVAL, 0)
        assert await errno_of(dpb.DmaReadStreamRequest(pfns=raw[:8] + (1 << 63).to_bytes(8, "little"))) \
            == (errno.EINVAL, 0)
        # Frames another device holds: EFAULT before the first reply, a violation of
        # the reader's; without the capability (an older device, another language): EINVAL.
        for caps, err in ((["dma", "bulk-stream"], errno.EFAULT), (["dma"], errno.EINVAL)):
            async with raw_device(hmmd.address, rig.proc, capabilities=caps) as other:
                assert await errno_of(dpb.DmaReadStreamRequest(pfns=raw, chunk_pages=1), other.stub,
                                      other.metadata) == (err, 0)
                assert (await rig.admin.stats()).device(other.name).violations == (err == errno.EFAULT)
    finally:
        await c.migrate_finalize(mig)


async def send_parts(rig: Rig, parts: list[bulk.Bulk]) -> int:
    """A raw MigratePagesStream of ``parts``; its errno (0: it succeeded)."""
    async def gen() -> AsyncIterator[bulk.Bulk]:
        for p in parts:
            yield p

    try:
        await rig.conn.stub.MigratePagesStream(gen(), metadata=rig.conn._metadata)
    except grpc.aio.AioRpcError as e:
        return int(dict(e.trailing_metadata() or ()).get("hmm-errno-value", -1))
    return 0


async def test_bad_streams_change_nothing(rig: Rig) -> None:
    stored = await to_device(rig)
    home = await setup(rig, MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
    flags = home_flags()
    data = stored.reshape(-1)

    def first(**kw: object) -> dpb.MigratePagesRequest:
        args: dict[str, object] = {"migration_id": home.id, "dst_pfns": bytes(8 * N), "dst_flags": flags.tobytes(),
                                   "finalize": True}
        args.update(kw)
        return dpb.MigratePagesRequest(**args)  # type: ignore[arg-type]

    def in_parts(contents: np.ndarray, head: dpb.MigratePagesRequest | None = None,
                 tail: dpb.MigratePagesRequest | None = None) -> list[bulk.Bulk]:
        """``head`` (default first()) then ``contents`` 10 pages a message; the last
        message ``tail`` if given."""
        step = 10 * P
        parts = [bulk.Bulk(head or first(), contents[:step])]
        parts += [bulk.Bulk(dpb.MigratePagesRequest(), contents[lo:lo + step])
                  for lo in range(step, len(contents), step)]
        if tail is not None:
            parts[-1] = bulk.Bulk(tail, parts[-1].data)
        return parts

    cases = {
        "no message": [],
        "unknown migration": in_parts(data, first(migration_id=home.id + 1000)),
        "flags not one per page": in_parts(data, first(dst_flags=flags[:-1].tobytes())),
        "shm_offset": [bulk.Bulk(first(shm_offset=0, shm_length=P))],
        "a later part with another field": in_parts(data, tail=dpb.MigratePagesRequest(finalize=True)),
        "more contents than the step takes": in_parts(np.concatenate([data, data[:P]])),
        "fewer contents": in_parts(data[:-P]),
    }
    want = {"unknown migration": errno.ENOENT}
    for case, parts in cases.items():
        assert await send_parts(rig, parts) == want.get(case, errno.EINVAL), case
        s = await stats(rig)
        assert s.migrations_open == 1 and s.memory_used_pages == N, case
    # The migration is as it was: the whole contents, in parts, move every page home.
    assert await send_parts(rig, in_parts(data)) == 0
    assert await rig.proc.read(rig.buf, N * P) == expected().tobytes()
    s = await stats(rig)
    assert s.migrations_open == 0 and s.memory_used_pages == 0


async def test_a_stream_broken_off_changes_nothing(hmmd: Program, rig: Rig) -> None:
    """The device stops sending after the first part and cancels the call: the
    migration stays open with every page still on the device (the daemon logs no
    error); finalize then puts them back there, and they come home whole later."""
    c = rig.conn
    stored = await to_device(rig)
    home = await setup(rig, MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
    req = dpb.MigratePagesRequest(migration_id=home.id, dst_pfns=bytes(8 * N), dst_flags=home_flags().tobytes(),
                                  finalize=True)
    call = c.stub.MigratePagesStream(metadata=c._metadata)
    await call.write(bulk.Bulk(req, stored.reshape(-1)[:10 * P]))
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    s = await stats(rig)
    assert s.migrations_open == 1 and s.memory_used_pages == N
    assert "Traceback" not in hmmd.log_text() and "ERROR" not in hmmd.log_text()
    await c.migrate_finalize(home)
    assert (await stats(rig)).migrations_open == 0
    back = await setup(rig, MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
    assert back.cpages == N  # still device-private: nothing came home
    await c.migrate_pages(back, np.zeros(N, dtype=np.uint64), home_flags(), stored, finalize=True)
    assert await rig.proc.read(rig.buf, N * P) == expected().tobytes()


async def test_without_a_session_enodev_and_garbage_einval(hmmd: Program, rig: Rig) -> None:
    """Both streams need a live session (ENODEV); a MigratePagesStream message that
    does not parse, first or later, is EINVAL and changes nothing."""
    c = rig.conn
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in c.stub.DmaReadStream(dpb.DmaReadStreamRequest(pfns=bytes(8))):
            pass
    assert dict(e.value.trailing_metadata() or ()).get("hmm-errno") == "ENODEV"
    stored = await to_device(rig)
    home = await setup(rig, MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
    head = dpb.MigratePagesRequest(migration_id=home.id, dst_pfns=bytes(8 * N), dst_flags=home_flags().tobytes(),
                                   finalize=True)
    garbage = b"\xff\xff\xff\xff\x07"
    raw = c.stub.MigratePagesStream  # (its serializer passes bytes through)
    for md, parts, err in (((), [bulk.encode(head, [stored[:1]])], "ENODEV"),
                           (c._metadata, [garbage], "EINVAL"),
                           (c._metadata, [bulk.encode(head, [stored[:1]]), garbage], "EINVAL")):
        async def gen(parts: list[bytes] = parts) -> AsyncIterator[bytes]:
            for p in parts:
                yield p

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await raw(gen(), metadata=md)
        assert dict(e.value.trailing_metadata() or ()).get("hmm-errno") == err
        s = await stats(rig)
        assert s.migrations_open == 1 and s.memory_used_pages == N
    assert "Traceback" not in hmmd.log_text()
    await c.migrate_pages(home, np.zeros(N, dtype=np.uint64), home_flags(), stored, finalize=True)
    assert await rig.proc.read(rig.buf, N * P) == expected().tobytes()


async def test_an_invalidation_acked_mid_stream_ends_it_with_efault(hmmd: Program, cpu: ProcessClient) -> None:
    """Frames a range fault granted are read by a DmaReadStream, one page a reply. The
    reader holds back (flow control stops the daemon a few replies in); the process
    unmaps the range meanwhile and the device acks the invalidation. The stream then
    ends with EFAULT, a violation of the reader's, after the replies already made, and
    those hold the contents from before."""
    r = await make_rig(hmmd, cpu)
    c, n = r.conn, 1024  # 4 MiB, a page a reply: far beyond the 64 KiB window
    contents = np.random.default_rng(5).integers(0, 256, n * P, dtype=np.uint8).tobytes()
    buf = await r.proc.mmap(n * P)
    await r.proc.write(buf, contents)
    mirror = await c.insert_notifier(r.proc.pid, buf, n * P)
    fault = await c.range_fault(mirror, await c.read_begin(mirror), buf, buf + n * P, default_flags=HMM_PFN_REQ_FAULT)
    assert (fault.flags & HMM_PFN_VALID).all()
    # A channel of its own that never grows its window (no BDP probing).
    channel = grpc.aio.insecure_channel(hmmd.address, options=[("grpc.http2.bdp_probe", 0)])
    try:
        replies = DeviceStub(channel).DmaReadStream(
            dpb.DmaReadStreamRequest(pfns=fault.pfns.astype("<u8").tobytes(), chunk_pages=1), metadata=c._metadata)
        got = [(await replies.read()).data]
        await r.proc.munmap(buf, n * P)  # returns once the device acked the invalidation
        with pytest.raises(grpc.aio.AioRpcError) as e:
            while (reply := await replies.read()) is not grpc.aio.EOF:
                got.append(reply.data)
        assert dict(e.value.trailing_metadata() or ()).get("hmm-errno") == "EFAULT"
        assert 1 <= len(got) < n
        assert b"".join(got) == contents[:len(got) * P]
        assert (await stats(r)).violations == 1
    finally:
        await channel.close()
        await r.proc.exit()
        await r.conn.close()
