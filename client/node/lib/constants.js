// Numbers of the hmm.v1 protocol, named once (docs/protocol.md, section 1).
//
// Wire values that are uint64 (addresses, PFNs, ids, sequences) are BigInt. Page
// counts and page indices inside one bounded request are plain Numbers: a range
// below 2^64 bytes has fewer than 2^52 pages, which a Number holds exactly.

export const PAGE_SHIFT = 12;
export const PAGE_SIZE = 1 << PAGE_SHIFT;
export const PAGE_SHIFT_N = 12n;
export const PAGE_SIZE_N = 4096n;
export const PAGE_OFFSET_MASK_N = PAGE_SIZE_N - 1n;
/** Top of the user address space: the whole-space notifier covers [0, TASK_SIZE). */
export const TASK_SIZE = 1n << 47n;
export const U64_MAX = (1n << 64n) - 1n;
export const PMD_ORDER = 9;
export const PUD_ORDER = 18;

export const PROTOCOL_VERSION = Object.freeze({ major: 1, minor: 0 });
export const SESSION_METADATA_KEY = 'hmm-session';
export const ERRNO_METADATA_KEY = 'hmm-errno';
export const ERRNO_VALUE_METADATA_KEY = 'hmm-errno-value';

/** Capabilities this device asks for (section 3.2). */
export const CAP_DMA = 'dma';
export const CAP_MIGRATE_TO_RAM_SETUP = 'migrate-to-ram-setup';
export const CAP_OWN_MIGRATE_SILENT = 'own-migrate-silent';
export const CAP_ACK_PAGES = 'ack-pages';
export const CAP_DETACH = 'detach';
export const CAP_MIGRATE_SETUP_DATA = 'migrate-setup-data';
/** MigrateSetupReply bytes per page besides any contents: src_pfns (8), src_flags (1). */
export const MIGRATE_SETUP_BYTES_PER_PAGE = 9;

/** enum mmu_notifier_event (hmm.v1.Event). */
export const Event = Object.freeze({
  UNMAP: 0,
  CLEAR: 1,
  PROTECTION_VMA: 2,
  PROTECTION_PAGE: 3,
  SOFT_DIRTY: 4,
  RELEASE: 5,
  MIGRATE: 6,
  EXCLUSIVE: 7,
});

/** hmm.v1.MemoryKind */
export const MEMORY_NONE = 0;
export const MEMORY_DEVICE_PRIVATE = 1;
export const MEMORY_DEVICE_COHERENT = 2;

// hmm_range_fault per-page bits (one byte per page).
export const HMM_PFN_VALID = 0x01;
export const HMM_PFN_WRITE = 0x02;
export const HMM_PFN_ERROR = 0x04;
export const HMM_PFN_REQ_FAULT = HMM_PFN_VALID;
export const HMM_PFN_REQ_WRITE = HMM_PFN_WRITE;
/** The mirror fault loop's time budget per 32-page chunk (the kernel driver's). */
export const HMM_RANGE_DEFAULT_TIMEOUT_MS = 1000;
export const FAULT_CHUNK_PAGES = 32;

// migrate_vma selectors and per-page MIGRATE_PFN_* bits.
export const MIGRATE_VMA_SELECT_SYSTEM = 0x1;
export const MIGRATE_VMA_SELECT_DEVICE_PRIVATE = 0x2;
export const MIGRATE_VMA_SELECT_DEVICE_COHERENT = 0x4;
export const MIGRATE_VMA_SELECT_COMPOUND = 0x8;
export const MIGRATE_PFN_VALID = 0x01;
export const MIGRATE_PFN_MIGRATE = 0x02;
export const MIGRATE_PFN_WRITE = 0x08;
export const MIGRATE_PFN_COMPOUND = 0x10;
/** hmmd's own dst bit: a new system page holding the next 4096 bytes of `data`. */
export const MIGRATE_PFN_SYSTEM_DATA = 0x40;

// FindVma vm_flags bits used here.
export const VM_READ = 0x1;

// dmirror commands (hmm.v1.DmirrorCmd) and the FLAGS word.
export const Cmd = Object.freeze({
  READ: 0,
  WRITE: 1,
  MIGRATE_TO_DEV: 2,
  MIGRATE_TO_SYS: 3,
  SNAPSHOT: 4,
  EXCLUSIVE: 5,
  CHECK_EXCLUSIVE: 6,
  RELEASE: 7,
  FLAGS: 8,
});
export const FLAG_FAIL_ALLOC = 1n;

// Snapshot bytes, HMM_DMIRROR_PROT_* (section 16.3).
export const PROT_ERROR = 0xff;
export const PROT_NONE = 0x00;
export const PROT_READ = 0x01;
export const PROT_WRITE = 0x02;
export const PROT_PMD = 0x04;
export const PROT_PUD = 0x08;
export const PROT_ZERO = 0x10;
export const PROT_DEV_PRIVATE_LOCAL = 0x20;
export const PROT_DEV_PRIVATE_REMOTE = 0x30;
export const PROT_DEV_COHERENT_LOCAL = 0x40;
export const PROT_DEV_COHERENT_REMOTE = 0x50;
