"""Every RPC rejects bad input with a clear status and errno, and the daemon keeps serving.

Requests go through the raw generated stubs (no SDK-side checks in the way). For
each failure the test pins the exact gRPC status code, the ``hmm-errno`` /
``hmm-errno-value`` trailing metadata and a readable details message, then checks
that nothing changed (the process's Status, its memory and its file) and that the
daemon still answers a health check and a Spawn + Mmap + Write + Read round trip.
Expected errnos are Linux's where Linux has the call, else the contract's in
proto/hmm/v1/*.proto.
"""

from __future__ import annotations

import errno
import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hmm.abi import (
    ERRNO_METADATA_KEY,
    ERRNO_VALUE_METADATA_KEY,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_HUGETLB,
    MAP_PRIVATE,
    MAP_SHARED,
    MIN_MESSAGE_BYTES,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    O_CREAT,
    O_RDONLY,
    O_RDWR,
    O_TMPFILE,
    O_WRONLY,
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    PROTOCOL_VERSION,
    SESSION_METADATA_KEY,
    TASK_SIZE,
    ULONG_MAX,
)
from hmm.admin import AdminClient
from hmm.channel import DEFAULT_MAX_MESSAGE_BYTES, insecure_channel, to_kernel_error
from hmm.device import DeviceConnection, DeviceFile, Driver
from hmm.errors import KernelError
from hmm.v1 import device_pb2 as dpb
from hmm.v1 import device_pb2_grpc, process_pb2_grpc
from hmm.v1 import process_pb2 as pb
from tests.procs import Program

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
TIMEOUT_S = 5.0
U32_MAX = (1 << 32) - 1

# The status code of each errno, as proto/hmm/v1/common.proto specifies it (pinned
# here, not imported from the daemon, so that a change of the mapping fails a test).
SC = grpc.StatusCode
CODES = {
    errno.EINVAL: SC.INVALID_ARGUMENT,
    errno.EBADF: SC.INVALID_ARGUMENT,
    errno.ENOENT: SC.NOT_FOUND,
    errno.ESRCH: SC.NOT_FOUND,
    errno.EEXIST: SC.ALREADY_EXISTS,
    errno.EBUSY: SC.ABORTED,
    errno.EPERM: SC.PERMISSION_DENIED,
    errno.EACCES: SC.PERMISSION_DENIED,
    errno.ENOMEM: SC.RESOURCE_EXHAUSTED,
    errno.EOVERFLOW: SC.OUT_OF_RANGE,
    errno.EFBIG: SC.OUT_OF_RANGE,
    errno.ENODEV: SC.UNAVAILABLE,
    errno.EIO: SC.INTERNAL,
}

_ids = itertools.count()


# ---- helpers ------------------------------------------------------------------------------


@dataclass
class Stubs:
    channel: grpc.aio.Channel
    proc: process_pb2_grpc.ProcessStub
    dev: device_pb2_grpc.DeviceStub
    health: health_pb2_grpc.HealthStub
    hmmd: Program


@pytest.fixture
async def raw(hmmd: Program) -> AsyncIterator[Stubs]:
    channel = insecure_channel(hmmd.address)
    yield Stubs(channel, process_pb2_grpc.ProcessStub(channel), device_pb2_grpc.DeviceStub(channel),
                health_pb2_grpc.HealthStub(channel), hmmd)
    await channel.close()


def check_status(e: grpc.aio.AioRpcError, err: str) -> None:
    """The status of a failed call: code from the errno, errno metadata, readable details."""
    value = getattr(errno, err)
    details = e.details() or ""
    assert e.code() == CODES.get(value, SC.FAILED_PRECONDITION), f"{e.code()} {details!r}, expected {err}"
    md = {k: v for k, v in (e.trailing_metadata() or ())}
    assert md.get(ERRNO_METADATA_KEY) == err, f"hmm-errno {md.get(ERRNO_METADATA_KEY)!r} ({details!r}), expected {err}"
    assert md.get(ERRNO_VALUE_METADATA_KEY) == str(value)
    # "EINVAL: what was wrong", one printable line, no traceback or exception repr.
    assert details.startswith(f"{err}: "), details
    assert len(details) > len(err) + 4 and len(details) < 400 and details.isprintable(), details
    assert "Traceback" not in details and "internal error" not in details, details
    assert to_kernel_error(e).errno == value  # and the SDK reads the same errno back


async def expect_error(call: Callable[..., Any], request: Any, err: str, *,
                       metadata: tuple[tuple[str, str], ...] = ()) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(request, metadata=metadata, timeout=TIMEOUT_S)
    check_status(info.value, err)


def pattern(nbytes: int, seed: int) -> bytes:
    return ((np.arange(nbytes, dtype=np.uint32) * 7 + seed * 131) % 251 + 1).astype(np.uint8).tobytes()


async def assert_serving(s: Stubs) -> None:
    """The daemon answers: health SERVING, and a fresh process can map, write and read."""
    r = await s.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    pid = (await s.proc.Spawn(pb.SpawnRequest(name="probe"), timeout=TIMEOUT_S)).pid
    addr = (await s.proc.Mmap(pb.MmapRequest(pid=pid, length=2 * P, prot=RW, flags=ANON, fd=-1),
                              timeout=TIMEOUT_S)).addr
    data = pattern(P + 100, pid)
    await s.proc.Write(pb.WriteRequest(pid=pid, addr=addr + 50, data=data), timeout=TIMEOUT_S)
    got = await s.proc.Read(pb.ReadRequest(pid=pid, addr=addr + 50, length=len(data)), timeout=TIMEOUT_S)
    assert got.data == data
    await s.proc.Exit(pb.ProcessRef(pid=pid), timeout=TIMEOUT_S)
    log = s.hmmd.log_text()
    assert "internal error" not in log and "Traceback" not in log, log


# ---- a process with a known layout ---------------------------------------------------------

BASE = 0x1000_0000
RW_ADDR = BASE                  # 4 pages, read-write, holding RW_DATA
RO_ADDR = BASE + 0x10_0000      # 2 pages, read-only (zero page mapped)
NONE_ADDR = BASE + 0x20_0000    # 1 page, PROT_NONE
FMAP_ADDR = BASE + 0x30_0000    # 4 pages MAP_SHARED|PROT_READ of a 2-page file (pages 2-3: SIGBUS)
HOLE = BASE + 0x100_0000        # nothing mapped here or above
FILE_BYTES = 2 * P


@dataclass
class World:
    pid: int
    path: str
    fd_rw: int
    fd_ro: int
    fd_wo: int
    exited: int  # a pid that existed and exited


async def _mmap(s: Stubs, pid: int, addr: int, length: int, prot: int, flags: int, fd: int = -1) -> None:
    r = await s.proc.Mmap(pb.MmapRequest(pid=pid, addr=addr, length=length, prot=prot, flags=flags | MAP_FIXED,
                                         fd=fd), timeout=TIMEOUT_S)
    assert r.addr == addr


async def make_world(s: Stubs) -> World:
    pid = (await s.proc.Spawn(pb.SpawnRequest(name="validation"))).pid
    await _mmap(s, pid, RW_ADDR, 4 * P, RW, ANON)
    await s.proc.Write(pb.WriteRequest(pid=pid, addr=RW_ADDR, data=pattern(4 * P, pid)))
    await _mmap(s, pid, RO_ADDR, 2 * P, PROT_READ, ANON)
    await s.proc.Read(pb.ReadRequest(pid=pid, addr=RO_ADDR, length=2 * P))
    await _mmap(s, pid, NONE_ADDR, P, PROT_NONE, ANON)
    path = f"/validation/{uuid.uuid4().hex}"
    fd_rw = (await s.proc.Open(pb.OpenRequest(pid=pid, path=path, flags=O_RDWR | O_CREAT))).fd
    await s.proc.Pwrite(pb.PwriteRequest(pid=pid, fd=fd_rw, offset=0, data=pattern(FILE_BYTES, pid + 1)))
    fd_ro = (await s.proc.Open(pb.OpenRequest(pid=pid, path=path, flags=O_RDONLY))).fd
    fd_wo = (await s.proc.Open(pb.OpenRequest(pid=pid, path=path, flags=O_WRONLY))).fd
    await _mmap(s, pid, FMAP_ADDR, 4 * P, PROT_READ, MAP_SHARED, fd_ro)
    await s.proc.Read(pb.ReadRequest(pid=pid, addr=FMAP_ADDR, length=FILE_BYTES))  # snapshots now change nothing
    exited = (await s.proc.Spawn(pb.SpawnRequest(name="gone"))).pid
    await s.proc.Exit(pb.ProcessRef(pid=exited))
    return World(pid, path, fd_rw, fd_ro, fd_wo, exited)


