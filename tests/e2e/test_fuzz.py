"""Fuzzing every RPC of the daemon: random, malformed, huge, overflowing and
wrong-state arguments, built from the proto descriptors. Streaming calls too:
requests streams of random length, some with a message that does not parse, some
abandoned midway; reply streams read for a while and then dropped; new Connect
streams (other devices' sessions) sent random messages.

Every answer must be OK or a clear error: a gRPC status carrying the hmm-errno
metadata, never an internal error (an unhandled exception in the daemon). The
daemon keeps serving throughout, the fuzzer's own device stays connected, and once
the fuzzer stops and the short migration and page-lock limits have expired, its
invariants hold. A failure names the seed and the call that reproduce it."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Coroutine
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
LIMITS = ("--migration-timeout-ms", "300", "--page-lock-timeout-ms", "300",
          "--max-device-memory-pages", "4096")  # (a random Hello may register a device)
SKIP = {"InjectFaults"}  # the fuzzer must not fence its own device on purpose
CALL_TIMEOUT_S = 10.0
STREAM_READ_S = 0.2  # how long a reply stream is read before it is dropped
GARBAGE = b"\xff\xff\xff\xff\x07"  # a message that does not parse

U64 = (0, 1, 2, 7, 8, 4095, 4096, 4097, 1 << 12, 1 << 21, 1 << 30, 1 << 40, 1 << 47, (1 << 47) - 4096,
       1 << 63, (1 << 64) - 1, (1 << 64) - 4096)
U32 = (0, 1, 2, 3, 4, 5, 8, 0x20, 0x22, 0x100, 1 << 31, (1 << 32) - 1)
I64 = (0, 1, -1, -4096, 1 << 31, -(1 << 31), (1 << 63) - 1, -(1 << 63))
CAPABILITIES = ["dma", "shm", "detach", "bulk-stream", "ack-pages", "migrate-to-ram-setup", "own-migrate-silent",
                "migrate-chain", "migrate-setup-data", "nonsense"]
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


def every_method() -> list[tuple[str, d.MethodDescriptor]]:
    out = []
    for module in (process_pb2, device_pb2, admin_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            out += [(service.full_name, m) for m in service.methods if m.name not in SKIP]
    return out


def _serialize(m: Message | bytes) -> bytes:
    return m if isinstance(m, bytes) else m.SerializeToString()


def fuzzed_call(channel: grpc.aio.Channel, service: str, method: d.MethodDescriptor, fuzz: Fuzzer,
                metadata: tuple[tuple[str, str], ...]) -> tuple[str, Coroutine[Any, Any, list[Message]]]:
    """One fuzzed call of ``method``: what it sends, and the call (its replies, or
    AioRpcError for an error status). A reply stream is read for STREAM_READ_S at
    most and then dropped; a request stream is 0 to 3 messages, one of them perhaps
    GARBAGE, and a sixth of them are abandoned before the end."""
    rng = fuzz.rng
    path = f"/{service}/{method.name}"
    parse = GetMessageClass(method.output_type).FromString
    if not method.client_streaming:
        request = fuzz.fill(GetMessageClass(method.input_type)())
        where = f"{method.name}({request})"
        if method.server_streaming:
            stream = channel.unary_stream(path, request_serializer=_serialize, response_deserializer=parse)
            return where, _read_for_a_while(stream(request, metadata=metadata))
        unary = channel.unary_unary(path, request_serializer=_serialize, response_deserializer=parse)

        async def one() -> list[Message]:
            return [await asyncio.wait_for(unary(request, metadata=metadata), CALL_TIMEOUT_S)]

        return where, one()
    requests: list[Message | bytes] = [fuzz.fill(GetMessageClass(method.input_type)())
                                       for _ in range(rng.choice((0, 1, 1, 2, 3)))]
    if requests and rng.random() < 0.2:
        requests[rng.randrange(len(requests))] = GARBAGE
    if method.name == "Connect" and rng.random() < 0.5:  # a session that starts well, then goes wrong
        hello = device_pb2.Hello(version_major=1, name=f"fz{rng.getrandbits(32):x}", memory=MEMORY_DEVICE_PRIVATE,
                                 memory_pages=64, capabilities=rng.sample(CAPABILITIES, rng.randrange(4)))
        requests.insert(0, device_pb2.DeviceMessage(hello=hello))
    abandon = rng.random() < 1 / 6
    where = f"{method.name}({'abandoned ' if abandon else ''}stream {requests})"

    async def send() -> AsyncIterator[Message | bytes]:
        for r in requests:
            yield r
        if abandon:
            await asyncio.sleep(3600)  # never half-closes: the call is cancelled

    if method.server_streaming:  # Connect: a session of its own, not the fuzzer's device's
        bidi = channel.stream_stream(path, request_serializer=_serialize, response_deserializer=parse)
        return where, _read_for_a_while(bidi(send()))
    upload = channel.stream_unary(path, request_serializer=_serialize, response_deserializer=parse)

    async def uploaded() -> list[Message]:
        call = upload(send(), metadata=metadata)
        if abandon:
            await asyncio.sleep(0.01)
            call.cancel()
            return []
        return [await asyncio.wait_for(call, CALL_TIMEOUT_S)]

    return where, uploaded()


async def _read_for_a_while(call: Any) -> list[Message]:
    replies: list[Message] = []

    async def read() -> None:
        async for reply in call:
            replies.append(reply)

    try:
        await asyncio.wait_for(read(), STREAM_READ_S)
    except TimeoutError:
        pass  # still streaming (a trace, a session): dropped
    finally:
        call.cancel()
    return replies


def ended_while_sending(e: grpc.aio.AioRpcError) -> bool:
    """A request stream's write failed because the daemon had already ended the
    call: the gRPC client reports that itself, as INTERNAL, and the daemon's status
    is lost (it is not one the daemon sent)."""
    return (e.code() == grpc.StatusCode.INTERNAL and e.details() == "Internal error from Core"
            and "SendMessageOperation" in (e.debug_error_string() or ""))


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
async def test_fuzz_every_rpc(tmp_path: Path) -> None:
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
        methods = every_method()
        live, pids, addrs = [3, 1], [p.pid], [await p.mmap(16 * 4096)]
        fuzz = Fuzzer(rng, live, pids, addrs)
        metadata = ((SESSION_METADATA_KEY, conn._metadata[0][1]),)
        seen: dict[str, int] = {}
        for i in range(CALLS):
            service, method = rng.choice(methods)
            what, call = fuzzed_call(channel, service, method, fuzz, metadata)
            where = f"seed {SEED}, call {i}: {what[:1500]}"
            try:
                for reply in await call:
                    harvest(reply, live, pids, addrs)
                seen["OK"] = seen.get("OK", 0) + 1
            except TimeoutError:
                pytest.fail(f"the daemon did not answer within {CALL_TIMEOUT_S} s: {where}")
            except grpc.aio.AioRpcError as e:
                if ended_while_sending(e):
                    seen["ended while sending"] = seen.get("ended while sending", 0) + 1
                    continue
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
