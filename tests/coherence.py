"""A seeded multi-device coherence tester, in the spirit of gem5's random tester.

N dmirror devices and the CPU hammer one region of an emulated process at the
same time: device READ, WRITE, MIGRATE_TO_DEV, MIGRATE_TO_SYS and EXCLUSIVE;
CPU reads and writes; mprotect, MADV_DONTNEED, MADV_PAGEOUT, munmap and mmap of
parts of the region, and memory compaction; fork of a child that keeps reading its
copy-on-write snapshot, and its exit or OOM kill. With ``Config.shared`` the region
is shared memory instead: nothing migrates or becomes exclusive (ENOENT,
EOPNOTSUPP), MADV_DONTNEED and reclaim keep the contents, and the child shares the
pages, its stores reaching what the devices mirror of the parent. With
``Config.thp`` the region is 2 MiB-aligned and MADV_HUGEPAGE, so that it faults in
as THPs which every partial operation splits. Two oracles:

* every byte read — by the CPU, by a device, in a migration or exclusive read
  back, in the parent or the child — is checked against a shadow copy;
* the daemon's DMA sanitizer (``AdminClient.stats().violations``) catches any
  device access to a frame it no longer holds through a valid range fault, and
  must stay 0; ``check_invariants`` runs at the end.

**What the shadow may assume.** The region is cut into chunks of a few pages.
Every operation takes the locks of the chunks it touches (in order), so
operations on one chunk are serialized and the shadow of a chunk is exact while
its lock is held; operations on different chunks run concurrently, which is
where invalidations, range-fault retries, migrations and CPU faults race. What
the daemon does not promise is accepted, not assumed: a range fault may give up
with EBUSY under contention (HMM-SEMANTICS.md 2.1.12), and a WRITE that fails
may already have written the pages before the one it failed on, so those pages
are read back and each must hold either the old or the new contents. Fork
stops everything (all chunk locks) so that the child's snapshot is exact.

The seed fixes each agent's sequence of operations; the interleaving depends on
timing, so a failure is reported with the seed, the failing operation's number
and the last operations on its chunks. ``bench/coherence.py`` runs it long;
``tests/e2e/test_coherence_tester.py`` briefly.
"""

from __future__ import annotations

import asyncio
import errno
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hmm.abi import (
    MADV_DONTNEED,
    MADV_HUGEPAGE,
    MADV_PAGEOUT,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_READ,
    PROT_WRITE,
)
from hmm.admin import AdminClient
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import (
    CMD_EXCLUSIVE,
    CMD_MIGRATE_TO_DEV,
    CMD_MIGRATE_TO_SYS,
    CMD_READ,
    CMD_SNAPSHOT,
    CMD_WRITE,
)
from hmm.errors import KernelError
from hmm.process import Proc, ProcessClient

P = PAGE_SIZE
ZERO = bytes(P)
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS

DEVICE_OPS = {"READ": 25, "WRITE": 25, "MIGRATE_TO_DEV": 20, "MIGRATE_TO_SYS": 10, "EXCLUSIVE": 8}
CPU_OPS = {"cpu_read": 35, "cpu_write": 35, "child_read": 15, "child_write": 15}
SYSCALL_OPS = {"mprotect": 30, "dontneed": 15, "pageout": 15, "compact": 5, "munmap": 10, "mmap": 15, "fork": 5,
               "exit": 3, "oom_kill": 2}
THP_OPS = {"remap_span": 10}  # with Config.thp: a whole 2 MiB span mapped afresh, to fault in as a THP again


class CoherenceError(AssertionError):
    """An observed value or errno the shadow does not allow, a hang, or a
    sanitizer violation."""


@dataclass
class Config:
    seed: int = 1
    duration_s: float = 10.0
    chunks: int = 16
    chunk_pages: int = 4
    max_chunks_per_op: int = 2
    op_timeout_s: float = 60.0  # longer than any legitimate wait: a hang, not a slow machine
    check_every_s: float = 2.0  # sanitizer poll
    # The child's operations also take the chunk locks, so the child and the parent
    # never fault the same page at once: that race deadlocked before 8c7b0c7
    # (tests/model/test_regressions.py); kept to bisect such hangs.
    serialize_child: bool = False
    # hmmd runs with little RAM: reclaim may swap any page out at any time, so a
    # migration may leave any of them (as after MADV_PAGEOUT).
    pressure: bool = False
    # The region is MAP_SHARED|MAP_ANONYMOUS (a shmem file), and so is what mmap
    # puts back into it; the child's operations then take the chunk locks too.
    shared: bool = False
    # The region is 2 MiB-aligned and MADV_HUGEPAGE: its spans fault in as THPs, and
    # the operations on parts of them split them (no byte changes: the oracles hold).
    # A chunk must divide 2 MiB; "remap_span" maps a whole span afresh now and then.
    thp: bool = False


