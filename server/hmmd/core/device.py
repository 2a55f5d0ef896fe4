"""Devices as the core sees them: a driver behind some transport, its notifiers,
its open files and what it may DMA to.

The transport (the rpc layer's session) implements ``DeviceOps``. The core wraps
every notifier of a device in ``DeviceNotifierOps``, which records the sequence,
forwards the callback, and — once the device has acknowledged, or was fenced —
revokes the device's DMA rights over the invalidated range.

DMA rights (``DmaGrants``) are the coherence sanitizer: a range fault result
grants the device the frames it reports, per notifier and virtual page — the
notifier whose invalidations protect that result — and that notifier's
invalidations (or its removal) revoke them. A DMA to any frame not granted (or not writable, for
a write) is refused with EFAULT and counted as a violation.
"""

from __future__ import annotations

import errno
import itertools
import logging
from typing import Protocol

import numpy as np

from hmm.abi import HMM_PFN_VALID, HMM_PFN_WRITE, PAGE_SHIFT, Event
from hmm.errors import KernelError
from hmm.sparse import SparseTable
from hmmd.core.devmem import DevicePageMap, MemoryKind
from hmmd.core.evict import Eviction
from hmmd.core.faults import DeviceFaults
from hmmd.core.migrate import Migration
from hmmd.core.notifier import IntervalNotifier, NotifierRange
from hmmd.core.pagetable import PTE_PRESENT, PTE_WRITE, pte_pfn, pte_present
from hmmd.core.physmem import add_counts
from hmmd.core.stats import Latencies

log = logging.getLogger(__name__)

_owner_tags = itertools.count(1)


class DeviceOps(Protocol):
    """What the core asks of a device's driver (implemented by its session)."""

    async def invalidate(self, notifier: IntervalNotifier, rng: NotifierRange, cur_seq: int) -> bool: ...

    async def file_open(self, file_id: int, pid: int) -> int:
        """Returns 0, or an errno refusing the open."""
        ...

    async def file_release(self, file_id: int, pid: int) -> None: ...

    async def migrate_to_ram(self, pid: int, addr: int, pfn: int, fault_token: int,
                             migration: Migration | None) -> bool:
        """The CPU touched device page ``pfn`` at ``addr``: move it to system RAM and
        return True, or False for SIGBUS. ``migration`` is the page's migration already
        set up when the device asked for that; otherwise it sets one up with the token."""
        ...

    def page_free(self, pfns: np.ndarray) -> None:
        """These device pages lost their last reference (no reply expected)."""
        ...


class DmaGrants:
    """Which system frames a device may DMA to, by notifier and virtual page."""

    def __init__(self, nframes: int) -> None:
        self.by_notifier: dict[int, SparseTable] = {}
        self.readable = np.zeros(nframes, dtype=np.int32)
        self.writable = np.zeros(nframes, dtype=np.int32)

    def grant(self, notifier_id: int, start: int, pfns: np.ndarray, flags: np.ndarray, nframes: int) -> None:
        """Record a range fault result for [start, start + len(pfns) pages)."""
        table = self.by_notifier.setdefault(notifier_id, SparseTable())
        end = start + (len(pfns) << PAGE_SHIFT)
        ok = ((flags & HMM_PFN_VALID) != 0) & (pfns < nframes)
        entries = np.where(ok, (pfns << np.uint64(PAGE_SHIFT)) | PTE_PRESENT, np.uint64(0)).astype(np.uint64)
        entries[ok & ((flags & HMM_PFN_WRITE) != 0)] |= PTE_WRITE
        old = table.gather(start, end)
        changed = old != entries
        if changed.any():  # a repeated fault of present pages changes nothing
            self._drop(old[changed])
            self._take(entries[changed])
            table.scatter(start, entries)

    def revoke(self, notifier_id: int, start: int, end: int) -> None:
        table = self.by_notifier.get(notifier_id)
        if table is None:
            return
        self._drop(table.erase(start, end))
        if not table.tables:
            del self.by_notifier[notifier_id]

    def revoke_all(self) -> None:
        """Revoke every right for good (the device is fenced). The counters are dropped,
        not zeroed: they span all of RAM, and zeroing them would make every page of
        them resident (megabytes per device, kept as long as the device is)."""
        self.by_notifier.clear()
        self.readable = self.writable = np.zeros(0, dtype=np.int32)

    def _take(self, entries: np.ndarray) -> None:
        self._count(entries, +1)

    def _drop(self, entries: np.ndarray) -> None:
        self._count(entries, -1)

    def _count(self, entries: np.ndarray, sign: int) -> None:
        live = entries[pte_present(entries)]
        if not len(live):
            return
        pfns = pte_pfn(live)
        add_counts(self.readable, pfns, sign)
        wpfns = pfns[(live & PTE_WRITE) != 0]
        if len(wpfns):
            add_counts(self.writable, wpfns, sign)

    def check(self, pfns: np.ndarray, write: bool) -> np.ndarray:
        """The PFNs among ``pfns`` that the device may not touch."""
        counts = self.writable if write else self.readable
        if not len(counts):  # all revoked for good
            return pfns
        held = counts[pfns] > 0
        return pfns[~held]


