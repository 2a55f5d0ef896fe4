"""benchmark_thp_migration (HMM-SELFTESTS.md row 38) as a standalone benchmark.

    .venv/bin/python bench/thp_migration.py [--quick] [--json FILE]

The kernel's test: for buffer sizes 1/4, 1/2, 1, 2, 4, 8 and 128 PMDs (stopping at the
first above 2^31 - 1 bytes), first in THP mode then in 4 KiB mode, a fresh (unaligned)
anonymous mapping advised MADV_HUGEPAGE / MADV_NOHUGEPAGE, int k = k & 0xFF written,
one untimed MIGRATE_TO_DEV + MIGRATE_TO_SYS, then 5 timed M2D / M2S pairs; every
command must return 0 (the counters are not checked); the average times and the
throughput are reported.

Here every component is its own OS process on 127.0.0.1, all started before this
process opens any gRPC channel (no fork after gRPC started):

* ``python -m hmmd --listen 127.0.0.1:0`` (the daemon under test),
* ``bench/floor.py`` (bare grpc.aio; its ``Blob``/``Sink`` give the raw-bytes floor),
* ``python -m hmm.dmirror`` with one device (the dmirror command service, as the
  conformance suite starts it),
* this process: the CPU side (``hmm.process``), the dmirror client (the test's
  ioctls, timed here end to end) and the floor client.

Writes and prints ``{"machine": {...}, "results": [{"size_bytes", "mode", "m2d_avg_ms",
"m2s_avg_ms", "m2d_GBps", "m2s_GBps"}], "floor": {"grpc_bytes_GBps", ...}}``. GB is
10^9 bytes. Progress, raw samples and a table go to stderr. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from project_python import ensure  # noqa: E402

ensure(__file__)

import numpy as np  # noqa: E402
from run import Child, cpu_busy, machine_info, spawn  # noqa: E402  (bench/run.py: process discipline)

from hmm.abi import (  # noqa: E402
    HMM_DMIRROR_PROT_PMD,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    PAGE_SIZE,
    PMD_SIZE,
)

# The kernel test's sizes, in PMDs; it stops at the first size above INT_MAX bytes.
SIZES_PMD = (0.25, 0.5, 1, 2, 4, 8, 128)
QUICK_MAX_PMDS = 8
INT_MAX = (1 << 31) - 1
ITERATIONS = 5
MIB = 1 << 20
# A MIGRATE_TO_DEV reply carries the migrated data back (the driver's copy_to_user of
# its bounce buffer), and a gRPC message is at most 64 MiB (hmm.channel): a buffer
# larger than this is driven as consecutive commands of this many pages, timed
# together. 16 MiB keeps every reply below glibc's 32 MiB dynamic-mmap-threshold cap.
CMD_MAX_PAGES = 4096
WRITE_CHUNK = 16 * MIB
FLOOR_PAYLOAD = 2 * MIB  # bench/run.py's grpc_bytes_GBps: 2 MiB unary calls
DEVICE = "hmm_dmirror0"


def log(msg: str) -> None:
    print(f"[thp {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def plan_sizes(quick: bool, max_pmds: float) -> list[int]:
    out = []
    for pmds in SIZES_PMD:
        size = int(PMD_SIZE * pmds)
        if size > INT_MAX:
            break
        if pmds > max_pmds or (quick and pmds > QUICK_MAX_PMDS):
            break
        out.append(size)
    return out


class Bench:
    """The test process with device 0 open, and the dmirror command helper."""

    def __init__(self, cpu, dm, proc, file_id: int) -> None:  # noqa: ANN001
        self.cpu, self.dm, self.proc, self.file_id = cpu, dm, proc, file_id

    async def cmd(self, cmd: int, addr: int, npages: int) -> tuple[int | str, bytes]:
        """hmm_dmirror_cmd over the whole buffer: 0 or the errno name, and the data the
        commands returned (M2D's read back)."""
        from hmm.errors import KernelError
        data = []
        for off in range(0, npages, CMD_MAX_PAGES):
            try:
                r = await self.dm.command(self.file_id, cmd, addr + off * PAGE_SIZE, min(CMD_MAX_PAGES, npages - off))
            except KernelError as e:
                return e.name, b""
            data.append(r.data)
        return 0, b"".join(data)

    async def pmd_pages(self, addr: int, npages: int) -> int:
        """Pages the CPU maps with a PMD (a dmirror SNAPSHOT: no faulting), untimed."""
        from hmm.dmirror.device import CMD_SNAPSHOT
        rc, snap = await self.cmd(CMD_SNAPSHOT, addr, npages)
        assert rc == 0, f"SNAPSHOT returned {rc}"
        return int(np.count_nonzero(np.frombuffer(snap, dtype=np.uint8) & HMM_DMIRROR_PROT_PMD))

    async def run_one(self, size: int, thp: bool) -> dict:
        """run_migration_benchmark: one fresh mapping, warm-up pair, ITERATIONS timed pairs."""
        from hmm.dmirror.device import CMD_MIGRATE_TO_DEV, CMD_MIGRATE_TO_SYS
        proc = self.proc
        npages = size // PAGE_SIZE
        addr = await proc.mmap(size)
        await proc.madvise(addr, size, MADV_HUGEPAGE if thp else MADV_NOHUGEPAGE)
        data = (np.arange(size // 4, dtype=np.int32) & 0xFF).astype("<i4").tobytes()
        for off in range(0, size, WRITE_CHUNK):
            await proc.write(addr + off, data[off:off + WRITE_CHUNK])
        pmd_before = await self.pmd_pages(addr, npages)
        rc, back = await self.cmd(CMD_MIGRATE_TO_DEV, addr, npages)
        assert rc == 0, f"warm-up MIGRATE_TO_DEV returned {rc}"
        assert back == data, "the warm-up MIGRATE_TO_DEV read back other data than was written"
        rc, _ = await self.cmd(CMD_MIGRATE_TO_SYS, addr, npages)
        assert rc == 0, f"warm-up MIGRATE_TO_SYS returned {rc}"
        pmd_after = await self.pmd_pages(addr, npages)
        perf = time.perf_counter
        m2d, m2s = [], []
        for i in range(ITERATIONS):
            t0 = perf()
            rc, _ = await self.cmd(CMD_MIGRATE_TO_DEV, addr, npages)
            t1 = perf()
            assert rc == 0, f"MIGRATE_TO_DEV {i} returned {rc}"
            rc, _ = await self.cmd(CMD_MIGRATE_TO_SYS, addr, npages)
            t2 = perf()
            assert rc == 0, f"MIGRATE_TO_SYS {i} returned {rc}"
            m2d.append(t1 - t0)
            m2s.append(t2 - t1)
        await proc.munmap(addr, size)
        d_avg, s_avg = sum(m2d) / len(m2d), sum(m2s) / len(m2s)
        return {"result": {"size_bytes": size, "mode": "thp" if thp else "4k",
                           "m2d_avg_ms": round(d_avg * 1e3, 3), "m2s_avg_ms": round(s_avg * 1e3, 3),
                           "m2d_GBps": round(size / d_avg / 1e9, 4), "m2s_GBps": round(size / s_avg / 1e9, 4)},
                "detail": {"size_bytes": size, "mode": "thp" if thp else "4k", "addr": hex(addr),
                           "pmd_aligned_start": addr % PMD_SIZE == 0,
                           "pmd_mapped_pages_after_write": pmd_before,
                           "pmd_mapped_pages_after_warmup": pmd_after,
                           "m2d_s": m2d, "m2s_s": m2s}}


async def floor_sample(fch, total: int, acc: dict[str, list[float]]) -> None:  # noqa: ANN001
    import floor
    acc["down"] += await floor.bytes_s(fch, total, FLOOR_PAYLOAD, count=1, upload=False)
    acc["up"] += await floor.bytes_s(fch, total, FLOOR_PAYLOAD, count=1, upload=True)


async def measure(addr: str, dm_addr: str, floor_addr: str, sizes: list[int], floor_total: int,
                  results: list[dict], details: list[dict], acc: dict[str, list[float]]) -> None:
    import floor

    from hmm.dmirror.client import DmirrorClient
    from hmm.process import ProcessClient
    cpu = ProcessClient.connect(addr)
    dm = DmirrorClient(dm_addr)
    fch = floor.connect(floor_addr)
    try:
        proc = await cpu.spawn("benchmark_thp_migration")
        fd, file_id = await proc.open(f"/dev/{DEVICE}")
        b = Bench(cpu, dm, proc, file_id)
        await floor.bytes_s(fch, 4 * MIB, FLOOR_PAYLOAD, count=1, upload=False)  # connect and warm up
        for size in sizes:
            for thp in (True, False):
                t0 = time.perf_counter()
                r = await b.run_one(size, thp)
                results.append(r["result"])
                details.append(r["detail"])
                rr, dd = r["result"], r["detail"]
                log(f"  {size / MIB:7.2f} MiB {rr['mode']:>3}: M2D {rr['m2d_avg_ms']:9.2f} ms "
                    f"{rr['m2d_GBps']:.3f} GB/s, M2S {rr['m2s_avg_ms']:9.2f} ms {rr['m2s_GBps']:.3f} GB/s; "
                    f"PMD-mapped pages {dd['pmd_mapped_pages_after_write']} -> "
                    f"{dd['pmd_mapped_pages_after_warmup']} ({time.perf_counter() - t0:.1f} s)")
            await floor_sample(fch, floor_total, acc)  # one floor pair per size, same conditions
        await proc.close(fd)  # close evicts the device: nothing should be left on it
        await proc.exit()
    finally:
        await fch.close()
        await dm.close()
        await cpu.close()


def table(results: list[dict], floor_gbps: float) -> str:
    """The kernel's print_benchmark_results, one line per size, plus the ratios to the floor."""
    by = {(r["size_bytes"], r["mode"]): r for r in results}
    lines = [f"{'size':>10} | {'M2D THP ms':>10} {'M2D 4K ms':>10} {'impr':>7} | {'M2S THP ms':>10} "
             f"{'M2S 4K ms':>10} {'impr':>7} | {'GB/s M2D thp/4k':>16} {'GB/s M2S thp/4k':>16} | "
             f"ratio to floor {floor_gbps:.3f} (M2D, M2S; 4k)"]
    for size in sorted({s for s, _ in by}):
        t, k = by.get((size, "thp")), by.get((size, "4k"))
        if t is None or k is None:
            continue
        di = (k["m2d_avg_ms"] - t["m2d_avg_ms"]) / k["m2d_avg_ms"] * 100
        si = (k["m2s_avg_ms"] - t["m2s_avg_ms"]) / k["m2s_avg_ms"] * 100
        lines.append(f"{size / MIB:7.2f}MiB | {t['m2d_avg_ms']:10.2f} {k['m2d_avg_ms']:10.2f} {di:6.1f}% | "
                     f"{t['m2s_avg_ms']:10.2f} {k['m2s_avg_ms']:10.2f} {si:6.1f}% | "
                     f"{t['m2d_GBps']:7.3f}/{k['m2d_GBps']:<8.3f} {t['m2s_GBps']:7.3f}/{k['m2s_GBps']:<8.3f} | "
                     f"{k['m2d_GBps'] / floor_gbps:.2f}, {k['m2s_GBps'] / floor_gbps:.2f}")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict:
    sizes = plan_sizes(args.quick, args.max_pmds)
    if not sizes:
        raise SystemExit("no size left to run (--max-pmds below 1/4?)")
    floor_total = (16 if args.quick else 64) * MIB
    memory_pages = 2 * (max(sizes) // PAGE_SIZE) + 1024  # frees arrive asynchronously
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    malloc_note = "glibc defaults" + (" (MALLOC_* set in the environment)"
                                      if any(k.startswith("MALLOC_") for k in env) else "")
    logpath = Path(args.log) if args.log else Path(tempfile.mkstemp(prefix="hmmd-thp-bench-", suffix=".log")[1])
    logf = os.open(logpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    machine = machine_info(malloc_note)  # before any gRPC: it runs git in a subprocess
    load0 = os.getloadavg()
    busy0 = await cpu_busy(1.0)
    log(f"{'quick' if args.quick else 'full'} run, sizes {[s / MIB for s in sizes]} MiB; child stderr -> "
        f"{logpath}; CPU busy before start {busy0:.0%}, load average {load0[0]:.2f}")
    if busy0 > 0.25:
        log("warning: something else is using the CPU; times will be inflated")
    py = sys.executable
    children: list[Child] = []
    results: list[dict] = []
    details: list[dict] = []
    acc: dict[str, list[float]] = {"down": [], "up": []}
    exit_codes: dict[str, int | None] = {}
    t_start = time.perf_counter()
    try:
        # 1. every process first: this process opens no gRPC channel before they all run.
        hmmd = await spawn(Child, "hmmd", [py, "-m", "hmmd", "--listen", "127.0.0.1:0", "--ram", args.ram,
                                           "--log-level", "WARNING"], env, logf, stdin=False)
        children.append(hmmd)
        fl = await spawn(Child, "floor", [py, str(HERE / "floor.py")], env, logf, stdin=True)
        children.append(fl)
        line = (await hmmd.readline(30)).decode().strip()
        if not line.startswith("hmmd listening on "):
            raise RuntimeError(f"unexpected first line from hmmd: {line!r}")
        addr = line.split()[-1]
        hmmd.drain_stdout()
        dmirror = await spawn(Child, "hm-dmirror",
                              [py, "-m", "hmm.dmirror", "--kernel", addr, "--listen", "127.0.0.1:0",
                               "--device", DEVICE, "--memory-pages", str(memory_pages), "--log-level", "WARNING"],
                              env, logf, stdin=False)
        children.append(dmirror)
        line = (await fl.readline(30)).decode().strip()
        if not line.startswith("floor listening on "):
            raise RuntimeError(f"unexpected first line from floor.py: {line!r}")
        floor_addr = line.split()[-1]
        fl.drain_stdout()
        line = (await dmirror.readline(30)).decode().strip()
        if " listening on " not in line:
            raise RuntimeError(f"unexpected first line from hm-dmirror: {line!r}")
        dm_addr = line.split()[-1]
        dmirror.drain_stdout()
        log(f"hmmd at {addr}, hm-dmirror at {dm_addr} ({DEVICE}, {memory_pages} device pages), floor at "
            f"{floor_addr} ({time.perf_counter() - t_start:.1f} s)")

        # 2. now gRPC in this process, under one overall deadline.
        try:
            await asyncio.wait_for(measure(addr, dm_addr, floor_addr, sizes, floor_total, results, details, acc),
                                   args.timeout)
        except TimeoutError:
            raise RuntimeError(f"the benchmark did not finish within --timeout {args.timeout:.0f} s") from None
    finally:
        for c in reversed(children):  # the device, then the floor and hmmd
            await c.stop()
            exit_codes[c.name] = c.proc.returncode
        os.close(logf)
    elapsed = time.perf_counter() - t_start
    for name in ("hmmd", "hm-dmirror"):
        if exit_codes.get(name) != 0:
            log(f"warning: {name} exited with {exit_codes.get(name)} (see {logpath})")

    def gbps(samples: list[float]) -> float:
        return floor_total / float(np.median(samples)) / 1e9

    floor_res = {"grpc_bytes_GBps": round(gbps(acc["down"] + acc["up"]), 4),
                 "grpc_bytes_down_GBps": round(gbps(acc["down"]), 4),
                 "grpc_bytes_up_GBps": round(gbps(acc["up"]), 4)}
    log(f"details: {json.dumps({'runs': details, 'floor_down_s': acc['down'], 'floor_up_s': acc['up']})}")
    log(f"floor: {floor_res}")
    log("results (impr = (4k - thp) / 4k, the kernel's 'Improvement'):\n"
        + table(results, floor_res["grpc_bytes_GBps"]))
    log(f"done in {elapsed:.1f} s")
    machine.update({"mode": "quick" if args.quick else "full", "pmd_bytes": PMD_SIZE, "iterations": ITERATIONS,
                    "sizes_bytes": sizes, "max_pmds": args.max_pmds, "command_max_pages": CMD_MAX_PAGES,
                    "device_memory_pages": memory_pages, "floor_bytes_per_sample": floor_total,
                    "floor_payload_bytes": FLOOR_PAYLOAD, "child_exit_codes": exit_codes,
                    "elapsed_s": round(elapsed, 1), "cpu_busy_before_start": round(busy0, 3),
                    "loadavg_1min_start": round(load0[0], 2), "loadavg_1min_end": round(os.getloadavg()[0], 2)})
    return {"machine": machine, "results": results, "floor": floor_res}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="benchmark_thp_migration (see bench/README.md)")
    ap.add_argument("--json", metavar="FILE", help="also write the result here")
    ap.add_argument("--quick", action="store_true", help=f"stop after {QUICK_MAX_PMDS} PMDs (< 60 s)")
    ap.add_argument("--max-pmds", type=float, default=128,
                    help="largest size to run, in PMDs (default 128: every size of the kernel test)")
    ap.add_argument("--ram", default="2G", help="hmmd --ram (default 2G)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="overall limit for the measurements in seconds (default 200, quick 60)")
    ap.add_argument("--log", help="file for the children's stderr (default: a temp file)")
    args = ap.parse_args(argv)
    if args.timeout is None:
        args.timeout = 60.0 if args.quick else 200.0

    from hmm.loop import run_loop
    result = run_loop(run(args))
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
