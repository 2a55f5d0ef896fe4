"""The systems the model is compared with, behind one small async interface.

``CoreSut``: ``hmmd.core.kernel.Kernel`` in this process, with hmm-dmirror's own
driver attached through ``tests.model.local.LocalConnection``.
``DaemonSut``: a running hmmd and hmm-dmirror program, over gRPC.

Every call returns its result or raises ``hmm.errors.KernelError`` carrying the
errno; dmirror commands return ``(cpages, data)``.
"""

from __future__ import annotations

import errno
from typing import Protocol

from hmm.abi import MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE, MAP_SHARED, O_RDWR
from hmm.admin import AdminClient
from hmm.dmirror.client import DmirrorClient
from hmm.errors import KernelError
from hmm.process import Proc, ProcessClient
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import Kernel

from .local import LocalConnection


def map_flags(shared: bool, fixed: bool) -> int:
    return (MAP_SHARED if shared else MAP_PRIVATE) | MAP_ANONYMOUS | (MAP_FIXED if fixed else 0)


class Sut(Protocol):
    ndevices: int

    async def spawn(self) -> int: ...
    async def fork(self, pid: int) -> int: ...
    async def exit(self, pid: int) -> None: ...
    async def mmap(self, pid: int, addr: int, length: int, prot: int, flags: int) -> int: ...
    async def munmap(self, pid: int, addr: int, length: int) -> None: ...
    async def mprotect(self, pid: int, addr: int, length: int, prot: int) -> None: ...
    async def madvise(self, pid: int, addr: int, length: int, advice: int) -> None: ...
    async def mremap(self, pid: int, old: int, old_len: int, new_len: int, flags: int, new: int) -> int: ...
    async def read(self, pid: int, addr: int, length: int) -> bytes: ...
    async def write(self, pid: int, addr: int, data: bytes) -> None: ...
    async def open(self, pid: int, dev: int) -> int: ...
    async def command(self, dev: int, file_id: int, cmd: int, addr: int, npages: int,
                      data: bytes = b"") -> tuple[int, bytes]: ...
    async def problems(self) -> list[str]: ...
    async def close(self) -> None: ...


class CoreSut:
    """The core in this process; ``ndevices`` dmirror devices with private memory."""

    def __init__(self, ndevices: int, *, ram_bytes: int = 8 << 20, device_pages: int = 1024) -> None:
        self.ndevices = ndevices
        self.k = Kernel(ram_bytes, coherent_bytes=0)  # small arrays: check_invariants runs every step
        self.names = [f"dm{i}" for i in range(ndevices)]
        self.drivers = [LocalConnection.attach(self.k, name, device_pages) for name in self.names]

    async def spawn(self) -> int:
        return self.k.spawn("model").pid

    async def fork(self, pid: int) -> int:
        return (await self.k.fork(pid)).pid

    async def exit(self, pid: int) -> None:
        await self.k.exit(pid)

    async def mmap(self, pid: int, addr: int, length: int, prot: int, flags: int) -> int:
        return await self.k.mmap(pid, addr, length, prot, flags, -1, 0)

    async def munmap(self, pid: int, addr: int, length: int) -> None:
        await self.k.munmap(pid, addr, length)

    async def mprotect(self, pid: int, addr: int, length: int, prot: int) -> None:
        await self.k.mprotect(pid, addr, length, prot)

    async def madvise(self, pid: int, addr: int, length: int, advice: int) -> None:
        await self.k.madvise(pid, addr, length, advice)

    async def mremap(self, pid: int, old: int, old_len: int, new_len: int, flags: int, new: int) -> int:
        return await self.k.mremap(pid, old, old_len, new_len, flags, new)

    async def read(self, pid: int, addr: int, length: int) -> bytes:
        return await self.k.read(pid, addr, length)

    async def write(self, pid: int, addr: int, data: bytes) -> None:
        await self.k.write(pid, addr, data)

    async def open(self, pid: int, dev: int) -> int:
        _, file_id = await self.k.open(pid, f"/dev/{self.names[dev]}", O_RDWR)
        return file_id

    async def command(self, dev: int, file_id: int, cmd: int, addr: int, npages: int,
                      data: bytes = b"") -> tuple[int, bytes]:
        r = await self.drivers[dev].command(file_id, cmd, addr, npages, data)
        return r.cpages, r.data

    async def problems(self) -> list[str]:
        out = check_invariants(self.k)
        for p in self.k.processes.values():
            for mig in p.mm.migrations.values():
                out.append(f"  open in pid {p.pid} (processes {sorted(self.k.processes)}): "
                           f"[{mig.start:#x}, {mig.end:#x}) owner {mig.owner} flags {mig.page_flags} "
                           f"done {mig.pages_done} finalized {mig.finalized} family {mig.family}")
        for dev in self.k.devices.values():
            if dev.violations:
                out.append(f"device {dev.name}: {dev.violations} DMA sanitizer violation(s)")
        return out

    async def close(self) -> None:
        pass


