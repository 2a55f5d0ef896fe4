"""The bare-gRPC floor: a tiny server, and the client measurements run against it.

No .proto: the server registers generic handlers whose messages are raw bytes
(serializer/deserializer None = identity). It uses the same channel options
(``hmm.channel.grpc_options``) and the same event loop (uvloop via
``hmm.loop.run_loop``) as hmmd and the SDK, so its round trips are what hmmd's
would be if the daemon did no work at all.

Methods (service ``bench.Floor``):

* ``Echo``   unary, returns the request bytes.
* ``Bulk``   unary, the request is an 8-byte little-endian page count n; returns an
             ``hmm.v1.RangeFaultReply`` of n pages (pfns n x 8 bytes, flags n, orders
             n: the exact message and size of hmmd's RangeFault reply), built once
             per size and cached, so what is timed is protobuf serialization, the
             transfer and parsing, as for hmmd, with no work behind it.
* ``Fan``    bidi stream of a fan-out peer: it sends ``b"R"`` once, then echoes
             every message it gets (devproc.py's ``fan_join``).
* ``FanGo``  unary, request ``<8-byte count><8-byte warmup><8-byte peers>``: waits
             for that many Fan peers, then runs ``warmup + count`` rounds of "write
             one ping to every peer at once, wait until all answered", timed in the
             server like hmmd's invalidation window; replies ``{"samples_us": [...]}``.
             The bare-gRPC counterpart of one invalidation fanned out to N devices.
* ``Blob``   unary, the request is an 8-byte little-endian size n; returns n bytes
             (one cached ``bytes`` object, raw: no protobuf), i.e. bulk data from the
             server to the client, as a DmaRead reply carries it.
* ``Sink``   unary, the request is the payload; returns its 8-byte length: bulk
             data from the client to the server, as MigratePages carries it.
* ``BlobStream``  server-streaming, the request is ``<8-byte n><8-byte size>``: n
             replies of ``size`` bytes (Blob's cached object), as DmaReadStream.
* ``SinkStream``  client-streaming, payloads; returns their total 8-byte length, as
             MigratePagesStream.
* ``Ping``   bidi stream. Client-driven: every message is echoed. Server-driven:
             a first message ``b"S" + <8-byte count> + <8-byte warmup>`` makes
             the *server* send ``warmup + count`` small pings, each answered by the
             client; the server times write -> read of the answer with
             ``perf_counter`` (exactly how hmmd times Invalidate -> Ack) and
             finally sends one message ``b"{...json...}"`` with the samples in us.

Run as a process:  python bench/floor.py [--listen 127.0.0.1:0]
First stdout line: ``floor listening on HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from hmm.channel import grpc_options, insecure_channel
from hmm.loop import run_loop
from hmm.malloc import tune_malloc
from hmm.v1 import device_pb2

SERVICE = "bench.Floor"
ECHO = f"/{SERVICE}/Echo"
BULK = f"/{SERVICE}/Bulk"
PING = f"/{SERVICE}/Ping"
FAN = f"/{SERVICE}/Fan"
FAN_GO = f"/{SERVICE}/FanGo"
BLOB = f"/{SERVICE}/Blob"
SINK = f"/{SERVICE}/Sink"
BLOB_STREAM = f"/{SERVICE}/BlobStream"
SINK_STREAM = f"/{SERVICE}/SinkStream"

# A ping the size of an hmmd Invalidate KernelMessage (id + 8 fields, ~45 bytes).
PING_PAYLOAD = b"p" * 48


# ---- server -------------------------------------------------------------------------
_bulk_cache: dict[int, device_pb2.RangeFaultReply] = {}


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _bulk(request: bytes, context: grpc.aio.ServicerContext) -> device_pb2.RangeFaultReply:
    (n,) = struct.unpack("<Q", request[:8])
    reply = _bulk_cache.get(n)
    if reply is None:
        _bulk_cache.clear()
        pfns = np.arange(1, n + 1, dtype="<u8").tobytes()
        reply = _bulk_cache[n] = device_pb2.RangeFaultReply(pfns=pfns, flags=b"\x03" * n, orders=bytes(n))
    return reply


_blob_cache: dict[int, bytes] = {}


async def _blob(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    (n,) = struct.unpack("<Q", request[:8])
    blob = _blob_cache.get(n)
    if blob is None:
        _blob_cache.clear()
        blob = _blob_cache[n] = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    return blob


async def _sink(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return struct.pack("<Q", len(request))


async def _blob_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    n, size = struct.unpack("<QQ", request[:16])
    blob = await _blob(struct.pack("<Q", size), context)
    for _ in range(n):
        yield blob


async def _sink_stream(request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    total = 0
    async for part in request_iterator:
        total += len(part)
    return struct.pack("<Q", total)


async def _ping(request_iterator, context: grpc.aio.ServicerContext):  # noqa: ANN001
    first = await context.read()
    if first is grpc.aio.EOF:
        return
    if first[:1] == b"S" and len(first) == 17:
        count, warmup = struct.unpack("<QQ", first[1:])
        samples = []
        perf = time.perf_counter
        for i in range(warmup + count):
            t0 = perf()
            await context.write(PING_PAYLOAD)
            ans = await context.read()
            t1 = perf()
            if ans is grpc.aio.EOF:
                return
            if i >= warmup:
                samples.append((t1 - t0) * 1e6)
        await context.write(json.dumps({"samples_us": samples}).encode())
        return
    await context.write(first)
    while True:
        msg = await context.read()
        if msg is grpc.aio.EOF:
            return
        await context.write(msg)


class _FanState:
    def __init__(self) -> None:
        self.peers: list[grpc.aio.ServicerContext] = []
        self.joined = asyncio.Event()
        self.got = 0
        self.expect = 0
        self.waiter: asyncio.Future[None] | None = None


_fan_state: _FanState | None = None


def _fan_st() -> _FanState:
    global _fan_state
    if _fan_state is None:
        _fan_state = _FanState()
    return _fan_state


async def _fan(request_iterator, context: grpc.aio.ServicerContext):  # noqa: ANN001
    st = _fan_st()
    first = await context.read()
    if first is grpc.aio.EOF:
        return
    st.peers.append(context)
    st.joined.set()
    try:
        while True:
            msg = await context.read()
            if msg is grpc.aio.EOF:
                return
            st.got += 1
            if st.got >= st.expect and st.waiter is not None and not st.waiter.done():
                st.waiter.set_result(None)
    finally:
        st.peers.remove(context)


async def _fan_go(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    st = _fan_st()
    count, warmup, want = struct.unpack("<QQQ", request[:24])
    deadline = time.monotonic() + 10
    while len(st.peers) < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(st.peers)} of {want} fan-out peers joined")
        st.joined.clear()
        try:
            await asyncio.wait_for(st.joined.wait(), 1)
        except TimeoutError:
            pass
    peers = list(st.peers[:want])
    loop = asyncio.get_running_loop()
    perf = time.perf_counter
    samples = []
    for i in range(warmup + count):
        st.got, st.expect = 0, len(peers)
        st.waiter = loop.create_future()
        t0 = perf()
        await asyncio.gather(*(p.write(PING_PAYLOAD) for p in peers))
        await asyncio.wait_for(st.waiter, 5)
        t1 = perf()
        if i >= warmup:
            samples.append((t1 - t0) * 1e6)
    return json.dumps({"samples_us": samples}).encode()


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=grpc_options())
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Bulk": grpc.unary_unary_rpc_method_handler(
            _bulk, response_serializer=device_pb2.RangeFaultReply.SerializeToString),
        "Ping": grpc.stream_stream_rpc_method_handler(_ping),
        "Fan": grpc.stream_stream_rpc_method_handler(_fan),
        "FanGo": grpc.unary_unary_rpc_method_handler(_fan_go),
        "Blob": grpc.unary_unary_rpc_method_handler(_blob),
        "Sink": grpc.unary_unary_rpc_method_handler(_sink),
        "BlobStream": grpc.unary_stream_rpc_method_handler(_blob_stream),
        "SinkStream": grpc.stream_unary_rpc_method_handler(_sink_stream),
    })
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"floor listening on {listen.rsplit(':', 1)[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Exit with the parent: stdin closes when the bench process goes away.
    loop.add_reader(sys.stdin.fileno(), stop.set)
    await stop.wait()
    await server.stop(0.2)


# ---- client measurements (used by run.py and devproc.py) ------------------------------
async def unary_rtt_us(channel: grpc.aio.Channel, count: int, warmup: int = 200) -> list[float]:
    """Client-timed unary round trips with a small request."""
    echo = channel.unary_unary(ECHO)
    payload = b"u" * 24  # about an hmm RangeRequest (pid, addr, length)
    perf = time.perf_counter
    out = []
    for i in range(warmup + count):
        t0 = perf()
        await echo(payload)
        t1 = perf()
        if i >= warmup:
            out.append((t1 - t0) * 1e6)
    return out


async def bidi_rtt_server_timed_us(channel: grpc.aio.Channel, count: int, warmup: int = 200) -> list[float]:
    """Server-initiated ping-pong, timed in the server (as hmmd times Invalidate->Ack);
    this process is the echoing peer (as a device is)."""
    call = channel.stream_stream(PING)()
    await call.write(b"S" + struct.pack("<QQ", count, warmup))
    while True:
        msg = await call.read()
        if msg is grpc.aio.EOF:
            raise RuntimeError("floor server ended the ping stream early")
        if msg[:1] == b"{":
            break
        await call.write(msg)
    await call.done_writing()
    await call.code()
    return json.loads(msg)["samples_us"]


async def bidi_rtt_client_timed_us(channel: grpc.aio.Channel, count: int, warmup: int = 200) -> list[float]:
    """Client-initiated ping-pong on one stream, timed in this process."""
    call = channel.stream_stream(PING)()
    perf = time.perf_counter
    out = []
    for i in range(warmup + count):
        t0 = perf()
        await call.write(PING_PAYLOAD)
        await call.read()
        t1 = perf()
        if i >= warmup:
            out.append((t1 - t0) * 1e6)
    await call.done_writing()
    await call.code()
    return out


async def bulk_call_s(channel: grpc.aio.Channel, pages: int, count: int, warmup: int = 1) -> list[float]:
    """Seconds per "small unary echo, then a unary call returning a RangeFaultReply of
    ``pages`` pages" -- the bare-gRPC shape of read_begin + RangeFault."""
    echo = channel.unary_unary(ECHO)
    bulk = channel.unary_unary(BULK, response_deserializer=device_pb2.RangeFaultReply.FromString)
    req = struct.pack("<Q", pages)
    perf = time.perf_counter
    out = []
    for i in range(warmup + count):
        t0 = perf()
        await echo(b"u" * 16)
        reply = await bulk(req)
        t1 = perf()
        assert len(reply.flags) == pages
        if i >= warmup:
            out.append(t1 - t0)
    return out


