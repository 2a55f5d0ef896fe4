"""Random sequences of Device and Process calls against a real hmmd: a client's
mistakes never become internal errors, and the daemon's counts stay consistent.

Where tests/e2e/test_fuzz.py fills every unary request from the descriptors, this
drives the stateful paths those rarely reach: three devices (device-private
memory, coherent memory, none; their driver acks every callback and brings a
touched page home half of the time) and a process family drive a seeded mix of
near-valid and invalid calls — migrations, chained ones too, with random
destinations, flags and data lengths; evictions over random device-PFN ranges;
DMA to random frames; range faults and snapshots; exclusive access and unlocking;
CPU reads and writes, munmap, mprotect, madvise (reclaim to swap too), compaction,
pins, fork, mmap, exit and OOM kill; shared file, shmem and hugetlb mappings,
pwrite, truncation and mremap; devices crashing (fenced) or leaving (evicted) and
replaced — some of them concurrently, so a device goes while calls are using it.
Every error from the daemon must carry its errno (``hmm-errno``) and none may be
EIO (a daemon bug). Every 50 calls, with nothing
in flight, the invariant checker finds nothing but open migrations and held page
locks — and nothing but locks once every migration the calls left open is
finalized (or, every other time, rolled back by the daemon's time limit) — and at
the end, once the locks have expired too, nothing at all. It runs twice: with
plenty of RAM, and with 512 KiB, where calls keep running short of frames and
direct reclaim swaps pages out under everything else.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from hmm.abi import (
    ERRNO_METADATA_KEY,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_PAGEOUT,
    MAP_ANONYMOUS,
    MAP_HUGETLB,
    MAP_PRIVATE,
    MAP_SHARED,
    MEMORY_DEVICE_COHERENT,
    MEMORY_DEVICE_PRIVATE,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_VMA_SELECT_SYSTEM,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    O_CREAT,
    O_RDWR,
    PAGE_SIZE,
    PMD_SIZE,
)
from hmm.admin import AdminClient
from hmm.device import DeviceConnection, Driver, FaultRequest
from hmm.errors import KernelError
from hmm.mirror import InvalidateRange, Mirror
from hmm.process import Proc, ProcessClient
from hmm.v1 import device_pb2 as dpb
from tests.conftest import HMMD_ARGS
from tests.procs import start_hmmd

P = PAGE_SIZE
SEED = int(os.environ.get("HMM_FUZZ_SEED", "20261121"))
OPS = int(os.environ.get("HMM_FUZZ_STEPS", "500"))
CHECK_EVERY = int(os.environ.get("HMM_FUZZ_CHECK_EVERY", "50"))  # calls between invariant checks
# hmmd's RAM: plenty (the hugetlb pool is carved from it), and 512 KiB (128 frames), where
# calls run short of frames all along and reclaim swaps pages out under everything else.
RAMS = os.environ["HMM_FUZZ_RAM"].split(",") if "HMM_FUZZ_RAM" in os.environ else ["2G", "512K"]
SWAP = os.environ.get("HMM_FUZZ_SWAP", "1G")
SETTLE_EVERY = 50  # calls between ending every migration left open
EXPIRY_MS = 300  # open migrations and page locks the calls leave behind end this soon
GRACE_MS = 300  # a dropped device stream may resume this long; a crashed device is fenced then


class CoinDriver(Driver):
    """Acks everything but some of the OOM reaper's invalidations; moves a touched page
    home (zero-filled: it keeps no contents) half of the time, and fails the access
    (EFAULT) the other half."""

    wants_fault_migration = True

    def __init__(self, rnd: random.Random, kind: int) -> None:
        self.rnd, self.kind = rnd, kind
        self.conn: DeviceConnection | None = None
        self.free: list[int] = []  # device pages to migrate into (PageFree gives them back)

    def page_free(self, pfns: np.ndarray) -> None:
        self.free.extend(pfns.tolist())

    async def invalidate(self, mirror: Mirror, rng: InvalidateRange) -> bool:
        return rng.blockable or self.rnd.random() < 0.7  # refuses some of the OOM reaper's

    async def migrate_to_ram(self, fault: FaultRequest) -> bool:
        mig = fault.migration
        if mig is None or self.conn is None or self.rnd.random() < 0.5:
            return False
        both = MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE
        flags = np.where((mig.src_flags & both) == both, MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA, 0)
        data = bytes(int(np.count_nonzero(flags)) * P)
        await self.conn.migrate_pages(mig, np.zeros(mig.npages, np.uint64), flags.astype(np.uint8), data,
                                      finalize=True)
        return True


@dataclass
class Open:
    """A migration some call set up: its device and id, for a later pages step."""

    dev: DeviceConnection
    id: int
    src_flags: bytes


async def connect_device(address: str, name: str, kind: int, rnd: random.Random) -> DeviceConnection:
    driver = CoinDriver(rnd, kind)
    driver.conn = await DeviceConnection.connect(address, name, driver, memory=kind, memory_pages=256 if kind else 0)
    base = driver.conn.device_pfn_base
    driver.free = list(range(base, base + driver.conn.device_pfn_count))
    return driver.conn


class Fuzz:
    def __init__(self, rnd: random.Random, address: str, admin: AdminClient, devs: list[DeviceConnection],
                 proc: Proc, buf: int) -> None:
        self.rnd, self.address, self.admin, self.devs = rnd, address, admin, devs
        self.gone: set[DeviceConnection] = set()  # devices that crashed or left (calls may still be using them)
        self.resuming: set[DeviceConnection] = set()  # devices whose stream dropped, until they resume
        self.ended = {"resumed": 0, "crashed": 0, "left": 0}  # what lifecycle did
        self.procs, self.bufs = [proc], {proc.pid: buf}
        self.fds: dict[int, list[int]] = {}  # files each process opened (fork shares them)
        self.open: list[Open] = []
        self.pfns: list[int] = [0, 1, 2, 1 << 63, (1 << 64) - 1]  # frames seen, and some that are none
        self.moved = 0  # pages to_device brought into device memory
        self.log: list[str] = []  # the calls made, for a failure's message

    def addr(self, pid: int) -> int:
        off = self.rnd.choice([0, 1, 2, 8, 31, 63, 64, 100, -1]) * P
        if self.rnd.random() < 0.05:
            off += self.rnd.choice([1, 7, 2048])
        return max(0, self.bufs.get(pid, 0x10000) + off)

    def seen(self, raw: bytes) -> None:
        self.pfns = (self.pfns + np.frombuffer(raw, "<u8")[:8].tolist())[-64:]

    def some_pfns(self, counts: list[int]) -> bytes:
        return np.array([self.rnd.choice(self.pfns) for _ in range(self.rnd.choice(counts))], "<u8").tobytes()

    async def step(self) -> None:
        """One call, on a random device and process (now and then a pid that is not one)."""
        rnd = self.rnd
        proc = rnd.choice(self.procs)
        pid = proc.pid if rnd.random() < 0.9 else rnd.choice([0, 99999, proc.pid + 1])
        dev = rnd.choice(self.devs)
        op: Callable[[DeviceConnection, Proc, int], Awaitable[None]] = rnd.choice([
            self.to_device, self.to_device, self.setup, self.pages, self.pages, self.finalize, self.evict,
            self.dma, self.fault, self.exclusive, self.unlock, self.cpu, self.cpu, self.vm, self.vm, self.files,
            self.family, self.lifecycle])
        self.log.append(f"{op.__name__} dev={dev.name} pid={proc.pid}/{pid}")
        try:
            await op(dev, proc, pid)
        except (KernelError, grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.CancelledError) as e:
            task = asyncio.current_task()
            if self.gone and not _from_daemon(e) and not (task and task.cancelling()):
                return  # a device had gone: its closed channel ended the call
            raise

    async def lifecycle(self, dev: DeviceConnection, proc: Proc, pid: int) -> None:
        """The device's connection drops and the session resumes; or the device goes
        while other calls may be using it — crashing (its stream cut and not resumed:
        fenced once the grace period is over, its device-private pages lost) or
        leaving (its pages evicted home) — and a new device of its kind takes its place."""
        if dev in self.gone or dev in self.resuming or len(self.devs) < 2:
            return
        what = self.rnd.choice(["resumed", "crashed", "left"])
        self.ended[what] += 1
        if what == "resumed":
            self.resuming.add(dev)
            resumes = dev.resumes
            dev.drop_stream()
            while dev.resumes == resumes:
                assert not dev.closed.done(), f"{dev.name} did not resume: {dev.closed.result()}"
                await asyncio.sleep(0.01)
            self.resuming.remove(dev)
            return
        self.gone.add(dev)
        self.devs.remove(dev)
        self.open = [m for m in self.open if m.dev is not dev]
        if what == "crashed":
            dev.reconnect_grace_ms = 0  # no resume from this side
            dev.drop_stream()
            await asyncio.wait_for(asyncio.shield(dev.closed), 10)
        await dev.close()
        name = f"{dev.name.split('.')[0]}.{len(self.gone)}"
        driver = dev.driver
        assert isinstance(driver, CoinDriver)
        new = await connect_device(self.address, name, driver.kind, random.Random(self.rnd.random()))
        for p in self.procs:
            await p.open(f"/dev/{name}")
        self.devs.append(new)

    async def to_device(self, dev: DeviceConnection, proc: Proc, pid: int) -> None:
        """A well-formed migration of a few pages into the device's memory, so that
        the other calls meet device pages (and the CPU's touches call the driver)."""
        driver = dev.driver
        assert isinstance(driver, CoinDriver)
        if not dev.device_pfn_count:
            return
        a = self.addr(proc.pid) & ~(P - 1)
        mig = await dev.migrate_setup(proc.pid, a, a + self.rnd.choice([1, 4, 16]) * P, MIGRATE_VMA_SELECT_SYSTEM)
        sel = np.flatnonzero(mig.src_flags & MIGRATE_PFN_MIGRATE)[: len(driver.free)]
        dst = np.zeros(mig.npages, np.uint64)
        dst[sel] = [driver.free.pop() for _ in sel]
        try:
            moved = await dev.migrate_pages(mig, dst, np.where(dst != 0, MIGRATE_PFN_VALID, 0).astype(np.uint8),
                                            b"", finalize=True)
        except KernelError:
            driver.free.extend(dst[sel].tolist())  # a failed call took nothing
            raise
        self.moved += int(np.count_nonzero(moved[sel] & MIGRATE_PFN_MIGRATE))

    async def setup(self, dev: DeviceConnection, proc: Proc, pid: int) -> None:
        rnd, a = self.rnd, self.addr(pid)
        req = dpb.MigrateSetupRequest(pid=pid, start=a, end=max(0, a + rnd.choice([1, 2, 16, 64, 512, 0, -1]) * P),
                                      select=rnd.choice([1, 2, 4, 3, 7, 9, 10, 15, 16, 0]),
                                      with_data=rnd.random() < 0.3, fault_token=int(rnd.random() < 0.1))
        r = await dev.stub.MigrateSetup(req, metadata=dev._metadata)
        self.open.append(Open(dev, r.migration_id, r.src_flags))
        self.seen(r.src_pfns)

    async def pages(self, dev: DeviceConnection, proc: Proc, pid: int) -> None:
        if not self.open:
            return await self.setup(dev, proc, pid)
        rnd = self.rnd
        mig = self.open[-1 if rnd.random() < 0.5 else rnd.randrange(len(self.open))]  # often the latest
        src = np.frombuffer(mig.src_flags, np.uint8)
        if rnd.random() < 0.5:  # well-formed: a new system page for each entry still migrating
            flags = np.where(src & MIGRATE_PFN_MIGRATE, MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA, 0).astype(np.uint8)
            dst, ndata = [0] * len(src), int(np.count_nonzero(flags))
        else:
            n = max(0, len(src) + (0 if rnd.random() < 0.9 else rnd.choice([-1, 1])))
            base = mig.dev.device_pfn_base
            dst = [rnd.choice([0, base + rnd.randrange(300), rnd.choice(self.pfns)]) for _ in range(n)]
            flags = np.array([rnd.choice([0, 0x01, 0x09, 0x41, 0x11, 0x51, 0x43, 0xFF]) for _ in range(n)], np.uint8)
            ndata = max(0, int(((flags & 0x41) == 0x41).sum()) + rnd.choice([0, 0, 0, 1, -1]))
        req = dpb.MigratePagesRequest(migration_id=mig.id + (7 if rnd.random() < 0.05 else 0),
                                      dst_pfns=np.array(dst, "<u8").tobytes(), dst_flags=flags.tobytes(),
                                      data=rnd.randbytes(ndata * P), finalize=rnd.random() < 0.6)
        if rnd.random() < 0.2:
            a = self.addr(pid)
            req.finalize = rnd.random() < 0.8
            req.next.CopyFrom(dpb.MigrateSetupRequest(pid=pid, start=a, end=a + rnd.choice([1, 8, 0]) * P,
                                                      select=rnd.choice([1, 2, 3, 9]), with_data=rnd.random() < 0.5))
        r = await mig.dev.stub.MigratePages(req, metadata=mig.dev._metadata)
        if r.HasField("next") and r.next.migration_id:
            self.open.append(Open(mig.dev, r.next.migration_id, r.next.src_flags))

    async def finalize(self, dev: DeviceConnection, proc: Proc, pid: int) -> None:
        if self.open:
            mig = self.open.pop(self.rnd.randrange(len(self.open)))
            await mig.dev.stub.MigrateFinalize(dpb.MigrationRef(migration_id=mig.id), metadata=mig.dev._metadata)

    async def finalize_all(self) -> None:
        """End every migration the calls left open (those already over: ENOENT)."""
        while self.open:
            mig = self.open.pop()
            if mig.dev in self.gone:
                continue
            try:
                await mig.dev.stub.MigrateFinalize(dpb.MigrationRef(migration_id=mig.id), metadata=mig.dev._metadata)
            except grpc.aio.AioRpcError as e:
                check_error(e)

    async def evict(self, dev: DeviceConnection, proc: Proc, pid: int) -> None:
        base, count = dev.device_pfn_base, dev.device_pfn_count
        start, n = self.rnd.choice([(0, 0), (base, count), (base + 10, 20), (max(0, base - 1), 5), (base, 0),
                                    (max(0, base + count - 1), 1), (base, 1 << 40)])
        r = await dev.stub.EvictSetup(dpb.EvictSetupRequest(start_pfn=start, npages=n), metadata=dev._metadata)
        self.open.append(Open(dev, r.migration_id, r.src_flags))

    async def dma(self, dev: DeviceConnection, proc: Proc, pid: int) -> None:
        pfns = self.some_pfns([1, 2, 5, 0])
        if self.rnd.random() < 0.5:
            await dev.stub.DmaRead(dpb.DmaReadRequest(pfns=pfns), metadata=dev._metadata)
        else:
            data = b"\x5a" * (len(pfns) // 8 * P + self.rnd.choice([0, 0, 1]))
            await dev.stub.DmaWrite(dpb.DmaWriteRequest(pfns=pfns, data=data), metadata=dev._metadata)

    async def fault(self, dev: DeviceConnection, proc: Proc, pid: int) -> None:
        rnd = self.rnd
        if not dev.mirrors or rnd.random() < 0.2:
            await dev.insert_notifier(proc.pid, 0, 1 << 47)
        mirror = rnd.choice(list(dev.mirrors.values()))
        a = self.addr(pid)
        req = dpb.RangeFaultRequest(
            notifier_id=mirror.notifier_id, notifier_seq=await dev.read_begin(mirror), start=a,
            end=a + rnd.choice([1, 8, 64, 0]) * P, dev_private_owner=rnd.choice([0, dev.owner]),
            default_flags=rnd.choice([0, HMM_PFN_REQ_FAULT, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE]))
        r = await (dev.stub.RangeFault if rnd.random() < 0.5 else dev.stub.Snapshot)(req, metadata=dev._metadata)
        self.seen(r.pfns)

    async def exclusive(self, dev: DeviceConnection, proc: Proc, pid: int) -> None:
        req = dpb.MakeExclusiveRequest(pid=pid, start=self.addr(pid), npages=self.rnd.choice([1, 4, 0]),
                                       with_owner=self.rnd.random() < 0.5)
        self.seen((await dev.stub.MakeExclusive(req, metadata=dev._metadata)).pfns)

    async def unlock(self, dev: DeviceConnection, proc: Proc, pid: int) -> None:
        await dev.stub.UnlockPages(dpb.UnlockPagesRequest(pfns=self.some_pfns([1, 3])), metadata=dev._metadata)

    async def cpu(self, dev: DeviceConnection, proc: Proc, pid: int) -> None:
        if self.rnd.random() < 0.5:
            await proc.read(self.addr(pid), self.rnd.choice([4, P, 8 * P]))
        else:
            await proc.write(self.addr(pid), self.rnd.randbytes(self.rnd.choice([4, P, 3 * P])))

    async def vm(self, dev: DeviceConnection, proc: Proc, pid: int) -> None:
        rnd, a = self.rnd, self.addr(pid)
        what = rnd.randrange(6)
        if what == 5:
            await self.admin.compact_memory()
        elif what == 0:
            await proc.munmap(a, rnd.choice([1, 4, 16]) * P)
        elif what == 1:
            await proc.mprotect(a, rnd.choice([1, 4, 16]) * P, rnd.choice([0, 1, 3]))
        elif what == 2:
            await proc.madvise(a, rnd.choice([1, 4, 512]) * P,
                               rnd.choice([MADV_DONTNEED, MADV_HUGEPAGE, MADV_FREE, MADV_PAGEOUT, MADV_PAGEOUT]))
        elif what == 3:
            pin = await proc.pin_user_pages(a, rnd.choice([1, 4]), longterm=rnd.random() < 0.5, hold=True)
            if rnd.random() < 0.7:
                await proc.unpin_user_pages(pin)
        else:
            self.bufs[proc.pid] = await proc.mmap(64 * P)
            await proc.write(self.bufs[proc.pid], rnd.randbytes(8 * P))

    async def files(self, dev: DeviceConnection, proc: Proc, pid: int) -> None:
        """Shared file, shmem and hugetlb mappings, writes and truncation behind them, mremap."""
        rnd, fds = self.rnd, self.fds.setdefault(proc.pid, [])
        what = rnd.randrange(5)
        if what == 0:
            path = rnd.choice(["/tmp/fuzz-a", "/tmp/fuzz-b", "/dev/hugepages/fuzz"])
            fd, _ = await proc.open(path, O_RDWR | O_CREAT)
            fds.append(fd)
            size = PMD_SIZE if path.startswith("/dev/hugepages/") else rnd.choice([4, 16, 64]) * P
            await proc.ftruncate(fd, size)
            self.bufs[proc.pid] = await proc.mmap(size, flags=MAP_SHARED, fd=fd)
        elif what == 1 and fds:
            await proc.pwrite(rnd.choice(fds), rnd.randrange(64) * P + rnd.choice([0, 5]), rnd.randbytes(P))
        elif what == 2 and fds:
            await proc.ftruncate(rnd.choice(fds), rnd.choice([0, 1, 3, 64]) * P)
        elif what == 3:
            flags = rnd.choice([MAP_SHARED | MAP_ANONYMOUS, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB])
            self.bufs[proc.pid] = await proc.mmap(PMD_SIZE, flags=flags)
        else:
            a = self.bufs.get(proc.pid, 0)
            old, new = rnd.choice([1, 4, 64]) * P, rnd.choice([1, 8, 128]) * P
            how = rnd.choice([0, MREMAP_MAYMOVE, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, MREMAP_MAYMOVE | MREMAP_FIXED])
            target = a + 256 * P if how & MREMAP_FIXED else 0
            self.bufs[proc.pid] = await proc.mremap(a, old, new if not how & MREMAP_DONTUNMAP else old, how, target)

    async def family(self, dev: DeviceConnection, proc: Proc, pid: int) -> None:
        if self.rnd.random() < 0.5 and len(self.procs) < 4:
            child = await proc.fork()
            self.procs.append(child)
            self.bufs[child.pid] = self.bufs[proc.pid]
            self.fds[child.pid] = list(self.fds.get(proc.pid, []))
        elif len(self.procs) > 1:
            self.procs.remove(proc)
            if self.rnd.random() < 0.3:
                await proc.oom_kill()
            else:
                await proc.exit()


def _from_daemon(e: BaseException) -> bool:
    """Whether a failed call's error came from the daemon (it names an errno)."""
    if isinstance(e, grpc.aio.AioRpcError):
        return ERRNO_METADATA_KEY in dict(e.trailing_metadata() or ())
    return isinstance(e, KernelError) and e.errno not in (errno.ECANCELED, errno.ECONNREFUSED, errno.ECONNRESET,
                                                           errno.ECONNABORTED)


def check_error(e: BaseException, where: str = "") -> None:
    """A refusal must name its errno, and never be a daemon bug (EIO, INTERNAL)."""
    if isinstance(e, KernelError):
        assert e.errno != errno.EIO, f"{e}: {where}"
    elif isinstance(e, grpc.aio.AioRpcError):
        assert e.code() != grpc.StatusCode.INTERNAL, f"{e}: {where}"
        assert ERRNO_METADATA_KEY in dict(e.trailing_metadata() or ()), f"{e}: {where}"
    else:
        raise e


async def check(admin: AdminClient, where: str, log: list[str]) -> None:
    """The invariants hold; open migrations and held page locks are states, not faults."""
    report = [v for v in await admin.check_invariants() if "migration(s) open" not in v and "lock(s) held" not in v]
    assert report == [], f"{where}: {report}; the last calls: {log[-12:]}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("ram", RAMS)
async def test_random_call_sequences_never_break_the_daemon(tmp_path: Path, ram: str) -> None:
    rnd = random.Random(SEED)
    daemon = start_hmmd(tmp_path, *HMMD_ARGS, "--ram", ram, "--swap", SWAP, "--migration-timeout-ms", str(EXPIRY_MS),
                        "--page-lock-timeout-ms", str(EXPIRY_MS), "--reconnect-grace-ms", str(GRACE_MS))
    cpu = ProcessClient.connect(daemon.address)
    admin = AdminClient(cpu.channel)
    devs: list[DeviceConnection] = []
    fuzz: Fuzz | None = None
    try:
        for i, kind in enumerate((MEMORY_DEVICE_PRIVATE, MEMORY_DEVICE_COHERENT, 0)):
            # the driver's own draws: the callbacks come when they come
            devs.append(await connect_device(daemon.address, f"fuzz{i}", kind, random.Random(SEED + 1 + i)))
        if ram == "512K":  # memory nobody else touches fills RAM: from now on calls run short
            hog = await cpu.spawn("hog")  # private and shared memory: reclaim takes both kinds
            await hog.write(await hog.mmap(55 * P), rnd.randbytes(55 * P))
            await hog.write(await hog.mmap(55 * P, flags=MAP_SHARED | MAP_ANONYMOUS), rnd.randbytes(55 * P))
        proc = await cpu.spawn("fuzzed")
        for dev in devs:
            await proc.open(f"/dev/{dev.name}")
        buf = await proc.mmap(64 * P)
        await proc.write(buf, rnd.randbytes(32 * P))
        fuzz = Fuzz(rnd, daemon.address, admin, devs, proc, buf)
        done = 0
        while done < OPS:
            batch = rnd.choice([1, 1, 1, 2, 3])
            results = await asyncio.wait_for(asyncio.gather(*(fuzz.step() for _ in range(batch)),
                                                            return_exceptions=True), 30)
            for r in results:
                if isinstance(r, BaseException):
                    check_error(r, f"seed {SEED}, the last calls: {fuzz.log[-batch:]}")
            done += batch
            if done % CHECK_EVERY < batch:  # nothing in flight: every count must agree
                await check(admin, f"seed {SEED}, step {done}", fuzz.log)
            if done % SETTLE_EVERY < batch:  # end what the calls left open, alternately by hand and by time limit
                if done // SETTLE_EVERY % 2:
                    await fuzz.finalize_all()
                else:
                    await asyncio.sleep(2 * EXPIRY_MS / 1000)
                await check(admin, f"seed {SEED}, step {done}, settled", fuzz.log)
        names = {d.name for d in fuzz.devs}
        assert all(d.alive for d in (await admin.stats()).devices if d.name in names)
        assert fuzz.moved > 0  # the sequences did reach device memory
        assert ram != "512K" or (await admin.stats()).reclaimed_pages > 0  # and ran RAM short
        assert OPS < 200 or min(fuzz.ended.values()) > 0, fuzz.ended  # devices resumed, crashed, left
        await asyncio.sleep(3 * EXPIRY_MS / 1000)  # what the calls left open expires
        assert await admin.check_invariants() == []
    finally:
        for dev in fuzz.devs if fuzz is not None else devs:
            await dev.close()
        await cpu.close()
        assert daemon.stop() == 0
    log = daemon.log_text()
    assert "Traceback" not in log and "internal error" not in log
