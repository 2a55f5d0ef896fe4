"""The emulated kernel: processes and their files, devices and their notifiers.

This is the core's front door. Each public method is one system call or one
driver-facing kernel function, validates its arguments (bad input raises
KernelError and changes nothing), and delegates to the module that models the
concept. The rpc layer calls exactly one of these per request.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import re
import time
from collections.abc import Callable, Collection, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hmm.abi import (
    HMM_PFN_INOUT_FLAGS,
    HMM_PFN_REQ_MASK,
    HMM_PFN_VALID,
    HMM_PFN_WRITE,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_REMOVE,
    MAP_ANONYMOUS,
    MIGRATE_PFN_COMPOUND,
    MIGRATE_PFN_DST_FLAGS,
    MIGRATE_PFN_MIGRATE,
    MIGRATE_PFN_SYSTEM_DATA,
    MIGRATE_PFN_VALID,
    MIGRATE_SETUP_BYTES_PER_PAGE,
    MIGRATE_VMA_SELECT_COMPOUND,
    MIGRATE_VMA_SELECT_DEVICE_COHERENT,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
    MIGRATE_VMA_SELECT_SYSTEM,
    O_ACCMODE,
    O_CREAT,
    O_RDONLY,
    O_RDWR,
    O_TMPFILE,
    O_TRUNC,
    O_WRONLY,
    PAGE_SHIFT,
    PAGE_SIZE,
    PTRS_PER_PTE,
    RANGE_FAULT_BYTES_PER_PAGE,
    ULONG_MAX,
)
from hmm.errors import KernelError
from hmmd.core import rmap
from hmmd.core.compaction import compact
from hmmd.core.device import Device, DeviceNotifierOps, DeviceOps
from hmmd.core.devmem import DeviceMemory, DevicePageMap, MemoryKind
from hmmd.core.evict import (
    Eviction,
    migrate_device_coherent,
    migrate_device_finalize,
    migrate_device_pages,
    migrate_device_setup,
)
from hmmd.core.exclusive import make_device_exclusive
from hmmd.core.fault import cpu_read, cpu_write
from hmmd.core.gup import faultin_page_range, get_user_pages, pagemap, put_user_pages
from hmmd.core.hmm import HmmRange, HmmResult, hmm_range_fault
from hmmd.core.hugetlbfs import HPAGE_SIZE, HUGETLBFS_MOUNT, HugetlbInode, on_hugetlbfs
from hmmd.core.migrate import Migration, fault_range, migrate_vma_finalize, migrate_vma_pages, migrate_vma_setup
from hmmd.core.mm import AddressSpace, madvise_end
from hmmd.core.notifier import IntervalNotifier
from hmmd.core.pagetable import SWP_DEVICE_PRIVATE, pte_pfn, pte_swp_type
from hmmd.core.physmem import Buffer, Contents, OutOfMemoryError, PhysMem, distinct
from hmmd.core.reclaim import Reclaimer, reclaiming, reclaims
from hmmd.core.stats import Latencies
from hmmd.core.swap import SwapSpace
from hmmd.core.tmpfs import MAX_FILE_SIZE, Inode, Tmpfs
from hmmd.core.trace import Tracer, traced_syscall

log = logging.getLogger(__name__)

DEV_PREFIX = "/dev/"
# It lands in /dev paths, log lines, trace events and metrics labels: no '/', no control characters.
DEVICE_NAME = re.compile(r"[A-Za-z0-9._:-]{1,64}")
PATH_MAX = 4096  # including the terminating NUL, as in Linux
LOFF_MAX = (1 << 63) - 1  # file offsets and counts are signed 64-bit (loff_t, ssize_t)
REPLY_OVERHEAD = 64  # protobuf framing around the data of a reply
OOM_REAP_PASSES = 10  # the OOM reaper's tries, this far apart (MAX_OOM_REAP_RETRIES, HZ/10)
OOM_REAP_INTERVAL_S = 0.1
# An allocation waits this long at most for the OOM killer's victim to exit (its
# reaper's passes, then its exit, whose invalidations wait for the devices' acks).
OOM_WAIT_S = 10.0
OOM_SCORE_ADJ_MIN, OOM_SCORE_ADJ_MAX = -1000, 1000


@dataclass(eq=False)
class OpenFile:
    """An open file description: a tmpfs inode or a device, shared by dup'd fds."""

    id: int
    flags: int
    inode: Inode | None = None
    device: Device | None = None
    opener: int = 0
    refs: int = 1

    @property
    def readable(self) -> bool:
        return (self.flags & O_ACCMODE) in (O_RDONLY, O_RDWR)

    @property
    def writable(self) -> bool:
        return (self.flags & O_ACCMODE) in (O_WRONLY, O_RDWR)


@dataclass(eq=False)
class Process:
    pid: int
    name: str
    mm: AddressSpace
    parent: int = 0
    fds: dict[int, OpenFile] = field(default_factory=dict)
    killed: bool = False  # by the OOM killer: no more calls; listed (and its memory live) until reaped
    oom_score_adj: int = 0  # /proc/<pid>/oom_score_adj: OOM_SCORE_ADJ_MIN never chosen; fork inherits it
    exited: asyncio.Event = field(default_factory=asyncio.Event)  # its memory and files released

    def new_fd(self, f: OpenFile) -> int:
        fd = 3
        while fd in self.fds:
            fd += 1
        self.fds[fd] = f
        return fd


@dataclass
class OomReaped:
    """What the OOM reaper did before its victim exited."""

    complete: bool = False  # a pass emptied every mapping it may
    passes: int = 0
    pages: int = 0  # resident pages it freed (the exit freed the rest)


@dataclass(frozen=True)
class KernelLimits:
    max_pages_per_request: int = 1 << 20
    max_notifiers_per_device: int = 4096
    # The transport's message limit: a reply that cannot fit is refused up front.
    max_message_bytes: int = 64 << 20
    # How long a device may keep pages locked after MakeExclusive before the daemon
    # unlocks them itself (a device that never calls UnlockPages must not hang CPU faults).
    page_lock_timeout_s: float = 5.0
    # How long a migration or eviction may stay open (it holds mmap locks) before
    # the daemon rolls it back; the device's later calls on it get ENOENT.
    migration_timeout_s: float = 30.0

    @property
    def max_reply_data(self) -> int:
        """The most bytes one reply can carry (room left for its framing)."""
        return self.max_message_bytes - REPLY_OVERHEAD


# The device-coherent window: address space for coherent device memory above RAM
# (backed lazily, like RAM; each page costs a few bytes of counts).
DEFAULT_COHERENT_BYTES = 1 << 30
DEFAULT_SWAP_BYTES = 1 << 30  # swap space for MADV_PAGEOUT (stored as the pages' bytes)
FENCED_KEPT = 16  # fenced devices Stats still lists once forgotten: the last of each name