class DaemonSut:
    """A running hmmd and one hmm-dmirror program serving ``names`` (device i is
    names[i]). Create and use it on one event loop."""

    def __init__(self, hmmd_address: str, dmirror_address: str, names: list[str]) -> None:
        self.ndevices = len(names)
        self.names = names
        self.cpu = ProcessClient.connect(hmmd_address)
        self.dm = DmirrorClient(dmirror_address)
        self.admin = AdminClient(self.cpu.channel)
        self.procs: dict[int, Proc] = {}
        self._has_check = True

    async def spawn(self) -> int:
        proc = await self.cpu.spawn("model")
        self.procs[proc.pid] = proc
        return proc.pid

    async def fork(self, pid: int) -> int:
        child = await self.procs[pid].fork()
        self.procs[child.pid] = child
        return child.pid

    async def exit(self, pid: int) -> None:
        await self.procs.pop(pid).exit()

    async def mmap(self, pid: int, addr: int, length: int, prot: int, flags: int) -> int:
        return await self.procs[pid].mmap(length, prot, flags, addr=addr)

    async def munmap(self, pid: int, addr: int, length: int) -> None:
        await self.procs[pid].munmap(addr, length)

    async def mprotect(self, pid: int, addr: int, length: int, prot: int) -> None:
        await self.procs[pid].mprotect(addr, length, prot)

    async def madvise(self, pid: int, addr: int, length: int, advice: int) -> None:
        await self.procs[pid].madvise(addr, length, advice)

    async def mremap(self, pid: int, old: int, old_len: int, new_len: int, flags: int, new: int) -> int:
        return await self.procs[pid].mremap(old, old_len, new_len, flags, new)

    async def read(self, pid: int, addr: int, length: int) -> bytes:
        return await self.procs[pid].read(addr, length)

    async def write(self, pid: int, addr: int, data: bytes) -> None:
        await self.procs[pid].write(addr, data)

    async def open(self, pid: int, dev: int) -> int:
        _, file_id = await self.procs[pid].open(f"/dev/{self.names[dev]}")
        return file_id

    async def command(self, dev: int, file_id: int, cmd: int, addr: int, npages: int,
                      data: bytes = b"") -> tuple[int, bytes]:
        r = await self.dm.command(file_id, cmd, addr, npages, data)
        return r.cpages, r.data

    async def problems(self) -> list[str]:
        out: list[str] = []
        stats = await self.admin.stats()
        for name in self.names:
            v = stats.device(name).violations
            if v:
                out.append(f"device {name}: {v} DMA sanitizer violation(s)")
        if self._has_check:
            try:
                out += await self.admin.check_invariants()
            except KernelError as e:
                if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                self._has_check = False
        return out

    async def close(self) -> None:
        for pid in list(self.procs):
            try:
                await self.exit(pid)
            except KernelError:
                pass
        await self.dm.close()
        await self.cpu.close()
