"""A benchmark device: one OS process, one hmmd device session, driven over stdin/stdout.

    python bench/devproc.py HMMD_ADDR DEVICE_NAME [MEMORY_PAGES [SHM_BYTES]]

It connects with the SDK (``hmm.device.DeviceConnection``; with MEMORY_PAGES > 0 it
declares that much device-private memory, with SHM_BYTES > 0 it asks for a
shared-memory staging area of that size), prints one JSON line
``{"ready": true, ...}`` and then answers one JSON command per stdin line with one
JSON line on stdout (``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``).
The invalidate callback does no work beyond what the SDK does (record cur_seq
under the update lock) and acks at once, so what is measured is the protocol.

Commands:
  {"cmd": "mirror", "pid": P, "start": S, "length": L}     -> {"mirror": notifier_id}
  {"cmd": "unmirror", "mirror": M}
  {"cmd": "fault", "mirror": M, "start": S, "end": E, "flags": F}
        one read_begin + RangeFault, timed here (perf_counter) around both calls;
        then read_retry under the update lock (EBUSY -> retried, untimed, counted).
        -> {"us": float, "read_begin_us": float, "npages": n, "valid": #VALID, "write": #WRITE, "retries": r}
  {"cmd": "floor_bulk", "addr": FLOOR, "pages": n, "count": k}
        bare gRPC: a small unary echo then a unary call returning an n-page
        RangeFaultReply, from the floor server, timed here -> {"s": [...]}
  {"cmd": "fan_join", "addr": FLOOR}  become a fan-out peer of the floor server (echo task)
  {"cmd": "fan_leave"}
  {"cmd": "stats"}  -> {"invalidations": count seen by the driver}

Device-private memory (MEMORY_PAGES > 0): a pool of pages whose contents live here,
migrated like dmirror does it (client/hmm/dmirror/device.py), minus its page table:
  {"cmd": "to_dev", "pid": P, "start": S, "length": L, "piece": pages, "shm": bool}
        migrate [S, S+L) here, piece by piece, each its own migration: the first
        piece's MigrateSetup(SELECT_SYSTEM) reply carries the collected system pages'
        contents (with_data); per piece, store into the pool, then MigratePages with
        finalize=True (no device table to update between the two) and the next
        piece's setup chained on (capability migrate-chain: its contents in the
        reply). Timed here -> {"s": total, "phases": {step: s}, "moved": n, "pieces": k}
        ("pages_finalize" includes the chained setups). With "shm" the contents go
        through the staging area instead (a DmaRead into it after each setup, then one
        copy into the pool: dma_read_into), else in messages (the area unused).
        "inflight": n (default 1) runs n lanes of pieces at once (pipelined).
        With "stream" (and no "shm") the setup carries no contents: the device
        reads them after it (dma_read_into), in messages, which the SDK makes a
        DmaReadStream when they exceed one (capability bulk-stream).
  {"cmd": "to_sys", ...same...}
        migrate them home: MigrateSetup(SELECT_DEVICE_PRIVATE) of the first piece, then
        per piece MigratePages with VALID|SYSTEM_DATA and the data, finalize=True and
        the next piece's setup chained on (one call, as dmirror's _copy_home does pages
        and finalize) -> {"s", "phases", "moved", "pieces"}. With "shm" the pool's
        pages are gathered into a transfer_buffer of the area, which MigratePages
        names instead of carrying the bytes. (Contents beyond one message go as a
        MigratePagesStream: the SDK's choice, "stream" changes nothing here.)
  {"cmd": "dev_crc"}  -> {"crc32": of the pages the last to_dev stored, in address order}
  {"cmd": "pool"}     -> {"free": pages, "total": pages, "to_ram": migrate_to_ram calls served}
  {"cmd": "to_ram_times"} -> {"setup_us", "pages_us", "total_us": [...] per migrate_to_ram}, cleared
  The driver's migrate_to_ram moves the faulting page home the same way as to_sys
  (setup with the fault token, MigratePages with SYSTEM_DATA, finalize=True), and
  page_free returns pages to the pool.
  {"cmd": "floor_bytes", "addr": FLOOR, "total": B, "payload": b, "count": k, "upload": bool, "inflight": n}
        bare gRPC: move B bytes in unary calls of b raw bytes, n at a time (default 1),
        timed here -> {"s": [...]}
  {"cmd": "floor_stream_bytes", "addr": FLOOR, "total": B, "payload": b, "count": k, "upload": bool}
        bare gRPC: move B bytes as one stream of b-byte messages -> {"s": [...]}
  {"cmd": "memcpy", "bytes": B, "count": k}  numpy copy of a B-byte buffer -> {"s": [...]}
  {"cmd": "exit"}

The process also exits when stdin closes (the bench died), so it can never outlive it.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import sys
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import floor
import numpy as np

from hmm.abi import (
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    MEMORY_DEVICE_PRIVATE,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_PFN_WRITE,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from hmm.device import DeviceConnection, Driver, FaultRequest, Migration
from hmm.errors import KernelError
from hmm.loop import run_loop
from hmm.malloc import tune_malloc
from hmm.mirror import InvalidateRange, Mirror

T = TypeVar("T")


class Pool:
    """Device memory: pages [base, base + n), contents in ``storage`` (its own array, or
    ``shared``: a part of the staging area, DeviceConnection.shared_memory); a free
    stack."""

    def __init__(self, base: int, n: int, shared: np.ndarray | None = None) -> None:
        self.base, self.n = base, n
        self.storage = shared if shared is not None else np.zeros((n, PAGE_SIZE), dtype=np.uint8)
        self.storage.reshape(-1)[::PAGE_SIZE] = 0  # touch it now, not while timed
        self._stack = np.arange(n - 1, -1, -1, dtype=np.int64)  # top = low pages first
        self._top = n
        self._used = np.zeros(n, dtype=bool)

    @property
    def free(self) -> int:
        return self._top

    def contains(self, pfns: np.ndarray) -> np.ndarray:
        return (pfns >= self.base) & (pfns < self.base + self.n)

    def alloc(self, k: int) -> np.ndarray:
        """k free rows (indexes into storage)."""
        if k > self._top:
            raise RuntimeError(f"device memory full: {k} pages wanted, {self._top} free")
        rows = self._stack[self._top - k:self._top][::-1].copy()
        self._top -= k
        self._used[rows] = True
        return rows

    def release(self, rows: np.ndarray) -> None:
        rows = rows[self._used[rows]]
        self._used[rows] = False
        self._stack[self._top:self._top + len(rows)] = rows[::-1]
        self._top += len(rows)

    def rows(self, pfns: np.ndarray) -> np.ndarray:
        return (pfns.astype(np.int64) - self.base)

    @staticmethod
    def _run(rows: np.ndarray) -> slice | None:
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
            return slice(int(rows[0]), int(rows[-1]) + 1)
        return None

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The contents of ``rows``: a view when they are consecutive, else a copy."""
        run = self._run(rows)
        return self.storage[run] if run is not None else self.storage[rows]

    def gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        """The contents of ``rows`` into ``out`` ((len(rows), PAGE_SIZE) uint8), one copy."""
        run = self._run(rows)
        if run is not None:
            np.copyto(out, self.storage[run])
        else:
            np.take(self.storage, rows, axis=0, out=out, mode="clip")

    def write(self, rows: np.ndarray, data: bytes | np.ndarray) -> None:
        pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        run = self._run(rows)
        if run is not None:
            self.storage[run] = pages
        else:
            self.storage[rows] = pages


