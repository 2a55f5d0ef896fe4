"""Nothing hangs on a dead device: a device that stops answering, one that is
killed, and one that freezes with no traffic are fenced; the CPU operation
completes, and the other device mirroring the same process carries on."""

from __future__ import annotations

import asyncio
import errno
import signal
import time

import numpy as np
import pytest

from hmm.abi import MEMORY_DEVICE_PRIVATE, PAGE_SIZE, Event
from hmm.admin import AdminClient
from hmm.device import DeviceConnection, Driver
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import CMD_READ
from hmm.errors import KernelError
from hmm.process import ProcessClient
from hmmd.core.kernel import FENCED_KEPT
from tests.conftest import HMMD_ARGS
from tests.procs import Program, start_hmmd

DEADLINE_S = float(HMMD_ARGS[HMMD_ARGS.index("--callback-deadline-ms") + 1]) / 1000
KEEPALIVE_S = float(HMMD_ARGS[HMMD_ARGS.index("--keepalive-ms") + 1]) / 1000
N = 16


async def setup_two(cpu: ProcessClient, dmirror_factory):
    (a, (name_a,)), (b, (name_b,)) = dmirror_factory(1), dmirror_factory(1)
    proc = await cpu.spawn("victim")
    buf = await proc.mmap(N * PAGE_SIZE)
    data = np.arange(N * 1024, dtype=np.int32)
    await proc.write(buf, data.tobytes())
    clients = [DmirrorClient(a.address), DmirrorClient(b.address)]
    files = [(await proc.open(f"/dev/{n}"))[1] for n in (name_a, name_b)]
    for c, f in zip(clients, files, strict=True):
        assert (await c.command(f, CMD_READ, buf, N)).cpages == N
    return (a, b), (name_a, name_b), proc, buf, clients, files


async def wait_fenced(admin: AdminClient, name: str, within: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if not (await admin.stats()).device(name).alive:
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} was not fenced within {within} s")


async def assert_other_device_carries_on(client: DmirrorClient, fid: int, buf: int) -> None:
    events = await client.events(fid, clear=True)
    assert [(e.event, e.start, e.end) for e in events] == [(Event.UNMAP, buf, buf + PAGE_SIZE)]
    assert events[0].snoop_crc32 is not None
    r = await client.command(fid, CMD_READ, buf + PAGE_SIZE, N - 1)
    assert np.frombuffer(r.data, dtype=np.int32).tolist() == list(range(1024, N * 1024))


async def test_device_that_stops_answering_is_fenced_at_the_deadline(
    hmmd: Program, cpu: ProcessClient, dmirror_factory
) -> None:
    (a, b), (name_a, name_b), proc, buf, clients, files = await setup_two(cpu, dmirror_factory)
    admin = AdminClient(cpu.channel)
    a.signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        await asyncio.wait_for(proc.munmap(buf, PAGE_SIZE), DEADLINE_S + 5)
        took = time.monotonic() - t0
    finally:
        a.signal(signal.SIGCONT)
    # The munmap waited for the stalled device until the deadline, not forever,
    # unless keepalive noticed the frozen peer first (also a fence, also bounded).
    assert took < DEADLINE_S + 2.5
    st = (await admin.stats()).device(name_a)
    assert not st.alive
    assert "deadline" in st.fenced_reason or st.fenced_reason == "connection dropped", st.fenced_reason
    assert (await admin.stats()).device(name_b).alive
    await assert_other_device_carries_on(clients[1], files[1], buf)
    # The fenced program hears that its session ended and exits.
    for _ in range(100):
        if not a.alive():
            break
        await asyncio.sleep(0.05)
    assert a.proc.returncode == 1
    # Its name is free again: a process cannot open the fenced device any more.
    with pytest.raises(KernelError) as e:
        await proc.open(f"/dev/{name_a}")
    assert e.value.errno == errno.ENOENT
    assert (await admin.stats()).device(name_b).violations == 0


async def test_killed_device_is_fenced_at_once(hmmd: Program, cpu: ProcessClient, dmirror_factory) -> None:
    (a, b), (name_a, name_b), proc, buf, clients, files = await setup_two(cpu, dmirror_factory)
    admin = AdminClient(cpu.channel)
    a.signal(signal.SIGKILL)
    a.proc.wait(5)
    await wait_fenced(admin, name_a, within=2.0)
    assert (await admin.stats()).device(name_a).fenced_reason == "connection dropped"
    t0 = time.monotonic()
    await proc.munmap(buf, PAGE_SIZE)
    assert time.monotonic() - t0 < DEADLINE_S / 2  # nobody waits for the dead device
    await assert_other_device_carries_on(clients[1], files[1], buf)
    assert (await admin.stats()).device(name_b).alive


