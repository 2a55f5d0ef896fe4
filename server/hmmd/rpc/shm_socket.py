"""A Unix socket that hands a session's staging area to its device (``--shm-socket``).

A device names its area by opening ``/proc/<daemon pid>/fd/<fd>``, which a process in
another pid namespace (a container) cannot see. Over this socket it can fetch the
memfd itself instead: it sends its session token and a newline; the daemon answers
one byte, ``0`` with the area's file descriptor attached (SCM_RIGHTS), or ``1``
(unknown session, no area, a malformed request) without, and closes. The token is
the session's secret, so the socket's permissions decide who may ask and the token
which area they get. The received descriptor carries the memfd's seals like any
other open of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable

from hmmd.rpc.staging import StagingArea

log = logging.getLogger(__name__)

MAX_REQUEST = 256  # a token and its newline fit easily
TIMEOUT_S = 2.0  # for the whole request to arrive
MAX_PENDING = 64  # requests served at once; more connections are closed at once


class StagingSocket:
    """Listens at ``path`` (a stale socket file there is replaced); ``lookup`` maps a
    session token to its area, or None."""

    def __init__(self, path: str, lookup: Callable[[str], StagingArea | None]) -> None:
        self.path = path
        self._lookup = lookup
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._serving: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Bind and listen; OSError if the path cannot be used."""
        if os.path.lexists(self.path):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise FileExistsError(f"--shm-socket {self.path} exists and is not a socket")
            os.unlink(self.path)  # left by an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as e:  # e.g. EMFILE: keep serving
                log.warning("shm socket: accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            if len(self._serving) >= MAX_PENDING:  # a flood of idle connections holds no more fds
                conn.close()
                continue
            task = loop.create_task(self._serve(conn))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            conn.setblocking(False)
            try:
                request = b""
                async with asyncio.timeout(TIMEOUT_S):
                    while not request.endswith(b"\n") and len(request) <= MAX_REQUEST:
                        chunk = await loop.sock_recv(conn, MAX_REQUEST + 1)
                        if not chunk:
                            break
                        request += chunk
                area = None
                if request.endswith(b"\n") and len(request) <= MAX_REQUEST:
                    area = self._lookup(request[:-1].decode("ascii", "replace"))
                if area is None or area.fileno() < 0:
                    await loop.sock_sendall(conn, b"\x01")
                    return
                # One byte and one descriptor into an empty socket buffer: never blocks.
                socket.send_fds(conn, [b"\x00"], [area.fileno()])
            except (OSError, TimeoutError) as e:
                log.info("shm socket: a request failed: %s", e)

    async def close(self) -> None:
        """Stop serving and remove the socket file."""
        for task in (self._task, *self._serving):
            if task is not None:
                task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
