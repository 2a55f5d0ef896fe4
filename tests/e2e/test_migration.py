"""Device-private memory across processes: pages migrate to a device and back,
the CPU touching a migrated page pulls it home through its owner, another device
pulls it home the same way, and a device that dies mid-migration or mid-fault
takes no data with it that was not only on it.

Data patterns are checked after every move, and the daemon's counters (RSS,
device memory in use, open migrations, violations) after every step.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from hmm.abi import MAP_ANONYMOUS, MAP_SHARED, PAGE_SIZE, PROT_NONE, PROT_READ, PROT_WRITE, Event
from hmm.admin import AdminClient
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import (
    CMD_FLAGS,
    CMD_MIGRATE_TO_DEV,
    CMD_MIGRATE_TO_SYS,
    CMD_READ,
    CMD_RELEASE,
    CMD_SNAPSHOT,
    CMD_WRITE,
    FLAG_FAIL_ALLOC,
)
from hmm.errors import KernelError
from hmm.process import Proc, ProcessClient
from tests.procs import Program, start, start_dmirror, start_node_dmirror

N = 64


def pattern(npages: int = N, c: int = 0) -> np.ndarray:
    return np.arange(npages * PAGE_SIZE // 4, dtype=np.int32) + c


def ints(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.int32)


class Pair:
    """A process with a written buffer, opened by two devices of one dmirror program."""

    def __init__(self, proc: Proc, dm: DmirrorClient, files: list[int], names: list[str], buf: int,
                 admin: AdminClient) -> None:
        self.proc, self.dm, self.files, self.names, self.buf, self.admin = proc, dm, files, names, buf, admin

    async def cmd(self, i: int, cmd: int, npages: int = N, addr: int | None = None, data: bytes = b""):
        return await self.dm.command(self.files[i], cmd, self.buf if addr is None else addr, npages, data)

    async def used(self, i: int) -> int:
        return (await self.admin.stats()).device(self.names[i]).memory_used_pages

    async def cpu(self, npages: int = N, addr: int | None = None) -> np.ndarray:
        return ints(await self.proc.read(self.buf if addr is None else addr, npages * PAGE_SIZE))


@pytest.fixture
async def pair(cpu: ProcessClient, dmirror_factory) -> Pair:
    prog, names = dmirror_factory(2)
    dm = DmirrorClient(prog.address)
    proc = await cpu.spawn("migrating")
    buf = await proc.mmap(N * PAGE_SIZE)
    await proc.write(buf, pattern().tobytes())
    files = [(await proc.open(f"/dev/{n}"))[1] for n in names]
    p = Pair(proc, dm, files, names, buf, AdminClient(cpu.channel))
    yield p
    stats = await p.admin.stats()
    for n in names:
        assert stats.device(n).violations == 0
        assert stats.device(n).migrations_open == 0
    await dm.close()


@pytest.mark.parametrize("implementation", ["python", "node"])
async def test_a_dmirror_program_stopped_by_sigterm_sends_its_pages_home_first(
        cpu: ProcessClient, hmmd: Program, tmp_path: Path, implementation: str) -> None:
    """A supervisor stopping the device's container (SIGTERM) must not cost the process
    its memory: hmm-dmirror (either) evicts what it holds before it leaves, as the
    kernel's driver does when its device goes. The pages used to be lost (SIGBUS)."""
    names = [f"stop_{implementation}"]
    start_device = start_dmirror if implementation == "python" else start_node_dmirror
    prog = start_device(tmp_path, hmmd.address, *names, name=f"dmirror-{implementation}")
    dm = DmirrorClient(prog.address)
    proc = await cpu.spawn("stopping")
    buf = await proc.mmap(N * PAGE_SIZE)
    await proc.write(buf, pattern(c=5).tobytes())
    _, fid = await proc.open(f"/dev/{names[0]}")
    assert (await dm.command(fid, CMD_MIGRATE_TO_DEV, buf, N)).cpages == N
    await dm.close()
    assert prog.stop() == 0
    assert "pages evicted" in prog.log_text()
    assert (ints(await proc.read(buf, N * PAGE_SIZE)) == pattern(c=5)).all()