@dataclass
class Device:
    """One dmirror device under test: its name and its program's command service."""

    name: str
    client: DmirrorClient
    file_id: int = 0


@dataclass
class Chunk:
    """The shadow of one chunk of the parent's region, plus what may be true of it."""

    pages: list[bytes]
    mapped: bool = True
    writable: bool = True
    on: set[int] = field(default_factory=set)  # devices that may hold some of its pages
    ro_dev: set[int] = field(default_factory=set)  # ... with a read-only device-private entry
    excl: set[int] = field(default_factory=set)  # devices that may hold some page exclusively
    pte_ro: bool = False  # some page may be mapped read-only (zero page, COW, after mprotect)
    swapped: bool = False  # some page may be swapped out (MADV_PAGEOUT): migration leaves it
    with_child: bool = False  # shared memory the child maps too (since fork, until remapped)
    history: deque[str] = field(default_factory=lambda: deque(maxlen=8))


@dataclass
class ChildChunk:
    pages: list[bytes]
    mapped: bool
    writable: bool


@dataclass
class Report:
    seed: int
    elapsed_s: float = 0.0
    ops: Counter[str] = field(default_factory=Counter)  # "kind outcome" -> count
    skipped: Counter[str] = field(default_factory=Counter)
    violations: dict[str, int] = field(default_factory=dict)
    reclaimed_pages: int = 0  # what memory pressure swapped out (a small --ram)
    invariants: list[str] = field(default_factory=list)
    failure: str = ""

    def by_kind(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for key, n in sorted(self.ops.items()):
            kind, outcome = key.split(" ", 1)
            out.setdefault(kind, {})[outcome] = n
        return out

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())