async def snapshot(s: Stubs, w: World) -> tuple[Any, ...]:
    """Everything a failed call must leave alone: layout and counters, memory, the file."""
    status = await s.proc.Status(pb.ProcessRef(pid=w.pid))
    mem = await s.proc.Read(pb.ReadRequest(pid=w.pid, addr=RW_ADDR, length=4 * P))
    ro = await s.proc.Read(pb.ReadRequest(pid=w.pid, addr=RO_ADDR, length=2 * P))
    fmap = await s.proc.Read(pb.ReadRequest(pid=w.pid, addr=FMAP_ADDR, length=FILE_BYTES))
    file = await s.proc.Pread(pb.PreadRequest(pid=w.pid, fd=w.fd_rw, offset=0, length=4 * P))
    assert mem.data == pattern(4 * P, w.pid) and file.data == pattern(FILE_BYTES, w.pid + 1)
    assert fmap.data == file.data and ro.data == bytes(2 * P)
    return status.SerializeToString(deterministic=True), mem.data, file.data


@pytest.fixture
async def world(raw: Stubs) -> AsyncIterator[World]:
    w = await make_world(raw)
    yield w
    await raw.proc.Exit(pb.ProcessRef(pid=w.pid))


# ---- Process: unknown pids -----------------------------------------------------------------

# One valid-looking request per RPC that names a process; only the pid is wrong.
PID_REQUESTS: dict[str, Callable[[int], Any]] = {
    "Fork": lambda pid: pb.ProcessRef(pid=pid),
    "Exit": lambda pid: pb.ProcessRef(pid=pid),
    "OomKill": lambda pid: pb.ProcessRef(pid=pid),
    "SetOomScoreAdj": lambda pid: pb.OomScoreAdjRequest(pid=pid, oom_score_adj=100),
    "Status": lambda pid: pb.ProcessRef(pid=pid),
    "Mmap": lambda pid: pb.MmapRequest(pid=pid, length=P, prot=RW, flags=ANON, fd=-1),
    "Munmap": lambda pid: pb.RangeRequest(pid=pid, addr=RW_ADDR, length=P),
    "Mprotect": lambda pid: pb.MprotectRequest(pid=pid, addr=RW_ADDR, length=P, prot=PROT_READ),
    "Madvise": lambda pid: pb.MadviseRequest(pid=pid, addr=RW_ADDR, length=P, advice=MADV_DONTNEED),
    "Mremap": lambda pid: pb.MremapRequest(pid=pid, old_addr=RW_ADDR, old_length=P, new_length=2 * P,
                                           flags=MREMAP_MAYMOVE),
    "ClearRefs": lambda pid: pb.ClearRefsRequest(pid=pid, value=4),
    "Read": lambda pid: pb.ReadRequest(pid=pid, addr=RW_ADDR, length=8),
    "Write": lambda pid: pb.WriteRequest(pid=pid, addr=RW_ADDR, data=b"x"),
    "Open": lambda pid: pb.OpenRequest(pid=pid, path="/validation/x", flags=O_RDWR | O_CREAT),
    "Close": lambda pid: pb.FdRequest(pid=pid, fd=3),
    "Pread": lambda pid: pb.PreadRequest(pid=pid, fd=3, offset=0, length=8),
    "Pwrite": lambda pid: pb.PwriteRequest(pid=pid, fd=3, offset=0, data=b"x"),
    "Ftruncate": lambda pid: pb.FtruncateRequest(pid=pid, fd=3, length=0),
}


@pytest.mark.parametrize("which", ["zero", "unknown", "max", "exited"])
@pytest.mark.parametrize("rpc", sorted(PID_REQUESTS))
async def test_unknown_pid_is_esrch(raw: Stubs, world: World, rpc: str, which: str) -> None:
    pid = {"zero": 0, "unknown": 0x7FFF_FFFF, "max": U32_MAX, "exited": world.exited}[which]
    before = await snapshot(raw, world)
    await expect_error(getattr(raw.proc, rpc), PID_REQUESTS[rpc](pid), "ESRCH")
    assert await snapshot(raw, world) == before
    await assert_serving(raw)


# ---- Process: bad arguments ----------------------------------------------------------------

Builder = Callable[[World], Any]


def case(rpc: str, build: Builder, err: str, id: str) -> Any:
    return pytest.param(rpc, build, err, id=f"{rpc}-{id}")


