"""The Node.js device (client/node) as a real process: its unit tests, the
conformance suite through `hmmctl conformance`, and interop with the Python device
mirroring one process together.

Node is required, not optional: without `node` on PATH, or without
`npm ci --prefix client/node`, these tests fail with a message saying so.

No conformance test is excused for the Node device: it must pass every test the
Python device passes (the suite's strict xfails, which fail for both devices, are
the only tests it may not pass). The Python device's own result is asserted by
tests/conformance in the same run.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hmm.abi import (
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
    HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_ERROR,
    HMM_DMIRROR_PROT_NONE,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    MADV_HUGEPAGE,
    PAGE_SIZE,
    PMD_SIZE,
    Event,
)
from hmm.admin import AdminClient
from hmm.dmirror.client import DmirrorClient, Reply
from hmm.dmirror.device import (
    CMD_CHECK_EXCLUSIVE,
    CMD_EXCLUSIVE,
    CMD_MIGRATE_TO_DEV,
    CMD_MIGRATE_TO_SYS,
    CMD_READ,
    CMD_SNAPSHOT,
    CMD_WRITE,
)
from hmm.errors import KernelError
from hmm.process import Proc, ProcessClient
from tests.conformance import conftest as conformance
from tests.conformance import test_hmm
from tests.procs import NODE_DIR, NODE_MAIN, Program, node_executable, start_dmirror, start_hmmd, start_node_dmirror

P = PAGE_SIZE
N = 16  # pages of the interop buffer


def test_node_unit_tests() -> None:
    r = subprocess.run([node_executable(), "--test", "test/"], cwd=NODE_DIR, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "# fail 0" in r.stdout


# ---- the conformance suite through the runner -------------------------------------------------


def expected_outcomes() -> dict[str, str]:
    """Every conformance test id -> the outcome the Python device gets: "passed", or
    "xfailed" for the suite's strict xfails (known gaps of the daemon)."""
    out = {}
    for name, fn in vars(test_hmm).items():
        if not name.startswith("test_") or not callable(fn):
            continue
        xfail = any(m.name == "xfail" for m in getattr(fn, "pytestmark", []))
        for variant in conformance.VARIANTS:
            out[f"{name}[{variant}]"] = "xfailed" if xfail else "passed"
    return out


@pytest.mark.timeout(900)
def test_conformance_runner_against_the_node_device(tmp_path: Path) -> None:
    node_executable()
    names = [f"node_dmirror{i}" for i in range(len(conformance.DEFAULT_DEVICE_NAMES))]
    specs = [f"{n}:coherent" if i in conformance.COHERENT_DEVICES else n for i, n in enumerate(names)]
    kernel = start_hmmd(tmp_path, *conformance.HMMD_ARGS, name="hmmd-conformance")
    try:
        device = start_node_dmirror(tmp_path, kernel.address, *specs)
        try:
            r = subprocess.run(
                [sys.executable, "-m", "hmmd.ctl", "conformance", "--kernel", kernel.address, "--device",
                 device.address, "--devices", ",".join(names), "--json"],
                capture_output=True, text=True, timeout=840, check=False)
            assert device.alive(), f"the Node device died:\n{device.log_text()}"
        finally:
            device_code = device.stop()
    finally:
        kernel_code = kernel.stop()
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else None
    assert report is not None, f"no report (exit {r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    got = {t["name"]: t["outcome"] for t in report["results"]}
    want = expected_outcomes()
    wrong = {name: (got.get(name), outcome, next((t["message"] for t in report["results"] if t["name"] == name), ""))
             for name, outcome in want.items() if got.get(name) != outcome}
    assert not wrong, f"outcomes that differ from the Python device's (got, want, message): {wrong}\n" \
                      f"device log:\n{device.log_text()[-6000:]}"
    assert set(got) == set(want)
    assert report["passed"] == sum(o == "passed" for o in want.values())
    assert r.returncode == 0, r.stderr[-4000:]
    assert device_code == 0, f"the Node device exited with {device_code}:\n{device.log_text()}"
    assert kernel_code == 0, f"hmmd exited with {kernel_code}:\n{kernel.log_text()}"


# ---- interop: the Python and the Node device on one process ----------------------------------


@dataclass
class Devices:
    """One Python and one Node program, each serving a private and a coherent device."""

    py: Program
    node: Program
    py_names: tuple[str, str]  # private, coherent
    node_names: tuple[str, str]


