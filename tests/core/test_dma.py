"""DMA into and out of a buffer (the rpc layer's shared-memory staging area): the
same rights checks and errors as DMA in messages, and nothing copied on an error."""

from __future__ import annotations

import errno

import numpy as np

from hmm.abi import HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, PROT_READ
from hmmd.core.kernel import Kernel, KernelLimits

from .conftest import RAM_BYTES, Env, P, make_env, pattern, raises_errno


def u64(pfns: np.ndarray) -> bytes:
    return np.asarray(pfns, dtype="<u8").tobytes()


async def faulted(env: Env, npages: int, seed: int, flags: int = HMM_PFN_REQ_FAULT) -> tuple[int, bytes, np.ndarray]:
    a = await env.mmap(npages)
    data = pattern(npages, seed)
    await env.write(a, data)
    res = await env.fault(a, a + npages * P, flags)
    return a, data, res.pfns.astype(np.int64)


async def test_dma_read_into_copies_contiguous_and_scattered_frames(env: Env) -> None:
    _, data, pfns = await faulted(env, 6, 1)
    out = np.zeros(6 * P, dtype=np.uint8)
    env.k.dma_read_into(env.dev, u64(pfns), out)
    assert out.tobytes() == data
    order = np.array([5, 0, 3, 3, 1])  # any order, a frame twice
    out = np.zeros((5, P), dtype=np.uint8)
    env.k.dma_read_into(env.dev, u64(pfns[order]), out)
    assert out.tobytes() == b"".join(data[i * P:(i + 1) * P] for i in order)
    assert env.dev.violations == 0


async def test_dma_read_into_a_frame_not_held_is_efault_and_copies_nothing(env: Env) -> None:
    _, _, pfns = await faulted(env, 2, 2)
    b = await env.mmap(1)
    await env.write(b, pattern(1, 3))  # present, but never range-faulted by the device
    other = env.pfns(b, b + P)[0]
    out = np.full(3 * P, 0xAB, dtype=np.uint8)
    with raises_errno(errno.EFAULT):
        env.k.dma_read_into(env.dev, u64(np.array([pfns[0], other, pfns[1]])), out)
    assert (out == 0xAB).all()
    assert env.dev.violations == 1


async def test_dma_read_into_checks_the_destination_size(env: Env) -> None:
    _, _, pfns = await faulted(env, 2, 4)
    for size in (P, 3 * P, 2 * P - 1):
        with raises_errno(errno.EINVAL):
            env.k.dma_read_into(env.dev, u64(pfns), np.zeros(size, dtype=np.uint8))
    with raises_errno(errno.EINVAL):
        env.k.dma_read_into(env.dev, b"", np.zeros(0, dtype=np.uint8))
    assert env.dev.violations == 0


async def test_dma_read_into_is_not_bound_by_the_message_limit() -> None:
    env = await make_env(Kernel(RAM_BYTES, KernelLimits(max_message_bytes=64 * P)))
    n = env.k.limits.max_reply_data // P + 1
    _, data, pfns = await faulted(env, n, 5)
    with raises_errno(errno.EINVAL):
        env.dma_read(pfns)  # in a reply: too big
    out = np.empty(n * P, dtype=np.uint8)
    env.k.dma_read_into(env.dev, u64(pfns), out)
    assert out.tobytes() == data


async def test_dma_write_from_an_array_view(env: Env) -> None:
    a, _, pfns = await faulted(env, 3, 6, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE)
    area = np.frombuffer(bytearray(8 * P), dtype=np.uint8)
    new = pattern(3, 7)
    area[2 * P:5 * P] = np.frombuffer(new, dtype=np.uint8)
    env.k.dma_write(env.dev, u64(pfns), area[2 * P:5 * P])
    assert await env.read(a, 3 * P) == new
    with raises_errno(errno.EINVAL):
        env.k.dma_write(env.dev, u64(pfns), area[: 2 * P])


async def test_dma_write_from_an_array_to_a_read_only_frame_is_efault(env: Env) -> None:
    a = await env.mmap(2)
    data = pattern(2, 8)
    await env.write(a, data)
    await env.k.mprotect(env.p.pid, a, 2 * P, PROT_READ)
    pfns = (await env.fault(a, a + 2 * P, HMM_PFN_REQ_FAULT)).pfns  # read-only results
    with raises_errno(errno.EFAULT):
        env.k.dma_write(env.dev, u64(pfns), np.frombuffer(pattern(2, 9), dtype=np.uint8))
    assert await env.read(a, 2 * P) == data
    assert env.dev.violations == 1


async def test_dma_read_chunks_in_order_and_bounded_by_a_reply() -> None:
    env = await make_env(Kernel(RAM_BYTES, KernelLimits(max_message_bytes=8 * P)))
    _, data, pfns = await faulted(env, 20, 6)
    room = (8 * P - 64) // P  # 7: a reply's framing leaves room for 7 pages
    with raises_errno(errno.EINVAL):
        env.k.dma_read_chunks(env.dev, u64(pfns), room + 1)
    for chunk, sizes in ((3, [3] * 6 + [2]), (0, [room, room, 20 - 2 * room])):
        parts = [b"".join(p) for p in env.k.dma_read_chunks(env.dev, u64(pfns), chunk)]
        assert [len(p) // P for p in parts] == sizes
        assert b"".join(parts) == data
    assert env.dev.violations == 0


async def test_dma_read_chunks_checks_every_frame_first_and_each_chunk_again(env: Env) -> None:
    a, data, pfns = await faulted(env, 8, 7)
    b = await env.mmap(1)
    await env.write(b, pattern(1, 8))  # present, never range-faulted by the device
    with raises_errno(errno.EFAULT):  # before any chunk
        env.k.dma_read_chunks(env.dev, u64(np.append(pfns, env.pfns(b, b + P))), 2)
    assert env.dev.violations == 1
    chunks = env.k.dma_read_chunks(env.dev, u64(pfns), 2)
    assert b"".join(next(chunks)) == data[:2 * P]
    await env.k.mprotect(env.p.pid, a + 6 * P, 2 * P, PROT_READ)  # an invalidation revokes the last two
    assert b"".join(next(chunks)) + b"".join(next(chunks)) == data[2 * P:6 * P]
    with raises_errno(errno.EFAULT):
        next(chunks)
    assert env.dev.violations == 2