BAD_PROCESS_CALLS = [
    # mmap(2)
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, length=0, prot=RW, flags=ANON, fd=-1), "EINVAL", "zero-length"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, length=ULONG_MAX, prot=RW, flags=ANON, fd=-1), "ENOMEM",
         "length-wraps"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, length=TASK_SIZE + P, prot=RW, flags=ANON, fd=-1), "ENOMEM",
         "length-beyond-task-size"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, length=P, prot=0x10, flags=ANON, fd=-1), "EINVAL",
         "unknown-prot-bit"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, length=P, prot=U32_MAX, flags=ANON, fd=-1), "EINVAL",
         "all-prot-bits"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, length=P, prot=RW, flags=MAP_ANONYMOUS, fd=-1), "EINVAL",
         "neither-shared-nor-private"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, length=P, prot=RW, flags=MAP_ANONYMOUS | 0xF, fd=-1),
         "EINVAL", "bad-map-type"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, length=P, prot=RW, flags=MAP_ANONYMOUS | 0x3, fd=-1), "EINVAL",
         "shared-validate-anonymous"),  # (an unknown bit is ignored, as by Linux)
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, length=P, prot=PROT_READ, flags=MAP_SHARED, fd=w.fd_rw,
                                          offset=100), "EINVAL", "unaligned-offset"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, length=P, prot=PROT_READ, flags=MAP_SHARED, fd=w.fd_rw,
                                          offset=ULONG_MAX - P + 1), "EOVERFLOW", "offset-overflows"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, addr=HOLE + 1, length=P, prot=RW, flags=ANON | MAP_FIXED,
                                          fd=-1), "EINVAL", "fixed-unaligned"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, addr=TASK_SIZE - P, length=2 * P, prot=RW,
                                          flags=ANON | MAP_FIXED, fd=-1), "ENOMEM", "fixed-beyond-task-size"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, addr=P, length=P, prot=RW, flags=ANON | MAP_FIXED, fd=-1),
         "EPERM", "fixed-below-mmap-min-addr"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, addr=RW_ADDR, length=P, prot=RW,
                                          flags=ANON | MAP_FIXED_NOREPLACE, fd=-1), "EEXIST", "noreplace-over-mapping"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, addr=RW_ADDR - P, length=2 * P, prot=RW,
                                          flags=ANON | MAP_FIXED_NOREPLACE, fd=-1), "EEXIST", "noreplace-overlap"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, length=P, prot=PROT_READ, flags=MAP_SHARED, fd=99), "EBADF",
         "fd-not-open"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, length=P, prot=PROT_READ, flags=MAP_PRIVATE, fd=-1), "EBADF",
         "fd-minus-one-without-anonymous"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, length=P, prot=PROT_READ, flags=MAP_SHARED, fd=w.fd_wo),
         "EACCES", "write-only-fd"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, length=P, prot=RW, flags=MAP_SHARED, fd=w.fd_ro), "EACCES",
         "shared-writable-of-read-only-fd"),
    case("Mmap", lambda w: pb.MmapRequest(pid=w.pid, length=1 << 40, prot=RW, flags=ANON | MAP_HUGETLB, fd=-1),
         "ENOMEM", "hugetlb-beyond-the-pool"),
    # munmap(2)
    case("Munmap", lambda w: pb.RangeRequest(pid=w.pid, addr=RW_ADDR + 1, length=P), "EINVAL", "unaligned"),
    case("Munmap", lambda w: pb.RangeRequest(pid=w.pid, addr=RW_ADDR, length=0), "EINVAL", "zero-length"),
    case("Munmap", lambda w: pb.RangeRequest(pid=w.pid, addr=RW_ADDR, length=ULONG_MAX), "EINVAL", "length-wraps"),
    case("Munmap", lambda w: pb.RangeRequest(pid=w.pid, addr=RW_ADDR, length=TASK_SIZE), "EINVAL",
         "beyond-task-size"),
    case("Munmap", lambda w: pb.RangeRequest(pid=w.pid, addr=TASK_SIZE, length=P), "EINVAL", "at-task-size"),
    case("Munmap", lambda w: pb.RangeRequest(pid=w.pid, addr=ULONG_MAX - P + 1, length=P), "EINVAL",
         "top-of-u64"),
    # mprotect(2)
    case("Mprotect", lambda w: pb.MprotectRequest(pid=w.pid, addr=RW_ADDR + 8, length=P, prot=PROT_READ), "EINVAL",
         "unaligned"),
    case("Mprotect", lambda w: pb.MprotectRequest(pid=w.pid, addr=RW_ADDR, length=P, prot=0x10), "EINVAL",
         "unknown-prot-bit"),
    case("Mprotect", lambda w: pb.MprotectRequest(pid=w.pid, addr=RW_ADDR, length=ULONG_MAX, prot=PROT_READ),
         "ENOMEM", "length-wraps"),
    case("Mprotect", lambda w: pb.MprotectRequest(pid=w.pid, addr=RW_ADDR, length=TASK_SIZE, prot=PROT_READ),
         "ENOMEM", "beyond-task-size"),
    case("Mprotect", lambda w: pb.MprotectRequest(pid=w.pid, addr=TASK_SIZE, length=P, prot=PROT_READ), "ENOMEM",
         "at-task-size"),
    case("Mprotect", lambda w: pb.MprotectRequest(pid=w.pid, addr=HOLE, length=P, prot=PROT_READ), "ENOMEM",
         "unmapped"),
    # (A range that runs from mappings into a hole changes the mappings first, as Linux:
    # tests/core/test_validation.py. One that starts in a hole changes nothing.)
    case("Mprotect", lambda w: pb.MprotectRequest(pid=w.pid, addr=RW_ADDR - 4 * P, length=8 * P, prot=PROT_READ),
         "ENOMEM", "starts-unmapped"),
    case("Mprotect", lambda w: pb.MprotectRequest(pid=w.pid, addr=FMAP_ADDR, length=P, prot=RW), "EACCES",
         "write-on-read-only-shared-file"),
    # madvise(2)
    case("Madvise", lambda w: pb.MadviseRequest(pid=w.pid, addr=RW_ADDR + 1, length=P, advice=MADV_DONTNEED),
         "EINVAL", "unaligned"),
    case("Madvise", lambda w: pb.MadviseRequest(pid=w.pid, addr=RW_ADDR, length=P, advice=1000), "EINVAL",
         "unknown-advice"),
    case("Madvise", lambda w: pb.MadviseRequest(pid=w.pid, addr=RW_ADDR, length=P, advice=U32_MAX), "EINVAL",
         "all-advice-bits"),
    case("Madvise", lambda w: pb.MadviseRequest(pid=w.pid, addr=RW_ADDR, length=ULONG_MAX, advice=MADV_DONTNEED),
         "EINVAL", "length-rounds-to-zero"),
    case("Madvise", lambda w: pb.MadviseRequest(pid=w.pid, addr=RW_ADDR, length=ULONG_MAX - RW_ADDR,
                                                advice=MADV_DONTNEED), "EINVAL", "range-wraps"),
    case("Madvise", lambda w: pb.MadviseRequest(pid=w.pid, addr=HOLE, length=TASK_SIZE, advice=MADV_DONTNEED),
         "ENOMEM", "beyond-task-size"),
    case("Madvise", lambda w: pb.MadviseRequest(pid=w.pid, addr=HOLE, length=P, advice=MADV_HUGEPAGE), "ENOMEM",
         "unmapped"),
    case("Madvise", lambda w: pb.MadviseRequest(pid=w.pid, addr=FMAP_ADDR, length=P, advice=MADV_FREE), "EINVAL",
         "free-on-file-mapping"),
    # mremap(2)
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=RW_ADDR, old_length=P, new_length=P, flags=8),
         "EINVAL", "unknown-flag"),
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=RW_ADDR + 1, old_length=P, new_length=2 * P,
                                              flags=MREMAP_MAYMOVE), "EINVAL", "unaligned-old"),
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=RW_ADDR, old_length=P, new_length=P,
                                              flags=MREMAP_FIXED, new_addr=HOLE), "EINVAL", "fixed-without-maymove"),
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=RW_ADDR, old_length=P, new_length=P,
                                              flags=MREMAP_DONTUNMAP), "EINVAL", "dontunmap-without-maymove"),
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=RW_ADDR, old_length=P, new_length=2 * P,
                                              flags=MREMAP_MAYMOVE | MREMAP_DONTUNMAP), "EINVAL",
         "dontunmap-resize"),
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=RW_ADDR, old_length=P, new_length=0,
                                              flags=MREMAP_MAYMOVE), "EINVAL", "zero-new-length"),
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=RW_ADDR, old_length=P, new_length=ULONG_MAX,
                                              flags=MREMAP_MAYMOVE), "EINVAL", "new-length-wraps"),
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=RW_ADDR, old_length=P, new_length=P,
                                              flags=MREMAP_MAYMOVE | MREMAP_FIXED, new_addr=HOLE + 1), "EINVAL",
         "fixed-unaligned-new"),
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=RW_ADDR, old_length=2 * P, new_length=2 * P,
                                              flags=MREMAP_MAYMOVE | MREMAP_FIXED, new_addr=RW_ADDR + P), "EINVAL",
         "fixed-overlapping"),
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=RW_ADDR, old_length=P, new_length=2 * P,
                                              flags=MREMAP_MAYMOVE | MREMAP_FIXED, new_addr=TASK_SIZE - P),
         "EINVAL", "fixed-beyond-task-size"),
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=RW_ADDR, old_length=0, new_length=P,
                                              flags=MREMAP_MAYMOVE), "EINVAL", "duplicate-private-mapping"),
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=HOLE, old_length=P, new_length=2 * P,
                                              flags=MREMAP_MAYMOVE), "EFAULT", "old-unmapped"),
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=TASK_SIZE, old_length=P, new_length=2 * P,
                                              flags=MREMAP_MAYMOVE), "EFAULT", "old-at-task-size"),
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=RW_ADDR, old_length=8 * P, new_length=16 * P,
                                              flags=MREMAP_MAYMOVE), "EFAULT", "old-spans-mappings"),
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=RW_ADDR, old_length=4 * P, new_length=512 * P),
         "ENOMEM", "grow-blocked-without-maymove"),
    case("Mremap", lambda w: pb.MremapRequest(pid=w.pid, old_addr=RW_ADDR, old_length=4 * P,
                                              new_length=TASK_SIZE + P, flags=MREMAP_MAYMOVE), "ENOMEM",
         "grow-beyond-task-size"),
    # /proc/pid/clear_refs
    case("ClearRefs", lambda w: pb.ClearRefsRequest(pid=w.pid, value=0), "EINVAL", "zero"),
    case("ClearRefs", lambda w: pb.ClearRefsRequest(pid=w.pid, value=6), "EINVAL", "six"),
    case("ClearRefs", lambda w: pb.ClearRefsRequest(pid=w.pid, value=U32_MAX), "EINVAL", "u32-max"),
    # CPU loads
    case("Read", lambda w: pb.ReadRequest(pid=w.pid, addr=HOLE, length=8), "EFAULT", "unmapped"),
    case("Read", lambda w: pb.ReadRequest(pid=w.pid, addr=RW_ADDR + 4 * P - 4, length=8), "EFAULT",
         "runs-off-the-end"),
    case("Read", lambda w: pb.ReadRequest(pid=w.pid, addr=NONE_ADDR + 5, length=1), "EFAULT", "prot-none"),
    case("Read", lambda w: pb.ReadRequest(pid=w.pid, addr=FMAP_ADDR + FILE_BYTES, length=1), "EFAULT",
         "beyond-end-of-file-sigbus"),
    case("Read", lambda w: pb.ReadRequest(pid=w.pid, addr=TASK_SIZE - 1, length=2), "EFAULT", "crosses-task-size"),
    case("Read", lambda w: pb.ReadRequest(pid=w.pid, addr=ULONG_MAX, length=1), "EFAULT", "top-of-u64"),
    case("Read", lambda w: pb.ReadRequest(pid=w.pid, addr=RW_ADDR, length=ULONG_MAX), "EINVAL",
         "length-u64-max"),
    case("Read", lambda w: pb.ReadRequest(pid=w.pid, addr=RW_ADDR, length=DEFAULT_MAX_MESSAGE_BYTES), "EINVAL",
         "reply-beyond-message-limit"),
    # CPU stores: nothing is written when any byte faults
    case("Write", lambda w: pb.WriteRequest(pid=w.pid, addr=HOLE, data=b"x" * 8), "EFAULT", "unmapped"),
    case("Write", lambda w: pb.WriteRequest(pid=w.pid, addr=RW_ADDR + 4 * P - 4, data=b"x" * 8), "EFAULT",
         "runs-off-the-end"),
    case("Write", lambda w: pb.WriteRequest(pid=w.pid, addr=RO_ADDR, data=b"x"), "EFAULT", "read-only"),
    case("Write", lambda w: pb.WriteRequest(pid=w.pid, addr=RW_ADDR + 4 * P - 1, data=b"xx"), "EFAULT",
         "into-the-gap-after-rw"),
    case("Write", lambda w: pb.WriteRequest(pid=w.pid, addr=NONE_ADDR, data=b"x"), "EFAULT", "prot-none"),
    case("Write", lambda w: pb.WriteRequest(pid=w.pid, addr=FMAP_ADDR, data=b"x"), "EFAULT",
         "read-only-shared-file"),
    case("Write", lambda w: pb.WriteRequest(pid=w.pid, addr=ULONG_MAX, data=b"xy"), "EFAULT", "top-of-u64"),
    # open(2)
    case("Open", lambda w: pb.OpenRequest(pid=w.pid, path="relative/path", flags=O_RDWR | O_CREAT), "EINVAL",
         "relative-path"),
    case("Open", lambda w: pb.OpenRequest(pid=w.pid, path="", flags=O_RDWR | O_CREAT), "ENOENT", "empty-path"),
    case("Open", lambda w: pb.OpenRequest(pid=w.pid, path="/" + "n" * 5000, flags=O_RDWR | O_CREAT),
         "ENAMETOOLONG", "path-too-long"),
    case("Open", lambda w: pb.OpenRequest(pid=w.pid, path=w.path + ".missing", flags=O_RDWR), "ENOENT",
         "missing-without-creat"),
    case("Open", lambda w: pb.OpenRequest(pid=w.pid, path="/dev/no-such-device", flags=O_RDWR), "ENOENT",
         "unknown-device"),
    case("Open", lambda w: pb.OpenRequest(pid=w.pid, path="/dev/", flags=O_RDWR), "ENOENT", "empty-device-name"),
    case("Open", lambda w: pb.OpenRequest(pid=w.pid, path="/validation/tmp", flags=O_TMPFILE | O_RDONLY), "EINVAL",
         "tmpfile-read-only"),
    # file descriptors
    case("Close", lambda w: pb.FdRequest(pid=w.pid, fd=99), "EBADF", "not-open"),
    case("Close", lambda w: pb.FdRequest(pid=w.pid, fd=-1), "EBADF", "negative"),
    case("Close", lambda w: pb.FdRequest(pid=w.pid, fd=0), "EBADF", "no-stdin"),
    case("Pread", lambda w: pb.PreadRequest(pid=w.pid, fd=99, offset=0, length=8), "EBADF", "not-open"),
    case("Pread", lambda w: pb.PreadRequest(pid=w.pid, fd=w.fd_wo, offset=0, length=8), "EBADF", "write-only"),
    case("Pread", lambda w: pb.PreadRequest(pid=w.pid, fd=w.fd_rw, offset=1 << 63, length=8), "EINVAL",
         "negative-offset"),
    case("Pread", lambda w: pb.PreadRequest(pid=w.pid, fd=w.fd_rw, offset=0, length=1 << 63), "EINVAL",
         "negative-count"),
    case("Pread", lambda w: pb.PreadRequest(pid=w.pid, fd=w.fd_rw, offset=(1 << 62), length=1 << 62), "EINVAL",
         "offset-plus-count-overflows"),
    case("Pwrite", lambda w: pb.PwriteRequest(pid=w.pid, fd=99, offset=0, data=b"x"), "EBADF", "not-open"),
    case("Pwrite", lambda w: pb.PwriteRequest(pid=w.pid, fd=w.fd_ro, offset=0, data=b"x"), "EBADF", "read-only"),
    case("Pwrite", lambda w: pb.PwriteRequest(pid=w.pid, fd=w.fd_rw, offset=1 << 63, data=b"x"), "EINVAL",
         "negative-offset"),
    case("Pwrite", lambda w: pb.PwriteRequest(pid=w.pid, fd=w.fd_rw, offset=1 << 40, data=b"x"), "EFBIG",
         "beyond-max-file-size"),
    case("Ftruncate", lambda w: pb.FtruncateRequest(pid=w.pid, fd=99, length=0), "EBADF", "not-open"),
    case("Ftruncate", lambda w: pb.FtruncateRequest(pid=w.pid, fd=w.fd_ro, length=0), "EINVAL", "read-only"),
    case("Ftruncate", lambda w: pb.FtruncateRequest(pid=w.pid, fd=w.fd_rw, length=1 << 63), "EINVAL",
         "negative-length"),
    case("Ftruncate", lambda w: pb.FtruncateRequest(pid=w.pid, fd=w.fd_rw, length=1 << 41), "EFBIG",
         "beyond-max-file-size"),
    # /proc/<pid>/oom_score_adj
    case("SetOomScoreAdj", lambda w: pb.OomScoreAdjRequest(pid=w.pid, oom_score_adj=1001), "EINVAL", "above-1000"),
    case("SetOomScoreAdj", lambda w: pb.OomScoreAdjRequest(pid=w.pid, oom_score_adj=-1001), "EINVAL",
         "below-minus-1000"),
    case("SetOomScoreAdj", lambda w: pb.OomScoreAdjRequest(pid=w.pid, oom_score_adj=-(1 << 31)), "EINVAL",
         "int32-min"),
]


