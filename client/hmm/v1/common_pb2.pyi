from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class Event(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_UNMAP: _ClassVar[Event]
    EVENT_CLEAR: _ClassVar[Event]
    EVENT_PROTECTION_VMA: _ClassVar[Event]
    EVENT_PROTECTION_PAGE: _ClassVar[Event]
    EVENT_SOFT_DIRTY: _ClassVar[Event]
    EVENT_RELEASE: _ClassVar[Event]
    EVENT_MIGRATE: _ClassVar[Event]
    EVENT_EXCLUSIVE: _ClassVar[Event]
EVENT_UNMAP: Event
EVENT_CLEAR: Event
EVENT_PROTECTION_VMA: Event
EVENT_PROTECTION_PAGE: Event
EVENT_SOFT_DIRTY: Event
EVENT_RELEASE: Event
EVENT_MIGRATE: Event
EVENT_EXCLUSIVE: Event

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
