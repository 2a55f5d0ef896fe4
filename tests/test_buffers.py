"""The daemon's reusable buffers for contents that arrive in parts (hmmd.rpc.buffers)."""

from __future__ import annotations

from hmmd.rpc.buffers import BufferPool


def test_a_returned_buffer_serves_the_next_take_that_fits() -> None:
    pool = BufferPool(keep_bytes=1 << 20)
    with pool.take(4096) as a:
        assert a.nbytes == 4096
        a[:] = 7
        base = a.base
    with pool.take(1000) as b:  # the same memory, cut to size
        assert b.nbytes == 1000 and b.base is base and (b == 7).all()
        with pool.take(1000) as c:  # taken meanwhile: a new one
            assert c.base is not base
    with pool.take(8192) as d:  # too big for either
        assert d.base is not base


def test_no_more_than_the_budget_is_kept() -> None:
    pool = BufferPool(keep_bytes=10_000)
    with pool.take(6000) as a, pool.take(6000) as b:
        first, second = a.base, b.base
    # b went back first, then a: over the budget, the least recently returned (b) went.
    with pool.take(6000) as c:
        assert c.base is first
        with pool.take(6000) as d:
            assert d.base is not second
    pool = BufferPool(keep_bytes=0)
    with pool.take(10) as a:
        kept = a.base
    with pool.take(10) as b:
        assert b.base is not kept
