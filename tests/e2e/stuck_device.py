"""A device that stops at one protocol step and waits to be killed (kill -9 tests).

    python -m tests.e2e.stuck_device KERNEL NAME MODE ADDR NPAGES

Once a process opens /dev/NAME it migrates [ADDR, ADDR + NPAGES pages) of that
process to its memory and stops:
  setup      - right after MigrateSetup (the migration holds the mmap lock, PTEs are
               migration entries);
  fault      - after a finished migration, inside the first MigrateToRam it gets;
  idle       - after a finished migration, doing nothing;
  invalidate - after a finished migration (and a mirror of the range), inside the
               first invalidation it gets, before acking it;
  evict      - after a finished migration, right after EvictSetup (every mapping
               of its pages is a migration entry);
  stream     - after a finished migration, with the migration home set up and its
               contents half sent: a MigratePagesStream open, its first part written.
It prints a line at each step so the test knows when to kill it.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np

from hmm import bulk
from hmm.abi import (
    MEMORY_DEVICE_PRIVATE,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    PAGE_SIZE,
)
from hmm.abi import MIGRATE_VMA_SELECT_DEVICE_PRIVATE as SELECT_DEVICE_PRIVATE
from hmm.abi import MIGRATE_VMA_SELECT_SYSTEM as SELECT_SYSTEM
from hmm.device import DeviceConnection, DeviceFile, Driver, FaultRequest
from hmm.mirror import InvalidateRange, Mirror
from hmm.v1 import device_pb2 as pb


class Stuck(Driver):
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.opened: asyncio.Future[DeviceFile] = asyncio.get_running_loop().create_future()
        self.armed = False

    async def invalidate(self, mirror: Mirror, rng: InvalidateRange) -> bool:
        if self.armed and self.mode == "invalidate":
            print("in invalidate", flush=True)
            await asyncio.sleep(3600)
        return True

    async def file_open(self, file: DeviceFile) -> None:
        if not self.opened.done():
            self.opened.set_result(file)

    async def migrate_to_ram(self, fault: FaultRequest) -> bool:
        print("in migrate_to_ram", flush=True)
        await asyncio.sleep(3600)
        return False


async def main(kernel: str, name: str, mode: str, addr: int, npages: int) -> None:
    driver = Stuck(mode)
    conn = await DeviceConnection.connect(kernel, name, driver, memory=MEMORY_DEVICE_PRIVATE, memory_pages=4096)
    print(f"{name} listening on {conn.device_id}", flush=True)
    file = await driver.opened
    mig = await conn.migrate_setup(file.pid, addr, addr + npages * PAGE_SIZE, SELECT_SYSTEM)
    if mode == "setup":
        print("setup done", flush=True)
        await asyncio.sleep(3600)
    sel = (mig.src_flags & MIGRATE_PFN_MIGRATE) != 0
    dst = np.where(sel, conn.device_pfn_base + np.arange(mig.npages, dtype=np.uint64), 0).astype(np.uint64)
    flags = np.where(sel, MIGRATE_PFN_VALID | (mig.src_flags & MIGRATE_PFN_WRITE), 0).astype(np.uint8)
    await conn.migrate_pages(mig, dst, flags, finalize=True)
    if mode == "invalidate":
        await conn.insert_notifier(file.pid, addr, npages * PAGE_SIZE)
        driver.armed = True
    print("migrated", flush=True)
    if mode == "evict":
        await conn.evict_setup()
        print("evict setup done", flush=True)
    if mode == "stream":
        home = await conn.migrate_setup(file.pid, addr, addr + npages * PAGE_SIZE, SELECT_DEVICE_PRIVATE)
        req = pb.MigratePagesRequest(migration_id=home.id, dst_pfns=bytes(8 * npages), finalize=True,
                                     dst_flags=bytes([MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA]) * npages)
        call = conn.stub.MigratePagesStream(metadata=conn._metadata)
        await call.write(bulk.Bulk(req, bytes(PAGE_SIZE)))  # one page of npages
        print("stream started", flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    k, n, m, a, p = sys.argv[1:6]
    asyncio.run(main(k, n, m, int(a, 0), int(p)))
