"""The mmu_interval_notifier sequence algorithm on MmNotifiers directly
(HMM-SEMANTICS.md §1.1: insert cases a/b/c, deferred remove, read_begin,
read_retry, nesting, non-blockable refusal)."""

from __future__ import annotations

import asyncio
import errno

import pytest

from hmm.abi import Event
from hmm.errors import KernelError
from hmmd.core.notifier import IntervalNotifier, MmNotifiers, NotifierRange

P = 4096


class Ops:
    """NotifierOps that records (sub id, event, cur_seq) and answers ``answer``."""

    def __init__(self, calls: list | None = None, answer: bool = True) -> None:
        self.calls = calls if calls is not None else []
        self.answer = answer

    async def invalidate(self, sub: IntervalNotifier, rng: NotifierRange, cur_seq: int) -> bool:
        sub.set_seq(cur_seq)
        self.calls.append((sub.id, rng.event, cur_seq))
        return self.answer


def rng(subs: MmNotifiers, start: int, end: int, event: Event = Event.CLEAR, blockable: bool = True) -> NotifierRange:
    return NotifierRange(subs.mm, start, end, event, 0, blockable)


def make(subs: MmNotifiers, start: int, length: int, ops: Ops | None = None) -> IntervalNotifier:
    return IntervalNotifier(subs, start, length, ops or Ops())


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
def subs() -> MmNotifiers:
    return MmNotifiers(object())


def test_initial_state(subs: MmNotifiers) -> None:
    assert subs.invalidate_seq == 2
    assert subs.active_invalidate_ranges == 0
    assert not subs.invalidating
    assert subs.itree == [] and subs.deferred == []


async def test_insert_case_a_idle(subs: MmNotifiers) -> None:
    sub = make(subs, 0, P)
    subs.insert(sub)
    assert sub.invalidate_seq == 1 == subs.invalidate_seq - 1
    assert sub.in_tree and subs.itree == [sub]
    assert subs.invalidate_seq == 2
    assert await asyncio.wait_for(subs.read_begin(sub), 1) == 1  # does not block
    assert not MmNotifiers.read_retry(sub, 1)


async def test_insert_case_b_active_even_makes_global_odd(subs: MmNotifiers) -> None:
    r = rng(subs, 0x100000, 0x200000)
    await subs.invalidate_range_start(r)  # hits nothing: active but even
    assert subs.active_invalidate_ranges == 1 and subs.invalidate_seq == 2
    sub = make(subs, 0, 0x1000000)
    subs.insert(sub)
    assert subs.invalidate_seq == 3
    assert sub.invalidate_seq == 3
    assert sub.in_tree
    task = asyncio.ensure_future(subs.read_begin(sub))
    await settle()
    assert not task.done()  # the first read_begin waits the window out
    subs.invalidate_range_end(r)
    assert subs.invalidate_seq == 4
    assert await asyncio.wait_for(task, 1) == 3
    assert not MmNotifiers.read_retry(sub, 3)
    assert sub.ops.calls == []  # it did not get the invalidation that was already running


async def test_insert_case_c_odd_is_deferred(subs: MmNotifiers) -> None:
    first_ops = Ops()
    first = make(subs, 0, P, first_ops)
    subs.insert(first)
    r = rng(subs, 0, P)
    await subs.invalidate_range_start(r)
    assert first_ops.calls == [(first.id, Event.CLEAR, 3)]
    late_ops = Ops()
    late = make(subs, 0, P, late_ops)
    subs.insert(late)
    assert not late.in_tree and subs.deferred == [late]
    assert late.invalidate_seq == 3
    # A nested invalidation over its interval does not reach it while it waits.
    r2 = rng(subs, 0, P)
    await subs.invalidate_range_start(r2)
    assert late_ops.calls == []
    assert first_ops.calls[-1] == (first.id, Event.CLEAR, 3)
    task = asyncio.ensure_future(subs.read_begin(late))
    await settle()
    assert not task.done()
    subs.invalidate_range_end(r2)
    await settle()
    assert not task.done() and not late.in_tree  # the window is still open
    subs.invalidate_range_end(r)
    assert subs.invalidate_seq == 4
    assert late.in_tree and subs.deferred == []
    assert [s.id for s in subs.itree] == [first.id, late.id]
    assert await asyncio.wait_for(task, 1) == 3
    assert late_ops.calls == []
    # The next window reaches it.
    r3 = rng(subs, 0, P)
    await subs.invalidate_range_start(r3)
    assert late_ops.calls == [(late.id, Event.CLEAR, 5)]
    subs.invalidate_range_end(r3)


