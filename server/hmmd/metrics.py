"""Prometheus metrics of a daemon, served at http://HOST:PORT/metrics (--metrics-listen),
and /healthz beside them for HTTP probes (200 while serving, 503 once shutting down).

Latencies and counts of what happens come from the kernel's trace (a sink, so they
cost nothing while metrics are off); levels — RAM and device memory in use,
fenced devices, DMA violations — are read from the kernel at scrape time. A
device's series last as long as the kernel lists it (live, or among the last
fenced: Kernel.FENCED_KEPT). Each daemon has its own ``CollectorRegistry``, so
several can run in one process.

The endpoint is served on the daemon's event loop: a scrape reads the kernel
between two of its steps, never in the middle of one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hmm.abi import PAGE_SIZE
from hmm.errors import errno_name
from hmmd.core.kernel import Kernel
from hmmd.core.trace import Kind, TraceEvent

log = logging.getLogger(__name__)

# Seconds: a stream round trip is ~0.2 ms; the default callback deadline is 3 s.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
REQUEST_TIMEOUT_S = 10.0


class KernelCollector(Collector):
    """Levels read from the kernel when scraped."""

    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel

    def collect(self) -> Iterator[Metric]:
        k = self.k
        ram = GaugeMetricFamily("hmmd_ram_bytes", "System RAM of the emulated machine")
        ram.add_metric([], k.ram.nframes * PAGE_SIZE)
        used = GaugeMetricFamily("hmmd_ram_used_bytes", "System RAM in use (frames allocated)")
        used.add_metric([], k.ram.used_frames * PAGE_SIZE)
        huge = GaugeMetricFamily("hmmd_hugetlb_pages", "The hugetlb pool, in 2 MiB pages (reserved: promised to "
                                 "mappings at mmap, not faulted in yet; they count as free too)", labels=["state"])
        huge.add_metric(["total"], k.ram.hugetlb_pages)
        huge.add_metric(["free"], k.ram.hugetlb_free)
        huge.add_metric(["reserved"], k.ram.hugetlb_reserved)
        procs = GaugeMetricFamily("hmmd_processes", "Live processes")
        procs.add_metric([], len(k.processes))
        listed = k.listed_devices()
        fenced = sum(not d.alive for d in listed)
        devices = GaugeMetricFamily("hmmd_devices", "Devices by state (fenced: those Admin Stats still lists, "
                                    "the last of each name)", labels=["state"])
        devices.add_metric(["alive"], len(listed) - fenced)
        devices.add_metric(["fenced"], fenced)
        fenced_g = GaugeMetricFamily("hmmd_fenced_devices", "Devices fenced since the daemon started")
        fenced_g.add_metric([], k.fenced_total)
        mem = GaugeMetricFamily("hmmd_device_memory_bytes", "Device memory declared", labels=["device", "kind"])
        mem_used = GaugeMetricFamily("hmmd_device_memory_used_bytes", "Device memory in use (pages referenced)",
                                     labels=["device", "kind"])
        notifiers = GaugeMetricFamily("hmmd_notifiers", "Interval notifiers of each device", labels=["device"])
        violations = CounterMetricFamily("hmmd_dma_violations", "DMAs refused by the coherence sanitizer",
                                         labels=["device"])
        by_name: dict[str, int] = {}  # one series per name: a fenced device may share a live one's
        for d in listed:
            by_name[d.name] = by_name.get(d.name, 0) + d.violations
            if d.alive:
                notifiers.add_metric([d.name], len(d.notifiers))
            if d.pgmap is not None and d.alive:
                kind = d.pgmap.kind.name.removeprefix("DEVICE_").lower()
                mem.add_metric([d.name, kind], d.pgmap.npages * PAGE_SIZE)
                mem_used.add_metric([d.name, kind], d.pgmap.used_pages * PAGE_SIZE)
        for name, n in by_name.items():
            violations.add_metric([name], n)
        oom = CounterMetricFamily("hmmd_oom_kills", "Processes the OOM killer chose when reclaim could not make "
                                  "room (/proc/vmstat oom_kill)")
        oom.add_metric([], k.oom_kills)
        yield from (ram, used, huge, procs, devices, fenced_g, mem, mem_used, notifiers, violations, oom)


class Metrics:
    """The daemon's metrics: a trace sink, a collector, and the HTTP endpoint."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.serving = True  # what /healthz says: False from the start of shutdown on
        self.registry = CollectorRegistry()
        r = self.registry
        self.invalidation = Histogram("hmmd_invalidation_seconds", "An Invalidate callback, sent to acked",
                                      ["device"], buckets=LATENCY_BUCKETS, registry=r)
        self.unacked = Counter("hmmd_invalidations_unacked", "Invalidate callbacks that ended in fencing",
                               ["device"], registry=r)
        self.window = Histogram("hmmd_invalidation_window_seconds",
                                "An invalidation window's fan-out, first callback to last ack", ["event"],
                                buckets=LATENCY_BUCKETS, registry=r)
        self.range_faults = Counter("hmmd_range_faults", "Range faults (and snapshots) by result",
                                    ["device", "result"], registry=r)
        self.range_fault_pages = Counter("hmmd_range_fault_pages", "Pages asked for by range faults", ["device"],
                                         registry=r)
        self.range_fault_time = Histogram("hmmd_range_fault_seconds", "A range fault in the daemon", ["device"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.migrations = Counter("hmmd_migrations", "Migrations and evictions, setup to finalize",
                                  ["device", "direction", "outcome"], registry=r)
        self.migrated_pages = Counter("hmmd_migrated_pages", "Pages moved by migrations and evictions",
                                      ["device", "direction"], registry=r)
        self.migrated_bytes = Counter("hmmd_migrated_bytes", "Bytes moved by migrations and evictions",
                                      ["device", "direction"], registry=r)
        self.evictions = Counter("hmmd_evictions", "Evictions of a device's memory", ["device"], registry=r)
        self.migrate_to_ram = Histogram("hmmd_migrate_to_ram_seconds",
                                        "A CPU fault on a device page: MigrateToRam sent to acked",
                                        ["device", "result"], buckets=LATENCY_BUCKETS, registry=r)
        self.fences = Counter("hmmd_fences", "Devices fenced, by reason", ["device", "reason"], registry=r)
        # The series labelled by device, with their label names (to drop a device's).
        self._per_device: list[tuple[Counter | Histogram, tuple[str, ...]]] = [
            (self.invalidation, ("device",)), (self.unacked, ("device",)),
            (self.range_faults, ("device", "result")), (self.range_fault_pages, ("device",)),
            (self.range_fault_time, ("device",)), (self.migrations, ("device", "direction", "outcome")),
            (self.migrated_pages, ("device", "direction")), (self.migrated_bytes, ("device", "direction")),
            (self.evictions, ("device",)), (self.migrate_to_ram, ("device", "result")),
            (self.fences, ("device", "reason")),
        ]
        r.register(KernelCollector(kernel))
        kernel.trace.add_sink(self.observe)
        self._server: asyncio.Server | None = None

    def observe(self, ev: TraceEvent) -> None:
        """A trace sink: count and time the event."""
        dev = ev.device_name
        seconds = ev.dur_ns / 1e9
        match ev.kind:
            case Kind.INVALIDATE:
                self.invalidation.labels(dev).observe(seconds)
                if not ev.ok:
                    self.unacked.labels(dev).inc()
            case Kind.WINDOW:
                self.window.labels(ev.event).observe(seconds)
            case Kind.RANGE_FAULT:
                self.range_faults.labels(dev, errno_name(ev.errno) if ev.errno else "ok").inc()
                self.range_fault_pages.labels(dev).inc(ev.npages)
                self.range_fault_time.labels(dev).observe(seconds)
            case Kind.MIGRATE | Kind.EVICT:
                self.migrations.labels(dev, ev.direction, "rolled_back" if ev.rollback else "finalized").inc()
                self.migrated_pages.labels(dev, ev.direction).inc(ev.npages)
                self.migrated_bytes.labels(dev, ev.direction).inc(ev.nbytes)
                if ev.kind == Kind.EVICT:
                    self.evictions.labels(dev).inc()
            case Kind.MIGRATE_TO_RAM:
                self.migrate_to_ram.labels(dev, "ok" if ev.ok else "failed").observe(seconds)
            case Kind.FENCE:
                self.fences.labels(dev, _reason(ev.reason)).inc()

    def exposition(self) -> bytes:
        self._drop_forgotten()
        return generate_latest(self.registry)

    def _drop_forgotten(self) -> None:
        """Drop the series of devices the kernel forgot (it lists the live ones and the
        last fenced ones, Kernel.FENCED_KEPT): otherwise every device name ever seen
        would keep its series, and each scrape would grow with them."""
        listed = {d.name for d in self.kernel.listed_devices()}
        for metric, labels in self._per_device:
            gone = {tuple(s.labels[n] for n in labels) for family in metric.collect() for s in family.samples
                    if s.labels["device"] not in listed}
            for values in gone:
                metric.remove(*values)

    async def serve(self, listen: str) -> str:
        """Serve /metrics on HOST:PORT (port 0: any); returns the bound address."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        self._server = await asyncio.start_server(self._handle, host or "127.0.0.1", int(port))
        bound = self._server.sockets[0].getsockname()
        return f"{host or '127.0.0.1'}:{bound[1]}"

    async def close(self) -> None:
        self.kernel.trace.remove_sink(self.observe)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One HTTP/1.0-style exchange: GET /metrics or /healthz, then close."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            method, path = (head.split(b"\r\n", 1)[0].split(b" ") + [b"", b""])[:2]
            if method not in (b"GET", b"HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path.split(b"?")[0] in (b"/metrics", b"/"):
                status, body, ctype = "200 OK", self.exposition(), CONTENT_TYPE_LATEST
            elif path.split(b"?")[0] == b"/healthz":
                status, body, ctype = ("200 OK", b"ok\n", "text/plain") if self.serving \
                    else ("503 Service Unavailable", b"shutting down\n", "text/plain")
            else:
                status, body, ctype = "404 Not Found", b"see /metrics or /healthz\n", "text/plain"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + (body if method != b"HEAD" else b""))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a scraper that went away or sent nonsense
        finally:
            writer.close()


def _reason(reason: str) -> str:
    """A bounded label from a fencing reason ("missed the 1500 ms callback deadline" → "deadline")."""
    for key in ("deadline", "stream broke", "closed by the device", "shutting down", "handler ended"):
        if key in reason:
            return key.replace(" ", "_")
    return "other"
