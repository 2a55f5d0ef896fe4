"""The kernel's tools/testing/selftests/mm/hmm-tests.c, ported to hmmd.

One pytest per kernel test, named ``test_<kernel name>``, with the assertions of
HMM-SELFTESTS.md 2.2: return codes by errno name, ``cpages``/``faults`` where the
kernel checks them, and both buffers (the process's memory through the CPU, and the
mirror the device filled). Constants as the kernel: a 4 MiB buffer (N = 1024 pages),
NTIMES = 10, int32 patterns "i", "-i" and "i+c". Where hmmd must differ from the
kernel, a one-line comment says why.

Variants: "private" (devices 0 and 1) and "coherent" (devices 2 and 3), as the kernel's.

THP tests use the kernel's "THP window" (HMM-SELFTESTS.md 2.1): a mapping of two (in 35:
eight) PMDs and, inside it, the PMD-aligned window of one PMD, advised as the test says.

dmirror migrates with MIGRATE_VMA_SELECT_COMPOUND, as the newest driver: a THP, the
huge zero page or an empty THP-enabled PMD moves as one compound entry into a 512-page
device block (a device-private PMD, snapshot byte 0x26 in migrate_anon_huge_fault, 33),
and FAIL_ALLOC fails that block (or the THP on the way back) so that the driver falls
back to 512 single pages (migrate_anon_huge_err and migrate_anon_huge_zero_err, 36–37).

Not yet ported:
* benchmark_thp_migration (38): a benchmark, bench/thp_migration.py (HMM-SELFTESTS.md 2.2).
"""

from __future__ import annotations

import asyncio
import random

import numpy as np

from hmm.abi import (
    HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
    HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE,
    HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
    HMM_DMIRROR_PROT_ERROR,
    HMM_DMIRROR_PROT_NONE,
    HMM_DMIRROR_PROT_PMD,
    HMM_DMIRROR_PROT_PUD,
    HMM_DMIRROR_PROT_READ,
    HMM_DMIRROR_PROT_WRITE,
    HMM_DMIRROR_PROT_ZERO,
    MADV_COLLAPSE,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    MAP_ANONYMOUS,
    MAP_HUGETLB,
    MAP_PRIVATE,
    MAP_SHARED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    O_RDWR,
    O_TMPFILE,
    PAGE_SIZE,
    PMD_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)
from hmm.dmirror.device import (
    CMD_CHECK_EXCLUSIVE,
    CMD_EXCLUSIVE,
    CMD_FLAGS,
    CMD_MIGRATE_TO_DEV,
    CMD_MIGRATE_TO_SYS,
    CMD_READ,
    CMD_RELEASE,
    CMD_SNAPSHOT,
    CMD_WRITE,
    FLAG_FAIL_ALLOC,
)
from hmm.errors import KernelError
from hmm.process import Proc
from tests.conformance.conftest import Fixture, HmmBuffer

HMM_BUFFER_SIZE = 1024 << 12
NTIMES = 10
N = HMM_BUFFER_SIZE // PAGE_SIZE  # 1024 pages
INTS_PER_PAGE = PAGE_SIZE // 4
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
TWOMEG = 2 << 20
# read_pmd_pagesize() and default_huge_page_size(): hmmd has 2 MiB PMDs and one
# hugetlb size, 2 MiB, whose pool (hmmd --hugetlb-pages) is never empty here.
PMD = PMD_SIZE
HUGETLB_PAGE_SIZE = 2 << 20
# /proc/pid/pagemap bits.
PM_PRESENT = np.uint64(1 << 63)
PM_SWAP = np.uint64(1 << 62)

# Device numbers (the kernel's HMM_PRIVATE_DEVICE_ONE): the child in anon_write_child
# and anon_write_child_shared opens device 0 in every variant.
HMM_PRIVATE_DEVICE_ONE = 0


def align(x: int, a: int) -> int:
    """The kernel test's ALIGN(): round ``x`` up to a multiple of ``a`` (a power of two)."""
    return (x + a - 1) & ~(a - 1)


def is_coherent(variant: str) -> bool:
    """hmm_is_coherent_type(): the variant's devices hold device-coherent memory."""
    return variant == "coherent"


# ---- patterns and CPU access -------------------------------------------------------------------


