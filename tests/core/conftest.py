"""Shared fixtures of the core unit tests: a kernel, a process, a fake device that
records every invalidation it receives, and small helpers for byte patterns and
range faults. Nothing here touches gRPC or the network."""

from __future__ import annotations

import errno
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from hmm.abi import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    O_RDWR,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    TASK_SIZE,
    Event,
)
from hmm.errors import KernelError
from hmmd.core.device import Device, DeviceOps
from hmmd.core.devmem import DevicePageMap, MemoryKind
from hmmd.core.hmm import HmmResult
from hmmd.core.kernel import Kernel, Process
from hmmd.core.notifier import IntervalNotifier, NotifierRange
from hmmd.core.pagetable import PTE_PRESENT, PTE_WRITE, pte_pfn

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
SHM = MAP_SHARED | MAP_ANONYMOUS
RAM_BYTES = 64 << 20


def pattern(npages: int, seed: int) -> bytes:
    """``npages`` pages of bytes that differ per page and per seed (never all zero)."""
    base = np.arange(P, dtype=np.uint32)
    pages = [((base * 7 + seed * 131 + i * 17 + 1) % 251 + 1).astype(np.uint8) for i in range(npages)]
    return np.concatenate(pages).tobytes() if pages else b""


def page(data: bytes, i: int) -> bytes:
    return data[i * P : (i + 1) * P]


ZERO_PAGE = bytes(P)


@dataclass
class Ev:
    """One invalidation as a device saw it."""

    notifier: int
    event: Event
    start: int
    end: int
    cur_seq: int
    blockable: bool
    owner: int

    @property
    def key(self) -> tuple[Event, int, int]:
        return (self.event, self.start, self.end)


class FakeDevice:
    """A DeviceOps that acknowledges every invalidation and records it.

    ``hook(sub, rng, cur_seq)`` (sync or async) runs inside the callback, i.e. before
    the CPU page tables change. ``refuse`` makes it refuse non-blockable ranges.
    ``log`` may be shared between several fakes to observe global ordering.
    """

    def __init__(self, log: list[Ev] | None = None) -> None:
        self.events: list[Ev] = []
        self.log = log
        self.hook: Callable[..., Any] | None = None
        self.refuse = False
        self.opened: list[tuple[int, int]] = []
        self.released: list[tuple[int, int]] = []

    async def invalidate(self, sub: IntervalNotifier, rng: NotifierRange, cur_seq: int) -> bool:
        sub.set_seq(cur_seq)
        ev = Ev(sub.id, rng.event, rng.start, rng.end, cur_seq, rng.blockable, rng.owner)
        self.events.append(ev)
        if self.log is not None:
            self.log.append(ev)
        if self.hook is not None:
            r = self.hook(sub, rng, cur_seq)
            if inspect.isawaitable(r):
                await r
        return not (self.refuse and not rng.blockable)

    async def file_open(self, file_id: int, pid: int) -> int:
        self.opened.append((file_id, pid))
        return 0

    async def file_release(self, file_id: int, pid: int) -> None:
        self.released.append((file_id, pid))

    def keys(self) -> list[tuple[Event, int, int]]:
        return [e.key for e in self.events]

    def take(self) -> list[tuple[Event, int, int]]:
        """The recorded (event, start, end) triples; clears the record."""
        out = self.keys()
        self.events.clear()
        return out


