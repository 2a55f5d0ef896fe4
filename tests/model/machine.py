"""The state machine: random system calls, CPU accesses and dmirror commands,
each run on a system under test (``tests.model.sut``) and judged by the model
(``tests.model.model``).

Mappings live in a small arena (48 pages at a fixed address, plus whatever the
kernel picks for non-fixed mmaps and moves) so that operations overlap often.
Ranges are drawn around existing mappings and their edges, one page past them
included, so holes and permission changes are met as often as mapped pages.

``machine_class(make_sut, loop)`` binds the machine to one system: ``make_sut``
builds a fresh system for each example on ``loop``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hmm.abi import (
    MADV_DONTNEED,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
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

from .model import Model, P, Space, pattern
from .sut import Sut, map_flags

T = TypeVar("T")

ARENA = 0x1000_0000
ARENA_PAGES = 48
MAX_PROCESSES = 3
MAX_RANGE_PAGES = 8
COMMAND_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_MIGRATE_TO_DEV: "MIGRATE_TO_DEV",
                 CMD_MIGRATE_TO_SYS: "MIGRATE_TO_SYS", CMD_EXCLUSIVE: "EXCLUSIVE",
                 CMD_CHECK_EXCLUSIVE: "CHECK_EXCLUSIVE", CMD_SNAPSHOT: "SNAPSHOT"}
PROTS = (PROT_READ | PROT_WRITE, PROT_READ | PROT_WRITE, PROT_READ, PROT_NONE)


class ModelMachine(RuleBasedStateMachine):
    """Bound to a system by ``machine_class``; see the module doc."""

    make_sut: Callable[[], Awaitable[Sut]]
    loop: asyncio.AbstractEventLoop
    step_timeout_s = 20.0
    check_each_step = True
    skipped_writes = 0  # WRITEs not issued: they would meet the own-read-only-page retry loop
    tally: dict[tuple[str, str], int] = {}  # (operation, outcome) -> count, over every example
    _cmd = -1

    def __init__(self) -> None:
        super().__init__()
        self.sut: Sut = self.loop.run_until_complete(type(self).make_sut())
        self.model = Model(self.sut.ndevices)
        self.root = self.run(self.sut.spawn())
        self.model.spawn(self.root)
        self.seed = 0

    # ---- plumbing -----------------------------------------------------------------
    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, self.step_timeout_s))  # type: ignore[arg-type]

    def call(self, coro: Awaitable[Any]) -> Any:
        """The call's result, or the KernelError it raised (a timeout fails the test)."""
        what = getattr(coro, "__qualname__", "call").split(".")[-1]
        try:
            got = self.run(coro)
            if what == "command":
                what = COMMAND_NAMES.get(self._cmd, "command")
            self.tally[(what, "ok")] = self.tally.get((what, "ok"), 0) + 1
            return got
        except KernelError as e:
            if what == "command":
                what = COMMAND_NAMES.get(self._cmd, "command")
            self.tally[(what, e.name)] = self.tally.get((what, e.name), 0) + 1
            return e
        except TimeoutError as e:
            raise AssertionError(f"the call did not finish in {self.step_timeout_s} s (a hang)") from e

    def teardown(self) -> None:
        try:
            for pid in sorted(self.model.spaces, reverse=True):
                self.run(self.sut.exit(pid))
            self.loop.run_until_complete(asyncio.sleep(0.01))
            problems = self.run(self.sut.problems())
            assert not problems, "after every process exited:\n" + "\n".join(problems)
        finally:
            self.run(self.sut.close())

    def pids(self) -> list[int]:
        return sorted(self.model.spaces)

    def draw_pid(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(self.pids()), label="pid")

    def draw_range(self, data: st.DataObject, s: Space, max_pages: int = MAX_RANGE_PAGES) -> tuple[int, int]:
        """(addr, npages): mostly inside one mapping of ``s``, else around the edges of
        its mappings (holes and neighbours included) or in the arena."""
        if s.vmas and data.draw(st.integers(0, 9), label="inside") < 6:
            v = data.draw(st.sampled_from(s.vmas), label="vma")
            first = data.draw(st.integers(0, (v.end - v.start) // P - 1), label="first")
            left = (v.end - v.start) // P - first
            return v.start + first * P, data.draw(st.integers(1, min(left, max_pages)), label="npages")
        anchors = sorted({v.start for v in s.vmas} | {v.end for v in s.vmas} | {ARENA})
        base = data.draw(st.sampled_from(anchors), label="anchor")
        addr = max(ARENA - P, base + data.draw(st.integers(-2, 6), label="offset") * P)
        return addr, data.draw(st.integers(1, max_pages), label="npages")

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed

    # ---- checks after every step ----------------------------------------------------
    @invariant()
    def no_problems(self) -> None:
        if self.check_each_step:
            problems = self.run(self.sut.problems())
            assert not problems, "\n".join(problems)

    # ---- the start: a few mappings with data, both devices opened ----------------------
    @initialize(data=st.data())
    def populate(self, data: st.DataObject) -> None:
        pos = ARENA
        for _ in range(data.draw(st.integers(2, 4), label="mappings")):
            pos += data.draw(st.integers(0, 2), label="gap") * P
            npages = data.draw(st.integers(2, MAX_RANGE_PAGES), label="npages")
            if pos + npages * P > ARENA + ARENA_PAGES * P:
                break
            shared = data.draw(st.integers(0, 3), label="shared") == 0
            got = self.call(self.sut.mmap(self.root, pos, npages * P, PROT_READ | PROT_WRITE,
                                          map_flags(shared, True)))
            self.model.mmap(self.root, pos, npages, PROT_READ | PROT_WRITE, shared, True, got)
            payload = pattern(self.next_seed(), pos, npages)
            self.model.cpu_write(self.root, pos, payload, self.call(self.sut.write(self.root, pos, payload)))
            pos += npages * P
        for dev in range(self.model.ndevices):
            self.model.open(self.root, dev, self.call(self.sut.open(self.root, dev)))

    # ---- system calls ------------------------------------------------------------------
    @rule(data=st.data())
    def mmap(self, data: st.DataObject) -> None:
        pid = self.draw_pid(data)
        npages = data.draw(st.integers(1, MAX_RANGE_PAGES), label="npages")
        prot = data.draw(st.sampled_from(PROTS), label="prot")
        shared = data.draw(st.integers(0, 3), label="shared") == 0
        fixed = data.draw(st.booleans(), label="fixed")
        addr = ARENA + data.draw(st.integers(0, ARENA_PAGES - npages), label="page") * P if fixed else 0
        got = self.call(self.sut.mmap(pid, addr, npages * P, prot, map_flags(shared, fixed)))
        self.model.mmap(pid, addr, npages, prot, shared, fixed, got)

    @rule(data=st.data())
    def munmap(self, data: st.DataObject) -> None:
        pid = self.draw_pid(data)
        addr, npages = self.draw_range(data, self.model.space(pid), 3)
        got = self.call(self.sut.munmap(pid, addr, npages * P))
        self.model.munmap(pid, addr, npages * P, got)

    @rule(data=st.data())
    def mprotect(self, data: st.DataObject) -> None:
        pid = self.draw_pid(data)
        s = self.model.space(pid)
        addr, npages = self.draw_range(data, s)
        if s.vma(addr) is not None:
            # Stop at the first hole: past it Linux has already changed the VMAs before
            # it while hmmd changes nothing (see test_state_machine.py).
            n = 0
            while n < npages and s.vma(addr + n * P) is not None:
                n += 1
            npages = n
        prot = data.draw(st.sampled_from(PROTS), label="prot")
        got = self.call(self.sut.mprotect(pid, addr, npages * P, prot))
        self.model.mprotect(pid, addr, npages * P, prot, got)

    @rule(data=st.data())
    def madvise_dontneed(self, data: st.DataObject) -> None:
        pid = self.draw_pid(data)
        addr, npages = self.draw_range(data, self.model.space(pid))
        got = self.call(self.sut.madvise(pid, addr, npages * P, MADV_DONTNEED))
        self.model.madvise_dontneed(pid, addr, npages * P, got)

    @rule(data=st.data())
    def mremap(self, data: st.DataObject) -> None:
        pid = self.draw_pid(data)
        s = self.model.space(pid)
        holes = [ARENA + i * P for i in range(ARENA_PAGES) if s.vma(ARENA + i * P) is None]
        if s.vmas and data.draw(st.integers(0, 7), label="in_hole") != 0:
            v = data.draw(st.sampled_from(s.vmas), label="vma")
            first = data.draw(st.integers(0, (v.end - v.start) // P - 1), label="first")
            old = v.start + first * P
            old_len = data.draw(st.integers(1, (v.end - old) // P), label="old_pages") * P
        elif holes:
            old, old_len = data.draw(st.sampled_from(holes), label="hole"), P
        else:
            return
        new_len = data.draw(st.integers(1, MAX_RANGE_PAGES), label="new_pages") * P
        at = s.vma(old)
        if at is not None and at.shm is not None:
            # hmmd grows the shared memory object with the mapping, Linux keeps its size
            # (past it is SIGBUS); see test_regressions.py. Shrink and move only.
            new_len = min(new_len, old_len)
        mode = data.draw(st.sampled_from(("resize", "maymove", "fixed")), label="mode")
        fixed_to = None
        flags = 0
        if mode == "maymove":
            flags = MREMAP_MAYMOVE
        elif mode == "fixed":
            flags = MREMAP_MAYMOVE | MREMAP_FIXED
            fixed_to = ARENA + data.draw(st.integers(0, ARENA_PAGES - new_len // P), label="to") * P
        got = self.call(self.sut.mremap(pid, old, old_len, new_len, flags, fixed_to or 0))
        self.model.mremap(pid, old, old_len, new_len, maymove=mode != "resize", fixed_to=fixed_to, got=got)

    @precondition(lambda self: len(self.model.spaces) < MAX_PROCESSES)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        pid = self.draw_pid(data)
        got = self.call(self.sut.fork(pid))
        assert not isinstance(got, KernelError), f"fork of {pid} failed: {got}"
        self.model.fork(pid, got)

    @precondition(lambda self: len(self.model.spaces) > 1)
    @rule(data=st.data())
    def exit(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from([p for p in self.pids() if p != self.root]), label="pid")
        got = self.call(self.sut.exit(pid))
        assert not isinstance(got, KernelError), f"exit of {pid} failed: {got}"
        self.model.exit(pid)

    # ---- CPU accesses ------------------------------------------------------------------
    def draw_bytes_range(self, data: st.DataObject, s: Space) -> tuple[int, int]:
        addr, npages = self.draw_range(data, s, 4)
        skip = data.draw(st.sampled_from((0, 0, 0, 1, 100, P - 8)), label="skip")
        trim = data.draw(st.sampled_from((0, 0, 0, 1, 7)), label="trim")
        return addr + skip, max(1, npages * P - skip - trim)

    @rule(data=st.data())
    def cpu_read(self, data: st.DataObject) -> None:
        pid = self.draw_pid(data)
        addr, length = self.draw_bytes_range(data, self.model.space(pid))
        got = self.call(self.sut.read(pid, addr, length))
        self.model.cpu_read(pid, addr, length, got)

    @rule(data=st.data())
    def cpu_write(self, data: st.DataObject) -> None:
        pid = self.draw_pid(data)
        addr, length = self.draw_bytes_range(data, self.model.space(pid))
        first = addr & ~(P - 1)
        buf = pattern(self.next_seed(), first, (addr + length - first + P - 1) // P)
        payload = buf[addr - first : addr - first + length]
        got = self.call(self.sut.write(pid, addr, payload))
        self.model.cpu_write(pid, addr, payload, got)

    # ---- devices -------------------------------------------------------------------------
    def unopened(self) -> list[tuple[int, int]]:
        return [(pid, d) for pid in self.pids() for d in range(self.model.ndevices)
                if d not in self.model.space(pid).handles]

    def opened(self) -> list[tuple[int, int]]:
        return [(pid, d) for pid in self.pids() for d in self.model.space(pid).handles]

    @precondition(lambda self: bool(self.unopened()))
    @rule(data=st.data())
    def open_device(self, data: st.DataObject) -> None:
        pid, dev = data.draw(st.sampled_from(self.unopened()), label="pid_dev")
        got = self.call(self.sut.open(pid, dev))
        assert not isinstance(got, KernelError), f"open of device {dev} by {pid} failed: {got}"
        self.model.open(pid, dev, got)

    def command(self, data: st.DataObject, cmd: int) -> tuple[int, int, int, int, Any]:
        self._cmd = cmd
        pid, dev = data.draw(st.sampled_from(self.opened()), label="pid_dev")
        addr, npages = self.draw_range(data, self.model.space(pid))
        return pid, dev, addr, npages, self.model.space(pid).handles[dev].file_id

    @precondition(lambda self: bool(self.opened()))
    @rule(data=st.data())
    def dev_read(self, data: st.DataObject) -> None:
        pid, dev, addr, n, fid = self.command(data, CMD_READ)
        self.model.dev_read(pid, dev, addr, n, self.call(self.sut.command(dev, fid, CMD_READ, addr, n)))

    @precondition(lambda self: bool(self.opened()))
    @rule(data=st.data())
    def dev_write(self, data: st.DataObject) -> None:
        pid, dev, addr, n, fid = self.command(data, CMD_WRITE)
        if self.model.write_blocked(pid, dev, addr, n):
            type(self).skipped_writes += 1
            return
        payload = pattern(self.next_seed(), addr, n)
        got = self.call(self.sut.command(dev, fid, CMD_WRITE, addr, n, payload))
        self.model.dev_write(pid, dev, addr, payload, got)

    @precondition(lambda self: bool(self.opened()))
    @rule(data=st.data())
    def migrate_to_dev(self, data: st.DataObject) -> None:
        pid, dev, addr, n, fid = self.command(data, CMD_MIGRATE_TO_DEV)
        got = self.call(self.sut.command(dev, fid, CMD_MIGRATE_TO_DEV, addr, n))
        self.model.migrate_to_dev(pid, dev, addr, n, got)

    @precondition(lambda self: bool(self.opened()))
    @rule(data=st.data())
    def migrate_to_sys(self, data: st.DataObject) -> None:
        pid, dev, addr, n, fid = self.command(data, CMD_MIGRATE_TO_SYS)
        got = self.call(self.sut.command(dev, fid, CMD_MIGRATE_TO_SYS, addr, n))
        self.model.migrate_to_sys(pid, dev, addr, n, got)

    @precondition(lambda self: bool(self.opened()))
    @rule(data=st.data())
    def exclusive(self, data: st.DataObject) -> None:
        pid, dev, addr, n, fid = self.command(data, CMD_EXCLUSIVE)
        got = self.call(self.sut.command(dev, fid, CMD_EXCLUSIVE, addr, n))
        self.model.exclusive(pid, dev, addr, n, got)

    @precondition(lambda self: bool(self.opened()))
    @rule(data=st.data())
    def check_exclusive(self, data: st.DataObject) -> None:
        pid, dev, addr, n, fid = self.command(data, CMD_CHECK_EXCLUSIVE)
        got = self.call(self.sut.command(dev, fid, CMD_CHECK_EXCLUSIVE, addr, n))
        self.model.check_exclusive(pid, dev, addr, n, got)

    @precondition(lambda self: bool(self.opened()))
    @rule(data=st.data())
    def snapshot(self, data: st.DataObject) -> None:
        pid, dev, addr, n, fid = self.command(data, CMD_SNAPSHOT)
        got = self.call(self.sut.command(dev, fid, CMD_SNAPSHOT, addr, n))
        self.model.snapshot(pid, dev, addr, n, got)


def machine_class(make_sut: Callable[[], Awaitable[Sut]], loop: asyncio.AbstractEventLoop,
                  *, step_timeout_s: float = 20.0, check_each_step: bool = True) -> type[ModelMachine]:
    """A ModelMachine subclass bound to one kind of system and one event loop."""
    return type("BoundModelMachine", (ModelMachine,), {
        "make_sut": staticmethod(make_sut), "loop": loop, "step_timeout_s": step_timeout_s,
        "check_each_step": check_each_step, "tally": {}, "skipped_writes": 0,
    })


def report(machine: type[ModelMachine]) -> str:
    """What the run did: outcomes per operation."""
    ops: dict[str, list[str]] = {}
    for (op, outcome), n in sorted(machine.tally.items()):
        ops.setdefault(op, []).append(f"{outcome} {n}")
    lines = [f"{op}: {', '.join(v)}" for op, v in ops.items()]
    lines.append(f"WRITEs not issued (own read-only device page): {machine.skipped_writes}")
    return "\n".join(lines)

