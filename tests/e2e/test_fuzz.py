"""Fuzzing every unary RPC of the daemon: random, malformed, huge, overflowing and
wrong-state arguments, built from the proto descriptors.

Every answer must be OK or a clear error: a gRPC status carrying the hmm-errno
metadata, never an internal error (an unhandled exception in the daemon). The
daemon keeps serving throughout, and once the fuzzer stops and the short
migration and page-lock limits have expired, its invariants hold. A failure
names the seed and the call that reproduce it."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from hmm.abi import ERRNO_METADATA_KEY, MEMORY_DEVICE_PRIVATE, SESSION_METADATA_KEY
from hmm.admin import AdminClient
from hmm.channel import insecure_channel
from hmm.device import DeviceConnection, Driver
from hmm.process import ProcessClient
from hmm.v1 import admin_pb2, device_pb2, process_pb2
from tests.conftest import HMMD_ARGS
from tests.procs import start_hmmd

SEED = int(os.environ.get("HMM_FUZZ_SEED", "20261121"))
CALLS = int(os.environ.get("HMM_FUZZ_CALLS", "2000"))
DEVICE = "fuzzdev"
# Short limits, so that what the fuzzer leaves open (migrations, exclusive-page
# locks) is undone quickly and the invariants can be checked afterwards.
LIMITS = ("--migration-timeout-ms", "300", "--page-lock-timeout-ms", "300")
SKIP = {"InjectFaults"}  # the fuzzer must not fence its own device on purpose
CALL_TIMEOUT_S = 10.0

U64 = (0, 1, 2, 7, 8, 4095, 4096, 4097, 1 << 12, 1 << 21, 1 << 30, 1 << 40, 1 << 47, (1 << 47) - 4096,
       1 << 63, (1 << 64) - 1, (1 << 64) - 4096)
U32 = (0, 1, 2, 3, 4, 5, 8, 0x20, 0x22, 0x100, 1 << 31, (1 << 32) - 1)
I64 = (0, 1, -1, -4096, 1 << 31, -(1 << 31), (1 << 63) - 1, -(1 << 63))
STRINGS = ("", "/", "/dev/" + DEVICE, "/dev/none", "/f", "/f/../g", "x" * 300, "\u00e9\u4e2d", "fuzzdev", "a/b")


class Fuzzer:
    def __init__(self, rng: random.Random, live_ids: list[int], pids: list[int], addrs: list[int]) -> None:
        self.rng = rng
        self.live_ids = live_ids  # fds and ids seen in replies: wrong-state ids come from here too
        self.pids = pids  # live processes, so that calls get past the pid check
        self.addrs = addrs  # addresses that were mapped

    def integer(self, field: d.FieldDescriptor) -> int:
        r = self.rng
        signed = field.type in (d.FieldDescriptor.TYPE_INT32, d.FieldDescriptor.TYPE_INT64,
                                d.FieldDescriptor.TYPE_SINT32, d.FieldDescriptor.TYPE_SINT64,
                                d.FieldDescriptor.TYPE_SFIXED32, d.FieldDescriptor.TYPE_SFIXED64)
        bits = 32 if field.type in (d.FieldDescriptor.TYPE_UINT32, d.FieldDescriptor.TYPE_INT32,
                                    d.FieldDescriptor.TYPE_SINT32, d.FieldDescriptor.TYPE_FIXED32,
                                    d.FieldDescriptor.TYPE_SFIXED32) else 64
        pick = r.random()
        if field.name == "pid" and r.random() < 0.8:
            return r.choice(self.pids)
        if field.name in ("addr", "start", "new_addr", "old_addr") and self.addrs and r.random() < 0.7:
            return r.choice(self.addrs) + r.choice((0, 0, 4096, 8192, 1))
        if pick < 0.35 and self.live_ids:
            v = r.choice(self.live_ids)
        elif pick < 0.55:
            v = r.randrange(0, 64) * 4096 + (0x7F0000000000 if r.random() < 0.5 else 0)
        elif pick < 0.85:
            v = r.choice(I64 if signed else (U32 if bits == 32 else U64))
        else:
            v = r.getrandbits(bits)
        if signed:
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        else:
            lo, hi = 0, (1 << bits) - 1
        return min(max(v, lo), hi)

    def blob(self) -> bytes:
        r = self.rng
        kind = r.random()
        if kind < 0.4:  # an array of uint64 PFNs, sometimes plausible
            n = r.choice((0, 1, 2, 8, 64, 513))
            vals = [r.choice((0, 1, 2, r.randrange(0, 4096), 1 << 40, (1 << 64) - 1, r.getrandbits(64)))
                    for _ in range(n)]
            return b"".join(v.to_bytes(8, "little") for v in vals)
        if kind < 0.7:  # one byte per page of flags
            return bytes(r.getrandbits(8) for _ in range(r.choice((0, 1, 8, 64, 512))))
        return r.randbytes(r.choice((0, 1, 7, 4095, 4096, 8192, 4096 * 9 + 3)))

    def fill(self, msg: Message, depth: int = 0) -> Message:
        for field in msg.DESCRIPTOR.fields:
            if self.rng.random() < 0.25:
                continue  # left at its default
            repeated = field.is_repeated
            for _ in range(self.rng.choice((0, 1, 3)) if repeated else 1):
                value = self.value(field, msg, depth)
                if value is None:
                    continue
                if repeated:
                    target = getattr(msg, field.name)
                    if field.type == d.FieldDescriptor.TYPE_MESSAGE:
                        target.add().CopyFrom(value)
                    else:
                        target.append(value)
                elif field.type == d.FieldDescriptor.TYPE_MESSAGE:
                    getattr(msg, field.name).CopyFrom(value)
                else:
                    setattr(msg, field.name, value)
        return msg

    def value(self, field: d.FieldDescriptor, msg: Message, depth: int) -> Any:
        t = field.type
        if t == d.FieldDescriptor.TYPE_BOOL:
            return self.rng.random() < 0.5
        if t == d.FieldDescriptor.TYPE_STRING:
            return self.rng.choice(STRINGS)
        if t == d.FieldDescriptor.TYPE_BYTES:
            return self.blob()
        if t == d.FieldDescriptor.TYPE_ENUM:
            values = [v.number for v in field.enum_type.values]
            return self.rng.choice(values) if self.rng.random() < 0.8 else self.rng.randrange(-3, 100)
        if t == d.FieldDescriptor.TYPE_MESSAGE:
            if depth > 2:
                return None
            return self.fill(GetMessageClass(field.message_type)(), depth + 1)
        if t in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
            return self.rng.choice((0.0, -1.0, 1e300, float("nan")))
        return self.integer(field)


def unary_methods() -> list[tuple[str, d.MethodDescriptor]]:
    out = []
    for module in (process_pb2, device_pb2, admin_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                if not m.client_streaming and not m.server_streaming and m.name not in SKIP:
                    out.append((service.full_name, m))
    return out


def harvest(reply: Message, into: list[int], pids: list[int], addrs: list[int]) -> None:
    """Remember the pids, addresses and small ids (fds, notifier and migration ids) a
    reply names."""
    for field, value in reply.ListFields():
        if field.name == "pid" and isinstance(value, int) and value:
            pids.append(value)
            del pids[:-16]
        if field.name == "addr" and isinstance(value, int) and value:
            addrs.append(value)
            del addrs[:-32]
        if field.type in (d.FieldDescriptor.TYPE_UINT32, d.FieldDescriptor.TYPE_UINT64,
                          d.FieldDescriptor.TYPE_INT32, d.FieldDescriptor.TYPE_INT64) \
                and not field.is_repeated and 0 < value < (1 << 48):
            into.append(int(value))
            del into[:-64]


@pytest.mark.timeout(180)
async def test_fuzz_every_unary_rpc(tmp_path: Path) -> None:
    daemon = start_hmmd(tmp_path, *HMMD_ARGS, *LIMITS)
    rng = random.Random(SEED)
    try:
        conn = await DeviceConnection.connect(daemon.address, DEVICE, Driver(),
                                              memory=MEMORY_DEVICE_PRIVATE, memory_pages=64)
        cpu = ProcessClient.connect(daemon.address)
        admin = AdminClient(cpu.channel)
        p = await cpu.spawn("fuzzed")
        await p.open(f"/dev/{DEVICE}")
        channel = insecure_channel(daemon.address)
        methods = unary_methods()
        live, pids, addrs = [3, 1], [p.pid], [await p.mmap(16 * 4096)]
        fuzz = Fuzzer(rng, live, pids, addrs)
        metadata = ((SESSION_METADATA_KEY, conn._metadata[0][1]),)
        seen: dict[str, int] = {}
        for i in range(CALLS):
            service, method = rng.choice(methods)
            request = fuzz.fill(GetMessageClass(method.input_type)())
            call = channel.unary_unary(f"/{service}/{method.name}",
                                       request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=GetMessageClass(method.output_type).FromString)
            where = f"seed {SEED}, call {i}: {method.name}({request})"
            try:
                reply = await asyncio.wait_for(call(request, metadata=metadata), CALL_TIMEOUT_S)
                harvest(reply, live, pids, addrs)
                seen["OK"] = seen.get("OK", 0) + 1
            except TimeoutError:
                pytest.fail(f"the daemon did not answer within {CALL_TIMEOUT_S} s: {where}")
            except grpc.aio.AioRpcError as e:
                errno_name = dict(e.trailing_metadata() or ()).get(ERRNO_METADATA_KEY)
                assert errno_name, f"{e.code().name} without hmm-errno ({e.details()}): {where}"
                assert "internal error" not in (e.details() or ""), f"{e.details()}: {where}"
                seen[str(errno_name)] = seen.get(str(errno_name), 0) + 1
        assert conn.closed.done() is False, "the fuzzer's own device was fenced"
        assert seen.get("OK", 0) > CALLS // 20, seen  # the fuzzer reached past argument checks
        assert len(seen) >= 6, seen  # and many different errors
        await asyncio.sleep(0.8)  # the migration and page-lock limits expire
        assert await admin.check_invariants() == []
        await channel.close()
        await cpu.close()
        await conn.close()
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