async def test_migrate_to_device_and_cpu_faults_pages_home(pair: Pair) -> None:
    r = await pair.cmd(0, CMD_MIGRATE_TO_DEV)
    assert r.cpages == N and (ints(r.data) == pattern()).all()
    assert await pair.used(0) == N
    assert (await pair.proc.status()).rss_anon == N  # device pages count in RSS
    snap = await pair.cmd(0, CMD_SNAPSHOT, 2)
    assert list(snap.data) == [0x22, 0x22]  # own device-private, writable
    snap = await pair.cmd(1, CMD_SNAPSHOT, 2)
    assert list(snap.data) == [0x00, 0x00]  # another device's private page is not valid here
    # The CPU reads the first half: each page comes home through device 0.
    assert (await pair.cpu(N // 2) == pattern()[: N // 2 * 1024]).all()
    assert await pair.used(0) == N // 2  # page_free reached the device for each
    # The daemon timed each of those faults, from the fault to the page mapped home.
    lat = (await pair.admin.stats()).device(pair.names[0]).migrate_to_ram_latency
    assert lat.count == N // 2 and 0 < lat.p50_us <= lat.p99_us <= lat.max_us
    snap = await pair.cmd(0, CMD_SNAPSHOT, N)
    assert list(snap.data) == [0x02] * (N // 2) + [0x22] * (N // 2)
    # Migrating again collects only the system pages; the rest keep their entries.
    r = await pair.cmd(0, CMD_MIGRATE_TO_DEV)
    assert r.cpages == N and (ints(r.data) == pattern()).all()
    assert await pair.used(0) == N
    assert (await pair.proc.status()).rss_anon == N


async def test_cpu_write_to_a_device_page_migrates_it_first(pair: Pair) -> None:
    await pair.cmd(0, CMD_MIGRATE_TO_DEV)
    await pair.proc.write(pair.buf + 5 * PAGE_SIZE + 8, b"\xff\xff\xff\xff")
    expect = pattern()
    expect[5 * 1024 + 2] = -1
    assert (await pair.cpu() == expect).all()
    assert await pair.used(0) == 0  # reading everything brought the rest home too


async def test_migrate_to_sys_brings_everything_back(pair: Pair) -> None:
    await pair.cmd(0, CMD_MIGRATE_TO_DEV)
    r = await pair.cmd(0, CMD_MIGRATE_TO_SYS)
    assert r.cpages == N
    assert await pair.used(0) == 0
    assert list((await pair.cmd(0, CMD_SNAPSHOT, 1)).data) == [0x02]
    assert (await pair.cpu() == pattern()).all()


async def test_device_write_then_migrate_keeps_the_data(pair: Pair) -> None:
    await pair.cmd(0, CMD_MIGRATE_TO_DEV)
    new = pattern(c=99)
    r = await pair.cmd(0, CMD_WRITE, data=new.tobytes())  # writes the device's own memory
    assert r.cpages == N and r.faults == 0
    assert (ints((await pair.cmd(0, CMD_READ)).data) == new).all()
    await pair.cmd(0, CMD_MIGRATE_TO_SYS)
    assert (await pair.cpu() == new).all()


async def test_double_map_other_device_pulls_pages_home(pair: Pair) -> None:
    await pair.proc.mprotect(pair.buf, N * PAGE_SIZE, PROT_READ)
    for i in range(2):
        r = await pair.cmd(i, CMD_READ)
        assert (r.cpages, r.faults) == (N, 1) and (ints(r.data) == pattern()).all()
    r = await pair.cmd(1, CMD_MIGRATE_TO_DEV)  # a read-only mapping migrates fine
    assert r.cpages == N
    # Device 0's entries were erased by device 1's MIGRATE event; its range fault
    # meets device 1's pages, not valid for it, and they migrate home.
    events = await pair.dm.events(pair.files[0], clear=True)
    assert any(e.event == Event.MIGRATE and e.owner != 0 for e in events)
    r = await pair.cmd(0, CMD_READ)
    assert (r.cpages, r.faults) == (N, 1) and (ints(r.data) == pattern()).all()
    assert await pair.used(1) == 0


async def test_shared_memory_does_not_migrate(cpu: ProcessClient, dmirror_factory) -> None:
    prog, (name,) = dmirror_factory(1)
    dm = DmirrorClient(prog.address)
    proc = await cpu.spawn("shm")
    buf = await proc.mmap(N * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS)
    await proc.write(buf, pattern().tobytes())
    _, fid = await proc.open(f"/dev/{name}")
    with pytest.raises(KernelError) as e:
        await dm.command(fid, CMD_MIGRATE_TO_DEV, buf, N)
    assert e.value.errno == errno.ENOENT
    assert (ints(await proc.read(buf, N * PAGE_SIZE)) == pattern()).all()
    await dm.close()


async def test_migrate_mixed_protections(pair: Pair) -> None:
    """The kernel's migrate_mixed: no read permission or no mapping -> EINVAL;
    zero page, read-only and one-page mappings all move."""
    buf = await pair.proc.mmap(6 * PAGE_SIZE, PROT_NONE)
    with pytest.raises(KernelError) as e:
        await pair.cmd(1, CMD_MIGRATE_TO_DEV, 6, buf)
    assert e.value.errno == errno.EINVAL
    await pair.proc.munmap(buf + PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(KernelError) as e:
        await pair.cmd(1, CMD_MIGRATE_TO_DEV, 3, buf)
    assert e.value.errno == errno.EINVAL
    p = [buf + i * PAGE_SIZE for i in range(6)]
    await pair.proc.mprotect(p[2], PAGE_SIZE, PROT_READ)
    assert ints(await pair.proc.read(p[2], 4))[0] + 3 == 3
    await pair.proc.mprotect(p[3], PAGE_SIZE, PROT_READ | PROT_WRITE)
    await pair.proc.write(p[3], np.int32(3).tobytes())
    await pair.proc.mprotect(p[3], PAGE_SIZE, PROT_READ)
    await pair.proc.mprotect(p[4], 2 * PAGE_SIZE, PROT_READ | PROT_WRITE)
    await pair.proc.write(p[4], np.int32(3).tobytes())
    await pair.proc.write(p[5], np.int32(3).tobytes())
    r = await pair.cmd(1, CMD_MIGRATE_TO_DEV, 4, p[2])
    assert r.cpages == 4
    with pytest.raises(KernelError) as e:
        await pair.cmd(0, CMD_MIGRATE_TO_DEV, 1, p[5])  # on device 1: not collected, no entry
    assert e.value.errno == errno.ENOENT
    assert [int(ints(await pair.proc.read(a, 4))[0]) for a in p[2:]] == [0, 3, 3, 3]


async def test_migrate_to_dev_moves_earlier_pieces_before_a_hole(pair: Pair) -> None:
    """The driver walks the range piece by piece (512 pages, never across a mapping's
    end): a hole after the first piece fails the command with EINVAL, but the pieces
    before it have migrated (HMM-SELFTESTS.md 1.6 MIGRATE_TO_DEV step 2)."""
    proc = pair.proc
    span = await proc.mmap(600 * PAGE_SIZE)
    await proc.write(span, np.arange(600 * 1024, dtype=np.int32).tobytes())
    await proc.munmap(span + 520 * PAGE_SIZE, 80 * PAGE_SIZE)  # pieces: [0, 512), [512, 520), then a hole
    with pytest.raises(KernelError) as e:
        await pair.dm.command(pair.files[0], CMD_MIGRATE_TO_DEV, span, 600)
    assert e.value.errno == errno.EINVAL
    snap = (await pair.dm.command(pair.files[0], CMD_SNAPSHOT, span, 520)).data
    assert set(snap) == {0x22}  # every page before the hole is on the device
    assert await pair.used(0) == 520
    assert (ints(await proc.read(span, 520 * PAGE_SIZE)) == np.arange(520 * 1024)).all()


async def test_munmap_and_exit_free_device_pages(pair: Pair) -> None:
    await pair.cmd(0, CMD_MIGRATE_TO_DEV)
    await pair.proc.munmap(pair.buf, N // 4 * PAGE_SIZE)
    assert await pair.used(0) == N - N // 4
    assert (await pair.proc.status()).rss_anon == N - N // 4
    await pair.proc.exit()
    assert await pair.used(0) == 0


async def test_fail_alloc_makes_the_cpu_access_fail_once(pair: Pair) -> None:
    await pair.cmd(0, CMD_MIGRATE_TO_DEV)
    await pair.cmd(0, CMD_FLAGS, FLAG_FAIL_ALLOC)
    with pytest.raises(KernelError) as e:
        await pair.proc.read(pair.buf, 4)
    assert e.value.errno == errno.EFAULT  # the fault handler got SIGBUS
    assert await pair.used(0) == N  # the page stayed on the device
    assert (await pair.admin.stats()).device(pair.names[0]).migrate_to_ram_latency.count == 0  # failures: not timed
    assert (await pair.cpu() == pattern()).all()  # the flag cleared: it works now
    assert (await pair.admin.stats()).device(pair.names[0]).migrate_to_ram_latency.count == N


async def test_migrate_to_sys_enomem_with_fail_alloc_moves_nothing(pair: Pair) -> None:
    await pair.cmd(0, CMD_MIGRATE_TO_DEV)
    await pair.cmd(0, CMD_FLAGS, FLAG_FAIL_ALLOC)
    with pytest.raises(KernelError) as e:
        await pair.cmd(0, CMD_MIGRATE_TO_SYS)
    assert e.value.errno == errno.ENOMEM
    assert await pair.used(0) == N
    assert (ints((await pair.cmd(0, CMD_READ)).data) == pattern()).all()


# ---- a device killed at a protocol step ----------------------------------------------------


async def stuck_device(hmmd: Program, tmp_path, mode: str, addr: int, npages: int) -> Program:
    name = f"stuck_{mode}_{addr:x}"
    return start(name, [sys.executable, "-m", "tests.e2e.stuck_device", hmmd.address, name, mode, hex(addr),
                        str(npages)], tmp_path)


async def test_kill_between_setup_and_finalize_rolls_back(hmmd: Program, cpu: ProcessClient, tmp_path) -> None:
    admin = AdminClient(cpu.channel)
    proc = await cpu.spawn("victim")
    buf = await proc.mmap(N * PAGE_SIZE)
    await proc.write(buf, pattern().tobytes())
    used_before = (await admin.stats()).ram_used_frames
    dev = await stuck_device(hmmd, tmp_path, "setup", buf, N)
    name = dev.name
    try:
        await proc.open(f"/dev/{name}")
        dev.wait_line("setup done")
        # The migration holds the mmap lock: a munmap waits for it.
        munmap = asyncio.ensure_future(proc.munmap(buf + (N - 1) * PAGE_SIZE, PAGE_SIZE))
        await asyncio.sleep(0.2)
        assert not munmap.done()
        assert (await admin.stats()).device(name).migrations_open == 1
        dev.signal(signal.SIGKILL)
        await asyncio.wait_for(munmap, 5)  # the rollback released the lock
    finally:
        dev.stop()
    st = (await admin.stats()).device(name)
    assert not st.alive and st.migrations_open == 0 and st.memory_used_pages == 0
    assert (ints(await proc.read(buf, (N - 1) * PAGE_SIZE)) == pattern(N - 1)).all()
    assert (await admin.stats()).ram_used_frames == used_before - 1
    await proc.exit()


async def test_kill_during_migrate_to_ram(hmmd: Program, cpu: ProcessClient, tmp_path) -> None:
    """The CPU access waiting on a dead device fails with EFAULT at once, and so does
    every later access to pages that lived only on it; other pages are untouched."""
    admin = AdminClient(cpu.channel)
    proc = await cpu.spawn("victim")
    buf = await proc.mmap((N + 1) * PAGE_SIZE)
    await proc.write(buf, pattern(N + 1).tobytes())
    dev = await stuck_device(hmmd, tmp_path, "fault", buf, N)
    try:
        await proc.open(f"/dev/{dev.name}")
        dev.wait_line("migrated")
        assert (await admin.stats()).device(dev.name).memory_used_pages == N
        read = asyncio.ensure_future(proc.read(buf, 4))
        await asyncio.to_thread(dev.wait_line, "in migrate_to_ram")
        dev.signal(signal.SIGKILL)
        with pytest.raises(KernelError) as e:
            await asyncio.wait_for(read, 5)
        assert e.value.errno == errno.EFAULT
    finally:
        dev.stop()
    with pytest.raises(KernelError) as e:
        await proc.read(buf + 3 * PAGE_SIZE, 4)
    assert e.value.errno == errno.EFAULT
    last = ints(await proc.read(buf + N * PAGE_SIZE, PAGE_SIZE))
    assert (last == pattern(N + 1)[N * 1024 :]).all()
    await proc.munmap(buf, N * PAGE_SIZE)  # dropping lost pages works
    await proc.exit()


# ---- eviction ------------------------------------------------------------------------


async def test_release_evicts_with_clear_to_every_mirror(pair: Pair) -> None:
    """The kernel's migrate_release: RELEASE moves every page home, with CLEAR (no
    owner) to every mirror, the owner's included; the data survives."""
    await pair.cmd(0, CMD_READ)
    await pair.cmd(1, CMD_READ)
    await pair.cmd(0, CMD_MIGRATE_TO_DEV)
    for i in range(2):
        await pair.dm.events(pair.files[i], clear=True)
    assert (await pair.cmd(0, CMD_RELEASE, N)).cpages == 0
    assert await pair.used(0) == 0
    for i in range(2):
        events = await pair.dm.events(pair.files[i], clear=True)
        assert {(e.event, e.owner) for e in events} == {(Event.CLEAR, 0)}
    assert list((await pair.cmd(0, CMD_SNAPSHOT, 1)).data) == [0x02]
    assert (await pair.cpu(N // 2) == pattern()[: N // 2 * 1024]).all()


async def test_eviction_keeps_forked_pages_shared_and_copy_on_write(pair: Pair) -> None:
    await pair.cmd(0, CMD_MIGRATE_TO_DEV)
    child = await pair.proc.fork()  # both map the device pages, read-only
    await pair.cmd(0, CMD_RELEASE, N)
    assert await pair.used(0) == 0
    assert (await pair.cpu() == pattern()).all()
    assert (ints(await child.read(pair.buf, N * PAGE_SIZE)) == pattern()).all()
    await child.write(pair.buf, np.int32(-5).tobytes())
    assert ints(await pair.proc.read(pair.buf, 4))[0] == 0
    assert ints(await child.read(pair.buf, 4))[0] == -5
    await child.exit()


@pytest.mark.parametrize("lang", ["python", "node"])
async def test_release_evicts_in_ranges_below_a_small_message_limit(hmmd: Program, cpu: ProcessClient, tmp_path,
                                                                     lang: str) -> None:
    """A device that negotiated a small message limit evicts its memory in ranges of
    device PFNs whose EvictSetup replies fit that limit (more of its pages are in use
    than one reply could list); every page comes home, data intact."""
    from tests.procs import start_dmirror, start_node_dmirror

    # The Node.js SDK keeps 64 KiB of each message for framing: its limit must be larger.
    limit = 16384 if lang == "python" else 81920
    n, name = 2000, f"small_{lang}"  # 2000 x 9 bytes > 16384: the daemon refuses one reply
    prog = (start_node_dmirror if lang == "node" else start_dmirror)(
        tmp_path, hmmd.address, name, args=("--max-message-bytes", str(limit), "--memory-pages", "4096"))
    admin = AdminClient(cpu.channel)
    try:
        dm = DmirrorClient(prog.address)
        proc = await cpu.spawn("small")
        buf = await proc.mmap(n * PAGE_SIZE)
        await proc.write(buf, pattern(n).tobytes())
        fid = (await proc.open(f"/dev/{name}"))[1]
        assert (await dm.command(fid, CMD_MIGRATE_TO_DEV, buf, n)).cpages == n
        assert (await admin.stats()).device(name).memory_used_pages == n
        assert (await dm.command(fid, CMD_RELEASE, buf, n)).cpages == 0
        stats = (await admin.stats()).device(name)
        assert (stats.memory_used_pages, stats.migrations_open, stats.violations) == (0, 0, 0)
        assert (ints(await proc.read(buf, n * PAGE_SIZE)) == pattern(n)).all()
        await dm.close()
    finally:
        prog.stop()


async def test_page_free_of_more_pages_than_one_message_holds(hmmd: Program, cpu: ProcessClient, tmp_path) -> None:
    """Unmapping more device pages than one PageFree of the negotiated message limit
    can list (4096 x 8 bytes > 16384) frees them in several messages: the device
    stays connected and gets every page back (it can migrate as many again)."""
    from tests.procs import start_dmirror

    n, name = 4096, "pagefree_small"
    prog = start_dmirror(tmp_path, hmmd.address, name,
                         args=("--max-message-bytes", "16384", "--memory-pages", str(n)))
    admin = AdminClient(cpu.channel)
    try:
        dm = DmirrorClient(prog.address)
        proc = await cpu.spawn("pagefree")
        fid = (await proc.open(f"/dev/{name}"))[1]
        for c in (1, 2):  # the second round needs every page the first one freed
            buf = await proc.mmap(n * PAGE_SIZE)
            await proc.write(buf, pattern(n, c).tobytes())
            assert (await dm.command(fid, CMD_MIGRATE_TO_DEV, buf, n)).cpages == n
            assert (await admin.stats()).device(name).memory_used_pages == n
            await proc.munmap(buf, n * PAGE_SIZE)
            stats = (await admin.stats()).device(name)
            assert (stats.alive, stats.memory_used_pages, stats.violations) == (True, 0, 0)
        await dm.close()
    finally:
        prog.stop()


async def test_closing_a_handle_evicts_the_device(pair: Pair) -> None:
    await pair.cmd(0, CMD_MIGRATE_TO_DEV)
    assert await pair.used(0) == N
    fd = 3  # the first file the process opened: device 0
    await pair.proc.close(fd)
    assert await pair.used(0) == 0
    assert (await pair.cpu() == pattern()).all()


# ---- fork with device pages ---------------------------------------------------------------


async def test_anon_write_child_after_migrate(pair: Pair) -> None:
    """The kernel's anon_write_child with migration: the child reads its (device)
    pages home through the device, opens the device itself, writes through it
    (breaking COW); the parent keeps its data."""
    assert (await pair.cmd(0, CMD_MIGRATE_TO_DEV)).cpages == N
    child = await pair.proc.fork()
    assert (ints(await child.read(pair.buf, N * PAGE_SIZE)) == pattern()).all()
    _, child_fid = await child.open(f"/dev/{pair.names[0]}")
    r = await pair.dm.command(child_fid, CMD_WRITE, pair.buf, N, (-pattern()).tobytes())
    assert (r.cpages, r.faults) == (N, 1)
    assert (ints(await child.read(pair.buf, N * PAGE_SIZE)) == -pattern()).all()
    await child.exit()
    assert (await pair.cpu() == pattern()).all()


async def test_cow_in_device(pair: Pair) -> None:
    """The kernel's hmm_cow_in_device: after fork the parent writes every page;
    each write brings the shared device page home, then copies it."""
    await pair.cmd(0, CMD_MIGRATE_TO_DEV)
    child = await pair.proc.fork()
    await pair.proc.write(pair.buf, pattern().tobytes())
    snap = await pair.cmd(0, CMD_SNAPSHOT, N)
    assert list(snap.data) == [0x02] * N  # the parent's own writable system pages
    assert (ints(await child.read(pair.buf, N * PAGE_SIZE)) == pattern()).all()
    await child.exit()
    assert await pair.used(0) == 0


# ---- GUP pins and pagemap --------------------------------------------------------------------

PM_PRESENT, PM_SWAP, PM_EXCLUSIVE = 1 << 63, 1 << 62, 1 << 56


async def test_gup_faults_device_pages_home(pair: Pair) -> None:
    """The kernel's hmm_gup_test (private variant): GUP with write intent, plain and
    long-term, brings device-private pages home; the data is intact."""
    await pair.cmd(0, CMD_MIGRATE_TO_DEV, 4)
    pm = await pair.proc.pagemap(pair.buf, 4)
    assert all(e & PM_SWAP and not e & PM_PRESENT for e in pm.tolist())  # device entries look swapped
    await pair.proc.pin_user_pages(pair.buf, 1)
    await pair.proc.pin_user_pages(pair.buf + PAGE_SIZE, 1)
    await pair.proc.pin_user_pages(pair.buf + 2 * PAGE_SIZE, 1, longterm=True)
    await pair.proc.pin_user_pages(pair.buf + 3 * PAGE_SIZE, 1, longterm=True)
    snap = await pair.cmd(0, CMD_SNAPSHOT, 4)
    assert list(snap.data) == [0x02] * 4
    pm = await pair.proc.pagemap(pair.buf, 4)
    assert all(e & PM_PRESENT and e & PM_EXCLUSIVE and not e & PM_SWAP for e in pm.tolist())
    assert (await pair.cpu(4) == pattern()[: 4 * 1024]).all()


async def test_pinned_pages_do_not_migrate_and_fork_copies_them(pair: Pair) -> None:
    pin = await pair.proc.pin_user_pages(pair.buf, 2, hold=True)
    with pytest.raises(KernelError) as e:
        await pair.cmd(0, CMD_MIGRATE_TO_DEV, 2)
    assert e.value.errno == errno.ENOENT  # collected nothing: the reference check failed
    child = await pair.proc.fork()
    await pair.proc.write(pair.buf, np.int32(-1).tobytes())  # the parent's pinned page is still writable
    assert ints(await child.read(pair.buf, 4))[0] == 0  # the child got its own copy at fork
    await pair.proc.unpin_user_pages(pin)
    with pytest.raises(KernelError) as e:
        await pair.proc.unpin_user_pages(pin)
    assert e.value.errno == errno.ENOENT
    assert (await pair.cmd(0, CMD_MIGRATE_TO_DEV, 2)).cpages == 2
    await child.exit()
