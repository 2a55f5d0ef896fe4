"""Device-exclusive access across processes (the kernel's exclusive,
exclusive_mprotect and exclusive_cow, plus the events a device sees)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from hmm.abi import MAP_ANONYMOUS, MAP_SHARED, PAGE_SIZE, PROT_READ, PROT_WRITE, Event
from hmm.admin import AdminClient
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import CMD_CHECK_EXCLUSIVE, CMD_EXCLUSIVE, CMD_READ, CMD_WRITE
from hmm.errors import KernelError
from hmm.process import Proc, ProcessClient

N = 32


def pattern(c: int = 0) -> np.ndarray:
    return np.arange(N * 1024, dtype=np.int32) + c


class One:
    def __init__(self, proc: Proc, dm: DmirrorClient, fid: int, buf: int, name: str) -> None:
        self.proc, self.dm, self.fid, self.buf, self.name = proc, dm, fid, buf, name

    async def cmd(self, cmd: int, data: bytes = b""):
        return await self.dm.command(self.fid, cmd, self.buf, N, data)


@pytest.fixture
async def one(cpu: ProcessClient, dmirror_factory) -> One:
    prog, (name,) = dmirror_factory(1)
    dm = DmirrorClient(prog.address)
    proc = await cpu.spawn("exclusive")
    buf = await proc.mmap(N * PAGE_SIZE)
    await proc.write(buf, pattern().tobytes())
    _, fid = await proc.open(f"/dev/{name}")
    yield One(proc, dm, fid, buf, name)
    assert (await AdminClient(cpu.channel).stats()).device(name).violations == 0
    await dm.close()


async def test_exclusive_then_cpu_touch_revokes_with_clear(one: One) -> None:
    r = await one.cmd(CMD_EXCLUSIVE)
    assert r.cpages == N and (np.frombuffer(r.data, np.int32) == pattern()).all()
    events = await one.dm.events(one.fid, clear=True)
    assert {(e.event, e.owner) for e in events} == {(Event.EXCLUSIVE, 0)}  # dmirror asks with no owner
    with pytest.raises(KernelError) as e:
        await one.cmd(CMD_CHECK_EXCLUSIVE)
    assert e.value.errno == errno.EPERM
    # The CPU reads then increments every int: the first touch of each page takes it back.
    got = np.frombuffer(await one.proc.read(one.buf, N * PAGE_SIZE), np.int32)
    assert (got == pattern()).all()
    await one.proc.write(one.buf, pattern(1).tobytes())
    assert (np.frombuffer(await one.proc.read(one.buf, N * PAGE_SIZE), np.int32) == pattern(1)).all()
    events = await one.dm.events(one.fid, clear=True)
    assert [(e.event, e.end - e.start) for e in events] == [(Event.CLEAR, PAGE_SIZE)] * N
    assert (await one.cmd(CMD_CHECK_EXCLUSIVE)).cpages == 0


async def test_exclusive_mprotect_then_device_write_eperm(one: One) -> None:
    await one.cmd(CMD_EXCLUSIVE)
    await one.proc.mprotect(one.buf, N * PAGE_SIZE, PROT_READ)
    with pytest.raises(KernelError) as e:
        await one.cmd(CMD_WRITE, pattern(5).tobytes())
    assert e.value.errno == errno.EPERM
    assert (np.frombuffer(await one.proc.read(one.buf, N * PAGE_SIZE), np.int32) == pattern()).all()


async def test_exclusive_cow_fork_restores_and_isolates(one: One) -> None:
    await one.cmd(CMD_EXCLUSIVE)
    await one.dm.events(one.fid, clear=True)
    child = await one.proc.fork()  # exclusive entries become normal (read-only) ones
    events = await one.dm.events(one.fid, clear=True)
    assert [(e.event, e.start, e.end) for e in events] == [
        (Event.PROTECTION_PAGE, one.buf, one.buf + N * PAGE_SIZE)]
    assert (np.frombuffer(await child.read(one.buf, N * PAGE_SIZE), np.int32) == pattern()).all()
    await child.write(one.buf, pattern(1).tobytes())
    assert (np.frombuffer(await one.proc.read(one.buf, N * PAGE_SIZE), np.int32) == pattern()).all()
    await one.proc.write(one.buf, pattern(2).tobytes())
    assert (np.frombuffer(await child.read(one.buf, N * PAGE_SIZE), np.int32) == pattern(1)).all()
    assert (await one.cmd(CMD_CHECK_EXCLUSIVE)).cpages == 0  # exclusivity is lost at fork
    await child.exit()


async def test_exclusive_refuses_shared_memory_and_read_only(cpu: ProcessClient, one: One) -> None:
    shm = await one.proc.mmap(PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS)
    with pytest.raises(KernelError) as e:
        await one.dm.command(one.fid, CMD_EXCLUSIVE, shm, 1)
    assert e.value.errno == errno.EOPNOTSUPP
    ro = await one.proc.mmap(PAGE_SIZE, PROT_READ)
    with pytest.raises(KernelError) as e:
        await one.dm.command(one.fid, CMD_EXCLUSIVE, ro, 1)
    assert e.value.errno == errno.EFAULT


async def test_device_read_of_an_exclusive_page_by_the_same_handle(one: One) -> None:
    await one.cmd(CMD_EXCLUSIVE)
    r = await one.cmd(CMD_READ)  # ATOMIC entries are readable, no fault
    assert (r.cpages, r.faults) == (N, 0) and (np.frombuffer(r.data, np.int32) == pattern()).all()
    r = await one.cmd(CMD_WRITE, pattern(3).tobytes())  # ATOMIC counts as missing for WRITE
    assert r.cpages == N and r.faults == 1
    assert (np.frombuffer(await one.proc.read(one.buf, N * PAGE_SIZE), np.int32) == pattern(3)).all()
