"""A device that moves pages through the staging area, run in a pid namespace of its own.

    python -m tests.e2e.shm_peer KERNEL NAME NPAGES

It connects asking for a staging area of NPAGES pages, starts a process that writes a
pattern into NPAGES pages and opens /dev/NAME, migrates them into its memory with the
contents read through the area, then home again through the area, and prints one JSON
line: where its area came from ("" when it has none), whether its memory held the
pattern, and the pages the process read back afterwards (as a CRC).
"""

from __future__ import annotations

import json
import sys
import zlib

import numpy as np

from hmm.abi import (
    MEMORY_DEVICE_PRIVATE,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    PAGE_SIZE,
)
from hmm.device import DeviceConnection, Driver
from hmm.loop import run_loop
from hmm.process import ProcessClient


def pattern(npages: int) -> bytes:
    return (np.arange(npages * PAGE_SIZE // 4, dtype=np.uint32) * 2654435761 + 7).astype(np.uint32).tobytes()


async def main(kernel: str, name: str, n: int) -> int:
    conn = await DeviceConnection.connect(kernel, name, Driver(), memory=MEMORY_DEVICE_PRIVATE, memory_pages=n,
                                          shm_bytes=n * PAGE_SIZE)
    cpu = ProcessClient.connect(kernel)
    try:
        out: dict[str, object] = {"staging": conn.staging.path if conn.staging is not None else ""}
        proc = await cpu.spawn("shm-peer")
        buf = await proc.mmap(n * PAGE_SIZE)
        await proc.write(buf, pattern(n))
        await proc.open(f"/dev/{name}")
        mig = await conn.migrate_setup(proc.pid, buf, buf + n * PAGE_SIZE, MIGRATE_VMA_SELECT_SYSTEM)
        memory = np.zeros((n, PAGE_SIZE), dtype=np.uint8)
        with conn.transfer_buffer(n) as tb:
            await conn.dma_read_into(mig.src_pfns, tb)  # through the area when there is one
            memory[:] = tb
        dst = np.arange(n, dtype=np.uint64) + np.uint64(conn.device_pfn_base)
        await conn.migrate_pages(mig, dst, np.full(n, MIGRATE_PFN_VALID | MIGRATE_PFN_WRITE, dtype=np.uint8))
        moved = await conn.migrate_finalize(mig)
        out["to_device"] = int(np.count_nonzero(moved & MIGRATE_PFN_MIGRATE))
        out["device_holds_pattern"] = memory.tobytes() == pattern(n)
        memory[:, :4] = 0xAB  # the device wrote to its pages
        home = await conn.migrate_setup(proc.pid, buf, buf + n * PAGE_SIZE, MIGRATE_VMA_SELECT_DEVICE_PRIVATE)
        flags = np.full(n, MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA | MIGRATE_PFN_WRITE, dtype=np.uint8)
        with conn.transfer_buffer(n) as tb:
            tb[:] = memory
            moved = await conn.migrate_pages(home, np.zeros(n, dtype=np.uint64), flags, tb, finalize=True)
        out["home"] = int(np.count_nonzero(moved & MIGRATE_PFN_MIGRATE))
        out["crc_home"] = zlib.crc32(await proc.read(buf, n * PAGE_SIZE))
        out["crc_expected"] = zlib.crc32(memory.tobytes())
        await proc.exit()
        print(json.dumps(out), flush=True)
        return 0
    finally:
        await cpu.close()
        await conn.close()


if __name__ == "__main__":
    sys.exit(run_loop(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
