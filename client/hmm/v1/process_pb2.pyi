from hmm.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SpawnRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ProcessRef(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class OomScoreAdjRequest(_message.Message):
    __slots__ = ("pid", "oom_score_adj")
    PID_FIELD_NUMBER: _ClassVar[int]
    OOM_SCORE_ADJ_FIELD_NUMBER: _ClassVar[int]
    pid: int
    oom_score_adj: int
    def __init__(self, pid: _Optional[int] = ..., oom_score_adj: _Optional[int] = ...) -> None: ...

class OomKillReply(_message.Message):
    __slots__ = ("reaped", "passes", "pages_reaped")
    REAPED_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    PAGES_REAPED_FIELD_NUMBER: _ClassVar[int]
    reaped: bool
    passes: int
    pages_reaped: int
    def __init__(self, reaped: _Optional[bool] = ..., passes: _Optional[int] = ..., pages_reaped: _Optional[int] = ...) -> None: ...

class MmapRequest(_message.Message):
    __slots__ = ("pid", "addr", "length", "prot", "flags", "fd", "offset")
    PID_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROT_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    pid: int
    addr: int
    length: int
    prot: int
    flags: int
    fd: int
    offset: int
    def __init__(self, pid: _Optional[int] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ..., prot: _Optional[int] = ..., flags: _Optional[int] = ..., fd: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class MmapReply(_message.Message):
    __slots__ = ("addr",)
    ADDR_FIELD_NUMBER: _ClassVar[int]
    addr: int
    def __init__(self, addr: _Optional[int] = ...) -> None: ...

class RangeRequest(_message.Message):
    __slots__ = ("pid", "addr", "length")
    PID_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    pid: int
    addr: int
    length: int
    def __init__(self, pid: _Optional[int] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class MprotectRequest(_message.Message):
    __slots__ = ("pid", "addr", "length", "prot")
    PID_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROT_FIELD_NUMBER: _ClassVar[int]
    pid: int
    addr: int
    length: int
    prot: int
    def __init__(self, pid: _Optional[int] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ..., prot: _Optional[int] = ...) -> None: ...

class MadviseRequest(_message.Message):
    __slots__ = ("pid", "addr", "length", "advice")
    PID_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    pid: int
    addr: int
    length: int
    advice: int
    def __init__(self, pid: _Optional[int] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ..., advice: _Optional[int] = ...) -> None: ...

class MremapRequest(_message.Message):
    __slots__ = ("pid", "old_addr", "old_length", "new_length", "flags", "new_addr")
    PID_FIELD_NUMBER: _ClassVar[int]
    OLD_ADDR_FIELD_NUMBER: _ClassVar[int]
    OLD_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NEW_LENGTH_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    NEW_ADDR_FIELD_NUMBER: _ClassVar[int]
    pid: int
    old_addr: int
    old_length: int
    new_length: int
    flags: int
    new_addr: int
    def __init__(self, pid: _Optional[int] = ..., old_addr: _Optional[int] = ..., old_length: _Optional[int] = ..., new_length: _Optional[int] = ..., flags: _Optional[int] = ..., new_addr: _Optional[int] = ...) -> None: ...

class ClearRefsRequest(_message.Message):
    __slots__ = ("pid", "value")
    PID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    pid: int
    value: int
    def __init__(self, pid: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("pid", "addr", "length")
    PID_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    pid: int
    addr: int
    length: int
    def __init__(self, pid: _Optional[int] = ..., addr: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class ReadReply(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class WriteRequest(_message.Message):
    __slots__ = ("pid", "addr", "data")
    PID_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    pid: int
    addr: int
    data: bytes
    def __init__(self, pid: _Optional[int] = ..., addr: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class OpenRequest(_message.Message):
    __slots__ = ("pid", "path", "flags")
    PID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    path: str
    flags: int
    def __init__(self, pid: _Optional[int] = ..., path: _Optional[str] = ..., flags: _Optional[int] = ...) -> None: ...

class OpenReply(_message.Message):
    __slots__ = ("fd", "file_id")
    FD_FIELD_NUMBER: _ClassVar[int]
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    fd: int
    file_id: int
    def __init__(self, fd: _Optional[int] = ..., file_id: _Optional[int] = ...) -> None: ...

class FdRequest(_message.Message):
    __slots__ = ("pid", "fd")
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    pid: int
    fd: int
    def __init__(self, pid: _Optional[int] = ..., fd: _Optional[int] = ...) -> None: ...

class PreadRequest(_message.Message):
    __slots__ = ("pid", "fd", "offset", "length")
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    pid: int
    fd: int
    offset: int
    length: int
    def __init__(self, pid: _Optional[int] = ..., fd: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class PwriteRequest(_message.Message):
    __slots__ = ("pid", "fd", "offset", "data")
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    pid: int
    fd: int
    offset: int
    data: bytes
    def __init__(self, pid: _Optional[int] = ..., fd: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class FtruncateRequest(_message.Message):
    __slots__ = ("pid", "fd", "length")
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    pid: int
    fd: int
    length: int
    def __init__(self, pid: _Optional[int] = ..., fd: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class Mapping(_message.Message):
    __slots__ = ("start", "end", "perms", "offset", "path", "flags")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PERMS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    perms: str
    offset: int
    path: str
    flags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., perms: _Optional[str] = ..., offset: _Optional[int] = ..., path: _Optional[str] = ..., flags: _Optional[_Iterable[str]] = ...) -> None: ...

class ProcessStatus(_message.Message):
    __slots__ = ("pid", "parent", "name", "alive", "rss_anon", "rss_file", "rss_shmem", "rss_peak", "maps", "swap", "hugetlb_pages", "oom_score_adj")
    PID_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    RSS_ANON_FIELD_NUMBER: _ClassVar[int]
    RSS_FILE_FIELD_NUMBER: _ClassVar[int]
    RSS_SHMEM_FIELD_NUMBER: _ClassVar[int]
    RSS_PEAK_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    SWAP_FIELD_NUMBER: _ClassVar[int]
    HUGETLB_PAGES_FIELD_NUMBER: _ClassVar[int]
    OOM_SCORE_ADJ_FIELD_NUMBER: _ClassVar[int]
    pid: int
    parent: int
    name: str
    alive: bool
    rss_anon: int
    rss_file: int
    rss_shmem: int
    rss_peak: int
    maps: _containers.RepeatedCompositeFieldContainer[Mapping]
    swap: int
    hugetlb_pages: int
    oom_score_adj: int
    def __init__(self, pid: _Optional[int] = ..., parent: _Optional[int] = ..., name: _Optional[str] = ..., alive: _Optional[bool] = ..., rss_anon: _Optional[int] = ..., rss_file: _Optional[int] = ..., rss_shmem: _Optional[int] = ..., rss_peak: _Optional[int] = ..., maps: _Optional[_Iterable[_Union[Mapping, _Mapping]]] = ..., swap: _Optional[int] = ..., hugetlb_pages: _Optional[int] = ..., oom_score_adj: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("pid", "addr", "npages", "write", "longterm", "hold")
    PID_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    NPAGES_FIELD_NUMBER: _ClassVar[int]
    WRITE_FIELD_NUMBER: _ClassVar[int]
    LONGTERM_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    pid: int
    addr: int
    npages: int
    write: bool
    longterm: bool
    hold: bool
    def __init__(self, pid: _Optional[int] = ..., addr: _Optional[int] = ..., npages: _Optional[int] = ..., write: _Optional[bool] = ..., longterm: _Optional[bool] = ..., hold: _Optional[bool] = ...) -> None: ...

class PinReply(_message.Message):
    __slots__ = ("pin_id",)
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    pin_id: int
    def __init__(self, pin_id: _Optional[int] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("pid", "pin_id")
    PID_FIELD_NUMBER: _ClassVar[int]
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    pin_id: int
    def __init__(self, pid: _Optional[int] = ..., pin_id: _Optional[int] = ...) -> None: ...

class PagemapReply(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: bytes
    def __init__(self, entries: _Optional[bytes] = ...) -> None: ...
