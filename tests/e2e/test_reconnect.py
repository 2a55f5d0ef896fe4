"""Reconnect: a device whose connection drops and comes back within the daemon's
grace period (hmmd --reconnect-grace-ms) keeps its identity and the pages in its
memory, and callbacks due meanwhile reach it after the resume; after the grace
period it is fenced as any dead device.

The device reaches the daemon through a TCP proxy in the test that can cut every
connection and refuse new ones for a while: a real connection drop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from pathlib import Path

import numpy as np
import pytest

from hmm.abi import PAGE_SIZE
from hmm.admin import AdminClient
from hmm.device import DeviceConnection, Driver
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import CMD_MIGRATE_TO_DEV, CMD_READ
from hmm.errors import KernelError
from hmm.process import ProcessClient
from tests.procs import start_dmirror, start_hmmd, start_node_dmirror

GRACE_MS = 3000
DEADLINE_MS = 2000
N = 8


class Proxy:
    """TCP forwarding to ``target``; ``cut`` closes every connection and refuses new
    ones until ``restore``."""

    def __init__(self, target: str) -> None:
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.up = True
        self.pipes: set[asyncio.StreamWriter] = set()
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            return
        self.pipes |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        finally:
            self.pipes.discard(writer)
            writer.close()

    def cut(self) -> None:
        self.up = False
        for w in list(self.pipes):
            w.transport.abort()  # a reset, not a clean close
        self.pipes.clear()

    def restore(self) -> None:
        self.up = True

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def setup(tmp_path: Path, node: bool = False):
    daemon = start_hmmd(tmp_path, "--reconnect-grace-ms", str(GRACE_MS), "--callback-deadline-ms", str(DEADLINE_MS),
                        "--keepalive-ms", "1000")
    proxy = Proxy(daemon.address)
    via = await proxy.start()
    # Started from a thread: the proxy runs on this loop and must pump meanwhile.
    start_flaky = start_node_dmirror if node else start_dmirror
    dev = await asyncio.to_thread(start_flaky, tmp_path, via, "flaky", name="dmirror-flaky")
    other = start_dmirror(tmp_path, daemon.address, "steady", name="dmirror-steady")  # not through the proxy
    cpu = ProcessClient.connect(daemon.address)
    try:
        proc = await cpu.spawn("p")
        buf = await proc.mmap(N * PAGE_SIZE)
        data = np.arange(N * 1024, dtype=np.int32)
        await proc.write(buf, data.tobytes())
        dm = DmirrorClient(dev.address)
        flaky = (await proc.open("/dev/flaky"))[1]
        steady_dm = DmirrorClient(other.address)
        steady = (await proc.open("/dev/steady"))[1]
        assert (await steady_dm.command(steady, CMD_READ, buf, N)).cpages == N
        yield daemon, proxy, dev, cpu, proc, buf, data, dm, flaky, steady_dm, steady
        await dm.close()
        await steady_dm.close()
    finally:
        await cpu.close()
        await proxy.close()
        dev.stop()
        assert other.stop() == 0
        assert daemon.stop() == 0


@pytest.mark.parametrize("node", [False, True], ids=["python", "node"])
async def test_a_dropped_connection_resumes_with_identity_and_memory(tmp_path: Path, node: bool) -> None:
    """The Python and the Node.js dmirror programs alike."""
    async with setup(tmp_path, node) as (daemon, proxy, dev, cpu, proc, buf, data, dm, flaky, steady_dm, steady):
        admin = AdminClient(cpu.channel)
        assert (await dm.command(flaky, CMD_MIGRATE_TO_DEV, buf, N)).cpages == N
        before = (await admin.stats()).device("flaky")
        assert before.memory_used_pages == N

        # A drop with nothing due: the device resumes as soon as it reconnects.
        proxy.cut()
        proxy.restore()
        await asyncio.sleep(0.5)
        after = (await admin.stats()).device("flaky")
        assert after.alive and (after.device_id, after.owner) == (before.device_id, before.owner)
        assert after.memory_used_pages == N

        # A drop with callbacks due: the link stays down 800 ms; the CPU touches a page
        # living in the device's memory meanwhile. The MigrateToRam waits for the
        # resume (within its deadline) and the page comes home intact.
        proxy.cut()
        asyncio.get_running_loop().call_later(0.8, proxy.restore)
        t0 = time.monotonic()
        got = np.frombuffer(await proc.read(buf, N * PAGE_SIZE), dtype=np.int32)
        assert np.array_equal(got, data)
        assert 0.7 < time.monotonic() - t0 < DEADLINE_MS / 1000
        st = (await admin.stats()).device("flaky")
        assert st.alive and st.device_id == before.device_id
        assert (await admin.stats()).device("steady").alive
        assert np.array_equal(np.frombuffer((await dm.command(flaky, CMD_READ, buf, N)).data, dtype=np.int32), data)
        assert await admin.check_invariants() == []


@pytest.mark.parametrize("node", [False, True], ids=["python", "node"])
async def test_after_the_grace_period_the_device_is_fenced(tmp_path: Path, node: bool) -> None:
    async with setup(tmp_path, node) as (daemon, proxy, dev, cpu, proc, buf, data, dm, flaky, steady_dm, steady):
        admin = AdminClient(cpu.channel)
        assert (await dm.command(flaky, CMD_MIGRATE_TO_DEV, buf, N // 2)).cpages == N // 2
        proxy.cut()  # and it stays down
        t0 = time.monotonic()
        while (await admin.stats()).device("flaky").alive:
            assert time.monotonic() - t0 < GRACE_MS / 1000 + 3, "not fenced after the grace period"
            await asyncio.sleep(0.1)
        assert GRACE_MS / 1000 - 0.3 < time.monotonic() - t0
        assert "not resumed" in (await admin.stats()).device("flaky").fenced_reason
        # Its pages are lost; the rest is untouched and the other device carries on.
        with pytest.raises(KernelError) as e:
            await proc.read(buf, 4)
        assert e.value.errno == errno.EFAULT
        tail = np.frombuffer(await proc.read(buf + N // 2 * PAGE_SIZE, N // 2 * PAGE_SIZE), dtype=np.int32)
        assert np.array_equal(tail, data[N // 2 * 1024:])
        assert (await admin.stats()).device("steady").alive
        r = await steady_dm.command(steady, CMD_READ, buf + N // 2 * PAGE_SIZE, N // 2)
        assert np.array_equal(np.frombuffer(r.data, dtype=np.int32), data[N // 2 * 1024:])
        assert await admin.check_invariants() == []


async def test_sdk_fault_injection_drops_the_stream_and_acks(tmp_path: Path) -> None:
    """The SDK's own faults: drop_stream() (resumed within the grace period) and
    dropped acks (the device then misses its deadline and is fenced)."""
    daemon = start_hmmd(tmp_path, "--reconnect-grace-ms", str(GRACE_MS), "--callback-deadline-ms", str(DEADLINE_MS))
    cpu = ProcessClient.connect(daemon.address)
    conn = await DeviceConnection.connect(daemon.address, "selfish", Driver())
    try:
        admin = AdminClient(cpu.channel)
        proc = await cpu.spawn("p")
        buf = await proc.mmap(N * PAGE_SIZE)
        await proc.open("/dev/selfish")
        await conn.insert_notifier(proc.pid, buf, N * PAGE_SIZE)
        conn.drop_stream()
        t0 = time.monotonic()
        while conn.resumes == 0:
            assert time.monotonic() - t0 < GRACE_MS / 1000, "not resumed"
            await asyncio.sleep(0.05)
        await proc.munmap(buf, PAGE_SIZE)  # the invalidation reaches the resumed stream and is acked
        assert (await admin.stats()).device("selfish").alive
        conn.faults.drop_acks = 1
        t0 = time.monotonic()
        await proc.munmap(buf + PAGE_SIZE, PAGE_SIZE)  # its ack is never sent: fenced at the deadline
        assert DEADLINE_MS / 1000 - 0.2 < time.monotonic() - t0 < DEADLINE_MS / 1000 + 1.5
        st = (await admin.stats()).device("selfish")
        assert not st.alive and "deadline" in st.fenced_reason
    finally:
        await conn.close()
        await cpu.close()
        assert daemon.stop() == 0


@pytest.mark.parametrize("node", [False, True], ids=["python", "node"])
async def test_a_device_that_comes_back_to_a_restarted_daemon_is_told_to_connect_again(tmp_path: Path,
                                                                                       node: bool) -> None:
    """The connection drops, and what answers the resume is another daemon (restarted
    on the address) that never had the session: the device ends it with that reason."""
    first = start_hmmd(tmp_path, "--reconnect-grace-ms", str(GRACE_MS), name="hmmd-first")
    second = start_hmmd(tmp_path, "--reconnect-grace-ms", str(GRACE_MS), name="hmmd-second")
    proxy = Proxy(first.address)
    via = await proxy.start()
    reason = "the daemon no longer knows this session (restarted, or fenced it): connect again"
    dev = None
    try:
        if node:  # hmm-dmirror (Node) logs why it lost the daemon, and exits 1
            dev = await asyncio.to_thread(start_node_dmirror, tmp_path, via, "wanderer", name="node-wanderer")
        else:
            conn = await DeviceConnection.connect(via, "wanderer", Driver())
        proxy.cut()
        proxy.port = int(second.address.rsplit(":", 1)[1])
        proxy.restore()
        if node:
            code = await asyncio.to_thread(dev.proc.wait, GRACE_MS / 1000 + 5)
            assert code == 1 and f"lost the daemon (wanderer): ENOENT: {reason}" in dev.log_text(), dev.log_text()
        else:
            why = await asyncio.wait_for(conn.closed, GRACE_MS / 1000 + 5)
            assert why.errno == errno.ENOENT and str(why).startswith(f"[Errno 2] {reason}"), why
            await conn.close()
    finally:
        if dev is not None:
            dev.stop()
        await proxy.close()
        assert first.stop() == 0 and second.stop() == 0
