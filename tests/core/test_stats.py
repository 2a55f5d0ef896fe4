"""The daemon's latency samples (Admin Stats): the most recent ones, bounded."""

from __future__ import annotations

from hmmd.core.stats import Latencies


def test_latencies_keep_the_most_recent_samples_in_bounded_memory() -> None:
    lat = Latencies(keep=3000)
    assert lat.summary().count == 0
    for i in range(2500):
        lat.add(i * 1e-6)
    s = lat.summary()
    assert (s.count, s.p50_us, s.max_us) == (2500, 1249.5, 2499.0)
    for i in range(2500, 7000):  # past keep: the oldest go
        lat.add(i * 1e-6)
    s = lat.summary()
    assert s.count == 3000 and s.p50_us == 5499.5 and abs(s.max_us - 6999.0) < 1e-6
    assert lat._ring.nbytes == 3000 * 8  # grew to keep, no further
    lat.reset()
    assert lat.summary().count == 0
    lat.add(5e-6)
    s = lat.summary()
    assert s.count == 1 and abs(s.p50_us - 5.0) < 1e-9
