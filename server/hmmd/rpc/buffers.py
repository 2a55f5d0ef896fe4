"""Big buffers kept for reuse, for page contents that arrive in parts.

A fresh multi-MiB numpy array is a fresh anonymous mapping, page-faulted as it is
filled, and on the machines we measure on the faults cost more than the copy
(hmm.malloc; glibc's heap does not serve blocks above 32 MiB). A MigratePagesStream
puts its parts together in one buffer, so the daemon keeps such buffers free for the
next stream, up to a byte budget (``--malloc-keep-mib``).
"""

from __future__ import annotations

import numpy as np


class BufferPool:
    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self._free: list[np.ndarray] = []  # the most recently returned last

    def get(self, nbytes: int) -> np.ndarray:
        """A uint8 array of at least ``nbytes`` (contents undefined): the smallest free
        buffer big enough, or a new one. Give it back with put() once nothing reads
        it any more; one never given back is simply freed."""
        fits = [i for i, b in enumerate(self._free) if b.nbytes >= nbytes]
        if not fits:
            return np.empty(nbytes, dtype=np.uint8)
        # By position: list.remove would compare arrays with ==, element by element.
        return self._free.pop(min(fits, key=lambda i: self._free[i].nbytes))

    def put(self, buf: np.ndarray) -> None:
        self._free.append(buf)
        while sum(b.nbytes for b in self._free) > self.keep_bytes:
            self._free.pop(0)  # the least recently returned first