@pytest.mark.parametrize("rpc, build, err", BAD_PROCESS_CALLS)
async def test_bad_process_call(raw: Stubs, world: World, rpc: str, build: Builder, err: str) -> None:
    before = await snapshot(raw, world)
    await expect_error(getattr(raw.proc, rpc), build(world), err)
    assert await snapshot(raw, world) == before
    await assert_serving(raw)


# What Linux accepts (returns 0 and changes nothing) must not fail either.
ACCEPTED_PROCESS_CALLS = [
    case("Mprotect", lambda w: pb.MprotectRequest(pid=w.pid, addr=RW_ADDR, length=0, prot=PROT_READ), "",
         "zero-length"),
    case("Mprotect", lambda w: pb.MprotectRequest(pid=w.pid, addr=HOLE, length=0, prot=PROT_READ), "",
         "zero-length-unmapped"),
    case("Madvise", lambda w: pb.MadviseRequest(pid=w.pid, addr=RW_ADDR, length=0, advice=MADV_DONTNEED), "",
         "zero-length"),
    case("Madvise", lambda w: pb.MadviseRequest(pid=w.pid, addr=HOLE, length=0, advice=MADV_DONTNEED), "",
         "zero-length-unmapped"),
    case("Munmap", lambda w: pb.RangeRequest(pid=w.pid, addr=HOLE, length=16 * P), "", "nothing-mapped"),
    case("Read", lambda w: pb.ReadRequest(pid=w.pid, addr=HOLE, length=0), b"", "zero-length-unmapped"),
    case("Write", lambda w: pb.WriteRequest(pid=w.pid, addr=HOLE, data=b""), "", "empty-unmapped"),
    case("Pread", lambda w: pb.PreadRequest(pid=w.pid, fd=w.fd_rw, offset=1 << 50, length=8), b"",
         "beyond-end-of-file"),
    case("Pread", lambda w: pb.PreadRequest(pid=w.pid, fd=w.fd_rw, offset=P, length=1 << 62),
         lambda w: pattern(FILE_BYTES, w.pid + 1)[P:], "huge-count-is-a-short-read"),
]


