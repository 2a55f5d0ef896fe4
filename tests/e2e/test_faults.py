"""Fault injection (hmm.v1.Admin/InjectFaults, hmmd --inject-faults): each fault does
what it says to one device, the CPU operation and the other device carry on, and
the daemon's invariants hold afterwards."""

from __future__ import annotations

import asyncio
import errno
import time
from pathlib import Path

import numpy as np
import pytest

from hmm.abi import PAGE_SIZE
from hmm.admin import AdminClient
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import CMD_MIGRATE_TO_DEV, CMD_READ, CMD_SNAPSHOT
from hmm.errors import KernelError
from hmm.process import Proc, ProcessClient
from tests.conftest import HMMD_ARGS
from tests.procs import Program, start_dmirror, start_hmmd

from .test_fencing import wait_fenced

DEADLINE_S = float(HMMD_ARGS[HMMD_ARGS.index("--callback-deadline-ms") + 1]) / 1000
N = 8


async def mirrored(cpu: ProcessClient, dmirror_factory, ndevices: int = 2):
    """A process with N pages of pattern, read by ``ndevices`` dmirror devices."""
    devs = [dmirror_factory(1) for _ in range(ndevices)]
    proc = await cpu.spawn("faulty")
    buf = await proc.mmap(N * PAGE_SIZE)
    data = np.arange(N * 1024, dtype=np.int32)
    await proc.write(buf, data.tobytes())
    clients, files = [], []
    for prog, (name,) in devs:
        client = DmirrorClient(prog.address)
        fid = (await proc.open(f"/dev/{name}"))[1]
        assert (await client.command(fid, CMD_READ, buf, N)).cpages == N
        clients.append(client)
        files.append(fid)
    names = [name for _, (name,) in devs]
    return proc, buf, data, names, clients, files


async def read_all(client: DmirrorClient, fid: int, buf: int) -> np.ndarray:
    return np.frombuffer((await client.command(fid, CMD_READ, buf, N)).data, dtype=np.int32)


async def test_a_dropped_ack_fences_the_device_and_the_munmap_completes(
    hmmd: Program, cpu: ProcessClient, dmirror_factory
) -> None:
    proc, buf, data, names, clients, files = await mirrored(cpu, dmirror_factory)
    admin = AdminClient(cpu.channel)
    plan = await admin.inject_faults(names[0], drop_acks=1)
    assert plan["drop_acks"] == 1
    t0 = time.monotonic()
    await asyncio.wait_for(proc.munmap(buf, PAGE_SIZE), DEADLINE_S + 5)
    assert DEADLINE_S - 0.2 < time.monotonic() - t0 < DEADLINE_S + 2.5  # waited for the deadline, no longer
    stats = await admin.stats()
    assert not stats.device(names[0]).alive and "deadline" in stats.device(names[0]).fenced_reason
    assert stats.device(names[1]).alive
    r = await clients[1].command(files[1], CMD_READ, buf + PAGE_SIZE, N - 1)
    assert np.array_equal(np.frombuffer(r.data, dtype=np.int32), data[1024:])
    assert await admin.check_invariants() == []


async def test_a_delayed_ack_below_the_deadline_only_slows(hmmd: Program, cpu: ProcessClient, dmirror_factory) -> None:
    proc, buf, data, names, clients, files = await mirrored(cpu, dmirror_factory, 1)
    admin = AdminClient(cpu.channel)
    await admin.inject_faults(names[0], ack_delay_ms=300)
    t0 = time.monotonic()
    await proc.mprotect(buf, PAGE_SIZE, 1)
    assert time.monotonic() - t0 >= 0.3
    await admin.inject_faults(names[0], ack_delay_ms=0)
    assert (await admin.stats()).device(names[0]).alive
    assert np.array_equal(await read_all(clients[0], files[0], buf), data)


async def test_failed_dma_and_failed_allocation_change_nothing(
    hmmd: Program, cpu: ProcessClient, dmirror_factory
) -> None:
    proc, buf, data, names, clients, files = await mirrored(cpu, dmirror_factory, 1)
    admin = AdminClient(cpu.channel)
    await admin.inject_faults(names[0], fail_dma=1)
    with pytest.raises(KernelError) as e:
        await clients[0].command(files[0], CMD_READ, buf, N)
    assert e.value.errno == errno.EIO
    assert np.array_equal(await read_all(clients[0], files[0], buf), data)  # once only

    await admin.inject_faults(names[0], fail_alloc=1)
    with pytest.raises(KernelError) as e:
        await clients[0].command(files[0], CMD_MIGRATE_TO_DEV, buf, N)
    assert e.value.errno == errno.ENOMEM
    snap = (await clients[0].command(files[0], CMD_SNAPSHOT, buf, N)).data
    assert set(snap) == {0x02}  # every page still a writable system page: nothing moved
    assert np.frombuffer(await proc.read(buf, N * PAGE_SIZE), dtype=np.int32).tolist() == data.tolist()
    assert (await admin.stats()).device(names[0]).migrations_open == 0
    assert await admin.check_invariants() == []
    assert (await clients[0].command(files[0], CMD_MIGRATE_TO_DEV, buf, N)).cpages == N  # and then it works


async def test_disconnect_fences_at_once(hmmd: Program, cpu: ProcessClient, dmirror_factory) -> None:
    proc, buf, data, names, clients, files = await mirrored(cpu, dmirror_factory)
    admin = AdminClient(cpu.channel)
    await admin.inject_faults(names[0], disconnect=True)
    await wait_fenced(admin, names[0], 2)
    assert "fault injection" in (await admin.stats()).device(names[0]).fenced_reason
    await proc.munmap(buf, PAGE_SIZE)  # no wait on the cut device
    r = await clients[1].command(files[1], CMD_READ, buf + PAGE_SIZE, N - 1)
    assert np.array_equal(np.frombuffer(r.data, dtype=np.int32), data[1024:])
    with pytest.raises(KernelError) as e:
        await admin.inject_faults("no-such-device", drop_acks=1)
    assert e.value.errno == errno.ENOENT
    assert await admin.check_invariants() == []


async def test_faults_injected_at_connect_from_the_daemon_settings(tmp_path: Path) -> None:
    daemon = start_hmmd(tmp_path, *HMMD_ARGS, "--inject-faults", "slowdev:stream_delay_ms=200,fail_dma=1")
    dev = start_dmirror(tmp_path, daemon.address, "slowdev", "fastdev", name="dmirror-faults")
    cpu = ProcessClient.connect(daemon.address)
    admin = AdminClient(cpu.channel)
    try:
        proc: Proc = await cpu.spawn("p")
        buf = await proc.mmap(N * PAGE_SIZE)
        client = DmirrorClient(dev.address)
        slow = (await proc.open("/dev/slowdev"))[1]
        fast = (await proc.open("/dev/fastdev"))[1]
        with pytest.raises(KernelError) as e:
            await client.command(slow, CMD_READ, buf, N)
        assert e.value.errno == errno.EIO
        await client.command(slow, CMD_READ, buf, N)
        await client.command(fast, CMD_READ, buf, N)
        t0 = time.monotonic()
        await proc.munmap(buf, PAGE_SIZE)  # the slow device's invalidation waits 200 ms to be sent
        assert time.monotonic() - t0 >= 0.2
        stats = await admin.stats()
        assert stats.device("slowdev").alive and stats.device("fastdev").alive
        await client.close()
    finally:
        await cpu.close()
        dev.stop()
        assert daemon.stop() == 0


def test_a_malformed_fault_setting_stops_the_daemon_at_start(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="fault spec"):
        start_hmmd(tmp_path, "--inject-faults", "dev:explode=1")
