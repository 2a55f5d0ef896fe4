"""The daemon's standard services and configuration: health, reflection, settings
from the environment reaching the negotiated limits, and a clean SIGTERM exit."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import fields

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hmm.admin import AdminClient
from hmm.channel import insecure_channel
from hmm.device import DeviceConnection, Driver
from hmm.errors import KernelError
from hmmd.config import Config
from tests.procs import NODE_MAIN, Program, node_executable, start, start_hmmd

SERVICES = ("hmm.v1.Process", "hmm.v1.Device", "hmm.v1.Admin")


async def test_health_serving_for_every_service(hmmd: Program) -> None:
    channel = insecure_channel(hmmd.address)
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", *SERVICES):
        r = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert r.status == health_pb2.HealthCheckResponse.SERVING, name
    await channel.close()


async def test_reflection_lists_the_services(hmmd: Program) -> None:
    channel = insecure_channel(hmmd.address)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    names = {s.name for s in reply.list_services_response.service}
    assert set(SERVICES) <= names
    assert "grpc.health.v1.Health" in names
    await channel.close()


async def test_environment_settings_reach_the_welcome_and_sigterm_exits_cleanly(tmp_path) -> None:
    env = {"HMMD_CALLBACK_DEADLINE_MS": "777", "HMMD_MAX_PAGES_PER_REQUEST": "4096", "HMMD_RAM": "256M"}
    prog = start("hmmd-env", [sys.executable, "-m", "hmmd", "--listen", "127.0.0.1:0"], tmp_path, env=env)
    try:
        conn = await DeviceConnection.connect(prog.address, "envdev", Driver())
        assert conn.callback_deadline_ms == 777
        assert conn.max_pages == 4096
        assert conn.system_frames == (256 << 20) // 4096
        await conn.close()
        prog.signal(signal.SIGTERM)
        assert prog.proc.wait(10) == 0
    finally:
        prog.stop()
    assert "shutting down" in prog.log_text()


async def test_a_device_hears_and_logs_the_end_of_its_session_when_the_daemon_stops(
        tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """A daemon that stops ends every session: ``conn.closed`` resolves (ESHUTDOWN),
    connection_lost runs, and the SDK says so in its log (it was silent: a device
    program that did not await ``closed`` went on serving nothing)."""
    lost: list[KernelError] = []

    class Watching(Driver):
        def connection_lost(self, error: KernelError) -> None:
            lost.append(error)

    prog = start_hmmd(tmp_path)
    try:
        conn = await DeviceConnection.connect(prog.address, "watched", Watching())
        with caplog.at_level(logging.WARNING, logger="hmm.device"):
            prog.signal(signal.SIGTERM)
            error = await asyncio.wait_for(conn.closed, 10)
        assert error.errno == errno.ESHUTDOWN and lost == [error]
        assert any("watched: session ended" in r.getMessage() for r in caplog.records)
        await conn.close()
    finally:
        prog.stop()


async def test_clients_close_with_async_with_and_a_str_channel_is_a_clear_error(hmmd: Program) -> None:
    """DeviceConnection is an async context manager as ProcessClient and AdminClient
    are (its session ends on leaving); AdminClient("host:port") is a TypeError that
    says to pass address= (it failed later, with an AttributeError)."""
    async with await DeviceConnection.connect(hmmd.address, "scoped", Driver()) as conn:
        assert not conn.closed.done()
    assert conn.closed.done()
    with pytest.raises(TypeError, match="address="):
        AdminClient(hmmd.address)  # type: ignore[arg-type]
    async with AdminClient(address=hmmd.address) as admin:
        assert not any(d.name == "scoped" and d.alive for d in (await admin.stats()).devices)


async def test_device_may_ask_for_a_shorter_deadline(hmmd: Program) -> None:
    conn = await DeviceConnection.connect(hmmd.address, "shortdeadline", Driver(), callback_deadline_ms=250)
    assert conn.callback_deadline_ms == 250
    await conn.close()
    conn = await DeviceConnection.connect(hmmd.address, "longdeadline", Driver(), callback_deadline_ms=10 ** 6)
    assert conn.callback_deadline_ms == 1500  # the daemon's configured deadline caps the request
    await conn.close()


async def test_dmirror_defaults_to_the_kernel_modules_four_devices(tmp_path) -> None:
    """hmm-dmirror with no --device serves what lib/test_hmm.c creates: devices 0 and 1
    with device-private memory, 2 and 3 with device-coherent memory."""
    from tests.procs import start_dmirror

    daemon = start_hmmd(tmp_path)
    dev = start_dmirror(tmp_path, daemon.address)
    admin = AdminClient(address=daemon.address)
    try:
        stats = await admin.stats()
        assert {d.name: d.memory for d in stats.devices if d.alive} == {
            "hmm_dmirror0": "private", "hmm_dmirror1": "private",
            "hmm_dmirror2": "coherent", "hmm_dmirror3": "coherent"}
    finally:
        await admin.close()
        codes = (dev.stop(), daemon.stop())
    assert codes == (0, 0)


@pytest.mark.parametrize("lang", ["python", "node"])
async def test_sigterm_has_devices_give_their_memory_back_first(tmp_path, lang: str) -> None:
    """Graceful shutdown: a device that takes Detach (the Python and the Node.js
    dmirror) evicts every page it holds (each comes home, data intact, until the
    daemon exits), a device that does not is just told the session ended; the daemon
    exits 0 within a bound."""
    import time

    import numpy as np

    from hmm.abi import PAGE_SIZE
    from hmm.dmirror.client import DmirrorClient
    from hmm.dmirror.device import CMD_MIGRATE_TO_DEV
    from hmm.process import ProcessClient
    from tests.procs import start_dmirror, start_hmmd, start_node_dmirror

    daemon = start_hmmd(tmp_path)
    dev = (start_node_dmirror if lang == "node" else start_dmirror)(tmp_path, daemon.address, "leaving")
    plain = await DeviceConnection.connect(daemon.address, "plain", Driver())  # no "detach" capability
    assert "detach" not in plain.capabilities
    cpu = ProcessClient.connect(daemon.address)
    try:
        proc = await cpu.spawn("p")
        buf = await proc.mmap(16 * PAGE_SIZE)
        await proc.write(buf, np.arange(16 * 1024, dtype=np.int32).tobytes())
        dm = DmirrorClient(dev.address)
        fid = (await proc.open("/dev/leaving"))[1]
        assert (await dm.command(fid, CMD_MIGRATE_TO_DEV, buf, 16)).cpages == 16
        await dm.close()
        t0 = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.proc.wait, 10) == 0
        assert time.monotonic() - t0 < 8
    finally:
        await cpu.close()
        await plain.close()
        daemon.stop()
        dev.stop()
    assert "device leaving detached (daemon shutting down): 16 of its 16 pages in use were given back" \
        in daemon.log_text()
    assert "leaving: detached (daemon shutting down), 16 pages evicted" in dev.log_text()
    assert "device plain detached" not in daemon.log_text()


def test_a_unix_socket_is_named_as_given_and_a_busy_device_port_is_a_one_line_error(
        tmp_path, hmmd: Program) -> None:
    """`hmmd listening on ...` names what a client dials, a unix socket's path too
    (it said unix:1); hmm-dmirror on an address in use says so in one line and exits 1
    before its devices connect (it printed a traceback and left them fenced)."""
    sock = tmp_path / "hmmd.sock"
    prog = start("hmmd-unix", [sys.executable, "-m", "hmmd", "--listen", f"unix:{sock}", "--ram", "16M"], tmp_path)
    try:
        assert prog.address == f"unix:{sock}"
        node = start("node-unix", [node_executable(), str(NODE_MAIN), "--kernel", prog.address, "--listen",
                                   f"unix:{tmp_path / 'node.sock'}", "--device", "node_unix"], tmp_path)
        try:
            assert node.address == f"unix:{tmp_path / 'node.sock'}"
        finally:
            node.stop()
    finally:
        prog.stop()
    with socket.socket() as taken:  # (no SO_REUSEPORT, which grpc servers would share a port with)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        for name, program in (("busy_port", [sys.executable, "-m", "hmm.dmirror"]),
                              ("busy_port_node", [node_executable(), str(NODE_MAIN)])):
            r = subprocess.run([*program, "--kernel", hmmd.address, "--listen", busy, "--device", name],
                               capture_output=True, text=True, timeout=60, check=False)
            assert r.returncode == 1 and f"cannot listen on {busy}" in r.stderr, r.stderr
            # (Python's gRPC core logs the failed bind on a line of its own.)
            assert r.stderr.splitlines()[-1].startswith("hmm-dmirror: cannot listen on"), r.stderr
            assert "Traceback" not in r.stderr and "    at " not in r.stderr, r.stderr
    names = [d.name for d in asyncio.run(_stats(hmmd.address)).devices]
    assert "busy_port" not in names and "busy_port_node" not in names  # never connected: none fenced


async def _stats(address: str):  # noqa: ANN202
    admin = AdminClient(address=address)
    try:
        return await admin.stats()
    finally:
        await admin.close()


def test_unusable_listen_address_or_shm_socket_is_a_clear_error(tmp_path) -> None:
    """A bad --shm-socket, a message limit too small for one page, or a setting that
    would make every session fail is refused before anything starts (exit 2); an
    address that
    cannot be bound is a one-line error (exit 1), no traceback."""
    plain = tmp_path / "plain"
    plain.write_text("")
    cases = [
        (["--listen", "127.0.0.1:0", "--shm-socket", str(tmp_path / "missing" / "s.sock")], 2, "not a directory"),
        (["--listen", "127.0.0.1:0", "--shm-socket", str(plain)], 2, "exists and is not a socket"),
        (["--listen", "127.0.0.1:0", "--max-message-bytes", "4096"], 2, "must be at least 16384"),
        # Settings that would only fail later, in every device's session or first write:
        (["--listen", "127.0.0.1:0", "--callback-deadline-ms", "-5"], 2, "--callback-deadline-ms must be at least 1"),
        (["--listen", "127.0.0.1:0", "--keepalive-ms", "0"], 2, "--keepalive-ms must be at least 1"),
        (["--listen", "127.0.0.1:0", "--hello-timeout-ms", "0"], 2, "--hello-timeout-ms must be at least 1"),
        (["--listen", "127.0.0.1:0", "--ram", "12K"], 2, "--ram must be at least 256 KiB"),
        (["--listen", "127.0.0.1:0", "--log-format", "yaml"], 2, "--log-format must be text or json"),
        (["--listen", "127.0.0.1:0", "--log-level", "verbose"], 2, "--log-level must be one of"),
        (["--listen", "127.0.0.1:0", "--ram", "16M", "--hugetlb-pages", "64"], 2, "holds 8 huge pages at most"),
        (["--listen", "192.0.2.1:1"], 1, "cannot start: cannot listen on 192.0.2.1:1"),
    ]
    for args, rc, text in cases:
        r = subprocess.run([sys.executable, "-m", "hmmd", *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == rc and text in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])


def test_help_describes_every_setting_and_shows_no_secret_from_the_environment() -> None:
    env = {**os.environ, "HMMD_AUTH_TOKEN": "s3cret-token", "HMMD_RAM": "64M"}
    r = subprocess.run([sys.executable, "-m", "hmmd", "--help"], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "s3cret-token" not in text and "64M" not in text  # the embedded defaults are shown
    assert "--ram RAM system RAM; frames are backed lazily, so only used memory costs (env HMMD_RAM; default '4G')" \
        in text
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        described = text.split(f"{flag} {f.name.upper()} ", 1)[1]
        assert not described.startswith("(env"), f"{flag} has no description"
