"""The shared-memory staging area (capability "shm") between real processes.

hmmd runs as its own process and creates one file per session; the device (this
test process, through the SDK or the raw stubs) maps it. Page contents then move
through the file in both directions of a migration and of DMA, with the same rights
checks as in messages (a frame not held is EFAULT and a counted violation), bad
offsets are EINVAL, a device that never maps the area still works over the network,
and the file is gone once the session ends, whichever way it ends.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from hmm.abi import (
    HMM_PFN_REQ_FAULT,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    MEMORY_DEVICE_PRIVATE,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    PAGE_SIZE,
    PROT_READ,
    PROTOCOL_VERSION,
)
from hmm.admin import AdminClient
from hmm.channel import insecure_channel
from hmm.device import PIPELINE_MIN_PAGES, DeviceConnection, Driver, Migration
from hmm.errors import KernelError
from hmm.process import Proc, ProcessClient
from hmm.staging import StagingArea
from hmm.v1 import device_pb2 as dpb
from hmm.v1 import device_pb2_grpc
from hmmd.rpc.shm_socket import MAX_PENDING
from tests.procs import Program, start_hmmd

P = PAGE_SIZE
N = 64  # pages migrated
SHM = N * P


def pattern(npages: int, seed: int) -> bytes:
    return (np.arange(npages * P // 4, dtype=np.uint32) * 2654435761 + seed).astype(np.uint32).tobytes()


def name() -> str:
    return f"shm_{uuid.uuid4().hex[:10]}"


async def errno_of(call: Awaitable[Any]) -> int:
    try:
        await call
    except KernelError as e:
        return e.errno or 0
    except grpc.aio.AioRpcError as e:
        md = dict(e.trailing_metadata() or ())
        return int(md.get("hmm-errno-value", -1))
    return 0


def link(path: str) -> str:
    try:
        return os.readlink(path)
    except FileNotFoundError:
        return ""


async def gone(path: str, was: str, timeout: float = 5.0) -> bool:
    """The daemon closed the memfd that ``path`` (/proc/PID/fd/N) linked to (``was``):
    the fd is gone, or its number now names something else."""
    deadline = asyncio.get_running_loop().time() + timeout
    while link(path) == was:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


class Rig:
    """A process with N written pages that opened a device with private memory."""

    def __init__(self, conn: DeviceConnection, proc: Proc, buf: int, dev: str, admin: AdminClient) -> None:
        self.conn, self.proc, self.buf, self.dev, self.admin = conn, proc, buf, dev, admin
        self.md = conn._metadata

    async def violations(self) -> int:
        return (await self.admin.stats()).device(self.dev).violations

    async def to_device(self, via_buffer: bool = True) -> tuple[Migration, np.ndarray]:
        """Migrate [buf, buf + N pages) here; returns the migration and the stored pages."""
        c = self.conn
        mig = await c.migrate_setup(self.proc.pid, self.buf, self.buf + N * P, MIGRATE_VMA_SELECT_SYSTEM)
        assert mig.cpages == N and (mig.src_flags & MIGRATE_PFN_VALID).all()
        if via_buffer:
            with c.transfer_buffer(N) as tb:
                await c.dma_read_into(mig.src_pfns, tb)
                stored = tb.copy()
        else:
            stored = np.frombuffer(await c.dma_read(mig.src_pfns), dtype=np.uint8).reshape(N, P).copy()
        dst = np.arange(N, dtype=np.uint64) + np.uint64(c.device_pfn_base)
        moved = await c.migrate_pages(mig, dst, np.full(N, MIGRATE_PFN_VALID | MIGRATE_PFN_WRITE, dtype=np.uint8))
        await c.migrate_finalize(mig)
        assert (moved & MIGRATE_PFN_MIGRATE).all()
        return mig, stored

    async def to_system(self, contents: bytes, via_buffer: bool = True, n: int = N) -> None:
        """Migrate the first ``n`` pages home with ``contents``."""
        c = self.conn
        mig = await c.migrate_setup(self.proc.pid, self.buf, self.buf + n * P, MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
        assert mig.cpages == n
        flags = np.full(n, MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA | MIGRATE_PFN_WRITE, dtype=np.uint8)
        zeros = np.zeros(n, dtype=np.uint64)
        if via_buffer:
            with c.transfer_buffer(n) as tb:
                tb.reshape(-1)[:] = np.frombuffer(contents, dtype=np.uint8)
                moved = await c.migrate_pages(mig, zeros, flags, tb, finalize=True)
        else:
            moved = await c.migrate_pages(mig, zeros, flags, contents, finalize=True)
        assert (moved & MIGRATE_PFN_MIGRATE).all()


async def make_rig(hmmd: Program, cpu: ProcessClient, *, shm_bytes: int = SHM,
                   max_message_bytes: int = 16 * P) -> Rig:
    dev = name()
    # Messages of 64 KiB: N pages of contents in one MigratePages only fit through
    # the staging area, so a migration that works proves it was used.
    conn = await DeviceConnection.connect(hmmd.address, dev, Driver(), memory=MEMORY_DEVICE_PRIVATE,
                                          memory_pages=2 * N, shm_bytes=shm_bytes,
                                          max_message_bytes=max_message_bytes)
    proc = await cpu.spawn("shm")
    buf = await proc.mmap(N * P)
    await proc.write(buf, pattern(N, 1))
    await proc.open(f"/dev/{dev}")
    return Rig(conn, proc, buf, dev, AdminClient(cpu.channel))


@pytest.fixture
async def rig(hmmd: Program, cpu: ProcessClient) -> AsyncIterator[Rig]:
    r = await make_rig(hmmd, cpu)
    yield r
    await r.proc.exit()
    await r.conn.close()


# ---- data moves through the area --------------------------------------------------------------

async def test_the_area_is_granted_and_mapped(hmmd: Program, rig: Rig) -> None:
    c = rig.conn
    assert "shm" in c.capabilities and c.staging is not None and c.staging.size == SHM
    # The daemon's memfd, reached through its fd in /proc (a link to "/memfd:hmmd-devN").
    assert c.staging.path.startswith(f"/proc/{hmmd.pid}/fd/")
    assert os.readlink(c.staging.path).startswith("/memfd:hmmd-dev")
    st = os.stat(c.staging.path)
    assert stat.S_ISREG(st.st_mode) and st.st_size == SHM and st.st_uid == os.getuid()


async def test_the_area_cannot_be_resized(rig: Rig) -> None:
    """A device that could shrink the area under the daemon's mapping would kill the
    daemon with SIGBUS at its next copy: the memfd's seals refuse it."""
    c = rig.conn
    assert c.staging is not None
    fd = os.open(c.staging.path, os.O_RDWR)
    try:
        for size in (0, SHM - P, SHM + P):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        with pytest.raises(PermissionError):
            os.posix_fallocate(fd, SHM, P)
        assert os.fstat(fd).st_size == SHM
    finally:
        os.close(fd)
    # The area still works, both ways.
    _, stored = await rig.to_device()
    assert stored.tobytes() == pattern(N, 1)
    await rig.to_system(pattern(N, 2))
    assert await rig.proc.read(rig.buf, N * P) == pattern(N, 2)
    assert await rig.violations() == 0