@pytest.fixture(scope="module")
def devices(hmmd: Program, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devices]:
    log_dir = tmp_path_factory.mktemp("interop")
    py_names, node_names = ("py_interop0", "py_interop1"), ("node_interop0", "node_interop1")
    py = start_dmirror(log_dir, hmmd.address, py_names[0], f"{py_names[1]}:coherent", args=("--snoop",),
                       name="py-dmirror")
    try:
        node = start_node_dmirror(log_dir, hmmd.address, node_names[0], f"{node_names[1]}:coherent",
                                  args=("--snoop", "--memory-pages", "4096"))
    except BaseException:
        py.stop()
        raise
    yield Devices(py, node, py_names, node_names)
    codes = {"node": node.stop(), "python": py.stop()}
    assert codes == {"node": 0, "python": 0}, f"{codes}\n{node.log_text()}\n{py.log_text()}"


@dataclass
class Handle:
    """A device opened by the test process, driven through its command service."""

    dm: DmirrorClient
    file_id: int
    fd: int
    owner: int

    async def cmd(self, cmd: int, addr: int, npages: int, data: bytes = b"") -> Reply:
        return await self.dm.command(self.file_id, cmd, addr, npages, data)

    async def errno(self, cmd: int, addr: int, npages: int, data: bytes = b"") -> str:
        try:
            await self.cmd(cmd, addr, npages, data)
        except KernelError as e:
            return e.name
        return "OK"

    async def snapshot(self, addr: int, npages: int) -> list[int]:
        r = await self.cmd(CMD_SNAPSHOT, addr, npages)
        assert r.cpages == npages
        return list(r.data)


@dataclass
class Pair:
    proc: Proc
    py: Handle
    node: Handle


def ints(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.int32)


