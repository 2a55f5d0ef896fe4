"""A device session's shared-memory staging area (capability "shm").

Page contents of DmaRead, DmaWrite and MigratePages normally travel inside messages.
A device on the same host may instead ask for a staging area that both sides map
shared. A request then names an offset in it instead of carrying the bytes. The core
never sees the file: it is given a uint8 view of the bytes to read or fill.

The area is a memfd sealed against shrinking and growing: a device that could
truncate the file under the daemon's mapping would make the daemon's next copy die
with SIGBUS. The device opens it through ``/proc/<daemon pid>/fd/<fd>`` (same host,
same pid namespace, a user allowed to look at the daemon's fds); the seals hold for
every open of it. Its memory is allocated when it is created (ENOMEM/ENOSPC then,
not SIGBUS on a later store), and it goes when the session ends and the device
unmaps it.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

import numpy as np

from hmm.abi import PAGE_SIZE
from hmm.errors import KernelError


class StagingArea:
    """One session's staging area (a sealed memfd), mapped shared. Not thread-safe (one event loop)."""

    def __init__(self, path: str, size: int, fd: int, mem: mmap.mmap) -> None:
        self.path = path
        self.size = size
        self._fd = fd
        self._mem: mmap.mmap | None = mem
        self._buf: np.ndarray | None = np.frombuffer(mem, dtype=np.uint8)

    @classmethod
    def create(cls, size: int, label: str) -> StagingArea:
        """A new, zero-filled area of ``size`` bytes (a multiple of the page size),
        named after ``label`` in /proc/PID/maps. OSError (ENOMEM, ENOSPC, EMFILE, ...)
        if it cannot be made."""
        fd = os.memfd_create(f"hmmd-{label}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.posix_fallocate(fd, 0, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mem = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        except BaseException:
            os.close(fd)
            raise
        return cls(f"/proc/{os.getpid()}/fd/{fd}", size, fd, mem)

    def fileno(self) -> int:
        """The memfd, or -1 once closed (hmmd.rpc.shm_socket hands it out)."""
        return self._fd if self._mem is not None else -1

    def span(self, offset: int, length: int) -> np.ndarray:
        """The bytes [offset, offset + length) of the area, as a writable uint8 view.
        EINVAL if ``offset`` is not page-aligned or the span leaves the area."""
        if self._buf is None:
            raise KernelError(errno.EINVAL, "the staging area is closed")
        if offset % PAGE_SIZE:
            raise KernelError(errno.EINVAL, f"shm_offset {offset:#x} is not page-aligned")
        if offset > self.size or length > self.size - offset:
            raise KernelError(errno.EINVAL, f"[{offset:#x}, +{length:#x}) is outside the {self.size}-byte "
                                            "staging area")
        return self._buf[offset:offset + length]

    def close(self) -> None:
        """Close the memfd and drop the mapping (idempotent). A view still in use
        keeps the mapping alive until it is garbage, the device's mapping the memory."""
        if self._mem is None:
            return
        os.close(self._fd)
        self._buf = None
        mem, self._mem = self._mem, None
        try:
            mem.close()
        except BufferError:  # a view is still referenced somewhere: freed with it
            pass
