"""Big buffers kept for reuse, for page contents that arrive in parts.

A fresh multi-MiB numpy array is a fresh anonymous mapping, page-faulted as it is
filled, and on the machines we measure on the faults cost more than the copy
(hmm.malloc; glibc's heap does not serve blocks above 32 MiB). A MigratePagesStream
puts its parts together in one buffer, so the daemon keeps such buffers free for the
next stream, up to a byte budget (``--malloc-keep-mib``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


class BufferPool:
    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self._free: list[np.ndarray] = []  # the most recently returned last

    @contextmanager
    def take(self, nbytes: int) -> Iterator[np.ndarray]:
        """A uint8 array of ``nbytes`` (contents undefined), the pool's again after
        the ``with``: the smallest free buffer big enough, or a new one."""
        fits = [b for b in self._free if b.nbytes >= nbytes]
        buf = min(fits, key=lambda b: b.nbytes) if fits else np.empty(nbytes, dtype=np.uint8)
        if fits:
            self._free.remove(buf)
        try:
            yield buf[:nbytes]
        finally:
            self._free.append(buf)
            while sum(b.nbytes for b in self._free) > self.keep_bytes:
                self._free.pop(0)  # the least recently used first
