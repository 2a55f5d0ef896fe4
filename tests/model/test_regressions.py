"""Short, fixed scenarios for the bugs the model-based tests found, on the core
with hmm-dmirror's driver attached in process (``tests/model/local.py``)."""

from __future__ import annotations

import numpy as np

from hmm.abi import MAP_ANONYMOUS, MAP_PRIVATE, O_RDWR, PAGE_SIZE, PROT_READ, PROT_WRITE
from hmm.dmirror.device import CMD_MIGRATE_TO_DEV, Dmirror
from hmmd.core.invariants import check_invariants
from hmmd.core.kernel import Kernel

from .local import LocalConnection

P = PAGE_SIZE
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


def pattern(seed: int, addr: int, npages: int) -> bytes:
    return b"".join(np.full(P, (seed * 31 + (addr >> 12) + i) % 251 + 1, dtype=np.uint8).tobytes()
                    for i in range(npages))


async def setup(npages: int = 4) -> tuple[Kernel, Dmirror, int, int, int]:
    k = Kernel(16 << 20)
    dm = LocalConnection.attach(k, "dm0", 256)
    p = k.spawn("parent")
    _, fid = await k.open(p.pid, "/dev/dm0", O_RDWR)
    addr = await k.mmap(p.pid, 0, npages * P, RW, ANON, -1, 0)
    await k.write(p.pid, addr, pattern(1, addr, npages))
    return k, dm, p.pid, fid, addr


async def test_migration_leaves_no_record_in_a_fork_relative_that_no_longer_maps_the_page() -> None:
    """MIGRATE_TO_DEV of a page shared with one child, after another child broke
    COW: the second child's address space, which maps none of the pages, kept the
    migration on record after finalize (found by the state machine: "address space
    of pid 2: 1 migration(s) open"); a fault there waiting for a migration would then
    wait for the next one of that address space."""
    k, dm, parent, fid, addr = await setup()
    sharer = (await k.fork(parent)).pid
    writer = (await k.fork(parent)).pid
    await k.write(writer, addr, b"x")  # its own copy: it no longer maps the parent's page
    r = await dm.command(fid, CMD_MIGRATE_TO_DEV, addr, 1)
    assert r.cpages == 1
    assert check_invariants(k) == []
    assert await k.read(writer, addr, 1) == b"x"
    assert await k.read(sharer, addr, P) == pattern(1, addr, 1)
    assert await k.read(parent, addr, P) == pattern(1, addr, 1)
    assert check_invariants(k) == []
