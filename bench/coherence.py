"""Long run of the seeded multi-device coherence tester (tests/coherence.py).

    .venv/bin/python bench/coherence.py --devices 8 --minutes 10 --seed 1 [--json FILE]

Starts hmmd and hmm-dmirror programs (at most 4 devices each; the last
--node-programs of them the Node.js dmirror) as separate OS processes, runs
the tester for the given time and prints one JSON object:
operations per kind and outcome, DMA sanitizer violations per device, the
invariant checker's findings, hmmd's resident memory before and after the run,
and the failure (with its seed) if there was one. Exit status 1 on a failure,
a violation or a broken invariant. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from project_python import ensure  # noqa: E402

ensure(__file__)

from tests.coherence import Config, Report, run  # noqa: E402
from tests.procs import Program, start_dmirror, start_hmmd, start_node_dmirror  # noqa: E402

DEVICES_PER_PROGRAM = 4


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class RssSampler(threading.Thread):
    """hmmd's RSS every ``period_s`` while the run lasts: growth that keeps rising is
    a leak, growth that levels off is warm-up (allocator arenas, buffers)."""

    def __init__(self, pid: int, period_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.period_s = pid, period_s
        self.samples: list[tuple[float, int | None]] = []
        self.done = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.done.wait(self.period_s):
            self.samples.append((round(time.monotonic() - self.t0, 1), rss_kib(self.pid)))


def machine() -> dict[str, object]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=5,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "server", "client", "tests/coherence.py"):
        commit += "+dirty"
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import grpc

    return {"hmmd_commit": commit, "cpu_model": cpu, "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "grpcio": grpc.__version__}


def result(report: Report, args: argparse.Namespace, before: int | None, after: int | None,
           elapsed: float, samples: list[tuple[float, int | None]], load_start: float) -> dict[str, object]:
    ok = not report.failure and not any(report.violations.values()) and not report.invariants
    return {
        "machine": machine() | {"loadavg_1min_start": load_start, "loadavg_1min_end": os.getloadavg()[0]},
        "config": {"seed": args.seed, "devices": args.devices, "minutes": args.minutes, "chunks": args.chunks,
                   "chunk_pages": args.chunk_pages, "dmirror_programs": -(-args.devices // DEVICES_PER_PROGRAM),
                   "serialize_child": args.serialize_child, "ram": args.ram or "2G", "hmmd_args": args.hmmd_arg},
        "ok": ok,
        "elapsed_s": round(elapsed, 1),
        "operations_total": report.total_ops,
        "operations_per_s": round(report.total_ops / report.elapsed_s, 1) if report.elapsed_s else None,
        "operations": report.by_kind(),
        "not_issued": dict(report.skipped),
        "violations": report.violations,
        "reclaimed_pages": report.reclaimed_pages,
        "invariants": report.invariants,
        "hmmd_rss_kib": {"before": before, "after": after,
                         "growth": after - before if before is not None and after is not None else None,
                         "samples_s_kib": samples},
        "failure": report.failure or None,
    }


async def main_async(args: argparse.Namespace, hmmd: Program, programs: list[tuple[Program, list[str]]]) -> Report:
    devices = [(prog.address, name) for prog, names in programs for name in names]
    cfg = Config(seed=args.seed, duration_s=args.minutes * 60, chunks=args.chunks, chunk_pages=args.chunk_pages,
                 serialize_child=args.serialize_child, pressure=args.ram is not None, shared=args.shared,
                 thp=args.thp)
    return await run(hmmd.address, devices, cfg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--chunks", type=int, default=32, help="chunks of the shared region (default 32)")
    ap.add_argument("--chunk-pages", type=int, default=4)
    ap.add_argument("--serialize-child", action="store_true",
                    help="the child's operations take the chunk locks too (fewer races with the parent; it avoided the "
                         "deadlock of faults on a fork-shared device page, fixed in 8c7b0c7: bench/README.md)")
    ap.add_argument("--node-programs", type=int, default=0, metavar="K",
                    help="serve the devices of the last K programs with the Node.js dmirror (client/node) "
                         "instead of the Python one (needs `npm ci --prefix client/node`)")
    ap.add_argument("--shared", action="store_true",
                    help="the region is shared memory (MAP_SHARED|MAP_ANONYMOUS) that a forked child shares: "
                         "nothing migrates or becomes exclusive, and reclaim takes it from the page cache")
    ap.add_argument("--thp", action="store_true",
                    help="the region is 2 MiB-aligned and MADV_HUGEPAGE: it faults in as THPs that the operations "
                         "split (make it at least 2 MiB: --chunks x --chunk-pages >= 512)")
    ap.add_argument("--ram", help="hmmd's RAM (default 2G); a small one, 1M say, keeps direct reclaim "
                                  "swapping the region's pages out all along (the tester then allows for it)")
    ap.add_argument("--hmmd-arg", action="append", default=[], metavar="ARG",
                    help="an extra hmmd flag, e.g. --hmmd-arg=--trace-buffer=0 (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--log-dir", type=Path, help="the daemon's and devices' logs (default: a temp dir)")
    args = ap.parse_args(argv)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="hmm-coherence-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    print(f"logs in {log_dir}", file=sys.stderr)
    # Every process starts before this one opens a gRPC channel (no fork after gRPC).
    hmmd = start_hmmd(log_dir, "--ram", args.ram or "2G", "--log-level", "WARNING", *args.hmmd_arg)
    programs: list[tuple[Program, list[str]]] = []
    try:
        nprograms = -(-args.devices // DEVICES_PER_PROGRAM)
        for p in range(nprograms):
            first, last = p * DEVICES_PER_PROGRAM, min(args.devices, (p + 1) * DEVICES_PER_PROGRAM)
            names = [f"coh{i}" for i in range(first, last)]
            start = start_node_dmirror if p >= nprograms - args.node_programs else start_dmirror
            programs.append((start(log_dir, hmmd.address, *names, name=f"dmirror{p}"), names))
        time.sleep(0.5)
        before = rss_kib(hmmd.pid)
        sampler = RssSampler(hmmd.pid, max(5.0, args.minutes * 6))  # about ten samples
        sampler.start()
        t0 = time.monotonic()
        report = asyncio.run(main_async(args, hmmd, programs))
        elapsed = time.monotonic() - t0
        sampler.done.set()
        time.sleep(0.5)
        after = rss_kib(hmmd.pid)
    finally:
        for prog, _ in programs:
            prog.stop()
        code = hmmd.stop()
    out = result(report, args, before, after, elapsed, sampler.samples, load_start)
    if code not in (0, None):
        out["ok"] = False
        out["hmmd_exit"] = code
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
