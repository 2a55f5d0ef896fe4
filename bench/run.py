"""hmmd benchmark: invalidation and munmap latency, range-fault and migration throughput,
migrate_to_ram latency, and their floors.

    .venv/bin/python bench/run.py [--quick] [--json FILE]

Every component is its own OS process, started with ``subprocess`` machinery before
this process opens any gRPC channel (no fork after gRPC started):

* ``hmmd`` (``python -m hmmd --listen 127.0.0.1:0``),
* the floor server (``bench/floor.py``: bare grpc.aio, generic bytes handlers),
* one device worker per device (``bench/devproc.py``: the SDK, driven over stdin/stdout),
  plus one with device-private memory for the migration scenario,
* this process: the CPU side (``hmm.process``) and the floor clients.

Writes and prints ``{"machine": {...}, "metrics": {NAME: {"value", "unit", "floor",
"floor_name", "ratio"}}}``. ratio = value / floor for every metric: for latencies
lower is better (1.0 = as fast as bare gRPC), for throughputs higher is better
(1.0 = as fast as bare gRPC moving the same bytes). Progress and details go to stderr.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import platform
import signal
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from project_python import ensure  # noqa: E402

ensure(__file__)

import numpy as np  # noqa: E402

from hmm.malloc import DEFAULT_KEEP_MIB  # noqa: E402
from hmm.malloc import KEEP_ENV as MALLOC_KEEP_ENV  # noqa: E402

PAGE = 4096
REQ_FAULT = 0x1
REQ_WRITE = 0x2
PROT_READ, PROT_WRITE = 0x1, 0x2
NOTIFIER_ALL = (0, 1 << 47)
SCENARIOS = ("invalidate", "munmap", "range_fault", "migrate")
MIB = 1 << 20
# Migration pieces: dmirror's 512 pages (2 MiB), and 4096 pages (16 MiB): the largest
# power of two whose messages stay under glibc's 32 MiB cap on the dynamic mmap
# threshold (a 32 MiB message is malloc'ed with a fresh mmap each time and page-faulted:
# bare gRPC drops from ~1.1 to ~0.4 GB/s there; 8192 pages would also fit the 64 MiB
# message limit). See bench/README.md.
PIECE_SMALL = 512
PIECE_LARGE = 4096
# The pipelined variant: 512-page pieces, this many migrations in flight at once,
# against the bytes floor with as many calls in flight.
PIPELINE_DEPTH = 2
PIPELINED = f"{PIECE_SMALL}x{PIPELINE_DEPTH}"
# The streamed variant: the whole range one migration, its contents a DmaReadStream /
# MigratePagesStream of 512-page messages (capability bulk-stream), against bare gRPC
# streams of as many 2 MiB messages.
STREAMED = "stream"
# Through the shared-memory staging area the message limit does not bound a piece; the
# default is set in Plan.make (see bench/README.md), --shm-piece overrides it.

# Raised malloc thresholds (ARCHITECTURE.md, Performance) for --tune-malloc.
TUNED_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(256 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_TOP_PAD_": str(64 << 20),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    quick: bool
    devices: int
    rf_pages: int
    floor_unary: int  # samples per floor half (floors are measured before and after)
    floor_bidi: int
    inv_iters: int
    inv8_iters: int
    inv_warmup: int
    munmap_iters: int
    cold_reps: int
    present_reps: int  # each followed by one floor call
    mig_pages: int  # pages migrated to the device and back per repetition
    mig_reps: int  # repetitions with 512-page pieces (each followed by the bytes floor)
    mig_large_reps: int  # repetitions with 4096-page pieces
    mig_shm_reps: int  # repetitions through the shared-memory staging area
    shm_piece: int  # pages per piece through the staging area
    to_ram_iters: int
    memcpy_reps: int

    @classmethod
    def make(cls, quick: bool, devices: int, pages: int | None, shm_piece: int | None = None) -> Plan:
        if quick:
            return cls(True, devices, pages or 65_536, 800, 1000, 1000, 600, 100, 200, 3, 9,
                       4096, 5, 3, 5, shm_piece or 4096, 300, 5)
        return cls(False, devices, pages or 262_144, 4000, 5000, 8000, 4000, 300, 1500, 5, 15,
                   16384, 7, 5, 7, shm_piece or 16384, 1000, 9)

    @property
    def shm_bytes(self) -> int:
        """The staging area the migration device asks for: its memory (kept in the
        area, DeviceConnection.shared_memory) and one piece for transfer buffers."""
        return (self.mig_memory_pages + min(self.shm_piece, self.mig_pages)) * PAGE

    @property
    def mig_memory_pages(self) -> int:  # twice the migrated size: frees arrive asynchronously
        return 2 * self.mig_pages + 1024


# ---- child processes ------------------------------------------------------------------
_ALL_PIDS: list[int] = []


def _kill_leftovers() -> None:  # last resort if the loop died without its finally
    for pid in _ALL_PIDS:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


atexit.register(_kill_leftovers)


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    drain: asyncio.Task[None] | None = None

    async def readline(self, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            rc = await asyncio.wait_for(self.proc.wait(), 5)
            raise RuntimeError(f"{self.name} exited (rc={rc}) before answering; see the log")
        return line

    def drain_stdout(self) -> None:
        async def _drain() -> None:
            assert self.proc.stdout is not None
            while await self.proc.stdout.readline():
                pass
        self.drain = asyncio.ensure_future(_drain())

    async def stop(self) -> None:
        p = self.proc
        if p.returncode is None:
            if p.stdin is not None:
                try:
                    p.stdin.close()
                except Exception:
                    pass
            try:
                p.terminate()
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(p.wait(), 3)
            except TimeoutError:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
                try:
                    await asyncio.wait_for(p.wait(), 3)
                except TimeoutError:
                    log(f"{self.name} (pid {p.pid}) would not die")
        if p.returncode is not None and p.pid in _ALL_PIDS:
            _ALL_PIDS.remove(p.pid)  # reaped: never signal a pid that may be reused
        if self.drain is not None:
            self.drain.cancel()


class Device(Child):
    async def cmd(self, timeout: float = 30.0, **kw: object) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(kw) + "\n").encode())
        await asyncio.wait_for(self.proc.stdin.drain(), timeout)
        reply = json.loads(await self.readline(timeout))
        if not reply.get("ok"):
            raise RuntimeError(f"{self.name}: {kw.get('cmd')} failed: {reply.get('error')}")
        return reply


async def spawn(cls: type[Child], name: str, argv: list[str], env: dict[str, str], logf: int,
                stdin: bool) -> Child:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=logf, env=env, cwd=str(HERE.parent),
        limit=1 << 20,
    )
    _ALL_PIDS.append(proc.pid)
    return cls(name, proc)


# ---- statistics and metrics -----------------------------------------------------------
def pct(samples: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


class Metrics:
    def __init__(self) -> None:
        self.m: dict[str, dict[str, object]] = {}

    def add(self, name: str, value: float, unit: str, floor: float | None = None,
            floor_name: str | None = None) -> None:
        ratio = (value / floor) if floor else None
        self.m[name] = {
            "value": round(float(value), 3),
            "unit": unit,
            "floor": None if floor is None else round(float(floor), 3),
            "floor_name": floor_name if floor is not None else None,
            "ratio": None if ratio is None else round(ratio, 3),
        }
        extra = f"  (floor {floor_name} = {floor:.1f}, ratio {ratio:.2f})" if floor else ""
        log(f"  {name} = {value:,.3f} {unit}{extra}" if value < 100 else f"  {name} = {value:,.1f} {unit}{extra}")

    def add_absent(self, name: str, unit: str, note: str, floor: float | None = None,
                   floor_name: str | None = None) -> None:
        """A metric that cannot be measured yet: value and ratio null, and why."""
        self.m[name] = {
            "value": None,
            "unit": unit,
            "floor": None if floor is None else round(float(floor), 3),
            "floor_name": floor_name if floor is not None else None,
            "ratio": None,
            "note": note,
        }
        log(f"  {name} = null ({note})")


# ---- machine ----------------------------------------------------------------------------
def _cpu_ticks() -> tuple[int, int]:
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return sum(f), idle


async def cpu_busy(seconds: float) -> float:
    """Fraction of all CPUs busy over ``seconds`` (other work on the machine, before we start)."""
    try:
        t0, i0 = _cpu_ticks()
        await asyncio.sleep(seconds)
        t1, i1 = _cpu_ticks()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def machine_info(env_note: str) -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import grpc
    versions: dict[str, str] = {"grpcio": grpc.__version__}
    for mod in ("numpy", "uvloop", "google.protobuf"):
        try:
            versions[mod.split(".")[-1]] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:
            versions[mod.split(".")[-1]] = "absent"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    commit = "unknown"
    try:
        import subprocess
        root = str(HERE.parent)
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "server", "client"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        if dirty:
            commit += "+dirty"
    except Exception:
        pass
    return {
        "hmmd_commit": commit,
        "cpu_model": cpu,
        "cores": affinity,
        "cpu_count": os.cpu_count(),
        "mem_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "grpcio": versions["grpcio"],
        "protobuf": versions["protobuf"],
        "numpy": versions["numpy"],
        "uvloop": versions["uvloop"],
        "malloc": env_note,
    }


# ---- scenarios ----------------------------------------------------------------------------
async def measure_floors(fch, plan: Plan, acc: dict[str, list[float]]) -> None:  # noqa: ANN001
    import floor
    acc["unary"] += await floor.unary_rtt_us(fch, plan.floor_unary)
    acc["bidi"] += await floor.bidi_rtt_server_timed_us(fch, plan.floor_bidi)
    acc["bidi_client"] += await floor.bidi_rtt_client_timed_us(fch, plan.floor_bidi)


async def stats(admin, reset: bool = False):  # noqa: ANN001, ANN201
    from hmm.v1 import admin_pb2
    return await asyncio.wait_for(admin.Stats(admin_pb2.StatsRequest(reset_latencies=reset)), 10)


def dev_stats(st, name: str):  # noqa: ANN001, ANN201
    for d in st.devices:
        if d.name == name:
            return d
    raise RuntimeError(f"device {name} not in Stats")


async def mirrored_page(cpu, devs: list[Device], name: str):  # noqa: ANN001, ANN201
    """A process with one written page that every device in ``devs`` mirrors (range-faulted)."""
    proc = await cpu.spawn(name)
    a = await proc.mmap(PAGE)
    await proc.write(a, bytes(range(256)) * (PAGE // 256))
    mirrors = []
    for d in devs:
        await proc.open(f"/dev/{d.name}")
        mid = (await d.cmd(cmd="mirror", pid=proc.pid, start=a, length=PAGE))["mirror"]
        r = await d.cmd(cmd="fault", mirror=mid, start=a, end=a + PAGE, flags=REQ_FAULT | REQ_WRITE)
        if r["valid"] != 1:
            raise RuntimeError(f"{d.name} could not fault the page: {r}")
        mirrors.append(mid)
    return proc, a, mirrors


async def toggle_loop(proc, a: int, iters: int) -> list[float]:  # noqa: ANN001
    """mprotect RW->RO->RW...; each call invalidates every mirror of the page."""
    perf = time.perf_counter
    out = []
    prot = PROT_READ
    for _ in range(iters):
        t0 = perf()
        await proc.mprotect(a, PAGE, prot)
        out.append((perf() - t0) * 1e6)
        prot = PROT_READ if prot != PROT_READ else PROT_READ | PROT_WRITE
    if prot != PROT_READ:  # the last call made it read-only: leave it writable (untimed)
        await proc.mprotect(a, PAGE, PROT_READ | PROT_WRITE)
    return out


async def bench_invalidate_1dev(cpu, admin, dev: Device, plan: Plan, res: dict) -> None:  # noqa: ANN001
    proc, a, _ = await mirrored_page(cpu, [dev], "inv1")
    before = (await dev.cmd(cmd="stats"))["invalidations"]
    await toggle_loop(proc, a, plan.inv_warmup)
    seen = (await dev.cmd(cmd="stats"))["invalidations"] - before
    if seen != plan.inv_warmup:
        raise RuntimeError(f"{plan.inv_warmup} mprotects gave {seen} invalidations, expected one each")
    await stats(admin, reset=True)
    client = await toggle_loop(proc, a, plan.inv_iters)
    st = await stats(admin, reset=True)
    lat = dev_stats(st, dev.name).invalidate_latency
    res["inv1"] = {"p50": lat.p50_us, "p99": lat.p99_us, "count": lat.count, "max": lat.max_us,
                   "window_p50": st.window_latency.p50_us, "window_p99": st.window_latency.p99_us,
                   "client_p50": pct(client, 50), "client_p99": pct(client, 99),
                   "invalidations_per_mprotect": seen / plan.inv_warmup}
    await proc.exit()


async def bench_invalidate_ndev(cpu, admin, devs: list[Device], fch, floor_addr: str, plan: Plan,  # noqa: ANN001
                                res: dict) -> None:
    import floor
    proc, a, _ = await mirrored_page(cpu, devs, f"inv{len(devs)}")
    # The bare-gRPC fan-out to the same N processes, in two halves around the measurement.
    for d in devs:
        await d.cmd(cmd="fan_join", addr=floor_addr)
    half = max(1, plan.inv8_iters // 2)
    fan = await floor.fanout_rtt_us(fch, len(devs), half)
    await toggle_loop(proc, a, plan.inv_warmup)
    await stats(admin, reset=True)
    client = await toggle_loop(proc, a, plan.inv8_iters)
    st = await stats(admin, reset=True)
    fan += await floor.fanout_rtt_us(fch, len(devs), half)
    for d in devs:
        await d.cmd(cmd="fan_leave")
    per_dev = [dev_stats(st, d.name).invalidate_latency for d in devs]
    res["invN"] = {"n": len(devs), "window_p50": st.window_latency.p50_us, "window_p99": st.window_latency.p99_us,
                   "window_count": st.window_latency.count,
                   "dev_p50_median": float(np.median([x.p50_us for x in per_dev])),
                   "dev_p99_max": max(x.p99_us for x in per_dev),
                   "client_p50": pct(client, 50), "client_p99": pct(client, 99),
                   "fan_p50": pct(fan, 50), "fan_p99": pct(fan, 99), "fan_count": len(fan)}
    await proc.exit()


async def bench_munmap(cpu, dev: Device, plan: Plan, res: dict) -> None:  # noqa: ANN001
    proc = await cpu.spawn("munmap")
    await proc.open(f"/dev/{dev.name}")
    mid = (await dev.cmd(cmd="mirror", pid=proc.pid, start=NOTIFIER_ALL[0], length=NOTIFIER_ALL[1]))["mirror"]
    page = b"\xa5" * PAGE
    perf = time.perf_counter
    out = []
    warm = max(20, plan.munmap_iters // 10)
    for i in range(warm + plan.munmap_iters):
        a = await proc.mmap(PAGE)
        await proc.write(a, page)
        r = await dev.cmd(cmd="fault", mirror=mid, start=a, end=a + PAGE, flags=REQ_FAULT | REQ_WRITE)
        if r["valid"] != 1:
            raise RuntimeError(f"device could not fault the page: {r}")
        t0 = perf()
        await proc.munmap(a, PAGE)
        t1 = perf()
        if i >= warm:
            out.append((t1 - t0) * 1e6)
    res["munmap"] = {"p50": pct(out, 50), "p99": pct(out, 99), "count": len(out)}
    await dev.cmd(cmd="unmirror", mirror=mid)
    await proc.exit()


async def bench_range_fault(cpu, dev: Device, floor_addr: str, plan: Plan, res: dict) -> None:  # noqa: ANN001
    n = plan.rf_pages
    length = n * PAGE
    proc = await cpu.spawn("rangefault")
    await proc.open(f"/dev/{dev.name}")
    mid = (await dev.cmd(cmd="mirror", pid=proc.pid, start=NOTIFIER_ALL[0], length=NOTIFIER_ALL[1]))["mirror"]
    timeout = 300.0

    async def fault(a: int, flags: int) -> dict:
        r = await dev.cmd(timeout, cmd="fault", mirror=mid, start=a, end=a + length, flags=flags)
        if r["valid"] != n:
            raise RuntimeError(f"range fault left pages invalid: {r}")
        if flags & REQ_WRITE and r["write"] != n:
            raise RuntimeError(f"write range fault left pages read-only: {r}")
        return r

    cold, cold_w, present, rb = [], [], [], []
    for _ in range(plan.cold_reps):  # never-touched anonymous memory, read fault (zero page)
        a = await proc.mmap(length)
        cold.append((await fault(a, REQ_FAULT))["us"])
        await proc.munmap(a, length)
    region = 0
    for i in range(plan.cold_reps):  # never-touched, write fault (allocate + map writable)
        a = await proc.mmap(length)
        cold_w.append((await fault(a, REQ_FAULT | REQ_WRITE))["us"])
        if i < plan.cold_reps - 1:
            await proc.munmap(a, length)
        else:
            region = a
    # Informative floor, from the same device process: a bare unary echo (read_begin's
    # shape) then a bare unary call returning an n-page RangeFaultReply (8-byte pfn +
    # 1 flag byte + 1 order byte per page), served from a cache by the floor server.
    # Interleaved with the present faults so that both see the same machine.
    bulk: list[float] = []
    await dev.cmd(timeout, cmd="floor_bulk", addr=floor_addr, pages=n, count=1)  # connect + warm up
    for _ in range(plan.present_reps):  # populated by the write fault above
        r = await fault(region, REQ_FAULT)
        present.append(r["us"])
        rb.append(r["read_begin_us"])
        bulk += (await dev.cmd(timeout, cmd="floor_bulk", addr=floor_addr, pages=n, count=1))["s"]
    await proc.munmap(region, length)
    res["rf"] = {"pages": n, "cold_us": cold, "cold_write_us": cold_w, "present_us": present,
                 "present_read_begin_us": rb,
                 "floor_s": bulk}
    await dev.cmd(cmd="unmirror", mirror=mid)
    await proc.exit()


async def check_pool_idle(mig: Device, timeout: float = 10.0) -> dict:
    """Wait until every device page came back through page_free (asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        st = await mig.cmd(cmd="pool")
        if st["free"] == st["total"]:
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"device pages not freed: {st}")
        await asyncio.sleep(0.01)