@dataclass
class Env:
    """A kernel with one process that opened /dev/fake0 and mirrors its whole user
    address space with one notifier."""

    k: Kernel
    p: Process
    fake: FakeDevice
    dev: Device
    sub: IntervalNotifier
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mm(self):  # type: ignore[no-untyped-def]
        return self.p.mm

    async def mmap(self, npages: int, prot: int = RW, flags: int = ANON, addr: int = 0,
                   fd: int = -1, offset: int = 0, pid: int | None = None) -> int:
        return await self.k.mmap(self.p.pid if pid is None else pid, addr, npages * P, prot, flags, fd, offset)

    async def write(self, addr: int, data: bytes, pid: int | None = None) -> None:
        await self.k.write(self.p.pid if pid is None else pid, addr, data)

    async def read(self, addr: int, length: int, pid: int | None = None) -> bytes:
        return await self.k.read(self.p.pid if pid is None else pid, addr, length)

    async def read_begin(self, sub: IntervalNotifier | None = None) -> int:
        return await self.k.read_begin(self.dev, (sub or self.sub).id)

    async def fault(self, start: int, end: int, default: int = 0, mask: int = 0,
                    requests: bytes = b"", *, seq: int | None = None, snapshot: bool = False,
                    sub: IntervalNotifier | None = None) -> HmmResult:
        """read_begin (unless ``seq`` is given) + range_fault."""
        s = await self.read_begin(sub) if seq is None else seq
        return await self.k.range_fault(self.dev, (sub or self.sub).id, s, start, end, default, mask,
                                        requests, 0, snapshot=snapshot)

    def dma_read(self, pfns: np.ndarray) -> bytes:
        return b"".join(self.k.dma_read(self.dev, np.asarray(pfns, dtype="<u8").tobytes()))

    def dma_write(self, pfns: np.ndarray, data: bytes) -> None:
        self.k.dma_write(self.dev, np.asarray(pfns, dtype="<u8").tobytes(), data)

    def ptes(self, start: int, end: int, mm=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        return (mm or self.mm).page_state(start, end)

    def pfns(self, start: int, end: int, mm=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        return pte_pfn(self.ptes(start, end, mm))


def present(ptes: np.ndarray) -> np.ndarray:
    return (ptes & PTE_PRESENT) != 0


def writable(ptes: np.ndarray) -> np.ndarray:
    return (ptes & PTE_WRITE) != 0


def raises_errno(err: int):  # type: ignore[no-untyped-def]
    """``with raises_errno(errno.EFAULT): ...``: a KernelError with exactly that errno."""
    return _RaisesErrno(err)


class _RaisesErrno:
    def __init__(self, err: int) -> None:
        self.err = err
        self._ctx = pytest.raises(KernelError)

    def __enter__(self):  # type: ignore[no-untyped-def]
        self.info = self._ctx.__enter__()
        return self.info

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        handled = self._ctx.__exit__(*exc)
        got = self.info.value.errno
        assert got == self.err, f"expected {errno.errorcode[self.err]}, got {errno.errorcode.get(got, got)}"
        return handled


async def make_env(k: Kernel | None = None, name: str = "fake0") -> Env:
    k = k or Kernel(RAM_BYTES)
    p = k.spawn("test")
    fake = FakeDevice()
    dev = k.register_device(name, fake)
    await k.open(p.pid, f"/dev/{name}", O_RDWR)
    sub = await k.insert_notifier(dev, p.pid, 0, TASK_SIZE)
    return Env(k, p, fake, dev, sub)


@pytest.fixture
async def env() -> Env:
    return await make_env()


async def add_device(k: Kernel, name: str, ops: DeviceOps, memory: MemoryKind, npages: int,
                     pid: int | None = None) -> tuple[Device, IntervalNotifier | None]:
    """Register a device with ``npages`` of ``memory``; with ``pid``, that process
    opens it and the device mirrors its whole address space."""
    dev = k.register_device(name, ops, memory, npages)
    sub = None
    if pid is not None:
        await k.open(pid, f"/dev/{name}", O_RDWR)
        sub = await k.insert_notifier(dev, pid, 0, TASK_SIZE)
    return dev, sub


class DeviceRig:
    """What the rigs of the device-memory tests share: the conftest env (``env``)
    plus a device with memory (``dev``) that its process opened and mirrors."""

    env: Env
    dev: Device

    @property
    def k(self) -> Kernel:
        return self.env.k

    @property
    def p(self) -> Process:
        return self.env.p

    @property
    def mm(self):  # type: ignore[no-untyped-def]
        return self.env.mm

    @property
    def pgmap(self) -> DevicePageMap:
        assert self.dev.pgmap is not None
        return self.dev.pgmap

    def ptes(self, start: int, end: int, mm=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        return self.env.ptes(start, end, mm)

    def pfns(self, start: int, end: int, mm=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        return pte_pfn(self.ptes(start, end, mm))