def pattern(npages: int, c: int = 0, sign: int = 1) -> bytes:
    return (sign * (np.arange(npages * P // 4, dtype=np.int32) + c)).astype(np.int32).tobytes()


@asynccontextmanager
async def open_both(hmmd: Program, devices: Devices, kind: int) -> AsyncIterator[Pair]:
    """A fresh process that opens the Python and the Node device of ``kind`` (0
    private, 1 coherent). Closing both handles must succeed (each close evicts its
    device); afterwards neither device has a coherence violation."""
    cpu = ProcessClient.connect(hmmd.address)
    admin = AdminClient(address=hmmd.address)
    clients = [DmirrorClient(devices.py.address), DmirrorClient(devices.node.address)]
    names = (devices.py_names[kind], devices.node_names[kind])
    try:
        proc = await cpu.spawn("interop")
        stats = await admin.stats()
        handles = []
        for dm, name in zip(clients, names, strict=True):
            fd, file_id = await proc.open(f"/dev/{name}")
            handles.append(Handle(dm, file_id, fd, stats.device(name).owner))
        yield Pair(proc, handles[0], handles[1])
        for h in handles:
            await proc.close(h.fd)
        await proc.exit()
        stats = await admin.stats()
        assert {n: stats.device(n).violations for n in names} == dict.fromkeys(names, 0)
    finally:
        for dm in clients:
            await dm.close()
        await admin.close()
        await cpu.close()


async def test_both_devices_read_are_invalidated_and_pull_pages_home(hmmd: Program, devices: Devices) -> None:
    """double_map with one device of each language: both mirror the buffer, a CPU
    write (a copy-on-write break) invalidates both before it lands, both then see
    the new data; a page migrated by one device is pulled home by the other's read."""
    async with open_both(hmmd, devices, 0) as t:
        size, half = N * P, N // 2
        ptr = await t.proc.mmap(size)
        a = pattern(N)
        await t.proc.write(ptr, a)
        for h in (t.py, t.node):
            r = await h.cmd(CMD_READ, ptr, N)
            assert (r.cpages, r.faults, r.data) == (N, 1, a)
            assert await h.snapshot(ptr, N) == [HMM_DMIRROR_PROT_WRITE] * N

        # Fork write-protects the pages (both tables are invalidated); read them again.
        child = await t.proc.fork()
        for h in (t.py, t.node):
            r = await h.cmd(CMD_READ, ptr, N)
            assert (r.faults, r.data) == (1, a)
            assert await h.snapshot(ptr, N) == [HMM_DMIRROR_PROT_READ] * N
            await h.dm.events(h.file_id, clear=True)

        # The parent's write copies every page. Each device was told first, and read
        # the old contents (--snoop) before it acked.
        b = pattern(N, sign=-1)
        await t.proc.write(ptr, b)
        for h in (t.py, t.node):
            cleared = [e for e in await h.dm.events(h.file_id) if e.event == Event.CLEAR and e.mapped_pages]
            assert sum(e.mapped_pages for e in cleared) == N
            for e in cleared:
                lo, hi = (e.start - ptr) // P, (e.end - ptr) // P
                assert e.mapped_pages == hi - lo
                assert e.snoop_crc32 == zlib.crc32(a[lo * P : hi * P])
            r = await h.cmd(CMD_READ, ptr, N)
            assert (r.faults, r.data) == (1, b)
            assert await h.snapshot(ptr, N) == [HMM_DMIRROR_PROT_WRITE] * N
        assert await child.read(ptr, size) == a
        await child.exit()

        # Node migrates the first half; Python sees its pages as another device's.
        r = await t.node.cmd(CMD_MIGRATE_TO_DEV, ptr, half)
        assert (r.cpages, r.data) == (half, b[: half * P])
        local = HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE
        assert await t.node.snapshot(ptr, N) == [local] * half + [HMM_DMIRROR_PROT_WRITE] * half
        assert await t.py.snapshot(ptr, N) == [HMM_DMIRROR_PROT_NONE] * half + [HMM_DMIRROR_PROT_WRITE] * half
        migrate = [e for e in await t.py.dm.events(t.py.file_id, clear=True) if e.event == Event.MIGRATE]
        assert migrate and {e.owner for e in migrate} == {t.node.owner}
        # Python's read faults them home (migrate_to_ram answered by the Node device).
        r = await t.py.cmd(CMD_READ, ptr, N)
        assert (r.faults, r.data) == (1, b)
        assert await t.node.snapshot(ptr, N) == [HMM_DMIRROR_PROT_WRITE] * N

        # And the other way round.
        r = await t.py.cmd(CMD_MIGRATE_TO_DEV, ptr + half * P, half)
        assert (r.cpages, r.data) == (half, b[half * P :])
        assert await t.node.snapshot(ptr, N) == [HMM_DMIRROR_PROT_WRITE] * half + [HMM_DMIRROR_PROT_NONE] * half
        r = await t.node.cmd(CMD_READ, ptr, N)
        assert (r.faults, r.data) == (1, b)
        assert await t.py.snapshot(ptr, N) == [HMM_DMIRROR_PROT_WRITE] * N

        # Node holds everything, writes through its device memory, the CPU and
        # Python read it (each page comes home once), and Node moves nothing back.
        r = await t.node.cmd(CMD_MIGRATE_TO_DEV, ptr, N)
        assert r.cpages == N
        c = pattern(N, 7)
        assert (await t.node.cmd(CMD_WRITE, ptr, N, c)).faults == 0  # into its own pages
        assert await t.proc.read(ptr, size // 2) == c[: size // 2]
        assert (await t.py.cmd(CMD_READ, ptr, N)).data == c
        assert (await t.node.cmd(CMD_MIGRATE_TO_SYS, ptr, N)).cpages == 0
        assert await t.node.snapshot(ptr, N) == [HMM_DMIRROR_PROT_WRITE] * N


async def test_exclusive_access_is_taken_back_by_the_other_device(hmmd: Program, devices: Devices) -> None:
    """One device holds pages for atomics; the other's access takes them back, which
    the first learns from its invalidation (CHECK_EXCLUSIVE: EPERM, then 0). Both
    devices give the same errnos for the same bad commands."""
    async with open_both(hmmd, devices, 0) as t:
        size = N * P
        ptr = await t.proc.mmap(size)
        a = pattern(N)
        await t.proc.write(ptr, a)

        r = await t.node.cmd(CMD_EXCLUSIVE, ptr, 4)
        assert (r.cpages, r.data) == (4, a[: 4 * P])
        assert await t.node.errno(CMD_CHECK_EXCLUSIVE, ptr, 4) == "EPERM"
        r = await t.py.cmd(CMD_READ, ptr, N)
        assert (r.faults, r.data) == (1, a)
        assert await t.node.errno(CMD_CHECK_EXCLUSIVE, ptr, 4) == "OK"

        r = await t.py.cmd(CMD_EXCLUSIVE, ptr + 4 * P, 4)
        assert (r.cpages, r.data) == (4, a[4 * P : 8 * P])
        assert await t.py.errno(CMD_CHECK_EXCLUSIVE, ptr + 4 * P, 4) == "EPERM"
        b = pattern(N, 3)
        r = await t.node.cmd(CMD_WRITE, ptr, N, b)
        assert (r.cpages, r.faults) == (N, 1)
        assert await t.py.errno(CMD_CHECK_EXCLUSIVE, ptr + 4 * P, 4) == "OK"
        assert await t.proc.read(ptr, size) == b

        ro = await t.proc.mmap(P)
        await t.proc.mprotect(ro, P, 1)  # PROT_READ
        await t.proc.munmap(ptr + (N - 1) * P, P)  # a hole at the last page
        for h in (t.py, t.node):
            assert await h.errno(CMD_READ, ptr + 1, 1) == "EINVAL"
            assert await h.errno(CMD_READ, ptr, 0) == "EINVAL"
            assert await h.errno(CMD_READ, ptr, N) == "EFAULT"
            assert await h.errno(CMD_WRITE, ptr, 2, b"short") == "EFAULT"
            assert await h.errno(CMD_WRITE, ro, 1, bytes(P)) == "EPERM"
            assert await h.errno(CMD_MIGRATE_TO_DEV, ptr + (N - 1) * P, 1) == "EINVAL"
            assert await h.errno(99, ptr, 1) == "EINVAL"


async def test_coherent_pages_are_shared_in_place(hmmd: Program, devices: Devices) -> None:
    """Device-coherent memory of both languages: each device's pages are valid for
    the other, which reads them where they are; a CPU write lands in them in place
    (no invalidation, no fault); migrating home invalidates the other device."""
    async with open_both(hmmd, devices, 1) as t:
        size, half = N * P, N // 2
        ptr = await t.proc.mmap(size)
        a = pattern(N)
        await t.proc.write(ptr, a)
        assert (await t.node.cmd(CMD_MIGRATE_TO_DEV, ptr, half)).data == a[: half * P]
        assert (await t.py.cmd(CMD_MIGRATE_TO_DEV, ptr + half * P, half)).data == a[half * P :]
        local = HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE
        remote = HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | HMM_DMIRROR_PROT_WRITE
        assert await t.node.snapshot(ptr, N) == [local] * half + [remote] * half
        assert await t.py.snapshot(ptr, N) == [remote] * half + [local] * half
        for h in (t.py, t.node):
            r = await h.cmd(CMD_READ, ptr, N)
            assert (r.faults, r.data) == (1, a)
        assert await t.node.snapshot(ptr, N) == [local] * half + [remote] * half  # nothing moved

        b = pattern(N, sign=-1)
        await t.proc.write(ptr, b)  # in place: both mirrors stay valid
        for h in (t.py, t.node):
            r = await h.cmd(CMD_READ, ptr, N)
            assert (r.faults, r.data) == (0, b)

        assert (await t.node.cmd(CMD_MIGRATE_TO_SYS, ptr, N)).cpages == half  # only its own pages
        assert await t.py.snapshot(ptr, N) == [HMM_DMIRROR_PROT_WRITE] * half + [local] * half
        r = await t.py.cmd(CMD_READ, ptr, N)
        assert (r.faults, r.data) == (1, b)
        c = pattern(N, 5)
        assert (await t.node.cmd(CMD_WRITE, ptr, N, c)).faults == 1
        assert await t.proc.read(ptr, size) == c
        assert (await t.py.cmd(CMD_READ, ptr, N)).data == c


async def test_a_device_pmd_moves_whole_between_the_devices(hmmd: Program, devices: Devices) -> None:
    """Compound migration across languages: a THP migrated by one device becomes a
    device-private PMD (0x26 to its owner, an error entry to the other device); the
    other device's read brings the whole block home as a THP, in both directions."""
    async with open_both(hmmd, devices, 0) as t:
        npages = PMD_SIZE // P
        mapping = await t.proc.mmap(2 * PMD_SIZE)
        ptr = (mapping + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
        await t.proc.madvise(ptr, PMD_SIZE, MADV_HUGEPAGE)
        a = pattern(npages, 11)
        await t.proc.write(ptr, a)
        thp = HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD
        pmd = HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | thp
        for owner, other in ((t.node, t.py), (t.py, t.node)):
            assert await owner.snapshot(ptr, npages) == [thp] * npages
            r = await owner.cmd(CMD_MIGRATE_TO_DEV, ptr, npages)
            assert (r.cpages, r.data) == (npages, a)
            assert await owner.snapshot(ptr, npages) == [pmd] * npages
            assert await other.snapshot(ptr, npages) == [HMM_DMIRROR_PROT_ERROR] * npages
            r = await other.cmd(CMD_READ, ptr, npages)  # one migrate_to_ram brings all 512 pages home
            assert (r.faults, r.data) == (1, a)
            assert await owner.snapshot(ptr, npages) == [thp] * npages


async def test_both_devices_let_the_oom_reaper_empty_a_victim(hmmd: Program, devices: Devices) -> None:
    """An OOM kill of a process both devices mirror, half of it in the Node device's
    memory: both ack the reaper's non-blockable UNMAP (a refusal would make it try
    again, ten times), so one pass frees every page, the device pages too."""
    cpu = ProcessClient.connect(hmmd.address)
    admin = AdminClient(address=hmmd.address)
    clients = [DmirrorClient(devices.py.address), DmirrorClient(devices.node.address)]
    names = (devices.py_names[0], devices.node_names[0])
    try:
        proc = await cpu.spawn("oom-interop")
        handles = [Handle(dm, (await proc.open(f"/dev/{name}"))[1], 0, 0)
                   for dm, name in zip(clients, names, strict=True)]
        ptr = await proc.mmap(N * P)
        await proc.write(ptr, pattern(N))
        for h in handles:
            assert (await h.cmd(CMD_READ, ptr, N)).data == pattern(N)
        used = (await admin.stats()).device(names[1]).memory_used_pages
        assert (await handles[1].cmd(CMD_MIGRATE_TO_DEV, ptr, N // 2)).cpages == N // 2
        assert (await admin.stats()).device(names[1]).memory_used_pages == used + N // 2

        r = await proc.oom_kill()

        assert (r.reaped, r.passes, r.pages_reaped) == (True, 1, N)
        stats = await admin.stats()
        assert stats.device(names[1]).memory_used_pages == used
        assert {n: stats.device(n).violations for n in names} == dict.fromkeys(names, 0)
        assert await admin.check_invariants() == []
    finally:
        for dm in clients:
            await dm.close()
        await admin.close()
        await cpu.close()


def test_node_device_refuses_bad_flags_and_names_its_devices(tmp_path: Path, hmmd: Program) -> None:
    """The command line: a bad memory kind is a usage error (exit 2); an unreachable
    daemon is exit 1 with a message; --help prints the flags."""
    node = node_executable()
    r = subprocess.run([node, str(NODE_MAIN), "--device", "x:shared"], capture_output=True, text=True, timeout=30,
                       check=False)
    assert r.returncode == 2 and "unknown memory kind shared" in r.stderr
    r = subprocess.run([node, str(NODE_MAIN), "--kernel", "127.0.0.1:1", "--device", "x"], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 1 and "cannot connect to 127.0.0.1:1" in r.stderr
    assert r.stderr.endswith("(is the server running at that address?)\n"), r.stderr
    r = subprocess.run([node, str(NODE_MAIN), "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0 and "--memory-pages" in r.stdout
    prog = start_node_dmirror(tmp_path, hmmd.address, "node_cli0", "node_cli1:coherent", args=("--memory-pages", "64"))
    try:
        asyncio.run(_check_devices(prog.address, hmmd.address))
    finally:
        assert prog.stop() == 0, prog.log_text()


async def _check_devices(address: str, kernel: str) -> None:
    from hmm.v1 import common_pb2, dmirror_pb2_grpc

    dm = DmirrorClient(address)
    admin = AdminClient(address=kernel)
    try:
        # grpc.health.v1, as the Python device serves it: for the server and the service.
        health = health_pb2_grpc.HealthStub(dm.channel)
        for service in ("", "hmm.v1.Dmirror"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await health.Check(health_pb2.HealthCheckRequest(service="hmm.v1.Nothing"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        reply = await dmirror_pb2_grpc.DmirrorStub(dm.channel).Devices(common_pb2.Empty())
        stats = await admin.stats()
        got = [(d.name, d.memory, d.owner) for d in reply.devices]
        assert got == [("node_cli0", "private", stats.device("node_cli0").owner),
                       ("node_cli1", "coherent", stats.device("node_cli1").owner)]
        assert stats.device("node_cli1").memory_pages == 64
    finally:
        await dm.close()
        await admin.close()
