"""Device-coherent memory across processes (HMM-SEMANTICS.md §1.3, §1.4, §1.6, §2.2):
hmmd, and dmirror programs started with ``--device NAME:coherent``.

Coherent pages are frames of hmmd's device-coherent window above system RAM: after
MIGRATE_TO_DEV the CPU maps them with present PTEs and reads and writes them in
place — no migrate_to_ram, no invalidation, no page moving — and every device
that range-faults them sees them VALID. A coherent device killed with SIGKILL
loses nothing: the memory was host-addressable, so the daemon moves it home.

Data patterns are checked after every move; the daemon's counters (device memory
in use, RSS, open migrations, violations), /proc/pid/pagemap frames and the
invalidations each device recorded, after every step.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import signal
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from hmm.abi import (
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
    HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    MADV_COLLAPSE,
    MAP_ANONYMOUS,
    MAP_SHARED,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    Event,
)
from hmm.admin import AdminClient, DeviceStats, KernelStats
from hmm.dmirror.client import DmirrorClient, Invalidation
from hmm.dmirror.device import (
    CMD_FLAGS,
    CMD_MIGRATE_TO_DEV,
    CMD_MIGRATE_TO_SYS,
    CMD_READ,
    CMD_RELEASE,
    CMD_SNAPSHOT,
    CMD_WRITE,
    FLAG_FAIL_ALLOC,
    Dmirror,
)
from hmm.errors import KernelError
from hmm.process import Proc, ProcessClient
from tests.procs import Program, start_dmirror

N = 64
P = PAGE_SIZE
PM_PRESENT, PM_SWAP = 1 << 63, 1 << 62
PM_PFRAME_MASK = (1 << 55) - 1
RW = PROT_READ | PROT_WRITE
OWN_RW = HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE  # 0x42
REMOTE_RW = HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | HMM_DMIRROR_PROT_WRITE  # 0x52
WAIT_S = 10.0

_ids = itertools.count()


def pattern(npages: int = N, c: int = 0) -> np.ndarray:
    return np.arange(npages * P // 4, dtype=np.int32) + c


def ints(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.int32)


def frames(pm: np.ndarray) -> np.ndarray:
    assert all(int(e) & PM_PRESENT and not int(e) & PM_SWAP for e in pm), "every page is present"
    return (pm & np.uint64(PM_PFRAME_MASK)).astype(np.int64)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT_S) -> None:
    """Poll ``check`` until it holds (for what another process does on its own time)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def keys(events: list[Invalidation]) -> list[tuple[Event, int, int, int]]:
    return [(e.event, e.start, e.end, e.owner) for e in events]


class Rig:
    """dmirror programs started for one test, and the daemon's admin view."""

    def __init__(self, hmmd: Program, tmp_path: Path, admin: AdminClient) -> None:
        self.hmmd, self.tmp_path, self.admin = hmmd, tmp_path, admin
        self.programs: list[Program] = []
        self.clients: list[DmirrorClient] = []
        self.names: list[str] = []

    def start(self, *kinds: str, memory_pages: int = N) -> tuple[Program, DmirrorClient, list[str]]:
        """A dmirror program serving one device per kind ("coherent" or "private")."""
        n = next(_ids)
        names = [f"co{n}_{i}" for i in range(len(kinds))]
        prog = start_dmirror(self.tmp_path, self.hmmd.address, *(f"{m}:{k}" for m, k in zip(names, kinds, strict=True)),
                             args=("--snoop", "--memory-pages", str(memory_pages)), name=f"dmirror_co{n}")
        self.programs.append(prog)
        dm = DmirrorClient(prog.address)
        self.clients.append(dm)
        self.names += names
        return prog, dm, names

    async def stats(self) -> KernelStats:
        return await self.admin.stats()

    async def dev(self, name: str) -> DeviceStats:
        return (await self.stats()).device(name)

    async def used(self, name: str) -> int:
        return (await self.dev(name)).memory_used_pages