async def test_migration_both_ways_through_the_area(rig: Rig) -> None:
    _, stored = await rig.to_device()
    assert stored.tobytes() == pattern(N, 1)
    assert (await rig.admin.stats()).device(rig.dev).memory_used_pages == N
    await rig.to_system(pattern(N, 2))  # one 256 KiB MigratePages: only possible through the area
    assert await rig.proc.read(rig.buf, N * P) == pattern(N, 2)
    # Again with plain bytes (the SDK copies them into a region of the area).
    _, stored = await rig.to_device(via_buffer=False)
    assert stored.tobytes() == pattern(N, 2)
    await rig.to_system(pattern(N, 3), via_buffer=False)
    assert await rig.proc.read(rig.buf, N * P) == pattern(N, 3)
    assert await rig.violations() == 0
    assert (await rig.admin.stats()).device(rig.dev).migrations_open == 0


async def test_device_memory_in_the_area_moves_with_one_copy(hmmd: Program, cpu: ProcessClient) -> None:
    """DeviceConnection.shared_memory: device memory kept in the area. The daemon
    copies straight into it (DmaRead with that offset, no data in the reply) and
    straight out of it (MigratePages naming it), and transfer buffers never overlap it."""
    r = await make_rig(hmmd, cpu, shm_bytes=2 * SHM)
    c = r.conn
    try:
        assert c.shared_memory(2 * N + 1) is None  # no room
        mem = c.shared_memory(N)
        assert mem is not None and mem.shape == (N, P) and c.staging is not None
        base = c.staging.offset_of(mem.reshape(-1))
        assert base is not None
        with c.transfer_buffer(N) as tb:  # the rest of the area
            off = c.staging.offset_of(tb.reshape(-1))
            assert off is not None and (off >= base + N * P or off + N * P <= base)
        # To the device: the daemon writes the sources into device memory itself.
        sent: list[dpb.DmaReadRequest] = []
        read = c.stub.DmaRead

        def spy(req, **kw):  # type: ignore[no-untyped-def]
            sent.append(req)
            return read(req, **kw)

        c.stub.DmaRead = spy  # type: ignore[method-assign]
        mig = await c.migrate_setup(r.proc.pid, r.buf, r.buf + N * P, MIGRATE_VMA_SELECT_SYSTEM)
        await c.dma_read_into(mig.src_pfns, mem)
        assert [q.shm_offset for q in sent] == [base] and mem.tobytes() == pattern(N, 1)
        dst = np.arange(N, dtype=np.uint64) + np.uint64(c.device_pfn_base)
        await c.migrate_pages(mig, dst, np.full(N, MIGRATE_PFN_VALID | MIGRATE_PFN_WRITE, dtype=np.uint8),
                              finalize=True)
        # The device changes its memory; home, the daemon copies straight out of it.
        mem.reshape(-1)[:] = np.frombuffer(pattern(N, 7), dtype=np.uint8)
        mig = await c.migrate_setup(r.proc.pid, r.buf, r.buf + N * P, MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
        flags = np.full(N, MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA | MIGRATE_PFN_WRITE, dtype=np.uint8)
        moved = await c.migrate_pages(mig, np.zeros(N, dtype=np.uint64), flags, mem, finalize=True)
        assert (moved & MIGRATE_PFN_MIGRATE).all()
        assert await r.proc.read(r.buf, N * P) == pattern(N, 7)
        assert await r.violations() == 0
    finally:
        await r.proc.exit()
        await r.conn.close()


async def test_dma_write_and_read_through_the_area(rig: Rig) -> None:
    c = rig.conn
    mirror = await c.insert_notifier(rig.proc.pid, rig.buf, N * P)
    async with mirror.fault(rig.buf, rig.buf + N * P, write=True) as r:
        assert (r.flags & (HMM_PFN_VALID | HMM_PFN_WRITE) == HMM_PFN_VALID | HMM_PFN_WRITE).all()
        pfns = r.pfns.copy()
    await c.dma_write(pfns, pattern(N, 4))
    assert await rig.proc.read(rig.buf, N * P) == pattern(N, 4)
    assert await c.dma_read(pfns[::-1]) == b"".join(pattern(N, 4)[i * P:(i + 1) * P] for i in range(N - 1, -1, -1))
    # Raw: the reply carries no data, the area holds it at the offset.
    assert c.staging is not None
    reply = await c.stub.DmaRead(dpb.DmaReadRequest(pfns=pfns[:2].astype("<u8").tobytes(), shm_offset=3 * P),
                                 metadata=rig.md)
    assert reply.data == b""
    assert c.staging.view(3 * P, 2 * P).tobytes() == pattern(N, 4)[: 2 * P]
    await c.remove_notifier(mirror)
    assert await rig.violations() == 0


async def test_dma_rights_are_checked_through_the_area(rig: Rig) -> None:
    c = rig.conn
    assert c.staging is not None
    await rig.proc.mprotect(rig.buf + (N - 2) * P, 2 * P, PROT_READ)
    mirror = await c.insert_notifier(rig.proc.pid, rig.buf, N * P)
    async with mirror.fault(rig.buf, rig.buf + N * P, default_flags=HMM_PFN_REQ_FAULT) as r:
        pfns = r.pfns.copy()
    assert not (r.flags[-2:] & HMM_PFN_WRITE).any()
    area = c.staging.view(0, SHM)
    area[:] = 0xA5
    stranger = c.system_frames - 1  # a frame this device never got
    for bad in ([stranger], [pfns[0], stranger]):
        req = dpb.DmaReadRequest(pfns=np.array(bad, dtype="<u8").tobytes(), shm_offset=0)
        assert await errno_of(c.stub.DmaRead(req, metadata=rig.md)) == errno.EFAULT
    assert (area == 0xA5).all(), "a refused DmaRead copied something"
    assert await rig.violations() == 2
    # A write needs a writable right: the last two pages are read-only.
    area[: 2 * P] = np.frombuffer(pattern(2, 9), dtype=np.uint8)
    req = dpb.DmaWriteRequest(pfns=pfns[-2:].astype("<u8").tobytes(), shm_offset=0)
    assert await errno_of(c.stub.DmaWrite(req, metadata=rig.md)) == errno.EFAULT
    assert await rig.violations() == 3
    assert await rig.proc.read(rig.buf, N * P) == pattern(N, 1)
    # The rights go with the invalidation, through the area as in messages.
    await c.dma_read(pfns[:1])
    await rig.proc.munmap(rig.buf, P)
    assert await errno_of(c.dma_read(pfns[:1])) == errno.EFAULT
    assert await rig.violations() == 4
    await c.remove_notifier(mirror)


async def test_a_big_read_is_pipelined_through_two_regions(hmmd: Program, cpu: ProcessClient) -> None:
    n = 2 * PIPELINE_MIN_PAGES + 3  # four calls, the last one short
    conn = await DeviceConnection.connect(hmmd.address, name(), Driver(), shm_bytes=n * P)
    proc = await cpu.spawn("big")
    try:
        assert conn.staging is not None
        buf = await proc.mmap(n * P)
        await proc.write(buf, pattern(n, 11))
        await proc.open(f"/dev/{conn.name}")
        mirror = await conn.insert_notifier(proc.pid, buf, n * P)
        async with mirror.fault(buf, buf + n * P) as r:
            pfns = r.pfns.copy()
        out = np.zeros((n, P), dtype=np.uint8)
        calls: list[int] = []
        real = conn.stub.DmaRead

        def counted(req: dpb.DmaReadRequest, **kw: Any) -> Any:
            calls.append(req.shm_offset)
            return real(req, **kw)

        conn.stub.DmaRead = counted  # type: ignore[method-assign]
        await conn.dma_read_into(pfns, out)
        assert out.tobytes() == pattern(n, 11)
        assert calls == [0, PIPELINE_MIN_PAGES * P, 0]  # 1024 + 1024 + 3 pages, the two regions in turn
        assert await conn.dma_read(pfns[::-1]) == b"".join(
            pattern(n, 11)[i * P:(i + 1) * P] for i in range(n - 1, -1, -1))
        # A frame not held in the third call: EFAULT, and every region is free again.
        bad = pfns.copy()
        bad[-2] = conn.system_frames - 1
        assert await errno_of(conn.dma_read_into(bad, out)) == errno.EFAULT
        assert conn.staging.alloc(n * P) == 0
        conn.staging.free(0)
    finally:
        await proc.exit()
        await conn.close()


# ---- bad offsets --------------------------------------------------------------------------------

def _pf(*v: int) -> bytes:
    return np.array(v, dtype="<u8").tobytes()


@pytest.mark.parametrize("offset,npages", [(1, 1), (P // 2, 1), (SHM, 1), (SHM - P, 2), (1 << 63, 1),
                                           ((1 << 64) - P, 2)],
                         ids=["unaligned", "half-page", "at-end", "straddles-end", "huge", "wraps"])
async def test_dma_outside_the_area_is_einval(rig: Rig, offset: int, npages: int) -> None:
    c = rig.conn
    mirror = await c.insert_notifier(rig.proc.pid, rig.buf, N * P)
    async with mirror.fault(rig.buf, rig.buf + npages * P, write=True) as r:
        pfns = r.pfns.astype("<u8").tobytes()
    md = rig.md
    assert await errno_of(c.stub.DmaRead(dpb.DmaReadRequest(pfns=pfns, shm_offset=offset), metadata=md)) == \
        errno.EINVAL
    assert await errno_of(c.stub.DmaWrite(dpb.DmaWriteRequest(pfns=pfns, shm_offset=offset), metadata=md)) == \
        errno.EINVAL
    assert await rig.violations() == 0  # EINVAL is not a coherence violation
    assert await rig.proc.read(rig.buf, N * P) == pattern(N, 1)
    # The same pages at offset 0 are fine.
    await c.stub.DmaRead(dpb.DmaReadRequest(pfns=pfns, shm_offset=0), metadata=md)
    await c.remove_notifier(mirror)


async def test_bad_shm_requests_are_einval(rig: Rig) -> None:
    c = rig.conn
    md = rig.md
    mirror = await c.insert_notifier(rig.proc.pid, rig.buf, N * P)
    async with mirror.fault(rig.buf, rig.buf + P, write=True) as r:
        pfn = r.pfns.astype("<u8").tobytes()
    # Data in the message and an offset: one or the other.
    req = dpb.DmaWriteRequest(pfns=pfn, data=pattern(1, 5), shm_offset=0)
    assert await errno_of(c.stub.DmaWrite(req, metadata=md)) == errno.EINVAL
    # Empty or ragged pfns are EINVAL as in messages.
    for pfns in (b"", b"\x00" * 7):
        assert await errno_of(c.stub.DmaRead(dpb.DmaReadRequest(pfns=pfns, shm_offset=0), metadata=md)) == \
            errno.EINVAL
    assert await rig.proc.read(rig.buf, P) == pattern(N, 1)[:P]
    await c.remove_notifier(mirror)

    # MigratePages: bad offsets, data and an offset, a length that is not the data's.
    mig = await c.migrate_setup(rig.proc.pid, rig.buf, rig.buf + 4 * P, MIGRATE_VMA_SELECT_SYSTEM)
    dst = (np.arange(4, dtype=np.uint64) + np.uint64(c.device_pfn_base)).astype("<u8").tobytes()
    data_flags = bytes([MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA] * 4)
    for kw in ({"shm_offset": 1, "shm_length": 4 * P}, {"shm_offset": SHM - P, "shm_length": 4 * P},
               {"shm_offset": 0, "shm_length": 3 * P}, {"shm_offset": 0, "shm_length": 5 * P},
               {"shm_offset": 0, "shm_length": 4 * P, "data": pattern(4, 6)}):
        req = dpb.MigratePagesRequest(migration_id=mig.id, dst_pfns=dst, dst_flags=data_flags, **kw)
        assert await errno_of(c.stub.MigratePages(req, metadata=md)) == errno.EINVAL, kw
    # The migration is still usable after those refusals.
    req = dpb.MigratePagesRequest(migration_id=mig.id, dst_pfns=dst, dst_flags=bytes([MIGRATE_PFN_VALID] * 4),
                                  shm_offset=0, shm_length=0, finalize=True)
    moved = np.frombuffer((await c.stub.MigratePages(req, metadata=md)).src_flags, dtype=np.uint8)
    assert (moved & MIGRATE_PFN_MIGRATE).all()
    await rig.to_system(pattern(4, 10), n=4)
    assert await rig.proc.read(rig.buf, N * P) == pattern(4, 10) + pattern(N, 1)[4 * P:]
    assert await rig.violations() == 0


async def test_an_offset_without_an_area_is_einval(hmmd: Program, cpu: ProcessClient) -> None:
    r = await make_rig(hmmd, cpu, shm_bytes=0, max_message_bytes=64 << 20)
    try:
        assert "shm" not in r.conn.capabilities and r.conn.staging is None
        mirror = await r.conn.insert_notifier(r.proc.pid, r.buf, P)
        async with mirror.fault(r.buf, r.buf + P) as res:
            pfn = res.pfns.astype("<u8").tobytes()
        assert await errno_of(r.conn.stub.DmaRead(dpb.DmaReadRequest(pfns=pfn, shm_offset=0), metadata=r.md)) == \
            errno.EINVAL
        assert await r.conn.dma_read(res.pfns) == pattern(1, 1)
    finally:
        await r.proc.exit()
        await r.conn.close()


# ---- the network path without the area ----------------------------------------------------------

async def test_a_device_that_never_maps_the_area_uses_the_network(hmmd: Program, cpu: ProcessClient,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # As on another host: the daemon grants the area, the device cannot open it.
    monkeypatch.setattr(StagingArea, "map", classmethod(lambda cls, path, size: None))
    r = await make_rig(hmmd, cpu, max_message_bytes=64 << 20)
    try:
        assert "shm" in r.conn.capabilities and r.conn.staging is None
        _, stored = await r.to_device()
        assert stored.tobytes() == pattern(N, 1)
        await r.to_system(pattern(N, 7))
        assert await r.proc.read(r.buf, N * P) == pattern(N, 7)
        _, stored = await r.to_device(via_buffer=False)
        await r.to_system(stored.tobytes(), via_buffer=False)
        assert await r.proc.read(r.buf, N * P) == pattern(N, 7)
        assert await r.violations() == 0
    finally:
        await r.proc.exit()
        await r.conn.close()


async def test_transfers_fall_back_to_messages_when_the_area_is_full(hmmd: Program, cpu: ProcessClient) -> None:
    r = await make_rig(hmmd, cpu, max_message_bytes=64 << 20)
    try:
        assert r.conn.staging is not None
        with r.conn.transfer_buffer(N) as whole:  # takes all of it
            assert r.conn.staging.offset_of(whole) == 0
            _, stored = await r.to_device()  # its own buffer: an ordinary array
            assert stored.tobytes() == pattern(N, 1)
            await r.to_system(pattern(N, 8))
        assert await r.proc.read(r.buf, N * P) == pattern(N, 8)
    finally:
        await r.proc.exit()
        await r.conn.close()


# ---- the file's lifetime ------------------------------------------------------------------------

async def _raw_connect(address: str, dev: str, caps: list[str], shm_bytes: int) -> tuple[Any, Any, dpb.Welcome]:
    ch = insecure_channel(address)
    call = device_pb2_grpc.DeviceStub(ch).Connect()
    await call.write(dpb.DeviceMessage(hello=dpb.Hello(version_major=PROTOCOL_VERSION[0], name=dev,
                                                       capabilities=caps, shm_bytes=shm_bytes)))
    first = await call.read()
    return ch, call, first.welcome


async def test_the_area_is_closed_when_the_session_ends(hmmd: Program) -> None:
    # Closed by the device.
    conn = await DeviceConnection.connect(hmmd.address, name(), Driver(), shm_bytes=SHM)
    assert conn.staging is not None and os.path.exists(conn.staging.path)
    path = conn.staging.path
    was = link(path)
    assert was.startswith("/memfd:hmmd-dev")
    await conn.close()
    assert await gone(path, was)
    # A stream that just breaks (the device process died), before the area was ever mapped.
    ch, call, w = await _raw_connect(hmmd.address, name(), ["shm"], SHM)
    assert w.shm_path and os.path.exists(w.shm_path)
    was = link(w.shm_path)
    call.cancel()
    await ch.close()
    assert await gone(w.shm_path, was)


@pytest.mark.parametrize("caps,size,granted", [
    (["shm"], 0, 0),                 # no size: no area
    ([], SHM, 0),                    # a size without the capability: none either
    (["shm"], 5000, 2 * P),          # rounded up to pages
    (["shm"], 1 << 40, 1 << 20),     # at most --shm-max-bytes
])
async def test_hello_shm_fields(tmp_path: Path, caps: list[str], size: int, granted: int) -> None:
    hmmd = start_hmmd(tmp_path, "--shm-max-bytes", str(1 << 20), name="hmmd-shm")
    try:
        ch, call, w = await _raw_connect(hmmd.address, name(), caps, size)
        assert w.shm_bytes == granted
        assert ("shm" in w.capabilities) == bool(granted)
        if granted:
            assert w.shm_path.startswith(f"/proc/{hmmd.pid}/fd/") and os.path.getsize(w.shm_path) == granted
        else:
            assert w.shm_path == ""
        # The daemon exits cleanly with an area open.
        hmmd.signal(signal.SIGTERM)
        assert await asyncio.to_thread(hmmd.proc.wait, 10) == 0
        call.cancel()
        await ch.close()
    finally:
        hmmd.stop()


# ---- from another pid namespace: the area over --shm-socket ----------------------------
def pid_namespace_unavailable() -> str:
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=10)
    return "" if r.returncode == 0 else f"cannot make a pid namespace: {r.stderr.decode().strip()}"


def run_peer(kernel: str, dev: str, npages: int) -> dict[str, Any]:
    """tests/e2e/shm_peer.py in a pid namespace of its own (the daemon's /proc is not there)."""
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "tests.e2e.shm_peer",
                        kernel, dev, str(npages)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-4000:]
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("with_socket", [True, False])
async def test_device_in_another_pid_namespace_fetches_the_area_over_the_socket(tmp_path: Path,
                                                                                with_socket: bool) -> None:
    """A device that cannot see /proc/<hmmd pid> maps its area through --shm-socket and
    migrates through it both ways with the data intact; without the socket it has no
    area and the same migrations take the network path."""
    reason = pid_namespace_unavailable()
    if reason:
        pytest.skip(reason)
    sock = tmp_path / "shm.sock"
    hmmd = start_hmmd(tmp_path, *(("--shm-socket", str(sock)) if with_socket else ()))
    try:
        out = run_peer(hmmd.address, name(), 32)
        assert out["staging"] == (f"unix:{sock}" if with_socket else "")
        assert out["to_device"] == 32 and out["device_holds_pattern"]
        assert out["home"] == 32 and out["crc_home"] == out["crc_expected"]
    finally:
        hmmd.stop()
    assert not sock.exists()  # removed at exit


async def test_shm_socket_refuses_without_a_session_token(tmp_path: Path) -> None:
    """Unknown tokens, an over-long or unterminated request: one byte 1, no descriptor.
    The daemon keeps serving; a good token still gets its area."""
    sock = tmp_path / "shm.sock"
    hmmd = start_hmmd(tmp_path, "--shm-socket", str(sock))
    try:
        def ask(request: bytes, shut: bool = False) -> tuple[bytes, list[int]]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(str(sock))
                s.sendall(request)
                if shut:
                    s.shutdown(socket.SHUT_WR)
                msg, fds, _, _ = socket.recv_fds(s, 1, 1)
                for fd in fds:
                    os.close(fd)
                return msg, fds

        assert ask(b"no-such-session\n") == (b"\x01", [])
        assert ask(b"x" * 300 + b"\n") == (b"\x01", [])
        assert ask(b"unterminated", shut=True) == (b"\x01", [])
        idle = []  # connections that never ask hold the daemon's handshakes, up to a limit
        try:
            for _ in range(MAX_PENDING):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(sock))
                idle.append(s)
            time.sleep(0.3)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1)  # well under the 2 s an idle handshake is given
                s.connect(str(sock))
                assert s.recv(1) == b""  # closed at once, unanswered
        finally:
            for s in idle:
                s.close()
        time.sleep(0.3)
        c = await DeviceConnection.connect(hmmd.address, name(), Driver(), shm_bytes=SHM)
        try:
            assert c.staging is not None and c.staging.path == f"unix:{sock}"
            msg, fds = ask(c._metadata[0][1].encode() + b"\n")
            assert msg == b"\x00" and len(fds) == 1
        finally:
            await c.close()
        assert hmmd.alive()
    finally:
        hmmd.stop()