class Device:
    """A connected device (its driver lives in another process)."""

    def __init__(self, device_id: int, name: str, ops: DeviceOps, nframes: int, max_notifiers: int,
                 max_message_bytes: int) -> None:
        self.id = device_id
        self.name = name
        self.ops = ops
        self.owner = next(_owner_tags)
        self.alive = True
        self.notifiers: dict[int, IntervalNotifier] = {}
        self.max_notifiers = max_notifiers
        self.max_message_bytes = max_message_bytes  # as negotiated: no reply to it may be larger
        self.grants = DmaGrants(nframes)
        self.violations = 0
        self.invalidations = 0
        self.range_faults = 0
        self.fenced_reason = ""
        self.retired = False  # fenced, its notifiers removed and its coherent memory home (Kernel._retire)
        self.invalidate_latency = Latencies()
        # A CPU fault on one of its device-private pages until the page is home
        # (setup, the MigrateToRam round trip, pages and finalize): what the CPU waits.
        self.migrate_to_ram_latency = Latencies()
        self.pgmap: DevicePageMap | None = None
        self.wants_fault_migration = False  # capability "migrate-to-ram-setup"
        self.own_migrate_silent = False  # capability "own-migrate-silent"
        self.faults = DeviceFaults()  # injected misbehaviour (tests)
        self.migrations: dict[int, Migration | Eviction] = {}

    def __repr__(self) -> str:
        return f"<Device {self.id} {self.name!r}{'' if self.alive else ' fenced'}>"

    def check_dma(self, pfns: np.ndarray, nframes: int, write: bool) -> None:
        """EFAULT (and a recorded violation) unless every frame is currently granted
        or is the device's own coherent memory."""
        bad = pfns[(pfns < 0) | (pfns >= nframes)]
        if not len(bad):
            if self.pgmap is not None and self.pgmap.kind == MemoryKind.DEVICE_COHERENT:
                pfns = pfns[~self.pgmap.contains(pfns)]
            bad = self.grants.check(pfns, write)
        if len(bad):
            self.violations += 1
            log.warning("device %s: coherence violation: DMA %s to %d frame(s) not held, first %d",
                        self.name, "write" if write else "read", len(bad), int(bad[0]))
            raise KernelError(
                errno.EFAULT,
                f"DMA {'write' if write else 'read'} to frame {int(bad[0])} that this device does not hold "
                "through a valid range fault (coherence violation)",
            )


class DeviceNotifierOps:
    """The NotifierOps of a device's notifier: set the sequence, forward, revoke."""

    def __init__(self, device: Device) -> None:
        self.device = device

    async def invalidate(self, sub: IntervalNotifier, rng: NotifierRange, cur_seq: int) -> bool:
        dev = self.device
        own_migrate = rng.event == Event.MIGRATE and rng.owner == dev.owner
        if own_migrate and dev.alive and dev.own_migrate_silent:
            # Not sent, so the sequence stays too, as in the kernel driver that returns
            # before mmu_interval_set_seq() for its own migration: the device cannot
            # store a cur_seq it never hears, and its read_retry would fail forever.
            return True
        sub.set_seq(cur_seq)
        ok = True
        if dev.alive:
            dev.invalidations += 1
            ok = await sub.subs.trace.invalidation(dev, sub, rng, cur_seq, dev.ops.invalidate(sub, rng, cur_seq))
        if own_migrate and dev.alive:
            # The device's own migration: it may ignore this event, and pages that do
            # not move stay usable; finalize revokes exactly the pages that moved.
            return ok
        if ok or rng.blockable:
            # The device acked (or was fenced): it no longer uses the range.
            dev.grants.revoke(sub.id, rng.start, rng.end)
        return ok
