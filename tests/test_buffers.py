"""The daemon's reusable buffers for contents that arrive in parts (hmmd.rpc.buffers)."""

from __future__ import annotations

from hmmd.rpc.buffers import BufferPool


def test_a_returned_buffer_serves_the_next_get_that_fits() -> None:
    pool = BufferPool(keep_bytes=1 << 20)
    a = pool.get(4096)
    assert a.nbytes == 4096
    a[:] = 7
    pool.put(a)
    b = pool.get(1000)  # the same memory, at least as big
    assert b is a and (b == 7).all()
    c = pool.get(1000)  # b is out: a new one
    assert c is not a and c.nbytes == 1000
    pool.put(b)
    pool.put(c)
    d = pool.get(8192)  # too big for either
    assert d is not a and d is not c
    assert pool.get(100) is c  # the smallest that fits


def test_no_more_than_the_budget_is_kept() -> None:
    pool = BufferPool(keep_bytes=10_000)
    a, b = pool.get(6000), pool.get(6000)
    pool.put(b)
    pool.put(a)  # over the budget: the least recently returned (b) goes
    assert pool.get(6000) is a
    assert pool.get(6000) is not b
    pool = BufferPool(keep_bytes=0)
    a = pool.get(10)
    pool.put(a)
    assert pool.get(10) is not a


def test_a_buffer_never_put_back_is_not_handed_out_again() -> None:
    """What the daemon relies on when a caller leaves during the step: the step may
    still read the buffer, so it is not returned, and no later get() sees it."""
    pool = BufferPool(keep_bytes=1 << 20)
    kept = pool.get(4096)
    assert pool.get(4096) is not kept
