"""Swap space: where reclaim puts anonymous pages it takes from their frames.

A slot holds one page's contents and counts the swap entries that name it
(swap_duplicate at fork, swap_free at zap or swap-in). Slot numbers start at 1, as
the kernel's swap offsets (offset 0 is the swap header).
"""

from __future__ import annotations

import itertools

import numpy as np


class SwapSpace:
    def __init__(self, npages: int) -> None:
        self.npages = npages
        self._contents: dict[int, np.ndarray] = {}
        self._refs: dict[int, int] = {}
        self._next = itertools.count(1)

    @property
    def used(self) -> int:
        return len(self._refs)

    def store(self, pages: list[np.ndarray]) -> np.ndarray:
        """A copy in a new slot for each of the first pages (views of frames) that fit
        in the space left (add_to_swap fails beyond: those pages stay where they are);
        their slot numbers, one reference each."""
        n = min(len(pages), self.npages - self.used)
        slots = np.array([next(self._next) for _ in range(n)], dtype=np.int64)
        for slot, page in zip(slots.tolist(), pages[:n], strict=True):
            self._contents[slot] = page.copy()
            self._refs[slot] = 1
        return slots

    def load(self, slot: int) -> np.ndarray:
        return self._contents[slot]

    def refs(self, slot: int) -> int:
        return self._refs.get(slot, 0)

    def dup(self, slots: np.ndarray) -> None:
        for slot in slots.tolist():
            self._refs[slot] += 1

    def free(self, slots: np.ndarray) -> None:
        """Drop one reference each; a slot without any is free again."""
        for slot in slots.tolist():
            self._refs[slot] -= 1
            if not self._refs[slot]:
                del self._refs[slot], self._contents[slot]

    def slots(self) -> dict[int, int]:
        """Every slot in use and its reference count (for the invariant checker)."""
        return dict(self._refs)

