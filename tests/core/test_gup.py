"""Pins and copy-on-write (PageAnonExclusive, v5.19+): a pinned page — what a device
DMAs to — stays the page the process maps, whatever write-protects it meanwhile,
and a read-only pin of a page fork shares unshares it first. Unpinned pages shared
by fork are still copied on write. A long-term read-only pin in a private mapping
takes a page of the process's own (the zero page and file pages too)."""

from __future__ import annotations

from hmm.abi import MAP_PRIVATE, MAP_SHARED, O_CREAT, O_RDWR, PROT_READ, Event
from hmmd.core.invariants import check_invariants
from hmmd.core.pagetable import PTE_SOFT_DIRTY

from .conftest import ANON, RW, Env, P, pattern, writable


async def filled(env: Env, npages: int, seed: int) -> tuple[int, bytes]:
    a = await env.mmap(npages, flags=ANON)
    data = pattern(npages, seed)
    await env.write(a, data)
    return a, data


def frame(env: Env, pfn: int, n: int) -> bytes:
    """The first ``n`` bytes of frame ``pfn``: what a device DMAing to it sees."""
    return bytes(env.k.ram.data[pfn][:n])


async def test_clear_refs_leaves_a_pinned_page_to_its_pin(env: Env) -> None:
    """clear_refs(4) skips a pinned page of a private mapping (pte_is_pinned): it stays
    writable and soft-dirty, and the next CPU write lands in the pinned frame; the
    unpinned page beside it is write-protected and reused on write, not copied."""
    k, pid = env.k, env.p.pid
    a, _ = await filled(env, 2, 1)
    before = env.pfns(a, a + 2 * P)
    pin = await k.pin_user_pages(pid, a, 1, write=True, longterm=True, hold=True)
    await k.clear_refs(pid, 4)
    ptes = env.ptes(a, a + 2 * P)
    assert writable(ptes).tolist() == [True, False]
    assert ((ptes & PTE_SOFT_DIRTY) != 0).tolist() == [True, False]
    await env.write(a, b"B" * 2 * P)
    assert (env.pfns(a, a + 2 * P) == before).all()
    assert k.pins[pin][1][0] == before[0] and frame(env, int(before[0]), 4) == b"BBBB"
    assert check_invariants(k) == []
    k.unpin_user_pages(pid, pin)


async def test_mprotect_read_only_then_rw_keeps_a_pinned_page(env: Env) -> None:
    """A pinned page the process owns becomes writable again on mprotect RW
    (can_change_pte_writable: PageAnonExclusive, pinned or not), and a CPU write
    after it lands in the pinned frame."""
    k, pid = env.k, env.p.pid
    a, _ = await filled(env, 1, 2)
    pfn = int(env.pfns(a, a + P)[0])
    pin = await k.pin_user_pages(pid, a, 1, write=True, longterm=True, hold=True)
    await k.mprotect(pid, a, P, PROT_READ)
    assert not writable(env.ptes(a, a + P)).any()
    await k.mprotect(pid, a, P, RW)
    assert writable(env.ptes(a, a + P)).all()
    env.fake.take()
    await env.write(a, b"DDDD")
    assert env.pfns(a, a + P)[0] == pfn and frame(env, pfn, 4) == b"DDDD"
    assert env.fake.take() == []  # nothing replaced: no CLEAR
    k.unpin_user_pages(pid, pin)


async def test_write_to_a_write_protected_pinned_page_reuses_it(env: Env) -> None:
    """do_wp_page reuses an exclusive page whatever its pins: a page write-protected
    by clear_refs before a read-only pin took it (no copy: the process owns it) is
    written in place, in the pinned frame."""
    k, pid = env.k, env.p.pid
    a, _ = await filled(env, 1, 3)
    pfn = int(env.pfns(a, a + P)[0])
    await k.clear_refs(pid, 4)
    pin = await k.pin_user_pages(pid, a, 1, write=False, longterm=False, hold=True)
    assert k.pins[pin][1][0] == pfn and not writable(env.ptes(a, a + P)).any()
    env.fake.take()
    await env.write(a, b"EEEE")
    assert env.pfns(a, a + P)[0] == pfn and frame(env, pfn, 4) == b"EEEE"
    assert env.fake.take() == []
    k.unpin_user_pages(pid, pin)


async def test_readonly_pin_of_a_fork_shared_page_unshares_it(env: Env) -> None:
    """A read-only pin of a page fork shares gives the pinner a copy of its own first
    (gup_must_unshare, FAULT_FLAG_UNSHARE: CLEAR over it, mapped read-only), so the
    parent's later write lands in the pinned frame and the child keeps the original."""
    k, pid = env.k, env.p.pid
    a, data = await filled(env, 2, 4)
    shared = env.pfns(a, a + 2 * P)
    child = await k.fork(pid)
    env.fake.take()
    pin = await k.pin_user_pages(pid, a, 1, write=False, longterm=True, hold=True)
    pinned = int(k.pins[pin][1][0])
    assert pinned != shared[0] and env.pfns(a, a + P)[0] == pinned
    assert env.pfns(a, a + 2 * P, child.mm).tolist() == shared.tolist()
    assert not writable(env.ptes(a, a + P)).any()
    assert env.fake.take() == [(Event.CLEAR, a, a + P)]
    assert check_invariants(k) == []
    await env.write(a, b"FFFF")
    assert env.pfns(a, a + P)[0] == pinned and frame(env, pinned, 4) == b"FFFF"
    assert await env.read(a, 2 * P, pid=child.pid) == data
    k.unpin_user_pages(pid, pin)