@pytest.mark.parametrize("rpc, build, expect", ACCEPTED_PROCESS_CALLS)
async def test_accepted_as_in_linux(raw: Stubs, world: World, rpc: str, build: Builder, expect: Any) -> None:
    before = await snapshot(raw, world)
    reply = await getattr(raw.proc, rpc)(build(world), timeout=TIMEOUT_S)
    if callable(expect):
        expect = expect(world)
    if isinstance(expect, bytes):
        assert reply.data == expect
    assert await snapshot(raw, world) == before
    await assert_serving(raw)


async def test_spawn_accepts_any_name_and_truncates_it(raw: Stubs) -> None:
    pid = (await raw.proc.Spawn(pb.SpawnRequest(name="n" * 10_000), timeout=TIMEOUT_S)).pid
    status = await raw.proc.Status(pb.ProcessRef(pid=pid))
    assert status.name == "n" * 64 and status.alive and not status.maps
    await raw.proc.Exit(pb.ProcessRef(pid=pid))
    await expect_error(raw.proc.Exit, pb.ProcessRef(pid=pid), "ESRCH")  # exit twice
    await expect_error(raw.proc.Status, pb.ProcessRef(pid=pid), "ESRCH")
    await assert_serving(raw)


async def test_request_beyond_the_message_limit_is_refused_by_grpc(hmmd: Program, raw: Stubs,
                                                                   world: World) -> None:
    """The transport refuses it before the daemon sees it: RESOURCE_EXHAUSTED, no errno
    metadata, which the SDK reads as EMSGSIZE."""
    before = await snapshot(raw, world)
    big = insecure_channel(hmmd.address, max_message_bytes=2 * DEFAULT_MAX_MESSAGE_BYTES)
    try:
        stub = process_pb2_grpc.ProcessStub(big)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Write(pb.WriteRequest(pid=world.pid, addr=RW_ADDR, data=bytes(DEFAULT_MAX_MESSAGE_BYTES)),
                             timeout=TIMEOUT_S)
    finally:
        await big.close()
    e = info.value
    assert e.code() == SC.RESOURCE_EXHAUSTED, e
    assert "larger than max" in (e.details() or "")
    assert to_kernel_error(e).errno == errno.EMSGSIZE
    assert await snapshot(raw, world) == before
    await assert_serving(raw)


def _as_bytes(b: bytes) -> bytes:
    return b


GARBAGE = b"\xff\xff\xff\xff\x07"  # a varint key that runs out
# A DmaWrite whose data length runs past the end (the bulk parser's path).
DMA_WRITE_TRUNCATED = dpb.DmaWriteRequest(pfns=bytes(8)).SerializeToString() + b"\x12\xff\xff\x03xx"


@pytest.mark.parametrize("method, request_bytes", [
    pytest.param("/hmm.v1.Process/Mmap", GARBAGE, id="process"),
    pytest.param("/hmm.v1.Device/InsertNotifier", GARBAGE, id="device"),
    pytest.param("/hmm.v1.Device/DmaWrite", GARBAGE, id="device-bulk"),
    pytest.param("/hmm.v1.Device/DmaWrite", DMA_WRITE_TRUNCATED, id="device-bulk-truncated"),
    pytest.param("/hmm.v1.Device/MigratePages", GARBAGE, id="device-bulk-migrate"),
    pytest.param("/hmm.v1.Device/DmaReadStream", GARBAGE, id="device-bulk-stream"),
    pytest.param("/hmm.v1.Admin/Stats", GARBAGE, id="admin"),
    pytest.param("/hmm.v1.Admin/TraceStream", GARBAGE, id="admin-stream"),
])
async def test_request_that_does_not_parse_is_einval(raw: Stubs, world: World, method: str,
                                                     request_bytes: bytes) -> None:
    """Refused before any servicer sees it, with no traceback logged (assert_serving)."""
    before = await snapshot(raw, world)
    make = raw.channel.unary_stream if method.endswith("Stream") else raw.channel.unary_unary
    call = make(method, request_serializer=_as_bytes, response_deserializer=_as_bytes)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        reply = call(request_bytes, timeout=TIMEOUT_S)
        if method.endswith("Stream"):
            await reply.read()
        await reply
    check_status(info.value, "EINVAL")
    assert await snapshot(raw, world) == before
    await assert_serving(raw)


async def test_dmirror_command_that_does_not_parse_is_einval(dmirror_factory) -> None:  # type: ignore[no-untyped-def]
    """The reference device's own command service refuses it the same way: EINVAL, no
    traceback in its log, still serving."""
    prog, _ = dmirror_factory(1)
    channel = insecure_channel(prog.address)
    try:
        call = channel.unary_unary("/hmm.v1.Dmirror/Command", request_serializer=_as_bytes,
                                   response_deserializer=_as_bytes)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(GARBAGE, timeout=TIMEOUT_S)
        check_status(info.value, "EINVAL")
        r = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                             timeout=TIMEOUT_S)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        assert "Traceback" not in prog.log_text()
    finally:
        await channel.close()


# ---- Device: sessions ----------------------------------------------------------------------

DEVICE_CALLS: dict[str, Any] = {
    "InsertNotifier": dpb.InsertNotifierRequest(pid=1, start=0, length=P),
    "RemoveNotifier": dpb.NotifierRef(notifier_id=1),
    "ReadBegin": dpb.NotifierRef(notifier_id=1),
    "RangeFault": dpb.RangeFaultRequest(notifier_id=1, start=0, end=P),
    "Snapshot": dpb.RangeFaultRequest(notifier_id=1, start=0, end=P),
    "DmaRead": dpb.DmaReadRequest(pfns=np.zeros(1, "<u8").tobytes()),
    "DmaWrite": dpb.DmaWriteRequest(pfns=np.zeros(1, "<u8").tobytes(), data=bytes(P)),
}


def device_name() -> str:
    return f"val{next(_ids)}_{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("session", ["missing", "empty", "unknown", "closed"])
@pytest.mark.parametrize("rpc", sorted(DEVICE_CALLS))
async def test_device_call_without_a_live_session_is_enodev(raw: Stubs, rpc: str, session: str) -> None:
    metadata: tuple[tuple[str, str], ...] = ()
    if session == "empty":
        metadata = ((SESSION_METADATA_KEY, ""),)
    elif session == "unknown":
        metadata = ((SESSION_METADATA_KEY, "0" * 32),)
    elif session == "closed":
        conn = await DeviceConnection.connect(raw.hmmd.address, device_name(), Driver())
        metadata = conn._metadata
        await conn.close()
    await expect_error(getattr(raw.dev, rpc), DEVICE_CALLS[rpc], "ENODEV", metadata=metadata)
    await assert_serving(raw)


# ---- Device: the Connect stream ------------------------------------------------------------


async def connect_raw(s: Stubs, *messages: dpb.DeviceMessage, half_close: bool = False) -> grpc.aio.AioRpcError:
    """Drive a Connect stream by hand; returns the error status it ends with."""
    call = s.dev.Connect(timeout=TIMEOUT_S)
    try:
        for m in messages:
            await call.write(m)
        if half_close:
            await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            msg = await call.read()
            assert msg is grpc.aio.EOF, f"expected the stream to fail, got {msg}"
            await call
        return info.value
    finally:
        call.cancel()


def hello(name: str, major: int = PROTOCOL_VERSION[0], max_message_bytes: int = 0) -> dpb.DeviceMessage:
    return dpb.DeviceMessage(hello=dpb.Hello(version_major=major, version_minor=PROTOCOL_VERSION[1], name=name,
                                             capabilities=["dma"], max_message_bytes=max_message_bytes))