class BenchDriver(Driver):
    # The faulting page's migration arrives set up with MigrateToRam (one round trip less).
    wants_fault_migration = True
    # invalidate() keeps no device table, so the MIGRATE events our own migrations
    # raise would change nothing here: the daemon need not send them.
    ignores_own_migrate = True

    def __init__(self) -> None:
        self.invalidations = 0
        self.conn: DeviceConnection | None = None
        self.pool: Pool | None = None
        self.to_ram = 0
        self.to_ram_us: dict[str, list[float]] = {"setup_us": [], "pages_us": [], "total_us": []}

    async def invalidate(self, mirror: Mirror, rng: InvalidateRange) -> bool:
        self.invalidations += 1
        return True

    async def migrate_to_ram(self, fault: FaultRequest) -> bool:
        assert self.conn is not None
        perf = time.perf_counter
        t0 = perf()
        mig = fault.migration
        if mig is None:
            start = fault.addr & PAGE_MASK
            mig = await self.conn.migrate_setup(fault.pid, start, start + PAGE_SIZE,
                                                MIGRATE_VMA_SELECT_DEVICE_PRIVATE, fault.fault_token)
        t1 = perf()
        moved, _, _ = await self.copy_home(mig)
        t2 = perf()
        self.to_ram += 1
        for k, dt in (("setup_us", t1 - t0), ("pages_us", t2 - t1), ("total_us", t2 - t0)):
            self.to_ram_us[k].append(dt * 1e6)
        return moved == 1

    async def copy_home(self, mig: Migration, shm: bool = False,
                        then: Callable[..., Awaitable[Migration]] | None = None) -> tuple[int, float, Migration | None]:
        """MigratePages (new system pages from our data) + finalize in one call; with
        ``shm`` the data is gathered into a transfer buffer of the staging area. With
        ``then`` (migrate_pages_and_setup with the next piece's range bound) the next
        piece's setup is chained on. Returns (pages moved, seconds spent gathering
        the data, the next piece's migration)."""
        assert self.conn is not None and self.pool is not None
        conn = self.conn
        t0 = time.perf_counter()
        sel = ((mig.src_flags & (MIGRATE_PFN_MIGRATE | MIGRATE_PFN_VALID)) == (MIGRATE_PFN_MIGRATE | MIGRATE_PFN_VALID))
        sel &= self.pool.contains(mig.src_pfns)
        idx = np.flatnonzero(sel)
        if not len(idx):  # nothing of ours: finalize puts it all back
            if then is None:
                await conn.migrate_finalize(mig)
                return 0, time.perf_counter() - t0, None
            none = np.zeros(mig.npages, dtype=np.uint8)  # (a pages step that takes nothing)
            return 0, time.perf_counter() - t0, await then(mig, none.astype(np.uint64), none)
        flags = np.zeros(mig.npages, dtype=np.uint8)
        flags[idx] = MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA | (mig.src_flags[idx] & MIGRATE_PFN_WRITE)
        dst = np.zeros(mig.npages, dtype=np.uint64)
        rows = self.pool.rows(mig.src_pfns[idx])
        run = self.pool._run(rows)

        async def pages(data: bytes | np.ndarray) -> Migration | None:
            if then is None:
                await conn.migrate_pages(mig, dst, flags, data, finalize=True)
                return None
            return await then(mig, dst, flags, data)

        if shm and run is not None and conn.staging is not None \
                and conn.staging.offset_of(self.pool.storage[run].reshape(-1)) is not None:
            # Device memory in the staging area: the daemon copies straight out of it.
            t1 = time.perf_counter()
            nxt = await pages(self.pool.storage[run])
        elif shm:
            with conn.transfer_buffer(len(idx)) as buf:
                self.pool.gather(rows, buf)
                t1 = time.perf_counter()
                nxt = await pages(buf)
        else:
            data = self.pool.read(rows)
            t1 = time.perf_counter()
            nxt = await pages(data)
        return int(np.count_nonzero(mig.src_flags[idx] & MIGRATE_PFN_MIGRATE)), t1 - t0, nxt

    def page_free(self, pfns: np.ndarray) -> None:
        if self.pool is not None:
            self.pool.release(self.pool.rows(pfns[self.pool.contains(pfns)]))


