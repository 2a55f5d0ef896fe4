// Device memory: the pages [base, base + npages) that the daemon gave this device,
// their contents, and which are free (docs/protocol.md, 9.1, 13).
//
// Where the contents live depends on the kind: device-private contents live here
// and nowhere else (LocalContents); device-coherent pages are frames the CPU maps
// directly, so their contents are in the daemon and this device reaches them by
// DMA to its own PFNs (DmaContents).

import {
  MEMORY_DEVICE_COHERENT,
  MEMORY_DEVICE_PRIVATE,
  MIGRATE_VMA_SELECT_DEVICE_COHERENT,
  MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
  PAGE_SIZE,
  PROT_DEV_COHERENT_LOCAL,
  PROT_DEV_COHERENT_REMOTE,
  PROT_DEV_PRIVATE_LOCAL,
  PROT_DEV_PRIVATE_REMOTE,
} from './constants.js';
import { KernelError, errno } from './errno.js';

/**
 * The kinds of device memory, and what differs between them for a dmirror. Adding a
 * kind is adding an entry here.
 */
export const MEMORY_KINDS = Object.freeze({
  private: Object.freeze({
    name: 'private',
    wire: MEMORY_DEVICE_PRIVATE,
    select: MIGRATE_VMA_SELECT_DEVICE_PRIVATE, // how migrate_vma selects our pages
    protLocal: PROT_DEV_PRIVATE_LOCAL, // snapshot byte of our own pages
    protRemote: PROT_DEV_PRIVATE_REMOTE, // and of another device's
    contentsInDevice: true, // the daemon holds no copy
  }),
  coherent: Object.freeze({
    name: 'coherent',
    wire: MEMORY_DEVICE_COHERENT,
    select: MIGRATE_VMA_SELECT_DEVICE_COHERENT,
    protLocal: PROT_DEV_COHERENT_LOCAL,
    protRemote: PROT_DEV_COHERENT_REMOTE,
    contentsInDevice: false, // frames of the daemon's RAM window, reached by DMA
  }),
});

/** Pages of storage allocated at a time, on first write (device memory is lazy). */
const SLAB_PAGES = 256;
const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);

/** Contents kept in this process, in slabs allocated on first write. */
export class LocalContents {
  /** @type {Map<number, Buffer>} slab index -> SLAB_PAGES pages */
  #slabs = new Map();

  /** Page indices -> their contents, concatenated. */
  async read(indices) {
    const out = Buffer.allocUnsafe(indices.length * PAGE_SIZE);
    indices.forEach((idx, i) => {
      const slab = this.#slabs.get(Math.floor(idx / SLAB_PAGES));
      if (slab === undefined) ZERO_PAGE.copy(out, i * PAGE_SIZE);
      else slab.copy(out, i * PAGE_SIZE, (idx % SLAB_PAGES) * PAGE_SIZE, (idx % SLAB_PAGES + 1) * PAGE_SIZE);
    });
    return out;
  }

  async write(indices, data) {
    indices.forEach((idx, i) => {
      const key = Math.floor(idx / SLAB_PAGES);
      let slab = this.#slabs.get(key);
      if (slab === undefined) {
        slab = Buffer.alloc(SLAB_PAGES * PAGE_SIZE);
        this.#slabs.set(key, slab);
      }
      data.copy(slab, (idx % SLAB_PAGES) * PAGE_SIZE, i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
    });
  }
}

/** Contents in the daemon's frames [base, base + n), reached by DMA. */
export class DmaContents {
  /**
   * @param {bigint} base
   * @param {{dmaRead: (pfns: bigint[]) => Promise<Buffer>, dmaWrite: (pfns: bigint[], d: Buffer) => Promise<void>}} dma
   */
  constructor(base, dma) {
    this.base = base;
    this.dma = dma;
  }

  async read(indices) {
    return this.dma.dmaRead(indices.map((i) => this.base + BigInt(i)));
  }

  async write(indices, data) {
    if (indices.length > 0) await this.dma.dmaWrite(indices.map((i) => this.base + BigInt(i)), data);
  }
}

/** Pages of a compound (THP) block: one PMD. */
export const BLOCK_PAGES = 512;

/**
 * The allocator of the device's pages, and their contents.
 *
 * Two free lists: blocks of 512 pages whose first PFN is a multiple of 512 (for
 * compound migration: a device-private PMD, or a coherent THP), and single pages.
 * Single pages come from the unaligned edges of the memory first, then from
 * splitting the highest free block, so that low blocks stay whole. A block taken
 * whole goes back to the block list when its last page is freed.
 */
export class DevicePool {
  /** @type {Map<number, bigint>} page index -> file id of the handle that migrated it */
  #owners = new Map();
  /** @type {number[]} free single page indices, lowest last */
  #singles;
  /** @type {number[]} first indices of free blocks, lowest last */
  #blocks;
  /** @type {Map<number, number>} first index of a block taken whole -> its pages in use */
  #whole = new Map();
  #firstBlock;

