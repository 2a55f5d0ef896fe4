"""Messages with a bulk ``bytes`` field (page contents), moved with fewer copies.

Through protobuf, page contents are copied into the message and again into its
serialization on the way out, and twice more on the way in (parsing, then reading
the field). Here the bulk field is kept beside the message instead: it is appended to
the message's own serialization in one ``join`` straight from the caller's buffers
(views of page frames), and on receipt it is cut out of the received bytes as a
``memoryview``, the rest parsed as usual. The wire format is plain protobuf: a
field may come anywhere in a message and, when repeated, the last one counts, so
any other implementation reads and writes these messages unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from hmm.v1 import device_pb2 as pb

Buffer = bytes | memoryview | np.ndarray
_LEN = 2  # wire type of length-delimited fields
MAX_FIELDS = 64  # fields split() walks before leaving a message to protobuf

# The Device service's messages that carry page contents, in their field `data`.
DEVICE_SERVICE = pb.DESCRIPTOR.services_by_name["Device"]
BULK_REQUESTS: dict[str, type[Message]] = {"DmaWrite": pb.DmaWriteRequest, "MigratePages": pb.MigratePagesRequest,
                                            "MigratePagesStream": pb.MigratePagesRequest}
BULK_REPLIES: dict[str, type[Message]] = {"DmaRead": pb.DmaReadReply, "DmaReadStream": pb.DmaReadReply,
                                           "MigrateSetup": pb.MigrateSetupReply, "MigratePages": pb.MigrateReply,
                                           "MigratePagesStream": pb.MigrateReply}


class Bulk:
    """A message whose bulk field ``data`` travels beside it. Other attributes are
    the message's (``bulk.pfns``, ``bulk.HasField(...)``); ``data`` is what the
    field holds: a memoryview into the received bytes, or the buffer being sent."""

    __slots__ = ("msg", "data")

    def __init__(self, msg: Message, data: Buffer = b"") -> None:
        self.msg = msg
        self.data = data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.msg, name)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode(msg: Message, chunks: Sequence[Buffer]) -> bytes:
    """``msg`` serialized with its bulk field (``data``, which must be empty in
    ``msg``) holding the concatenation of ``chunks``: one copy of the contents."""
    views = [(np.ascontiguousarray(c).data if isinstance(c, np.ndarray) else memoryview(c)).cast("B") for c in chunks]
    return b"".join([msg.SerializeToString(), _varint(data_field(type(msg)) << 3 | _LEN),
                     _varint(sum(len(v) for v in views)), *views])


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]  # IndexError when truncated
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def split(buf: bytes, field: int) -> tuple[bytes, memoryview | None]:
    """Cut length-delimited ``field`` out of the serialized message ``buf``: the
    other fields' bytes, and a view of the field's last occurrence (None when it
    does not occur). Anything malformed comes back whole, with None, for the
    protobuf parser to judge; so does a message of more than MAX_FIELDS fields
    (ours have a handful), which this Python loop would be slow to walk."""
    view = memoryview(buf)
    keep: list[memoryview] = []
    data: memoryview | None = None
    i = kept = 0
    n = len(buf)
    try:
        for _ in range(MAX_FIELDS + 1):
            if i >= n:
                break
            start = i
            key, i = _read_varint(buf, i)
            wire = key & 7
            if wire == 0:
                _, i = _read_varint(buf, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == _LEN:
                length, i = _read_varint(buf, i)
                if key >> 3 == field and i + length <= n:
                    data = view[i:i + length]
                    keep.append(view[kept:start])
                    kept = i + length
                i += length
            else:  # groups: not in our protocol
                return buf, None
            if i > n:
                return buf, None
        else:
            return buf, None
    except (IndexError, ValueError):
        return buf, None
    if data is None:
        return buf, None
    keep.append(view[kept:])
    return b"".join(keep), data


def serialize(obj: Message | Bulk | bytes) -> bytes:
    """gRPC serializer for a message type with a bulk field: takes a Bulk (its data
    appended in one copy), a plain message, or bytes already made by ``encode``."""
    if isinstance(obj, bytes):
        return obj
    if isinstance(obj, Bulk):
        return encode(obj.msg, [obj.data])
    return obj.SerializeToString()  # type: ignore[no-any-return]


def parser(cls: type[Message]) -> Callable[[bytes], Bulk]:
    """A gRPC deserializer giving a Bulk of ``cls``, its ``data`` a view of the
    received bytes (no copy)."""
    field = data_field(cls)

    def parse(buf: bytes) -> Bulk:
        rest, data = split(buf, field)
        if data is None:  # absent, or malformed: FromString says so
            msg = cls.FromString(buf)
            return Bulk(msg, memoryview(msg.data))  # type: ignore[attr-defined]
        return Bulk(cls.FromString(rest), data)

    return parse


def data_field(cls: type[Message]) -> int:
    """The number of ``cls``'s bulk field, ``data``."""
    return cls.DESCRIPTOR.fields_by_name["data"].number  # type: ignore[no-any-return]


def install(stub: Any, channel: grpc.aio.Channel) -> None:
    """Give a Device stub the bulk codecs: the methods of BULK_REQUESTS take a Bulk
    (or a plain message), those of BULK_REPLIES answer with a Bulk."""
    for name in (*BULK_REQUESTS, *BULK_REPLIES):
        method = DEVICE_SERVICE.methods_by_name[name]
        req, rep = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                (True, False): channel.stream_unary}[method.client_streaming, method.server_streaming]
        setattr(stub, name, kind(
            f"/{DEVICE_SERVICE.full_name}/{name}",
            request_serializer=serialize if name in BULK_REQUESTS else req.SerializeToString,
            response_deserializer=parser(rep) if name in BULK_REPLIES else rep.FromString))


def server_handlers(handlers: dict[str, grpc.RpcMethodHandler]) -> dict[str, grpc.RpcMethodHandler]:
    """The Device service's method handlers with the bulk codecs: the servicer gets
    a Bulk for the methods of BULK_REQUESTS and may answer those of BULK_REPLIES
    with bytes made by ``encode``."""
    out = dict(handlers)
    for name, cls in BULK_REQUESTS.items():
        out[name] = out[name]._replace(request_deserializer=parser(cls))  # type: ignore[attr-defined]
    for name in BULK_REPLIES:
        out[name] = out[name]._replace(response_serializer=serialize)  # type: ignore[attr-defined]
    return out
