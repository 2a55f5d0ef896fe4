from hmm.v1 import process_pb2 as _process_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TraceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRACE_KIND_UNSPECIFIED: _ClassVar[TraceKind]
    TRACE_INVALIDATE: _ClassVar[TraceKind]
    TRACE_RANGE_FAULT: _ClassVar[TraceKind]
    TRACE_MIGRATE: _ClassVar[TraceKind]
    TRACE_MIGRATE_TO_RAM: _ClassVar[TraceKind]
    TRACE_EVICT: _ClassVar[TraceKind]
    TRACE_FENCE: _ClassVar[TraceKind]
    TRACE_SYSCALL: _ClassVar[TraceKind]
    TRACE_WINDOW: _ClassVar[TraceKind]
TRACE_KIND_UNSPECIFIED: TraceKind
TRACE_INVALIDATE: TraceKind
TRACE_RANGE_FAULT: TraceKind
TRACE_MIGRATE: TraceKind
TRACE_MIGRATE_TO_RAM: TraceKind
TRACE_EVICT: TraceKind
TRACE_FENCE: TraceKind
TRACE_SYSCALL: TraceKind
TRACE_WINDOW: TraceKind

class CompactRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CompactReply(_message.Message):
    __slots__ = ("pages_moved",)
    PAGES_MOVED_FIELD_NUMBER: _ClassVar[int]
    pages_moved: int
    def __init__(self, pages_moved: _Optional[int] = ...) -> None: ...

class InvariantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InvariantReport(_message.Message):
    __slots__ = ("violations",)
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    violations: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, violations: _Optional[_Iterable[str]] = ...) -> None: ...

class FaultPlan(_message.Message):
    __slots__ = ("ack_delay_ms", "drop_acks", "stream_delay_ms", "fail_alloc", "fail_dma")
    ACK_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    DROP_ACKS_FIELD_NUMBER: _ClassVar[int]
    STREAM_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    FAIL_ALLOC_FIELD_NUMBER: _ClassVar[int]
    FAIL_DMA_FIELD_NUMBER: _ClassVar[int]
    ack_delay_ms: int
    drop_acks: int
    stream_delay_ms: int
    fail_alloc: int
    fail_dma: int
    def __init__(self, ack_delay_ms: _Optional[int] = ..., drop_acks: _Optional[int] = ..., stream_delay_ms: _Optional[int] = ..., fail_alloc: _Optional[int] = ..., fail_dma: _Optional[int] = ...) -> None: ...

class InjectFaultsRequest(_message.Message):
    __slots__ = ("device", "ack_delay_ms", "drop_acks", "stream_delay_ms", "fail_alloc", "fail_dma", "disconnect")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ACK_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    DROP_ACKS_FIELD_NUMBER: _ClassVar[int]
    STREAM_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    FAIL_ALLOC_FIELD_NUMBER: _ClassVar[int]
    FAIL_DMA_FIELD_NUMBER: _ClassVar[int]
    DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    device: str
    ack_delay_ms: int
    drop_acks: int
    stream_delay_ms: int
    fail_alloc: int
    fail_dma: int
    disconnect: bool
    def __init__(self, device: _Optional[str] = ..., ack_delay_ms: _Optional[int] = ..., drop_acks: _Optional[int] = ..., stream_delay_ms: _Optional[int] = ..., fail_alloc: _Optional[int] = ..., fail_dma: _Optional[int] = ..., disconnect: _Optional[bool] = ...) -> None: ...

