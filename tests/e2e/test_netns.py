"""Devices on other hosts: hmmd and two dmirror devices, each in a network namespace
of its own with its own address, joined by veth pairs to a bridge (the "switch",
itself in a namespace); the tests drive them from the root namespace, a fourth host
on the same bridge.

Across that network: the conformance runner passes a subset of the kernel's
self-tests on each device, the demo passes against the running daemon and devices,
two devices mirroring one process stay coherent through CPU writes, and a device
whose link is cut is fenced within the callback deadline (or keepalive) while the
other device carries on with the right data.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for `ip netns`) and iproute2; skips
with the reason otherwise. Every namespace and link is removed at the end, also
when a test fails; names and the subnet are unique per run, so runs may overlap.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import os
import random
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from hmm.abi import PAGE_SIZE, Event
from hmm.admin import AdminClient
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import CMD_READ, CMD_WRITE
from hmm.process import ProcessClient
from tests.conftest import HMMD_ARGS
from tests.procs import Program, start

DEADLINE_S = float(HMMD_ARGS[HMMD_ARGS.index("--callback-deadline-ms") + 1]) / 1000
KEEPALIVE_S = float(HMMD_ARGS[HMMD_ARGS.index("--keepalive-ms") + 1]) / 1000
HEALTHCHECK = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"
KERNEL_PORT, DEVICE_PORT = 50051, 50061  # every host has its own ports
# 198.18.0.0/15 is set aside for network tests (RFC 2544): one /24 of it per run.
TEST_NET = ipaddress.ip_network("198.18.0.0/15")
N = 64  # pages
# Single-device conformance cases (the runner drives one device's command service).
CONFORMANCE_K = ("private and (open_close or anon_write_prot or file_read or hmm_cow_in_device or migrate_release"
                 " or exclusive_cow)")
CONFORMANCE_CASES = {f"test_{name}[private]" for name in (
    "open_close", "anon_write_prot", "file_read", "hmm_cow_in_device", "migrate_release", "exclusive_cow")}

pytestmark = pytest.mark.timeout(60)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def namespaces_unavailable() -> str | None:
    """Why this machine cannot make network namespaces, or None when it can."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    probe = f"hmm-probe-{secrets.token_hex(4)}"
    r = ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace (needs root, CAP_NET_ADMIN and CAP_SYS_ADMIN): {r.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of TEST_NET that no address or route of this host uses yet."""
    used = ip("-4", "-o", "addr", "show").stdout + ip("-4", "route", "show", "table", "all").stdout
    subnets = list(TEST_NET.subnets(new_prefix=24))
    random.shuffle(subnets)
    for net in subnets:
        if ".".join(str(net.network_address).split(".")[:3]) + "." not in used:
            return net
    raise RuntimeError(f"no free /24 in {TEST_NET}")


@dataclass
class Network:
    """The hosts: role -> namespace and address; 'host' is this (root) namespace."""

    uid: str
    subnet: ipaddress.IPv4Network
    namespaces: dict[str, str] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)

    @property
    def switch(self) -> str:
        return f"hmm-{self.uid}-sw"

    @property
    def host_link(self) -> str:
        return f"hm{self.uid}"  # the root namespace's end: unique, under 16 characters

    def exec_in(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[role]]

    def cut(self, role: str) -> None:
        """Unplug a host: its port on the switch goes down, packets to and from it are lost."""
        ip("-n", self.switch, "link", "set", role, "down")


def build_network(net: Network, roles: list[str]) -> None:
    ip("netns", "add", net.switch)
    ip("-n", net.switch, "link", "add", "br0", "type", "bridge")
    ip("-n", net.switch, "link", "set", "br0", "up")
    hosts = iter(net.subnet.hosts())
    # This namespace's end, for the tests' own clients.
    ip("link", "add", net.host_link, "type", "veth", "peer", "name", "host", "netns", net.switch)
    net.addresses["host"] = str(next(hosts))
    ip("addr", "add", f"{net.addresses['host']}/{net.subnet.prefixlen}", "dev", net.host_link)
    ip("link", "set", net.host_link, "up")
    ip("-n", net.switch, "link", "set", "host", "master", "br0", "up")
    for role in roles:
        ns = net.namespaces[role] = f"hmm-{net.uid}-{role}"
        ip("netns", "add", ns)
        # eth0 in the host's namespace, its peer (named after the role) on the switch.
        ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", role, "netns", net.switch)
        net.addresses[role] = str(next(hosts))
        ip("-n", ns, "addr", "add", f"{net.addresses[role]}/{net.subnet.prefixlen}", "dev", "eth0")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", net.switch, "link", "set", role, "master", "br0", "up")


def tear_down_network(net: Network) -> list[str]:
    """Delete every namespace (their links go with them) and this namespace's link;
    returns what could not be removed."""
    left = []
    for ns in [*net.namespaces.values(), net.switch]:
        ip("netns", "del", ns, check=False)
    ip("link", "del", net.host_link, check=False)
    names = set(ip("netns", "list").stdout.split())
    left += [ns for ns in [*net.namespaces.values(), net.switch] if ns in names]
    if ip("link", "show", net.host_link, check=False).returncode == 0:
        left.append(net.host_link)
    return left


@dataclass
class Hosts:
    net: Network
    kernel: Program
    devices: list[Program]
    names: list[str]  # device names, one per device program

    @property
    def kernel_address(self) -> str:
        return f"{self.net.addresses['kernel']}:{KERNEL_PORT}"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    net = Network(secrets.token_hex(3), free_subnet())
    logs = tmp_path_factory.mktemp("netns")
    started: list[Program] = []
    try:
        build_network(net, ["kernel", "dev0", "dev1"])
        kernel = start("hmmd", [*net.exec_in("kernel"), sys.executable, "-m", "hmmd", "--listen",
                                f"{net.addresses['kernel']}:{KERNEL_PORT}", *HMMD_ARGS], logs)
        started.append(kernel)
        names = [f"ns{net.uid}_{i}" for i in range(2)]
        devices = []
        for i, name in enumerate(names):
            role = f"dev{i}"
            devices.append(start(f"dmirror{i}", [
                *net.exec_in(role), sys.executable, "-m", "hmm.dmirror", "--kernel", kernel.address,
                "--listen", f"{net.addresses[role]}:{DEVICE_PORT}", "--device", name, "--snoop"], logs))
            started.append(devices[-1])
        yield Hosts(net, kernel, devices, names)
    finally:
        for prog in reversed(started):
            prog.stop(timeout=2)
        left = tear_down_network(net)
    assert not left, f"not cleaned up: {left}"


def load_healthcheck():  # noqa: ANN201 - a module loaded from deploy/
    spec = importlib.util.spec_from_file_location("hmm_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_program_is_on_its_own_host(hosts: Hosts) -> None:
    net = hosts.net
    assert hosts.kernel.address == f"{net.addresses['kernel']}:{KERNEL_PORT}"
    assert len({net.addresses[r] for r in ("host", "kernel", "dev0", "dev1")}) == 4
    for prog, role in ((hosts.kernel, "kernel"), (hosts.devices[0], "dev0"), (hosts.devices[1], "dev1")):
        # The program runs in its host's network namespace, not in this one.
        theirs = os.stat(f"/proc/{prog.pid}/ns/net").st_ino
        assert theirs == os.stat(f"/run/netns/{net.namespaces[role]}").st_ino
        assert theirs != os.stat("/proc/self/ns/net").st_ino
        addrs = ip("-n", net.namespaces[role], "-4", "-o", "addr", "show", "dev", "eth0").stdout
        assert f" {net.addresses[role]}/" in addrs
    # Every program answers gRPC health across the bridge (the image's health check).
    health = load_healthcheck()
    assert health.check(hosts.kernel_address, "hmm.v1.Device", 5.0) == "SERVING"
    for i, prog in enumerate(hosts.devices):
        assert prog.address == f"{net.addresses[f'dev{i}']}:{DEVICE_PORT}"
        assert health.check(prog.address, "hmm.v1.Dmirror", 5.0) == "SERVING"


def test_conformance_subset_on_each_remote_device(hosts: Hosts) -> None:
    runs = [subprocess.Popen([sys.executable, "-m", "hmmd.ctl", "conformance", "--kernel", hosts.kernel_address,
                              "--device", dev.address, "--devices", name, "-k", CONFORMANCE_K],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for dev, name in zip(hosts.devices, hosts.names, strict=True)]
    for run in runs:
        out, err = run.communicate(timeout=50)
        assert run.returncode == 0, out + err
        lines = out.splitlines()
        assert lines[-1] == f"{len(CONFORMANCE_CASES)} passed, 0 failed, 0 skipped, 0 xfailed", out
        assert {line.split()[0] for line in lines[:-1]} == CONFORMANCE_CASES


def test_demo_against_remote_daemon_and_devices(hosts: Hosts) -> None:
    argv = [sys.executable, "-m", "hmmd.ctl", "demo", "--kernel", hosts.kernel_address]
    for dev, name in zip(hosts.devices, hosts.names, strict=True):
        argv += ["--device", f"{name}={dev.address}"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=50, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout and "coherence violations: 0" in r.stdout, r.stdout
    assert "12 steps passed" in r.stdout, r.stdout


def pattern(npages: int, c: int = 0) -> np.ndarray:
    return np.arange(npages * PAGE_SIZE // 4, dtype=np.int32) + c


async def test_two_remote_devices_stay_coherent_then_a_cut_link_fences_one(hosts: Hosts) -> None:
    cpu = ProcessClient.connect(hosts.kernel_address)
    admin = AdminClient(cpu.channel)
    clients = [DmirrorClient(dev.address) for dev in hosts.devices]
    try:
        proc = await cpu.spawn("netns-workload")
        buf = await proc.mmap(N * PAGE_SIZE)
        data = pattern(N)
        await proc.write(buf, data.tobytes())
        files = [(await proc.open(f"/dev/{name}"))[1] for name in hosts.names]

        async def read(i: int, first: int = 0, npages: int = N) -> np.ndarray:
            r = await clients[i].command(files[i], CMD_READ, buf + first * PAGE_SIZE, npages)
            assert r.cpages == npages
            return np.frombuffer(r.data, dtype=np.int32)

        async def events(i: int) -> list[tuple[Event, int, int]]:
            return [(Event(e.event), e.start, e.end) for e in await clients[i].events(files[i], clear=True)]

        # Both devices mirror the process (range fault + DMA over the network).
        for i in range(2):
            assert (await read(i) == data).all()
            assert await events(i) == []
        # fork write-protects the parent: both devices hear it first.
        child = await proc.fork()
        for i in range(2):
            assert await events(i) == [(Event.PROTECTION_PAGE, buf, buf + N * PAGE_SIZE)]
            assert (await read(i) == data).all()
        # CPU writes to shared pages copy them: CLEAR reaches both devices, which then
        # read the new data; the child keeps the old.
        first, count = 8, 4
        new = pattern(count, 1 << 20)
        await proc.write(buf + first * PAGE_SIZE, new.tobytes())
        data[first * 1024:(first + count) * 1024] = new
        for i in range(2):
            evs = await events(i)
            assert evs and all(e == Event.CLEAR for e, _, _ in evs), evs
            cleared = {p for _, s, e in evs for p in range((s - buf) // PAGE_SIZE, (e - buf) // PAGE_SIZE)}
            assert cleared == set(range(first, first + count)), evs
            assert (await read(i) == data).all()
        assert (np.frombuffer(await child.read(buf, N * PAGE_SIZE), dtype=np.int32) == pattern(N)).all()
        await child.exit()
        # A device's write is seen by the CPU and by the other device.
        dev_data = pattern(4, 7 << 20)
        r = await clients[1].command(files[1], CMD_WRITE, buf + 16 * PAGE_SIZE, 4, dev_data.tobytes())
        assert r.cpages == 4
        data[16 * 1024:20 * 1024] = dev_data
        assert (np.frombuffer(await proc.read(buf, N * PAGE_SIZE), dtype=np.int32) == data).all()
        assert (await read(0) == data).all()
        for i in range(2):
            await events(i)

        # Unplug device 1's host. The next CPU change waits for its ack no longer
        # than the callback deadline (keepalive may notice first): it is fenced.
        hosts.net.cut("dev1")
        t0 = time.monotonic()
        await asyncio.wait_for(proc.munmap(buf, PAGE_SIZE), DEADLINE_S + KEEPALIVE_S + 5)
        took = time.monotonic() - t0
        assert took < DEADLINE_S + KEEPALIVE_S + 1.0, took
        st = (await admin.stats()).device(hosts.names[1])
        assert not st.alive, "the unplugged device was not fenced"
        r = st.fenced_reason
        assert "deadline" in r or r == "connection dropped" or r.startswith("stream broke"), r
        # Device 0 got the UNMAP before the page went, and serves the rest correctly.
        assert await events(0) == [(Event.UNMAP, buf, buf + PAGE_SIZE)]
        assert (await read(0, 1, N - 1) == data[1024:]).all()
        more = pattern(2, 9 << 20)
        await proc.write(buf + 30 * PAGE_SIZE, more.tobytes())
        data[30 * 1024:32 * 1024] = more
        assert (await read(0, 1, N - 1) == data[1024:]).all()
        stats = await admin.stats()
        assert stats.device(hosts.names[0]).alive and stats.device(hosts.names[0]).violations == 0
        await proc.exit()
    finally:
        for c in clients:
            await c.close()
        await cpu.close()
