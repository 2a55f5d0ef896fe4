"""Two devices, each in its own OS process, mirror one process through hmmd.

Every CPU change must reach both devices with the right event before it happens:
the devices run with --snoop, so each invalidation record carries a CRC32 of the
pages the device still mapped, read over DMA before it acked. Equal to the CRC of
the data the CPU had written means the kernel had not changed those pages yet.
"""

from __future__ import annotations

import errno
import zlib

import numpy as np
import pytest

from hmm.abi import (
    CLEAR_REFS_SOFT_DIRTY,
    MADV_DONTNEED,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MREMAP_MAYMOVE,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    ULONG_MAX,
    Event,
)
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import CMD_READ, CMD_SNAPSHOT, CMD_WRITE
from hmm.errors import KernelError
from hmm.process import Proc, ProcessClient

N = 64  # pages


def pattern(npages: int, c: int = 0) -> np.ndarray:
    return np.arange(npages * PAGE_SIZE // 4, dtype=np.int32) + c


class Rig:
    """A process with a buffer, opened by two devices in two dmirror processes."""

    def __init__(self, proc: Proc, clients: list[DmirrorClient], files: list[int], buf: int) -> None:
        self.proc, self.clients, self.files, self.buf = proc, clients, files, buf

    async def read_all(self, i: int, addr: int | None = None, npages: int = N) -> np.ndarray:
        r = await self.clients[i].command(self.files[i], CMD_READ, self.buf if addr is None else addr, npages)
        assert r.cpages == npages
        return np.frombuffer(r.data, dtype=np.int32)

    async def events(self, i: int) -> list:
        return await self.clients[i].events(self.files[i], clear=True)


@pytest.fixture
async def rig(cpu: ProcessClient, dmirror_factory) -> Rig:
    progs = [dmirror_factory(1), dmirror_factory(1)]
    proc = await cpu.spawn("mirrored")
    buf = await proc.mmap(N * PAGE_SIZE)
    await proc.write(buf, pattern(N).tobytes())
    clients, files = [], []
    for prog, names in progs:
        _, fid = await proc.open(f"/dev/{names[0]}")
        clients.append(DmirrorClient(prog.address))
        files.append(fid)
    r = Rig(proc, clients, files, buf)
    for i in range(2):
        assert (await r.read_all(i) == pattern(N)).all()
        assert await r.events(i) == []
    yield r
    for c in clients:
        await c.close()


def crc_of(arr: np.ndarray) -> int:
    return zlib.crc32(arr.tobytes())


async def test_munmap_reaches_both_devices_before_the_pages_go(rig: Rig) -> None:
    start = rig.buf + 8 * PAGE_SIZE
    await rig.proc.munmap(start, 4 * PAGE_SIZE)
    old = pattern(N)[8 * 1024 : 12 * 1024]
    for i in range(2):
        (ev,) = await rig.events(i)
        assert (ev.event, ev.start, ev.end) == (Event.UNMAP, start, start + 4 * PAGE_SIZE)
        assert ev.owner == 0
        assert ev.cur_seq % 2 == 1
        assert ev.mapped_pages == 4
        assert ev.snoop_crc32 == crc_of(old)
        with pytest.raises(KernelError) as e:
            await rig.read_all(i)
        assert e.value.errno == errno.EFAULT
        assert (await rig.read_all(i, rig.buf, 8) == pattern(8)).all()


async def test_both_devices_see_the_same_window(rig: Rig) -> None:
    await rig.proc.munmap(rig.buf, PAGE_SIZE)
    a, b = (await rig.events(0))[0], (await rig.events(1))[0]
    assert a.cur_seq == b.cur_seq


async def test_mprotect_sends_protection_vma_then_device_write_fails_eperm(rig: Rig) -> None:
    await rig.proc.mprotect(rig.buf, N * PAGE_SIZE, PROT_READ)
    for i in range(2):
        (ev,) = await rig.events(i)
        assert (ev.event, ev.start, ev.end) == (Event.PROTECTION_VMA, rig.buf, rig.buf + N * PAGE_SIZE)
        assert ev.snoop_crc32 == crc_of(pattern(N))
        with pytest.raises(KernelError) as e:
            await rig.clients[i].command(rig.files[i], CMD_WRITE, rig.buf, 1, b"\1" * PAGE_SIZE)
        assert e.value.errno == errno.EPERM
        assert (await rig.read_all(i) == pattern(N)).all()


async def test_device_write_is_seen_by_the_cpu_and_the_other_device(rig: Rig) -> None:
    new = pattern(N, 7)
    r = await rig.clients[0].command(rig.files[0], CMD_WRITE, rig.buf, N, new.tobytes())
    assert (r.cpages, r.faults) == (N, 0)  # already mapped writable by the READ in the fixture
    assert np.frombuffer(await rig.proc.read(rig.buf, N * PAGE_SIZE), dtype=np.int32).tolist() == new.tolist()
    assert (await rig.read_all(1) == new).all()


async def test_fork_write_protects_parent_and_cow_breaks_with_clear(rig: Rig) -> None:
    child = await rig.proc.fork()
    for i in range(2):
        (ev,) = await rig.events(i)
        assert (ev.event, ev.start, ev.end) == (Event.PROTECTION_PAGE, rig.buf, rig.buf + N * PAGE_SIZE)
        assert ev.snoop_crc32 == crc_of(pattern(N))
    # The parent's first write to a shared page copies it: CLEAR over that page.
    await rig.proc.write(rig.buf + 3 * PAGE_SIZE, b"\xff" * 4)
    for i in range(2):
        (ev,) = await rig.events(i)
        assert (ev.event, ev.start, ev.end) == (Event.CLEAR, rig.buf + 3 * PAGE_SIZE, rig.buf + 4 * PAGE_SIZE)
        got = await rig.read_all(i)
        assert got[3 * 1024] == -1 and (got[3 * 1024 + 1 :] == pattern(N)[3 * 1024 + 1 :]).all()
    # The child still sees the original data, and the devices saw nothing of it.
    assert np.frombuffer(await child.read(rig.buf, N * PAGE_SIZE), dtype=np.int32).tolist() == pattern(N).tolist()
    await child.write(rig.buf, b"\0" * 8)
    for i in range(2):
        assert await rig.events(i) == []
    await child.exit()


async def test_madvise_dontneed_clears_and_data_reads_zero(rig: Rig) -> None:
    await rig.proc.madvise(rig.buf, 2 * PAGE_SIZE, MADV_DONTNEED)
    for i in range(2):
        (ev,) = await rig.events(i)
        assert (ev.event, ev.start, ev.end) == (Event.CLEAR, rig.buf, rig.buf + 2 * PAGE_SIZE)
        assert ev.snoop_crc32 == crc_of(pattern(2))
        got = await rig.read_all(i)
        assert (got[: 2 * 1024] == 0).all() and (got[2 * 1024 :] == pattern(N)[2 * 1024 :]).all()


async def test_mremap_move_unmaps_old_range_and_data_follows(rig: Rig) -> None:
    # A mapping right after the buffer stops it from growing in place.
    guard = rig.buf + N * PAGE_SIZE
    assert await rig.proc.mmap(PAGE_SIZE, addr=guard, flags=MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED) == guard
    new = await rig.proc.mremap(rig.buf, N * PAGE_SIZE, 2 * N * PAGE_SIZE, MREMAP_MAYMOVE)
    assert new != rig.buf
    for i in range(2):
        events = await rig.events(i)
        assert [(e.event, e.start, e.end) for e in events] == [(Event.UNMAP, rig.buf, rig.buf + N * PAGE_SIZE)]
        assert (await rig.read_all(i, new) == pattern(N)).all()


async def test_clear_refs_soft_dirty(rig: Rig) -> None:
    await rig.proc.clear_refs(CLEAR_REFS_SOFT_DIRTY)
    for i in range(2):
        (ev,) = await rig.events(i)
        assert (ev.event, ev.start, ev.end) == (Event.SOFT_DIRTY, 0, ULONG_MAX)


async def test_exit_sends_release_then_unmap_to_both_devices(rig: Rig) -> None:
    """RELEASE reaches every notifier once, before the UNMAP of the teardown, each
    acked while the pages still held their data; then commands fail with EINVAL."""
    # A child keeps the device files open, so the handles outlive the parent's mm.
    child = await rig.proc.fork()
    for i in range(2):
        await rig.events(i)
        assert (await rig.read_all(i) == pattern(N)).all()  # fork's PROTECTION_PAGE erased them: map again
    await rig.proc.exit()
    for i in range(2):
        events = await rig.events(i)
        assert [(e.event, e.start, e.end) for e in events] == [(Event.RELEASE, 0, ULONG_MAX),
                                                              (Event.UNMAP, 0, ULONG_MAX)]
        assert events[0].mapped_pages == N and events[0].snoop_crc32 == crc_of(pattern(N))
        assert events[1].mapped_pages == 0  # RELEASE already dropped everything
        with pytest.raises(KernelError) as e:
            await rig.read_all(i)
        assert e.value.errno == errno.EINVAL
    await child.exit()


async def test_snapshot_bytes(rig: Rig) -> None:
    await rig.proc.mprotect(rig.buf + PAGE_SIZE, PAGE_SIZE, PROT_READ)
    await rig.proc.munmap(rig.buf + 2 * PAGE_SIZE, PAGE_SIZE)
    zero = await rig.proc.mmap(PAGE_SIZE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS,
                               addr=rig.buf + 2 * PAGE_SIZE)
    assert zero == rig.buf + 2 * PAGE_SIZE
    await rig.proc.read(zero, 4)
    r = await rig.clients[0].command(rig.files[0], CMD_SNAPSHOT, rig.buf - PAGE_SIZE, 5)
    assert r.cpages == 5
    # hole, writable, read-only, zero page + read, writable
    assert list(r.data) == [0xFF, 0x02, 0x01, 0x11, 0x02]


async def test_map_fixed_over_mirrored_pages_unmaps_first(rig: Rig) -> None:
    addr = await rig.proc.mmap(4 * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                               addr=rig.buf)
    assert addr == rig.buf
    for i in range(2):
        (ev,) = await rig.events(i)
        assert (ev.event, ev.start, ev.end) == (Event.UNMAP, rig.buf, rig.buf + 4 * PAGE_SIZE)
        got = await rig.read_all(i)
        assert (got[: 4 * 1024] == 0).all() and (got[4 * 1024 :] == pattern(N)[4 * 1024 :]).all()
