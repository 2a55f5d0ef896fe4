"""hmm.bulk: messages with page contents beside them read and write as plain protobuf."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from hmm import bulk
from hmm.v1 import device_pb2 as pb

P = 4096


def pages(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n * P, dtype=np.uint8).tobytes()


def test_encode_reads_as_the_message_protobuf_would_make() -> None:
    data = pages(3)
    frames = np.frombuffer(data, dtype=np.uint8).reshape(3, P)
    head = pb.MigrateSetupReply(migration_id=7, src_pfns=b"\x01" * 24, src_flags=b"\x03\x03\x01", cpages=2)
    wire = bulk.encode(head, [frames[:2], frames[2:]])  # two runs of frames, one message
    whole = pb.MigrateSetupReply.FromString(wire)
    assert whole.data == data and whole.migration_id == 7 and whole.cpages == 2 and whole.src_flags == b"\x03\x03\x01"
    expected = pb.MigrateSetupReply(migration_id=7, src_pfns=b"\x01" * 24, src_flags=b"\x03\x03\x01", cpages=2,
                                    data=data)
    assert whole == expected


def test_parse_cuts_the_field_out_without_copying_it() -> None:
    data = pages(2)
    wire = pb.MigratePagesRequest(migration_id=3, dst_pfns=b"\x00" * 16, dst_flags=b"\x41\x41", data=data,
                                  finalize=True, shm_length=5).SerializeToString()  # data in the middle
    got = bulk.parser(pb.MigratePagesRequest)(wire)
    assert isinstance(got.data, memoryview) and got.data.obj is wire  # a view of the received bytes
    assert got.data == data
    assert got.msg.data == b"" and got.migration_id == 3 and got.finalize and got.shm_length == 5
    assert got.dst_flags == b"\x41\x41" and not got.HasField("shm_offset")


def test_parse_takes_the_last_occurrence_like_protobuf() -> None:
    first, last = pb.DmaWriteRequest(data=b"a" * P).SerializeToString(), \
        pb.DmaWriteRequest(pfns=b"\x05" + bytes(7), data=b"b" * P).SerializeToString()
    wire = first + last  # concatenated messages merge; the last bytes field wins
    got = bulk.parser(pb.DmaWriteRequest)(wire)
    assert got.data == pb.DmaWriteRequest.FromString(wire).data == b"b" * P
    assert got.pfns == b"\x05" + bytes(7)


def test_absent_field_is_an_empty_view() -> None:
    got = bulk.parser(pb.DmaReadReply)(b"")
    assert got.data == b"" and len(got.data) == 0
    got = bulk.parser(pb.DmaWriteRequest)(pb.DmaWriteRequest(pfns=bytes(8)).SerializeToString())
    assert got.data == b"" and got.pfns == bytes(8)


@pytest.mark.parametrize("wire", [
    b"\x0a\x10abc",  # a length past the end
    b"\x12\x05ab",  # the bulk field truncated
    b"\x80",  # a key cut short
    b"\x0b\x10\x01",  # an unterminated group (groups are not in the protocol)
    b"\x12" + b"\xff" * 11,  # a varint too long
])
def test_malformed_input_is_left_to_protobuf(wire: bytes) -> None:
    rest, data = bulk.split(wire, 2)
    assert rest is wire and data is None
    with pytest.raises(DecodeError):
        bulk.parser(pb.DmaWriteRequest)(wire)


def test_serialize_takes_a_bulk_a_message_or_encoded_bytes() -> None:
    msg = pb.DmaWriteRequest(pfns=bytes(8))
    data = pages(1)
    assert pb.DmaWriteRequest.FromString(bulk.serialize(bulk.Bulk(msg, np.frombuffer(data, np.uint8)))).data == data
    assert bulk.serialize(msg) == msg.SerializeToString()
    encoded = bulk.encode(pb.DmaReadReply(), [data])
    assert bulk.serialize(encoded) is encoded


def test_a_message_of_many_fields_is_left_to_protobuf() -> None:
    many = pb.DmaWriteRequest(pfns=bytes(8)).SerializeToString() * (bulk.MAX_FIELDS + 1)  # repeated, merged
    wire = many + pb.DmaWriteRequest(data=b"c" * P).SerializeToString()
    assert bulk.split(wire, 2) == (wire, None)  # not walked in Python
    got = bulk.parser(pb.DmaWriteRequest)(wire)
    assert got.data == b"c" * P and got.pfns == bytes(8)
    few = pb.DmaWriteRequest(pfns=bytes(8)).SerializeToString() * (bulk.MAX_FIELDS - 1) + \
        pb.DmaWriteRequest(data=b"c" * P).SerializeToString()
    assert bulk.split(few, 2)[1] == b"c" * P
