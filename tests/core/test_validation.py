"""Kernel-level argument checks and their errnos: notifiers, range fault, DMA rights
and the memory system calls. Bad input raises KernelError and changes nothing."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from hmm.abi import (
    HMM_PFN_DMA_MAPPED,
    HMM_PFN_REQ_FAULT,
    HMM_PFN_REQ_WRITE,
    MADV_DONTNEED,
    MADV_FREE,
    MAP_ANONYMOUS,
    MAP_DENYWRITE,
    MAP_EXECUTABLE,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_GROWSDOWN,
    MAP_HUGETLB,
    MAP_LOCKED,
    MAP_NONBLOCK,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_SHARED_VALIDATE,
    MAP_STACK,
    MAP_SYNC,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    O_CREAT,
    O_RDONLY,
    O_RDWR,
    PROT_READ,
    TASK_SIZE,
    ULONG_MAX,
    Event,
)
from hmmd.core.kernel import Kernel, KernelLimits
from hmmd.core.vma import VM_NOHUGEPAGE

from .conftest import ANON, RAM_BYTES, RW, Env, FakeDevice, P, make_env, pattern, raises_errno

RF, RQW = HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE


# ---- devices ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "d" * 65, "a/b", "a\x00b", "a\nb", "a\n", "a b", "a\tb", "\x1b[0m", "caf\u00e9"])
def test_device_name_outside_the_alphabet_is_einval(name: str) -> None:
    k = Kernel(RAM_BYTES)
    with raises_errno(errno.EINVAL):
        k.register_device(name, FakeDevice())
    assert not k.devices


def test_device_names_the_alphabet_allows() -> None:
    k = Kernel(RAM_BYTES)
    for name in ("d", "d" * 64, "dm0_1", "gpu-0.a:b", "A9"):
        assert k.register_device(name, FakeDevice()).name == name


# ---- notifiers --------------------------------------------------------------------------


async def test_insert_notifier_needs_the_device_open() -> None:
    k = Kernel(RAM_BYTES)
    p = k.spawn()
    dev = k.register_device("d", FakeDevice())
    with raises_errno(errno.EPERM):
        await k.insert_notifier(dev, p.pid, 0, P)
    other = k.register_device("other", FakeDevice())
    await k.open(p.pid, "/dev/other", O_RDWR)
    with raises_errno(errno.EPERM):  # a different device does not count
        await k.insert_notifier(dev, p.pid, 0, P)
    fd, _ = await k.open(p.pid, "/dev/d", O_RDWR)
    sub = await k.insert_notifier(dev, p.pid, 0, P)
    assert sub.start == 0 and sub.last == P - 1
    await k.close(p.pid, fd)
    with raises_errno(errno.EPERM):  # closed again
        await k.insert_notifier(dev, p.pid, 0, P)
    assert other.notifiers == {}


@pytest.mark.parametrize("start,length", [(0, 0), (P, 0), (0, -1), (1, ULONG_MAX + 1), (ULONG_MAX, 2)])
async def test_insert_notifier_empty_or_wrapping_is_eoverflow(env: Env, start: int, length: int) -> None:
    with raises_errno(errno.EOVERFLOW):
        await env.k.insert_notifier(env.dev, env.p.pid, start, length)


async def test_insert_notifier_full_address_space_is_fine(env: Env) -> None:
    sub = await env.k.insert_notifier(env.dev, env.p.pid, 0, ULONG_MAX + 1)
    assert sub.last == ULONG_MAX


async def test_insert_notifier_on_exited_process_is_esrch(env: Env) -> None:
    await env.k.exit(env.p.pid)
    with raises_errno(errno.ESRCH):
        await env.k.insert_notifier(env.dev, env.p.pid, 0, P)
    with raises_errno(errno.ESRCH):
        await env.k.insert_notifier(env.dev, 12345, 0, P)


async def test_unknown_notifier_is_enoent(env: Env) -> None:
    bogus = env.sub.id + 1000
    with raises_errno(errno.ENOENT):
        await env.k.read_begin(env.dev, bogus)
    with raises_errno(errno.ENOENT):
        await env.k.range_fault(env.dev, bogus, 0, 0, P, 0, 0, b"", 0)
    with raises_errno(errno.ENOENT):
        await env.k.remove_notifier(env.dev, bogus)
    # Another device's notifier is not this device's either.
    other = env.k.register_device("other", FakeDevice())
    with raises_errno(errno.ENOENT):
        await env.k.read_begin(other, env.sub.id)
    with raises_errno(errno.ENOENT):
        await env.k.remove_notifier(other, env.sub.id)
    # A removed notifier is gone.
    await env.k.remove_notifier(env.dev, env.sub.id)
    with raises_errno(errno.ENOENT):
        await env.k.read_begin(env.dev, env.sub.id)
    with raises_errno(errno.ENOENT):
        await env.k.remove_notifier(env.dev, env.sub.id)


async def test_notifier_limit_is_enospc() -> None:
    k = Kernel(RAM_BYTES, KernelLimits(max_notifiers_per_device=2))
    env = await make_env(k)
    await k.insert_notifier(env.dev, env.p.pid, 0, P)
    with raises_errno(errno.ENOSPC):
        await k.insert_notifier(env.dev, env.p.pid, 0, P)


async def test_removed_notifier_gets_no_more_invalidations(env: Env) -> None:
    a = await env.mmap(2)
    await env.write(a, b"x")
    await env.k.remove_notifier(env.dev, env.sub.id)
    await env.k.munmap(env.p.pid, a, 2 * P)
    assert env.fake.take() == []


# ---- range fault arguments --------------------------------------------------------------


async def test_range_fault_argument_checks(env: Env) -> None:
    a = await env.mmap(4)
    narrow = await env.k.insert_notifier(env.dev, env.p.pid, a, 2 * P)
    s = await env.read_begin(narrow)
    k, dev = env.k, env.dev

    async def rf(start: int, end: int, default: int = 0, mask: int = 0, req: bytes = b"") -> None:
        await k.range_fault(dev, narrow.id, s, start, end, default, mask, req, 0)

    for start, end in [(a - P, a + P), (a + P, a + 3 * P), (a, a + 3 * P)]:  # outside the interval
        with raises_errno(errno.EINVAL):
            await rf(start, end)
    for start, end in [(a + 1, a + P), (a, a + P + 1), (a + 5, a + 7)]:  # not page-aligned
        with raises_errno(errno.EINVAL):
            await rf(start, end)
    for start, end in [(a, a), (a + P, a)]:  # empty or reversed
        with raises_errno(errno.EINVAL):
            await rf(start, end)
    with raises_errno(errno.EINVAL):  # unknown flag bits
        await rf(a, a + P, 0x80)
    with raises_errno(errno.EINVAL):
        await rf(a, a + P, 0, 0x40)
    with raises_errno(errno.EINVAL):  # one request byte per page
        await rf(a, a + 2 * P, 0, RF, bytes([RF]))
    await rf(a, a + 2 * P, RF, RQW, bytes([RQW, HMM_PFN_DMA_MAPPED]))  # the good call works
    assert env.fake.take() == []


async def test_range_fault_page_limit() -> None:
    k = Kernel(RAM_BYTES, KernelLimits(max_pages_per_request=4))
    env = await make_env(k)
    a = await env.mmap(8)
    await env.fault(a, a + 4 * P)
    with raises_errno(errno.EINVAL):
        await env.fault(a, a + 5 * P)


async def test_range_fault_after_exit_is_efault(env: Env) -> None:
    a = await env.mmap(2)
    s = await env.read_begin()
    await env.k.exit(env.p.pid)
    with raises_errno(errno.EFAULT):
        await env.k.range_fault(env.dev, env.sub.id, s, a, a + P, 0, 0, b"", 0)


# ---- DMA rights -------------------------------------------------------------------------


async def test_dma_to_frames_not_granted_is_efault_and_counted(env: Env) -> None:
    a = await env.mmap(2)
    data = pattern(2, 1)
    await env.write(a, data)
    pfns = env.pfns(a, a + 2 * P)  # the device never range-faulted them
    with raises_errno(errno.EFAULT):
        env.dma_read(pfns)
    assert env.dev.violations == 1
    with raises_errno(errno.EFAULT):
        env.dma_write(pfns, bytes(2 * P))
    assert env.dev.violations == 2
    with raises_errno(errno.EFAULT):  # frame numbers outside RAM
        env.dma_read(np.array([env.k.ram.nframes + 5]))
    assert env.dev.violations == 3
    assert await env.read(a, 2 * P) == data  # nothing was written


async def test_dma_argument_shapes_are_einval(env: Env) -> None:
    a = await env.mmap(1)
    res = await env.fault(a, a + P, RF | RQW)
    with raises_errno(errno.EINVAL):
        env.k.dma_read(env.dev, b"")
    with raises_errno(errno.EINVAL):
        env.k.dma_read(env.dev, b"\x01\x02\x03")
    with raises_errno(errno.EINVAL):  # data must be exactly one page per frame
        env.dma_write(res.pfns, bytes(P - 1))
    assert env.dev.violations == 0


async def test_dma_after_invalidation_is_efault(env: Env) -> None:
    a = await env.mmap(3)
    data = pattern(3, 2)
    await env.write(a, data)
    res = await env.fault(a, a + 3 * P, RF | RQW)
    assert env.dma_read(res.pfns) == data
    await env.k.madvise(env.p.pid, a + P, P, MADV_DONTNEED)
    assert env.dma_read(res.pfns[[0, 2]]) == data[:P] + data[2 * P :]  # untouched pages: still held
    with raises_errno(errno.EFAULT):
        env.dma_read(res.pfns[[1]])
    with raises_errno(errno.EFAULT):
        env.dma_write(res.pfns[[1]], bytes(P))
    assert env.dev.violations == 2


async def test_dma_write_to_read_only_grant_is_efault(env: Env) -> None:
    a = await env.mmap(2)
    data = pattern(2, 3)
    await env.write(a, data)
    await env.k.mprotect(env.p.pid, a, 2 * P, PROT_READ)
    res = await env.fault(a, a + 2 * P, RF)
    assert env.dma_read(res.pfns) == data
    with raises_errno(errno.EFAULT):
        env.dma_write(res.pfns, bytes(2 * P))
    assert env.dev.violations == 1
    assert await env.read(a, 2 * P) == data
    # A write grant allows it, and the CPU sees the bytes.
    await env.k.mprotect(env.p.pid, a, 2 * P, RW)
    res = await env.fault(a, a + 2 * P, RF | RQW)
    env.dma_write(res.pfns, pattern(2, 4))
    assert await env.read(a, 2 * P) == pattern(2, 4)


async def test_dma_after_notifier_removal_is_efault(env: Env) -> None:
    a = await env.mmap(1)
    await env.write(a, b"r")
    res = await env.fault(a, a + P, RF)
    await env.k.remove_notifier(env.dev, env.sub.id)
    with raises_errno(errno.EFAULT):
        env.dma_read(res.pfns)


async def test_zero_page_grant_is_read_only(env: Env) -> None:
    a = await env.mmap(1)
    res = await env.fault(a, a + P, RF)
    assert res.pfns[0] == 0
    assert env.dma_read(res.pfns) == bytes(P)
    with raises_errno(errno.EFAULT):
        env.dma_write(res.pfns, pattern(1, 5))
    assert env.k.ram.data[0].any() == False  # noqa: E712 — the zero page stays zero


# ---- mmap -------------------------------------------------------------------------------


async def test_mmap_errnos(env: Env) -> None:
    k, pid = env.k, env.p.pid
    fd, _ = await k.open(pid, "/file", O_CREAT | O_RDWR)
    ro, _ = await k.open(pid, "/file", O_RDONLY)
    cases = [
        (errno.EINVAL, (0, 0, RW, ANON, -1, 0)),  # zero length
        (errno.EINVAL, (0, P, RW, MAP_ANONYMOUS, -1, 0)),  # neither shared nor private
        (errno.EINVAL, (0, P, RW, MAP_SHARED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)),
        (errno.EINVAL, (0, P, RW, ANON, -1, 100)),  # unaligned offset
        (errno.EINVAL, (0x10_0000_0001, P, RW, ANON | MAP_FIXED, -1, 0)),  # unaligned fixed address
        (errno.EINVAL, (0, P, 0x100, ANON, -1, 0)),  # unknown prot bits (Linux ignores them)
        (errno.EPERM, (0x1000, P, RW, ANON | MAP_FIXED, -1, 0)),  # below mmap_min_addr
        (errno.ENOMEM, (TASK_SIZE - P, 2 * P, RW, ANON | MAP_FIXED, -1, 0)),  # past TASK_SIZE
        (errno.ENOMEM, (0, TASK_SIZE + P, RW, ANON, -1, 0)),  # larger than the address space
        (errno.ENOMEM, (0, P, RW, ANON | MAP_HUGETLB, -1, 0)),  # no hugetlb pages
        (errno.EBADF, (0, P, RW, MAP_SHARED, 99, 0)),  # no such fd
        (errno.EACCES, (0, P, RW, MAP_SHARED, ro, 0)),  # shared writable, file read-only
    ]
    before = env.mm.maps()
    for err, args in cases:
        with raises_errno(err):
            await k.mmap(pid, *args)
    assert env.mm.maps() == before
    # The read-only file can still be mapped shared read-only, or private writable.
    await k.mmap(pid, 0, P, PROT_READ, MAP_SHARED, ro, 0)
    await k.mmap(pid, 0, P, RW, MAP_PRIVATE, ro, 0)
    assert fd != ro


async def test_map_fixed_noreplace_over_mapping_is_eexist(env: Env) -> None:
    a = await env.mmap(2)
    await env.write(a, b"keep")
    with raises_errno(errno.EEXIST):
        await env.mmap(1, addr=a + P, flags=ANON | MAP_FIXED_NOREPLACE)
    assert await env.read(a, 4) == b"keep"
    assert env.fake.take() == []
    b = await env.mmap(1, addr=0x10_0000_0000, flags=ANON | MAP_FIXED_NOREPLACE)
    assert b == 0x10_0000_0000


async def test_mmap_takes_the_flags_linux_takes(env: Env) -> None:
    """Legacy flags are accepted (MAP_STACK: no THP), unknown bits ignored, as do_mmap()
    does; MAP_SHARED_VALIDATE refuses what it does not know (EOPNOTSUPP) and is EINVAL
    for anonymous memory, as MAP_GROWSDOWN of shared anonymous memory is."""
    k, pid = env.k, env.p.pid
    for extra in (MAP_LOCKED, MAP_NONBLOCK, MAP_DENYWRITE, MAP_EXECUTABLE, MAP_GROWSDOWN, 1 << 30):
        a = await k.mmap(pid, 0, P, RW, MAP_PRIVATE | MAP_ANONYMOUS | extra, -1, 0)
        await env.write(a, b"ok")
        assert await env.read(a, 2) == b"ok"
    s = await k.mmap(pid, 0, P, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0)
    assert env.mm.vmas.find(s).flags & VM_NOHUGEPAGE
    fd, _ = await k.open(pid, "/validate", O_CREAT | O_RDWR)
    await k.pwrite(pid, fd, 0, b"file")
    f = await k.mmap(pid, 0, P, RW, MAP_SHARED_VALIDATE, fd, 0)
    assert await env.read(f, 4) == b"file"
    with raises_errno(errno.EOPNOTSUPP):
        await k.mmap(pid, 0, P, RW, MAP_SHARED_VALIDATE | MAP_SYNC, fd, 0)
    assert await k.mmap(pid, 0, P, RW, MAP_SHARED | MAP_SYNC, fd, 0)  # ignored without VALIDATE
    for flags in (MAP_SHARED_VALIDATE | MAP_ANONYMOUS, MAP_SHARED | MAP_ANONYMOUS | MAP_GROWSDOWN):
        with raises_errno(errno.EINVAL):
            await k.mmap(pid, 0, P, RW, flags, -1, 0)


async def test_mmap_hint_is_used_when_free(env: Env) -> None:
    hint = 0x20_0000_0000
    assert await env.mmap(2, addr=hint) == hint
    b = await env.mmap(2, addr=hint)  # taken: somewhere else, nothing replaced
    assert b != hint
    assert env.fake.take() == []


# ---- munmap / mprotect / madvise --------------------------------------------------------


async def test_munmap_errnos(env: Env) -> None:
    a = await env.mmap(2)
    for args in [(a + 1, P), (a, 0), (a, -P), (TASK_SIZE - P, 2 * P)]:
        with raises_errno(errno.EINVAL):
            await env.k.munmap(env.p.pid, *args)
    assert len(env.mm.maps()) == 1


async def test_mprotect_errnos(env: Env) -> None:
    k, pid = env.k, env.p.pid
    a = await env.mmap(2)
    with raises_errno(errno.EINVAL):
        await k.mprotect(pid, a + 1, P, PROT_READ)
    with raises_errno(errno.EINVAL):
        await k.mprotect(pid, a, P, 0x100)
    with raises_errno(errno.ENOMEM):  # nothing mapped at all
        await k.mprotect(pid, 0x10_0000_0000, P, PROT_READ)
    await k.mprotect(pid, a, 0, PROT_READ)  # zero length: nothing to do
    # Nothing changed by the failures: still writable.
    await env.write(a, b"w")
    with raises_errno(errno.ENOMEM):  # runs past the mapping: as Linux, what is mapped changed first
        await k.mprotect(pid, a, 3 * P, PROT_READ)
    with raises_errno(errno.EFAULT):
        await env.write(a + P, b"w")
    await k.mprotect(pid, a, 2 * P, RW)
    fd, _ = await k.open(pid, "/ro", O_CREAT | O_RDWR)
    await k.pwrite(pid, fd, 0, b"x" * P)
    ro, _ = await k.open(pid, "/ro", O_RDONLY)
    m = await k.mmap(pid, 0, P, PROT_READ, MAP_SHARED, ro, 0)
    with raises_errno(errno.EACCES):
        await k.mprotect(pid, m, P, RW)
    with raises_errno(errno.EFAULT):
        await env.write(m, b"y")


async def test_madvise_errnos(env: Env) -> None:
    k, pid = env.k, env.p.pid
    a = await env.mmap(2)
    await env.write(a, pattern(2, 6))
    env.fake.take()
    with raises_errno(errno.EINVAL):
        await k.madvise(pid, a + 1, P, MADV_DONTNEED)
    with raises_errno(errno.EINVAL):
        await k.madvise(pid, a, P, 12345)
    with raises_errno(errno.EINVAL):
        await k.madvise(pid, a, -P, MADV_DONTNEED)
    assert env.fake.take() == []
    await k.madvise(pid, a, 0, MADV_DONTNEED)  # zero length: nothing
    assert await env.read(a, 2 * P) == pattern(2, 6)
    # Part of the range is unmapped: ENOMEM, but the mapped part was advised.
    with raises_errno(errno.ENOMEM):
        await k.madvise(pid, a, 4 * P, MADV_DONTNEED)
    assert env.fake.take() == [(Event.CLEAR, a, a + 2 * P)]
    assert await env.read(a, 2 * P) == bytes(2 * P)
    with raises_errno(errno.ENOMEM):
        await k.madvise(pid, 0x10_0000_0000, P, MADV_FREE)


# ---- mremap -----------------------------------------------------------------------------


async def test_mremap_errnos(env: Env) -> None:
    k, pid = env.k, env.p.pid
    await env.mmap(1)  # blocker: `a` cannot grow in place
    a = await env.mmap(4)
    data = pattern(4, 7)
    await env.write(a, data)
    other = await env.mmap(2)
    env.fake.take()
    cases = [
        (errno.EINVAL, (a, 4 * P, 4 * P, 0x80, 0)),  # unknown flag
        (errno.EINVAL, (a + 1, 4 * P, 4 * P, MREMAP_MAYMOVE, 0)),  # unaligned old address
        (errno.EINVAL, (a, 4 * P, 4 * P, MREMAP_FIXED, 0x10_0000_0000)),  # FIXED without MAYMOVE
        (errno.EINVAL, (a, 4 * P, 4 * P, MREMAP_DONTUNMAP, 0)),  # DONTUNMAP without MAYMOVE
        (errno.EINVAL, (a, 4 * P, 8 * P, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, 0)),  # DONTUNMAP resizes
        (errno.EINVAL, (a, 4 * P, 0, MREMAP_MAYMOVE, 0)),  # new length 0
        (errno.EINVAL, (a, 4 * P, 4 * P, MREMAP_MAYMOVE | MREMAP_FIXED, a + 2 * P)),  # overlap
        (errno.EINVAL, (a, 4 * P, 4 * P, MREMAP_MAYMOVE | MREMAP_FIXED, 0x10_0000_0001)),  # unaligned new
        (errno.EINVAL, (a, 0, P, MREMAP_MAYMOVE, 0)),  # old length 0 of a private mapping
        (errno.EFAULT, (0x10_0000_0000, P, 2 * P, MREMAP_MAYMOVE, 0)),  # nothing mapped there
        (errno.EFAULT, (a, 5 * P, 6 * P, MREMAP_MAYMOVE, 0)),  # what grows is longer than the mapping
        (errno.EFAULT, (other, 3 * P, 3 * P, MREMAP_MAYMOVE | MREMAP_FIXED, 0x10_0000_0000)),  # moves two
        (errno.EPERM, (a, 4 * P, 4 * P, MREMAP_MAYMOVE | MREMAP_FIXED, 0x1000)),  # below mmap_min_addr
        (errno.ENOMEM, (a, 4 * P, 8 * P, 0, 0)),  # cannot grow in place, may not move
        (errno.EINVAL, (a, ULONG_MAX - P + 1, P, 0, 0)),  # a shrink whose tail leaves the address space
    ]
    for err, args in cases:
        with raises_errno(err):
            await k.mremap(pid, *args)
    assert env.fake.take() == []
    assert await env.read(a, 4 * P) == data
    # Neither the same length nor a shrink looks past the first mapping (as Linux).
    assert await k.mremap(pid, other, 3 * P, 3 * P, MREMAP_MAYMOVE, 0) == other
    assert await k.mremap(pid, a, 5 * P, 2 * P, 0, 0) == a  # the tail: a's pages 2, 3 and the next page
    assert env.fake.take() == [(Event.UNMAP, a + 2 * P, a + 5 * P)]
    assert await env.read(a, 2 * P) == data[: 2 * P]
    with raises_errno(errno.EFAULT):
        await env.read(a + 2 * P, 1)


async def test_mremap_of_a_device_handle_mapping_neither_grows_nor_keeps_its_old_range(env: Env) -> None:
    """remap_is_valid(): a driver's mapping (VM_DONTEXPAND) cannot grow (EFAULT: its
    new pages could never be faulted in) nor be moved with MREMAP_DONTUNMAP (EINVAL);
    it may move whole."""
    k, pid = env.k, env.p.pid
    devfd = next(fd for fd, f in env.p.fds.items() if f.device is not None)
    a = await k.mmap(pid, 0, 2 * P, RW, MAP_PRIVATE, devfd, 0)
    with raises_errno(errno.EFAULT):
        await k.mremap(pid, a, 2 * P, 4 * P, MREMAP_MAYMOVE, 0)
    with raises_errno(errno.EINVAL):
        await k.mremap(pid, a, 2 * P, 2 * P, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, 0)
    b = await k.mremap(pid, a, 2 * P, 2 * P, MREMAP_MAYMOVE | MREMAP_FIXED, 0x10_0000_0000)
    assert await env.read(b, 2 * P) == bytes(2 * P)


# ---- exited processes -------------------------------------------------------------------


async def test_syscalls_on_exited_process_are_esrch(env: Env) -> None:
    a = await env.mmap(1)
    pid = env.p.pid
    await env.k.exit(pid)
    k = env.k
    for call in [
        k.mmap(pid, 0, P, RW, ANON, -1, 0), k.munmap(pid, a, P), k.mprotect(pid, a, P, PROT_READ),
        k.madvise(pid, a, P, MADV_DONTNEED), k.mremap(pid, a, P, P, 0, 0), k.read(pid, a, 1),
        k.write(pid, a, b"x"), k.fork(pid), k.clear_refs(pid, 4), k.exit(pid),
        k.open(pid, "/x", O_CREAT | O_RDWR),
    ]:
        with raises_errno(errno.ESRCH):
            await call


async def test_cpu_access_errnos(env: Env) -> None:
    a = await env.mmap(1, prot=PROT_READ)
    with raises_errno(errno.EFAULT):
        await env.write(a, b"x")
    with raises_errno(errno.EFAULT):
        await env.read(a + P, 1)
    with raises_errno(errno.EFAULT):
        await env.read(TASK_SIZE - 1, 2)
    w = await env.mmap(1, addr=0x10_0000_0000, flags=ANON | MAP_FIXED)  # a hole follows it
    with raises_errno(errno.EFAULT):  # a write that runs into the hole writes nothing
        await env.write(w + P - 2, b"abcd")
    assert await env.read(w, P) == bytes(P)
    assert await env.read(a, 0) == b""
    await env.write(a, b"")  # an empty write succeeds even without permission