class ProcessList(_message.Message):
    __slots__ = ("processes",)
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[_process_pb2.ProcessStatus]
    def __init__(self, processes: _Optional[_Iterable[_Union[_process_pb2.ProcessStatus, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("reset_latencies",)
    RESET_LATENCIES_FIELD_NUMBER: _ClassVar[int]
    reset_latencies: bool
    def __init__(self, reset_latencies: _Optional[bool] = ...) -> None: ...

class LatencySummary(_message.Message):
    __slots__ = ("count", "p50_us", "p99_us", "max_us")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    P50_US_FIELD_NUMBER: _ClassVar[int]
    P99_US_FIELD_NUMBER: _ClassVar[int]
    MAX_US_FIELD_NUMBER: _ClassVar[int]
    count: int
    p50_us: float
    p99_us: float
    max_us: float
    def __init__(self, count: _Optional[int] = ..., p50_us: _Optional[float] = ..., p99_us: _Optional[float] = ..., max_us: _Optional[float] = ...) -> None: ...

class DeviceStats(_message.Message):
    __slots__ = ("device_id", "name", "alive", "fenced_reason", "owner", "notifiers", "invalidations", "range_faults", "violations", "invalidate_latency", "memory", "memory_pages", "memory_used_pages", "migrations_open", "memory_pfn_base", "migrate_to_ram_latency")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    FENCED_REASON_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    NOTIFIERS_FIELD_NUMBER: _ClassVar[int]
    INVALIDATIONS_FIELD_NUMBER: _ClassVar[int]
    RANGE_FAULTS_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    INVALIDATE_LATENCY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PAGES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_PAGES_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_OPEN_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PFN_BASE_FIELD_NUMBER: _ClassVar[int]
    MIGRATE_TO_RAM_LATENCY_FIELD_NUMBER: _ClassVar[int]
    device_id: int
    name: str
    alive: bool
    fenced_reason: str
    owner: int
    notifiers: int
    invalidations: int
    range_faults: int
    violations: int
    invalidate_latency: LatencySummary
    memory: str
    memory_pages: int
    memory_used_pages: int
    migrations_open: int
    memory_pfn_base: int
    migrate_to_ram_latency: LatencySummary
    def __init__(self, device_id: _Optional[int] = ..., name: _Optional[str] = ..., alive: _Optional[bool] = ..., fenced_reason: _Optional[str] = ..., owner: _Optional[int] = ..., notifiers: _Optional[int] = ..., invalidations: _Optional[int] = ..., range_faults: _Optional[int] = ..., violations: _Optional[int] = ..., invalidate_latency: _Optional[_Union[LatencySummary, _Mapping]] = ..., memory: _Optional[str] = ..., memory_pages: _Optional[int] = ..., memory_used_pages: _Optional[int] = ..., migrations_open: _Optional[int] = ..., memory_pfn_base: _Optional[int] = ..., migrate_to_ram_latency: _Optional[_Union[LatencySummary, _Mapping]] = ...) -> None: ...

class KernelStats(_message.Message):
    __slots__ = ("ram_frames", "ram_used_frames", "processes", "devices", "window_latency", "hugetlb_pages", "hugetlb_free", "hugetlb_reserved", "swap_pages", "swap_used_pages", "reclaim_stalls", "reclaimed_pages", "oom_kills")
    RAM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    RAM_USED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_LATENCY_FIELD_NUMBER: _ClassVar[int]
    HUGETLB_PAGES_FIELD_NUMBER: _ClassVar[int]
    HUGETLB_FREE_FIELD_NUMBER: _ClassVar[int]
    HUGETLB_RESERVED_FIELD_NUMBER: _ClassVar[int]
    SWAP_PAGES_FIELD_NUMBER: _ClassVar[int]
    SWAP_USED_PAGES_FIELD_NUMBER: _ClassVar[int]
    RECLAIM_STALLS_FIELD_NUMBER: _ClassVar[int]
    RECLAIMED_PAGES_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLS_FIELD_NUMBER: _ClassVar[int]
    ram_frames: int
    ram_used_frames: int
    processes: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceStats]
    window_latency: LatencySummary
    hugetlb_pages: int
    hugetlb_free: int
    hugetlb_reserved: int
    swap_pages: int
    swap_used_pages: int
    reclaim_stalls: int
    reclaimed_pages: int
    oom_kills: int
    def __init__(self, ram_frames: _Optional[int] = ..., ram_used_frames: _Optional[int] = ..., processes: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceStats, _Mapping]]] = ..., window_latency: _Optional[_Union[LatencySummary, _Mapping]] = ..., hugetlb_pages: _Optional[int] = ..., hugetlb_free: _Optional[int] = ..., hugetlb_reserved: _Optional[int] = ..., swap_pages: _Optional[int] = ..., swap_used_pages: _Optional[int] = ..., reclaim_stalls: _Optional[int] = ..., reclaimed_pages: _Optional[int] = ..., oom_kills: _Optional[int] = ...) -> None: ...