  /**
   * @param {bigint} base first device PFN (Welcome.device_pfn_base)
   * @param {number} npages
   * @param {typeof MEMORY_KINDS[keyof typeof MEMORY_KINDS]} kind
   * @param {LocalContents | DmaContents} [contents] default: kept here
   */
  constructor(base, npages, kind = MEMORY_KINDS.private, contents = new LocalContents()) {
    this.base = base;
    this.npages = npages;
    this.kind = kind;
    this.contents = contents;
    const first = Number((BigInt(BLOCK_PAGES) - (base % BigInt(BLOCK_PAGES))) % BigInt(BLOCK_PAGES));
    const nblocks = Math.max(0, Math.floor((npages - first) / BLOCK_PAGES));
    this.#firstBlock = first;
    this.#blocks = Array.from({ length: nblocks }, (_, b) => first + (nblocks - 1 - b) * BLOCK_PAGES);
    const edges = [];
    for (let i = 0; i < (nblocks ? first : npages); i++) edges.push(i);
    for (let i = first + nblocks * BLOCK_PAGES; i < npages && nblocks; i++) edges.push(i);
    this.#singles = edges.reverse();
  }

  get freePages() {
    return this.#singles.length + BLOCK_PAGES * this.#blocks.length;
  }

  get freeBlocks() {
    return this.#blocks.length;
  }

  /** True if `pfn` is one of this device's pages. */
  contains(pfn) {
    return pfn >= this.base && pfn < this.base + BigInt(this.npages);
  }

  #index(pfn) {
    if (!this.contains(pfn)) throw new KernelError(errno.EINVAL, `PFN ${pfn} is not device memory`);
    return Number(pfn - this.base);
  }

  #take(indices, fileId) {
    const out = new BigUint64Array(indices.length);
    indices.forEach((idx, i) => {
      this.#owners.set(idx, fileId);
      out[i] = this.base + BigInt(idx);
    });
    return out;
  }

  /**
   * Take `n` free single pages for a migration of handle `fileId` (splitting blocks
   * when the single pages run out); ENOMEM if there are not enough (then none is
   * taken).
   * @returns {BigUint64Array}
   */
  alloc(n, fileId) {
    if (n > this.freePages) throw new KernelError(errno.ENOMEM, 'device memory is full');
    while (this.#singles.length < n) {
      const b = this.#blocks.shift(); // the highest block
      for (let i = b + BLOCK_PAGES - 1; i >= b; i--) this.#singles.unshift(i);
    }
    const taken = [];
    for (let i = 0; i < n; i++) taken.push(this.#singles.pop());
    return this.#take(taken, fileId);
  }

  /** One free aligned block of 512 pages, or null when there is none. */
  allocBlock(fileId) {
    const b = this.#blocks.pop();
    if (b === undefined) return null;
    this.#whole.set(b, BLOCK_PAGES);
    return this.#take(Array.from({ length: BLOCK_PAGES }, (_, i) => b + i), fileId);
  }

  /** The file id of the handle whose migration took `pfn`, if it is in use. */
  ownerOf(pfn) {
    return this.contains(pfn) ? this.#owners.get(Number(pfn - this.base)) : undefined;
  }

  /** Return pages (PageFree, or destinations the daemon never took). Unknown or
   * already free pages are ignored. */
  free(pfns) {
    for (const pfn of pfns) {
      if (!this.contains(pfn)) continue;
      const idx = Number(pfn - this.base);
      if (!this.#owners.delete(idx)) continue;
      const block = idx >= this.#firstBlock ? idx - ((idx - this.#firstBlock) % BLOCK_PAGES) : -1;
      const left = this.#whole.get(block);
      if (left === undefined) {
        this.#singles.push(idx);
      } else if (left > 1) {
        this.#whole.set(block, left - 1);
      } else {
        this.#whole.delete(block);
        this.#blocks.push(block);
        this.#blocks.sort((x, y) => y - x); // lowest last
      }
    }
  }

  /** The contents of `pfns` (an array or typed array), concatenated. */
  async read(pfns) {
    if (pfns.length === 0) return Buffer.alloc(0);
    return this.contents.read(Array.from(pfns, (p) => this.#index(p)));
  }

  /** Store pfns.length pages of `data` into `pfns`. */
  async write(pfns, data) {
    if (pfns.length === 0) return;
    await this.contents.write(Array.from(pfns, (p) => this.#index(p)), data);
  }
}
