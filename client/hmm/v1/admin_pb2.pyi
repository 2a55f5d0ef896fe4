from hmm.v1 import process_pb2 as _process_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
    __slots__ = ("device_id", "name", "alive", "fenced_reason", "owner", "notifiers", "invalidations", "range_faults", "violations", "invalidate_latency", "memory", "memory_pages", "memory_used_pages", "migrations_open")
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
    def __init__(self, device_id: _Optional[int] = ..., name: _Optional[str] = ..., alive: _Optional[bool] = ..., fenced_reason: _Optional[str] = ..., owner: _Optional[int] = ..., notifiers: _Optional[int] = ..., invalidations: _Optional[int] = ..., range_faults: _Optional[int] = ..., violations: _Optional[int] = ..., invalidate_latency: _Optional[_Union[LatencySummary, _Mapping]] = ..., memory: _Optional[str] = ..., memory_pages: _Optional[int] = ..., memory_used_pages: _Optional[int] = ..., migrations_open: _Optional[int] = ...) -> None: ...

class KernelStats(_message.Message):
    __slots__ = ("ram_frames", "ram_used_frames", "processes", "devices", "window_latency")
    RAM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    RAM_USED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_LATENCY_FIELD_NUMBER: _ClassVar[int]
    ram_frames: int
    ram_used_frames: int
    processes: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceStats]
    window_latency: LatencySummary
    def __init__(self, ram_frames: _Optional[int] = ..., ram_used_frames: _Optional[int] = ..., processes: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceStats, _Mapping]]] = ..., window_latency: _Optional[_Union[LatencySummary, _Mapping]] = ...) -> None: ...
