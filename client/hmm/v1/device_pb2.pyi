from hmm.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemoryKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMORY_NONE: _ClassVar[MemoryKind]
    MEMORY_DEVICE_PRIVATE: _ClassVar[MemoryKind]
    MEMORY_DEVICE_COHERENT: _ClassVar[MemoryKind]
MEMORY_NONE: MemoryKind
MEMORY_DEVICE_PRIVATE: MemoryKind
MEMORY_DEVICE_COHERENT: MemoryKind

class DeviceMessage(_message.Message):
    __slots__ = ("hello", "ack")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    ack: Ack
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ...) -> None: ...

class KernelMessage(_message.Message):
    __slots__ = ("id", "welcome", "invalidate", "file_open", "file_release", "migrate_to_ram", "page_free", "detach")
    ID_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    INVALIDATE_FIELD_NUMBER: _ClassVar[int]
    FILE_OPEN_FIELD_NUMBER: _ClassVar[int]
    FILE_RELEASE_FIELD_NUMBER: _ClassVar[int]
    MIGRATE_TO_RAM_FIELD_NUMBER: _ClassVar[int]
    PAGE_FREE_FIELD_NUMBER: _ClassVar[int]
    DETACH_FIELD_NUMBER: _ClassVar[int]
    id: int
    welcome: Welcome
    invalidate: Invalidate
    file_open: FileOpen
    file_release: FileRelease
    migrate_to_ram: MigrateToRam
    page_free: PageFree
    detach: Detach
    def __init__(self, id: _Optional[int] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., invalidate: _Optional[_Union[Invalidate, _Mapping]] = ..., file_open: _Optional[_Union[FileOpen, _Mapping]] = ..., file_release: _Optional[_Union[FileRelease, _Mapping]] = ..., migrate_to_ram: _Optional[_Union[MigrateToRam, _Mapping]] = ..., page_free: _Optional[_Union[PageFree, _Mapping]] = ..., detach: _Optional[_Union[Detach, _Mapping]] = ...) -> None: ...

