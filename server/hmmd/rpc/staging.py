"""A device session's shared-memory staging area (capability "shm").

Page contents of DmaRead, DmaWrite and MigratePages normally travel inside messages.
A device on the same host may instead ask for a staging area: a file in a tmpfs
directory (``--shm-dir``, /dev/shm) that the daemon creates for the session, mode
0600, and that both sides map shared. A request then names an offset in it instead
of carrying the bytes. The core never sees the file: it is given a uint8 view of
the bytes to read or fill.

The file's blocks are allocated when it is created (ENOSPC then, not SIGBUS on a
later store into a full tmpfs), and it is unlinked when the session ends.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets

import numpy as np

from hmm.abi import PAGE_SIZE
from hmm.errors import KernelError


class StagingArea:
    """One session's staging file, mapped shared. Not thread-safe (one event loop)."""

    def __init__(self, path: str, size: int, fd: int, mem: mmap.mmap) -> None:
        self.path = path
        self.size = size
        self._fd = fd
        self._mem: mmap.mmap | None = mem
        self._buf: np.ndarray | None = np.frombuffer(mem, dtype=np.uint8)

    @classmethod
    def create(cls, directory: str, size: int, label: str) -> StagingArea:
        """A new, zero-filled area of ``size`` bytes (a multiple of the page size) in
        ``directory``, named after this daemon's pid, ``label`` and a random part.
        OSError (ENOENT, EACCES, ENOSPC, ...) if it cannot be made."""
        path = os.path.join(directory, f"hmmd-{os.getpid()}-{label}-{secrets.token_hex(8)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            mem = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return cls(path, size, fd, mem)

    def span(self, offset: int, length: int) -> np.ndarray:
        """The bytes [offset, offset + length) of the area, as a writable uint8 view.
        EINVAL if ``offset`` is not page-aligned, the span leaves the area, or the file
        was shrunk (a store past its end would kill the daemon with SIGBUS)."""
        if self._buf is None:
            raise KernelError(errno.EINVAL, "the staging area is closed")
        if offset % PAGE_SIZE:
            raise KernelError(errno.EINVAL, f"shm_offset {offset:#x} is not page-aligned")
        if offset > self.size or length > self.size - offset:
            raise KernelError(errno.EINVAL, f"[{offset:#x}, +{length:#x}) is outside the {self.size}-byte "
                                            "staging area")
        if os.fstat(self._fd).st_size < self.size:
            raise KernelError(errno.EINVAL, "the staging file was truncated")
        return self._buf[offset:offset + length]

    def close(self) -> None:
        """Unlink the file and drop the mapping (idempotent). A view still in use
        keeps the mapping alive until it is garbage."""
        if self._mem is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._buf = None
        mem, self._mem = self._mem, None
        try:
            mem.close()
        except BufferError:  # a view is still referenced somewhere: freed with it
            pass