async def test_a_device_that_closes_its_session_is_told_apart_from_one_that_died(hmmd: Program,
                                                                                  cpu: ProcessClient) -> None:
    admin = AdminClient(cpu.channel)
    conn = await DeviceConnection.connect(hmmd.address, "closes_cleanly", Driver())
    await conn.close()
    st = (await admin.stats()).device("closes_cleanly")
    assert not st.alive and st.fenced_reason == "stream closed by the device"


async def test_frozen_device_is_noticed_by_keepalive_without_traffic(
    hmmd: Program, cpu: ProcessClient, dmirror_factory
) -> None:
    (a, _), (name_a, name_b), proc, buf, clients, files = await setup_two(cpu, dmirror_factory)
    admin = AdminClient(cpu.channel)
    a.signal(signal.SIGSTOP)
    try:
        took = await wait_fenced(admin, name_a, within=4 * KEEPALIVE_S + 3)
    finally:
        a.signal(signal.SIGCONT)
    assert took < 4 * KEEPALIVE_S + 3
    assert (await admin.stats()).device(name_b).alive


async def test_daemon_survives_a_cpu_client_killed_mid_call(
    hmmd: Program, cpu: ProcessClient, tmp_path
) -> None:
    """A CPU-side client dies while its large write is in flight; the daemon keeps
    serving and the process it drove stays usable."""
    import sys

    from tests.procs import start

    script = tmp_path / "writer.py"
    script.write_text(
        "import asyncio, sys\n"
        "from hmm.process import ProcessClient\n"
        "async def main():\n"
        "    cpu = ProcessClient.connect(sys.argv[1])\n"
        "    proc = cpu.attach(int(sys.argv[2]))\n"
        "    addr = await proc.mmap(48 << 20)\n"
        "    print(f'writer listening on {addr}', flush=True)\n"
        "    while True:\n"
        "        await proc.write(addr, b'\\x5a' * (48 << 20))\n"
        "asyncio.run(main())\n"
    )
    victim = await cpu.spawn("driven")
    writer = start("writer", [sys.executable, str(script), hmmd.address, str(victim.pid)], tmp_path)
    addr = int(writer.address)
    await asyncio.sleep(0.3)
    writer.signal(signal.SIGKILL)
    writer.proc.wait(5)
    writer.stop()
    data = await victim.read(addr, 8)
    assert data in (b"\0" * 8, b"\x5a" * 8)
    await victim.write(addr, b"ok")
    assert await victim.read(addr, 2) == b"ok"
    await victim.exit()


def vm_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


async def test_devices_that_come_and_go_cost_the_daemon_nothing(tmp_path) -> None:
    """Devices connect (with device memory) and go, cleanly or dropping the stream:
    once gone, each is forgotten — the daemon's memory does not grow with them, and
    Stats lists only the most recent fenced ones. (Fencing used to zero two counters
    over every frame, making 4 MiB resident per connection on this daemon: 1 GiB of
    RAM plus the 1 GiB coherent window, 4 bytes a frame each, kept for good.)"""
    warmup, churn = 5, 40
    daemon = start_hmmd(tmp_path, "--ram", "1G", name="hmmd-churn")
    try:
        async with AdminClient(address=daemon.address) as admin:

            async def come_and_go(first: int, n: int) -> None:
                for i in range(first, first + n):
                    conn = await DeviceConnection.connect(daemon.address, f"churn{i}", Driver(),
                                                          memory=MEMORY_DEVICE_PRIVATE, memory_pages=1 << 16)
                    if i % 2:
                        conn.drop_stream()  # a lost connection (no reconnect grace: fenced at once)
                    await conn.close()
                deadline = time.monotonic() + 5
                while any(d.alive for d in (await admin.stats()).devices):
                    assert time.monotonic() < deadline, "a device that went is still alive"
                    await asyncio.sleep(0.05)

            await come_and_go(0, warmup)  # the daemon's own first-use allocations
            before = vm_rss_mib(daemon.pid)
            await come_and_go(warmup, churn)
            await asyncio.sleep(0.2)  # the last ones retired
            grown = vm_rss_mib(daemon.pid) - before
            st = await admin.stats()
        assert grown < 40, f"the daemon grew {grown:.0f} MiB for {churn} devices that went"
        # The most recent fenced devices are listed, FENCED_KEPT of them; the others are forgotten.
        total = warmup + churn
        assert [d.name for d in st.devices] == [f"churn{i}" for i in range(total - FENCED_KEPT, total)]
        assert not any(d.alive for d in st.devices)
        assert all(d.fenced_reason and d.memory == "private" and d.memory_used_pages == 0 for d in st.devices)
    finally:
        assert daemon.stop() == 0
