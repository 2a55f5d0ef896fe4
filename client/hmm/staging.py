"""The device side of the shared-memory staging area (capability "shm").

The daemon creates one area per session (``Welcome.shm_path``: its sealed memfd as
``/proc/<daemon pid>/fd/<fd>``; or, from another pid namespace, the memfd itself
fetched over ``Welcome.shm_socket``) and maps it; a device on the same host maps it
too and moves page contents through it: a request names an offset in the area
instead of carrying the bytes. The connection carves the area
into regions, one per transfer in flight, so transfers never wait for each other:
when no region is free, that transfer takes the network path.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import socket
import stat

import numpy as np

from hmm.abi import PAGE_SIZE

log = logging.getLogger(__name__)


class StagingArea:
    """The mapped area and its regions in use. Not thread-safe (one event loop)."""

    def __init__(self, mem: mmap.mmap, size: int, path: str = "") -> None:
        self.path = path
        self.size = size
        self._mem: mmap.mmap | None = mem
        self.buf: np.ndarray = np.frombuffer(mem, dtype=np.uint8)
        self._base = int(self.buf.ctypes.data)
        self._starts: list[int] = []  # regions in use, sorted by offset
        self._lengths: dict[int, int] = {}

    @classmethod
    def map(cls, path: str, size: int) -> StagingArea | None:
        """Map the daemon's area, or None when it cannot be (another host, another pid
        namespace, another user): the device then uses the network path only."""
        if not path or size <= 0:
            return None
        try:
            # Not O_NOFOLLOW: /proc/PID/fd/N is a magic link to the daemon's memfd.
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            log.info("shared-memory staging area %s not reachable (%s): using the network path", path, e)
            return None
        return cls._map_fd(fd, path, size)

    @classmethod
    def fetch(cls, socket_path: str, token: str, size: int, timeout: float = 2.0) -> StagingArea | None:
        """The daemon's area fetched over its --shm-socket (blocking, up to ``timeout``
        per step), or None when that fails: another host, no access to the socket."""
        if not socket_path or size <= 0:
            return None
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(timeout)
                s.connect(socket_path)
                s.sendall(token.encode("ascii") + b"\n")
                msg, fds, _, _ = socket.recv_fds(s, 1, 1)
        except (OSError, UnicodeEncodeError) as e:
            log.info("shared-memory staging area not fetched from %s (%s): using the network path", socket_path, e)
            return None
        if msg != b"\x00" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            log.info("the daemon's %s gave no staging area: using the network path", socket_path)
            return None
        return cls._map_fd(fds[0], f"unix:{socket_path}", size)

    @classmethod
    def _map_fd(cls, fd: int, path: str, size: int) -> StagingArea | None:
        """Map ``size`` bytes of ``fd`` (closed here) if it is a file of that size."""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                log.warning("staging area %s is not %d bytes: not used", path, size)
                return None
            mem = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        except OSError as e:
            log.warning("staging area %s cannot be mapped (%s): using the network path", path, e)
            return None
        finally:
            os.close(fd)  # the mapping keeps the file
        return cls(mem, size, path)

    def alloc(self, nbytes: int) -> int | None:
        """A free page-aligned region of ``nbytes`` (first fit), or None."""
        if nbytes <= 0 or self._mem is None:
            return None
        need = -(-nbytes // PAGE_SIZE) * PAGE_SIZE
        at = 0
        for i, start in enumerate(self._starts):
            if start - at >= need:
                self._starts.insert(i, at)
                self._lengths[at] = need
                return at
            at = start + self._lengths[start]
        if self.size - at >= need:
            self._starts.append(at)
            self._lengths[at] = need
            return at
        return None

    def free(self, offset: int) -> None:
        if self._lengths.pop(offset, None) is not None:
            del self._starts[bisect.bisect_left(self._starts, offset)]

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        return self.buf[offset:offset + nbytes]

    def offset_of(self, arr: np.ndarray) -> int | None:
        """Where ``arr`` lies in the area, if it is a contiguous, page-aligned part of
        it (a transfer_buffer, or a slice of one); else None."""
        if self._mem is None or not arr.flags.c_contiguous:
            return None
        off = int(arr.ctypes.data) - self._base
        if off < 0 or off + arr.nbytes > self.size or off % PAGE_SIZE:
            return None
        return off

    def close(self) -> None:
        """Drop the mapping (the daemon closes its memfd); idempotent. Views still
        referenced keep it alive until they are garbage."""
        mem, self._mem = self._mem, None
        self.buf = np.empty(0, dtype=np.uint8)
        self._starts.clear()
        self._lengths.clear()
        if mem is not None:
            try:
                mem.close()
            except BufferError:
                pass