async def bytes_s(channel: grpc.aio.Channel, total: int, payload: int, count: int, upload: bool,
                  warmup: int = 1, inflight: int = 1) -> list[float]:
    """Seconds to move ``total`` bytes in unary calls of ``payload`` bytes each, one
    call after the other (as a device migrates piece by piece), or ``inflight`` at a
    time (as one that pipelines its pieces); ``count`` samples. ``upload``: client ->
    server (Sink), else server -> client (Blob)."""
    calls = -(-total // payload)
    perf = time.perf_counter
    if upload:
        sink = channel.unary_unary(SINK)
        data = np.random.default_rng(payload).integers(0, 256, payload, dtype=np.uint8).tobytes()

        async def one() -> None:
            assert struct.unpack("<Q", await sink(data))[0] == payload
    else:
        blob = channel.unary_unary(BLOB)
        req = struct.pack("<Q", payload)

        async def one() -> None:
            assert len(await blob(req)) == payload

    async def lane(n: int) -> None:
        for _ in range(n):
            await one()

    out = []
    for i in range(warmup + count):
        t0 = perf()
        await asyncio.gather(*(lane(len(range(k, calls, inflight))) for k in range(inflight)))
        t1 = perf()
        if i >= warmup:
            out.append(t1 - t0)
    return out


async def stream_bytes_s(channel: grpc.aio.Channel, total: int, payload: int, count: int, upload: bool,
                         warmup: int = 1) -> list[float]:
    """Seconds to move ``total`` bytes as one stream of ``payload``-byte messages
    (the shape of DmaReadStream, or with ``upload`` of MigratePagesStream);
    ``count`` samples."""
    n = -(-total // payload)
    perf = time.perf_counter
    if upload:
        sink = channel.stream_unary(SINK_STREAM)
        data = np.random.default_rng(payload).integers(0, 256, payload, dtype=np.uint8).tobytes()

        async def parts() -> AsyncIterator[bytes]:
            for _ in range(n):
                yield data

        async def once() -> None:
            assert struct.unpack("<Q", await sink(parts()))[0] == n * payload
    else:
        blobs = channel.unary_stream(BLOB_STREAM)
        req = struct.pack("<QQ", n, payload)

        async def once() -> None:
            got = 0
            async for part in blobs(req):
                got += len(part)
            assert got == n * payload

    out = []
    for i in range(warmup + count):
        t0 = perf()
        await once()
        t1 = perf()
        if i >= warmup:
            out.append(t1 - t0)
    return out


def memcpy_s(nbytes: int, count: int) -> list[float]:
    """Seconds per numpy copy of an ``nbytes`` buffer into another, both already
    touched (no page faults timed)."""
    src = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    perf = time.perf_counter
    out = []
    for _ in range(count):
        t0 = perf()
        np.copyto(dst, src)
        out.append(perf() - t0)
    assert dst[-1] == src[-1]
    return out


async def fan_peer(channel: grpc.aio.Channel, joined: asyncio.Future[None]) -> None:
    """Be one fan-out peer until cancelled: register, then echo every ping at once."""
    call = channel.stream_stream(FAN)()
    try:
        await call.write(b"R")
        joined.set_result(None)
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                return
            await call.write(msg)
    finally:
        call.cancel()


async def fanout_rtt_us(channel: grpc.aio.Channel, peers: int, count: int, warmup: int = 100) -> list[float]:
    """Ask the server to time ``count`` fan-out rounds over ``peers`` joined peers."""
    go = channel.unary_unary(FAN_GO)
    reply = await go(struct.pack("<QQQ", count, warmup, peers), timeout=120)
    return json.loads(reply)["samples_us"]


def connect(address: str) -> grpc.aio.Channel:
    return insecure_channel(address)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0")
    args = ap.parse_args(argv)
    tune_malloc()  # as hmmd does by default (--malloc-keep-mib): the floor stands for its transport
    run_loop(serve(args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