async def test_read_begin_blocks_while_a_window_that_hit_the_notifier_is_open(subs: MmNotifiers) -> None:
    hit = make(subs, 0, P)
    missed = make(subs, 0x10000, P)
    subs.insert(hit)
    subs.insert(missed)
    s_missed = await subs.read_begin(missed)
    r = rng(subs, 0, P)
    await subs.invalidate_range_start(r)
    assert subs.invalidate_seq == 3 and hit.invalidate_seq == 3
    task = asyncio.ensure_future(subs.read_begin(hit))
    await settle()
    assert not task.done()
    # A notifier the window did not hit is not held up, and is not stale.
    assert await asyncio.wait_for(subs.read_begin(missed), 1) == s_missed
    assert not MmNotifiers.read_retry(missed, s_missed)
    subs.invalidate_range_end(r)
    assert await asyncio.wait_for(task, 1) == 3
    assert not MmNotifiers.read_retry(hit, 3)


async def test_read_retry_detects_a_window_opened_after_read_begin(subs: MmNotifiers) -> None:
    sub = make(subs, 0, P)
    subs.insert(sub)
    s = await subs.read_begin(sub)
    assert not MmNotifiers.read_retry(sub, s)
    r = rng(subs, 0, P)
    async with subs.invalidate(r):
        assert MmNotifiers.read_retry(sub, s)  # already stale inside the window
    assert MmNotifiers.read_retry(sub, s)
    s2 = await subs.read_begin(sub)
    assert s2 == 3 and not MmNotifiers.read_retry(sub, s2)


async def test_remove_while_idle_is_immediate(subs: MmNotifiers) -> None:
    ops = Ops()
    sub = make(subs, 0, P, ops)
    subs.insert(sub)
    await asyncio.wait_for(subs.remove(sub), 1)
    assert not sub.in_tree and sub.removed and subs.itree == []
    async with subs.invalidate(rng(subs, 0, P)):
        pass
    assert ops.calls == []
    assert subs.invalidate_seq == 2  # nothing was hit: the window never opened


async def test_remove_during_an_open_window_waits_for_it_to_close(subs: MmNotifiers) -> None:
    ops = Ops()
    sub = make(subs, 0, P, ops)
    subs.insert(sub)
    r = rng(subs, 0, P)
    await subs.invalidate_range_start(r)
    assert len(ops.calls) == 1
    task = asyncio.ensure_future(subs.remove(sub))
    await settle()
    assert not task.done()
    assert sub.in_tree and subs.deferred == [sub]
    subs.invalidate_range_end(r)
    await asyncio.wait_for(task, 1)
    assert not sub.in_tree and sub.removed and subs.deferred == [] and subs.itree == []
    async with subs.invalidate(rng(subs, 0, P)):
        pass
    assert len(ops.calls) == 1  # no callback after remove returned


async def test_remove_of_a_deferred_insert_just_unlinks(subs: MmNotifiers) -> None:
    subs.insert(make(subs, 0, P))
    r = rng(subs, 0, P)
    await subs.invalidate_range_start(r)
    ops = Ops()
    late = make(subs, 0, P, ops)
    subs.insert(late)
    await asyncio.wait_for(subs.remove(late), 1)  # returns at once, window still open
    assert subs.invalidating
    assert subs.deferred == [] and late.removed and not late.in_tree
    subs.invalidate_range_end(r)
    assert late not in subs.itree
    async with subs.invalidate(rng(subs, 0, P)):
        pass
    assert ops.calls == []


async def test_nested_invalidations_share_one_window(subs: MmNotifiers) -> None:
    calls: list = []
    a = make(subs, 0, P, Ops(calls))
    b = make(subs, 0x10000, P, Ops(calls))
    subs.insert(a)
    subs.insert(b)
    r1 = rng(subs, 0, P)
    r2 = rng(subs, 0x10000, 0x11000)
    r3 = rng(subs, 0x50000, 0x51000)  # hits nothing, still keeps the window open
    await subs.invalidate_range_start(r1)
    await subs.invalidate_range_start(r2)
    await subs.invalidate_range_start(r3)
    assert calls == [(a.id, Event.CLEAR, 3), (b.id, Event.CLEAR, 3)]
    assert subs.active_invalidate_ranges == 3
    subs.invalidate_range_end(r1)
    assert subs.invalidate_seq == 3
    subs.invalidate_range_end(r2)
    assert subs.invalidate_seq == 3  # r3 is still running
    subs.invalidate_range_end(r3)
    assert subs.invalidate_seq == 4 and subs.active_invalidate_ranges == 0


async def test_all_notifiers_hit_in_one_window_get_the_same_cur_seq(subs: MmNotifiers) -> None:
    calls: list = []
    subs_list = [make(subs, i * P, P, Ops(calls)) for i in (2, 0, 1)]
    for s in subs_list:
        subs.insert(s)
    assert [s.start for s in subs.itree] == [0, P, 2 * P]  # tree order
    async with subs.invalidate(rng(subs, 0, 3 * P)):
        pass
    assert sorted(c[0] for c in calls) == sorted(s.id for s in subs_list)
    assert {c[2] for c in calls} == {3}
    assert all(s.invalidate_seq == 3 for s in subs_list)