class Worker:
    def __init__(self, conn: DeviceConnection, driver: BenchDriver) -> None:
        self.conn = conn
        self.driver = driver
        self.mirrors: dict[int, Mirror] = {}
        self._floor_channels: dict[str, object] = {}
        self._fan: asyncio.Task[None] | None = None
        self._last_to_dev: list[np.ndarray] = []
        # The shared-memory staging area, when granted and mapped. The SDK uses it
        # whenever the connection has one, so it is hidden except during shm runs.
        self._staging = conn.staging
        conn.staging = None

    @property
    def staging_bytes(self) -> int:
        return self._staging.size if self._staging is not None else 0

    def _use_shm(self, shm: bool) -> None:
        """Route page contents through the staging area, or (shm False) in messages."""
        if shm and self._staging is None:
            raise RuntimeError("no shared-memory staging area (not granted, or not mapped)")
        self.conn.staging = self._staging if shm else None

    async def handle(self, cmd: dict) -> dict:
        op = cmd["cmd"]
        if op == "mirror":
            m = await self.conn.insert_notifier(cmd["pid"], cmd["start"], cmd["length"])
            self.mirrors[m.notifier_id] = m
            return {"mirror": m.notifier_id}
        if op == "unmirror":
            m = self.mirrors.pop(cmd["mirror"])
            await self.conn.remove_notifier(m)
            return {}
        if op == "fault":
            return await self.fault(self.mirrors[cmd["mirror"]], cmd["start"], cmd["end"], cmd["flags"])
        if op == "fan_join":
            joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._fan = asyncio.ensure_future(floor.fan_peer(self._floor(cmd["addr"]), joined))
            await asyncio.wait_for(asyncio.shield(joined), 10)
            return {}
        if op == "fan_leave":
            if self._fan is not None:
                self._fan.cancel()
                self._fan = None
            return {}
        if op == "floor_bulk":
            ch = self._floor(cmd["addr"])
            return {"s": await floor.bulk_call_s(ch, cmd["pages"], cmd["count"])}  # type: ignore[arg-type]
        if op == "stats":
            return {"invalidations": self.driver.invalidations}
        if op in ("to_dev", "to_sys"):
            self._use_shm(bool(cmd.get("shm")))
            try:
                if op == "to_dev":
                    return await self.to_dev(cmd["pid"], cmd["start"], cmd["start"] + cmd["length"], cmd["piece"],
                                             bool(cmd.get("shm")), int(cmd.get("inflight", 1)),
                                             bool(cmd.get("stream")))
                return await self.to_sys(cmd["pid"], cmd["start"], cmd["start"] + cmd["length"], cmd["piece"],
                                         bool(cmd.get("shm")), int(cmd.get("inflight", 1)))
            finally:
                self._use_shm(False)
        if op == "dev_crc":
            pool = self.driver.pool
            assert pool is not None
            crc = 0
            for rows in self._last_to_dev:
                crc = zlib.crc32(pool.read(rows), crc)
            return {"crc32": crc}
        if op == "pool":
            pool = self.driver.pool
            return {"free": pool.free if pool else 0, "total": pool.n if pool else 0, "to_ram": self.driver.to_ram}
        if op == "to_ram_times":  # device-side times of each migrate_to_ram callback; cleared
            times, self.driver.to_ram_us = self.driver.to_ram_us, {k: [] for k in self.driver.to_ram_us}
            return times
        if op == "floor_bytes":
            ch = self._floor(cmd["addr"])
            return {"s": await floor.bytes_s(ch, cmd["total"], cmd["payload"], cmd["count"],  # type: ignore[arg-type]
                                             bool(cmd["upload"]), inflight=int(cmd.get("inflight", 1)))}
        if op == "floor_stream_bytes":
            ch = self._floor(cmd["addr"])
            return {"s": await floor.stream_bytes_s(ch, cmd["total"], cmd["payload"],  # type: ignore[arg-type]
                                                    cmd["count"], bool(cmd["upload"]))}
        if op == "memcpy":
            return {"s": floor.memcpy_s(cmd["bytes"], cmd["count"])}
        raise ValueError(f"unknown command {op!r}")

    def _floor(self, addr: str):  # noqa: ANN202
        ch = self._floor_channels.get(addr)
        if ch is None:
            ch = self._floor_channels[addr] = floor.connect(addr)
        return ch

    async def fault(self, mirror: Mirror, start: int, end: int, flags: int) -> dict:
        conn = self.conn
        perf = time.perf_counter
        retries = 0
        while True:
            t0 = perf()
            seq = await conn.read_begin(mirror)
            tr = perf()
            try:
                r = await conn.range_fault(mirror, seq, start, end, default_flags=flags)
            except KernelError as e:
                if e.errno == errno.EBUSY and retries < 100:
                    retries += 1
                    continue
                raise
            t1 = perf()
            async with mirror.lock:
                if mirror.read_retry(seq):
                    retries += 1
                    if retries < 100:
                        continue
                    raise KernelError(errno.EBUSY, "range fault kept colliding with invalidations")
            break
        fl = r.flags
        return {
            "us": (t1 - t0) * 1e6,
            "read_begin_us": (tr - t0) * 1e6,
            "npages": int(len(fl)),
            "valid": int(np.count_nonzero(fl & HMM_PFN_VALID)),
            "write": int(np.count_nonzero(fl & HMM_PFN_WRITE)),
            "retries": retries,
        }

    async def _in_pieces(self, start: int, end: int, piece: int, inflight: int,
                         setup: Callable[[int, int], Awaitable[Migration]],
                         one: Callable[[Migration, tuple[int, int] | None], Awaitable[tuple[T, Migration | None]]],
                         ) -> list[T]:
        """The pieces of [start, end), each its own migration, in ``inflight`` lanes
        (lane i takes pieces i, i + inflight, ...). A lane sets its first piece up
        with ``setup``; ``one(mig, next)`` moves a piece and returns its result and
        the migration of ``next`` (its bounds; None after the last piece), set up
        on the way. Results in address order."""
        step = piece << PAGE_SHIFT
        bounds = [(s, min(end, s + step)) for s in range(start, end, step)]
        if not bounds:
            return []

        async def lane(mine: list[tuple[int, int]]) -> list[T]:
            out: list[T] = []
            mig: Migration | None = await setup(*mine[0])
            for k in range(len(mine)):
                assert mig is not None
                res, mig = await one(mig, mine[k + 1] if k + 1 < len(mine) else None)
                out.append(res)
            return out

        n = max(1, min(inflight, len(bounds)))
        lanes = await asyncio.gather(*(lane(bounds[i::n]) for i in range(n)))
        ordered: list[T] = []
        for k in range(len(bounds)):
            ordered.append(lanes[k % n][k // n])
        return ordered

    def _next_setup(self, pid: int, select: int, with_data: bool, nxt: tuple[int, int] | None,
                    ) -> Callable[..., Awaitable[Migration]] | None:
        """How a piece chains the setup of the next one (``nxt``) to its pages step:
        migrate_pages_and_setup(mig, dst, flags, data=b"") -> the next Migration."""
        if nxt is None:
            return None
        return functools.partial(self.conn.migrate_pages_and_setup, pid=pid, start=nxt[0], end=nxt[1],
                                 select=select, with_data=with_data)

    async def to_dev(self, pid: int, start: int, end: int, piece: int, shm: bool = False, inflight: int = 1,
                     stream: bool = False) -> dict:
        conn, pool = self.conn, self.driver.pool
        assert pool is not None
        perf = time.perf_counter
        ph = {"setup": 0.0, "dma_read": 0.0, "store": 0.0, "pages_finalize": 0.0}
        select = MIGRATE_VMA_SELECT_SYSTEM
        read_after = shm or stream  # the contents read after the setup (dma_read_into)

        async def setup(s: int, e: int) -> Migration:
            t0 = perf()
            # In messages, the contents come in the setup's reply (capability migrate-setup-data).
            mig = await conn.migrate_setup(pid, s, e, select, with_data=not read_after)
            ph["setup"] += perf() - t0
            return mig

        async def one(mig: Migration, nxt: tuple[int, int] | None) -> tuple[np.ndarray, Migration | None]:
            t1 = perf()
            finalized = False
            try:
                idx = np.flatnonzero(mig.src_flags & MIGRATE_PFN_MIGRATE)
                has_src = (mig.src_flags[idx] & MIGRATE_PFN_VALID) != 0
                rows = pool.alloc(len(idx))
                if read_after:  # through the staging area (one copy into the pool), or a DmaReadStream
                    if has_src.any():
                        await self._read_into_pool(mig.src_pfns[idx[has_src]], rows[has_src])
                    t2 = perf()
                else:
                    t2 = perf()
                    assert mig.data is not None
                    pool.write(rows[has_src], mig.data)
                pool.storage[rows[~has_src]] = 0  # holes and the zero page: zero-fill
                dst = np.zeros(mig.npages, dtype=np.uint64)
                flags = np.zeros(mig.npages, dtype=np.uint8)
                dst[idx] = rows.astype(np.uint64) + np.uint64(pool.base)
                flags[idx] = MIGRATE_PFN_VALID | (mig.src_flags[idx] & MIGRATE_PFN_WRITE)
                t3 = perf()
                # No device table to update between the two steps: one call, which
                # also sets the next piece up (capability migrate-chain).
                then = self._next_setup(pid, select, not read_after, nxt)
                if then is None:
                    await conn.migrate_pages(mig, dst, flags, finalize=True)
                    next_mig = None
                else:
                    finalized = True  # migrate_pages_and_setup ends mig whatever happens
                    next_mig = await then(mig, dst, flags)
                finalized = True
            finally:
                if not finalized:
                    await conn.migrate_finalize(mig)  # puts everything back
            t4 = perf()
            for k, dt in (("dma_read", t2 - t1), ("store", t3 - t2), ("pages_finalize", t4 - t3)):
                ph[k] += dt
            return rows[(mig.src_flags[idx] & MIGRATE_PFN_MIGRATE) != 0], next_mig

        t_start = perf()
        stored = await self._in_pieces(start, end, piece, inflight, setup, one)
        total = perf() - t_start
        self._last_to_dev = stored
        return {"s": total, "phases": ph, "moved": sum(len(r) for r in stored), "pieces": len(stored)}

    async def _read_into_pool(self, pfns: np.ndarray, rows: np.ndarray) -> None:
        pool = self.driver.pool
        assert pool is not None
        run = pool._run(rows)
        if run is not None:  # consecutive rows: straight into the pool
            await self.conn.dma_read_into(pfns, pool.storage[run])
        else:
            with self.conn.transfer_buffer(len(rows)) as buf:
                await self.conn.dma_read_into(pfns, buf)
                pool.storage[rows] = buf

    async def to_sys(self, pid: int, start: int, end: int, piece: int, shm: bool = False, inflight: int = 1) -> dict:
        conn = self.conn
        perf = time.perf_counter
        ph = {"setup": 0.0, "gather": 0.0, "pages_finalize": 0.0}
        select = MIGRATE_VMA_SELECT_DEVICE_PRIVATE

        async def setup(s: int, e: int) -> Migration:
            t0 = perf()
            mig = await conn.migrate_setup(pid, s, e, select)
            ph["setup"] += perf() - t0
            return mig

        async def one(mig: Migration, nxt: tuple[int, int] | None) -> tuple[int, Migration | None]:
            t1 = perf()
            moved, gather, next_mig = await self.driver.copy_home(mig, shm, self._next_setup(pid, select, False, nxt))
            ph["gather"] += gather
            ph["pages_finalize"] += perf() - t1 - gather
            return moved, next_mig

        t_start = perf()
        moved = await self._in_pieces(start, end, piece, inflight, setup, one)
        return {"s": perf() - t_start, "phases": ph, "moved": sum(moved), "pieces": len(moved)}

    async def close(self) -> None:
        if self._fan is not None:
            self._fan.cancel()
        for ch in self._floor_channels.values():
            await ch.close()  # type: ignore[attr-defined]
        await self.conn.close()


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(addr: str, name: str, memory_pages: int = 0, shm_bytes: int = 0) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    driver = BenchDriver()
    if memory_pages:
        conn = await DeviceConnection.connect(addr, name, driver, memory=MEMORY_DEVICE_PRIVATE,
                                              memory_pages=memory_pages, shm_bytes=shm_bytes)
        # With a staging area big enough, the device's memory lives in it (run.py asks
        # for the memory plus one piece): the daemon then copies page contents straight
        # into and out of device memory, one copy instead of two.
        shared = conn.shared_memory(conn.device_pfn_count) if shm_bytes else None
        driver.pool = Pool(conn.device_pfn_base, conn.device_pfn_count, shared)
    else:
        conn = await DeviceConnection.connect(addr, name, driver)
    driver.conn = conn
    worker = Worker(conn, driver)
    emit({"ready": True, "name": name, "device_id": conn.device_id,
          "shm_bytes": worker.staging_bytes, "memory_in_shm": driver.pool is not None and shared is not None})
    try:
        while True:
            line = await reader.readline()
            if not line:
                return 0  # the bench went away
            cmd = json.loads(line)
            if cmd.get("cmd") == "exit":
                emit({"ok": True})
                return 0
            try:
                reply = await worker.handle(cmd)
                reply["ok"] = True
            except Exception as e:  # report, keep serving
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            emit(reply)
    finally:
        await worker.close()


if __name__ == "__main__":
    tune_malloc()  # what a device program that moves bulk contents should do (hmm.malloc)
    sys.exit(run_loop(main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:5]))))