async def test_fork_still_copies_on_write_and_refuses_the_mprotect_upgrade(env: Env) -> None:
    """Unpinned pages fork shares: mprotect RW makes none writable in either process,
    a write by either side copies the page it writes, and the last mapper of a page
    reuses it; each process sees its own data."""
    k, pid = env.k, env.p.pid
    a, data = await filled(env, 2, 5)
    shared = env.pfns(a, a + 2 * P)
    child = await k.fork(pid)
    for p in (pid, child.pid):
        await k.mprotect(p, a, 2 * P, PROT_READ)
        await k.mprotect(p, a, 2 * P, RW)
    assert not writable(env.ptes(a, a + 2 * P)).any()
    assert not writable(env.ptes(a, a + 2 * P, child.mm)).any()
    await env.write(a, b"parent")  # page 0: the parent copies
    await env.write(a + P, b"child", pid=child.pid)  # page 1: the child copies
    parent, kid = env.pfns(a, a + 2 * P), env.pfns(a, a + 2 * P, child.mm)
    assert parent[0] != shared[0] and kid[0] == shared[0]
    assert kid[1] != shared[1] and parent[1] == shared[1]
    await env.write(a + P, b"last")  # the parent alone maps page 1 now: reused
    assert env.pfns(a + P, a + 2 * P)[0] == shared[1]
    assert (await env.read(a, 2 * P))[:6] == b"parent"
    assert (await env.read(a, 2 * P, pid=child.pid))[: 2 * P] == data[:P] + b"child" + data[P + 5 :]
    assert check_invariants(k) == []


async def test_longterm_readonly_pin_in_a_private_mapping_takes_a_page_of_its_own(env: Env) -> None:
    """gup_must_unshare() with FOLL_LONGTERM in a copy-on-write mapping (v6.2+): the
    zero page and a private file mapping's page-cache page are unshared into read-only
    anonymous pages of the process before the pin, so the pin sees what the process
    writes later, and a later write to the file is not what the process sees. A short-
    term read-only pin, or a shared mapping, pins the page as it is."""
    k, pid = env.k, env.p.pid
    fd, _ = await k.open(pid, "/pinned", O_CREAT | O_RDWR)
    data = pattern(2, 9)
    await k.pwrite(pid, fd, 0, data)
    f = await env.mmap(2, flags=MAP_PRIVATE, fd=fd)
    z = await env.mmap(1, flags=ANON)
    assert await env.read(f, 2 * P) == data and await env.read(z, 1) == b"\0"  # cache pages, the zero page
    cache, zero = env.pfns(f, f + 2 * P), env.pfns(z, z + P)[0]
    short = await k.pin_user_pages(pid, f + P, 1, write=False, longterm=False, hold=True)
    assert int(k.pins[short][1][0]) == cache[1]
    k.unpin_user_pages(pid, short)
    env.fake.take()
    pins = [await k.pin_user_pages(pid, a, 1, write=False, longterm=True, hold=True) for a in (f, z)]
    got = [int(k.pins[p][1][0]) for p in pins]
    assert got[0] != cache[0] and got[1] != zero and env.pfns(f, f + P)[0] == got[0] and env.pfns(z, z + P)[0] == got[1]
    assert not writable(env.ptes(f, f + P)).any() and not writable(env.ptes(z, z + P)).any()
    assert env.fake.take() == [(Event.CLEAR, f, f + P), (Event.CLEAR, z, z + P)]
    assert frame(env, got[0], P) == data[:P] and frame(env, got[1], P) == bytes(P)
    assert env.pfns(f + P, f + 2 * P)[0] == cache[1]  # the page not pinned is still the file's
    await k.pwrite(pid, fd, 0, b"file")
    await env.write(f, b"proc")
    await env.write(z, b"zero")
    assert env.pfns(f, f + P)[0] == got[0] and frame(env, got[0], 4) == b"proc"
    assert env.pfns(z, z + P)[0] == got[1] and frame(env, got[1], 4) == b"zero"
    s = await env.mmap(1, flags=MAP_SHARED, fd=fd)
    assert await env.read(s, 4) == b"file"
    shared = await k.pin_user_pages(pid, s, 1, write=False, longterm=True, hold=True)
    assert int(k.pins[shared][1][0]) == cache[0]
    for p in (*pins, shared):
        k.unpin_user_pages(pid, p)
    assert check_invariants(k) == []