CONNECT_CASES = [
    pytest.param(lambda n: [dpb.DeviceMessage(ack=dpb.Ack(id=1, ok=True))], False, "EINVAL", id="ack-first"),
    pytest.param(lambda n: [dpb.DeviceMessage()], False, "EINVAL", id="empty-message-first"),
    pytest.param(lambda n: [], True, "EINVAL", id="half-closed-before-hello"),
    pytest.param(lambda n: [hello(n, 2)], False, "EPROTONOSUPPORT", id="version-2"),
    pytest.param(lambda n: [hello(n, 0)], False, "EPROTONOSUPPORT", id="version-0"),
    pytest.param(lambda n: [hello("")], False, "EINVAL", id="empty-name"),
    pytest.param(lambda n: [hello("d" * 65)], False, "EINVAL", id="name-too-long"),
    pytest.param(lambda n: [hello("a/b")], False, "EINVAL", id="name-with-slash"),
    # It lands in log lines, /dev paths and metrics labels.
    pytest.param(lambda n: [hello(n + "\x00\n1")], False, "EINVAL", id="name-with-nul-and-newline"),
    pytest.param(lambda n: [hello(n + "\n")], False, "EINVAL", id="name-ending-in-newline"),
    pytest.param(lambda n: [hello(n + "\x1b[31m")], False, "EINVAL", id="name-with-escape"),
    pytest.param(lambda n: [hello(n + " x")], False, "EINVAL", id="name-with-space"),
    pytest.param(lambda n: [hello(n + "\u00e9")], False, "EINVAL", id="name-not-ascii"),
    # No page of contents would fit (the Welcome itself might not).
    pytest.param(lambda n: [hello(n, max_message_bytes=MIN_MESSAGE_BYTES - 1)], False, "EINVAL",
                 id="message-limit-below-the-minimum"),
]


def _bad_utf8_name(name: str) -> bytes:
    return hello(name).SerializeToString().replace(name.encode(), b"\xff" * len(name))


async def _ended_by(call: Any, message: bytes) -> grpc.aio.AioRpcError:
    """Write ``message`` on a Connect stream: the status the stream then ends with."""
    try:
        await call.write(message)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            assert await call.read() is grpc.aio.EOF
            await call
    finally:
        call.cancel()
    return info.value


@pytest.mark.parametrize("first", [
    pytest.param(lambda n: GARBAGE, id="garbage"),
    pytest.param(lambda n: hello(n).SerializeToString()[:-3], id="truncated-hello"),
    pytest.param(_bad_utf8_name, id="hello-name-not-utf8"),
])
async def test_connect_whose_first_message_does_not_parse_is_einval(raw: Stubs, first: Callable[[str], bytes]) -> None:
    name = device_name()
    call = raw.channel.stream_stream("/hmm.v1.Device/Connect", request_serializer=_as_bytes,
                                     response_deserializer=_as_bytes)(timeout=TIMEOUT_S)
    check_status(await _ended_by(call, first(name)), "EINVAL")
    conn = await DeviceConnection.connect(raw.hmmd.address, name, Driver())  # nothing registered
    await conn.close()
    await assert_serving(raw)


async def test_connect_message_that_does_not_parse_after_the_hello_fences(raw: Stubs) -> None:
    """Garbage from a connected device breaks its stream (ECONNRESET), as a broken
    connection would, and says why; no traceback logged."""
    name = device_name()
    call = raw.channel.stream_stream("/hmm.v1.Device/Connect", request_serializer=_as_bytes,
                                     response_deserializer=dpb.KernelMessage.FromString)(timeout=TIMEOUT_S)
    await call.write(hello(name).SerializeToString())
    assert (await call.read()).HasField("welcome")
    check_status(await _ended_by(call, GARBAGE), "ECONNRESET")
    dev = (await AdminClient(raw.channel).stats()).device(name)
    assert not dev.alive and "does not parse" in dev.fenced_reason, dev
    await assert_serving(raw)


class RefusingDriver(Driver):
    def __init__(self, err: int) -> None:
        self.err = err

    async def file_open(self, file: DeviceFile) -> None:
        raise KernelError(self.err)


@pytest.mark.parametrize("refusal, err", [
    (errno.EPERM, "EPERM"),
    (-errno.EIO, "EIO"),  # a C driver's habit
    (99999, "EIO"),
    ((1 << 31) - 1, "EIO"),
    (-(1 << 31), "EIO"),
])
async def test_open_refused_by_the_device_fails_with_its_errno_or_eio(raw: Stubs, refusal: int, err: str) -> None:
    """A device's FileOpen ack that is not an errno reaches the opener as EIO (and
    the daemon logs which device sent it)."""
    name = device_name()
    conn = await DeviceConnection.connect(raw.hmmd.address, name, RefusingDriver(refusal))
    try:
        pid = (await raw.proc.Spawn(pb.SpawnRequest(name="opener"), timeout=TIMEOUT_S)).pid
        await expect_error(raw.proc.Open, pb.OpenRequest(pid=pid, path=f"/dev/{name}", flags=O_RDWR), err)
        await raw.proc.Exit(pb.ProcessRef(pid=pid), timeout=TIMEOUT_S)
    finally:
        await conn.close()
    if err == "EIO":
        assert f"device {name} refused an open with {refusal}, which is not an errno" in raw.hmmd.log_text()
    await assert_serving(raw)


@pytest.mark.parametrize("messages, half_close, err", CONNECT_CASES)
async def test_bad_connect(raw: Stubs, messages: Callable[[str], list[Any]], half_close: bool, err: str) -> None:
    name = device_name()
    check_status(await connect_raw(raw, *messages(name), half_close=half_close), err)
    # Nothing was registered: the name is free and a good Hello gets its Welcome.
    conn = await DeviceConnection.connect(raw.hmmd.address, name, Driver())
    try:
        assert conn.device_id > 0 and conn.max_pages > 0
    finally:
        await conn.close()
    await assert_serving(raw)


async def test_connect_with_a_taken_name_is_eexist(raw: Stubs) -> None:
    name = device_name()
    conn = await DeviceConnection.connect(raw.hmmd.address, name, Driver())
    try:
        check_status(await connect_raw(raw, hello(name)), "EEXIST")
        # The first device is untouched by the failed attempt.
        pid = (await raw.proc.Spawn(pb.SpawnRequest(name="opener"))).pid
        await raw.proc.Open(pb.OpenRequest(pid=pid, path=f"/dev/{name}", flags=O_RDWR), timeout=TIMEOUT_S)
        await conn.insert_notifier(pid, 0, P)
        await raw.proc.Exit(pb.ProcessRef(pid=pid))
    finally:
        await conn.close()
    await assert_serving(raw)


# ---- Device: bad arguments with a live session ---------------------------------------------

DEV_BASE = 0x2000_0000
DEV_RW = 16    # pages [0, 16): read-write, written
DEV_RO = 8     # pages [16, 24): read-only
DEV_HOLE = 8   # pages [24, 32): nothing mapped
DEV_PAGES = DEV_RW + DEV_RO + DEV_HOLE


@dataclass
class Rig:
    conn: DeviceConnection
    name: str
    pid: int        # opened the device; notifier over [DEV_BASE, DEV_BASE + DEV_PAGES pages)
    stranger: int   # did not open it
    dev_fd: int
    notifier: int
    md: tuple[tuple[str, str], ...]


@pytest.fixture
async def rig(raw: Stubs) -> AsyncIterator[Rig]:
    name = device_name()
    conn = await DeviceConnection.connect(raw.hmmd.address, name, Driver())
    pid = (await raw.proc.Spawn(pb.SpawnRequest(name="mirrored"))).pid
    stranger = (await raw.proc.Spawn(pb.SpawnRequest(name="stranger"))).pid
    await _mmap(raw, pid, DEV_BASE, DEV_RW * P, RW, ANON)
    await raw.proc.Write(pb.WriteRequest(pid=pid, addr=DEV_BASE, data=pattern(DEV_RW * P, pid)))
    await _mmap(raw, pid, DEV_BASE + DEV_RW * P, DEV_RO * P, PROT_READ, ANON)
    dev_fd = (await raw.proc.Open(pb.OpenRequest(pid=pid, path=f"/dev/{name}", flags=O_RDWR))).fd
    mirror = await conn.insert_notifier(pid, DEV_BASE, DEV_PAGES * P)
    r = Rig(conn, name, pid, stranger, dev_fd, mirror.notifier_id, conn._metadata)
    yield r
    for p in (pid, stranger):
        await raw.proc.Exit(pb.ProcessRef(pid=p))
    await conn.close()


