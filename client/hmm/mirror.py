"""A mirror: the device side of one interval notifier, and the driver's fault loop.

The loop is the kernel's documented driver pattern:

    read_begin -> range_fault(seq) -> take the update lock -> read_retry(seq)
    -> program the device page table from the result -> release the lock

``Mirror.fault`` runs it and hands the result to the caller *inside* the locked
region, which is the only place the result may be used:

    async with mirror.fault(start, end, write=True) as result:
        program_device_page_table(result)

The SDK keeps the notifier's sequence: every invalidation stores its ``cur_seq``
under the mirror's update lock before the driver's callback runs, so
``read_retry`` is a local comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hmm.abi import HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_RANGE_DEFAULT_TIMEOUT_MS, PAGE_SHIFT, Event
from hmm.errors import KernelError

if TYPE_CHECKING:
    from hmm.device import DeviceConnection


@dataclass(frozen=True)
class InvalidateRange:
    """What an invalidation callback is told (struct mmu_notifier_range + cur_seq)."""

    notifier_id: int
    pid: int
    start: int
    end: int  # exclusive
    event: Event
    owner: int
    blockable: bool
    cur_seq: int


@dataclass(frozen=True)
class RangeResult:
    """A range fault's output: per page a PFN, HMM_PFN_* flags and a map order."""

    start: int
    pfns: np.ndarray  # uint64
    flags: np.ndarray  # uint8
    orders: np.ndarray  # uint8

    @property
    def npages(self) -> int:
        return len(self.pfns)

    def addr(self, i: int) -> int:
        return self.start + (i << PAGE_SHIFT)


class Mirror:
    """One interval notifier of a device on one process's address space."""

    def __init__(self, conn: DeviceConnection, notifier_id: int, pid: int, start: int, length: int,
                 seq: int, lock: asyncio.Lock | None = None) -> None:
        self.conn = conn
        self.notifier_id = notifier_id
        self.pid = pid
        self.start = start
        self.end = start + length
        self.seq = seq
        # The driver's update lock: held by invalidate while it records the sequence
        # and drops mappings, and around read_retry + page-table programming.
        self.lock = lock or asyncio.Lock()
        self.released = False

    def __repr__(self) -> str:
        return f"<Mirror {self.notifier_id} pid={self.pid} [{self.start:#x}, {self.end:#x})>"

    def read_retry(self, seq: int) -> bool:
        """True if ``seq`` is stale. Only meaningful with ``self.lock`` held."""
        return self.seq != seq

    async def read_begin(self) -> int:
        return await self.conn.read_begin(self)

    @contextlib.asynccontextmanager
    async def fault(
        self, start: int, end: int, *, write: bool = False, default_flags: int | None = None,
        pfn_flags_mask: int = 0, requests: bytes = b"", dev_private_owner: int | None = None,
        snapshot: bool = False, timeout_ms: int = HMM_RANGE_DEFAULT_TIMEOUT_MS,
    ) -> AsyncIterator[RangeResult]:
        """Range-fault [start, end) and yield the result with the update lock held.

        EBUSY once ``timeout_ms`` passes without a result that survived read_retry;
        other errors (EFAULT, EPERM, ENOMEM, ...) are raised as they come. As the
        kernel driver's loop, the time is looked at between attempts: one attempt (its
        faults, another device's migrate_to_ram) may outlast it.
        """
        if default_flags is None:
            default_flags = 0 if snapshot else HMM_PFN_REQ_FAULT | (HMM_PFN_REQ_WRITE if write else 0)
        owner = self.conn.owner if dev_private_owner is None else dev_private_owner
        began = time.monotonic()
        deadline, attempts = began + timeout_ms / 1000, 0
        while True:
            if time.monotonic() > deadline:
                raise KernelError(errno.EBUSY, f"EBUSY: no stable range fault after {attempts} attempt(s) in "
                                  f"{(time.monotonic() - began) * 1000:.0f} ms (budget {timeout_ms} ms)")
            attempts += 1
            seq = await self.read_begin()
            try:
                result = await self.conn.range_fault(
                    self, seq, start, end, default_flags=default_flags, pfn_flags_mask=pfn_flags_mask,
                    requests=requests, dev_private_owner=owner, snapshot=snapshot,
                )
            except KernelError as e:
                if e.errno == errno.EBUSY:
                    continue
                raise
            await self.lock.acquire()
            try:
                if self.read_retry(seq):
                    continue
                yield result
                return
            finally:
                self.lock.release()
