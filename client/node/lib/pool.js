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

export class DevicePool {
  /** @type {Map<number, bigint>} page index -> file id of the handle that migrated it */
  #owners = new Map();
  /** @type {number[]} free page indices, lowest last */
  #free;

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
    this.#free = Array.from({ length: npages }, (_, i) => npages - 1 - i);
  }

  get freePages() {
    return this.#free.length;
  }

  /** True if `pfn` is one of this device's pages. */
  contains(pfn) {
    return pfn >= this.base && pfn < this.base + BigInt(this.npages);
  }

  #index(pfn) {
    if (!this.contains(pfn)) throw new KernelError(errno.EINVAL, `PFN ${pfn} is not device memory`);
    return Number(pfn - this.base);
  }

  /**
   * Take `n` free pages for a migration of handle `fileId`; ENOMEM if there are
   * not enough (then none is taken).
   * @returns {BigUint64Array}
   */
  alloc(n, fileId) {
    if (n > this.#free.length) throw new KernelError(errno.ENOMEM, 'device memory is full');
    const out = new BigUint64Array(n);
    for (let i = 0; i < n; i++) {
      const idx = this.#free.pop();
      this.#owners.set(idx, fileId);
      out[i] = this.base + BigInt(idx);
    }
    return out;
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
      if (this.#owners.delete(idx)) this.#free.push(idx);
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
