"""A readers/writer lock for asyncio: the mmap lock (struct rw_semaphore).

Writers are preferred: once a writer waits, new readers queue behind it, as the
kernel's rwsem hands the lock over to a waiting writer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class RwSemaphore:
    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._cond = asyncio.Condition()

    @property
    def locked(self) -> bool:
        return self._writer or self._readers > 0

    async def acquire_read(self, *, ahead_of_writers: bool = False) -> None:
        """Take a read hold that outlives the calling task (a migration holds the lock
        from setup to finalize across several requests); pair with release_read.
        ``ahead_of_writers``: do not queue behind waiting writers, only wait out a
        writer that holds the lock (for holds that stand in for the kernel's rmap
        walks, which take no mmap lock at all: queueing them could close a cycle)."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and (ahead_of_writers or not self._writers_waiting))
            self._readers += 1

    def try_acquire_read(self) -> bool:
        """Take a read hold unless a writer holds the lock (trylock); like
        ``acquire_read(ahead_of_writers=True)`` it stands in for an rmap walk, so it
        does not defer to waiting writers. Pair a True with release_read."""
        if self._writer:
            return False
        self._readers += 1
        return True

    async def release_read(self) -> None:
        async with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        await self.acquire_read()
        try:
            yield
        finally:
            await self.release_read()

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            await self.release_write()

    def try_acquire_write(self) -> bool:
        """Take the lock for writing if nobody holds it or waits for it (trylock);
        pair a True with release_write."""
        if self._writer or self._readers or self._writers_waiting:
            return False
        self._writer = True
        return True

    async def release_write(self) -> None:
        async with self._cond:
            self._writer = False
            self._cond.notify_all()