def stamp_page(stamp: int, page: int) -> bytes:
    """A page no other write produces: every 8 bytes name the write and the page."""
    return np.full(P // 8, (stamp << 24) | page, dtype="<u8").tobytes()


def describe(data: bytes) -> str:
    if data == ZERO:
        return "zeros"
    w = int(np.frombuffer(data[:8], dtype="<u8")[0])
    uniform = data == data[:8] * (P // 8)
    return f"write {w >> 24} page {w & 0xFFFFFF}" + ("" if uniform else " (mixed)")


class Tester:
    """Run ``Config.duration_s`` of random concurrent operations; see the module doc."""

    def __init__(self, cpu: ProcessClient, admin: AdminClient, devices: list[Device], config: Config) -> None:
        self.cpu = cpu
        self.admin = admin
        self.devices = devices
        self.cfg = config
        self.report = Report(config.seed)
        self.locks = [asyncio.Lock() for _ in range(config.chunks)]
        self.child_lock = asyncio.Lock()
        self.chunks: list[Chunk] = []
        self.child: Proc | None = None
        self.child_chunks: list[ChildChunk] = []
        self.proc: Proc | None = None
        self.base = 0
        self.stamps = 0
        self.op_seq = 0
        self.stop = asyncio.Event()

    # ---- setup --------------------------------------------------------------------
    @property
    def npages(self) -> int:
        return self.cfg.chunks * self.cfg.chunk_pages

    def addr(self, chunk: int) -> int:
        return self.base + chunk * self.cfg.chunk_pages * P

    @property
    def flags(self) -> int:
        return MAP_SHARED | MAP_ANONYMOUS if self.cfg.shared else ANON

    async def setup(self) -> None:
        self.proc = await self.cpu.spawn(f"coherence-{self.cfg.seed}")
        size = self.npages * P
        if self.cfg.thp and PMD_SIZE % (self.cfg.chunk_pages * P):
            raise ValueError("with thp, a chunk must divide 2 MiB")
        if self.cfg.thp:  # an aligned region: map 2 MiB more, give the ends back
            raw = await self.proc.mmap(size + PMD_SIZE, RW, self.flags)
            self.base = (raw + PMD_SIZE - 1) & ~(PMD_SIZE - 1)
            if self.base > raw:
                await self.proc.munmap(raw, self.base - raw)
            await self.proc.munmap(self.base + size, raw + PMD_SIZE - self.base)
            await self.proc.madvise(self.base, size, MADV_HUGEPAGE)
        else:
            self.base = await self.proc.mmap(size, RW, self.flags)
        for c in range(self.cfg.chunks):
            pages = [stamp_page(self.next_stamp(), c * self.cfg.chunk_pages + i) for i in range(self.cfg.chunk_pages)]
            await self.proc.write(self.addr(c), b"".join(pages))
            self.chunks.append(Chunk(pages))
        for dev in self.devices:
            _, dev.file_id = await self.proc.open(f"/dev/{dev.name}")

    def next_stamp(self) -> int:
        self.stamps += 1
        return self.stamps

    # ---- running ------------------------------------------------------------------
    async def run(self) -> Report:
        """Set up, run every agent for the configured time, check the end state."""
        await self.setup()
        t0 = time.monotonic()
        agents = [self.agent(f"device{i}", DEVICE_OPS, self.device_op, i) for i in range(len(self.devices))]
        agents += [self.agent("cpu", CPU_OPS, self.cpu_op, -1),
                   self.agent("syscalls", SYSCALL_OPS | (THP_OPS if self.cfg.thp else {}), self.syscall_op, -1),
                   self.watchdog()]
        tasks = [asyncio.ensure_future(a) for a in agents]
        try:
            await asyncio.wait_for(asyncio.shield(self.stop.wait()), self.cfg.duration_s)
        except TimeoutError:
            pass
        self.stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        self.report.elapsed_s = time.monotonic() - t0
        for r in results:
            if isinstance(r, BaseException) and not self.report.failure:
                self.report.failure = f"seed {self.cfg.seed}: agent crashed: {r!r}"
        await self.finish()
        return self.report

    async def finish(self) -> None:
        try:
            await self._finish()
        except CoherenceError:
            pass  # recorded
        except KernelError as e:
            if not self.report.failure:
                self.report.failure = f"seed {self.cfg.seed}: the end of the run failed: {e!r}"

    async def _finish(self) -> None:
        if self.child is not None:
            await self.bounded(self.child.exit(), "exit of the child at the end")
            self.child = None
        stats = await self.bounded(self.admin.stats(), "Stats")
        self.report.violations = {d.name: stats.device(d.name).violations for d in self.devices}
        self.report.reclaimed_pages = stats.reclaimed_pages
        if self.proc is not None and not self.report.failure:
            # Everything still mapped must read back as the shadow says.
            async with self.all_locks():
                for c in range(self.cfg.chunks):
                    await self.check_cpu_read(c, c + 1, "final_read")
        if self.proc is not None:
            await self.bounded(self.proc.exit(), "exit of the process at the end")
        try:
            self.report.invariants = await self.bounded(self.admin.check_invariants(), "CheckInvariants")
        except KernelError as e:
            self.report.invariants = [f"CheckInvariants unavailable: {e}"]

    def fail(self, msg: str, chunks: range) -> None:
        recent = []
        for c in chunks:
            recent.append(f"  chunk {c} at {self.addr(c):#x}: " + "; ".join(self.chunks[c].history))
        text = f"seed {self.cfg.seed}, operation {self.op_seq}: {msg}\nlast operations on its chunks:\n" + \
            "\n".join(recent)
        if not self.report.failure:
            self.report.failure = text
        self.stop.set()
        raise CoherenceError(text)

    async def agent(self, name: str, weights: dict[str, int], op: Callable[[random.Random, str, int],
                    Awaitable[None]], arg: int) -> None:
        rng = random.Random(f"{self.cfg.seed}/{name}")
        kinds, w = list(weights), list(weights.values())
        while not self.stop.is_set():
            kind = rng.choices(kinds, w)[0]
            try:
                await op(rng, kind, arg)
            except CoherenceError:
                return
            except BaseException as e:
                if not self.report.failure:
                    self.report.failure = f"seed {self.cfg.seed}, operation {self.op_seq}: {name} crashed: {e!r}"
                self.stop.set()
                raise
            if name == "syscalls":
                await asyncio.sleep(rng.random() * 0.005)

    async def watchdog(self) -> None:
        """The sanitizer's verdict every few seconds (a violation ends the run)."""
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(asyncio.shield(self.stop.wait()), self.cfg.check_every_s)
            except TimeoutError:
                pass
            try:
                stats = await self.bounded(self.admin.stats(), "Stats")
            except CoherenceError:
                return
            bad = {d.name: stats.device(d.name).violations for d in self.devices if stats.device(d.name).violations}
            if bad:
                try:
                    self.fail(f"DMA sanitizer violations {bad}", range(0))
                except CoherenceError:
                    return

    def all_locks(self) -> _Locks:
        return _Locks(self.locks)

    def pick(self, rng: random.Random) -> range:
        n = rng.randint(1, self.cfg.max_chunks_per_op)
        c0 = rng.randrange(0, self.cfg.chunks - n + 1)
        return range(c0, c0 + n)

    async def call(self, coro: Awaitable[Any], what: str, chunks: range) -> Any:
        """The call's result or KernelError; a call that does not finish fails the run."""
        self.op_seq += 1
        try:
            return await asyncio.wait_for(coro, self.cfg.op_timeout_s)
        except KernelError as e:
            return e
        except TimeoutError:
            self.fail(f"{what} did not finish within {self.cfg.op_timeout_s} s (hang)\n{await self.diagnose()}",
                      chunks)

    async def bounded(self, coro: Awaitable[Any], what: str) -> Any:
        """Await a call outside the operations (setup, checks, teardown) with the
        operation timeout: a hang there is reported like any other."""
        try:
            return await asyncio.wait_for(coro, self.cfg.op_timeout_s)
        except TimeoutError:
            msg = f"seed {self.cfg.seed}: {what} did not finish within {self.cfg.op_timeout_s} s (hang)\n" + \
                await self.diagnose()
            if not self.report.failure:
                self.report.failure = msg
            self.stop.set()
            raise CoherenceError(msg) from None

    async def explain(self, dev: Device, chunks: range) -> str:
        """For a failure message: the device's SNAPSHOT of the chunks (non-faulting)
        and what the shadow believed of them."""
        n = len(chunks) * self.cfg.chunk_pages
        snap = await self.call(dev.client.command(dev.file_id, CMD_SNAPSHOT, self.addr(chunks.start), n),
                               "SNAPSHOT", chunks)
        shadow = [dict(on=sorted(self.chunks[c].on), excl=sorted(self.chunks[c].excl), pte_ro=self.chunks[c].pte_ro,
                       mapped=self.chunks[c].mapped, writable=self.chunks[c].writable) for c in chunks]
        return f" (then {dev.name}'s SNAPSHOT: {snap.data.hex() if not isinstance(snap, KernelError) else snap};" \
               f" shadow: {shadow})"

    async def diagnose(self) -> str:
        """What the daemon says while something hangs: open migrations, invalidation
        windows, and the invariants (which report held page locks)."""
        lines = []
        try:
            stats = await asyncio.wait_for(self.admin.stats(), 10)
            lines.append("open migrations: " + ", ".join(f"{d.name} {d.migrations_open}" for d in stats.devices
                                                          if d.name in {x.name for x in self.devices}))
            busy = [n for n in await asyncio.wait_for(self.admin.notifiers(), 10) if n.state != "idle"]
            lines += [f"notifier {n.notifier_id} of {n.device_name} on pid {n.pid}: {n.state} seq {n.seq} "
                      f"mm_seq {n.mm_seq}" for n in busy]
            lines += await asyncio.wait_for(self.admin.check_invariants(), 10)
            procs = await asyncio.wait_for(self.admin.processes(), 10)
            lines.append("processes: " + ", ".join(f"{p.pid} {p.name}" for p in procs))
            trace = await asyncio.wait_for(self.admin.trace_buffer(), 10)
            lines.append("last trace events:")
            lines += [f"  {e.kind} {e.syscall or e.event} pid {e.pid} [{e.start:#x}, {e.end:#x}) {e.device_name} "
                      f"ok={e.ok} errno={e.errno} dur={e.dur_ns // 1000} us" for e in trace.events[-25:]]
        except (KernelError, TimeoutError) as e:
            lines.append(f"(the daemon did not answer: {e!r})")
        return "\n".join(lines)

    def count(self, kind: str, got: Any) -> str:
        outcome = got.name if isinstance(got, KernelError) else "ok"
        self.report.ops[f"{kind} {outcome}"] += 1
        return outcome

    def note(self, chunks: range, text: str) -> None:
        for c in chunks:
            self.chunks[c].history.append(f"#{self.op_seq} {text}")

    def expect(self, got: Any, allowed: set[int], what: str, chunks: range) -> None:
        """``allowed`` holds 0 for success and the errnos that may come instead."""
        if isinstance(got, KernelError):
            if got.errno not in allowed:
                names = sorted(errno.errorcode.get(e, "ok") for e in allowed)
                self.fail(f"{what}: {got.name} ({got}), allowed {names}", chunks)
        elif 0 not in allowed:
            self.fail(f"{what}: succeeded, expected {sorted(errno.errorcode[e] for e in allowed)}", chunks)

    def compare(self, data: bytes, chunks: range, what: str, *, child: bool = False) -> None:
        k = self.cfg.chunk_pages
        for j, c in enumerate(chunks):
            pages = self.child_pages(c) if child else self.chunks[c].pages
            for i in range(k):
                got = data[(j * k + i) * P : (j * k + i + 1) * P]
                if got != pages[i]:
                    self.fail(f"{what}: page {i} of chunk {c} ({self.addr(c) + i * P:#x}) holds {describe(got)}, "
                              f"the shadow says {describe(pages[i])}", chunks)

    # ---- CPU ------------------------------------------------------------------------
    async def check_cpu_read(self, c0: int, c1: int, kind: str) -> None:
        chunks = range(c0, c1)
        assert self.proc is not None
        mapped = all(self.chunks[c].mapped for c in chunks)
        got = await self.call(self.proc.read(self.addr(c0), len(chunks) * self.cfg.chunk_pages * P), kind, chunks)
        self.count(kind, got)
        self.note(chunks, f"{kind} -> {got.name if isinstance(got, KernelError) else 'ok'}")
        self.expect(got, {0} if mapped else {errno.EFAULT}, kind, chunks)
        if not isinstance(got, KernelError):
            self.compare(got, chunks, kind)
            for c in chunks:
                ch = self.chunks[c]
                ch.on.clear()
                ch.ro_dev.clear()
                ch.excl.clear()
                ch.pte_ro |= ZERO in ch.pages

    async def cpu_op(self, rng: random.Random, kind: str, _: int) -> None:
        assert self.proc is not None
        if kind.startswith("child"):
            await self.child_op(rng, kind)
            return
        chunks = self.pick(rng)
        async with _Locks([self.locks[c] for c in chunks]):
            if kind == "cpu_read":
                await self.check_cpu_read(chunks.start, chunks.stop, kind)
                return
            writable = all(self.chunks[c].mapped and self.chunks[c].writable for c in chunks)
            new = self.new_pages(chunks)
            got = await self.call(self.proc.write(self.addr(chunks.start), b"".join(sum(new, []))), kind, chunks)
            self.note(chunks, f"cpu_write -> {self.count(kind, got)}")
            self.expect(got, {0} if writable else {errno.EFAULT}, kind, chunks)
            if not isinstance(got, KernelError):
                for c, pages in zip(chunks, new, strict=True):
                    self.chunks[c] = self.written(self.chunks[c], pages)

    def new_pages(self, chunks: range) -> list[list[bytes]]:
        k = self.cfg.chunk_pages
        stamp = self.next_stamp()
        return [[stamp_page(stamp, c * k + i) for i in range(k)] for c in chunks]

    def written(self, ch: Chunk, pages: list[bytes]) -> Chunk:
        """The chunk after a CPU write of every page (all home, writable, not zero)."""
        ch.pages = pages
        ch.on.clear()
        ch.ro_dev.clear()
        ch.excl.clear()
        ch.pte_ro = False
        return ch

    def child_pages(self, c: int) -> list[bytes]:
        """What the child should read in chunk ``c``: the pages it shares with the
        parent, or its own (its copy-on-write snapshot, or shared memory the parent
        has unmapped since)."""
        return self.chunks[c].pages if self.chunks[c].with_child else self.child_chunks[c].pages

    async def child_op(self, rng: random.Random, kind: str) -> None:
        chunks = self.pick(rng)
        locks = _Locks([self.locks[c] for c in chunks] if self.cfg.serialize_child or self.cfg.shared else [])
        async with self.child_lock, locks:  # the order fork takes them in
            if self.child is None:
                return
            addr, size = self.addr(chunks.start), len(chunks) * self.cfg.chunk_pages * P
            if kind == "child_read":
                mapped = all(self.child_chunks[c].mapped for c in chunks)
                got = await self.call(self.child.read(addr, size), kind, chunks)
                self.count(kind, got)
                self.expect(got, {0} if mapped else {errno.EFAULT}, kind, chunks)
                if not isinstance(got, KernelError):
                    self.compare(got, chunks, "child read", child=True)
                return
            writable = all(self.child_chunks[c].mapped and self.child_chunks[c].writable for c in chunks)
            new = self.new_pages(chunks)
            got = await self.call(self.child.write(addr, b"".join(sum(new, []))), kind, chunks)
            self.count(kind, got)
            self.expect(got, {0} if writable else {errno.EFAULT}, kind, chunks)
            if not isinstance(got, KernelError):
                for c, pages in zip(chunks, new, strict=True):
                    if self.chunks[c].with_child:  # the parent's mappings and mirrors see it
                        self.chunks[c] = self.written(self.chunks[c], pages)
                    else:
                        self.child_chunks[c].pages = pages

    # ---- devices ----------------------------------------------------------------------
    async def device_op(self, rng: random.Random, kind: str, d: int) -> None:
        dev = self.devices[d]
        chunks = self.pick(rng)
        addr, n = self.addr(chunks.start), len(chunks) * self.cfg.chunk_pages
        async with _Locks([self.locks[c] for c in chunks]):
            chs = [self.chunks[c] for c in chunks]
            mapped = all(ch.mapped for ch in chs)
            what = f"{kind} by {dev.name} of [{addr:#x}, +{n} pages)"
            if kind == "READ":
                got = await self.call(dev.client.command(dev.file_id, CMD_READ, addr, n), what, chunks)
                self.note(chunks, f"{what} -> {self.count(kind, got)}")
                self.expect(got, {0, errno.EBUSY} if mapped else {errno.EFAULT, errno.EBUSY}, what, chunks)
                if not isinstance(got, KernelError):
                    self.compare(got.data, chunks, what)
                    for ch in chs:
                        ch.on &= {d}
                        ch.ro_dev &= {d}
                        ch.excl &= {d}
                        ch.pte_ro |= ZERO in ch.pages
            elif kind == "WRITE":
                await self.device_write(d, chunks, what)
            elif kind == "MIGRATE_TO_DEV":
                got = await self.call(dev.client.command(dev.file_id, CMD_MIGRATE_TO_DEV, addr, n), what, chunks)
                self.note(chunks, f"{what} -> {self.count(kind, got)}")
                # ENOENT: a page on another device, or on this one or exclusive with its
                # entry erased meanwhile, is neither collected nor mapped by the handle;
                # and a page shared with the child may be busy (its copy-on-write
                # break runs concurrently): migration is best effort.
                # Shared memory never migrates: ENOENT, unless the device table still
                # holds every page from a READ. With THP, a hole may be filled while it
                # migrates by another chunk's fault mapping its whole 2 MiB span (the
                # pages step then finds the entry populated and leaves the page).
                elsewhere = any(ch.on or ch.excl or ch.swapped for ch in chs) or self.child is not None \
                    or self.cfg.pressure or self.cfg.shared or (self.cfg.thp and any(ZERO in ch.pages for ch in chs))
                allowed = ({0, errno.ENOENT} if elsewhere else {0}) if mapped else {errno.EINVAL}
                if isinstance(got, KernelError) and got.errno not in allowed:
                    what += await self.explain(dev, chunks)
                self.expect(got, allowed, what, chunks)
                if not isinstance(got, KernelError):
                    self.compare(got.data, chunks, what + " (read back)")
                # On EINVAL the pieces before the hole have migrated (as in the kernel driver).
                for ch in chs if not self.cfg.shared else []:
                    if not ch.mapped:
                        break
                    ch.on.add(d)
                    if not ch.writable or ch.pte_ro:
                        ch.ro_dev.add(d)  # the source was mapped read-only: so is the device entry
            elif kind == "MIGRATE_TO_SYS":
                got = await self.call(dev.client.command(dev.file_id, CMD_MIGRATE_TO_SYS, addr, n), what, chunks)
                self.note(chunks, f"{what} -> {self.count(kind, got)}")
                self.expect(got, {0} if mapped else {errno.EINVAL}, what, chunks)
                if not isinstance(got, KernelError):
                    for ch in chs:
                        ch.on.discard(d)
                        ch.ro_dev.discard(d)
            elif kind == "EXCLUSIVE":
                got = await self.call(dev.client.command(dev.file_id, CMD_EXCLUSIVE, addr, n), what, chunks)
                self.note(chunks, f"{what} -> {self.count(kind, got)}")
                ok = mapped and all(ch.writable for ch in chs)
                if self.cfg.shared:  # not anonymous memory: refused page by page, nothing changes
                    self.expect(got, {errno.EOPNOTSUPP} if ok else {errno.EFAULT, errno.EOPNOTSUPP}, what, chunks)
                    return
                self.expect(got, {0, errno.EBUSY} if ok else {errno.EFAULT, errno.EBUSY}, what, chunks)
                if not isinstance(got, KernelError):
                    self.compare(got.data, chunks, what + " (read back)")
                for ch in chs:
                    if not isinstance(got, KernelError):
                        ch.on.clear()  # faulted in writable: every page came home
                        ch.ro_dev.clear()
                        ch.pte_ro = False
                    if ch.mapped and ch.writable:
                        ch.excl.add(d)  # on an error, maybe some of them

    async def device_write(self, d: int, chunks: range, what: str) -> None:
        dev = self.devices[d]
        chs = [self.chunks[c] for c in chunks]
        if any(d in ch.ro_dev for ch in chs):
            # hmm-dmirror's WRITE retries forever on its own read-only device-private
            # page (tests/model/test_regressions.py): not issued.
            self.report.skipped["WRITE own read-only device page"] += 1
            return
        addr, n = self.addr(chunks.start), len(chunks) * self.cfg.chunk_pages
        new = self.new_pages(chunks)
        got = await self.call(dev.client.command(dev.file_id, CMD_WRITE, addr, n, b"".join(sum(new, []))), what,
                              chunks)
        self.note(chunks, f"{what} -> {self.count('WRITE', got)}")
        bad = next((j for j, ch in enumerate(chs) if not (ch.mapped and ch.writable)), None)
        allowed = {0, errno.EBUSY} if bad is None else {errno.EFAULT if not chs[bad].mapped else errno.EPERM,
                                                        errno.EBUSY}
        if (got.errno if isinstance(got, KernelError) else 0) not in allowed:
            what += await self.explain(dev, chunks)
        self.expect(got, allowed, what, chunks)
        if not isinstance(got, KernelError):
            for ch, pages in zip(chs, new, strict=True):
                ch.pages = pages
                ch.on &= {d}
                ch.ro_dev.clear()
                ch.excl.clear()
                ch.pte_ro = False
            return
        # Failed: the pages before the failing one may have been written. Read them
        # back: each must hold the old or the new contents.
        upto = len(chs) if bad is None else bad
        if upto == 0:
            return
        assert self.proc is not None
        span = range(chunks.start, chunks.start + upto)
        back = await self.call(self.proc.read(addr, upto * self.cfg.chunk_pages * P), what + " (read back)", span)
        self.count("WRITE_readback", back)
        self.expect(back, {0}, what + ": reading back the pages it may have written", span)
        k = self.cfg.chunk_pages
        for j in range(upto):
            ch = chs[j]
            for i in range(k):
                page = back[(j * k + i) * P : (j * k + i + 1) * P]
                if page not in (ch.pages[i], new[j][i]):
                    self.fail(f"{what} failed with {got.name}, then page {i} of chunk {chunks.start + j} holds "
                              f"{describe(page)}: neither the old {describe(ch.pages[i])} nor the new "
                              f"{describe(new[j][i])}", chunks)
                ch.pages[i] = page
            ch.on.clear()
            ch.ro_dev.clear()
            ch.excl.clear()
            ch.pte_ro |= ZERO in ch.pages

    # ---- system calls --------------------------------------------------------------------
    async def syscall_op(self, rng: random.Random, kind: str, _: int) -> None:
        assert self.proc is not None
        if kind == "fork":
            await self.fork()
            return
        if kind in ("exit", "oom_kill"):  # the child goes: the parent's pages it shared must not
            async with self.child_lock:
                if self.child is not None:
                    end = self.child.exit() if kind == "exit" else self.child.oom_kill()
                    got = await self.call(end, f"{kind} of the child", range(0))
                    self.count(kind, got)
                    self.expect(got, {0}, f"{kind} of the child", range(0))
                    self.child = None
                    for ch in self.chunks:
                        ch.with_child = False
            return
        if kind == "remap_span":
            span = PMD_SIZE // (self.cfg.chunk_pages * P)
            if self.cfg.chunks >= span:
                first = rng.randrange(self.cfg.chunks // span) * span
                await self.remap(range(first, first + span), kind)
            return
        chunks = self.pick(rng)
        addr, size = self.addr(chunks.start), len(chunks) * self.cfg.chunk_pages * P
        async with _Locks([self.locks[c] for c in chunks]):
            chs = [self.chunks[c] for c in chunks]
            mapped = all(ch.mapped for ch in chs)
            if kind == "mprotect":
                if not mapped:
                    return  # over a hole Linux changes what lies before it, hmmd nothing
                writable = rng.random() < 0.6
                prot = RW if writable else PROT_READ
                got = await self.call(self.proc.mprotect(addr, size, prot), kind, chunks)
                self.note(chunks, f"mprotect {'rw' if writable else 'r'} -> {self.count(kind, got)}")
                self.expect(got, {0}, kind, chunks)
                for ch in chs:
                    ch.writable = writable
                    if not writable:
                        ch.ro_dev |= ch.on
                        ch.pte_ro = True
            elif kind == "dontneed":
                got = await self.call(self.proc.madvise(addr, size, MADV_DONTNEED), kind, chunks)
                self.note(chunks, f"dontneed -> {self.count(kind, got)}")
                self.expect(got, {0} if mapped else {errno.ENOMEM}, kind, chunks)
                for ch in chs:
                    if ch.mapped and not self.cfg.shared:  # (shared memory keeps its pages in its file)
                        self.emptied(ch)
            elif kind == "compact":  # pages change frames, not bytes; a mirror hears CLEAR first
                got = await self.call(self.admin.compact_memory(), kind, chunks)
                self.note(chunks, f"compact -> {self.count(kind, got)}")
                self.expect(got, {0}, kind, chunks)
            elif kind == "pageout":  # reclaim changes no byte; a mirror hears CLEAR first
                got = await self.call(self.proc.madvise(addr, size, MADV_PAGEOUT), kind, chunks)
                self.note(chunks, f"pageout -> {self.count(kind, got)}")
                self.expect(got, {0} if mapped else {errno.ENOMEM}, kind, chunks)
                for ch in chs:
                    ch.swapped |= ch.mapped
            elif kind == "munmap":
                got = await self.call(self.proc.munmap(addr, size), kind, chunks)
                self.note(chunks, f"munmap -> {self.count(kind, got)}")
                self.expect(got, {0}, kind, chunks)
                for c, ch in zip(chunks, chs, strict=True):
                    self.unshare(c)
                    self.emptied(ch)
                    ch.mapped = False
            elif kind == "mmap":
                await self.map_afresh(chunks, kind)

    async def remap(self, chunks: range, kind: str) -> None:
        """munmap, then mmap afresh, every chunk of ``chunks`` (a whole 2 MiB span)."""
        assert self.proc is not None
        addr, size = self.addr(chunks.start), len(chunks) * self.cfg.chunk_pages * P
        async with _Locks([self.locks[c] for c in chunks]):
            got = await self.call(self.proc.munmap(addr, size), kind, chunks)
            self.expect(got, {0}, f"{kind}: munmap", chunks)
            for c in chunks:
                self.unshare(c)
                self.emptied(self.chunks[c])
                self.chunks[c].mapped = False
            await self.map_afresh(chunks, kind)

    async def map_afresh(self, chunks: range, kind: str) -> None:
        """MAP_FIXED over ``chunks`` (their locks held): they read as zeros."""
        assert self.proc is not None
        addr, size = self.addr(chunks.start), len(chunks) * self.cfg.chunk_pages * P
        got = await self.call(self.proc.mmap(size, RW, self.flags | MAP_FIXED, addr=addr), kind, chunks)
        self.note(chunks, f"{kind}: mmap fixed -> {self.count(kind, got)}")
        self.expect(got, {0}, kind, chunks)
        if got != addr:
            self.fail(f"MAP_FIXED at {addr:#x} returned {got:#x}", chunks)
        if self.cfg.thp:  # (the new mapping joins its neighbours' advice)
            self.expect(await self.call(self.proc.madvise(addr, size, MADV_HUGEPAGE), kind, chunks), {0},
                        "MADV_HUGEPAGE of the new mapping", chunks)
        for c in chunks:
            ch = self.chunks[c]
            self.unshare(c)
            self.emptied(ch)
            ch.mapped = ch.writable = True

    def unshare(self, c: int) -> None:
        """The parent maps something else at chunk ``c`` now: the child keeps the
        shared pages as they are."""
        if self.chunks[c].with_child:
            self.child_chunks[c].pages = list(self.chunks[c].pages)
            self.chunks[c].with_child = False

    def emptied(self, ch: Chunk) -> None:
        ch.pages = [ZERO] * self.cfg.chunk_pages
        ch.on.clear()
        ch.ro_dev.clear()
        ch.excl.clear()
        ch.pte_ro = False
        ch.swapped = False

    async def fork(self) -> None:
        assert self.proc is not None
        async with self.child_lock:
            if self.child is not None:
                return
            async with self.all_locks():
                got = await self.call(self.proc.fork(), "fork", range(0))
                self.count("fork", got)
                self.expect(got, {0}, "fork", range(0))
                self.child = got
                self.child_chunks = [ChildChunk(list(ch.pages), ch.mapped, ch.writable) for ch in self.chunks]
                for ch in self.chunks:
                    if self.cfg.shared:
                        ch.with_child = ch.mapped
                    else:
                        ch.ro_dev |= ch.on  # device-private entries become read-only in both
                        ch.excl.clear()  # exclusive entries are restored at fork
                        ch.pte_ro = True  # copy-on-write: read-only in both
                    ch.history.append(f"#{self.op_seq} fork")


class _Locks:
    """``async with _Locks(locks)``: take them in order, release them all."""

    def __init__(self, locks: list[asyncio.Lock]) -> None:
        self.locks = locks

    async def __aenter__(self) -> None:
        for lock in self.locks:
            await lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        for lock in reversed(self.locks):
            lock.release()


async def run(hmmd_address: str, devices: list[tuple[str, str]], config: Config) -> Report:
    """Run the tester against a daemon. ``devices``: (dmirror program address,
    device name) for each device under test."""
    cpu = ProcessClient.connect(hmmd_address)
    admin = AdminClient(cpu.channel)
    clients = {a: DmirrorClient(a) for a in {a for a, _ in devices}}
    try:
        tester = Tester(cpu, admin, [Device(name, clients[a]) for a, name in devices], config)
        return await tester.run()
    finally:
        for c in clients.values():
            await c.close()
        await cpu.close()
