"""Numbers of the emulated machine, named once: page geometry, Linux flag values,
notifier events, HMM PFN flags and dmirror snapshot bytes.

Values are Linux x86-64's so that a reader can check them against the man pages
and the kernel headers. errno values come from the standard ``errno`` module.
"""

from __future__ import annotations

import enum

# ---- geometry -------------------------------------------------------------------
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
PMD_SHIFT = 21
PMD_SIZE = 1 << PMD_SHIFT
PMD_ORDER = PMD_SHIFT - PAGE_SHIFT  # 9
PTRS_PER_PTE = 1 << PMD_ORDER  # 512 pages per page table
PUD_SHIFT = 30
PUD_ORDER = PUD_SHIFT - PAGE_SHIFT  # 18
TASK_SIZE = 1 << 47  # top of the user address space
ULONG_MAX = (1 << 64) - 1

# ---- mmap / mprotect / madvise / mremap ----------------------------------------
PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4

MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_SHARED_VALIDATE = 0x03  # MAP_SHARED, refusing flags it does not know (EOPNOTSUPP)
MAP_TYPE = 0x0F
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_GROWSDOWN = 0x100  # accepted, no stack growth (EINVAL on shared anonymous memory)
MAP_DENYWRITE = 0x800  # ignored, as by Linux
MAP_EXECUTABLE = 0x1000  # ignored, as by Linux
MAP_LOCKED = 0x2000  # accepted (nothing is ever swapped out against it here)
MAP_NORESERVE = 0x4000  # hugetlb: reserve no pool pages at mmap
MAP_POPULATE = 0x8000
MAP_NONBLOCK = 0x10000  # ignored, as by Linux
MAP_STACK = 0x20000  # VM_NOHUGEPAGE (v6.7+)
MAP_SYNC = 0x80000  # DAX only: EOPNOTSUPP (with MAP_SHARED_VALIDATE; ignored otherwise)
MAP_HUGETLB = 0x40000
MAP_FIXED_NOREPLACE = 0x100000

# madvise(2) advice, as Linux numbers it. KSM (MERGEABLE 12, UNMERGEABLE 13), memory
# failure injection (HWPOISON 100, SOFT_OFFLINE 101) and guard regions (102, 103) are
# not modelled: EINVAL, as from a kernel built without them.
MADV_NORMAL = 0
MADV_RANDOM = 1
MADV_SEQUENTIAL = 2
MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_FREE = 8
MADV_REMOVE = 9
MADV_DONTFORK = 10
MADV_DOFORK = 11
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_DONTDUMP = 16
MADV_DODUMP = 17
MADV_WIPEONFORK = 18
MADV_KEEPONFORK = 19
MADV_COLD = 20
MADV_PAGEOUT = 21
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
MADV_DONTNEED_LOCKED = 24
MADV_COLLAPSE = 25

MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4

# /proc/pid/clear_refs values
CLEAR_REFS_ALL = 1
CLEAR_REFS_ANON = 2
CLEAR_REFS_MAPPED = 3
CLEAR_REFS_SOFT_DIRTY = 4
CLEAR_REFS_MM_HIWATER_RSS = 5

# open(2)
O_RDONLY = 0o0
O_WRONLY = 0o1
O_RDWR = 0o2
O_ACCMODE = 0o3
O_CREAT = 0o100
O_TRUNC = 0o1000
O_TMPFILE = 0o20200000


# ---- mmu notifier events (enum mmu_notifier_event) -------------------------------
class Event(enum.IntEnum):
    UNMAP = 0
    CLEAR = 1
    PROTECTION_VMA = 2
    PROTECTION_PAGE = 3
    SOFT_DIRTY = 4
    RELEASE = 5
    MIGRATE = 6
    EXCLUSIVE = 7


# ---- hmm_range_fault per-page flags (one byte on the wire) -------------------------
HMM_PFN_VALID = 0x01
HMM_PFN_WRITE = 0x02
HMM_PFN_ERROR = 0x04
HMM_PFN_DMA_MAPPED = 0x08
HMM_PFN_P2PDMA = 0x10
HMM_PFN_P2PDMA_BUS = 0x20
HMM_PFN_REQ_FAULT = HMM_PFN_VALID
HMM_PFN_REQ_WRITE = HMM_PFN_WRITE
HMM_PFN_INOUT_FLAGS = HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA | HMM_PFN_P2PDMA_BUS  # sticky
HMM_PFN_REQ_MASK = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE

HMM_RANGE_DEFAULT_TIMEOUT_MS = 1000  # the mirror fault loop's budget

# ---- migrate_vma ------------------------------------------------------------------
# Selectors (enum migrate_vma_direction).
MIGRATE_VMA_SELECT_SYSTEM = 1 << 0
MIGRATE_VMA_SELECT_DEVICE_PRIVATE = 1 << 1
MIGRATE_VMA_SELECT_DEVICE_COHERENT = 1 << 2
MIGRATE_VMA_SELECT_COMPOUND = 1 << 3
# Per-page src/dst flags, one byte on the wire (the kernel's MIGRATE_PFN_* bits).
MIGRATE_PFN_VALID = 1 << 0
MIGRATE_PFN_MIGRATE = 1 << 1
MIGRATE_PFN_WRITE = 1 << 3
MIGRATE_PFN_COMPOUND = 1 << 4
# hmmd's own dst bit: "a new system page holding the next 4096 bytes of the data
# sent with the request" — a device cannot allocate system pages itself.
MIGRATE_PFN_SYSTEM_DATA = 1 << 6
# The bits dst_flags may hold (MIGRATE and WRITE are ignored there, as in the kernel).
MIGRATE_PFN_DST_FLAGS = (MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE | MIGRATE_PFN_COMPOUND
                         | MIGRATE_PFN_SYSTEM_DATA)
# MigrateSetupReply bytes per page besides any contents: src_pfns (8), src_flags (1).
MIGRATE_SETUP_BYTES_PER_PAGE = 9
# RangeFaultReply bytes per page: pfns (8), flags (1), orders (1).
RANGE_FAULT_BYTES_PER_PAGE = 10
# The smallest message limit a session may have (Hello.max_message_bytes, hmmd's
# --max-message-bytes): room for one page of contents, or for the 512 migration
# entries of a compound page, with their framing.
MIN_MESSAGE_BYTES = 16 << 10

# Device memory kinds (the dmirror uapi values).
MEMORY_DEVICE_PRIVATE = 1
MEMORY_DEVICE_COHERENT = 2

# ---- dmirror snapshot bytes (HMM_DMIRROR_PROT_*) -----------------------------------
HMM_DMIRROR_PROT_ERROR = 0xFF
HMM_DMIRROR_PROT_NONE = 0x00
HMM_DMIRROR_PROT_READ = 0x01
HMM_DMIRROR_PROT_WRITE = 0x02
HMM_DMIRROR_PROT_PMD = 0x04
HMM_DMIRROR_PROT_PUD = 0x08
HMM_DMIRROR_PROT_ZERO = 0x10
HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL = 0x20
HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE = 0x30
HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL = 0x40
HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE = 0x50

# ---- protocol ----------------------------------------------------------------------
PROTOCOL_VERSION = (1, 0)
SESSION_METADATA_KEY = "hmm-session"
ERRNO_METADATA_KEY = "hmm-errno"
ERRNO_VALUE_METADATA_KEY = "hmm-errno-value"
