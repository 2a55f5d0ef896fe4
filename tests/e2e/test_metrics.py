"""Prometheus metrics: a daemon started with --metrics-listen serves /metrics, and
its counters and histograms move with a workload; daemons in one process keep
their own registries."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from hmm.abi import PAGE_SIZE, PROT_READ
from hmm.device import DeviceConnection, Driver
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import CMD_MIGRATE_TO_DEV, CMD_READ
from hmm.process import ProcessClient
from hmmd.config import Config
from hmmd.core.kernel import FENCED_KEPT, Kernel
from hmmd.core.trace import Kind, TraceEvent
from hmmd.metrics import Metrics
from tests.conftest import HMMD_ARGS
from tests.core.conftest import FakeDevice
from tests.core.test_coherent import drain
from tests.procs import Program, start_dmirror, start_hmmd

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Program, str]]:
    prog = start_hmmd(tmp_path_factory.mktemp("hmmd-metrics"), *HMMD_ARGS, "--metrics-listen", "127.0.0.1:0")
    yield prog, metrics_url(prog)
    assert prog.stop() == 0, prog.log_text()


def metrics_url(prog: Program) -> str:
    # The bound port is logged (stdout's second line may sit in the first read's buffer).
    deadline = time.monotonic() + 10
    while not (found := re.search(r"metrics on (http://\S+)", prog.log_text())):
        assert time.monotonic() < deadline and prog.alive(), prog.log_text()
        time.sleep(0.05)
    return found.group(1)


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_with_a_workload(daemon: tuple[Program, str], tmp_path: Path) -> None:
    prog, url = daemon
    dm_prog = start_dmirror(tmp_path, prog.address, "mx0", "mx1", args=("--snoop",), name="dmirror-metrics")
    cpu = ProcessClient.connect(prog.address)
    dm = DmirrorClient(dm_prog.address)
    try:
        before = scrape(url)
        assert value(before, "hmmd_ram_bytes") == 2 << 30
        assert value(before, "hmmd_hugetlb_pages", state="total") == Config().hugetlb_pages
        assert value(before, "hmmd_hugetlb_pages", state="reserved") == 0
        assert value(before, "hmmd_oom_kills_total") == 0
        assert value(before, "hmmd_devices", state="alive") == 2
        assert value(before, "hmmd_device_memory_used_bytes", device="mx0", kind="private") == 0
        assert value(before, "hmmd_invalidation_seconds_count", device="mx0") == 0
        n = 16
        proc = await cpu.spawn("metered")
        a = await proc.mmap(n * PAGE_SIZE)
        await proc.write(a, b"m" * n * PAGE_SIZE)
        _, f0 = await proc.open("/dev/mx0")
        _, f1 = await proc.open("/dev/mx1")
        await dm.command(f0, CMD_READ, a, n)
        await dm.command(f1, CMD_READ, a, n)
        await dm.command(f0, CMD_MIGRATE_TO_DEV, a, 4)
        await proc.read(a, PAGE_SIZE)  # one page home: migrate_to_ram
        await proc.mprotect(a, n * PAGE_SIZE, PROT_READ)

        after = scrape(url)
        assert value(after, "hmmd_range_faults_total", device="mx0", result="ok") >= 1
        assert value(after, "hmmd_range_fault_pages_total", device="mx1") >= n
        assert value(after, "hmmd_migrations_total", device="mx0", direction="to_device", outcome="finalized") == 1
        assert value(after, "hmmd_migrated_pages_total", device="mx0", direction="to_device") == 4
        assert value(after, "hmmd_migrated_bytes_total", device="mx0", direction="to_device") == 4 * PAGE_SIZE
        assert value(after, "hmmd_migrated_bytes_total", device="mx0", direction="to_ram") == PAGE_SIZE
        assert value(after, "hmmd_migrate_to_ram_seconds_count", device="mx0", result="ok") == 1
        assert value(after, "hmmd_device_memory_used_bytes", device="mx0", kind="private") == 3 * PAGE_SIZE
        assert value(after, "hmmd_ram_used_bytes") > value(before, "hmmd_ram_used_bytes")
        assert value(after, "hmmd_dma_violations_total", device="mx0") == 0
        # mprotect invalidated both mirrors, the two migrations mx1 (mx0 is not sent its own): histograms moved.
        for dev, least in (("mx0", 1), ("mx1", 3)):
            count = value(after, "hmmd_invalidation_seconds_count", device=dev)
            assert count >= least
            assert value(after, "hmmd_invalidation_seconds_bucket", device=dev, le="+Inf") == count
            assert 0 < value(after, "hmmd_invalidation_seconds_sum", device=dev) < count * 1.5
        assert value(after, "hmmd_invalidation_window_seconds_count", event="PROTECTION_VMA") >= 1
        await proc.exit()

        dm_prog.stop()  # both devices go: fenced
        for _ in range(100):
            gone = scrape(url)
            if value(gone, "hmmd_fenced_devices") == 2:
                break
            await asyncio.sleep(0.05)
        assert value(gone, "hmmd_devices", state="fenced") == 2
        assert value(gone, "hmmd_fences_total", device="mx0", reason="closed_by_the_device") == 1
    finally:
        await dm.close()
        await cpu.close()
        dm_prog.stop()


def test_metrics_endpoint_paths(daemon: tuple[Program, str]) -> None:
    _, url = daemon
    base = url.removesuffix("/metrics")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(base + "/nope", timeout=10)
    assert info.value.code == 404
    assert "hmmd_ram_bytes" in urllib.request.urlopen(base + "/", timeout=10).read().decode()
    ok = urllib.request.urlopen(base + "/healthz", timeout=10)
    assert (ok.status, ok.read()) == (200, b"ok\n")


class SlowToDetach(Driver):
    """Gives its memory back (capability detach) only when the test lets it."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def detach(self, reason: str) -> None:
        self.asked.set()
        await self.release.wait()


