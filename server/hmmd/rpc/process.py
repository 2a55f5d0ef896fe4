"""hmm.v1.Process servicer: the CPU side's system calls, thin over the core."""

from __future__ import annotations

from hmm.abi import PAGE_SIZE
from hmm.status import rpc_method
from hmm.v1 import common_pb2, process_pb2_grpc
from hmm.v1 import process_pb2 as pb
from hmmd.core.kernel import Kernel, Process
from hmmd.core.vma import (
    VM_DONTCOPY,
    VM_DONTDUMP,
    VM_HUGEPAGE,
    VM_HUGETLB,
    VM_NOHUGEPAGE,
    VM_RAND_READ,
    VM_SEQ_READ,
    VM_WIPEONFORK,
)

EMPTY = common_pb2.Empty()


class ProcessServicer(process_pb2_grpc.ProcessServicer):
    def __init__(self, kernel: Kernel) -> None:
        self.k = kernel

    @rpc_method
    async def Spawn(self, request: pb.SpawnRequest, context) -> pb.ProcessRef:  # noqa: N802
        return pb.ProcessRef(pid=self.k.spawn(request.name[:64]).pid)

    @rpc_method
    async def Fork(self, request: pb.ProcessRef, context) -> pb.ProcessRef:  # noqa: N802
        return pb.ProcessRef(pid=(await self.k.fork(request.pid)).pid)

    @rpc_method
    async def Exit(self, request: pb.ProcessRef, context) -> common_pb2.Empty:  # noqa: N802
        await self.k.exit(request.pid)
        return EMPTY

    @rpc_method
    async def OomKill(self, request: pb.ProcessRef, context) -> pb.OomKillReply:  # noqa: N802
        r = await self.k.oom_kill(request.pid)
        return pb.OomKillReply(reaped=r.complete, passes=r.passes, pages_reaped=r.pages)

    @rpc_method
    async def SetOomScoreAdj(self, request: pb.OomScoreAdjRequest, context) -> common_pb2.Empty:  # noqa: N802
        self.k.set_oom_score_adj(request.pid, request.oom_score_adj)
        return EMPTY

    @rpc_method
    async def Mmap(self, request: pb.MmapRequest, context) -> pb.MmapReply:  # noqa: N802
        r = request
        return pb.MmapReply(addr=await self.k.mmap(r.pid, r.addr, r.length, r.prot, r.flags, r.fd, r.offset))

    @rpc_method
    async def Munmap(self, request: pb.RangeRequest, context) -> common_pb2.Empty:  # noqa: N802
        await self.k.munmap(request.pid, request.addr, request.length)
        return EMPTY

    @rpc_method
    async def Mprotect(self, request: pb.MprotectRequest, context) -> common_pb2.Empty:  # noqa: N802
        await self.k.mprotect(request.pid, request.addr, request.length, request.prot)
        return EMPTY

    @rpc_method
    async def Madvise(self, request: pb.MadviseRequest, context) -> common_pb2.Empty:  # noqa: N802
        await self.k.madvise(request.pid, request.addr, request.length, request.advice)
        return EMPTY

    @rpc_method
    async def Mremap(self, request: pb.MremapRequest, context) -> pb.MmapReply:  # noqa: N802
        r = request
        addr = await self.k.mremap(r.pid, r.old_addr, r.old_length, r.new_length, r.flags, r.new_addr)
        return pb.MmapReply(addr=addr)

    @rpc_method
    async def ClearRefs(self, request: pb.ClearRefsRequest, context) -> common_pb2.Empty:  # noqa: N802
        await self.k.clear_refs(request.pid, request.value)
        return EMPTY

    @rpc_method
    async def Read(self, request: pb.ReadRequest, context) -> pb.ReadReply:  # noqa: N802
        return pb.ReadReply(data=await self.k.read(request.pid, request.addr, request.length))

    @rpc_method
    async def Write(self, request: pb.WriteRequest, context) -> common_pb2.Empty:  # noqa: N802
        await self.k.write(request.pid, request.addr, request.data)
        return EMPTY

    @rpc_method
    async def Open(self, request: pb.OpenRequest, context) -> pb.OpenReply:  # noqa: N802
        fd, file_id = await self.k.open(request.pid, request.path, request.flags)
        return pb.OpenReply(fd=fd, file_id=file_id)

    @rpc_method
    async def Close(self, request: pb.FdRequest, context) -> common_pb2.Empty:  # noqa: N802
        await self.k.close(request.pid, request.fd)
        return EMPTY

    @rpc_method
    async def Pread(self, request: pb.PreadRequest, context) -> pb.ReadReply:  # noqa: N802
        return pb.ReadReply(data=await self.k.pread(request.pid, request.fd, request.offset, request.length))

    @rpc_method
    async def Pwrite(self, request: pb.PwriteRequest, context) -> common_pb2.Empty:  # noqa: N802
        await self.k.pwrite(request.pid, request.fd, request.offset, request.data)
        return EMPTY

    @rpc_method
    async def Ftruncate(self, request: pb.FtruncateRequest, context) -> common_pb2.Empty:  # noqa: N802
        await self.k.ftruncate(request.pid, request.fd, request.length)
        return EMPTY

    @rpc_method
    async def PinUserPages(self, request: pb.PinRequest, context) -> pb.PinReply:  # noqa: N802
        r = request
        pin_id = await self.k.pin_user_pages(r.pid, r.addr, r.npages, write=r.write, longterm=r.longterm, hold=r.hold)
        return pb.PinReply(pin_id=pin_id)

    @rpc_method
    async def UnpinUserPages(self, request: pb.UnpinRequest, context) -> common_pb2.Empty:  # noqa: N802
        self.k.unpin_user_pages(request.pid, request.pin_id)
        return EMPTY

    @rpc_method
    async def Pagemap(self, request: pb.RangeRequest, context) -> pb.PagemapReply:  # noqa: N802
        npages = (request.length + PAGE_SIZE - 1) // PAGE_SIZE  # length is in bytes, as in every RangeRequest
        entries = self.k.pagemap(request.pid, request.addr, npages)
        return pb.PagemapReply(entries=entries.astype("<u8").tobytes())

    @rpc_method
    async def Status(self, request: pb.ProcessRef, context) -> pb.ProcessStatus:  # noqa: N802
        return process_status(self.k.process(request.pid))


# /proc/pid/smaps VmFlags mnemonics of the flags madvise sets.
_VM_FLAG_NAMES = ((VM_SEQ_READ, "sr"), (VM_RAND_READ, "rr"), (VM_DONTCOPY, "dc"), (VM_HUGETLB, "ht"),
                  (VM_WIPEONFORK, "wf"), (VM_DONTDUMP, "dd"), (VM_HUGEPAGE, "hg"), (VM_NOHUGEPAGE, "nh"))


def process_status(p: Process) -> pb.ProcessStatus:
    mm = p.mm
    maps = []
    for vma in mm.maps():
        flags = [name for bit, name in _VM_FLAG_NAMES if vma.flags & bit]
        maps.append(pb.Mapping(
            start=vma.start, end=vma.end, perms=vma.perms(), offset=vma.pgoff << 12,
            path=vma.file.name if vma.file is not None else "[anon]", flags=flags,
        ))
    return pb.ProcessStatus(
        pid=p.pid, parent=p.parent, name=p.name, alive=mm.alive and not p.killed,
        rss_anon=mm.rss[0], rss_file=mm.rss[1], rss_shmem=mm.rss[2], rss_peak=mm.rss_peak, maps=maps,
        swap=mm.swapents, hugetlb_pages=mm.hugetlb_usage, oom_score_adj=p.oom_score_adj,
    )