class Detach(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("version_major", "version_minor", "name", "capabilities", "callback_deadline_ms", "max_message_bytes", "memory", "memory_pages", "shm_bytes", "resume_session")
    VERSION_MAJOR_FIELD_NUMBER: _ClassVar[int]
    VERSION_MINOR_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PAGES_FIELD_NUMBER: _ClassVar[int]
    SHM_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESUME_SESSION_FIELD_NUMBER: _ClassVar[int]
    version_major: int
    version_minor: int
    name: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    callback_deadline_ms: int
    max_message_bytes: int
    memory: MemoryKind
    memory_pages: int
    shm_bytes: int
    resume_session: str
    def __init__(self, version_major: _Optional[int] = ..., version_minor: _Optional[int] = ..., name: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., callback_deadline_ms: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., memory: _Optional[_Union[MemoryKind, str]] = ..., memory_pages: _Optional[int] = ..., shm_bytes: _Optional[int] = ..., resume_session: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_pages_per_request", "callback_deadline_ms", "max_notifiers", "reconnect_grace_ms", "max_requests_in_flight")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_NOTIFIERS_FIELD_NUMBER: _ClassVar[int]
    RECONNECT_GRACE_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_pages_per_request: int
    callback_deadline_ms: int
    max_notifiers: int
    reconnect_grace_ms: int
    max_requests_in_flight: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_pages_per_request: _Optional[int] = ..., callback_deadline_ms: _Optional[int] = ..., max_notifiers: _Optional[int] = ..., reconnect_grace_ms: _Optional[int] = ..., max_requests_in_flight: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("version_major", "version_minor", "device_id", "owner", "session", "capabilities", "limits", "zero_pfn", "system_frames", "device_pfn_base", "device_pfn_count", "shm_path", "shm_bytes", "shm_socket")
    VERSION_MAJOR_FIELD_NUMBER: _ClassVar[int]
    VERSION_MINOR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    ZERO_PFN_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PFN_BASE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PFN_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHM_PATH_FIELD_NUMBER: _ClassVar[int]
    SHM_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_SOCKET_FIELD_NUMBER: _ClassVar[int]
    version_major: int
    version_minor: int
    device_id: int
    owner: int
    session: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    zero_pfn: int
    system_frames: int
    device_pfn_base: int
    device_pfn_count: int
    shm_path: str
    shm_bytes: int
    shm_socket: str
    def __init__(self, version_major: _Optional[int] = ..., version_minor: _Optional[int] = ..., device_id: _Optional[int] = ..., owner: _Optional[int] = ..., session: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., zero_pfn: _Optional[int] = ..., system_frames: _Optional[int] = ..., device_pfn_base: _Optional[int] = ..., device_pfn_count: _Optional[int] = ..., shm_path: _Optional[str] = ..., shm_bytes: _Optional[int] = ..., shm_socket: _Optional[str] = ...) -> None: ...

class Invalidate(_message.Message):
    __slots__ = ("notifier_id", "pid", "start", "end", "event", "owner", "blockable", "cur_seq")
    NOTIFIER_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    BLOCKABLE_FIELD_NUMBER: _ClassVar[int]
    CUR_SEQ_FIELD_NUMBER: _ClassVar[int]
    notifier_id: int
    pid: int
    start: int
    end: int
    event: _common_pb2.Event
    owner: int
    blockable: bool
    cur_seq: int
    def __init__(self, notifier_id: _Optional[int] = ..., pid: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., event: _Optional[_Union[_common_pb2.Event, str]] = ..., owner: _Optional[int] = ..., blockable: _Optional[bool] = ..., cur_seq: _Optional[int] = ...) -> None: ...

class FileOpen(_message.Message):
    __slots__ = ("file_id", "pid")
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    file_id: int
    pid: int
    def __init__(self, file_id: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...

class FileRelease(_message.Message):
    __slots__ = ("file_id", "pid")
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    file_id: int
    pid: int
    def __init__(self, file_id: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...

class MigrateToRam(_message.Message):
    __slots__ = ("pid", "addr", "device_pfn", "fault_token", "migration")
    PID_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PFN_FIELD_NUMBER: _ClassVar[int]
    FAULT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    pid: int
    addr: int
    device_pfn: int
    fault_token: int
    migration: MigrateSetupReply
    def __init__(self, pid: _Optional[int] = ..., addr: _Optional[int] = ..., device_pfn: _Optional[int] = ..., fault_token: _Optional[int] = ..., migration: _Optional[_Union[MigrateSetupReply, _Mapping]] = ...) -> None: ...

class PageFree(_message.Message):
    __slots__ = ("pfns",)
    PFNS_FIELD_NUMBER: _ClassVar[int]
    pfns: bytes
    def __init__(self, pfns: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("id", "ok", "errno", "pages")
    ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERRNO_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    id: int
    ok: bool
    errno: int
    pages: MigratePagesRequest
    def __init__(self, id: _Optional[int] = ..., ok: _Optional[bool] = ..., errno: _Optional[int] = ..., pages: _Optional[_Union[MigratePagesRequest, _Mapping]] = ...) -> None: ...

class InsertNotifierRequest(_message.Message):
    __slots__ = ("pid", "start", "length")
    PID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    pid: int
    start: int
    length: int
    def __init__(self, pid: _Optional[int] = ..., start: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class InsertNotifierReply(_message.Message):
    __slots__ = ("notifier_id", "seq")
    NOTIFIER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    notifier_id: int
    seq: int
    def __init__(self, notifier_id: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class NotifierRef(_message.Message):
    __slots__ = ("notifier_id",)
    NOTIFIER_ID_FIELD_NUMBER: _ClassVar[int]
    notifier_id: int
    def __init__(self, notifier_id: _Optional[int] = ...) -> None: ...

class ReadBeginReply(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class RangeFaultRequest(_message.Message):
    __slots__ = ("notifier_id", "notifier_seq", "start", "end", "default_flags", "pfn_flags_mask", "requests", "dev_private_owner")
    NOTIFIER_ID_FIELD_NUMBER: _ClassVar[int]
    NOTIFIER_SEQ_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FLAGS_FIELD_NUMBER: _ClassVar[int]
    PFN_FLAGS_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DEV_PRIVATE_OWNER_FIELD_NUMBER: _ClassVar[int]
    notifier_id: int
    notifier_seq: int
    start: int
    end: int
    default_flags: int
    pfn_flags_mask: int
    requests: bytes
    dev_private_owner: int
    def __init__(self, notifier_id: _Optional[int] = ..., notifier_seq: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., default_flags: _Optional[int] = ..., pfn_flags_mask: _Optional[int] = ..., requests: _Optional[bytes] = ..., dev_private_owner: _Optional[int] = ...) -> None: ...

class RangeFaultReply(_message.Message):
    __slots__ = ("pfns", "flags", "orders")
    PFNS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    ORDERS_FIELD_NUMBER: _ClassVar[int]
    pfns: bytes
    flags: bytes
    orders: bytes
    def __init__(self, pfns: _Optional[bytes] = ..., flags: _Optional[bytes] = ..., orders: _Optional[bytes] = ...) -> None: ...

class DmaReadRequest(_message.Message):
    __slots__ = ("pfns", "shm_offset")
    PFNS_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    pfns: bytes
    shm_offset: int
    def __init__(self, pfns: _Optional[bytes] = ..., shm_offset: _Optional[int] = ...) -> None: ...

class DmaReadStreamRequest(_message.Message):
    __slots__ = ("pfns", "chunk_pages")
    PFNS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_PAGES_FIELD_NUMBER: _ClassVar[int]
    pfns: bytes
    chunk_pages: int
    def __init__(self, pfns: _Optional[bytes] = ..., chunk_pages: _Optional[int] = ...) -> None: ...

class DmaReadReply(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class DmaWriteRequest(_message.Message):
    __slots__ = ("pfns", "data", "shm_offset")
    PFNS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    pfns: bytes
    data: bytes
    shm_offset: int
    def __init__(self, pfns: _Optional[bytes] = ..., data: _Optional[bytes] = ..., shm_offset: _Optional[int] = ...) -> None: ...

class FindVmaRequest(_message.Message):
    __slots__ = ("pid", "addr")
    PID_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    pid: int
    addr: int
    def __init__(self, pid: _Optional[int] = ..., addr: _Optional[int] = ...) -> None: ...

class FindVmaReply(_message.Message):
    __slots__ = ("start", "end", "vm_flags")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    VM_FLAGS_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    vm_flags: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., vm_flags: _Optional[int] = ...) -> None: ...

class MigrateSetupRequest(_message.Message):
    __slots__ = ("pid", "start", "end", "select", "fault_token", "with_data")
    PID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    SELECT_FIELD_NUMBER: _ClassVar[int]
    FAULT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WITH_DATA_FIELD_NUMBER: _ClassVar[int]
    pid: int
    start: int
    end: int
    select: int
    fault_token: int
    with_data: bool
    def __init__(self, pid: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., select: _Optional[int] = ..., fault_token: _Optional[int] = ..., with_data: _Optional[bool] = ...) -> None: ...

class MigrateSetupReply(_message.Message):
    __slots__ = ("migration_id", "src_pfns", "src_flags", "cpages", "data")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_PFNS_FIELD_NUMBER: _ClassVar[int]
    SRC_FLAGS_FIELD_NUMBER: _ClassVar[int]
    CPAGES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    migration_id: int
    src_pfns: bytes
    src_flags: bytes
    cpages: int
    data: bytes
    def __init__(self, migration_id: _Optional[int] = ..., src_pfns: _Optional[bytes] = ..., src_flags: _Optional[bytes] = ..., cpages: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class MigratePagesRequest(_message.Message):
    __slots__ = ("migration_id", "dst_pfns", "dst_flags", "data", "finalize", "shm_offset", "shm_length", "next")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    DST_PFNS_FIELD_NUMBER: _ClassVar[int]
    DST_FLAGS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FINALIZE_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHM_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    migration_id: int
    dst_pfns: bytes
    dst_flags: bytes
    data: bytes
    finalize: bool
    shm_offset: int
    shm_length: int
    next: MigrateSetupRequest
    def __init__(self, migration_id: _Optional[int] = ..., dst_pfns: _Optional[bytes] = ..., dst_flags: _Optional[bytes] = ..., data: _Optional[bytes] = ..., finalize: _Optional[bool] = ..., shm_offset: _Optional[int] = ..., shm_length: _Optional[int] = ..., next: _Optional[_Union[MigrateSetupRequest, _Mapping]] = ...) -> None: ...

class EvictSetupRequest(_message.Message):
    __slots__ = ("start_pfn", "npages")
    START_PFN_FIELD_NUMBER: _ClassVar[int]
    NPAGES_FIELD_NUMBER: _ClassVar[int]
    start_pfn: int
    npages: int
    def __init__(self, start_pfn: _Optional[int] = ..., npages: _Optional[int] = ...) -> None: ...

class MigrationRef(_message.Message):
    __slots__ = ("migration_id",)
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: int
    def __init__(self, migration_id: _Optional[int] = ...) -> None: ...

class MigrateReply(_message.Message):
    __slots__ = ("src_flags", "next", "data", "next_errno", "next_error")
    SRC_FLAGS_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    NEXT_ERRNO_FIELD_NUMBER: _ClassVar[int]
    NEXT_ERROR_FIELD_NUMBER: _ClassVar[int]
    src_flags: bytes
    next: MigrateSetupReply
    data: bytes
    next_errno: int
    next_error: str
    def __init__(self, src_flags: _Optional[bytes] = ..., next: _Optional[_Union[MigrateSetupReply, _Mapping]] = ..., data: _Optional[bytes] = ..., next_errno: _Optional[int] = ..., next_error: _Optional[str] = ...) -> None: ...

class MakeExclusiveRequest(_message.Message):
    __slots__ = ("pid", "start", "npages", "with_owner")
    PID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    NPAGES_FIELD_NUMBER: _ClassVar[int]
    WITH_OWNER_FIELD_NUMBER: _ClassVar[int]
    pid: int
    start: int
    npages: int
    with_owner: bool
    def __init__(self, pid: _Optional[int] = ..., start: _Optional[int] = ..., npages: _Optional[int] = ..., with_owner: _Optional[bool] = ...) -> None: ...

class MakeExclusiveReply(_message.Message):
    __slots__ = ("pfns",)
    PFNS_FIELD_NUMBER: _ClassVar[int]
    pfns: bytes
    def __init__(self, pfns: _Optional[bytes] = ...) -> None: ...

class UnlockPagesRequest(_message.Message):
    __slots__ = ("pfns",)
    PFNS_FIELD_NUMBER: _ClassVar[int]
    pfns: bytes
    def __init__(self, pfns: _Optional[bytes] = ...) -> None: ...