class NotifiersRequest(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class NotifierInfo(_message.Message):
    __slots__ = ("notifier_id", "device_id", "device_name", "pid", "start", "last", "seq", "mm_seq", "state")
    NOTIFIER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MM_SEQ_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    notifier_id: int
    device_id: int
    device_name: str
    pid: int
    start: int
    last: int
    seq: int
    mm_seq: int
    state: str
    def __init__(self, notifier_id: _Optional[int] = ..., device_id: _Optional[int] = ..., device_name: _Optional[str] = ..., pid: _Optional[int] = ..., start: _Optional[int] = ..., last: _Optional[int] = ..., seq: _Optional[int] = ..., mm_seq: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class NotifierList(_message.Message):
    __slots__ = ("notifiers",)
    NOTIFIERS_FIELD_NUMBER: _ClassVar[int]
    notifiers: _containers.RepeatedCompositeFieldContainer[NotifierInfo]
    def __init__(self, notifiers: _Optional[_Iterable[_Union[NotifierInfo, _Mapping]]] = ...) -> None: ...

class TraceBufferRequest(_message.Message):
    __slots__ = ("clear",)
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    clear: bool
    def __init__(self, clear: _Optional[bool] = ...) -> None: ...

class TraceStreamRequest(_message.Message):
    __slots__ = ("queue_size",)
    QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_size: int
    def __init__(self, queue_size: _Optional[int] = ...) -> None: ...

class TraceEvent(_message.Message):
    __slots__ = ("kind", "seq", "ts_ns", "dur_ns", "device_id", "device_name", "pid", "process_name", "start", "end", "npages", "nbytes", "errno", "ok", "event", "owner", "notifier_id", "cur_seq", "syscall", "direction", "rollback", "reason", "count")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TS_NS_FIELD_NUMBER: _ClassVar[int]
    DUR_NS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PROCESS_NAME_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    NPAGES_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ERRNO_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    NOTIFIER_ID_FIELD_NUMBER: _ClassVar[int]
    CUR_SEQ_FIELD_NUMBER: _ClassVar[int]
    SYSCALL_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    kind: TraceKind
    seq: int
    ts_ns: int
    dur_ns: int
    device_id: int
    device_name: str
    pid: int
    process_name: str
    start: int
    end: int
    npages: int
    nbytes: int
    errno: int
    ok: bool
    event: str
    owner: int
    notifier_id: int
    cur_seq: int
    syscall: str
    direction: str
    rollback: bool
    reason: str
    count: int
    def __init__(self, kind: _Optional[_Union[TraceKind, str]] = ..., seq: _Optional[int] = ..., ts_ns: _Optional[int] = ..., dur_ns: _Optional[int] = ..., device_id: _Optional[int] = ..., device_name: _Optional[str] = ..., pid: _Optional[int] = ..., process_name: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., npages: _Optional[int] = ..., nbytes: _Optional[int] = ..., errno: _Optional[int] = ..., ok: _Optional[bool] = ..., event: _Optional[str] = ..., owner: _Optional[int] = ..., notifier_id: _Optional[int] = ..., cur_seq: _Optional[int] = ..., syscall: _Optional[str] = ..., direction: _Optional[str] = ..., rollback: _Optional[bool] = ..., reason: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class TraceBatch(_message.Message):
    __slots__ = ("events", "dropped")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[TraceEvent]
    dropped: int
    def __init__(self, events: _Optional[_Iterable[_Union[TraceEvent, _Mapping]]] = ..., dropped: _Optional[int] = ...) -> None: ...