async def rig_snapshot(s: Stubs, r: Rig) -> tuple[Any, ...]:
    status = await s.proc.Status(pb.ProcessRef(pid=r.pid))
    mem = await s.proc.Read(pb.ReadRequest(pid=r.pid, addr=DEV_BASE, length=DEV_RW * P))
    assert mem.data == pattern(DEV_RW * P, r.pid)
    # The notifier is still there and usable, and the device was not fenced.
    seq = await s.dev.ReadBegin(dpb.NotifierRef(notifier_id=r.notifier), metadata=r.md, timeout=TIMEOUT_S)
    snap = await s.dev.Snapshot(dpb.RangeFaultRequest(notifier_id=r.notifier, notifier_seq=seq.seq, start=DEV_BASE,
                                                      end=DEV_BASE + DEV_PAGES * P), metadata=r.md)
    assert not r.conn.closed.done()
    return status.SerializeToString(deterministic=True), mem.data, snap.flags


async def _violations(s: Stubs, r: Rig) -> int:
    return next(d.violations for d in (await AdminClient(s.channel).stats()).devices if d.name == r.name)


def rf(r: Rig, start_page: int = 0, end_page: int = 1, **kw: Any) -> dpb.RangeFaultRequest:
    return dpb.RangeFaultRequest(notifier_id=r.notifier, notifier_seq=kw.pop("seq", 0),
                                 start=DEV_BASE + start_page * P, end=DEV_BASE + end_page * P, **kw)


async def _seq(s: Stubs, r: Rig) -> int:
    return (await s.dev.ReadBegin(dpb.NotifierRef(notifier_id=r.notifier), metadata=r.md)).seq


def pfns(*values: int) -> bytes:
    return np.array(values, dtype="<u8").tobytes()


# Builders are async: some need the current sequence or a second notifier first.
RigBuilder = Callable[[Stubs, Rig], Awaitable[Any]]


def dcase(rpc: str, build: RigBuilder, err: str, id: str) -> Any:
    return pytest.param(rpc, build, err, id=f"{rpc}-{id}")


async def _range_fault(s: Stubs, r: Rig, **kw: Any) -> dpb.RangeFaultRequest:
    return rf(r, seq=await _seq(s, r), **kw)


async def _wrong_sequence(s: Stubs, r: Rig) -> dpb.RangeFaultRequest:
    return rf(r, 0, 1, seq=await _seq(s, r) + 2)