def pattern(nbytes: int, c: int = 0) -> np.ndarray:
    """Pattern "i" (or "i+c"): int k holds k (+ c)."""
    return np.arange(nbytes // 4, dtype=np.int32) + np.int32(c)


def neg_pattern(nbytes: int) -> np.ndarray:
    """Pattern "-i"."""
    return -pattern(nbytes)


def assert_ints(got: np.ndarray, want: np.ndarray | int, what: str) -> None:
    """Every int equal; on failure name the first bad int, as ASSERT_EQ in the loop would."""
    want_arr = np.broadcast_to(np.asarray(want, dtype=np.int32), got.shape)
    bad = np.flatnonzero(got != want_arr)
    assert not len(bad), (f"{what}: int {bad[0]} (page {bad[0] // INTS_PER_PAGE}) is {got[bad[0]]}, "
                          f"expected {want_arr[bad[0]]} ({len(bad)} ints differ)")


def assert_bytes(got: np.ndarray, want: int, what: str) -> None:
    """Every snapshot byte equal; on failure name the first bad page."""
    bad = np.flatnonzero(got != want)
    assert not len(bad), (f"{what}: page {bad[0]} is {got[bad[0]]:#04x}, expected {want:#04x} "
                          f"({len(bad)} pages differ)")


async def cpu_read(proc: Proc, addr: int, nbytes: int) -> np.ndarray:
    """The process reads ``nbytes`` at ``addr`` as int32 (faulting device pages home)."""
    return np.frombuffer(await proc.read(addr, nbytes), dtype=np.int32)


async def cpu_write(proc: Proc, addr: int, ints: np.ndarray) -> None:
    await proc.write(addr, ints.astype(np.int32).tobytes())


async def anon_buffer(proc: Proc, size: int, prot: int = RW, flags: int = ANON,
                      mirror_size: int | None = None) -> HmmBuffer:
    buffer = HmmBuffer.new(size, mirror_size)
    buffer.ptr = await proc.mmap(size, prot, flags)
    return buffer


async def thp_window(proc: Proc, size: int, prot: int = RW, advice: int | None = MADV_HUGEPAGE,
                     map_size: int | None = None) -> tuple[int, int]:
    """The THP window: map ``map_size`` bytes (default ``2 * size``) and advise the
    ``size``-aligned ``size`` bytes at or after its start (no madvise if ``advice`` is
    None). Returns (old_ptr, map): the mapping's start and the window's."""
    old_ptr = await proc.mmap(2 * size if map_size is None else map_size, prot, ANON)
    window = align(old_ptr, size)
    if advice is not None:
        await proc.madvise(window, size, advice)
    return old_ptr, window


async def hmm_create_file(proc: Proc, size: int) -> int:
    """An unnamed temporary file of ``size`` bytes (zeros)."""
    # The kernel test adds O_EXCL, which only forbids a later linkat(); hmmd has no linkat.
    fd, _ = await proc.open("/tmp", O_TMPFILE | O_RDWR)
    await proc.ftruncate(fd, size)
    return fd


async def fork_exit(child: Proc) -> None:
    """The child's exit(0) and the parent's waitpid: the exit succeeds and the child
    is gone (reaped) afterwards."""
    await child.exit()
    try:
        await child.status()
    except KernelError as e:
        assert e.name == "ESRCH", e
    else:
        raise AssertionError(f"{child} still exists after exit")


# ---- 1-7: open, read, write, fork ----------------------------------------------------------


async def test_open_close(hmm: Fixture) -> None:
    pass  # the fixture opens device 0 and asserts that close returns 0


async def test_anon_read(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size)
    # Initialize the buffer but leave the first two pages zero (pte_none and the zero page).
    first = 2 * PAGE_SIZE // 4
    await cpu_write(hmm.proc, buffer.ptr + 2 * PAGE_SIZE, pattern(size)[first:])
    await hmm.proc.mprotect(buffer.ptr, size, PROT_READ)
    # Populate the CPU page table with the zero page.
    val = int((await cpu_read(hmm.proc, buffer.ptr + PAGE_SIZE, 4))[0])
    assert val == 0

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_READ, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    m = buffer.mirror_ints
    assert_ints(m[:first], 0, "mirror, pages 0-1")
    assert_ints(m[first:], pattern(size)[first:], "mirror")


async def test_anon_read_prot(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size)
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))
    buffer.mirror_ints[:] = neg_pattern(size)  # so that we can tell it is not written
    await hmm.proc.mprotect(buffer.ptr, size, PROT_NONE)

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_READ, buffer, npages)
    assert ret == "EFAULT"

    await hmm.proc.mprotect(buffer.ptr, size, PROT_READ)
    assert_ints(await cpu_read(hmm.proc, buffer.ptr, size), pattern(size), "buffer")
    assert_ints(buffer.mirror_ints, neg_pattern(size), "mirror")


async def test_anon_write(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size)
    buffer.mirror_ints[:] = pattern(size)

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_WRITE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert_ints(await cpu_read(hmm.proc, buffer.ptr, size), pattern(size), "buffer")


async def test_anon_write_prot(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size, PROT_READ)

    # The device reads a zero page.
    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_READ, buffer, 1)
    assert ret == 0
    assert buffer.cpages == 1
    assert buffer.faults == 1

    buffer.mirror_ints[:] = pattern(size)
    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_WRITE, buffer, npages)
    assert ret == "EPERM"
    assert_ints(await cpu_read(hmm.proc, buffer.ptr, size), 0, "buffer")

    # Now allow writing and see that the zero page is replaced.
    await hmm.proc.mprotect(buffer.ptr, size, RW)
    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_WRITE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert_ints(await cpu_read(hmm.proc, buffer.ptr, size), pattern(size), "buffer")


