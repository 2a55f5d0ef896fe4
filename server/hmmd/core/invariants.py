"""The daemon's internal invariants, recomputed from the page tables.

Every count the core keeps incrementally — frame refcounts and mapcounts, device
page counts, RSS, huge-mapping marks, DMA rights — can be recomputed from the page
tables, the page caches, the pins, the open migrations and the grant tables.
``check_invariants`` does that and reports every disagreement. It is meant for
quiescent moments (no operation half done; open migrations and held page locks are
reported as such): tests call it after killing devices, fuzzing and random
workloads (``hmm.v1.Admin/CheckInvariants``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hmm.abi import PMD_SHIFT, PTRS_PER_PTE
from hmmd.core.evict import Eviction
from hmmd.core.hugetlbfs import HugetlbInode
from hmmd.core.mm import RSS_ANON, RSS_FILE, RSS_SHMEM, AddressSpace
from hmmd.core.pagetable import (
    PTE_WRITE,
    SWP_DEVICE_EXCLUSIVE,
    SWP_DEVICE_PRIVATE,
    SWP_MIGRATION,
    SWP_SWAP,
    pte_pfn,
    pte_present,
    pte_swp_type,
)
from hmmd.core.physmem import PG_ANON, PG_ANON_EXCLUSIVE, PG_HUGETLB, ZERO_PFN
from hmmd.core.vma import VM_HUGETLB

if TYPE_CHECKING:
    from hmmd.core.device import Device
    from hmmd.core.kernel import Kernel

MAX_REPORTED = 20  # disagreements listed per kind; the rest are counted


def _count(pfns: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(pfns, minlength=size)[:size] if len(pfns) else np.zeros(size, dtype=np.int64)


def _report(out: list[str], what: str, bad: np.ndarray, have: np.ndarray, want: np.ndarray) -> None:
    idx = np.flatnonzero(bad)
    for i in idx[:MAX_REPORTED].tolist():
        out.append(f"{what} of frame {i}: {int(have[i])}, page tables say {int(want[i])}")
    if len(idx) > MAX_REPORTED:
        out.append(f"... and {len(idx) - MAX_REPORTED} more {what} disagreements")


def _held_by_migrations(kernel: Kernel) -> np.ndarray:
    """The pages open migrations hold a reference to outside the page tables: the
    destinations a pages step took that finalize has not mapped yet (a filled hole
    is mapped already)."""
    held = [np.zeros(0, dtype=np.int64)]
    for dev in kernel.devices.values():
        for mig in dev.migrations.values():
            if isinstance(mig, Eviction):
                if mig.dst is not None and not mig.finalized:
                    held.append(mig.dst[mig.dst != 0])
            elif mig.dst_pfns is not None and not mig.finalized:
                unmapped = mig.dst_pfns != 0
                if mig.filled is not None:
                    unmapped &= ~mig.filled
                held.append(mig.dst_pfns[unmapped])
    return np.concatenate(held).astype(np.int64)


def check_invariants(kernel: Kernel) -> list[str]:
    """Every disagreement between the kept counts and the recomputed ones (empty:
    all hold). Open migrations and held page locks are reported, not excused."""
    out: list[str] = []
    ram = kernel.ram
    mms = list({id(p.mm): p.mm for p in kernel.processes.values() if p.mm.alive}.values())
    for mm in mms:
        if mm.migrations:
            out.append(f"address space of pid {mm.pid}: {len(mm.migrations)} migration(s) open")
    if ram.locks.held:
        out.append(f"{ram.locks.held} page lock(s) held")

    frame_maps, frame_migr, dev_maps, dev_migr, slots = [], [], [], [], []
    for mm in mms:
        rss = [0, 0, 0]
        swapents = hugetlb = 0
        for idx, table in mm.pt.tables.items():
            present = pte_present(table)
            swp = pte_swp_type(table)
            pfns = pte_pfn(table)
            slots.append(pfns[swp == SWP_SWAP])
            swapents += int(np.count_nonzero(swp == SWP_SWAP))
            mapped = (present | (swp == SWP_DEVICE_EXCLUSIVE)) & (pfns != ZERO_PFN)
            frame_maps.append(pfns[mapped])
            migrating = pfns[swp == SWP_MIGRATION]
            frame_migr.append(migrating[migrating < ram.span])
            dev_migr.append(migrating[migrating >= ram.span])
            device = swp == SWP_DEVICE_PRIVATE
            dev_maps.append(pfns[device])
            # RSS: what is mapped, and a page under migration still (as the kernel's).
            counted = mapped | (swp == SWP_MIGRATION)
            if idx in mm.pt.huge:
                _check_huge(out, mm, idx, table)
            vma = mm.vmas.find(idx << PMD_SHIFT)
            if vma is not None and vma.flags & VM_HUGETLB:  # (a hugetlb mapping's tables are its own)
                hugetlb += int(counted.sum())
                continue
            frames = pfns[counted]
            anon = frames >= ram.span  # a device page
            anon[~anon] = (ram.flags[frames[~anon]] & PG_ANON) != 0
            rss[RSS_ANON] += int(anon.sum()) + int(device.sum())
            if not anon.all():  # file pages count as shmem or file by their mapping
                addrs = (idx * PTRS_PER_PTE + np.flatnonzero(counted)[~anon]).tolist()
                for page in addrs:
                    vma = mm.vmas.find(page << 12)
                    kind = RSS_SHMEM if vma is not None and vma.file is not None and vma.file.shmem else RSS_FILE
                    rss[kind] += 1
        if rss != mm.rss:
            out.append(f"RSS of pid {mm.pid} (anon, file, shmem): {mm.rss}, page tables say {rss}")
        if hugetlb != mm.hugetlb_usage:
            out.append(f"hugetlb usage of pid {mm.pid}: {mm.hugetlb_usage} pages counted, page tables say {hugetlb}")
        if swapents != mm.swapents:
            out.append(f"swap entries of pid {mm.pid}: {mm.swapents} counted, page tables say {swapents}")
    inodes = kernel.inodes(mms)
    slots += [np.fromiter(i.swapped.values(), dtype=np.int64, count=len(i.swapped)) for i in inodes]
    named = np.concatenate(slots) if slots else np.zeros(0, dtype=np.int64)
    used, counts = np.unique(named, return_counts=True)
    if dict(zip(used.tolist(), counts.tolist(), strict=True)) != kernel.swap.slots():
        out.append(f"swap slots: {kernel.swap.used} in use, {len(used)} named by swap entries and files "
                   "(or their counts differ)")

    span = ram.span
    mapped_frames = np.concatenate(frame_maps) if frame_maps else np.zeros(0, dtype=np.int64)
    want_map = _count(mapped_frames, span)
    _report(out, "mapcount", ram.mapcount[:span] != want_map, ram.mapcount, want_map)
    # PageAnonExclusive: an anonymous page one mapping owns, so never mapped twice.
    exclusive = (ram.flags[:span] & PG_ANON_EXCLUSIVE) != 0
    for i in np.flatnonzero(exclusive & ((ram.flags[:span] & PG_ANON) == 0))[:MAX_REPORTED].tolist():
        out.append(f"frame {i} is marked anon-exclusive but is not anonymous")
    for i in np.flatnonzero(exclusive & (want_map > 1))[:MAX_REPORTED].tolist():
        out.append(f"frame {i} is marked anon-exclusive but mapped {int(want_map[i])} times")

    cache = [i.cache[i.cache >= 0] for i in inodes]
    pins = [frames for _, frames in kernel.pins.values()]
    migr = np.concatenate(frame_migr) if frame_migr else np.zeros(0, dtype=np.int64)
    taken = _held_by_migrations(kernel)
    held = np.concatenate([mapped_frames, migr, *cache, *pins, taken[taken < span]]).astype(np.int64)
    want_ref = _count(held, span)
    want_ref[ZERO_PFN] = ram.refcount[ZERO_PFN]  # the zero page is never counted per mapping
    _report(out, "refcount", ram.refcount[:span] != want_ref, ram.refcount, want_ref)
    want_pin = _count(np.concatenate(pins).astype(np.int64) if pins else np.zeros(0, dtype=np.int64), span)
    _report(out, "pincount", ram.pincount[:span] != want_pin, ram.pincount, want_pin)
    in_use = int(np.count_nonzero(ram.refcount[: ram.nframes]))
    if in_use != ram.used_frames:
        out.append(f"{ram.used_frames} system frames allocated, {in_use} referenced")

    device_pfns = np.concatenate(dev_maps) if dev_maps else np.zeros(0, dtype=np.int64)
    # A device page's references: its entries, migration entries for it, a migration's hold.
    device_refs = np.concatenate([device_pfns, *dev_migr, taken[taken >= span]]).astype(np.int64)
    for pgmap in kernel.devmem.maps.values():
        if ram.nframes <= pgmap.base < span:
            continue  # coherent (RAM's counts, checked above)
        want = _count(device_pfns[pgmap.contains(device_pfns)] - pgmap.base, pgmap.npages)
        name = f"device {pgmap.device_id} page"
        _report(out, f"{name} mapcount", pgmap.mapcount != want, pgmap.mapcount, want)
        want = _count(device_refs[pgmap.contains(device_refs)] - pgmap.base, pgmap.npages)
        _report(out, f"{name} refcount", pgmap.refcount != want, pgmap.refcount, want)
        if pgmap.dead and pgmap.lost != np.count_nonzero(want):  # the map goes when this reaches 0
            out.append(f"{name}s of a dead device still referenced: {pgmap.lost} counted, "
                       f"page tables say {np.count_nonzero(want)}")

    for dev in kernel.devices.values():
        _check_grants(out, dev)
    _check_hugetlb_reservations(out, kernel, mms)
    return out


def _check_hugetlb_reservations(out: list[str], kernel: Kernel, mms: list[AddressSpace]) -> None:
    """The pool counts its pages in use right; its promised pages are those the files
    and the private mappings hold, no more than it has free; a private reservation
    lies in a private hugetlb VMA."""
    ram = kernel.ram
    files = [i for i in kernel.inodes(mms) if isinstance(i, HugetlbInode)]
    marked = int(np.count_nonzero(ram.flags & PG_HUGETLB))
    if marked != ram.hugetlb_frames:
        out.append(f"{marked} frames carry PG_HUGETLB, the pool counts {ram.hugetlb_frames} in use")
    held = sum(len(i.resv) for i in files) + sum(len(mm.hugetlb_resv) for mm in mms)
    if held != ram.hugetlb_reserved:
        out.append(f"{ram.hugetlb_reserved} huge pages reserved in the pool, mappings and files hold {held}")
    if ram.hugetlb_reserved > ram.hugetlb_free:
        out.append(f"{ram.hugetlb_reserved} huge pages reserved, only {ram.hugetlb_free} free")
    for mm in mms:
        for i in sorted(mm.hugetlb_resv | mm.hugetlb_owned):
            vma = mm.vmas.find(i << PMD_SHIFT)
            if i not in mm.hugetlb_owned or vma is None or not vma.flags & VM_HUGETLB or vma.shared:
                out.append(f"pid {mm.pid}: a hugetlb reservation at {i << PMD_SHIFT:#x} outside its private mapping")


def _check_huge(out: list[str], mm: AddressSpace, idx: int, table: np.ndarray) -> None:
    """A PMD mapping maps 512 consecutive pages, aligned, all of one kind."""
    pfns = pte_pfn(table)
    present = pte_present(table)
    device = pte_swp_type(table) == SWP_DEVICE_PRIVATE
    ok = (present.all() or device.all()) and bool((np.diff(pfns) == 1).all()) and pfns[0] % PTRS_PER_PTE == 0
    zero = present.all() and bool((pfns == ZERO_PFN).all())  # the huge zero page
    if not (ok or zero):
        out.append(f"pid {mm.pid}: the PMD mapping at {idx << 21:#x} does not map one aligned huge page")


def _check_grants(out: list[str], dev: Device) -> None:
    grants = dev.grants
    readable = np.zeros_like(grants.readable)
    writable = np.zeros_like(grants.writable)
    for table in grants.by_notifier.values():
        for entries in table.tables.values():
            live = entries[pte_present(entries)]
            np.add.at(readable, pte_pfn(live), 1)
            np.add.at(writable, pte_pfn(live[(live & PTE_WRITE) != 0]), 1)
    if (readable != grants.readable).any() or (writable != grants.writable).any():
        out.append(f"device {dev.name}: DMA rights counters disagree with its grant tables")
