"""Latency samples kept by the daemon for tools and benchmarks."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Summary:
    count: int
    p50_us: float
    p99_us: float
    max_us: float


class Latencies:
    """The most recent samples (seconds in, microseconds out)."""

    def __init__(self, keep: int = 100_000) -> None:
        self._samples: deque[float] = deque(maxlen=keep)

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)

    def summary(self) -> Summary:
        if not self._samples:
            return Summary(0, 0.0, 0.0, 0.0)
        us = np.fromiter(self._samples, dtype=np.float64) * 1e6
        p50, p99 = np.percentile(us, [50, 99])
        return Summary(len(us), float(p50), float(p99), float(us.max()))

    def reset(self) -> None:
        self._samples.clear()
