"""Direct reclaim: what the page allocator does when it runs out of frames.

An operation that allocates system frames (a fault, a page coming home from a
device, fork's copies of pinned pages) gets OutOfMemoryError from PhysMem when too
few are free. A CPU access's fault loop then reclaims (Kernel.direct_reclaim) and
looks again; an operation marked ``reclaims`` has pages swapped out and runs again.
Both stand for __alloc_pages_slowpath retrying after try_to_free_pages, and fail
with ENOMEM only when reclaim frees nothing (or after MAX_RECLAIM_RETRIES rounds).

Reclaim takes anonymous and tmpfs/shmem pages (AddressSpace.shrink): not pinned,
locked or on a device; a THP split first; a page fork shares, or a file page
several processes map, from every process that maps it. Each run of them is
invalidated (CLEAR) in every mirror first. So a device mirroring a process sees
its pages taken under memory pressure, and faults them back in, as on a loaded
machine. File pages nothing maps go too (Tmpfs: Inode.swap_out); hugetlb pages
never.

Where the kernel would call the OOM killer next, hmmd does not: when reclaim
cannot help, the operation fails with ENOMEM (a range fault's -ENOMEM; a CPU
access fails with EFAULT, as SIGBUS, when a device cannot bring its page home).
``Process.OomKill`` stands for the killer's choice.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from hmmd.core.physmem import OutOfMemoryError

if TYPE_CHECKING:
    from hmmd.core.mm import AddressSpace

SWAP_CLUSTER_MAX = 32  # the fewest pages a reclaim aims for beyond the shortfall
WATERMARK_FRACTION = 256  # ... and at least this part of RAM (the gap up to a "high watermark")
MAX_RECLAIM_RETRIES = 16  # rounds of reclaim and retry for one operation (the page allocator's)

P = ParamSpec("P")
R = TypeVar("R")


class Reclaimer:
    """Chooses where pages are reclaimed from and counts what it did."""

    def __init__(self, nframes: int) -> None:
        self.target_extra = max(SWAP_CLUSTER_MAX, nframes // WATERMARK_FRACTION)
        self.stalls = 0  # allocstall: allocations that had to reclaim
        self.reclaimed = 0  # pgsteal_direct: pages their reclaim swapped out
        self._last_mm = 0  # the address space the last reclaim ended in

    async def reclaim(self, mms: list[AddressSpace], shortfall: int, page_cache: Callable[[int], int]) -> int:
        """Swap out pages until ``shortfall`` frames and the watermark's worth more are
        free. The address spaces take turns, starting after the one the last reclaim
        ended in; two sweeps over them, since a first sweep only takes pages not
        accessed lately (AddressSpace.shrink) and ages the rest for the second.
        Between the sweeps, ``page_cache(n)`` swaps out up to n file pages nothing
        maps (as old as can be: no access bit says otherwise) and returns how many.
        Returns the pages swapped out: 0 when nothing could go."""
        self.stalls += 1
        want = shortfall + self.target_extra
        mms = sorted(mms, key=lambda m: m.id)
        first = next((i for i, m in enumerate(mms) if m.id > self._last_mm), 0)
        turn = mms[first:] + mms[:first]
        got = 0
        for sweep in range(2):
            for mm in turn:
                if got >= want:
                    break
                n = await mm.shrink(want - got)
                if n:
                    got += n
                    self._last_mm = mm.id
            if sweep == 0 and got < want:
                got += page_cache(want - got)
        self.reclaimed += got
        return got


async def reclaiming(kernel: Any, op: Callable[[], Awaitable[R]]) -> R:
    """Run ``op()``; on OutOfMemoryError reclaim and run it again (a fresh call each time),
    until it succeeds, reclaim frees nothing, or MAX_RECLAIM_RETRIES rounds have passed.
    ``op`` must be safe to run again after failing with ENOMEM (a fault keeps what it
    faulted in; a migration step changes nothing)."""
    for _ in range(MAX_RECLAIM_RETRIES):
        try:
            return await op()
        except OutOfMemoryError as e:
            if not await kernel.direct_reclaim(e.shortfall):
                raise
    return await op()


def reclaims(
    fn: Callable[Concatenate[Any, P], Awaitable[R]],
) -> Callable[Concatenate[Any, P], Awaitable[R]]:
    """Decorate a Kernel operation that allocates frames: ``reclaiming`` runs it."""

    @functools.wraps(fn)
    async def call(kernel: Any, *args: P.args, **kwargs: P.kwargs) -> R:
        return await reclaiming(kernel, lambda: fn(kernel, *args, **kwargs))

    return call