async def test_anon_write_child(hmm: Fixture) -> None:
    for migrate in (False, True):
        for use_thp in (False, True):
            npages = (PMD if use_thp else HMM_BUFFER_SIZE) // PAGE_SIZE
            size = npages * PAGE_SIZE
            buffer = await anon_buffer(hmm.proc, 2 * size, mirror_size=size)
            old_ptr = buffer.ptr
            if use_thp:
                buffer.ptr = align(buffer.ptr, size)
                await hmm.proc.madvise(buffer.ptr, size, MADV_HUGEPAGE)
            rnd = f"migrate={migrate}, thp={use_thp}"
            await cpu_write(hmm.proc, buffer.ptr, pattern(size))
            buffer.mirror_ints[:] = neg_pattern(size)
            if migrate:
                ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
                assert ret == 0, rnd
                assert buffer.cpages == npages

            child = await hmm.proc.fork()
            # The child (its steps all run before the parent's checks, as after waitpid).
            # It sees the parent's values; device-private pages come home through device 0.
            assert_ints(await cpu_read(child, buffer.ptr, size), pattern(size), f"child buffer, {rnd}")
            if not migrate:
                assert_ints(buffer.mirror_ints, neg_pattern(size), f"mirror, {rnd}")
            # The child needs its own mirror of its own address space.
            child_fd = await hmm.hmm_open(child, HMM_PRIVATE_DEVICE_ONE)
            ret = await hmm.hmm_dmirror_cmd(child_fd, CMD_WRITE, buffer, npages)
            assert ret == 0, rnd
            assert buffer.cpages == npages
            assert buffer.faults == 1
            if not migrate:
                assert_ints(await cpu_read(child, buffer.ptr, size), neg_pattern(size), f"child buffer, {rnd}")
            await child.close(child_fd.fd)
            await fork_exit(child)

            # The parent: its buffer did not change.
            assert_ints(await cpu_read(hmm.proc, buffer.ptr, size), pattern(size), f"parent buffer, {rnd}")
            await hmm.proc.munmap(old_ptr, buffer.size)


