"""Interval notifiers and the per-mm invalidation sequence (mm/mmu_notifier.c).

The per-mm sequence starts at 2; even means idle, odd means an invalidation that
hit at least one interval is running. Inserts and removes that arrive while it is
odd are deferred until the last active invalidation ends. ``read_begin`` sleeps
while the notifier's sequence equals the open window's; ``read_retry`` compares.

Everything here runs on the daemon's event loop; code between two awaits is the
kernel's spinlocked section.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from hmm.abi import Event
from hmm.errors import KernelError
from hmmd.core.stats import Latencies
from hmmd.core.trace import NO_TRACE, Tracer

log = logging.getLogger(__name__)

_notifier_ids = itertools.count(1)


@dataclass(frozen=True)
class NotifierRange:
    """struct mmu_notifier_range: [start, end) of ``mm`` changing because of ``event``."""

    mm: object
    start: int
    end: int
    event: Event
    owner: int = 0
    blockable: bool = True


class NotifierOps(Protocol):
    async def invalidate(self, sub: IntervalNotifier, rng: NotifierRange, cur_seq: int) -> bool:
        """Stop using [rng.start, rng.end); call ``sub.set_seq(cur_seq)`` under the
        user lock; return True (False only if ``rng.blockable`` is False)."""
        ...


class IntervalNotifier:
    """struct mmu_interval_notifier over [start, last] (last inclusive) of one mm."""

    def __init__(self, subs: MmNotifiers, start: int, length: int, ops: NotifierOps) -> None:
        self.id = next(_notifier_ids)
        self.subs = subs
        self.start = start
        self.last = start + length - 1
        self.ops = ops
        self.invalidate_seq = 0
        self.in_tree = False
        self.removed = False

    def set_seq(self, cur_seq: int) -> None:
        """mmu_interval_set_seq(): only from inside ``invalidate``."""
        self.invalidate_seq = cur_seq

    def overlaps(self, start: int, end: int) -> bool:
        return self.start < end and self.last >= start

    @property
    def state(self) -> str:
        """For tools: "idle"; "invalidating" (a window that hit it is open: read_begin
        sleeps); "insert-deferred" or "remove-deferred" (until the window closes)."""
        if self in self.subs.deferred:
            return "remove-deferred" if self.in_tree else "insert-deferred"
        if self.subs.invalidating and self.invalidate_seq == self.subs.invalidate_seq:
            return "invalidating"
        return "idle"

    def __repr__(self) -> str:
        return f"<IntervalNotifier {self.id} [{self.start:#x}, {self.last:#x}] seq={self.invalidate_seq}>"


class MmNotifiers:
    """struct mmu_notifier_subscriptions: the interval tree and sequence of one mm."""

    def __init__(self, mm: object) -> None:
        self.mm = mm
        self.invalidate_seq = 2
        self.active_invalidate_ranges = 0
        self.itree: list[IntervalNotifier] = []  # kept sorted by start ("tree order")
        self.deferred: list[IntervalNotifier] = []
        self._wq: asyncio.Future[None] | None = None
        self.window_latency: Latencies | None = None  # set by the kernel to time fan-outs
        self.trace: Tracer = NO_TRACE  # the kernel's, set at spawn

    # ---- helpers --------------------------------------------------------------
    @property
    def invalidating(self) -> bool:
        return bool(self.invalidate_seq & 1)

    def _tree_insert(self, sub: IntervalNotifier) -> None:
        i = 0
        while i < len(self.itree) and self.itree[i].start <= sub.start:
            i += 1
        self.itree.insert(i, sub)
        sub.in_tree = True

    def _tree_remove(self, sub: IntervalNotifier) -> None:
        self.itree.remove(sub)
        sub.in_tree = False

    def overlapping(self, start: int, end: int) -> list[IntervalNotifier]:
        return [s for s in self.itree if s.overlaps(start, end)]

    async def _wait_seq_change(self, seq: int) -> None:
        while self.invalidate_seq == seq:
            if self._wq is None:
                self._wq = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._wq)

    def _wake_all(self) -> None:
        if self._wq is not None:
            if not self._wq.done():
                self._wq.set_result(None)
            self._wq = None

    # ---- write side -----------------------------------------------------------
    async def invalidate_range_start(self, rng: NotifierRange) -> None:
        """Open (or join) the invalidation window and call every overlapping notifier.

        Blockable ranges fan out to all notifiers at once and wait for all of them.
        A non-blockable range calls them in tree order; the first refusal ends the
        window on the caller's behalf and raises EAGAIN — the caller must then
        leave the page tables alone and must not call ``invalidate_range_end``.
        """
        self.active_invalidate_ranges += 1
        hits = self.overlapping(rng.start, rng.end)
        if hits:
            self.invalidate_seq |= 1
        cur_seq = self.invalidate_seq
        if not hits:
            return
        if rng.blockable:
            t0 = time.perf_counter()
            results = await asyncio.gather(
                *(sub.ops.invalidate(sub, rng, cur_seq) for sub in hits), return_exceptions=True
            )
            if self.window_latency is not None:
                self.window_latency.add(time.perf_counter() - t0)
            self.trace.window(self.mm, rng, t0, len(hits))
            for sub, res in zip(hits, results, strict=True):
                if isinstance(res, BaseException):
                    log.error("invalidate callback of %r raised %r; treated as done", sub, res)
                elif res is False:
                    log.warning("notifier %d refused a blockable invalidation; counts as success", sub.id)
            return
        for sub in hits:
            try:
                ok = await sub.ops.invalidate(sub, rng, cur_seq)
            except Exception:  # a broken callback must not wedge the window
                log.exception("invalidate callback of %r raised", sub)
                ok = True
            if not ok:
                self.invalidate_range_end(rng)
                raise KernelError(errno.EAGAIN, f"notifier {sub.id} refused a non-blockable invalidation")

    def invalidate_range_end(self, rng: NotifierRange) -> None:
        """Close the window when the last active invalidation ends; apply deferred work."""
        self.active_invalidate_ranges -= 1
        assert self.active_invalidate_ranges >= 0
        if self.active_invalidate_ranges or not self.invalidating:
            return
        self.invalidate_seq += 1
        for sub in self.deferred:
            if sub.in_tree:
                self._tree_remove(sub)
                sub.removed = True
            else:
                self._tree_insert(sub)
        self.deferred.clear()
        self._wake_all()

    def invalidate(self, rng: NotifierRange) -> InvalidateWindow:
        """``async with subs.invalidate(rng):`` start … change PTEs … end."""
        return InvalidateWindow(self, rng)

    # ---- insert / remove ------------------------------------------------------
    def insert(self, sub: IntervalNotifier) -> None:
        """mmu_interval_notifier_insert() once arguments are checked (see AddressSpace)."""
        if self.active_invalidate_ranges:
            if self.invalidating:
                self.deferred.append(sub)  # case c: joins the tree when the window closes
            else:
                self.invalidate_seq |= 1  # case b
                self._tree_insert(sub)
            sub.invalidate_seq = self.invalidate_seq
        else:
            sub.invalidate_seq = self.invalidate_seq - 1  # case a
            self._tree_insert(sub)

    async def remove(self, sub: IntervalNotifier) -> None:
        """mmu_interval_notifier_remove(): after it returns no callback runs or will run."""
        if sub.removed:
            return
        seq = 0
        if self.invalidating:
            if not sub.in_tree:
                if sub in self.deferred:  # never inserted: just unlink
                    self.deferred.remove(sub)
                sub.removed = True
                return
            if sub not in self.deferred:
                self.deferred.append(sub)
            seq = self.invalidate_seq
        else:
            self._tree_remove(sub)
            sub.removed = True
        if seq:
            await self._wait_seq_change(seq)

    # ---- read side ------------------------------------------------------------
    async def read_begin(self, sub: IntervalNotifier) -> int:
        """mmu_interval_read_begin(): sleeps while the window that hit ``sub`` is open."""
        seq = sub.invalidate_seq
        if seq == self.invalidate_seq:
            await self._wait_seq_change(seq)
        return seq

    @staticmethod
    def read_retry(sub: IntervalNotifier, seq: int) -> bool:
        """mmu_interval_read_retry() / check_retry(): True if ``seq`` is stale."""
        return sub.invalidate_seq != seq


class InvalidateWindow:
    __slots__ = ("subs", "rng")

    def __init__(self, subs: MmNotifiers, rng: NotifierRange) -> None:
        self.subs = subs
        self.rng = rng

    async def __aenter__(self) -> NotifierRange:
        await self.subs.invalidate_range_start(self.rng)
        return self.rng

    async def __aexit__(self, *exc: object) -> None:
        self.subs.invalidate_range_end(self.rng)
