from hmm.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DmirrorCmd(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DMIRROR_READ: _ClassVar[DmirrorCmd]
    DMIRROR_WRITE: _ClassVar[DmirrorCmd]
    DMIRROR_MIGRATE_TO_DEV: _ClassVar[DmirrorCmd]
    DMIRROR_MIGRATE_TO_SYS: _ClassVar[DmirrorCmd]
    DMIRROR_SNAPSHOT: _ClassVar[DmirrorCmd]
    DMIRROR_EXCLUSIVE: _ClassVar[DmirrorCmd]
    DMIRROR_CHECK_EXCLUSIVE: _ClassVar[DmirrorCmd]
    DMIRROR_RELEASE: _ClassVar[DmirrorCmd]
    DMIRROR_FLAGS: _ClassVar[DmirrorCmd]
DMIRROR_READ: DmirrorCmd
DMIRROR_WRITE: DmirrorCmd
DMIRROR_MIGRATE_TO_DEV: DmirrorCmd
DMIRROR_MIGRATE_TO_SYS: DmirrorCmd
DMIRROR_SNAPSHOT: DmirrorCmd
DMIRROR_EXCLUSIVE: DmirrorCmd
DMIRROR_CHECK_EXCLUSIVE: DmirrorCmd
DMIRROR_RELEASE: DmirrorCmd
DMIRROR_FLAGS: DmirrorCmd

class DmirrorCommand(_message.Message):
    __slots__ = ("file_id", "cmd", "addr", "npages", "data")
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    CMD_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    NPAGES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file_id: int
    cmd: DmirrorCmd
    addr: int
    npages: int
    data: bytes
    def __init__(self, file_id: _Optional[int] = ..., cmd: _Optional[_Union[DmirrorCmd, str]] = ..., addr: _Optional[int] = ..., npages: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class DmirrorReply(_message.Message):
    __slots__ = ("cpages", "faults", "data")
    CPAGES_FIELD_NUMBER: _ClassVar[int]
    FAULTS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    cpages: int
    faults: int
    data: bytes
    def __init__(self, cpages: _Optional[int] = ..., faults: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("file_id", "clear")
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    file_id: int
    clear: bool
    def __init__(self, file_id: _Optional[int] = ..., clear: _Optional[bool] = ...) -> None: ...

class InvalidateRecord(_message.Message):
    __slots__ = ("event", "start", "end", "owner", "cur_seq", "mapped_pages", "snoop_crc32", "snooped")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    CUR_SEQ_FIELD_NUMBER: _ClassVar[int]
    MAPPED_PAGES_FIELD_NUMBER: _ClassVar[int]
    SNOOP_CRC32_FIELD_NUMBER: _ClassVar[int]
    SNOOPED_FIELD_NUMBER: _ClassVar[int]
    event: _common_pb2.Event
    start: int
    end: int
    owner: int
    cur_seq: int
    mapped_pages: int
    snoop_crc32: int
    snooped: bool
    def __init__(self, event: _Optional[_Union[_common_pb2.Event, str]] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., owner: _Optional[int] = ..., cur_seq: _Optional[int] = ..., mapped_pages: _Optional[int] = ..., snoop_crc32: _Optional[int] = ..., snooped: _Optional[bool] = ...) -> None: ...

class EventsReply(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[InvalidateRecord]
    def __init__(self, events: _Optional[_Iterable[_Union[InvalidateRecord, _Mapping]]] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("name", "device_id", "owner", "memory")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    name: str
    device_id: int
    owner: int
    memory: str
    def __init__(self, name: _Optional[str] = ..., device_id: _Optional[int] = ..., owner: _Optional[int] = ..., memory: _Optional[str] = ...) -> None: ...

class DevicesReply(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ...) -> None: ...
