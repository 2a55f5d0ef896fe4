"""The CPU side: create emulated processes and make their system calls.

    async with ProcessClient.connect("127.0.0.1:50051") as cpu:
        proc = await cpu.spawn("worker")
        addr = await proc.mmap(4 << 20)
        await proc.write(addr, b"hello")

Every failure raises hmm.errors.KernelError with the kernel's errno.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from hmm.abi import MAP_ANONYMOUS, MAP_PRIVATE, O_RDWR, PAGE_SIZE, PROT_READ, PROT_WRITE
from hmm.channel import open_channel, raise_kernel_error
from hmm.security import Credentials
from hmm.v1 import process_pb2 as pb
from hmm.v1 import process_pb2_grpc

T = TypeVar("T")


async def _call(method: Callable[..., Awaitable[T]], request: Any) -> T:
    try:
        return await method(request)
    except grpc.aio.AioRpcError as e:
        raise_kernel_error(e)


@dataclass(frozen=True)
class OomKilled:
    """What the OOM reaper did before the process exited."""

    reaped: bool  # a pass emptied every mapping it may
    passes: int  # 1..10
    pages_reaped: int  # resident pages the reaper freed (the exit freed the rest)


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    path: str
    flags: tuple[str, ...]


@dataclass(frozen=True)
class Status:
    pid: int
    parent: int
    name: str
    alive: bool
    rss_anon: int
    rss_file: int
    rss_shmem: int
    rss_peak: int
    maps: tuple[Mapping, ...]
    swap: int = 0  # pages swapped out (VmSwap)
    hugetlb_pages: int = 0  # hugetlb memory mapped, in 4 KiB pages (HugetlbPages)
    oom_score_adj: int = 0  # /proc/<pid>/oom_score_adj


class ProcessClient:
    """A connection to the daemon's Process service."""

    def __init__(self, channel: grpc.aio.Channel, *, own_channel: bool = False) -> None:
        self.channel = channel
        self.stub = process_pb2_grpc.ProcessStub(channel)
        self._own = own_channel

    @classmethod
    def connect(cls, address: str, credentials: Credentials | None = None) -> ProcessClient:
        """A client of the daemon at ``address``; ``credentials`` (token, TLS) default to
        the HMM_* environment (hmm.security)."""
        return cls(open_channel(address, credentials), own_channel=True)

    async def close(self) -> None:
        if self._own:
            await self.channel.close()

    async def __aenter__(self) -> ProcessClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def spawn(self, name: str = "") -> Proc:
        ref = await _call(self.stub.Spawn, pb.SpawnRequest(name=name))
        return Proc(self, ref.pid)

    def attach(self, pid: int) -> Proc:
        return Proc(self, pid)