async def _big_notifier(s: Stubs, r: Rig, npages: int) -> dpb.RangeFaultRequest:
    """A second notifier of ``npages`` + 1 pages, and a fault of all of them."""
    length = (npages + 1) * P
    ins = await s.dev.InsertNotifier(dpb.InsertNotifierRequest(pid=r.pid, start=TASK_SIZE // 2, length=length),
                                     metadata=r.md)
    seq = (await s.dev.ReadBegin(dpb.NotifierRef(notifier_id=ins.notifier_id), metadata=r.md)).seq
    return dpb.RangeFaultRequest(notifier_id=ins.notifier_id, notifier_seq=seq, start=TASK_SIZE // 2,
                                 end=TASK_SIZE // 2 + length)


async def _zero_page_grant(s: Stubs, r: Rig, npages: int) -> None:
    """Fault the read-only pages in (zero page): the device now holds pfn 0 read-only."""
    await s.dev.RangeFault(await _range_fault(s, r, start_page=DEV_RW, end_page=DEV_RW + npages,
                                              default_flags=HMM_PFN_REQ_FAULT), metadata=r.md)


async def _dma_read_beyond_message_limit(s: Stubs, r: Rig) -> dpb.DmaReadRequest:
    await _zero_page_grant(s, r, DEV_RO)
    n = DEFAULT_MAX_MESSAGE_BYTES // P + 1
    return dpb.DmaReadRequest(pfns=np.zeros(n, "<u8").tobytes())  # n x the zero page: a reply > 64 MiB


async def _dma_write_read_only(s: Stubs, r: Rig) -> dpb.DmaWriteRequest:
    await _zero_page_grant(s, r, 1)
    return dpb.DmaWriteRequest(pfns=pfns(0), data=b"\xff" * P)


def _const(make: Callable[[Rig], Any]) -> RigBuilder:
    async def build(s: Stubs, r: Rig) -> Any:
        return make(r)
    return build


BAD_DEVICE_CALLS = [
    # mmu_interval_notifier_insert
    dcase("InsertNotifier", _const(lambda r: dpb.InsertNotifierRequest(pid=r.stranger, start=0, length=P)),
          "EPERM", "process-did-not-open-the-device"),
    dcase("InsertNotifier", _const(lambda r: dpb.InsertNotifierRequest(pid=0x7FFF_FFFF, start=0, length=P)),
          "ESRCH", "unknown-pid"),
    dcase("InsertNotifier", _const(lambda r: dpb.InsertNotifierRequest(pid=r.pid, start=DEV_BASE, length=0)),
          "EOVERFLOW", "zero-length"),
    dcase("InsertNotifier", _const(lambda r: dpb.InsertNotifierRequest(pid=r.pid, start=ULONG_MAX - P + 1,
                                                                       length=2 * P)), "EOVERFLOW", "wraps"),
    dcase("InsertNotifier", _const(lambda r: dpb.InsertNotifierRequest(pid=r.pid, start=2, length=ULONG_MAX)),
          "EOVERFLOW", "length-u64-max-wraps"),
    # unknown notifiers
    dcase("RemoveNotifier", _const(lambda r: dpb.NotifierRef(notifier_id=ULONG_MAX)), "ENOENT", "unknown-id"),
    dcase("RemoveNotifier", _const(lambda r: dpb.NotifierRef(notifier_id=0)), "ENOENT", "id-zero"),
    dcase("ReadBegin", _const(lambda r: dpb.NotifierRef(notifier_id=ULONG_MAX)), "ENOENT", "unknown-id"),
    dcase("ReadBegin", _const(lambda r: dpb.NotifierRef(notifier_id=0)), "ENOENT", "id-zero"),
    dcase("RangeFault", _const(lambda r: dpb.RangeFaultRequest(notifier_id=ULONG_MAX, start=DEV_BASE,
                                                               end=DEV_BASE + P)), "ENOENT", "unknown-id"),
    dcase("Snapshot", _const(lambda r: dpb.RangeFaultRequest(notifier_id=ULONG_MAX, start=DEV_BASE,
                                                             end=DEV_BASE + P)), "ENOENT", "unknown-id"),
    # hmm_range_fault arguments
    dcase("RangeFault", _const(lambda r: dpb.RangeFaultRequest(notifier_id=r.notifier, start=DEV_BASE + 1,
                                                               end=DEV_BASE + P)), "EINVAL", "unaligned-start"),
    dcase("RangeFault", _const(lambda r: dpb.RangeFaultRequest(notifier_id=r.notifier, start=DEV_BASE,
                                                               end=DEV_BASE + P - 1)), "EINVAL", "unaligned-end"),
    dcase("RangeFault", _const(lambda r: rf(r, 1, 1)), "EINVAL", "empty"),
    dcase("RangeFault", _const(lambda r: rf(r, 2, 1)), "EINVAL", "end-before-start"),
    dcase("RangeFault", _const(lambda r: rf(r, -1, 1)), "EINVAL", "starts-before-the-notifier"),
    dcase("RangeFault", _const(lambda r: rf(r, 0, DEV_PAGES + 1)), "EINVAL", "ends-after-the-notifier"),
    dcase("RangeFault", _const(lambda r: dpb.RangeFaultRequest(notifier_id=r.notifier, start=0, end=P)), "EINVAL",
          "outside-the-notifier"),
    dcase("RangeFault", lambda s, r: _big_notifier(s, r, r.conn.max_pages), "EINVAL", "more-than-max-pages"),
    dcase("RangeFault", _const(lambda r: rf(r, 0, 4, requests=b"\x01" * 3)), "EINVAL", "requests-too-short"),
    dcase("RangeFault", _const(lambda r: rf(r, 0, 4, requests=b"\x01" * 5)), "EINVAL", "requests-too-long"),
    dcase("RangeFault", _const(lambda r: rf(r, 0, 4, default_flags=0x40)), "EINVAL", "unknown-default-flag"),
    dcase("RangeFault", _const(lambda r: rf(r, 0, 4, pfn_flags_mask=0x80)), "EINVAL", "unknown-mask-flag"),
    dcase("RangeFault", _const(lambda r: rf(r, 0, 4, default_flags=U32_MAX)), "EINVAL", "all-flag-bits"),
    # hmm_range_fault results the kernel refuses
    dcase("RangeFault", _wrong_sequence, "EBUSY", "sequence-not-from-read-begin"),
    dcase("RangeFault", lambda s, r: _range_fault(s, r, start_page=DEV_RW + DEV_RO, end_page=DEV_PAGES,
                                                  default_flags=HMM_PFN_REQ_FAULT), "EFAULT", "fault-in-a-hole"),
    dcase("RangeFault", lambda s, r: _range_fault(s, r, start_page=DEV_RW, end_page=DEV_RW + 1,
                                                  default_flags=HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE),
          "EPERM", "write-fault-on-read-only"),
    # the snapshot checks the same arguments
    dcase("Snapshot", _const(lambda r: dpb.RangeFaultRequest(notifier_id=r.notifier, start=DEV_BASE + 1,
                                                             end=DEV_BASE + P)), "EINVAL", "unaligned-start"),
    dcase("Snapshot", _const(lambda r: rf(r, 1, 1)), "EINVAL", "empty"),
    dcase("Snapshot", _const(lambda r: rf(r, 0, DEV_PAGES + 1)), "EINVAL", "ends-after-the-notifier"),
    dcase("Snapshot", lambda s, r: _big_notifier(s, r, r.conn.max_pages), "EINVAL", "more-than-max-pages"),
    dcase("Snapshot", _const(lambda r: rf(r, 0, 2, requests=b"\x00")), "EINVAL", "requests-length"),
    dcase("Snapshot", _const(lambda r: rf(r, 0, 2, default_flags=0x40)), "EINVAL", "unknown-flag"),
    # DMA
    dcase("DmaRead", _const(lambda r: dpb.DmaReadRequest(pfns=b"")), "EINVAL", "no-pfns"),
    dcase("DmaRead", _const(lambda r: dpb.DmaReadRequest(pfns=b"\x01" * 7)), "EINVAL", "pfns-not-u64"),
    dcase("DmaRead", _const(lambda r: dpb.DmaReadRequest(pfns=pfns(1, 2) + b"\x00")), "EINVAL", "pfns-ragged"),
    dcase("DmaRead", _const(lambda r: dpb.DmaReadRequest(pfns=pfns(r.conn.system_frames - 1))), "EFAULT",
          "never-granted"),
    dcase("DmaRead", _const(lambda r: dpb.DmaReadRequest(pfns=pfns(r.conn.system_frames))), "EFAULT",
          "beyond-ram"),
    # not a frame number at all (as int64 it would be negative): refused, not a violation
    dcase("DmaRead", _const(lambda r: dpb.DmaReadRequest(pfns=pfns(ULONG_MAX))), "EINVAL", "pfn-u64-max"),
    dcase("DmaRead", _const(lambda r: dpb.DmaReadRequest(pfns=pfns(1, 1 << 63))), "EINVAL", "pfn-2^63"),
    dcase("DmaRead", _const(lambda r: dpb.DmaReadRequest(pfns=pfns((1 << 63) - 1))), "EFAULT", "pfn-2^63-1"),
    dcase("DmaRead", _const(lambda r: dpb.DmaReadRequest(pfns=np.zeros(r.conn.max_pages + 1, "<u8").tobytes())),
          "EINVAL", "more-than-max-pages"),
    dcase("DmaRead", _dma_read_beyond_message_limit, "EINVAL", "reply-beyond-message-limit"),
    dcase("DmaWrite", _const(lambda r: dpb.DmaWriteRequest(pfns=b"", data=b"")), "EINVAL", "no-pfns"),
    dcase("DmaWrite", _const(lambda r: dpb.DmaWriteRequest(pfns=b"\x01" * 9, data=bytes(P))), "EINVAL",
          "pfns-not-u64"),
    dcase("DmaWrite", _const(lambda r: dpb.DmaWriteRequest(pfns=pfns(1), data=bytes(P - 1))), "EINVAL",
          "data-short"),
    dcase("DmaWrite", _const(lambda r: dpb.DmaWriteRequest(pfns=pfns(1), data=bytes(2 * P))), "EINVAL",
          "data-long"),
    dcase("DmaWrite", _const(lambda r: dpb.DmaWriteRequest(pfns=pfns(1), data=b"")), "EINVAL", "no-data"),
    dcase("DmaWrite", _const(lambda r: dpb.DmaWriteRequest(pfns=pfns(r.conn.system_frames - 1), data=bytes(P))),
          "EFAULT", "never-granted"),
    dcase("DmaWrite", _const(lambda r: dpb.DmaWriteRequest(pfns=pfns(r.conn.system_frames + 5), data=bytes(P))),
          "EFAULT", "beyond-ram"),
    dcase("DmaWrite", _const(lambda r: dpb.DmaWriteRequest(pfns=pfns(1 << 63), data=bytes(P))), "EINVAL", "pfn-2^63"),
    dcase("DmaWrite", _dma_write_read_only, "EFAULT", "granted-read-only"),
]


@pytest.mark.parametrize("rpc, build, err", BAD_DEVICE_CALLS)
async def test_bad_device_call(raw: Stubs, rig: Rig, rpc: str, build: RigBuilder, err: str) -> None:
    request = await build(raw, rig)
    before = await rig_snapshot(raw, rig)
    violations = await _violations(raw, rig)
    await expect_error(getattr(raw.dev, rpc), request, err, metadata=rig.md)
    assert await rig_snapshot(raw, rig) == before
    if err != "EFAULT":  # only an access to memory the device does not hold is a coherence violation
        assert await _violations(raw, rig) == violations
    # The zero page stays zero whatever a device tried.
    got = await raw.proc.Read(pb.ReadRequest(pid=rig.pid, addr=DEV_BASE + DEV_RW * P, length=DEV_RO * P))
    assert got.data == bytes(DEV_RO * P)
    await assert_serving(raw)


async def test_notifier_of_another_device_is_enoent(raw: Stubs, rig: Rig) -> None:
    other = await DeviceConnection.connect(raw.hmmd.address, device_name(), Driver())
    try:
        for rpc, req in (("ReadBegin", dpb.NotifierRef(notifier_id=rig.notifier)),
                         ("RangeFault", rf(rig, 0, 1)),
                         ("Snapshot", rf(rig, 0, 1)),
                         ("RemoveNotifier", dpb.NotifierRef(notifier_id=rig.notifier))):
            await expect_error(getattr(raw.dev, rpc), req, "ENOENT", metadata=other._metadata)
        # The owner still has it.
        await raw.dev.ReadBegin(dpb.NotifierRef(notifier_id=rig.notifier), metadata=rig.md, timeout=TIMEOUT_S)
    finally:
        await other.close()
    await assert_serving(raw)


async def test_removed_notifier_is_enoent(raw: Stubs, rig: Rig) -> None:
    ref = dpb.NotifierRef(notifier_id=rig.notifier)
    await raw.dev.RemoveNotifier(ref, metadata=rig.md, timeout=TIMEOUT_S)
    for rpc, req in (("RemoveNotifier", ref), ("ReadBegin", ref), ("RangeFault", rf(rig, 0, 1)),
                     ("Snapshot", rf(rig, 0, 1))):
        await expect_error(getattr(raw.dev, rpc), req, "ENOENT", metadata=rig.md)
    await assert_serving(raw)


# File system calls on a device fd: a device node has no read, write or truncate.
DEVICE_FD_CALLS = [
    pytest.param("Pread", lambda r: pb.PreadRequest(pid=r.pid, fd=r.dev_fd, offset=0, length=8), "EINVAL",
                 id="Pread"),
    pytest.param("Pwrite", lambda r: pb.PwriteRequest(pid=r.pid, fd=r.dev_fd, offset=0, data=b"x"), "EINVAL",
                 id="Pwrite"),
    pytest.param("Ftruncate", lambda r: pb.FtruncateRequest(pid=r.pid, fd=r.dev_fd, length=0), "EINVAL",
                 id="Ftruncate"),
]


@pytest.mark.parametrize("rpc, build, err", DEVICE_FD_CALLS)
async def test_file_call_on_a_device_fd(raw: Stubs, rig: Rig, rpc: str, build: Callable[[Rig], Any],
                                        err: str) -> None:
    before = await rig_snapshot(raw, rig)
    await expect_error(getattr(raw.proc, rpc), build(rig), err)
    assert await rig_snapshot(raw, rig) == before
    await assert_serving(raw)