def health_of(url: str) -> tuple[int, bytes]:
    try:
        r = urllib.request.urlopen(url, timeout=10)
        return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


async def test_healthz_is_503_from_the_start_of_shutdown(tmp_path: Path) -> None:
    """SIGTERM: while the daemon waits for a device to give its memory back, /healthz
    answers 503 and the gRPC health service NOT_SERVING; once it has, the daemon
    exits cleanly."""
    # The daemon waits for the detach within the device's deadline: long enough here.
    prog = start_hmmd(tmp_path, *HMMD_ARGS, "--callback-deadline-ms", "20000", "--metrics-listen", "127.0.0.1:0")
    url = metrics_url(prog).removesuffix("/metrics") + "/healthz"
    driver = SlowToDetach()
    conn = await DeviceConnection.connect(prog.address, "slow0", driver)
    try:
        assert await asyncio.to_thread(health_of, url) == (200, b"ok\n")
        prog.signal(signal.SIGTERM)
        await asyncio.wait_for(driver.asked.wait(), 10)
        assert await asyncio.to_thread(health_of, url) == (503, b"shutting down\n")
        async with grpc.aio.insecure_channel(prog.address) as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        driver.release.set()  # the detach is acked: the daemon ends the session and exits
        assert await asyncio.to_thread(prog.proc.wait, 10) == 0, prog.log_text()
    finally:
        await conn.close()
        prog.stop()


def test_each_daemon_has_its_own_registry() -> None:
    k1 = Kernel(16 << 20)
    k1.register_device("d", FakeDevice())  # (the series of a device the kernel does not list go)
    m1, m2 = Metrics(k1), Metrics(Kernel(32 << 20))  # no "duplicated timeseries"
    m1.observe(TraceEvent(Kind.RANGE_FAULT, 0, 1000, device_name="d", npages=3))
    assert b'hmmd_range_faults_total{device="d",result="ok"} 1.0' in m1.exposition()
    assert b"hmmd_range_faults_total{" not in m2.exposition()
    assert b"hmmd_ram_bytes 3.3554432e+07" in m2.exposition()


async def test_the_series_of_a_forgotten_device_go() -> None:
    """Only the devices the kernel still lists keep their series: devices that come
    and go under new names do not grow the metrics without bound."""
    k = Kernel(16 << 20)
    m = Metrics(k)
    n = FENCED_KEPT + 2
    for i in range(n):
        dev = k.register_device(f"d{i}", FakeDevice())
        m.observe(TraceEvent(Kind.RANGE_FAULT, 0, 1000, device_id=dev.id, device_name=dev.name, npages=1))
        k.fence_device(dev, "stream closed by the device")
    await drain(k)
    text = m.exposition().decode()
    assert 'device="d0"' not in text and 'device="d1"' not in text
    for i in range(2, n):
        assert f'hmmd_fences_total{{device="d{i}",reason="closed_by_the_device"}} 1.0' in text
        assert f'hmmd_range_faults_total{{device="d{i}",result="ok"}} 1.0' in text
    assert f"hmmd_fenced_devices {float(n)}" in text
    assert f'hmmd_devices{{state="fenced"}} {float(FENCED_KEPT)}' in text