class Proc:
    """One emulated process; methods are its system calls and its CPU accesses."""

    def __init__(self, client: ProcessClient, pid: int) -> None:
        self.client = client
        self.pid = pid
        self._stub = client.stub

    def __repr__(self) -> str:
        return f"<Proc {self.pid}>"

    async def fork(self) -> Proc:
        ref = await _call(self._stub.Fork, pb.ProcessRef(pid=self.pid))
        return Proc(self.client, ref.pid)

    async def exit(self) -> None:
        await _call(self._stub.Exit, pb.ProcessRef(pid=self.pid))

    async def oom_kill(self) -> OomKilled:
        """Killed by the OOM killer: the reaper empties its private memory under
        non-blockable invalidations (devices may refuse), then it exits."""
        r = await _call(self._stub.OomKill, pb.ProcessRef(pid=self.pid))
        return OomKilled(r.reaped, r.passes, r.pages_reaped)

    async def set_oom_score_adj(self, adj: int) -> None:
        """/proc/<pid>/oom_score_adj: -1000 (never the OOM killer's choice) .. 1000."""
        await _call(self._stub.SetOomScoreAdj, pb.OomScoreAdjRequest(pid=self.pid, oom_score_adj=adj))

    async def mmap(self, length: int, prot: int = PROT_READ | PROT_WRITE, flags: int = MAP_PRIVATE | MAP_ANONYMOUS,
                   *, addr: int = 0, fd: int = -1, offset: int = 0) -> int:
        r = await _call(self._stub.Mmap, pb.MmapRequest(pid=self.pid, addr=addr, length=length, prot=prot,
                                                         flags=flags, fd=fd, offset=offset))
        return r.addr

    async def munmap(self, addr: int, length: int) -> None:
        await _call(self._stub.Munmap, pb.RangeRequest(pid=self.pid, addr=addr, length=length))

    async def mprotect(self, addr: int, length: int, prot: int) -> None:
        await _call(self._stub.Mprotect, pb.MprotectRequest(pid=self.pid, addr=addr, length=length, prot=prot))

    async def madvise(self, addr: int, length: int, advice: int) -> None:
        await _call(self._stub.Madvise, pb.MadviseRequest(pid=self.pid, addr=addr, length=length, advice=advice))

    async def mremap(self, old_addr: int, old_length: int, new_length: int, flags: int = 0,
                     new_addr: int = 0) -> int:
        r = await _call(self._stub.Mremap, pb.MremapRequest(pid=self.pid, old_addr=old_addr, old_length=old_length,
                                                             new_length=new_length, flags=flags, new_addr=new_addr))
        return r.addr

    async def clear_refs(self, value: int) -> None:
        await _call(self._stub.ClearRefs, pb.ClearRefsRequest(pid=self.pid, value=value))

    async def read(self, addr: int, length: int) -> bytes:
        return (await _call(self._stub.Read, pb.ReadRequest(pid=self.pid, addr=addr, length=length))).data

    async def write(self, addr: int, data: bytes) -> None:
        await _call(self._stub.Write, pb.WriteRequest(pid=self.pid, addr=addr, data=bytes(data)))

    async def open(self, path: str, flags: int = O_RDWR) -> tuple[int, int]:
        """Returns (fd, file_id); file_id is what a device hears in FileOpen."""
        r = await _call(self._stub.Open, pb.OpenRequest(pid=self.pid, path=path, flags=flags))
        return r.fd, r.file_id

    async def close(self, fd: int) -> None:
        await _call(self._stub.Close, pb.FdRequest(pid=self.pid, fd=fd))

    async def pread(self, fd: int, offset: int, length: int) -> bytes:
        r = await _call(self._stub.Pread, pb.PreadRequest(pid=self.pid, fd=fd, offset=offset, length=length))
        return r.data

    async def pwrite(self, fd: int, offset: int, data: bytes) -> None:
        await _call(self._stub.Pwrite, pb.PwriteRequest(pid=self.pid, fd=fd, offset=offset, data=bytes(data)))

    async def ftruncate(self, fd: int, length: int) -> None:
        await _call(self._stub.Ftruncate, pb.FtruncateRequest(pid=self.pid, fd=fd, length=length))

    async def pin_user_pages(self, addr: int, npages: int, *, write: bool = True, longterm: bool = False,
                             hold: bool = False) -> int:
        """pin_user_pages (see the proto); returns the pin id when ``hold``."""
        r = await _call(self._stub.PinUserPages, pb.PinRequest(pid=self.pid, addr=addr, npages=npages, write=write,
                                                                longterm=longterm, hold=hold))
        return r.pin_id

    async def unpin_user_pages(self, pin_id: int) -> None:
        await _call(self._stub.UnpinUserPages, pb.UnpinRequest(pid=self.pid, pin_id=pin_id))

    async def pagemap(self, addr: int, npages: int) -> np.ndarray:
        """/proc/pid/pagemap entries (uint64 per page) of [addr, addr + npages pages)."""
        r = await _call(self._stub.Pagemap, pb.RangeRequest(pid=self.pid, addr=addr, length=npages * PAGE_SIZE))
        return np.frombuffer(r.entries, dtype="<u8")

    async def status(self) -> Status:
        return status_from_message(await _call(self._stub.Status, pb.ProcessRef(pid=self.pid)))


def status_from_message(s: pb.ProcessStatus) -> Status:
    maps = tuple(Mapping(m.start, m.end, m.perms, m.offset, m.path, tuple(m.flags)) for m in s.maps)
    return Status(s.pid, s.parent, s.name, s.alive, s.rss_anon, s.rss_file, s.rss_shmem, s.rss_peak, maps, s.swap,
                  s.hugetlb_pages, s.oom_score_adj)
