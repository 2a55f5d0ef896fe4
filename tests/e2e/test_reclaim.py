"""Memory pressure over the wire: an hmmd with little RAM, a dmirror program (its own
process) mirroring a process. When the process needs more frames than are free,
hmmd swaps other pages out — after a CLEAR the device hears — and the process goes
on; the device faults its pages back with their contents; shared memory goes to
swap from every process that maps it and stays shared; a device-private page
comes home through a full RAM; Stats and hmmctl count the reclaim."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from hmm.abi import CLEAR_REFS_ALL, MAP_ANONYMOUS, MAP_SHARED, PAGE_SIZE, Event
from hmm.admin import AdminClient
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import CMD_MIGRATE_TO_DEV, CMD_READ
from hmm.process import ProcessClient
from tests.procs import Program, start_dmirror, start_hmmd

P = PAGE_SIZE
RAM_PAGES = 512  # --ram 2M
A_PAGES = 300


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[tuple[Program, ProcessClient, DmirrorClient, AdminClient]]:
    daemon = start_hmmd(tmp_path, "--ram", "2M", "--swap", "8M", "--hugetlb-pages", "0", name="hmmd-small")
    dm_prog = start_dmirror(tmp_path, daemon.address, "press0", args=("--snoop",), name="dmirror-press")
    cpu = ProcessClient.connect(daemon.address)
    dm = DmirrorClient(dm_prog.address)
    admin = AdminClient(cpu.channel)
    yield daemon, cpu, dm, admin
    stats = await admin.stats()
    assert stats.device("press0").violations == 0
    assert await admin.check_invariants() == []
    await dm.close()
    await cpu.close()
    dm_prog.stop()
    assert daemon.stop() == 0, daemon.log_text()


def pattern(npages: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, npages * P, dtype=np.uint8).tobytes()


async def test_pressure_swaps_mirrored_pages_out_after_a_clear_and_the_device_gets_them_back(small) -> None:
    daemon, cpu, dm, admin = small
    proc = await cpu.spawn("pressed")
    _, fid = await proc.open("/dev/press0")
    a = await proc.mmap(A_PAGES * P)
    adata = pattern(A_PAGES, 1)
    await proc.write(a, adata)
    assert (await dm.command(fid, CMD_READ, a, A_PAGES)).data == adata  # mirrored: the device table holds them
    await dm.events(fid, clear=True)
    await proc.clear_refs(CLEAR_REFS_ALL)  # A has not been used lately: the clock takes it first

    b = await proc.mmap(A_PAGES * P)  # A and B cannot both be in 2 MiB
    bdata = pattern(A_PAGES, 2)
    await proc.write(b, bdata)

    stats = await admin.stats()
    assert stats.reclaim_stalls >= 1 and stats.reclaimed_pages >= 2 * A_PAGES - RAM_PAGES
    assert stats.ram_used_frames <= RAM_PAGES
    cleared = [e for e in await dm.events(fid, clear=True) if e.event == Event.CLEAR]
    in_a = [e for e in cleared if a <= e.start < e.end <= a + A_PAGES * P]  # (B's first pieces may go too)
    assert in_a and sum(e.mapped_pages for e in in_a) > 0  # the device dropped its mappings of them first
    status = await proc.status()
    assert status.swap >= 2 * A_PAGES - RAM_PAGES
    # The device reads A again: its range faults swap the pages in (taking others out).
    assert (await dm.command(fid, CMD_READ, a, A_PAGES)).data == adata
    assert await proc.read(b, A_PAGES * P) == bdata
    text = subprocess.run([sys.executable, "-m", "hmmd.ctl", "stats", "--kernel", daemon.address],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    took = re.search(r"reclaim took (\d+) pages in (\d+) stalls", text)
    assert took and int(took[1]) > 0 and int(took[2]) > 0, text
    ps = subprocess.run([sys.executable, "-m", "hmmd.ctl", "ps", "--kernel", daemon.address],
                        capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    header, row = ps[0].split(), next(line.split() for line in ps[1:] if line.split()[0] == str(proc.pid))
    assert header[5] == "SWAP" and row[5] == f"{(await proc.status()).swap * 4}kB" != "0kB", ps
    await proc.exit()


async def test_shared_memory_goes_to_swap_from_both_processes_and_stays_shared(small) -> None:
    daemon, cpu, dm, admin = small
    proc = await cpu.spawn("sharing")
    _, fid = await proc.open("/dev/press0")
    s = await proc.mmap(A_PAGES * P, flags=MAP_SHARED | MAP_ANONYMOUS)
    sdata = pattern(A_PAGES, 5)
    await proc.write(s, sdata)
    child = await proc.fork()
    assert await child.read(s, A_PAGES * P) == sdata  # mapped by both
    assert (await dm.command(fid, CMD_READ, s, A_PAGES)).data == sdata
    await dm.events(fid, clear=True)
    await proc.clear_refs(CLEAR_REFS_ALL)
    await child.clear_refs(CLEAR_REFS_ALL)
    assert (await proc.status()).rss_shmem == A_PAGES

    b = await proc.mmap(A_PAGES * P)
    await proc.write(b, pattern(A_PAGES, 6))  # no room for both: shared pages go

    cleared = [e for e in await dm.events(fid, clear=True)
               if e.event == Event.CLEAR and s <= e.start < e.end <= s + A_PAGES * P]
    assert cleared and sum(e.mapped_pages for e in cleared) > 0
    mine, theirs = await proc.status(), await child.status()
    assert mine.rss_shmem < A_PAGES and theirs.rss_shmem < A_PAGES
    assert mine.swap == 0  # shmem's slots belong to the file, not to VmSwap
    # Back from swap, still one page for both: the child's store reaches the device.
    await child.write(s + 7 * P, b"from the child")
    got = (await dm.command(fid, CMD_READ, s, A_PAGES)).data
    assert got == sdata[: 7 * P] + b"from the child" + sdata[7 * P + 14 :]
    await child.exit()
    await proc.exit()


async def test_a_device_page_comes_home_into_a_full_ram(small) -> None:
    daemon, cpu, dm, admin = small
    proc = await cpu.spawn("returning")
    _, fid = await proc.open("/dev/press0")
    a = await proc.mmap(64 * P)
    adata = pattern(64, 3)
    await proc.write(a, adata)
    await dm.command(fid, CMD_MIGRATE_TO_DEV, a, 64)
    assert (await admin.stats()).device("press0").memory_used_pages == 64
    fill = (await admin.stats()).ram_frames - (await admin.stats()).ram_used_frames
    f = await proc.mmap(fill * P)
    await proc.write(f, pattern(fill, 4))  # RAM full, of this same process's pages
    assert (await admin.stats()).ram_used_frames == RAM_PAGES

    # Each page's migrate_to_ram needs a frame: reclaim takes them while the CPU's
    # fault holds the process's mmap lock.
    assert await proc.read(a, 64 * P) == adata
    stats = await admin.stats()
    assert stats.device("press0").memory_used_pages == 0 and stats.reclaimed_pages >= 64
    assert await proc.read(f, fill * P) == pattern(fill, 4)
    await proc.exit()
