"""Compound (THP) migration across processes: hmmd and dmirror programs (private and
``--device NAME:coherent``), beyond what the conformance suite checks (HMM-SELFTESTS.md
§1.6, §1.8; HMM-SEMANTICS.md §1.2 and §1.3 [newest] COMPOUND rules).

A THP moves to the device as one compound entry — a device-private PMD (snapshot
0x26) or a coherent THP (0x46) — and comes back whole as a THP (0x06). Eviction,
fork and a partial munmap split it; a block of device memory returns whole once
every page of it is free. Data patterns are checked after every move, and the
daemon's counters (device memory in use, RSS, open migrations, violations).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from hmm.abi import (
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
    HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_ERROR,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    MADV_HUGEPAGE,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from hmm.admin import AdminClient
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import CMD_MIGRATE_TO_DEV, CMD_MIGRATE_TO_SYS, CMD_READ, CMD_RELEASE, CMD_SNAPSHOT
from hmm.process import Proc, ProcessClient
from tests.procs import Program, start_dmirror

H = PMD_SIZE // PAGE_SIZE  # 512
P = PAGE_SIZE
PMD, WR, RD = HMM_DMIRROR_PROT_PMD, HMM_DMIRROR_PROT_WRITE, HMM_DMIRROR_PROT_READ
PM_PRESENT, PM_SWAP = 1 << 63, 1 << 62
PM_PFRAME_MASK = (1 << 55) - 1
_ids = itertools.count()


def pattern(npages: int = H, c: int = 0) -> np.ndarray:
    return np.arange(npages * P // 4, dtype=np.int32) + c


def ints(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.int32)


class Rig:
    """One dmirror program with two devices of one kind, a process that opened both,
    and a THP window written with a pattern."""

    def __init__(self, prog: Program, dm: DmirrorClient, names: list[str], proc: Proc, files: list[int],
                 admin: AdminClient) -> None:
        self.prog, self.dm, self.names, self.proc, self.files, self.admin = prog, dm, names, proc, files, admin
        self.window = 0

    async def thp(self, c: int = 0) -> int:
        """Map 2 x PMD, advise the aligned PMD inside MADV_HUGEPAGE and write it: a THP."""
        base = await self.proc.mmap(2 * PMD_SIZE, PROT_READ | PROT_WRITE)
        w = (base + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
        await self.proc.madvise(w, PMD_SIZE, MADV_HUGEPAGE)
        await self.proc.write(w, pattern(c=c).tobytes())
        assert list(await self.snap(0, w)) == [WR | PMD] * H  # a writable THP mapped by PMD
        self.window = w
        return w

    async def cmd(self, i: int, cmd: int, addr: int | None = None, npages: int = H):
        return await self.dm.command(self.files[i], cmd, self.window if addr is None else addr, npages)

    async def snap(self, i: int, addr: int | None = None, npages: int = H) -> bytes:
        return (await self.cmd(i, CMD_SNAPSHOT, addr, npages)).data

    async def used(self, i: int) -> int:
        return (await self.admin.stats()).device(self.names[i]).memory_used_pages

    async def cpu(self, addr: int | None = None, npages: int = H, proc: Proc | None = None) -> np.ndarray:
        return ints(await (proc or self.proc).read(self.window if addr is None else addr, npages * P))


async def make_rig(hmmd: Program, cpu: ProcessClient, tmp_path: Path, kind: str,
                   memory_pages: int = 4 * H) -> Rig:
    n = next(_ids)
    names = [f"thp{n}_{i}" for i in range(2)]
    prog = start_dmirror(tmp_path, hmmd.address, *(f"{m}:{kind}" for m in names),
                         args=("--memory-pages", str(memory_pages)), name=f"dmirror_thp{n}")
    proc = await cpu.spawn("compound")
    files = [(await proc.open(f"/dev/{m}"))[1] for m in names]
    return Rig(prog, DmirrorClient(prog.address), names, proc, files, AdminClient(cpu.channel))


@pytest.fixture(params=["private", "coherent"])
async def rig(request: pytest.FixtureRequest, hmmd: Program, cpu: ProcessClient, tmp_path: Path
              ) -> AsyncIterator[Rig]:
    r = await make_rig(hmmd, cpu, tmp_path, request.param)
    yield r
    stats = await r.admin.stats()
    for name in r.names:
        d = stats.device(name)
        assert d.violations == 0 and d.migrations_open == 0
    await r.dm.close()
    r.prog.stop()


@pytest.fixture
async def private(hmmd: Program, cpu: ProcessClient, tmp_path: Path) -> AsyncIterator[Rig]:
    r = await make_rig(hmmd, cpu, tmp_path, "private", memory_pages=2 * H)
    yield r
    stats = await r.admin.stats()
    for name in r.names:
        d = stats.device(name)
        assert d.violations == 0 and d.migrations_open == 0
    await r.dm.close()
    r.prog.stop()


async def test_a_thp_moves_to_the_device_whole_and_comes_home_a_thp(rig: Rig, request: pytest.FixtureRequest) -> None:
    coherent = request.node.callspec.params["rig"] == "coherent"
    w = await rig.thp()
    r = await rig.cmd(0, CMD_MIGRATE_TO_DEV)
    assert r.cpages == H and (ints(r.data) == pattern()).all()
    assert await rig.used(0) == H and (await rig.proc.status()).rss_anon == H
    if coherent:
        assert list(await rig.snap(0)) == [HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | WR | PMD] * H  # 0x46
        assert list(await rig.snap(1)) == [HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | WR | PMD] * H  # 0x56
        pm = await rig.proc.pagemap(w, H)
        frames = (pm & np.uint64(PM_PFRAME_MASK)).astype(np.int64)
        assert (pm & np.uint64(PM_PRESENT)).all() and frames[0] % H == 0 and (np.diff(frames) == 1).all()
    else:
        assert list(await rig.snap(0)) == [HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | WR | PMD] * H  # 0x26
        # Another device: another owner's device-private PMD is an error entry.
        assert list(await rig.snap(1)) == [HMM_DMIRROR_PROT_ERROR] * H
        assert (await rig.proc.pagemap(w, H) & np.uint64(PM_SWAP)).all()
    r = await rig.cmd(0, CMD_MIGRATE_TO_SYS)
    assert r.cpages == H and await rig.used(0) == 0
    assert list(await rig.snap(0)) == [WR | PMD] * H  # home as one THP
    assert (await rig.cpu() == pattern()).all() and (await rig.proc.status()).rss_anon == H


async def test_a_cpu_fault_brings_the_device_pmd_home_whole(private: Rig) -> None:
    r = private
    await r.thp(3)
    await r.cmd(0, CMD_MIGRATE_TO_DEV)
    assert (await r.cpu(r.window + 100 * P, 1) == pattern(c=3)[100 * 1024 : 101 * 1024]).all()
    assert await r.used(0) == 0  # the whole block came home with one fault
    assert list(await r.snap(0)) == [WR | PMD] * H


async def test_another_devices_fault_brings_the_device_pmd_home(private: Rig) -> None:
    r = private
    await r.thp(4)
    await r.cmd(0, CMD_MIGRATE_TO_DEV)
    got = await r.cmd(1, CMD_READ, r.window + 7 * P, 2)  # device 1 faults it through device 0
    assert (ints(got.data) == pattern(c=4)[7 * 1024 : 9 * 1024]).all() and got.faults == 1
    assert await r.used(0) == 0 and list(await r.snap(1)) == [WR | PMD] * H


async def test_release_evicts_a_device_pmd_page_by_page(private: Rig) -> None:
    r = private
    await r.thp(5)
    await r.cmd(0, CMD_MIGRATE_TO_DEV)
    await r.cmd(0, CMD_RELEASE)
    assert await r.used(0) == 0
    assert list(await r.snap(0)) == [WR] * H  # split: eviction moves page by page
    assert (await r.cpu() == pattern(c=5)).all()


async def test_fork_shares_a_device_pmd_and_the_childs_fault_brings_it_home_for_both(private: Rig) -> None:
    r = private
    await r.thp(6)
    await r.cmd(0, CMD_MIGRATE_TO_DEV)
    child = await r.proc.fork()
    # Shared copy-on-write: read-only in both (the parent's own device PMD, order 9).
    assert list(await r.snap(0)) == [HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | RD | PMD] * H
    assert (await r.cpu(proc=child) == pattern(c=6)).all()  # through the parent's device
    assert await r.used(0) == 0
    assert list(await r.snap(0)) == [RD] * H  # the parent maps the new pages by PTE, read-only
    await r.proc.write(r.window, pattern(1, 99).tobytes())  # copy-on-write
    assert (await r.cpu(proc=child) == pattern(c=6)).all()
    expect = pattern(c=6)
    expect[:1024] = pattern(1, 99)
    assert (await r.cpu() == expect).all()
    await child.exit()


async def test_a_block_half_unmapped_returns_whole_once_the_rest_is_home(private: Rig) -> None:
    r = private  # two blocks of device memory
    w = await r.thp(7)
    await r.cmd(0, CMD_MIGRATE_TO_DEV)
    await r.proc.munmap(w + PMD_SIZE // 4, PMD_SIZE // 2)
    assert await r.used(0) == H // 2 and (await r.proc.status()).rss_anon == H // 2
    assert (await r.cpu(w, H // 4) == pattern(c=7)[: H // 4 * 1024]).all()
    assert (await r.cpu(w + 3 * PMD_SIZE // 4, H // 4) == pattern(c=7)[3 * H // 4 * 1024 :]).all()
    assert await r.used(0) == 0
    # Both blocks are whole again: two THPs move as two device PMDs.
    for c in (8, 9):
        await r.thp(c)
        got = await r.cmd(0, CMD_MIGRATE_TO_DEV)
        assert (ints(got.data) == pattern(c=c)).all()
        assert list(await r.snap(0)) == [HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | WR | PMD] * H
    assert await r.used(0) == 2 * H