async def test_each_window_gets_a_larger_odd_value(subs: MmNotifiers) -> None:
    ops = Ops()
    sub = make(subs, 0, P, ops)
    subs.insert(sub)
    for _ in range(5):
        async with subs.invalidate(rng(subs, 0, P)):
            assert subs.invalidating
        async with subs.invalidate(rng(subs, 0x100000, 0x101000)):  # no hit: stays even
            assert not subs.invalidating
    seqs = [c[2] for c in ops.calls]
    assert seqs == [3, 5, 7, 9, 11]
    assert subs.invalidate_seq == 12


async def test_interval_bounds_are_inclusive_last_exclusive_end(subs: MmNotifiers) -> None:
    ops = Ops()
    sub = make(subs, 0x2000, 0x1000, ops)  # [0x2000, 0x2fff]
    subs.insert(sub)
    for start, end, hit in [(0x1000, 0x2000, False), (0x3000, 0x4000, False), (0x2fff, 0x3000, True),
                            (0x1000, 0x2001, True), (0, 2**64 - 1, True)]:
        ops.calls.clear()
        async with subs.invalidate(rng(subs, start, end)):
            pass
        assert bool(ops.calls) == hit, (hex(start), hex(end))


async def test_non_blockable_refusal_is_eagain_and_stops_the_walk(subs: MmNotifiers) -> None:
    calls: list = []
    first = make(subs, 0, P, Ops(calls))
    refuser = make(subs, P, P, Ops(calls, answer=False))
    third = make(subs, 2 * P, P, Ops(calls))
    for s in (third, refuser, first):
        subs.insert(s)
    r = rng(subs, 0, 3 * P, blockable=False)
    with pytest.raises(KernelError) as info:
        await subs.invalidate_range_start(r)
    assert info.value.errno == errno.EAGAIN
    assert [c[0] for c in calls] == [first.id, refuser.id]  # tree order; the third never called
    assert subs.active_invalidate_ranges == 0
    assert subs.invalidate_seq == 4  # the window was closed on the caller's behalf
    assert await asyncio.wait_for(subs.read_begin(first), 1) == 3


async def test_non_blockable_refusal_inside_a_longer_window_leaves_it_open(subs: MmNotifiers) -> None:
    ok = make(subs, 0, P)
    refuser = make(subs, P, P, Ops(answer=False))
    subs.insert(ok)
    subs.insert(refuser)
    outer = rng(subs, 0, P)
    await subs.invalidate_range_start(outer)
    with pytest.raises(KernelError) as info:
        await subs.invalidate_range_start(rng(subs, P, 2 * P, blockable=False))
    assert info.value.errno == errno.EAGAIN
    assert subs.active_invalidate_ranges == 1 and subs.invalidate_seq == 3
    subs.invalidate_range_end(outer)
    assert subs.invalidate_seq == 4


async def test_refusal_on_a_blockable_range_counts_as_success(subs: MmNotifiers) -> None:
    calls: list = []
    a = make(subs, 0, P, Ops(calls, answer=False))
    b = make(subs, P, P, Ops(calls))
    subs.insert(a)
    subs.insert(b)
    r = rng(subs, 0, 2 * P)
    await subs.invalidate_range_start(r)  # no exception
    assert sorted(c[0] for c in calls) == sorted([a.id, b.id])
    assert subs.active_invalidate_ranges == 1 and subs.invalidate_seq == 3
    subs.invalidate_range_end(r)
    assert subs.invalidate_seq == 4


async def test_non_blockable_without_refusal_calls_everyone(subs: MmNotifiers) -> None:
    calls: list = []
    for i in range(3):
        subs.insert(make(subs, i * P, P, Ops(calls)))
    r = rng(subs, 0, 3 * P, blockable=False)
    await subs.invalidate_range_start(r)
    assert len(calls) == 3
    subs.invalidate_range_end(r)
    assert subs.invalidate_seq == 4


async def test_blockable_fan_out_waits_for_every_callback(subs: MmNotifiers) -> None:
    gate = asyncio.Event()
    acked: list = []

    class Slow(Ops):
        async def invalidate(self, sub, rng_, cur_seq):  # type: ignore[no-untyped-def]
            sub.set_seq(cur_seq)
            await gate.wait()
            acked.append(sub.id)
            return True

    a = make(subs, 0, P, Slow())
    b = make(subs, P, P, Ops())
    subs.insert(a)
    subs.insert(b)
    start = asyncio.ensure_future(subs.invalidate_range_start(rng(subs, 0, 2 * P)))
    await settle()
    assert not start.done()  # the CPU operation is held until every device acknowledged
    gate.set()
    await asyncio.wait_for(start, 1)
    assert acked == [a.id]