async def test_anon_write_child_shared(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size, RW, MAP_SHARED | MAP_ANONYMOUS)
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))
    buffer.mirror_ints[:] = neg_pattern(size)

    child = await hmm.proc.fork()
    assert_ints(await cpu_read(child, buffer.ptr, size), pattern(size), "child buffer")
    assert_ints(buffer.mirror_ints, neg_pattern(size), "mirror")
    child_fd = await hmm.hmm_open(child, HMM_PRIVATE_DEVICE_ONE)
    ret = await hmm.hmm_dmirror_cmd(child_fd, CMD_WRITE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert_ints(await cpu_read(child, buffer.ptr, size), neg_pattern(size), "child buffer")
    await child.close(child_fd.fd)
    await fork_exit(child)

    # The parent's buffer did change: shared memory, no COW.
    assert_ints(await cpu_read(hmm.proc, buffer.ptr, size), neg_pattern(size), "parent buffer")


# ---- 8-9: huge pages ----------------------------------------------------------------------------


async def test_anon_write_huge(hmm: Fixture) -> None:
    size = PMD
    npages = size // PAGE_SIZE
    buffer = HmmBuffer.new(2 * size, size)
    old_ptr, buffer.ptr = await thp_window(hmm.proc, size)
    buffer.mirror_ints[:] = pattern(size)

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_WRITE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert_ints(await cpu_read(hmm.proc, buffer.ptr, size), pattern(size), "buffer")
    await hmm.proc.munmap(old_ptr, buffer.size)


async def test_anon_write_hugetlbfs(hmm: Fixture) -> None:
    # The kernel skips when no huge page is free or the map fails; hmmd's pool has pages.
    size = align(TWOMEG, HUGETLB_PAGE_SIZE)
    npages = size // PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size, RW, ANON | MAP_HUGETLB)
    buffer.mirror_ints[:] = pattern(size)

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_WRITE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert_ints(await cpu_read(hmm.proc, buffer.ptr, size), pattern(size), "buffer")
    await hmm.proc.munmap(buffer.ptr, buffer.size)


# ---- 10-11: file mappings ---------------------------------------------------------------------


async def test_file_read(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    fd = await hmm_create_file(hmm.proc, size)
    buffer = HmmBuffer.new(size)
    buffer.fd = fd
    # Write the initial contents of the file.
    buffer.mirror_ints[:] = pattern(size)
    await hmm.proc.pwrite(fd, 0, buffer.mirror.tobytes())
    buffer.mirror[:] = 0
    buffer.ptr = await hmm.proc.mmap(size, PROT_READ, MAP_SHARED, fd=fd)

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_READ, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert_ints(buffer.mirror_ints, pattern(size), "mirror")
    await hmm.proc.munmap(buffer.ptr, size)
    await hmm.proc.close(fd)


async def test_file_write(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    fd = await hmm_create_file(hmm.proc, size)
    buffer = HmmBuffer.new(size)
    buffer.fd = fd
    buffer.ptr = await hmm.proc.mmap(size, RW, MAP_SHARED, fd=fd)
    buffer.mirror_ints[:] = pattern(size)

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_WRITE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert_ints(await cpu_read(hmm.proc, buffer.ptr, size), pattern(size), "buffer")
    # The device also wrote the file.
    data = await hmm.proc.pread(fd, 0, size)
    assert len(data) == size
    assert_ints(np.frombuffer(data, dtype=np.int32), pattern(size), "file")
    await hmm.proc.munmap(buffer.ptr, size)
    await hmm.proc.close(fd)


# ---- 12-18: migration ---------------------------------------------------------------------------


async def test_migrate(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size)
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert_ints(buffer.mirror_ints, pattern(size), "mirror")


async def test_migrate_file_private(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    fd = await hmm_create_file(hmm.proc, size)
    buffer = HmmBuffer.new(size)
    buffer.fd = fd
    buffer.ptr = await hmm.proc.mmap(size, RW, MAP_PRIVATE, fd=fd)
    # Every page becomes a private anonymous copy.
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert_ints(buffer.mirror_ints, pattern(size), "mirror")
    await hmm.proc.munmap(buffer.ptr, size)
    await hmm.proc.close(fd)


async def test_migrate_fault(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size)
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert_ints(buffer.mirror_ints, pattern(size), "mirror")

    # Fault half the pages back to system memory and check them.
    assert_ints(await cpu_read(hmm.proc, buffer.ptr, size // 2), pattern(size // 2), "buffer, first half")

    # Migrate the mix of system and device pages to the device again.
    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert_ints(buffer.mirror_ints, pattern(size), "mirror")


async def test_migrate_release(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size)
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert_ints(buffer.mirror_ints, pattern(size), "mirror")

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_RELEASE, buffer, npages)
    assert ret == 0

    # Eviction preserved the data.
    assert_ints(await cpu_read(hmm.proc, buffer.ptr, size // 2), pattern(size // 2), "buffer, first half")


async def test_migrate_shared(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size, RW, MAP_SHARED | MAP_ANONYMOUS)

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == "ENOENT"


async def test_migrate_mixed(hmm2: Fixture) -> None:
    proc = hmm2.proc
    npages = 6
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(proc, size, PROT_NONE)
    p = buffer.ptr

    # Migrating a protected area is an error.
    ret = await hmm2.hmm_dmirror_cmd(hmm2.fd1, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == "EINVAL"

    # Punch a hole after the first page: the VMA does not cover the range.
    await proc.munmap(p + PAGE_SIZE, PAGE_SIZE)
    ret = await hmm2.hmm_dmirror_cmd(hmm2.fd1, CMD_MIGRATE_TO_DEV, buffer, 3)
    assert ret == "EINVAL"

    # Page 2: a read-only zero page.
    await proc.mprotect(p + 2 * PAGE_SIZE, PAGE_SIZE, PROT_READ)
    val = int((await cpu_read(proc, p + 2 * PAGE_SIZE, 4))[0]) + 3
    assert val == 3
    # Page 3: read-only.
    await proc.mprotect(p + 3 * PAGE_SIZE, PAGE_SIZE, RW)
    await cpu_write(proc, p + 3 * PAGE_SIZE, np.array([val]))
    await proc.mprotect(p + 3 * PAGE_SIZE, PAGE_SIZE, PROT_READ)
    # Pages 4-5: read-write.
    await proc.mprotect(p + 4 * PAGE_SIZE, 2 * PAGE_SIZE, RW)
    await cpu_write(proc, p + 4 * PAGE_SIZE, np.array([val]))
    await cpu_write(proc, p + 5 * PAGE_SIZE, np.array([val]))

    # Migrate pages 2-5 to device 1.
    buffer.ptr = p + 2 * PAGE_SIZE
    ret = await hmm2.hmm_dmirror_cmd(hmm2.fd1, CMD_MIGRATE_TO_DEV, buffer, 4)
    assert ret == 0
    assert buffer.cpages == 4

    # Page 5 is on device 1: not collected for device 0, which has no entry for it.
    buffer.ptr = p + 5 * PAGE_SIZE
    ret = await hmm2.hmm_dmirror_cmd(hmm2.fd0, CMD_MIGRATE_TO_DEV, buffer, 1)
    assert ret == "ENOENT"
    buffer.ptr = p


async def test_migrate_multiple(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    for c in range(NTIMES):
        buffer = await anon_buffer(hmm.proc, size)
        await cpu_write(hmm.proc, buffer.ptr, pattern(size))

        ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
        assert ret == 0, f"round {c}"
        assert buffer.cpages == npages
        assert_ints(buffer.mirror_ints, pattern(size), f"mirror, round {c}")

        # Coherent pages are moved back explicitly (the CPU would read them in place).
        if is_coherent(hmm.variant):
            ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_SYS, buffer, npages)
            assert ret == 0
            assert buffer.cpages == npages

        # Private pages come back through CPU faults.
        assert_ints(await cpu_read(hmm.proc, buffer.ptr, size), pattern(size), f"buffer, round {c}")
        await hmm.proc.munmap(buffer.ptr, size)


# ---- 19-20: repeated reads, teardown race -------------------------------------------------------


async def test_anon_read_multiple(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    for c in range(NTIMES):
        buffer = await anon_buffer(hmm.proc, size)
        await cpu_write(hmm.proc, buffer.ptr, pattern(size, c))

        ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_READ, buffer, npages)
        assert ret == 0, f"round {c}"
        assert buffer.cpages == npages
        assert buffer.faults == 1
        assert_ints(buffer.mirror_ints, pattern(size, c), f"mirror, round {c}")
        await hmm.proc.munmap(buffer.ptr, size)


async def test_anon_teardown(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    rnd = random.Random(20)  # the kernel draws from /dev/urandom; seeded here to be repeatable
    for c in range(NTIMES):
        buffer = await anon_buffer(hmm.proc, size)
        await cpu_write(hmm.proc, buffer.ptr, pattern(size, c))

        async def unmap_buffer(buffer: HmmBuffer = buffer) -> None:
            # Delay for a bit, then unmap the second half while the device reads it.
            await asyncio.sleep(rnd.randrange(32000) / 1e9)
            await hmm.proc.munmap(buffer.ptr + buffer.size // 2, buffer.size // 2)

        thread = asyncio.ensure_future(unmap_buffer())
        rc = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_READ, buffer, npages)
        if rc == 0:
            assert buffer.cpages == npages
            assert buffer.faults == 1
            assert_ints(buffer.mirror_ints, pattern(size, c), f"mirror, round {c}")
        # Any error is accepted.
        await thread  # pthread_join
        await hmm.proc.munmap(buffer.ptr, size)


# ---- 22, 24: snapshot, two devices ------------------------------------------------------------


async def test_mixedmap(hmm: Fixture) -> None:
    """Map one page of the device handle itself, private and writable: the driver's
    zeroed page is a normal page, mapped read-only."""
    buffer = HmmBuffer.new(PAGE_SIZE, 1)
    buffer.ptr = await hmm.proc.mmap(PAGE_SIZE, RW, MAP_PRIVATE, fd=hmm.fd.fd)
    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_SNAPSHOT, buffer, 1)
    assert ret == 0
    assert buffer.cpages == 1
    assert int(buffer.mirror[0]) == HMM_DMIRROR_PROT_READ


async def test_snapshot(hmm2: Fixture) -> None:
    proc = hmm2.proc
    npages = 7
    size = npages * PAGE_SIZE
    # The kernel's mirror is npages bytes, which the 4 KiB read-back of each one-page
    # MIGRATE_TO_DEV below overruns; this one has room for it.
    buffer = await anon_buffer(proc, size, PROT_NONE)
    p = buffer.ptr

    # Punch a hole after the first page.
    await proc.munmap(p + PAGE_SIZE, PAGE_SIZE)
    # Page 2: a read-only zero page.
    await proc.mprotect(p + 2 * PAGE_SIZE, PAGE_SIZE, PROT_READ)
    val = int((await cpu_read(proc, p + 2 * PAGE_SIZE, 4))[0]) + 3
    assert val == 3
    # Page 3: read-only.
    await proc.mprotect(p + 3 * PAGE_SIZE, PAGE_SIZE, RW)
    await cpu_write(proc, p + 3 * PAGE_SIZE, np.array([val]))
    await proc.mprotect(p + 3 * PAGE_SIZE, PAGE_SIZE, PROT_READ)
    # Pages 4-6: read-write; only page 4 is written.
    await proc.mprotect(p + 4 * PAGE_SIZE, 3 * PAGE_SIZE, RW)
    await cpu_write(proc, p + 4 * PAGE_SIZE, np.array([val]))

    # Page 5 goes to device 0.
    buffer.ptr = p + 5 * PAGE_SIZE
    ret = await hmm2.hmm_dmirror_cmd(hmm2.fd0, CMD_MIGRATE_TO_DEV, buffer, 1)
    assert ret == 0
    assert buffer.cpages == 1
    # Page 6 goes to device 1.
    buffer.ptr = p + 6 * PAGE_SIZE
    ret = await hmm2.hmm_dmirror_cmd(hmm2.fd1, CMD_MIGRATE_TO_DEV, buffer, 1)
    assert ret == 0
    assert buffer.cpages == 1

    buffer.ptr = p
    ret = await hmm2.hmm_dmirror_cmd(hmm2.fd0, CMD_SNAPSHOT, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    m = list(buffer.mirror[:npages])
    assert m[0] == HMM_DMIRROR_PROT_ERROR
    assert m[1] == HMM_DMIRROR_PROT_ERROR
    assert m[2] == HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ
    assert m[3] == HMM_DMIRROR_PROT_READ
    assert m[4] == HMM_DMIRROR_PROT_WRITE
    if not is_coherent(hmm2.variant):
        assert m[5] == HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE
        assert m[6] == HMM_DMIRROR_PROT_NONE  # another device's private page is not valid here
    else:
        assert m[5] == HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE
        assert m[6] == HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | HMM_DMIRROR_PROT_WRITE


async def test_compound(hmm: Fixture) -> None:
    # The kernel skips when no huge page is free, and passes if the map fails; hmmd's
    # pool has pages, so the map must succeed.
    size = align(TWOMEG, HUGETLB_PAGE_SIZE)
    npages = size // PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size, RW, ANON | MAP_HUGETLB, mirror_size=npages)
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_SNAPSHOT, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    # One huge page, reported at PMD or PUD level: the level of page 0, for every page.
    m = buffer.mirror
    prot = HMM_DMIRROR_PROT_WRITE | (HMM_DMIRROR_PROT_PUD if m[0] & HMM_DMIRROR_PROT_PUD else HMM_DMIRROR_PROT_PMD)
    assert_bytes(m, prot, "snapshot")

    await hmm.proc.mprotect(buffer.ptr, size, PROT_READ)
    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_SNAPSHOT, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    m = buffer.mirror
    prot = HMM_DMIRROR_PROT_READ | (HMM_DMIRROR_PROT_PUD if m[0] & HMM_DMIRROR_PROT_PUD else HMM_DMIRROR_PROT_PMD)
    assert_bytes(m, prot, "snapshot after mprotect")
    await hmm.proc.munmap(buffer.ptr, buffer.size)


async def test_double_map(hmm2: Fixture) -> None:
    proc = hmm2.proc
    npages = 6
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(proc, size)
    await cpu_write(proc, buffer.ptr, pattern(size))
    await proc.mprotect(buffer.ptr, size, PROT_READ)

    for fd in (hmm2.fd0, hmm2.fd1):
        ret = await hmm2.hmm_dmirror_cmd(fd, CMD_READ, buffer, npages)
        assert ret == 0
        assert buffer.cpages == npages
        assert buffer.faults == 1
        assert_ints(buffer.mirror_ints, pattern(size), "mirror")

    # Migrate the pages to device 1 (a read-only VMA is fine), then read from device 0.
    ret = await hmm2.hmm_dmirror_cmd(hmm2.fd1, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages

    ret = await hmm2.hmm_dmirror_cmd(hmm2.fd0, CMD_READ, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert buffer.faults == 1
    assert_ints(buffer.mirror_ints, pattern(size), "mirror")


# ---- 25-27: device-exclusive access -------------------------------------------------------------


async def cpu_read_increment(proc: Proc, addr: int, size: int) -> None:
    """for (i...) ASSERT_EQ(ptr[i]++, i); then every int = i + 1. The first touch of
    each page revokes exclusive access."""
    assert_ints(await cpu_read(proc, addr, size), pattern(size), "buffer before increment")
    await cpu_write(proc, addr, pattern(size, 1))
    assert_ints(await cpu_read(proc, addr, size), pattern(size, 1), "buffer after increment")


async def test_exclusive(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size)
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_EXCLUSIVE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert_ints(buffer.mirror_ints, pattern(size), "mirror")

    await cpu_read_increment(hmm.proc, buffer.ptr, size)

    # Atomic access was revoked.
    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_CHECK_EXCLUSIVE, buffer, npages)
    assert ret == 0


async def test_exclusive_mprotect(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size)
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_EXCLUSIVE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert_ints(buffer.mirror_ints, pattern(size), "mirror")

    await hmm.proc.mprotect(buffer.ptr, size, PROT_READ)
    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_WRITE, buffer, npages)
    assert ret == "EPERM"


async def test_exclusive_cow(hmm: Fixture) -> None:
    npages = N
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size)
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_EXCLUSIVE, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages

    # Exclusive entries become normal ones at fork; both processes then run the same code.
    child = await hmm.proc.fork()
    await cpu_read_increment(child, buffer.ptr, size)
    await fork_exit(child)
    await cpu_read_increment(hmm.proc, buffer.ptr, size)


# ---- 28-29: device pages under GUP and COW ---------------------------------------------------


async def test_hmm_gup_test(hmm: Fixture) -> None:
    npages = 4
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size)
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert_ints(buffer.mirror_ints, pattern(size), "mirror")

    # The kernel's gup_test flavours, one page each, all with FOLL_WRITE: GUP_BASIC_TEST
    # and GUP_FAST_BENCHMARK are pin_user_pages without longterm (hmmd has no separate
    # get_user_pages or fast path: both fault the page in for writing); PIN_FAST_BENCHMARK
    # with FOLL_LONGTERM and PIN_LONGTERM_BENCHMARK are pin_user_pages with longterm.
    await hmm.proc.pin_user_pages(buffer.ptr, 1, write=True)
    await hmm.proc.pin_user_pages(buffer.ptr + PAGE_SIZE, 1, write=True)
    await hmm.proc.pin_user_pages(buffer.ptr + 2 * PAGE_SIZE, 1, write=True, longterm=True)
    await hmm.proc.pin_user_pages(buffer.ptr + 3 * PAGE_SIZE, 1, write=True, longterm=True)

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_SNAPSHOT, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    m = list(buffer.mirror[:npages])
    if not is_coherent(hmm.variant):
        # GUP faulted the private pages back to system memory.
        assert m[0] == HMM_DMIRROR_PROT_WRITE
        assert m[1] == HMM_DMIRROR_PROT_WRITE
    else:
        # Short-term GUP leaves coherent pages on the device.
        assert m[0] == HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE
        assert m[1] == HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE
    # Long-term pins force system memory.
    assert m[2] == HMM_DMIRROR_PROT_WRITE
    assert m[3] == HMM_DMIRROR_PROT_WRITE
    # No corrupted data.
    assert_ints(await cpu_read(hmm.proc, buffer.ptr, size), pattern(size), "buffer")


async def test_hmm_cow_in_device(hmm: Fixture) -> None:
    npages = 4
    size = npages * PAGE_SIZE
    buffer = await anon_buffer(hmm.proc, size)
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages

    # The child only spins until it is killed: it stays alive, doing nothing.
    child = await hmm.proc.fork()
    # The parent writes the COW pages: each write migrates its page home, then copies it.
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))
    # The kernel kills the child and checks that the wait reports the signal; the
    # emulated process has no signals, so the child exits instead.
    await fork_exit(child)

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_SNAPSHOT, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert list(buffer.mirror[:npages]) == [HMM_DMIRROR_PROT_WRITE] * npages



# ---- 30-37: THP migration ---------------------------------------------------------------------


async def test_migrate_anon_huge_empty(hmm: Fixture) -> None:
    size = PMD
    npages = size // PAGE_SIZE
    buffer = HmmBuffer.new(2 * size, size)
    buffer.mirror[:] = 0xFF
    old_ptr, buffer.ptr = await thp_window(hmm.proc, size, PROT_READ)

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert_ints(buffer.mirror_ints, 0, "mirror")
    await hmm.proc.munmap(old_ptr, buffer.size)


async def test_migrate_anon_huge_zero(hmm: Fixture) -> None:
    size = PMD
    npages = size // PAGE_SIZE
    buffer = HmmBuffer.new(2 * size, size)
    buffer.mirror[:] = 0xFF
    old_ptr, buffer.ptr = await thp_window(hmm.proc, size, PROT_READ)
    # A read installs the read-only huge zero page.
    val = int((await cpu_read(hmm.proc, buffer.ptr, 4))[0])
    assert val == 0

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert_ints(buffer.mirror_ints, 0, "mirror")
    # Fault the pages back to system memory and check them.
    assert_ints(await cpu_read(hmm.proc, buffer.ptr, size), 0, "buffer")
    await hmm.proc.munmap(old_ptr, buffer.size)


async def test_migrate_anon_huge_free(hmm: Fixture) -> None:
    size = PMD
    npages = size // PAGE_SIZE
    buffer = HmmBuffer.new(2 * size, size)
    buffer.mirror[:] = 0xFF
    old_ptr, buffer.ptr = await thp_window(hmm.proc, size)
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert_ints(buffer.mirror_ints, pattern(size), "mirror")
    # Try freeing it.
    await hmm.proc.madvise(buffer.ptr, size, MADV_FREE)
    await hmm.proc.munmap(old_ptr, buffer.size)


async def test_migrate_anon_huge_fault(hmm: Fixture) -> None:
    size = PMD
    npages = size // PAGE_SIZE
    buffer = HmmBuffer.new(2 * size, size)
    buffer.mirror[:] = 0xFF
    old_ptr, buffer.ptr = await thp_window(hmm.proc, size, advice=None)
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))
    await hmm.proc.madvise(buffer.ptr, size, MADV_COLLAPSE)

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert_ints(buffer.mirror_ints, pattern(size), "mirror")

    if not is_coherent(hmm.variant):
        ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_SNAPSHOT, buffer, npages)
        assert ret == 0
        assert buffer.cpages == npages
        assert_bytes(buffer.mirror[:npages],
                     HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD, "snapshot")
        # /proc/self/pagemap: every page is a swap (device-private) entry, not present.
        entries = await hmm.proc.pagemap(buffer.ptr, npages)
        assert len(entries) == npages
        bad = np.flatnonzero((entries & PM_SWAP) == 0)
        assert not len(bad), f"pagemap: page {bad[0]} has no swap bit ({entries[bad[0]]:#x})"
        bad = np.flatnonzero(entries & PM_PRESENT)
        assert not len(bad), f"pagemap: page {bad[0]} is present ({entries[bad[0]]:#x})"

    # Fault the pages back to system memory and check them.
    assert_ints(await cpu_read(hmm.proc, buffer.ptr, size), pattern(size), "buffer")
    await hmm.proc.munmap(old_ptr, buffer.size)


async def test_migrate_partial_unmap_fault(hmm: Fixture) -> None:
    size = PMD
    unmap_size = size // 2
    offsets = (0, size // 4, size // 2)
    for use_thp in (False, True):
        for off in offsets:
            rnd = f"thp={use_thp}, offset={off:#x}"
            npages = size // PAGE_SIZE
            buffer = HmmBuffer.new(2 * size, size)
            buffer.mirror[:] = 0xFF
            old_ptr, buffer.ptr = await thp_window(hmm.proc, size,
                                                   advice=MADV_HUGEPAGE if use_thp else MADV_NOHUGEPAGE)
            await cpu_write(hmm.proc, buffer.ptr, pattern(size))

            ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
            assert ret == 0, rnd
            assert buffer.cpages == npages, rnd
            assert_ints(buffer.mirror_ints, pattern(size), f"mirror, {rnd}")

            await hmm.proc.munmap(buffer.ptr + off, unmap_size)
            # Fault the still-mapped pages back to system memory and check them.
            ints = pattern(size)
            if off:
                assert_ints(await cpu_read(hmm.proc, buffer.ptr, off), ints[: off // 4], f"buffer, {rnd}")
            end = off + unmap_size
            if end < size:
                assert_ints(await cpu_read(hmm.proc, buffer.ptr + end, size - end), ints[end // 4:],
                            f"buffer, {rnd}")
            await hmm.proc.munmap(old_ptr, buffer.size)


async def test_migrate_remap_fault(hmm: Fixture) -> None:
    size = PMD
    offsets = (0, size // 4, size // 2)
    for before in (False, True):
        for dont_unmap in (False, True):
            for use_thp in (False, True):
                for off in offsets:
                    rnd = f"before={before}, dont_unmap={dont_unmap}, thp={use_thp}, offset={off:#x}"
                    flags = MREMAP_MAYMOVE | MREMAP_FIXED | (MREMAP_DONTUNMAP if dont_unmap else 0)
                    npages = size // PAGE_SIZE
                    buffer = HmmBuffer.new(8 * size, size)
                    buffer.mirror[:] = 0xFF
                    old_ptr, window = await thp_window(hmm.proc, size, map_size=buffer.size,
                                                       advice=MADV_HUGEPAGE if use_thp else MADV_NOHUGEPAGE)
                    await hmm.proc.munmap(window + size, 2 * size)
                    buffer.ptr = window
                    await cpu_write(hmm.proc, buffer.ptr, pattern(size))

                    new_ptr = 0
                    if before:
                        new_ptr = await hmm.proc.mremap(window, size, size, flags, window + size + off)
                        assert new_ptr == window + size + off, rnd
                        buffer.ptr = new_ptr

                    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
                    assert ret == 0, rnd
                    assert buffer.cpages == npages, rnd
                    assert_ints(buffer.mirror_ints, pattern(size), f"mirror, {rnd}")

                    if not before:
                        new_ptr = await hmm.proc.mremap(window, size, size, flags, window + size + off)
                        assert new_ptr == window + size + off, rnd
                        buffer.ptr = new_ptr

                    # Fault the pages back to system memory and check them.
                    assert_ints(await cpu_read(hmm.proc, buffer.ptr, size), pattern(size), f"buffer, {rnd}")
                    await hmm.proc.munmap(new_ptr, size)
                    await hmm.proc.munmap(old_ptr, buffer.size)


async def test_migrate_anon_huge_err(hmm: Fixture) -> None:
    size = PMD
    npages = size // PAGE_SIZE
    buffer = HmmBuffer.new(2 * size)
    buffer.mirror[:] = 0xFF
    old_ptr, buffer.ptr = await thp_window(hmm.proc, size)
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))

    # Migrate to the device, but the THP allocation fails (512 single pages instead).
    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_FLAGS, buffer, FLAG_FAIL_ALLOC)
    assert ret == 0
    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert_ints(buffer.mirror_ints[: size // 4], pattern(size), "mirror")
    # Fault back a single page.
    assert int((await cpu_read(hmm.proc, buffer.ptr + 2048 * 4, 4))[0]) == 2048

    # Unmap and map again to reset things.
    await hmm.proc.munmap(old_ptr, 2 * size)
    old_ptr, buffer.ptr = await thp_window(hmm.proc, size)
    await cpu_write(hmm.proc, buffer.ptr, pattern(size))

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    # Migrate back, but the THP allocation in system memory fails (cpages not checked).
    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_FLAGS, buffer, FLAG_FAIL_ALLOC)
    assert ret == 0
    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_SYS, buffer, npages)
    assert ret == 0
    assert int((await cpu_read(hmm.proc, buffer.ptr + 2048 * 4, 4))[0]) == 2048
    await hmm.proc.munmap(old_ptr, buffer.size)


async def test_migrate_anon_huge_zero_err(hmm: Fixture) -> None:
    size = PMD
    npages = size // PAGE_SIZE
    buffer = HmmBuffer.new(2 * size)
    buffer.mirror[:] = 0xFF
    old_ptr, buffer.ptr = await thp_window(hmm.proc, size, PROT_READ)

    # Migrate to the device, but the THP allocation fails (512 zeroed single pages).
    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_FLAGS, buffer, FLAG_FAIL_ALLOC)
    assert ret == 0
    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    assert_ints(buffer.mirror_ints[: size // 4], 0, "mirror")
    # Fault back a single page.
    assert int((await cpu_read(hmm.proc, buffer.ptr + 2048 * 4, 4))[0]) == 0

    # Unmap and map again to reset things.
    await hmm.proc.munmap(old_ptr, 2 * size)
    old_ptr, buffer.ptr = await thp_window(hmm.proc, size, PROT_READ)
    # Install the huge zero page. The kernel reads through the old window's pointer,
    # which works only if the new mapping lands where the old one was (HMM-SELFTESTS.md 2.2).
    assert int((await cpu_read(hmm.proc, buffer.ptr, 4))[0]) == 0

    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_FLAGS, buffer, FLAG_FAIL_ALLOC)
    assert ret == 0
    ret = await hmm.hmm_dmirror_cmd(hmm.fd, CMD_MIGRATE_TO_DEV, buffer, npages)
    assert ret == 0
    assert buffer.cpages == npages
    # Fault the device memory back and check it.
    assert_ints(await cpu_read(hmm.proc, buffer.ptr, size), 0, "buffer")
    await hmm.proc.munmap(old_ptr, buffer.size)