@pytest.fixture
async def rig(hmmd: Program, cpu: ProcessClient, tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(hmmd, tmp_path, AdminClient(cpu.channel))
    yield r
    stats = await r.stats()
    for name in r.names:
        d = stats.device(name)
        assert d.violations == 0, f"{name}: {d.violations} DMA violations"
        assert d.migrations_open == 0
    for dm in r.clients:
        await dm.close()
    for prog in r.programs:
        prog.stop()


async def buffer(cpu: ProcessClient, npages: int = N, name: str = "coherent") -> tuple[Proc, int]:
    proc = await cpu.spawn(name)
    buf = await proc.mmap(npages * P)
    await proc.write(buf, pattern(npages).tobytes())
    return proc, buf


async def open_all(proc: Proc, names: list[str]) -> list[int]:
    return [(await proc.open(f"/dev/{n}"))[1] for n in names]


async def expect_errno(err: int, call: Awaitable[object]) -> None:
    with pytest.raises(KernelError) as e:
        await call
    assert e.value.errno == err, f"expected {errno.errorcode[err]}, got {e.value}"


# ==== migration to coherent memory and CPU access in place ====================================
async def test_migrate_to_coherent_then_the_cpu_reads_and_writes_in_place(rig: Rig, cpu: ProcessClient) -> None:
    _, dm, (c0, c1) = rig.start("coherent", "coherent")
    proc, buf = await buffer(cpu)
    f0, f1 = await open_all(proc, [c0, c1])
    st = await rig.stats()
    d0, d1 = st.device(c0), st.device(c1)
    for d in (d0, d1):
        assert (d.memory, d.memory_pages, d.memory_used_pages, d.alive) == ("coherent", N, 0, True)
    ram_frames = st.ram_frames
    assert (frames(await proc.pagemap(buf, N)) < ram_frames).all()

    r = await dm.command(f0, CMD_MIGRATE_TO_DEV, buf, N)
    assert r.cpages == N and (ints(r.data) == pattern()).all()  # read back through the device
    assert await rig.used(c0) == N and await rig.used(c1) == 0
    assert (await proc.status()).rss_anon == N  # device pages count in RSS; the move changed nothing
    on_device = frames(await proc.pagemap(buf, N))
    assert (on_device >= ram_frames).all() and len(set(on_device.tolist())) == N  # the coherent window
    # Device 1 heard device 0's MIGRATE (its owner); device 0 ignores its own.
    assert keys(await dm.events(f1, clear=True)) == [(Event.MIGRATE, buf, buf + N * P, d0.owner)]
    assert [e for e in await dm.events(f0, clear=True) if e.event != Event.MIGRATE] == []
    assert list((await dm.command(f0, CMD_SNAPSHOT, buf, N)).data) == [OWN_RW] * N
    assert list((await dm.command(f1, CMD_SNAPSHOT, buf, N)).data) == [REMOTE_RW] * N

    # The CPU reads and writes the device's memory where it is.
    assert (ints(await proc.read(buf, N * P)) == pattern()).all()
    await proc.write(buf + 5 * P + 8, np.int32(-1).tobytes())
    await proc.write(buf + (N - 1) * P, pattern(1, 7).tobytes())
    expect = pattern()
    expect[5 * 1024 + 2] = -1
    expect[(N - 1) * 1024 :] = pattern(1, 7)
    assert (ints(await proc.read(buf, N * P)) == expect).all()
    # No migrate_to_ram: nothing moved, nobody was invalidated (a private page's
    # trip home raises MIGRATE to every other mirror), the device still maps it all.
    assert (frames(await proc.pagemap(buf, N)) == on_device).all()
    assert await rig.used(c0) == N
    assert await dm.events(f0) == [] and await dm.events(f1) == []
    r = await dm.command(f0, CMD_READ, buf, N)
    assert (r.cpages, r.faults) == (N, 0) and (ints(r.data) == expect).all()  # the CPU's writes, no fault

    # Device 1 range-faults the pages: VALID for it, reached by DMA, nothing moves.
    r = await dm.command(f1, CMD_READ, buf, N)
    assert (r.cpages, r.faults) == (N, 1) and (ints(r.data) == expect).all()
    await dm.command(f1, CMD_WRITE, buf + 2 * P, 1, pattern(1, 9).tobytes())
    expect[2 * 1024 : 3 * 1024] = pattern(1, 9)
    assert (ints(await proc.read(buf, N * P)) == expect).all()
    assert (ints((await dm.command(f0, CMD_READ, buf, N)).data) == expect).all()
    assert (frames(await proc.pagemap(buf, N)) == on_device).all() and await rig.used(c0) == N
    assert await dm.events(f0) == [] and await dm.events(f1) == []

    await proc.exit()
    assert await rig.used(c0) == 0


async def test_device_writes_are_coherent_and_migrate_to_sys_brings_pages_home(rig: Rig, cpu: ProcessClient) -> None:
    _, dm, (c0,) = rig.start("coherent")
    proc, buf = await buffer(cpu)
    (f0,) = await open_all(proc, [c0])
    ram_frames = (await rig.stats()).ram_frames
    assert (await dm.command(f0, CMD_MIGRATE_TO_DEV, buf, N)).cpages == N
    new = pattern(c=99)
    r = await dm.command(f0, CMD_WRITE, buf, N, new.tobytes())  # DMA to its own frames
    assert (r.cpages, r.faults) == (N, 0)
    assert (ints(await proc.read(buf, N * P)) == new).all()  # the CPU sees it at once
    await proc.write(buf + 3 * P, pattern(1, 5).tobytes())
    new[3 * 1024 : 4 * 1024] = pattern(1, 5)
    r = await dm.command(f0, CMD_READ, buf, N)
    assert (r.faults == 0) and (ints(r.data) == new).all()

    await dm.events(f0, clear=True)
    r = await dm.command(f0, CMD_MIGRATE_TO_SYS, buf, N)
    assert r.cpages == N
    assert await rig.used(c0) == 0  # every source page was freed
    assert (frames(await proc.pagemap(buf, N)) < ram_frames).all()
    assert (await proc.status()).rss_anon == N
    assert list((await dm.command(f0, CMD_SNAPSHOT, buf, N)).data) == [HMM_DMIRROR_PROT_WRITE] * N
    assert (ints(await proc.read(buf, N * P)) == new).all()
    r = await dm.command(f0, CMD_READ, buf, N)
    assert (r.faults, (ints(r.data) == new).all()) == (1, True)  # its entries went with the move
    assert (await dm.command(f0, CMD_MIGRATE_TO_SYS, buf, N)).cpages == 0  # nothing left on it
    # And to the device again: the freed pages are reused.
    assert (await dm.command(f0, CMD_MIGRATE_TO_DEV, buf, N)).cpages == N
    assert (ints(await proc.read(buf, N * P)) == new).all() and await rig.used(c0) == N
    await proc.exit()


# ==== a device-private and a device-coherent device mirroring one process ========================
async def test_private_and_coherent_devices_mirror_one_process(rig: Rig, cpu: ProcessClient) -> None:
    _, dm, (pv, co) = rig.start("private", "coherent")
    proc, buf = await buffer(cpu)
    fp, fc = await open_all(proc, [pv, co])
    co_owner, pv_owner = (await rig.dev(co)).owner, (await rig.dev(pv)).owner
    ram_frames = (await rig.stats()).ram_frames
    await proc.mprotect(buf, N * P, PROT_READ)
    for f in (fp, fc):
        r = await dm.command(f, CMD_READ, buf, N)
        assert (r.cpages, r.faults) == (N, 1) and (ints(r.data) == pattern()).all()
        await dm.events(f, clear=True)

    # To the coherent device: the private device's entries go with its MIGRATE.
    assert (await dm.command(fc, CMD_MIGRATE_TO_DEV, buf, N)).cpages == N
    events = await dm.events(fp, clear=True)
    assert keys(events) == [(Event.MIGRATE, buf, buf + N * P, co_owner)]
    assert events[0].mapped_pages == N and events[0].snoop_crc32 == zlib.crc32(pattern().tobytes())
    ro = HMM_DMIRROR_PROT_READ
    assert list((await dm.command(fc, CMD_SNAPSHOT, buf, N)).data) == [HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | ro] * N
    assert list((await dm.command(fp, CMD_SNAPSHOT, buf, N)).data) == [HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | ro] * N
    # The private device reads them where they are: no migration, no event for anyone.
    r = await dm.command(fp, CMD_READ, buf, N)
    assert (r.cpages, r.faults) == (N, 1) and (ints(r.data) == pattern()).all()
    assert await rig.used(co) == N and await rig.used(pv) == 0
    assert await dm.events(fp) == [] and await dm.events(fc) == []
    on_device = frames(await proc.pagemap(buf, N))
    assert (on_device >= ram_frames).all()

    # SELECT_SYSTEM does not collect coherent pages: the private device cannot take them.
    await proc.mprotect(buf, N * P, RW)
    await dm.events(fp, clear=True)
    await dm.events(fc, clear=True)
    await expect_errno(errno.ENOENT, dm.command(fp, CMD_MIGRATE_TO_DEV, buf, N))
    assert (frames(await proc.pagemap(buf, N)) == on_device).all()
    assert await rig.used(co) == N and await rig.used(pv) == 0
    # The private device writes them by DMA, the coherent device and the CPU see it.
    new = pattern(c=5)
    r = await dm.command(fp, CMD_WRITE, buf, N, new.tobytes())
    assert r.cpages == N
    assert (ints(await proc.read(buf, N * P)) == new).all()
    assert (ints((await dm.command(fc, CMD_READ, buf, N)).data) == new).all()
    assert (frames(await proc.pagemap(buf, N)) == on_device).all()

    # Back home, then to the private device: the coherent device cannot take those.
    assert (await dm.command(fc, CMD_MIGRATE_TO_SYS, buf, N)).cpages == N
    assert await rig.used(co) == 0
    assert (await dm.command(fp, CMD_MIGRATE_TO_DEV, buf, N)).cpages == N
    assert await rig.used(pv) == N
    await dm.events(fc, clear=True)
    await expect_errno(errno.ENOENT, dm.command(fc, CMD_MIGRATE_TO_DEV, buf, N))
    assert await rig.used(pv) == N and await rig.used(co) == 0
    assert list((await dm.command(fp, CMD_SNAPSHOT, buf, 1)).data) == [
        HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE]
    assert list((await dm.command(fc, CMD_SNAPSHOT, buf, 1)).data) == [0]  # another device's private page
    # The coherent device's read faults them home through the private device.
    r = await dm.command(fc, CMD_READ, buf, N)
    assert (ints(r.data) == new).all() and await rig.used(pv) == 0
    assert {(e.event, e.owner) for e in await dm.events(fc, clear=True)} == {(Event.MIGRATE, pv_owner)}
    assert (frames(await proc.pagemap(buf, N)) < ram_frames).all()
    assert (ints(await proc.read(buf, N * P)) == new).all()
    await proc.exit()


# ==== eviction: RELEASE and close =================================================================
async def test_release_and_close_evict_coherent_pages(rig: Rig, cpu: ProcessClient) -> None:
    _, dm, (c0, c1) = rig.start("coherent", "coherent")
    proc, buf = await buffer(cpu)
    (fd0, f0), (_, f1) = [await proc.open(f"/dev/{n}") for n in (c0, c1)]
    ram_frames = (await rig.stats()).ram_frames
    crc = zlib.crc32(pattern().tobytes())
    assert (await dm.command(f0, CMD_MIGRATE_TO_DEV, buf, N)).cpages == N
    r = await dm.command(f1, CMD_READ, buf, N)  # device 1 maps device 0's pages
    assert r.faults == 1 and (ints(r.data) == pattern()).all()
    for f in (f0, f1):
        await dm.events(f, clear=True)
    # RELEASE: every page home, with CLEAR (no owner) to every mirror, the owner's too;
    # each device still mapped every page, and read the right data in its callback.
    assert (await dm.command(f0, CMD_RELEASE, buf, N)).cpages == 0
    assert await rig.used(c0) == 0
    assert (frames(await proc.pagemap(buf, N)) < ram_frames).all()
    for f in (f0, f1):
        events = await dm.events(f, clear=True)
        assert keys(events) == [(Event.CLEAR, buf, buf + N * P, 0)]
        assert events[0].mapped_pages == N and events[0].snoop_crc32 == crc
    assert list((await dm.command(f0, CMD_SNAPSHOT, buf, N)).data) == [HMM_DMIRROR_PROT_WRITE] * N
    assert (ints(await proc.read(buf, N * P)) == pattern()).all()
    # Closing a handle of the device evicts it too.
    assert (await dm.command(f0, CMD_MIGRATE_TO_DEV, buf, N)).cpages == N
    await proc.write(buf, np.int32(-3).tobytes())
    await dm.events(f1, clear=True)
    await proc.close(fd0)
    assert await rig.used(c0) == 0
    assert (frames(await proc.pagemap(buf, N)) < ram_frames).all()
    assert {(e.event, e.owner) for e in await dm.events(f1, clear=True)} == {(Event.CLEAR, 0)}
    expect = pattern()
    expect[0] = -3
    assert (ints(await proc.read(buf, N * P)) == expect).all()
    assert (ints((await dm.command(f1, CMD_READ, buf, N)).data) == expect).all()
    await proc.exit()


# ==== a coherent device killed with SIGKILL =========================================================
async def test_sigkill_of_a_coherent_device_loses_nothing(rig: Rig, cpu: ProcessClient) -> None:
    coh_prog, coh_dm, (co,) = rig.start("coherent")
    _, pv_dm, (pv,) = rig.start("private")
    proc, buf = await buffer(cpu, 2 * N)
    data = pattern(2 * N)
    (fc,) = await open_all(proc, [co])
    (fp,) = await open_all(proc, [pv])
    ram_frames = (await rig.stats()).ram_frames
    assert (await coh_dm.command(fc, CMD_MIGRATE_TO_DEV, buf, N)).cpages == N
    assert (await pv_dm.command(fp, CMD_MIGRATE_TO_DEV, buf + N * P, N)).cpages == N
    r = await pv_dm.command(fp, CMD_READ, buf, N)  # the private device maps the coherent pages too
    assert (r.faults, (ints(r.data) == data[: N * 1024]).all()) == (1, True)
    await proc.write(buf + 7 * P, pattern(1, 3).tobytes())  # in place, on the coherent device
    data[7 * 1024 : 8 * 1024] = pattern(1, 3)
    await pv_dm.events(fp, clear=True)
    assert (frames(await proc.pagemap(buf, N)) >= ram_frames).all()

    coh_prog.signal(signal.SIGKILL)
    coh_prog.proc.wait(WAIT_S)

    async def moved_home() -> bool:
        d = await rig.dev(co)
        return not d.alive and d.memory_used_pages == 0

    await eventually(moved_home, "the daemon to move the dead device's pages home")
    # The CPU still has every byte, now in system RAM, and the private device's pages are untouched.
    assert (ints(await proc.read(buf, N * P)) == data[: N * 1024]).all()
    assert (frames(await proc.pagemap(buf, N)) < ram_frames).all()
    events = await pv_dm.events(fp, clear=True)
    assert keys(events) == [(Event.CLEAR, buf, buf + N * P, 0)]  # the core's eviction, no owner
    assert events[0].mapped_pages == N and events[0].snoop_crc32 == zlib.crc32(data[: N * 1024].tobytes())
    d = await rig.dev(pv)
    assert d.alive and d.memory_used_pages == N and d.violations == 0
    assert list((await pv_dm.command(fp, CMD_SNAPSHOT, buf + N * P, N)).data) == [
        HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE] * N
    r = await pv_dm.command(fp, CMD_READ, buf, 2 * N)
    assert r.faults == 1 and (ints(r.data) == data).all()
    assert (ints(await proc.read(buf, 2 * N * P)) == data).all()  # the private half comes home through it
    assert await rig.used(pv) == 0
    # The dead device's window segment is free: a new coherent device gets pages there.
    _, dm2, (co2,) = rig.start("coherent")
    (f2,) = await open_all(proc, [co2])
    assert (await dm2.command(f2, CMD_MIGRATE_TO_DEV, buf, N)).cpages == N
    assert (ints(await proc.read(buf, 2 * N * P)) == data).all()
    await proc.exit()
    assert await rig.used(co2) == 0


# ==== page_free, fork, pins ==========================================================================
async def test_munmap_and_exit_free_coherent_pages_back_to_the_device(rig: Rig, cpu: ProcessClient) -> None:
    _, dm, (c0,) = rig.start("coherent", memory_pages=N)  # exactly one buffer's worth
    proc, buf = await buffer(cpu)
    (f0,) = await open_all(proc, [c0])
    assert (await dm.command(f0, CMD_MIGRATE_TO_DEV, buf, N)).cpages == N
    other = await proc.mmap(N * P)
    await proc.write(other, pattern(c=1).tobytes())
    await expect_errno(errno.ENOMEM, dm.command(f0, CMD_MIGRATE_TO_DEV, other, 1))  # the device is full
    await proc.munmap(buf, N // 4 * P)
    assert await rig.used(c0) == N - N // 4
    assert (await proc.status()).rss_anon == 2 * N - N // 4
    await proc.munmap(buf + N // 4 * P, N * P - N // 4 * P)
    assert await rig.used(c0) == 0 and (await proc.status()).rss_anon == N

    # page_free reached the device: all of its memory can be used again (page_free
    # is a one-way message, so give it the time to arrive).
    async def whole_device_again() -> bool:
        try:
            return (await dm.command(f0, CMD_MIGRATE_TO_DEV, other, N)).cpages == N
        except KernelError as e:
            assert e.errno == errno.ENOMEM
            return False

    await eventually(whole_device_again, "page_free to give the device its pages back")
    assert (ints(await proc.read(other, N * P)) == pattern(c=1)).all() and await rig.used(c0) == N
    await proc.exit()
    assert await rig.used(c0) == 0


async def test_fork_shares_coherent_pages_and_cow_copies_them(rig: Rig, cpu: ProcessClient) -> None:
    _, dm, (c0,) = rig.start("coherent")
    proc, buf = await buffer(cpu)
    (f0,) = await open_all(proc, [c0])
    ram_frames = (await rig.stats()).ram_frames
    assert (await dm.command(f0, CMD_MIGRATE_TO_DEV, buf, N)).cpages == N
    on_device = frames(await proc.pagemap(buf, N))
    await dm.events(f0, clear=True)
    child = await proc.fork()
    assert keys(await dm.events(f0, clear=True)) == [(Event.PROTECTION_PAGE, buf, buf + N * P, 0)]
    assert (frames(await child.pagemap(buf, N)) == on_device).all()
    assert (ints(await child.read(buf, N * P)) == pattern()).all()
    ro = HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_READ
    assert list((await dm.command(f0, CMD_SNAPSHOT, buf, N)).data) == [ro] * N  # shared: read-only
    # The parent's write copies page 0 straight from device memory into RAM.
    await proc.write(buf, np.int32(-7).tobytes())
    assert keys(await dm.events(f0, clear=True)) == [(Event.CLEAR, buf, buf + P, 0)]
    after = frames(await proc.pagemap(buf, N))
    assert after[0] < ram_frames and (after[1:] == on_device[1:]).all()
    assert ints(await proc.read(buf, 4))[0] == -7
    assert (ints(await child.read(buf, N * P)) == pattern()).all()  # the child keeps the coherent page
    assert (frames(await child.pagemap(buf, N)) == on_device).all()
    assert list((await dm.command(f0, CMD_SNAPSHOT, buf, 2)).data) == [HMM_DMIRROR_PROT_WRITE, ro]
    assert await rig.used(c0) == N
    # The child's pages go at its exit; page 0 was the child's alone.
    await child.exit()
    assert await rig.used(c0) == N - 1
    expect = pattern()
    expect[0] = -7
    assert (ints(await proc.read(buf, N * P)) == expect).all()
    await proc.write(buf + P, np.int32(-8).tobytes())  # the parent's only mapping now: written in place
    assert frames(await proc.pagemap(buf + P, 1))[0] == on_device[1]
    await proc.exit()
    assert await rig.used(c0) == 0


async def test_pins_and_collapse_of_coherent_pages(rig: Rig, cpu: ProcessClient) -> None:
    _, dm, (c0,) = rig.start("coherent")
    proc = await cpu.spawn("pins")
    span = await proc.mmap(2 * PMD_SIZE)
    buf = (span + PMD_SIZE - 1) & ~(PMD_SIZE - 1)  # a 2 MiB-aligned window
    await proc.write(buf, pattern(8).tobytes())
    (f0,) = await open_all(proc, [c0])
    ram_frames = (await rig.stats()).ram_frames
    assert (await dm.command(f0, CMD_MIGRATE_TO_DEV, buf, 4)).cpages == 4
    on_device = frames(await proc.pagemap(buf, 4))
    await expect_errno(errno.EINVAL, proc.madvise(span, 2 * PMD_SIZE, MADV_COLLAPSE))  # device memory in the span
    await dm.events(f0, clear=True)

    # Short-term pins leave coherent pages on the device.
    await proc.pin_user_pages(buf, 1)
    held = await proc.pin_user_pages(buf + P, 1, hold=True)
    assert (frames(await proc.pagemap(buf, 4)) == on_device).all() and await rig.used(c0) == 4
    assert await dm.events(f0) == []
    # A long-term pin moves the page to RAM first: CLEAR (no owner) to every mirror.
    await proc.pin_user_pages(buf + 2 * P, 1, longterm=True)
    assert keys(await dm.events(f0, clear=True)) == [(Event.CLEAR, buf + 2 * P, buf + 3 * P, 0)]
    now = frames(await proc.pagemap(buf, 4))
    assert now[2] < ram_frames and (now[[0, 1, 3]] == on_device[[0, 1, 3]]).all()
    assert await rig.used(c0) == 3
    # ... unless someone else holds the page: EBUSY, nothing moves.
    await expect_errno(errno.EBUSY, proc.pin_user_pages(buf + P, 1, longterm=True, hold=True))
    assert frames(await proc.pagemap(buf + P, 1))[0] == on_device[1] and await rig.used(c0) == 3
    assert await dm.events(f0) == []
    await proc.unpin_user_pages(held)
    await proc.pin_user_pages(buf + P, 1, longterm=True)
    assert frames(await proc.pagemap(buf + P, 1))[0] < ram_frames and await rig.used(c0) == 2
    assert (ints(await proc.read(buf, 8 * P)) == pattern(8)).all()
    # Home again, the span collapses.
    assert (await dm.command(f0, CMD_MIGRATE_TO_SYS, buf, 4)).cpages == 2
    await proc.madvise(buf, PMD_SIZE, MADV_COLLAPSE)  # (a whole span with nothing mapped would be EINVAL)
    assert (ints(await proc.read(buf, 8 * P)) == pattern(8)).all() and await rig.used(c0) == 0
    await proc.exit()


# ==== failures, each with its exact errno ===========================================================
async def test_coherent_failure_paths(rig: Rig, cpu: ProcessClient, hmmd: Program) -> None:
    _, dm, (c0, pv) = rig.start("coherent", "private", memory_pages=N)
    proc, buf = await buffer(cpu, 2 * N)
    data = pattern(2 * N)
    fc, fp = await open_all(proc, [c0, pv])

    # More pages than the device has: ENOMEM, nothing moves.
    await expect_errno(errno.ENOMEM, dm.command(fc, CMD_MIGRATE_TO_DEV, buf, 2 * N))
    assert await rig.used(c0) == 0 and (ints(await proc.read(buf, 2 * N * P)) == data).all()
    # No mapping, or no read permission: EINVAL.
    hole = await proc.mmap(3 * P, PROT_NONE)
    await expect_errno(errno.EINVAL, dm.command(fc, CMD_MIGRATE_TO_DEV, hole, 3))
    await proc.munmap(hole + P, P)
    await expect_errno(errno.EINVAL, dm.command(fc, CMD_MIGRATE_TO_DEV, hole + 2 * P, 2))
    # Shared memory does not move to a device: nothing collected, ENOENT.
    shm = await proc.mmap(2 * P, RW, MAP_SHARED | MAP_ANONYMOUS)
    await proc.write(shm, pattern(2, 3).tobytes())
    await expect_errno(errno.ENOENT, dm.command(fc, CMD_MIGRATE_TO_DEV, shm, 2))
    assert (ints(await proc.read(shm, 2 * P)) == pattern(2, 3)).all() and await rig.used(c0) == 0
    # Another device's private pages are not SELECT_SYSTEM's: ENOENT.
    assert (await dm.command(fp, CMD_MIGRATE_TO_DEV, buf + N * P, 2)).cpages == 2
    await expect_errno(errno.ENOENT, dm.command(fc, CMD_MIGRATE_TO_DEV, buf + N * P, 2))
    assert await rig.used(pv) == 2 and await rig.used(c0) == 0

    # FAIL_ALLOC: the first page's allocation fails, it stays in RAM: ENOENT at read-back.
    await dm.command(fc, CMD_FLAGS, buf, FLAG_FAIL_ALLOC)
    await expect_errno(errno.ENOENT, dm.command(fc, CMD_MIGRATE_TO_DEV, buf, N))
    assert await rig.used(c0) == N - 1
    assert list((await dm.command(fc, CMD_SNAPSHOT, buf, 2)).data) == [HMM_DMIRROR_PROT_WRITE, OWN_RW]
    # FAIL_ALLOC on the way home: ENOMEM, nothing moves.
    await dm.command(fc, CMD_FLAGS, buf, FLAG_FAIL_ALLOC)
    await expect_errno(errno.ENOMEM, dm.command(fc, CMD_MIGRATE_TO_SYS, buf, N))
    assert await rig.used(c0) == N - 1
    assert (ints(await proc.read(buf, 2 * N * P)) == data).all()
    assert (await dm.command(fc, CMD_MIGRATE_TO_SYS, buf, N)).cpages == N - 1
    assert await rig.used(c0) == 0 and (ints(await proc.read(buf, 2 * N * P)) == data).all()

    # At hello: coherent memory that does not fit the window (ENOMEM), a kind without a size (EINVAL).
    name = f"co_hello{next(_ids)}"
    await expect_errno(errno.ENOMEM, Dmirror(name, "coherent", memory_pages=1 << 30).connect(hmmd.address))
    await expect_errno(errno.EINVAL, Dmirror(name, "coherent", memory_pages=0).connect(hmmd.address))
    assert all(d.name != name for d in (await rig.stats()).devices)
    await proc.exit()