class Kernel:
    """Owns RAM, the tmpfs, the process table and the device registry."""

    def __init__(self, ram_bytes: int, limits: KernelLimits | None = None, hugetlb_pages: int = 0,
                 coherent_bytes: int = DEFAULT_COHERENT_BYTES, swap_bytes: int = DEFAULT_SWAP_BYTES,
                 oom_killer: bool = True) -> None:
        self.ram = PhysMem(max(2, ram_bytes // PAGE_SIZE), hugetlb_pages, coherent_bytes // PAGE_SIZE)
        self.swap = SwapSpace(swap_bytes // PAGE_SIZE)
        self.reclaimer = Reclaimer(self.ram.nframes)
        self.oom_killer = oom_killer  # off: an allocation reclaim cannot satisfy is ENOMEM
        self.oom_kills = 0  # victims the OOM killer chose itself (/proc/vmstat oom_kill)
        self.devmem = DeviceMemory(self.ram)
        self.ram.on_device_free = self.devmem.coherent_freed
        self.devmem.on_free = self._page_free
        self.devmem.on_fault = self._migrate_to_ram
        self.fault_plans: dict[str, dict[str, int]] = {}  # device name -> faults injected at connect
        # fault token -> (mm, addr, pfn) of the fault, and the migrations set up with
        # it (they borrow the fault's mmap lock)
        self._fault_tokens: dict[int, tuple[AddressSpace, int, int, list[Migration]]] = {}
        self._tokens = itertools.count(1)
        self._faulting: dict[int, asyncio.Future[None]] = {}  # device PFN -> migrate_to_ram in flight
        # (device id, migration id) -> the timer that rolls an open migration back;
        # cancelled when it ends, so that a finished migration is not kept alive by it.
        self._expiry: dict[tuple[int, int], asyncio.TimerHandle] = {}
        self.tmpfs = Tmpfs()
        self.limits = limits or KernelLimits()
        self.processes: dict[int, Process] = {}
        self.devices: dict[int, Device] = {}  # live, and fenced until retired (_forget)
        # Forgotten fenced devices, for Stats: the last of each name, oldest first
        # (at most FENCED_KEPT; their large state is gone).
        self.fenced: dict[str, Device] = {}
        self.fenced_total = 0  # devices fenced since start
        self.notifiers: dict[int, tuple[Device, IntervalNotifier, AddressSpace]] = {}
        self.files: dict[int, OpenFile] = {}
        self._pids = itertools.count(1)
        self._pin_ids = itertools.count(1)
        self.pins: dict[int, tuple[int, np.ndarray]] = {}  # pin id -> (pid, frames)
        self._device_ids = itertools.count(1)
        self._file_ids = itertools.count(1)
        self._background: set[asyncio.Task[Any]] = set()
        self.window_latency = Latencies()
        self.trace = Tracer()  # off until the daemon gives it a ring buffer, or someone listens

    # ==== processes ==================================================================
    def process(self, pid: int) -> Process:
        p = self.processes.get(pid)
        if p is None or p.killed:
            raise KernelError(errno.ESRCH, f"no process {pid}")
        return p

    def spawn(self, name: str = "", parent: int = 0, mm: AddressSpace | None = None) -> Process:
        pid = next(self._pids)
        p = Process(pid, name or f"proc{pid}", mm or AddressSpace(self.ram, self.devmem, self.swap), parent)
        p.mm.pid = pid
        p.mm.notifiers.window_latency = self.window_latency
        p.mm.notifiers.trace = self.trace
        p.mm.reclaim = self.direct_reclaim
        p.mm.out_of_memory = self.out_of_memory
        self.trace.process_name(pid, p.name)
        self.processes[pid] = p
        return p

    @traced_syscall()
    @reclaims
    async def fork(self, pid: int) -> Process:
        parent = self.process(pid)
        child_mm = await parent.mm.fork()
        child = self.spawn(parent.name, parent=pid, mm=child_mm)
        child.oom_score_adj = parent.oom_score_adj
        for fd, f in parent.fds.items():
            f.refs += 1
            child.fds[fd] = f
        return child

    @traced_syscall()
    async def exit(self, pid: int) -> None:
        """exit(): tear the mm down (RELEASE, then UNMAP), then close every file."""
        p = self.process(pid)
        del self.processes[pid]
        await self._exit(p)

    @traced_syscall()
    async def oom_kill(self, pid: int) -> OomReaped:
        """The OOM killer picks ``pid``: it is killed (no call reaches it any more:
        ESRCH), the OOM reaper empties its private memory with non-blockable UNMAP
        invalidations — a pass with a refusal, or with the mmap lock held, is tried
        again, OOM_REAP_PASSES times at most (oom_reap_task) — then it exits. Until
        then it stays in the table, so that evictions and the invariant checker
        still see its address space."""
        p = self.process(pid)
        p.killed = True
        return await self._reap_and_exit(p)

    async def _reap_and_exit(self, p: Process, forget: bool = False) -> OomReaped:
        """The OOM reaper's passes over a killed process, then its exit. ``forget``: the
        tracer forgets the process too (for Process.OomKill, traced_syscall does)."""
        reaped = OomReaped()
        try:
            while reaped.passes < OOM_REAP_PASSES and not reaped.complete:
                if reaped.passes:
                    await asyncio.sleep(OOM_REAP_INTERVAL_S)
                reaped.passes += 1
                reaped.complete, freed = await p.mm.oom_reap()
                reaped.pages += freed
            if not reaped.complete:
                log.warning("oom_reaper: unable to reap pid %d after %d passes", p.pid, reaped.passes)
        finally:  # a killed process exits whatever became of the reaping
            del self.processes[p.pid]
            await self._exit(p)
            if forget:
                self.trace.forget_process(p.pid)
        return reaped

    def set_oom_score_adj(self, pid: int, adj: int) -> None:
        """Writing /proc/<pid>/oom_score_adj: EINVAL outside [-1000, 1000]."""
        p = self.process(pid)
        if not OOM_SCORE_ADJ_MIN <= adj <= OOM_SCORE_ADJ_MAX:
            raise KernelError(errno.EINVAL,
                              f"oom_score_adj {adj} is outside [{OOM_SCORE_ADJ_MIN}, {OOM_SCORE_ADJ_MAX}]")
        p.oom_score_adj = adj

    def oom_badness(self, p: Process) -> int | None:
        """oom_badness(): the victim's score, its resident pages (device pages
        included) and swap entries, plus oom_score_adj thousandths of RAM and swap;
        None for a process the killer must not choose (OOM_SCORE_ADJ_MIN)."""
        if p.oom_score_adj == OOM_SCORE_ADJ_MIN:
            return None
        total = self.ram.nframes + self.swap.npages
        return sum(p.mm.rss) + p.mm.swapents + p.oom_score_adj * (total // 1000)

    async def out_of_memory(self, held: Collection[AddressSpace] = (), own: AddressSpace | None = None) -> bool:
        """out_of_memory(), when reclaim freed nothing: a process is killed to make
        room, the one with the highest oom_badness (the newest of equals), and the
        allocation waits until it has exited, then tries again: True. While a victim
        is still dying (this killer's or Process.OomKill's), no other is chosen: the
        allocation waits for that one. False — the allocation fails with ENOMEM, as
        without the killer — when it is off, when no process is left, when the
        victim does not exit within OOM_WAIT_S, and at once when the allocation holds
        the victim's mmap lock (``held``: a fault in it, a migration of its pages, an
        eviction), which the reaper and its exit need here. Then the victim is killed
        only if the allocation is a fault in its own address space (``own``: its
        access, or a device's fault in it), and dies as soon as that lets go (the
        kernel's victim dies on its way back to user space); else no one is."""
        if not self.oom_killer:
            return False
        victim = next((p for p in self.processes.values() if p.killed), None)
        if victim is None:
            scored = [(score, p) for p in reversed(self.processes.values())
                      if p.mm.alive and (score := self.oom_badness(p)) is not None]
            if not scored:
                return False
            victim = max(scored, key=lambda sp: sp[0])[1]
            if victim.mm in held and victim.mm is not own:
                return False
            victim.killed = True
            self.oom_kills += 1
            log.warning("Out of memory: killed process %d (%s), %d resident pages, %d swapped out", victim.pid,
                        victim.name, sum(victim.mm.rss), victim.mm.swapents)
            self._in_background(self._reap_and_exit(victim, forget=True))
        if victim.mm in held:
            return False
        try:
            await asyncio.wait_for(victim.exited.wait(), OOM_WAIT_S)
        except TimeoutError:
            return False
        return True

    async def compact_memory(self) -> int:
        """Writing 1 to /proc/sys/vm/compact_memory: every address space's movable pages
        move to new frames (compaction.compact); the pages moved."""
        return sum([await compact(mm) for mm in self._live_mms()])

    async def _exit(self, p: Process) -> None:
        pid = p.pid
        try:
            await p.mm.exit_mmap()
            for pin_id in [i for i, (owner, _) in self.pins.items() if owner == pid]:
                put_user_pages(p.mm, self.pins.pop(pin_id)[1], pin=True)  # a pin dies with its holder
            for fd in list(p.fds):
                await self._put_file(p.fds.pop(fd), pid)
        finally:
            p.exited.set()

    # ==== memory system calls ===========================================================
    @reclaims
    async def mmap(self, pid: int, addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
        p = self.process(pid)
        inode, readable, writable, device = None, True, True, False
        if not flags & MAP_ANONYMOUS:
            f = self._fd(p, fd)
            inode, readable, writable, device = f.inode, f.readable, f.writable, f.device is not None
        return await p.mm.sys_mmap(addr, length, prot, flags, inode, offset,
                                   file_readable=readable, file_writable=writable, device=device)

    @traced_syscall(ranged=True)
    async def munmap(self, pid: int, addr: int, length: int) -> None:
        await self.process(pid).mm.sys_munmap(addr, length)

    @traced_syscall(ranged=True)
    async def mprotect(self, pid: int, addr: int, length: int, prot: int) -> None:
        await self.process(pid).mm.sys_mprotect(addr, length, prot)

    @traced_syscall(ranged=True)
    async def madvise(self, pid: int, addr: int, length: int, advice: int) -> None:
        """madvise(2): AddressSpace.sys_madvise, but for POPULATE_READ/WRITE (a GUP
        fault-in, gup.faultin_page_range) and REMOVE (which reaches other processes)."""
        mm = self.process(pid).mm
        if advice in (MADV_POPULATE_READ, MADV_POPULATE_WRITE):
            await faultin_page_range(mm, addr, length, write=advice == MADV_POPULATE_WRITE)
        elif advice == MADV_REMOVE:
            await self._madvise_remove(mm, addr, length)
        else:
            await mm.sys_madvise(addr, length, advice)

    async def _madvise_remove(self, mm: AddressSpace, addr: int, length: int) -> None:
        """MADV_REMOVE: a hole punched in the file behind each shared mapping of the
        range (vfs_fallocate(PUNCH_HOLE)): every mapping of the file pages it takes
        out, in every process, is zapped under a CLEAR, then their page cache and swap
        slots go. tmpfs and shared memory (shmem_fallocate) take every page, and the
        copies private mappings made stay (unmap_mapping_range); hugetlbfs
        (hugetlbfs_punch_hole) takes the whole huge pages inside, zaps private copies
        too (hugetlb_vmdelete_list), and zeroes the parts at either end in place. As
        in Linux the caller's mmap lock is not held meanwhile. Errors: remove_targets."""
        end = madvise_end(addr, length)
        if end == addr:
            return
        targets, error = await mm.remove_targets(addr, end)
        for inode, first, n in targets:
            lo, hi = inode.hole(first, n)
            mms = {v.mm for v in list(inode.mappings)} if hi > lo else set()
            for other in sorted((m for m in mms if isinstance(m, AddressSpace)), key=lambda m: m.id):
                await other.zap_file_range(inode, lo, hi, even_cows=inode.hugetlb)
            inode.punch_hole(self.ram, first, n)
        if error is not None:
            raise error

    @traced_syscall(ranged=True)
    async def mremap(self, pid: int, old_addr: int, old_len: int, new_len: int, flags: int, new_addr: int) -> int:
        return await self.process(pid).mm.sys_mremap(old_addr, old_len, new_len, flags, new_addr)

    @traced_syscall()
    async def clear_refs(self, pid: int, value: int) -> None:
        await self.process(pid).mm.clear_refs(value)

    # CPU accesses reclaim in their fault loop, a step at a time (fault_until_accessible),
    # not by running the whole access again (reclaims).
    @traced_syscall(ranged=True)
    async def read(self, pid: int, addr: int, length: int) -> bytes:
        mm = self.process(pid).mm
        if length > self.limits.max_reply_data:
            raise KernelError(errno.EINVAL, f"read of {length} bytes exceeds the message limit "
                              f"({self.limits.max_reply_data} bytes per call)")
        return await cpu_read(mm, addr, length)

    @traced_syscall(ranged=True)
    async def write(self, pid: int, addr: int, data: bytes) -> None:
        await cpu_write(self.process(pid).mm, addr, data)

    # ==== GUP and pagemap ==================================================================
    @reclaims
    async def pin_user_pages(self, pid: int, addr: int, npages: int, *, write: bool, longterm: bool,
                             hold: bool) -> int:
        """pin_user_pages() (FOLL_PIN, FOLL_WRITE, FOLL_LONGTERM) on behalf of a test
        or a workload, like the kernel's gup_test. Device pages are faulted home
        first. With ``hold`` the pins stay until unpin_user_pages(pin id); otherwise
        they are released at once (the page stays faulted in). Returns the pin id."""
        p = self.process(pid)
        if addr & (PAGE_SIZE - 1) or npages <= 0 or npages > self.limits.max_pages_per_request:
            raise KernelError(errno.EINVAL, "unaligned address, or a page count out of range")
        async with p.mm.lock.read():
            pfns = await get_user_pages(p.mm, addr, npages, write=write, pin=True, longterm=longterm)
            coherent = self.ram.is_device(pfns)
            if longterm and coherent.any():
                # FOLL_LONGTERM: coherent pages move to RAM first, then pin again.
                put_user_pages(p.mm, pfns, pin=True)
                for pgmap in {id(m): m for m in map(self.devmem.lookup, pfns[coherent].tolist()) if m}.values():
                    await self._evict_coherent(pgmap, only=pfns[coherent & pgmap.contains(pfns)], held=p.mm)
                pfns = await get_user_pages(p.mm, addr, npages, write=write, pin=True, longterm=True)
                if self.ram.is_device(pfns).any():
                    put_user_pages(p.mm, pfns, pin=True)
                    raise KernelError(errno.EBUSY, "a device-coherent page could not be moved to RAM for a "
                                      "long-term pin")
        if not hold:
            put_user_pages(p.mm, pfns, pin=True)
            return 0
        pin_id = next(self._pin_ids)
        self.pins[pin_id] = (pid, pfns)
        return pin_id

    def unpin_user_pages(self, pid: int, pin_id: int) -> None:
        mm = self.process(pid).mm  # (ESRCH while it exits: its pins die with it)
        held = self.pins.get(pin_id)
        if held is None or held[0] != pid:
            raise KernelError(errno.ENOENT, f"process {pid} holds no pin {pin_id}")
        del self.pins[pin_id]
        put_user_pages(mm, held[1], pin=True)

    def pagemap(self, pid: int, addr: int, npages: int) -> np.ndarray:
        """/proc/pid/pagemap entries of [addr, addr + npages pages)."""
        p = self.process(pid)
        if addr & (PAGE_SIZE - 1) or npages <= 0 or npages > self.limits.max_pages_per_request:
            raise KernelError(errno.EINVAL, "unaligned address, or a page count out of range")
        return pagemap(p.mm, addr, npages)

    # ==== files ==============================================================================
    def _fd(self, p: Process, fd: int) -> OpenFile:
        f = p.fds.get(fd)
        if f is None:
            raise KernelError(errno.EBADF, f"fd {fd} is not open in process {p.pid}")
        return f

    async def open(self, pid: int, path: str, flags: int) -> tuple[int, int]:
        """open(2): a hugetlbfs file under /dev/hugepages/, a device node under /dev/,
        or a tmpfs file. Returns (fd, file_id)."""
        p = self.process(pid)
        if not path:
            raise KernelError(errno.ENOENT, "empty path")
        if len(path.encode()) >= PATH_MAX:
            raise KernelError(errno.ENAMETOOLONG, f"path longer than {PATH_MAX - 1} bytes")
        if not path.startswith("/"):
            raise KernelError(errno.EINVAL, "path must be absolute")
        if (flags & O_ACCMODE) == O_ACCMODE:
            raise KernelError(errno.EINVAL, "invalid access mode")
        if on_hugetlbfs(path):
            inode = await self._open_hugetlbfs(path, flags)
        elif path.startswith(DEV_PREFIX):
            dev = self.device_by_name(path[len(DEV_PREFIX):])
            if dev is None:
                raise KernelError(errno.ENOENT, f"no device {path}")
            f = OpenFile(next(self._file_ids), flags, device=dev, opener=pid)
            self.files[f.id] = f
            fd = p.new_fd(f)
            err = await dev.ops.file_open(f.id, pid) if dev.alive else errno.ENXIO
            if err:
                p.fds.pop(fd, None)
                self.files.pop(f.id, None)
                raise KernelError(err, f"device {dev.name} refused the open")
            return fd, f.id
        elif flags & O_TMPFILE == O_TMPFILE:
            if not f_writable(flags):
                raise KernelError(errno.EINVAL, "O_TMPFILE needs write access")
            inode = Inode(None, self.swap)
        else:
            inode = await self._lookup_or_create(path, flags, lambda name: Inode(name, self.swap))
        f = OpenFile(next(self._file_ids), flags, inode=inode, opener=pid)
        inode.opens += 1
        self.files[f.id] = f
        return p.new_fd(f), f.id

    async def _lookup_or_create(self, path: str, flags: int, make: Callable[[str], Inode]) -> Inode:
        """The file at ``path``: created with O_CREAT (by ``make``), emptied with O_TRUNC
        when opened for writing. ENOENT if it does not exist and may not be created."""
        found = self.tmpfs.lookup(path)
        if found is None:
            if not flags & O_CREAT:
                raise KernelError(errno.ENOENT, f"no such file {path}")
            found = self.tmpfs.create(path, make)
        elif flags & O_TRUNC and f_writable(flags):
            await self._truncate(found, 0)
        return found

    async def _open_hugetlbfs(self, path: str, flags: int) -> Inode:
        """A file of the hugetlbfs mount (/dev/hugepages): the mount itself only with
        O_TMPFILE (an unnamed file there), EISDIR otherwise."""
        if flags & O_TMPFILE == O_TMPFILE:
            if not f_writable(flags):
                raise KernelError(errno.EINVAL, "O_TMPFILE needs write access")
            return HugetlbInode(None)
        if path.rstrip("/") == HUGETLBFS_MOUNT:
            raise KernelError(errno.EISDIR, f"{path} is the hugetlbfs mount, a directory")
        return await self._lookup_or_create(path, flags, HugetlbInode)

    async def close(self, pid: int, fd: int) -> None:
        p = self.process(pid)
        f = self._fd(p, fd)
        del p.fds[fd]
        await self._put_file(f, pid)

    async def _put_file(self, f: OpenFile, pid: int) -> None:
        f.refs -= 1
        if f.refs:
            return
        self.files.pop(f.id, None)
        if f.device is not None:
            if f.device.alive:
                await f.device.ops.file_release(f.id, pid)
        elif f.inode is not None:
            f.inode.opens -= 1
            self._maybe_free_inode(f.inode)

    def _maybe_free_inode(self, inode: Inode) -> None:
        if not inode.opens and not inode.nlink and not inode.mappings:
            inode.release(self.ram)

    def _file(self, pid: int, fd: int) -> OpenFile:
        f = self._fd(self.process(pid), fd)
        if f.inode is None:
            raise KernelError(errno.EINVAL, "not a regular file")
        return f

    async def pread(self, pid: int, fd: int, offset: int, length: int) -> bytes:
        f = self._file(pid, fd)
        if not f.readable:
            raise KernelError(errno.EBADF, "file not open for reading")
        # rw_verify_area(): a negative (>= 2^63) offset or count, or a sum that overflows
        # loff_t, is EINVAL; beyond the end of the file is a short (or empty) read.
        if not 0 <= offset <= LOFF_MAX or not 0 <= length <= LOFF_MAX or offset + length > LOFF_MAX:
            raise KernelError(errno.EINVAL, "offset or length out of range")
        assert f.inode is not None
        # Like MAX_RW_COUNT: a count the reply cannot carry is a short read.
        return f.inode.pread(self.ram, offset, min(length, self.limits.max_reply_data))

    @reclaims
    async def pwrite(self, pid: int, fd: int, offset: int, data: bytes) -> None:
        f = self._file(pid, fd)
        if not f.writable:
            raise KernelError(errno.EBADF, "file not open for writing")
        assert f.inode is not None
        if f.inode.hugetlb:  # no write_iter: vfs_write() refuses before looking at the offset
            raise KernelError(errno.EINVAL, "hugetlbfs files cannot be written with write(2); map them")
        if not 0 <= offset <= LOFF_MAX:
            raise KernelError(errno.EINVAL, "negative offset")
        f.inode.pwrite(self.ram, offset, data)

    @traced_syscall()
    async def ftruncate(self, pid: int, fd: int, length: int) -> None:
        f = self._file(pid, fd)
        if not f.writable:
            raise KernelError(errno.EINVAL, "file not open for writing")
        if not 0 <= length <= LOFF_MAX:
            raise KernelError(errno.EINVAL, "negative length")
        if length > MAX_FILE_SIZE:
            raise KernelError(errno.EFBIG, "length beyond the largest file size")
        assert f.inode is not None
        if f.inode.hugetlb and length % HPAGE_SIZE:
            raise KernelError(errno.EINVAL, "a hugetlbfs file's size is a multiple of the huge page size")
        await self._truncate(f.inode, length)

    async def _truncate(self, inode: Inode, size: int) -> None:
        """Shrinking zaps every mapping of the dropped pages (CLEAR) before freeing them."""
        old = inode.size
        inode.size = size
        if size < old:
            first = (size + PAGE_SIZE - 1) >> PAGE_SHIFT
            for mm in {v.mm for v in list(inode.mappings)}:
                assert isinstance(mm, AddressSpace)
                await mm.zap_file_range(inode, first, ULONG_MAX, even_cows=True)
        inode.truncate_cache(self.ram, size)

    # ==== devices ==============================================================================
    def listed_devices(self) -> list[Device]:
        """The devices Stats lists, by id: live ones, fenced ones still retiring and the
        forgotten fenced ones kept (FENCED_KEPT)."""
        return sorted([*self.devices.values(), *self.fenced.values()], key=lambda d: d.id)

    def device_by_name(self, name: str) -> Device | None:
        for dev in self.devices.values():
            if dev.name == name and dev.alive:
                return dev
        return None

    def register_device(self, name: str, ops: DeviceOps, memory: MemoryKind = MemoryKind.NONE,
                        memory_pages: int = 0, max_message_bytes: int = 0) -> Device:
        """A device connects, optionally declaring device memory (memremap_pages).
        ``max_message_bytes``: the most it takes in one message, if less than the
        daemon's limit (replies to it that could not fit are refused up front)."""
        if not DEVICE_NAME.fullmatch(name):
            raise KernelError(errno.EINVAL, "a device name is 1..64 of A-Z a-z 0-9 . _ : -")
        if self.device_by_name(name) is not None:
            raise KernelError(errno.EEXIST, f"a device named {name!r} is already connected")
        if (memory == MemoryKind.NONE) != (memory_pages == 0):
            raise KernelError(errno.EINVAL, "device memory needs both a kind and a size")
        limit = min(max_message_bytes or self.limits.max_message_bytes, self.limits.max_message_bytes)
        dev = Device(next(self._device_ids), name, ops, self.ram.span, self.limits.max_notifiers_per_device, limit)
        if memory == MemoryKind.DEVICE_COHERENT:
            dev.pgmap = self.devmem.add_coherent(dev.id, dev.owner, memory_pages)
        elif memory == MemoryKind.DEVICE_PRIVATE:
            dev.pgmap = DevicePageMap(dev.id, dev.owner, memory, memory_pages)
            self.devmem.add(dev.pgmap)
        dev.faults.update(**self.fault_plans.get(name, {}))
        self.devices[dev.id] = dev
        return dev

    def fence_device(self, dev: Device, reason: str) -> None:
        """Cut a device off now: no more callbacks, no DMA; it is retired in the
        background (_retire) and then forgotten."""
        if not dev.alive:
            return
        log.warning("fencing device %s: %s", dev.name, reason)
        dev.alive = False
        dev.fenced_reason = reason
        self.fenced_total += 1
        self.trace.fence(dev, reason)
        dev.grants.revoke_all()
        for mig in list(dev.migrations.values()):  # roll back: the originals come back
            self._end_migration(dev, mig, rollback=True)
        self.ram.locks.unlock_all(dev)
        if dev.pgmap is not None and dev.pgmap.kind == MemoryKind.DEVICE_PRIVATE:
            self.devmem.remove(dev.pgmap)  # private contents are lost with the device
        self._in_background(self._retire(dev))

    async def _retire(self, dev: Device) -> None:
        """A fenced device's notifiers are removed (a removal may wait for a window the
        fencing caller is inside) and its coherent memory moved home — host-addressable,
        the core moves it itself; then the device is forgotten."""
        work: list[Coroutine[Any, Any, object]] = [self._remove_all_notifiers(dev)]
        if dev.pgmap is not None and dev.pgmap.kind == MemoryKind.DEVICE_COHERENT:
            work.append(self._evict_coherent(dev.pgmap, retire=True))
        try:
            await asyncio.gather(*work)
        finally:
            dev.retired = True
            self._forget(dev)

    def _forget(self, dev: Device) -> None:
        """Drop a fenced device from the registry once nothing looks it up by id: it is
        retired and its last migration is over (a pages step running at fencing rolls
        its migration back when it ends). Its page map, if processes still map its
        pages, stays in DeviceMemory until they go. Stats keeps the last fenced device
        of each name, FENCED_KEPT at most: without a bound, every connection ever made
        would stay."""
        if not dev.retired or dev.migrations or self.devices.pop(dev.id, None) is None:
            return
        self.fenced.pop(dev.name, None)
        self.fenced[dev.name] = dev
        if len(self.fenced) > FENCED_KEPT:
            del self.fenced[next(iter(self.fenced))]

    async def direct_reclaim(self, shortfall: int) -> int:
        """try_to_free_pages() for an allocation ``shortfall`` frames short: from the
        address spaces of live processes not killed (the OOM reaper empties those),
        then from the page cache of the files."""
        mms = {p.mm.id: p.mm for p in self.processes.values() if p.mm.alive and not p.killed}
        return await self.reclaimer.reclaim(list(mms.values()), shortfall, self._shrink_page_cache)

    def _shrink_page_cache(self, want: int) -> int:
        """Swap out up to ``want`` file pages held by their page cache alone, file by
        file; the frames freed."""
        got = 0
        for inode in self.inodes(self._live_mms()):
            if got >= want:
                break
            got += inode.swap_out(self.ram, inode.unmapped_pages(self.ram)[: want - got])
        return got

    def inodes(self, mms: list[AddressSpace]) -> list[Inode]:
        """Every file with a page cache: named, open, or mapped by one of ``mms``."""
        found: dict[int, Inode] = {id(i): i for i in self.tmpfs.files.values()}
        for f in self.files.values():
            if f.inode is not None:
                found[id(f.inode)] = f.inode
        for p in self.processes.values():
            for f in p.fds.values():
                if f.inode is not None:
                    found[id(f.inode)] = f.inode
        for mm in mms:
            for vma in mm.vmas:
                if vma.file is not None:
                    found[id(vma.file)] = vma.file
        return list(found.values())

    def _live_mms(self) -> list[AddressSpace]:
        """Every live address space once, in a fixed order (to take their locks in)."""
        return sorted({p.mm.id: p.mm for p in self.processes.values() if p.mm.alive}.values(), key=lambda m: m.id)

    def _in_background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _evict_coherent(self, pgmap: DevicePageMap, *, retire: bool = False,
                              only: np.ndarray | None = None, held: AddressSpace | None = None) -> int:
        """Move coherent pages (all, or ``only``) to system RAM with the core's copy:
        CLEAR to every mirror. ``held`` is an address space whose mmap read lock the
        caller already holds. With ``retire`` the map is removed afterwards."""
        mms = self._live_mms()
        others = [mm for mm in mms if mm is not held]
        for mm in others:
            # They stand in for the rmap walk, under no mmap lock of theirs: queueing
            # behind their waiting writers while ``held`` is held could close a cycle.
            await mm.lock.acquire_read(ahead_of_writers=held is not None)
        dev = self.devices.get(pgmap.device_id)
        try:
            return await reclaiming(self, lambda: self.trace.eviction(
                dev, migrate_device_coherent(pgmap, mms, self.ram, only)), held=mms)
        except OutOfMemoryError:
            if not retire:
                raise
            # The kernel's eviction cannot fail (__GFP_NOFAIL); here the pages stay,
            # contents and mappings intact, in the window, which returns once they go.
            log.warning("device %s: %d coherent pages stay in its memory: no system memory for them",
                        dev.name if dev else pgmap.device_id, pgmap.used_pages)
            return 0
        finally:
            for mm in others:
                await mm.lock.release_read()
            if retire:
                self.devmem.remove(pgmap)

    async def _remove_all_notifiers(self, dev: Device) -> None:
        for nid, sub in list(dev.notifiers.items()):
            await sub.subs.remove(sub)
            dev.notifiers.pop(nid, None)
            self.notifiers.pop(nid, None)

    def _device_notifier(self, dev: Device, notifier_id: int) -> tuple[IntervalNotifier, AddressSpace]:
        entry = self.notifiers.get(notifier_id)
        if entry is None or entry[0] is not dev:
            raise KernelError(errno.ENOENT, f"notifier {notifier_id} is not one of this device's")
        return entry[1], entry[2]

    async def insert_notifier(self, dev: Device, pid: int, start: int, length: int) -> IntervalNotifier:
        """mmu_interval_notifier_insert() on behalf of a device that ``pid`` opened."""
        p = self.process(pid)
        if not any(f.device is dev for f in p.fds.values()):
            raise KernelError(errno.EPERM, f"process {pid} has not opened /dev/{dev.name}")
        if length <= 0 or start < 0 or start + length - 1 > ULONG_MAX:
            raise KernelError(errno.EOVERFLOW, "notifier interval is empty or wraps")
        if not p.mm.alive:
            raise KernelError(errno.EINVAL, "the address space has no users")
        if len(dev.notifiers) >= dev.max_notifiers:
            raise KernelError(errno.ENOSPC, f"device already has {dev.max_notifiers} notifiers")
        sub = IntervalNotifier(p.mm.notifiers, start, length, DeviceNotifierOps(dev))
        p.mm.notifiers.insert(sub)
        dev.notifiers[sub.id] = sub
        self.notifiers[sub.id] = (dev, sub, p.mm)
        return sub

    async def remove_notifier(self, dev: Device, notifier_id: int) -> None:
        sub, mm = self._device_notifier(dev, notifier_id)
        del dev.notifiers[notifier_id]
        del self.notifiers[notifier_id]
        await mm.notifiers.remove(sub)
        dev.grants.revoke(sub.id, sub.start, sub.last + 1)

    async def read_begin(self, dev: Device, notifier_id: int) -> int:
        sub, mm = self._device_notifier(dev, notifier_id)
        return await mm.notifiers.read_begin(sub)

    @reclaims
    async def range_fault(
        self, dev: Device, notifier_id: int, notifier_seq: int, start: int, end: int,
        default_flags: int, pfn_flags_mask: int, requests: bytes, dev_private_owner: int,
        *, snapshot: bool = False,
    ) -> HmmResult:
        """hmm_range_fault() for a device; the result's frames become DMA-able by it."""
        sub, mm = self._device_notifier(dev, notifier_id)
        if start & (PAGE_SIZE - 1) or end & (PAGE_SIZE - 1):
            raise KernelError(errno.EINVAL, "range is not page-aligned")
        if end <= start:
            raise KernelError(errno.EINVAL, "empty range")
        if start < sub.start or end - 1 > sub.last:
            raise KernelError(errno.EINVAL, f"[{start:#x}, {end:#x}) is not inside the notifier's interval")
        npages = (end - start) >> PAGE_SHIFT
        if npages > self.limits.max_pages_per_request:
            raise KernelError(errno.EINVAL, f"{npages} pages exceed the limit of {self.limits.max_pages_per_request}")
        if npages * RANGE_FAULT_BYTES_PER_PAGE > self.reply_room(dev):
            raise KernelError(errno.EINVAL, f"the reply for {npages} pages exceeds the message limit")
        known = HMM_PFN_REQ_MASK | HMM_PFN_INOUT_FLAGS
        if default_flags & ~known or pfn_flags_mask & ~known:
            raise KernelError(errno.EINVAL, "unknown request flag bits")
        if requests and len(requests) != npages:
            raise KernelError(errno.EINVAL, f"requests has {len(requests)} bytes for {npages} pages")
        if snapshot:
            default_flags &= ~HMM_PFN_REQ_MASK
            pfn_flags_mask &= ~HMM_PFN_REQ_MASK
        req = np.frombuffer(requests, dtype=np.uint8) if requests else None
        if not mm.alive:
            raise KernelError(errno.EFAULT, "the address space has no users")
        rng = HmmRange(sub, notifier_seq, start, end, default_flags, pfn_flags_mask, req, dev_private_owner)
        async with mm.lock.read():
            if not mm.alive:
                raise KernelError(errno.EFAULT, "the address space has no users")
            result = await self.trace.range_fault(dev, mm.pid, start, end, hmm_range_fault(mm, rng))
            if not dev.alive:
                raise KernelError(errno.ENODEV, "device was fenced")
            dev.grants.grant(sub.id, start, result.pfns, result.flags, self.ram.span)
        dev.range_faults += 1
        return result

    def _dma_pfns(self, dev: Device, pfns: bytes, *, dma: bool = True) -> np.ndarray:
        if not pfns or len(pfns) % 8:
            raise KernelError(errno.EINVAL, "pfns must be a non-empty array of uint64")
        raw = np.frombuffer(pfns, dtype="<u8")
        if (raw >> np.uint64(63)).any():  # not a frame number at all, rather than a frame not held
            raise KernelError(errno.EINVAL, "a pfn is 2^63 or more")
        arr = raw.astype(np.int64)
        if len(arr) > self.limits.max_pages_per_request:
            raise KernelError(errno.EINVAL, "too many pages in one DMA")
        if dma and dev.faults.take("fail_dma"):
            raise KernelError(errno.EIO, "the DMA failed (injected fault)")
        return arr

    def reply_room(self, dev: Device) -> int:
        """The most bytes a reply to ``dev`` may carry (its negotiated message limit,
        less the framing)."""
        return dev.max_message_bytes - REPLY_OVERHEAD

    def dma_read(self, dev: Device, pfns: bytes) -> list[np.ndarray]:
        """The contents of frames ``dev`` may read, for a reply (PhysMem.read: views
        of the frames, to copy into the reply at once): EINVAL for bad ``pfns`` or
        more than the device's message limit; EFAULT (a counted violation) if any
        frame is not held."""
        arr = self._dma_pfns(dev, pfns)
        if len(arr) * PAGE_SIZE > self.reply_room(dev):
            raise KernelError(errno.EINVAL, f"a DMA read of {len(arr)} pages exceeds the message limit")
        dev.check_dma(arr, self.ram.span, write=False)
        return self.ram.read(arr)

    def dma_read_chunks(self, dev: Device, pfns: bytes, chunk_pages: int) -> Iterator[list[np.ndarray]]:
        """dma_read of any number of frames, ``chunk_pages`` a reply (0: as many as
        one reply holds). Everything is checked before the first chunk is made (one
        EIO of an injected ``fail_dma``); each chunk's frames again as it is made,
        since an invalidation acked meanwhile revokes them (EFAULT, a violation)."""
        arr = self._dma_pfns(dev, pfns)
        room = self.reply_room(dev) // PAGE_SIZE
        if chunk_pages > room:
            raise KernelError(errno.EINVAL, f"chunk_pages {chunk_pages} exceeds the {room} pages one reply holds")
        step = chunk_pages or room
        dev.check_dma(arr, self.ram.span, write=False)

        def chunks() -> Iterator[list[np.ndarray]]:
            for lo in range(0, len(arr), step):
                part = arr[lo:lo + step]
                if not dev.alive:
                    raise KernelError(errno.ENODEV, "device was fenced")
                if lo:
                    dev.check_dma(part, self.ram.span, write=False)
                yield self.ram.read(part)

        return chunks()

    def dma_read_into(self, dev: Device, pfns: bytes, out: np.ndarray) -> None:
        """dma_read into ``out`` (uint8, exactly npages x 4096 bytes: the device's
        shared-memory staging area) instead of a reply, so no message limit applies.
        Same checks and errors otherwise; nothing is copied on an error."""
        arr = self._dma_pfns(dev, pfns)
        if out.nbytes != len(arr) * PAGE_SIZE:
            raise KernelError(errno.EINVAL, f"the destination must be {len(arr)} x {PAGE_SIZE} bytes")
        dev.check_dma(arr, self.ram.span, write=False)
        self.ram.read_into(arr, out)

    def migration_data(self, dev: Device, mig: Migration) -> list[np.ndarray]:
        """What the device of a just set-up migration would dma_read next, for the
        setup's reply: the contents of every collected (VALID and MIGRATE) system or
        coherent page, in page order (as dma_read gives them). dma_read's checks and
        errors; on an error the migration is rolled back, since the device never
        learns its id."""
        want = MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE
        pfns = mig.page_pfns[((mig.page_flags & want) == want) & (mig.page_pfns < self.ram.span)]
        if not len(pfns):
            return []
        try:
            return self.dma_read(dev, pfns.astype("<u8").tobytes())
        except BaseException:
            self._end_migration(dev, mig, rollback=True)
            raise

    def dma_write(self, dev: Device, pfns: bytes, data: Buffer) -> None:
        """Write whole frames ``dev`` holds writable from ``data`` (a message's bytes,
        or a uint8 view of the staging area): EINVAL for bad ``pfns`` or a length that
        is not npages x 4096; EFAULT (a counted violation, nothing written) if any
        frame is not held writable."""
        arr = self._dma_pfns(dev, pfns)
        if len(data) != len(arr) * PAGE_SIZE:
            raise KernelError(errno.EINVAL, f"data must be {len(arr)} x {PAGE_SIZE} bytes")
        dev.check_dma(arr, self.ram.span, write=True)
        self.ram.data[arr] = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE_SIZE)


    # ---- device memory and migration ----------------------------------------------------
    def _page_free(self, pgmap: DevicePageMap, pfns: np.ndarray) -> None:
        dev = self.devices.get(pgmap.device_id)
        if dev is not None and dev.alive:
            dev.ops.page_free(pfns)

    async def _migrate_to_ram(self, mm: object, addr: int, pfn: int) -> None:
        """do_swap_page() on a device-private entry: ask the owner to move the page
        home. Concurrent faults on the same page wait for the first one. The faulting
        context holds the mmap read lock; the device's migration borrows it through
        the fault token. EFAULT (SIGBUS) when the owner is gone or fails."""
        assert isinstance(mm, AddressSpace)
        inflight = self._faulting.get(pfn)
        if inflight is not None:
            await asyncio.shield(inflight)
            return
        pgmap = self.devmem.lookup(pfn)
        dev = self.devices.get(pgmap.device_id) if pgmap is not None else None
        if dev is None or not dev.alive:
            raise KernelError(errno.EFAULT, f"page at {addr:#x} lived on a device that is gone (SIGBUS)")
        t0 = time.perf_counter()
        token = next(self._tokens)
        borrowers: list[Migration] = []
        self._fault_tokens[token] = (mm, addr, pfn, borrowers)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._faulting[pfn] = done
        assert pgmap is not None
        pgmap.faulting[pfn - pgmap.base] = True
        try:
            mig = None
            if dev.wants_fault_migration:  # one round trip less: set the page's migration up here
                lo, hi, select = fault_range(mm, addr)
                mig = await self.migrate_setup(dev, mm.pid, lo, hi, select, token)
            ok = await self.trace.migrate_to_ram(dev, mm.pid, addr,
                                                 dev.ops.migrate_to_ram(mm.pid, addr, pfn, token, mig))
        finally:
            del self._fault_tokens[token]
            # A migration the device left open would outlive the mmap lock it borrows
            # (and the faulting access would wait for its time limit): roll it back.
            for left in borrowers:
                if left.id in dev.migrations:
                    self._end_migration(dev, left, rollback=True)
                    ok = False
            del self._faulting[pfn]
            if len(pgmap.faulting):  # (not if the map went with its device meanwhile)
                pgmap.faulting[pfn - pgmap.base] = False
            done.set_result(None)
        if not ok:
            raise KernelError(errno.EFAULT, f"device {dev.name} could not move the page at {addr:#x} home (SIGBUS)")
        ptes = mm.pt.gather(addr & ~(PAGE_SIZE - 1), (addr & ~(PAGE_SIZE - 1)) + PAGE_SIZE)
        if pte_swp_type(ptes)[0] == SWP_DEVICE_PRIVATE and pte_pfn(ptes)[0] == pfn:
            raise KernelError(errno.EFAULT, f"device {dev.name} left the faulting page at {addr:#x} (SIGBUS)")
        dev.migrate_to_ram_latency.add(time.perf_counter() - t0)

    async def find_vma(self, dev: Device, pid: int, addr: int) -> tuple[int, int, int]:
        """vma_lookup() for a driver: (start, end, vm_flags) of the mapping at ``addr``
        of a process that opened the device; ENOENT where nothing is mapped."""
        mm = self._opened_mm(dev, pid)
        vma = mm.vmas.find(addr)
        if vma is None:
            raise KernelError(errno.ENOENT, f"no mapping at {addr:#x}")
        return vma.start, vma.end, vma.flags

    def _opened_mm(self, dev: Device, pid: int) -> AddressSpace:
        p = self.process(pid)
        if not any(f.device is dev for f in p.fds.values()):
            raise KernelError(errno.EPERM, f"process {pid} has not opened /dev/{dev.name}")
        if not p.mm.alive:
            raise KernelError(errno.EINVAL, "the address space has no users")
        return p.mm

    def check_migrate_setup(self, dev: Device, start: int, end: int, select: int, with_data: bool = False,
                            other_bytes: int = 0, pid: int | None = None) -> None:
        """migrate_setup's argument checks (EINVAL) that need no look at the address
        space: a caller may run them before a step it must not take for arguments
        that would fail. ``with_data``: the reply is to carry the collected pages'
        contents too; ``other_bytes``: and that much besides the setup. With ``pid``,
        also that the process exists and opened the device (ESRCH, EPERM)."""
        known = (MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_DEVICE_PRIVATE
                 | MIGRATE_VMA_SELECT_DEVICE_COHERENT | MIGRATE_VMA_SELECT_COMPOUND)
        if select & ~known:
            raise KernelError(errno.EINVAL, f"unknown selector bits {select:#x}")
        if end <= start or (end - start) >> PAGE_SHIFT > self.limits.max_pages_per_request:
            raise KernelError(errno.EINVAL, "empty range, or more pages than one request may carry")
        if (start | end) & (PAGE_SIZE - 1):
            raise KernelError(errno.EINVAL, "unaligned migration range")
        per_page = MIGRATE_SETUP_BYTES_PER_PAGE + (PAGE_SIZE if with_data else 0)
        if ((end - start) >> PAGE_SHIFT) * per_page + other_bytes > self.reply_room(dev):
            raise KernelError(errno.EINVAL, "the reply for this range "
                              f"{'with its contents ' if with_data else ''}would exceed the message limit")
        if pid is not None:
            self._opened_mm(dev, pid)

    async def migrate_setup(self, dev: Device, pid: int, start: int, end: int, select: int,
                            fault_token: int = 0) -> Migration:
        """migrate_vma_setup() for a device (its owner selects its own pages). With a
        fault token (inside migrate_to_ram) the faulting context's mmap lock is
        borrowed and ``pid`` is ignored; otherwise the process must have opened the
        device and the migration holds the mmap read lock until finalize."""
        self.check_migrate_setup(dev, start, end, select)
        fault_pfn = None
        if fault_token:
            entry = self._fault_tokens.get(fault_token)
            if entry is None:
                raise KernelError(errno.EINVAL, "unknown or expired fault token")
            mm, addr, fault_pfn, borrowers = entry
            if dev.pgmap is None or not dev.pgmap.base <= fault_pfn < dev.pgmap.end:
                # The token lends the faulting context's mmap lock to the page's owner only.
                raise KernelError(errno.EINVAL, "the fault token is for another device's page")
            if not start <= addr < end:
                raise KernelError(errno.EINVAL, "the range does not contain the faulting address")
        else:
            mm = self._opened_mm(dev, pid)
            await mm.lock.acquire_read()
        # Address spaces fork made share this mapping's anonymous pages: a collected
        # page may have to be unmapped there too, under their mmap read locks.
        vma = mm.vmas.find(start)
        family = sorted((m for m in (vma.anon_vma.members if vma is not None and vma.anon_vma else ())
                         if m is not mm and isinstance(m, AddressSpace) and m.alive), key=lambda m: m.id)
        for other in family:
            # Linux unmaps the page there through the rmap, under no mmap lock of theirs:
            # queueing behind their waiting writers could wait on a fault that waits on us.
            await other.lock.acquire_read(ahead_of_writers=True)
        try:
            mig = await migrate_vma_setup(mm, start, end, select, dev.owner, dev.pgmap,
                                          fault_pfn=fault_pfn, holds_lock=not fault_token, family=family)
        except BaseException:
            for other in family:
                await other.lock.release_read()
            if not fault_token:
                await mm.lock.release_read()
            raise
        mig.family = family
        if fault_token:
            borrowers.append(mig)
        if not dev.alive:  # fenced while collecting
            self._end_migration(dev, mig, rollback=True)
            raise KernelError(errno.ENODEV, "device was fenced")
        dev.migrations[mig.id] = mig
        self.trace.migration_setup(mig)
        self._expire_later(dev, mig)
        # The device reads the collected system pages over DMA to copy them.
        frames = ((mig.page_flags & 1) != 0) & (mig.page_pfns < self.ram.span)  # system or coherent
        if frames.any():  # (none when device-private pages come home)
            dev.grants.grant(-mig.id, start, mig.page_pfns.astype(np.uint64),
                             np.where(frames, HMM_PFN_VALID, 0).astype(np.uint8), self.ram.span)
        return mig

    @reclaims
    async def make_exclusive(self, dev: Device, pid: int, start: int, npages: int, with_owner: bool) -> np.ndarray:
        """make_device_exclusive() page by page over [start, start + npages pages);
        returns the frames, locked for the device until it calls unlock_pages. The
        EXCLUSIVE event carries the device's owner when ``with_owner`` (dmirror asks
        without one). EOPNOTSUPP, EFAULT, ENOMEM as the kernel."""
        if start & (PAGE_SIZE - 1) or npages <= 0 or npages > self.limits.max_pages_per_request:
            raise KernelError(errno.EINVAL, "unaligned start, or a page count out of range")
        mm = self._opened_mm(dev, pid)
        end = start + npages * PAGE_SIZE
        async with mm.lock.read():
            pfns = await make_device_exclusive(mm, start, npages, dev.owner if with_owner else 0, dev)
            if not dev.alive:
                self.ram.locks.unlock(pfns, dev)
                raise KernelError(errno.ENODEV, "device was fenced")
            # The device may DMA to the pages it holds, until an invalidation of a
            # notifier covering them (the CLEAR that takes a page back) revokes it.
            # The limit ends these locks only: the device may unlock a page and lock it
            # again later, and that new lock gets a limit of its own.
            asyncio.get_running_loop().call_later(self.limits.page_lock_timeout_s, self._expire_locks, dev, pfns,
                                                  self.ram.locks.tokens(pfns, dev))
            flags = np.full(npages, HMM_PFN_VALID | HMM_PFN_WRITE, dtype=np.uint8)
            for sub in dev.notifiers.values():
                if sub.subs is mm.notifiers and sub.start <= start and end - 1 <= sub.last:
                    dev.grants.grant(sub.id, start, pfns.astype(np.uint64), flags, self.ram.span)
        return pfns

    def _expire_locks(self, dev: Device, pfns: np.ndarray, tokens: frozenset[int]) -> None:
        n = self.ram.locks.unlock(pfns, dev, tokens)
        if n:
            log.warning("device %s kept %d exclusive page(s) locked too long; unlocked them", dev.name, n)

    def unlock_pages(self, dev: Device, pfns: bytes) -> int:
        """folio_unlock() of pages make_exclusive returned. EINVAL, nothing unlocked,
        if a PFN is no frame at all; EINVAL too if some are not locked by this device
        (a lock that expired, or a page freed meanwhile), but the others are unlocked
        all the same (kept, they would hold CPU accesses back for nothing)."""
        arr = self._dma_pfns(dev, pfns, dma=False)
        if ((arr < 0) | (arr >= self.ram.span)).any():
            raise KernelError(errno.EINVAL, "a PFN that is no frame")
        arr = distinct(arr)  # a frame named twice is unlocked once
        n = self.ram.locks.unlock(arr, dev)
        if n != len(arr):
            raise KernelError(errno.EINVAL, f"{len(arr) - n} of the pages were not locked by this device")
        return n

    def _evict_span(self, dev: Device, start_pfn: int, npages: int) -> tuple[int, int]:
        """evict_setup's arguments checked (EINVAL) before anything is done: the device
        PFNs [lo, hi) to evict — ``npages`` from ``start_pfn``, or with ``npages`` 0
        (and ``start_pfn`` 0) the whole of the device's memory — which must lie in its
        memory, and whose pages in use must fit one reply of its message limit (9
        bytes each: pages in use bound the mapped ones listed)."""
        pgmap = dev.pgmap
        if pgmap is None:
            raise KernelError(errno.EINVAL, "this device has no memory")
        if not npages:
            if start_pfn:
                raise KernelError(errno.EINVAL, "start_pfn without npages")
            start_pfn, npages = pgmap.base, pgmap.npages
        if not pgmap.base <= start_pfn or start_pfn + npages > pgmap.end:
            raise KernelError(errno.EINVAL, f"device PFNs [{start_pfn:#x}, +{npages}) are not all in this device's "
                                            f"memory [{pgmap.base:#x}, {pgmap.end:#x})")
        lo, hi = start_pfn, start_pfn + npages
        in_use = int(np.count_nonzero(pgmap.refcount[lo - pgmap.base : hi - pgmap.base]))
        most = self.reply_room(dev) // MIGRATE_SETUP_BYTES_PER_PAGE
        if in_use > most:
            raise KernelError(errno.EINVAL, f"{in_use} pages of the range are in use: the reply would exceed the "
                                            f"message limit; evict ranges of at most {most} pages")
        return lo, hi

    async def evict_setup(self, dev: Device, start_pfn: int = 0, npages: int = 0) -> Eviction:
        """migrate_device_range over this device's pages in use among ``npages`` device
        PFNs from ``start_pfn`` (npages 0: its whole memory; _evict_span): every
        CPU mapping of them, in every address space, becomes a migration entry inside
        a CLEAR (owner none). Then MigratePages with each page's data, and finalize."""
        span = self._evict_span(dev, start_pfn, npages)
        assert dev.pgmap is not None
        mms = self._live_mms()
        for mm in mms:
            await mm.lock.acquire_read()
        try:
            ev = await migrate_device_setup(dev.pgmap, mms, span=span)
        except BaseException:
            for mm in mms:
                await mm.lock.release_read()
            raise
        ev.locked_mms = mms
        dev.migrations[ev.id] = ev
        self.trace.migration_setup(ev)
        self._expire_later(dev, ev)
        if not dev.alive:
            self._end_migration(dev, ev, rollback=True)
            raise KernelError(errno.ENODEV, "device was fenced")
        return ev

    def _expire_later(self, dev: Device, mig: Migration | Eviction) -> None:
        def expire() -> None:
            if dev.migrations.get(mig.id) is mig:
                log.warning("device %s left migration %d open too long; rolled back", dev.name, mig.id)
                self._end_migration(dev, mig, rollback=True)

        self._expiry[dev.id, mig.id] = asyncio.get_running_loop().call_later(self.limits.migration_timeout_s,
                                                                             expire)

    def abandon_migration(self, dev: Device, migration_id: int) -> None:
        """The call that set this migration up ended before its device had the reply
        (cancelled, or the connection went): the device cannot finalize what it never
        heard of, so it is rolled back now. Nothing if it is over already."""
        mig = dev.migrations.get(migration_id)
        if mig is not None:
            log.warning("device %s left before it had migration %d; rolled back", dev.name, migration_id)
            self._end_migration(dev, mig, rollback=True)

    def _migration(self, dev: Device, migration_id: int) -> Migration | Eviction:
        mig = dev.migrations.get(migration_id)
        if mig is None:
            raise KernelError(errno.ENOENT, f"migration {migration_id} is not one of this device's")
        return mig

    def pages_data_room(self, dev: Device, migration_id: int, dst_flags: bytes) -> int:
        """The most SYSTEM_DATA contents (bytes) a pages step of this migration with
        ``dst_flags`` can take, to bound contents that arrive in parts before the
        step checks them exactly. ENOENT, or EINVAL for the wrong number of flags."""
        mig = self._migration(dev, migration_id)
        if len(dst_flags) != mig.npages:
            raise KernelError(errno.EINVAL, f"dst needs {mig.npages} flag bytes")
        flags = np.frombuffer(dst_flags, dtype=np.uint8)
        data = (flags & (MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA)) == (MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA)
        heads = int(np.count_nonzero(data & ((flags & MIGRATE_PFN_COMPOUND) != 0)))
        return min(mig.npages, int(np.count_nonzero(data)) + (PTRS_PER_PTE - 1) * heads) * PAGE_SIZE

    async def migrate_pages(self, dev: Device, migration_id: int, dst_pfns: bytes, dst_flags: bytes,
                            data: Contents) -> Migration | Eviction:
        """migrate_vma_pages (or an eviction's pages step). ``data``: the SYSTEM_DATA
        contents: a message's bytes, a stream's parts, or a uint8 view of the device's
        staging area.
        Reclaims (and may OOM-kill) for its new system pages, the migration's mmap
        locks held."""
        mig = self._migration(dev, migration_id)
        held = mig.locked_mms if isinstance(mig, Eviction) else [mig.mm, *mig.family]
        return await reclaiming(self, lambda: self._migrate_pages(dev, migration_id, dst_pfns, dst_flags, data),
                                held=held)

    async def _migrate_pages(self, dev: Device, migration_id: int, dst_pfns: bytes, dst_flags: bytes,
                             data: Contents) -> Migration | Eviction:
        mig = self._migration(dev, migration_id)
        flags = np.frombuffer(dst_flags, dtype=np.uint8)
        if (flags & ~np.uint8(MIGRATE_PFN_DST_FLAGS)).any():  # left free for flags to come
            raise KernelError(errno.EINVAL, "unknown dst_flags bits")
        if dev.faults.take("fail_alloc"):
            raise KernelError(errno.ENOMEM, "no memory for the migration's destination pages (injected fault)")
        if isinstance(mig, Eviction):
            if len(dst_flags) != mig.npages:
                raise KernelError(errno.EINVAL, f"dst needs {mig.npages} flag bytes")
            migrate_device_pages(mig, flags, data, self.ram)
            return mig
        if len(dst_pfns) != 8 * mig.npages or len(dst_flags) != mig.npages:
            raise KernelError(errno.EINVAL, f"dst needs {mig.npages} PFNs and {mig.npages} flag bytes")
        pfns = np.frombuffer(dst_pfns, dtype="<u8").astype(np.int64)
        if mig.stepping:
            raise KernelError(errno.EINVAL, "migrate_vma_pages was already called for this migration")
        mig.stepping = True
        try:
            await migrate_vma_pages(mig, pfns, flags, data)
        finally:
            mig.stepping = False
            if mig.rollback_pending:
                self._end_migration(dev, mig, rollback=True)
        if mig.rollback_pending:
            raise KernelError(errno.ENOENT, f"migration {migration_id} was rolled back during its pages step")
        return mig

    async def migrate_finalize(self, dev: Device, migration_id: int) -> Migration | Eviction:
        mig = self._migration(dev, migration_id)
        if isinstance(mig, Migration) and mig.stepping:
            raise KernelError(errno.EBUSY, f"migration {migration_id}'s pages step is still running")
        self._end_migration(dev, mig, rollback=False)
        return mig

    def _end_migration(self, dev: Device, mig: Migration | Eviction, *, rollback: bool) -> None:
        if isinstance(mig, Migration) and mig.stepping:  # (finalize refuses; a roll-back waits for the step)
            mig.rollback_pending = True
            return
        dev.migrations.pop(mig.id, None)
        timer = self._expiry.pop((dev.id, mig.id), None)
        if timer is not None:
            timer.cancel()
        if isinstance(mig, Eviction):
            locked = mig.locked_mms
        else:
            locked = ([mig.mm] if mig.holds_lock else []) + mig.family
            mig.family = []
        try:
            if isinstance(mig, Eviction):
                migrate_device_finalize(mig, rollback=rollback)
            else:
                migrate_vma_finalize(mig, rollback=rollback)
                dev.grants.revoke(-mig.id, mig.start, mig.end)
                # The device's notifiers skipped revoking on its own MIGRATE event: the
                # pages that moved (their old frames are gone) are revoked now.
                mirrors = [sub for sub in dev.notifiers.values() if sub.subs is mig.mm.notifiers]
                if mirrors:
                    moved = np.flatnonzero((mig.page_flags & MIGRATE_PFN_MIGRATE) != 0)
                    for start, end in rmap.runs(mig.start + (moved << PAGE_SHIFT)):
                        for sub in mirrors:
                            dev.grants.revoke(sub.id, start, end)
            self.trace.migration_end(dev, mig, rollback)
        finally:  # (even if a finalize fails, no process is left with its mmap lock held)
            if locked:
                mig.holds_lock = False
                for mm in locked:
                    self._in_background(mm.lock.release_read())
        if not dev.alive:
            self._forget(dev)


def f_writable(flags: int) -> bool:
    return (flags & O_ACCMODE) in (O_WRONLY, O_RDWR)