async def bench_migrate_to_ram(cpu, admin, mig: Device, plan: Plan, res: dict) -> None:  # noqa: ANN001
    """One CPU touch (a 4-byte Process.Read) of a device-private page, timed end to end
    by the CPU side, and by the daemon from the fault to the page mapped home (its
    migrate_to_ram latency of the device); the page is migrated back to the device
    between touches (untimed)."""
    proc = await cpu.spawn("toram")
    await proc.open(f"/dev/{mig.name}")
    a = await proc.mmap(PAGE)
    page = bytes(range(256)) * (PAGE // 256)
    await proc.write(a, page)
    before = (await mig.cmd(cmd="pool"))["to_ram"]
    await mig.cmd(cmd="to_ram_times")  # clear
    perf = time.perf_counter
    out = []
    warm = max(20, plan.to_ram_iters // 10)
    for i in range(warm + plan.to_ram_iters):
        if i == warm:
            await stats(admin, reset=True)
        r = await mig.cmd(cmd="to_dev", pid=proc.pid, start=a, length=PAGE, piece=1)
        if r["moved"] != 1:
            raise RuntimeError(f"the page did not migrate to the device: {r}")
        t0 = perf()
        got = await proc.read(a, 4)
        t1 = perf()
        if got != page[:4]:
            raise RuntimeError(f"read {got!r} from the page, expected {page[:4]!r}")
        if i >= warm:
            out.append((t1 - t0) * 1e6)
    served = (await mig.cmd(cmd="pool"))["to_ram"] - before
    if served != warm + plan.to_ram_iters:
        raise RuntimeError(f"{warm + plan.to_ram_iters} touches, {served} migrate_to_ram callbacks")
    daemon = dev_stats(await stats(admin, reset=True), mig.name).migrate_to_ram_latency
    if daemon.count != plan.to_ram_iters:
        raise RuntimeError(f"{plan.to_ram_iters} touches timed, the daemon timed {daemon.count} faults")
    dev = await mig.cmd(cmd="to_ram_times")
    await proc.exit()
    await check_pool_idle(mig)
    res["to_ram"] = {"p50": pct(out, 50), "p99": pct(out, 99), "count": len(out),
                     "daemon_p50": daemon.p50_us, "daemon_p99": daemon.p99_us,
                     "device_callback_p50": pct(dev["total_us"][warm:], 50),
                     "device_setup_p50": pct(dev["setup_us"][warm:], 50),
                     "device_pages_p50": pct(dev["pages_us"][warm:], 50)}


async def bench_migrate(cpu, mig: Device, floor_addr: str, plan: Plan, res: dict) -> None:  # noqa: ANN001
    """Written anonymous memory to the device and back, piece by piece, timed in the
    device process; the bare-gRPC bytes floor from the same process after each repetition."""
    n = plan.mig_pages
    length = n * PAGE
    proc = await cpu.spawn("migrate")
    await proc.open(f"/dev/{mig.name}")
    a = await proc.mmap(length)
    data = np.random.default_rng(3).integers(0, 1 << 32, length // 4, dtype=np.uint32).tobytes()
    chunk = 16 * MIB
    for off in range(0, length, chunk):
        await proc.write(a + off, data[off:off + chunk])
    crc = zlib.crc32(data)
    timeout = 120.0

    async def check_home() -> None:
        for off in range(0, length, chunk):
            if await proc.read(a + off, min(chunk, length - off)) != data[off:off + chunk]:
                raise RuntimeError(f"data differs after the round trip at offset {off:#x}")

    out: dict[str, object] = {"pages": n}
    await mig.cmd(timeout, cmd="floor_bytes", addr=floor_addr, total=4 * MIB, payload=2 * MIB, count=1,
                  upload=False)  # connect and warm up
    variants = ((str(PIECE_SMALL), PIECE_SMALL, 1, plan.mig_reps),
                (PIPELINED, PIECE_SMALL, PIPELINE_DEPTH, plan.mig_reps),
                (str(PIECE_LARGE), PIECE_LARGE, 1, plan.mig_large_reps),
                (STREAMED, n, 1, plan.mig_reps))
    for key, piece, inflight, reps in variants:
        stream = key == STREAMED
        payload = PIECE_SMALL * PAGE if stream else piece * PAGE
        floor_cmd = "floor_stream_bytes" if stream else "floor_bytes"
        dev_s, sys_s, down, up, ph_dev, ph_sys = [], [], [], [], [], []
        for r in range(reps):
            await check_pool_idle(mig)
            d = await mig.cmd(timeout, cmd="to_dev", pid=proc.pid, start=a, length=length, piece=piece,
                              inflight=inflight, stream=stream)
            if d["moved"] != n:
                raise RuntimeError(f"{d['moved']} of {n} pages moved to the device")
            if r in (0, reps - 1) and (await mig.cmd(timeout, cmd="dev_crc"))["crc32"] != crc:
                raise RuntimeError("the device does not hold the data that was migrated")
            h = await mig.cmd(timeout, cmd="to_sys", pid=proc.pid, start=a, length=length, piece=piece,
                              inflight=inflight)
            if h["moved"] != n:
                raise RuntimeError(f"{h['moved']} of {n} pages moved home")
            if r in (0, reps - 1):
                await check_home()
            dev_s.append(d["s"])
            sys_s.append(h["s"])
            ph_dev.append(d["phases"])
            ph_sys.append(h["phases"])
            down += (await mig.cmd(timeout, cmd=floor_cmd, addr=floor_addr, total=length, payload=payload,
                                   count=1, upload=False, inflight=inflight))["s"]
            up += (await mig.cmd(timeout, cmd=floor_cmd, addr=floor_addr, total=length, payload=payload,
                                 count=1, upload=True, inflight=inflight))["s"]
        out[key] = {"to_dev_s": dev_s, "to_sys_s": sys_s, "floor_down_s": down, "floor_up_s": up,
                           "pieces": d["pieces"],
                           "to_dev_phases_median_s": {k: float(np.median([p[k] for p in ph_dev])) for k in ph_dev[0]},
                           "to_sys_phases_median_s": {k: float(np.median([p[k] for p in ph_sys])) for k in ph_sys[0]}}
    # The same through the shared-memory staging area (no bytes floor: memcpy is its floor).
    dev_s, sys_s, ph_dev, ph_sys = [], [], [], []
    for r in range(plan.mig_shm_reps):
        await check_pool_idle(mig)
        d = await mig.cmd(timeout, cmd="to_dev", pid=proc.pid, start=a, length=length, piece=plan.shm_piece, shm=True)
        if d["moved"] != n:
            raise RuntimeError(f"{d['moved']} of {n} pages moved to the device through shared memory")
        if r in (0, plan.mig_shm_reps - 1) and (await mig.cmd(timeout, cmd="dev_crc"))["crc32"] != crc:
            raise RuntimeError("the device does not hold the data that was migrated through shared memory")
        h = await mig.cmd(timeout, cmd="to_sys", pid=proc.pid, start=a, length=length, piece=plan.shm_piece, shm=True)
        if h["moved"] != n:
            raise RuntimeError(f"{h['moved']} of {n} pages moved home through shared memory")
        if r in (0, plan.mig_shm_reps - 1):
            await check_home()
        dev_s.append(d["s"])
        sys_s.append(h["s"])
        ph_dev.append(d["phases"])
        ph_sys.append(h["phases"])
    out["shm"] = {"piece": plan.shm_piece, "to_dev_s": dev_s, "to_sys_s": sys_s, "pieces": d["pieces"],
                  "to_dev_phases_median_s": {k: float(np.median([p[k] for p in ph_dev])) for k in ph_dev[0]},
                  "to_sys_phases_median_s": {k: float(np.median([p[k] for p in ph_sys])) for k in ph_sys[0]}}
    out["memcpy_s"] = (await mig.cmd(timeout, cmd="memcpy", bytes=64 * MIB, count=plan.memcpy_reps))["s"]
    await proc.exit()
    await check_pool_idle(mig)
    res["mig"] = out


async def measure(args: argparse.Namespace, plan: Plan, addr: str, floor_addr: str, devs: list[Device],
                  mig: Device | None, res: dict, acc: dict[str, list[float]]) -> None:
    import floor

    from hmm.process import ProcessClient
    from hmm.v1 import admin_pb2_grpc
    cpu = ProcessClient.connect(addr)
    admin = admin_pb2_grpc.AdminStub(cpu.channel)
    fch = floor.connect(floor_addr)
    try:
        only = set(args.only)
        log("floors (first half)")
        await measure_floors(fch, plan, acc)
        if "invalidate" in only:
            log("invalidate, 1 device")
            await bench_invalidate_1dev(cpu, admin, devs[0], plan, res)
            log(f"invalidate, {len(devs)} devices")
            await bench_invalidate_ndev(cpu, admin, devs, fch, floor_addr, plan, res)
        if "munmap" in only:
            log("munmap of a mirrored page")
            await bench_munmap(cpu, devs[0], plan, res)
        if mig is not None:
            log("migrate_to_ram of one device-private page")
            await bench_migrate_to_ram(cpu, admin, mig, plan, res)
        log("floors (second half)")
        await measure_floors(fch, plan, acc)
        if "range_fault" in only:
            log(f"range faults, {plan.rf_pages} pages")
            await bench_range_fault(cpu, devs[0], floor_addr, plan, res)
        if mig is not None:
            log(f"migration of {plan.mig_pages * PAGE // MIB} MiB to the device and back")
            await bench_migrate(cpu, mig, floor_addr, plan, res)
    finally:
        await fch.close()
        await cpu.close()


# ---- main ----------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> dict:
    plan = Plan.make(args.quick, args.devices, args.pages, args.shm_piece)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if args.malloc_keep_mib is not None:
        env["HMMD_MALLOC_KEEP_MIB"] = env[MALLOC_KEEP_ENV] = str(args.malloc_keep_mib)
    keep = int(env.get(MALLOC_KEEP_ENV, DEFAULT_KEEP_MIB))
    malloc_note = f"mallopt keep {keep} MiB (hmm.malloc)" if keep > 0 else "glibc defaults"
    if args.tune_malloc:
        env.update(TUNED_MALLOC_ENV)
        malloc_note += "; env " + " ".join(f"{k}={v}" for k, v in TUNED_MALLOC_ENV.items())
    elif any(k.startswith("MALLOC_") for k in env):
        malloc_note += " (MALLOC_* set in the environment)"
    logpath = Path(args.log) if args.log else Path(tempfile.mkstemp(prefix="hmmd-bench-", suffix=".log")[1])
    logf = os.open(logpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    machine = machine_info(malloc_note)  # before any gRPC: it runs git in a subprocess
    load0 = os.getloadavg()
    busy0 = await cpu_busy(1.0)
    log(f"{'quick' if plan.quick else 'full'} run; child stderr -> {logpath}; "
        f"CPU busy before start {busy0:.0%}, load average {load0[0]:.2f}")
    if busy0 > 0.25:
        log("warning: something else is using the CPU; latencies will be inflated")
    py = sys.executable
    children: list[Child] = []
    t_start = time.perf_counter()
    try:
        # 1. every process first: this process opens no gRPC channel before they all run.
        hmmd_argv = [py, "-m", "hmmd", "--listen", "127.0.0.1:0", "--ram", args.ram,
                     "--log-level", "WARNING", *args.hmmd_arg]
        if args.hmmd_wrapper:
            hmmd_argv = [py, args.hmmd_wrapper, *hmmd_argv[3:]]
        hmmd = await spawn(Child, "hmmd", hmmd_argv, env, logf, stdin=False)
        children.append(hmmd)
        fl = await spawn(Child, "floor", [py, str(HERE / "floor.py")], env, logf, stdin=True)
        children.append(fl)
        line = (await hmmd.readline(30)).decode().strip()
        if not line.startswith("hmmd listening on "):
            raise RuntimeError(f"unexpected first line from hmmd: {line!r}")
        addr = line.split()[-1]
        hmmd.drain_stdout()
        line = (await fl.readline(30)).decode().strip()
        floor_addr = line.split()[-1]
        fl.drain_stdout()
        devs: list[Device] = []
        for i in range(plan.devices):
            d = await spawn(Device, f"dev{i}", [py, str(HERE / "devproc.py"), addr, f"dev{i}"], env, logf,
                            stdin=True)
            assert isinstance(d, Device)
            children.append(d)
            devs.append(d)
        mig: Device | None = None
        if "migrate" in args.only:  # one more device, with device-private memory
            m = await spawn(Device, "mig0", [py, str(HERE / "devproc.py"), addr, "mig0", str(plan.mig_memory_pages),
                                             str(plan.shm_bytes)],
                            env, logf, stdin=True)
            assert isinstance(m, Device)
            children.append(m)
            mig = m
        for d in devs + ([mig] if mig is not None else []):
            ready = json.loads(await d.readline(60))
            if not ready.get("ready"):
                raise RuntimeError(f"{d.name} did not come up: {ready}")
            if d is mig and (ready.get("shm_bytes", 0) < plan.shm_bytes or not ready.get("memory_in_shm")):
                raise RuntimeError(f"{d.name} got no usable shared-memory staging area: {ready}")
        log(f"hmmd at {addr}, floor at {floor_addr}, {len(devs)} device processes up"
            f"{' (+1 with device memory)' if mig is not None else ''} ({time.perf_counter() - t_start:.1f} s)")

        # 2. now gRPC in this process, under one overall deadline.
        res: dict[str, dict] = {}
        acc: dict[str, list[float]] = {"unary": [], "bidi": [], "bidi_client": []}
        try:
            await asyncio.wait_for(measure(args, plan, addr, floor_addr, devs, mig, res, acc), args.timeout)
        except TimeoutError:
            raise RuntimeError(f"the benchmark did not finish within --timeout {args.timeout:.0f} s") from None
        for d in devs + ([mig] if mig is not None else []):
            await d.cmd(cmd="exit")
    finally:
        for c in reversed(children):  # devices, then the floor and hmmd
            await c.stop()
        os.close(logf)
    elapsed = time.perf_counter() - t_start

    # 3. metrics.
    mt = Metrics()
    unary = pct(acc["unary"], 50)
    bidi = pct(acc["bidi"], 50)
    mt.add("grpc_unary_rtt_p50_us", unary, "us")
    mt.add("grpc_bidi_rtt_p50_us", bidi, "us")
    mt.add("grpc_unary_rtt_p99_us", pct(acc["unary"], 99), "us")
    mt.add("grpc_bidi_rtt_p99_us", pct(acc["bidi"], 99), "us")
    mt.add("grpc_bidi_rtt_client_timed_p50_us", pct(acc["bidi_client"], 50), "us")
    if "inv1" in res:
        i1 = res["inv1"]
        mt.add("invalidate_rtt_1dev_p50_us", i1["p50"], "us", bidi, "grpc_bidi_rtt_p50_us")
        mt.add("invalidate_rtt_1dev_p99_us", i1["p99"], "us", bidi, "grpc_bidi_rtt_p50_us")
        inv_n = res["invN"]
        n = inv_n["n"]
        mt.add(f"invalidate_rtt_{n}dev_p99_us", inv_n["window_p99"], "us", bidi, "grpc_bidi_rtt_p50_us")
        mt.add(f"invalidate_window_{n}dev_p50_us", inv_n["window_p50"], "us", inv_n["fan_p50"],
               f"grpc_bidi_fanout_{n}peer_p50_us")
        mt.add(f"invalidate_window_{n}dev_p99_us", inv_n["window_p99"], "us", inv_n["fan_p99"],
               f"grpc_bidi_fanout_{n}peer_p99_us")
        mt.add(f"grpc_bidi_fanout_{n}peer_p50_us", inv_n["fan_p50"], "us")
        mt.add(f"grpc_bidi_fanout_{n}peer_p99_us", inv_n["fan_p99"], "us")
        mt.add("mprotect_mirrored_1dev_p50_us", i1["client_p50"], "us", unary + bidi,
               "grpc_unary_rtt_p50_us+grpc_bidi_rtt_p50_us")
    if "munmap" in res:
        mt.add("munmap_mirrored_p50_us", res["munmap"]["p50"], "us", unary + bidi,
               "grpc_unary_rtt_p50_us+grpc_bidi_rtt_p50_us")
    if "rf" in res:
        rf = res["rf"]
        pages = rf["pages"]
        bulk_pps = pages / float(np.median(rf["floor_s"]))
        fname = "grpc_unary_echo_plus_rangefaultreply_pages_per_s"
        for key, name in (("present_us", "range_fault_present_pages_per_s"),
                          ("cold_us", "range_fault_cold_pages_per_s"),
                          ("cold_write_us", "range_fault_cold_write_pages_per_s")):
            mt.add(name, pages / (float(np.median(rf[key])) / 1e6), "pages/s", bulk_pps, fname)
        mt.add(fname, bulk_pps, "pages/s")
    if "mig" in res:
        mg = res["mig"]
        nbytes = mg["pages"] * PAGE
        small, large, piped = mg[str(PIECE_SMALL)], mg[str(PIECE_LARGE)], mg[PIPELINED]

        def gbps(samples: list[float], size: int = nbytes) -> float:
            return size / float(np.median(samples)) / 1e9

        floor_b = gbps(small["floor_down_s"] + small["floor_up_s"])
        floor_l = gbps(large["floor_down_s"] + large["floor_up_s"])
        memcpy = gbps(mg["memcpy_s"], 64 * MIB)
        mt.add("grpc_bytes_GBps", floor_b, "GB/s")
        mt.add("grpc_bytes_down_GBps", gbps(small["floor_down_s"]), "GB/s")
        mt.add("grpc_bytes_up_GBps", gbps(small["floor_up_s"]), "GB/s")
        mt.add("grpc_bytes_16MiB_GBps", floor_l, "GB/s")
        floor_p = gbps(piped["floor_down_s"] + piped["floor_up_s"])
        mt.add("grpc_bytes_pipelined_GBps", floor_p, "GB/s")
        streamed = mg[STREAMED]
        floor_s = gbps(streamed["floor_down_s"] + streamed["floor_up_s"])
        mt.add("grpc_bytes_stream_GBps", floor_s, "GB/s")
        mt.add("memcpy_GBps", memcpy, "GB/s")
        mt.add("migrate_to_dev_GBps", gbps(small["to_dev_s"]), "GB/s", floor_b, "grpc_bytes_GBps")
        mt.add("migrate_to_sys_GBps", gbps(small["to_sys_s"]), "GB/s", floor_b, "grpc_bytes_GBps")
        mt.add("migrate_to_dev_pipelined_GBps", gbps(piped["to_dev_s"]), "GB/s", floor_p, "grpc_bytes_pipelined_GBps")
        mt.add("migrate_to_sys_pipelined_GBps", gbps(piped["to_sys_s"]), "GB/s", floor_p, "grpc_bytes_pipelined_GBps")
        mt.add(f"migrate_to_dev_{PIECE_LARGE}pg_GBps", gbps(large["to_dev_s"]), "GB/s", floor_l,
               "grpc_bytes_16MiB_GBps")
        mt.add(f"migrate_to_sys_{PIECE_LARGE}pg_GBps", gbps(large["to_sys_s"]), "GB/s", floor_l,
               "grpc_bytes_16MiB_GBps")
        mt.add("migrate_to_dev_stream_GBps", gbps(streamed["to_dev_s"]), "GB/s", floor_s, "grpc_bytes_stream_GBps")
        mt.add("migrate_to_sys_stream_GBps", gbps(streamed["to_sys_s"]), "GB/s", floor_s, "grpc_bytes_stream_GBps")
        mt.add("migrate_to_dev_shm_GBps", gbps(mg["shm"]["to_dev_s"]), "GB/s", memcpy, "memcpy_GBps")
        mt.add("migrate_to_sys_shm_GBps", gbps(mg["shm"]["to_sys_s"]), "GB/s", memcpy, "memcpy_GBps")
    if "to_ram" in res:
        tr = res["to_ram"]
        # The daemon's time from the fault to the page home: one callback round trip
        # at best, hence the bidi floor (as for invalidate_rtt). The CPU side's
        # Process.Read around it is a unary call that a real CPU touch does not make:
        # the end-to-end touch has the unary + bidi floor.
        mt.add("migrate_to_ram_p50_us", tr["daemon_p50"], "us", bidi, "grpc_bidi_rtt_p50_us")
        mt.add("migrate_to_ram_p99_us", tr["daemon_p99"], "us", bidi, "grpc_bidi_rtt_p50_us")
        mt.add("cpu_touch_device_page_p50_us", tr["p50"], "us", unary + bidi,
               "grpc_unary_rtt_p50_us+grpc_bidi_rtt_p50_us")
        mt.add("cpu_touch_device_page_p99_us", tr["p99"], "us", unary + bidi,
               "grpc_unary_rtt_p50_us+grpc_bidi_rtt_p50_us")

    log(f"details: {json.dumps(res)}")
    log(f"done in {elapsed:.1f} s")
    machine.update({"mode": "quick" if plan.quick else "full", "device_processes": plan.devices,
                    "range_fault_pages": plan.rf_pages,
                    "migrate_bytes": plan.mig_pages * PAGE if "mig" in res else None,
                    "elapsed_s": round(elapsed, 1),
                    "cpu_busy_before_start": round(busy0, 3),
                    "loadavg_1min_start": round(load0[0], 2), "loadavg_1min_end": round(os.getloadavg()[0], 2)})
    return {"machine": machine, "metrics": mt.m}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="hmmd benchmark (see bench/README.md)")
    ap.add_argument("--json", metavar="FILE", help="also write the result here")
    ap.add_argument("--quick", action="store_true",
                    help="short run (< 60 s; 65,536-page range faults, 16 MiB migrations)")
    ap.add_argument("--devices", type=int, default=8, help="devices for the fan-out metric (default 8)")
    ap.add_argument("--pages", type=int, default=None, help="pages per range fault (default 262144, quick 65536)")
    ap.add_argument("--shm-piece", type=int, default=None,
                    help="pages per migration piece through shared memory (default: the whole range)")
    ap.add_argument("--ram", default="4G", help="hmmd --ram (default 4G)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="overall limit for the measurements in seconds (default 150, quick 60)")
    ap.add_argument("--tune-malloc", action="store_true", help="raise glibc malloc thresholds in every process")
    ap.add_argument("--malloc-keep-mib", type=int, default=None,
                    help="hmm.malloc setting of hmmd, the devices and the floor server (default theirs: "
                         f"{DEFAULT_KEEP_MIB}; 0: glibc's defaults)")
    ap.add_argument("--log", help="file for the children's stderr (default: a temp file)")
    ap.add_argument("--hmmd-wrapper", help="script run instead of `-m hmmd` with the same flags (profiling)")
    ap.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS),
                    help="run only these scenarios (floors always run)")
    ap.add_argument("--hmmd-arg", action="append", default=[], help="extra hmmd flag (repeatable)")
    args = ap.parse_args(argv)
    if args.timeout is None:
        args.timeout = 60.0 if args.quick else 150.0
    if args.devices < 2:
        ap.error("--devices must be >= 2 (device 0 alone serves the 1-device metrics)")

    from hmm.loop import run_loop
    result = run_loop(run(args))
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
