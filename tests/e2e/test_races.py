"""A device range-faulting and reading while the CPU unmaps and remaps the same
addresses with new contents: every result is an error or consistent data of a
mapping that existed, never stale or reused frames, and the DMA sanitizer
records no violation."""

from __future__ import annotations

import asyncio
import errno
import random
import time

import numpy as np

from hmm.abi import MREMAP_FIXED, MREMAP_MAYMOVE, PAGE_SIZE
from hmm.admin import AdminClient
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import CMD_READ
from hmm.errors import KernelError
from hmm.process import ProcessClient

N = 32
GEN = 1 << 20  # pattern: GEN * generation + page * 1024 + word
BUDGET_S = 8.0


def generation_pattern(gen: int) -> bytes:
    return (np.arange(N * 1024, dtype=np.int32) + gen * GEN).tobytes()


def generations(data: bytes) -> np.ndarray:
    """The generation each page came from; raises if a page is not one whole pattern."""
    words = np.frombuffer(data, dtype=np.int32).reshape(N, 1024)
    base = np.arange(N * 1024, dtype=np.int32).reshape(N, 1024)
    diff = words - base
    gens = diff[:, 0] // GEN
    assert (diff == (gens * GEN)[:, None]).all(), "a page holds data of no mapping (stale or reused frame)"
    return gens


async def test_range_fault_racing_munmap_is_never_stale(cpu: ProcessClient, dmirror_factory) -> None:
    prog, (name,) = dmirror_factory(1)
    dm = DmirrorClient(prog.address)
    proc = await cpu.spawn("racer")
    addr = await proc.mmap(N * PAGE_SIZE)
    await proc.write(addr, generation_pattern(1))
    _, fid = await proc.open(f"/dev/{name}")
    rnd = random.Random(1234)
    state = {"gen": 1, "stop": False}
    outcomes = {"ok": 0, "EFAULT": 0, "EBUSY": 0}

    async def cpu_side() -> None:
        # Each generation is written into a staging mapping and moved over the
        # mirrored range with mremap(MREMAP_FIXED): the range never shows a
        # half-written generation. Every third round also leaves a hole for a while.
        gen = 1
        t0 = time.monotonic()
        while time.monotonic() - t0 < BUDGET_S / 2:
            gen += 1
            staging = await proc.mmap(N * PAGE_SIZE)
            await proc.write(staging, generation_pattern(gen))
            if gen % 3 == 0:
                await proc.munmap(addr, N * PAGE_SIZE)
                await asyncio.sleep(rnd.random() * 0.002)
            await proc.mremap(staging, N * PAGE_SIZE, N * PAGE_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, addr)
            state["gen"] = gen
            await asyncio.sleep(rnd.random() * 0.002)
        state["stop"] = True

    async def device_side() -> None:
        while not state["stop"]:
            low = state["gen"]
            try:
                r = await dm.command(fid, CMD_READ, addr, N)
            except KernelError as e:
                assert e.errno in (errno.EFAULT, errno.EBUSY), e
                outcomes[e.name] += 1
                continue
            assert r.cpages == N
            gens = generations(r.data)
            # Never older than what was mapped when the command began (the old
            # mapping's entries were erased before its frames were freed), never
            # newer than the newest generation moved in.
            assert gens.min() >= low and gens.max() <= state["gen"], (gens, low, state["gen"])
            outcomes["ok"] += 1

    await asyncio.wait_for(asyncio.gather(cpu_side(), device_side()), BUDGET_S + 10)
    print("race outcomes:", outcomes)
    assert outcomes["ok"] > 0
    stats = await AdminClient(cpu.channel).stats()
    assert stats.device(name).violations == 0
    await proc.exit()
    await dm.close()
