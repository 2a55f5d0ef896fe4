"""A benchmark device: one OS process, one hmmd device session, driven over stdin/stdout.

    python bench/devproc.py HMMD_ADDR DEVICE_NAME

It connects with the SDK (``hmm.device.DeviceConnection``), prints one JSON line
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
  {"cmd": "exit"}

The process also exits when stdin closes (the bench died), so it can never outlive it.
"""

from __future__ import annotations

import asyncio
import errno
import json
import sys
import time

import floor
import numpy as np

from hmm.abi import HMM_PFN_VALID, HMM_PFN_WRITE
from hmm.device import DeviceConnection, Driver
from hmm.errors import KernelError
from hmm.loop import run_loop
from hmm.mirror import InvalidateRange, Mirror


class BenchDriver(Driver):
    def __init__(self) -> None:
        self.invalidations = 0

    async def invalidate(self, mirror: Mirror, rng: InvalidateRange) -> bool:
        self.invalidations += 1
        return True


class Worker:
    def __init__(self, conn: DeviceConnection, driver: BenchDriver) -> None:
        self.conn = conn
        self.driver = driver
        self.mirrors: dict[int, Mirror] = {}
        self._floor_channels: dict[str, object] = {}
        self._fan: asyncio.Task[None] | None = None

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

    async def close(self) -> None:
        if self._fan is not None:
            self._fan.cancel()
        for ch in self._floor_channels.values():
            await ch.close()  # type: ignore[attr-defined]
        await self.conn.close()


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(addr: str, name: str) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    driver = BenchDriver()
    conn = await DeviceConnection.connect(addr, name, driver)
    worker = Worker(conn, driver)
    emit({"ready": True, "name": name, "device_id": conn.device_id})
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
    sys.exit(run_loop(main(sys.argv[1], sys.argv[2])))
