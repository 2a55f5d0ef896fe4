"""A driver that records the invalidations it gets, for end-to-end tests that check
what a device hears: ``Recorder(record)`` keeps ``record(mirror, range)`` of each
one (by default (event, start, end)) and acks it; with ``hold`` set it waits for
that event first. ``recording_device`` connects one to a daemon."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from hmm.device import DeviceConnection, Driver
from hmm.mirror import InvalidateRange, Mirror


def event_range(_: Mirror, rng: InvalidateRange) -> tuple[Any, ...]:
    return (rng.event, rng.start, rng.end)


class Recorder(Driver):
    def __init__(self, record: Callable[[Mirror, InvalidateRange], Any] = event_range) -> None:
        self.record = record
        self.events: list[Any] = []
        self.hold: asyncio.Event | None = None

    async def invalidate(self, mirror: Mirror, rng: InvalidateRange) -> bool:
        self.events.append(self.record(mirror, rng))
        if self.hold is not None:
            await self.hold.wait()
        return True

    def take(self) -> list[Any]:
        """What was recorded so far; clears the record."""
        out, self.events = self.events, []
        return out


@asynccontextmanager
async def recording_device(address: str, prefix: str, recorder: Recorder) -> AsyncIterator[DeviceConnection]:
    """A device named ``prefix_<random>`` driven by ``recorder``, closed at the end."""
    conn = await DeviceConnection.connect(address, f"{prefix}_{uuid.uuid4().hex[:8]}", recorder)
    try:
        yield conn
    finally:
        await conn.close()
