// dmirror: a device shaped like the kernel's lib/test_hmm.c, written from
// docs/protocol.md (sections 6-13 for the driver side, 16 for the commands).
//
// A `Dmirror` is one device: one session with hmmd and a pool of device memory.
// A process opening "/dev/<name>" creates a `Handle`: a whole-address-space
// notifier on that process, a device page table, the handle lock (the notifier's
// update lock) and a flags word. Commands run against a handle; every one of them
// programs the table only in the fault loop (lock held, sequence checked) or while
// the daemon holds the pages still (an open migration, locked exclusive pages).

import zlib from 'node:zlib';

import {
  Cmd,
  Event,
  FAULT_CHUNK_PAGES,
  FLAG_FAIL_ALLOC,
  HMM_PFN_ERROR,
  HMM_PFN_VALID,
  HMM_PFN_WRITE,
  HMM_RANGE_DEFAULT_TIMEOUT_MS,
  MIGRATE_PFN_COMPOUND,
  MIGRATE_PFN_MIGRATE,
  MIGRATE_PFN_SYSTEM_DATA,
  MIGRATE_PFN_VALID,
  MIGRATE_PFN_WRITE,
  MIGRATE_VMA_SELECT_COMPOUND,
  MIGRATE_VMA_SELECT_SYSTEM,
  PAGE_OFFSET_MASK_N,
  PAGE_SHIFT_N,
  PAGE_SIZE,
  PAGE_SIZE_N,
  PMD_ORDER,
  PROT_DEV_COHERENT_REMOTE,
  PROT_ERROR,
  PROT_NONE,
  PROT_PMD,
  PROT_PUD,
  PROT_READ,
  PROT_WRITE,
  PROT_ZERO,
  PUD_ORDER,
  TASK_SIZE,
  VM_READ,
} from './constants.js';
import { KernelError, errno } from './errno.js';
import { logger } from './log.js';
import { DPT_ATOMIC, DPT_DEVICE, DPT_WRITE, PageTable } from './pagetable.js';
import { BLOCK_PAGES, DevicePool, DmaContents, LocalContents, MEMORY_KINDS } from './pool.js';
import { DeviceSession } from './session.js';
import { DEFAULT_MAX_MESSAGE_BYTES } from './wire.js';

const log = logger('dmirror');

export const DEFAULT_MEMORY_PAGES = 1 << 16; // 256 MiB of device memory
/** Migrations go piece by piece, never across a mapping's end (2 MiB each). */
const MIGRATE_PIECE_PAGES = 512;
/** Pages of contents per MigratePages during an eviction (16 MiB). */
const EVICT_BATCH_PAGES = 4096;
/** Invalidations kept per handle for the Events call. */
const MAX_EVENTS = 10000;
const EMPTY = Buffer.alloc(0);

const vpnOf = (addr) => Number(addr >> PAGE_SHIFT_N);
const isCompound = (f) => (f & MIGRATE_PFN_COMPOUND) !== 0;

/**
 * Per page of a migration: does it move? A compound entry (section 9.7) is its head
 * only on the wire, its flag standing for 512 pages.
 * @param {Uint8Array} srcFlags
 */
function movingPages(srcFlags) {
  const out = new Uint8Array(srcFlags.length);
  srcFlags.forEach((f, i) => {
    if ((f & MIGRATE_PFN_MIGRATE) !== 0) out.fill(1, i, isCompound(f) ? i + BLOCK_PAGES : i + 1);
  });
  return out;
}

/** Per page of a migration: its source PFN (a compound head's pages follow it), or null. */
function sourcePfns(mig) {
  const out = new Array(mig.npages).fill(null);
  mig.srcFlags.forEach((f, i) => {
    if ((f & MIGRATE_PFN_VALID) === 0) return;
    const n = isCompound(f) ? BLOCK_PAGES : 1;
    for (let k = 0; k < n; k++) out[i + k] = mig.srcPfns[i] + BigInt(k);
  });
  return out;
}

/**
 * Where each page's contents start in a migration's setup-reply data (Migration.data),
 * or -1: the daemon sends 4096 bytes for every page whose unfolded flags have VALID
 * and MIGRATE and whose source is not one of our private pages, in page order.
 */
function dataOffsets(mig, pool) {
  const out = new Array(mig.npages).fill(-1);
  let next = 0;
  const want = MIGRATE_PFN_VALID | MIGRATE_PFN_MIGRATE;
  mig.srcFlags.forEach((f, i) => {
    if ((f & want) !== want) return;
    const n = isCompound(f) ? BLOCK_PAGES : 1;
    for (let k = 0; k < n; k++) {
      if (pool.kind.contentsInDevice && pool.contains(mig.srcPfns[i] + BigInt(k))) continue;
      out[i + k] = next;
      next += PAGE_SIZE;
    }
  });
  return out;
}

const addrOf = (vpn) => BigInt(vpn) << PAGE_SHIFT_N;
const minBig = (a, b) => (a < b ? a : b);

/**
 * @typedef {object} EventRecord  one invalidation a handle's notifier handled
 * @property {number} event
 * @property {bigint} start
 * @property {bigint} end
 * @property {bigint} owner
 * @property {bigint} curSeq
 * @property {number} mappedPages  table entries the invalidation erased
 * @property {number} snoopCrc32  CRC-32 of their contents read before the ack (--snoop)
 * @property {boolean} snooped
 *
 * @typedef {object} CommandResult
 * @property {bigint} cpages
 * @property {bigint} faults
 * @property {Buffer} data
 */

/** One open of the device, bound to the opening process. */
export class Handle {
  /**
   * @param {bigint} fileId
   * @param {number} pid
   * @param {import('./notifier.js').Notifier} notifier whole address space
   */
  constructor(fileId, pid, notifier) {
    this.fileId = fileId;
    this.pid = pid;
    this.notifier = notifier;
    this.table = new PageTable();
    this.flags = 0n;
    /** @type {EventRecord[]} */
    this.events = [];
  }

  /** The handle lock: the notifier's update lock. */
  get lock() {
    return this.notifier.lock;
  }

  /** FLAGS FAIL_ALLOC: true (and the flag clears) if the next allocation must fail. */
  takeFailAlloc() {
    if ((this.flags & FLAG_FAIL_ALLOC) === 0n) return false;
    this.flags &= ~FLAG_FAIL_ALLOC;
    return true;
  }
}

export class Dmirror {
  /** Ask the daemon to set up the faulting page's migration (one round trip less). */
  wantsFaultMigration = true;
  /** Our own migrations keep the tables here: no need to hear their MIGRATE events. */
  ignoresOwnMigrate = true;
  /** @type {DeviceSession | null} */
  session = null;
  /** @type {DevicePool | null} */
  pool = null;
  /** @type {Map<bigint, Handle>} by file id */
  handles = new Map();
  /** @type {Map<bigint, Handle>} by the id of the handle's notifier */
  #byNotifier = new Map();

  /**
   * @param {string} name device name ("/dev/<name>")
   * @param {{memory?: string, memoryPages?: number, snoop?: boolean}} [opts]
   *   memory: a key of MEMORY_KINDS ("private", "coherent")
   */
  constructor(name, { memory = 'private', memoryPages = DEFAULT_MEMORY_PAGES, snoop = false } = {}) {
    const kind = MEMORY_KINDS[memory];
    if (kind === undefined) throw new KernelError(errno.EINVAL, `unknown memory kind ${memory}`);
    this.name = name;
    this.kind = kind;
    this.memoryPages = memoryPages;
    this.snoop = snoop;
  }

  /** Connect to hmmd and declare the device memory. */
  async connect(kernel, { callbackDeadlineMs = 0, maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES, credentials = null } = {}) {
    this.session = await DeviceSession.connect(kernel, this.name, this, {
      callbackDeadlineMs, maxMessageBytes, memory: this.kind.wire, memoryPages: BigInt(this.memoryPages), credentials,
    });
    const base = this.session.devicePfnBase;
    const contents = this.kind.contentsInDevice ? new LocalContents() : new DmaContents(base, this.session);
    this.pool = new DevicePool(base, Number(this.session.devicePfnCount), this.kind, contents);
    return this.session;
  }

  get owner() {
    return this.session?.owner ?? 0n;
  }

  async close() {
    await this.session?.close();
  }

  // ---- driver callbacks (docs/protocol.md 16.1) ----------------------------------------------

  /** A process opened the device: mirror its whole address space. */
  async fileOpen({ fileId, pid }) {
    const notifier = await this.session.insertNotifier(pid, 0n, TASK_SIZE);
    const h = new Handle(fileId, pid, notifier);
    this.handles.set(fileId, h);
    this.#byNotifier.set(notifier.id, h);
  }

  /** The last reference to a handle went: forget it, and empty the device. */
  async fileRelease({ fileId }) {
    const h = this.handles.get(fileId);
    if (h === undefined) return;
    this.handles.delete(fileId);
    this.#byNotifier.delete(h.notifier.id);
    try {
      await this.session.removeNotifier(h.notifier);
    } catch (e) {
      log.debug(`remove notifier on close: ${e.message}`);
    }
    h.table.clear();
    try {
      await this.evict(); // as the newest kernel driver: closing any handle evicts
    } catch (e) {
      log.warn(`eviction on close failed: ${e.message}`);
    }
  }

  /** The daemon is going away (capability detach): every page comes home first. */
  async detach(reason) {
    const moved = this.pool ? await this.evict() : 0;
    log.info(`${this.name}: detached (${reason}), ${moved} pages evicted`);
  }

  /**
   * Stop using [start, end) (the session holds the handle lock and has stored
   * cur_seq). Our own migration's event is skipped: the command keeps the table.
   */
  async invalidate(notifier, range) {
    const h = this.#byNotifier.get(notifier.id);
    if (h === undefined) return true; // a snapshot's temporary notifier: nothing mapped through it
    if (range.event === Event.MIGRATE && range.owner === this.owner) return true;
    const rec = {
      event: range.event, start: range.start, end: range.end, owner: range.owner, curSeq: range.curSeq,
      mappedPages: 0, snoopCrc32: 0, snooped: false,
    };
    const end = minBig(range.end, TASK_SIZE);
    if (range.start < end) {
      const removed = h.table.erase(vpnOf(range.start), vpnOf(end + PAGE_OFFSET_MASK_N));
      rec.mappedPages = removed.length;
      if (this.snoop && removed.length > 0) {
        try {
          // The rights last until the ack: the CPU has not changed these pages yet.
          rec.snoopCrc32 = zlib.crc32(await this.#copyOut(removed.map(([, e]) => e)));
          rec.snooped = true;
        } catch (e) {
          log.warn(`snoop DMA failed: ${e.message}`);
        }
      }
    }
    if (h.events.length < MAX_EVENTS) h.events.push(rec);
    return true;
  }

  /**
   * The CPU (or another device) touched one of our pages: bring it home — the whole
   * block when the CPU maps it by PMD (the daemon then set up the block's
   * migration). FAIL_ALLOC of the handle that migrated it fails the access.
   */
  async migrateToRam({ pid, addr, pfn, faultToken, migration }) {
    const fileId = this.pool.ownerOf(pfn);
    const h = fileId === undefined ? undefined : this.handles.get(fileId);
    const start = addr & ~PAGE_OFFSET_MASK_N;
    const mig = migration ?? await this.session.migrateSetup(pid, start, start + PAGE_SIZE_N, this.kind.select,
      faultToken);
    return ((await this.#copyHome(mig, h)) ?? 0) > 0;
  }

  pageFree(pfns) {
    this.pool?.free(pfns);
  }

  connectionLost(error) {
    log.warn(`${this.name}: session ended: ${error.message}`);
  }

  // ---- commands (docs/protocol.md 16.2) ---------------------------------------------------

  /** @returns {Handle} */
  handle(fileId) {
    const h = this.handles.get(fileId);
    if (h === undefined) throw new KernelError(errno.EINVAL, `no open handle ${fileId} on ${this.name}`);
    return h;
  }

  /**
   * Run one command, with the driver's checks in the driver's order.
   * @param {bigint} fileId
   * @param {number} cmd a Cmd value
   * @param {bigint} addr
   * @param {bigint} npages
   * @param {Buffer} data
   * @returns {Promise<CommandResult>}
   */
  async command(fileId, cmd, addr, npages, data = EMPTY) {
    const h = this.handle(fileId);
    if ((addr & PAGE_OFFSET_MASK_N) !== 0n) throw new KernelError(errno.EINVAL, 'addr is not page-aligned');
    const end = addr + npages * PAGE_SIZE_N;
    if (end <= addr || end > 1n << 64n) throw new KernelError(errno.EINVAL, 'empty or wrapping range');
    switch (cmd) {
      case Cmd.READ:
        return this.#copyLoop(h, addr, end, false, EMPTY);
      case Cmd.WRITE:
        if (BigInt(data.length) !== end - addr) {
          throw new KernelError(errno.EFAULT, `WRITE needs ${end - addr} bytes of data, got ${data.length}`);
        }
        return this.#copyLoop(h, addr, end, true, data);
      case Cmd.MIGRATE_TO_DEV:
        return this.#migrateToDev(h, addr, end);
      case Cmd.MIGRATE_TO_SYS:
        return this.#migrateToSys(h, addr, end);
      case Cmd.SNAPSHOT:
        return this.#snapshot(h, addr, end);
      case Cmd.EXCLUSIVE:
        return this.#exclusive(h, addr, end);
      case Cmd.CHECK_EXCLUSIVE:
        return this.#checkExclusive(h, addr, end);
      case Cmd.RELEASE:
        await this.evict();
        return result();
      case Cmd.FLAGS:
        h.flags = npages;
        return result();
      default:
        throw new KernelError(errno.EINVAL, `unknown command ${cmd}`);
    }
  }

  #checkBound(h) {
    if (h.notifier.released) throw new KernelError(errno.EINVAL, 'the bound address space is gone');
  }

  /**
   * READ / WRITE: copy through the table from the first page not done yet; where a
   * page is missing (or not writable, or held for atomics, for WRITE) run a fault
   * pass over the rest, and count it.
   */
  async #copyLoop(h, start, end, write, data) {
    const n = Number((end - start) >> PAGE_SHIFT_N);
    const first = vpnOf(start);
    const usable = write
      ? (e) => e !== undefined && (e.tags & DPT_WRITE) !== 0 && (e.tags & DPT_ATOMIC) === 0
      : (e) => e !== undefined;
    const parts = [];
    let done = 0;
    let faults = 0;
    for (;;) {
      this.#checkBound(h);
      await h.lock.run(async () => {
        const entries = [];
        for (let e = h.table.get(first + done); done + entries.length < n && usable(e);
          e = h.table.get(first + done + entries.length)) {
          entries.push(e);
        }
        if (entries.length === 0) return;
        if (write) await this.#copyIn(entries, data.subarray(done * PAGE_SIZE, (done + entries.length) * PAGE_SIZE));
        else parts.push(await this.#copyOut(entries));
        done += entries.length;
      });
      if (done === n) return result(n, faults, write ? EMPTY : Buffer.concat(parts));
      await this.#faultPass(h, start + addrOf(done), end, write);
      faults++;
    }
  }

  /**
   * One fault pass: make the table cover [start, end), in requests of at most
   * max_pages_per_request pages, each with the kernel driver's budget of 1000 ms
   * per 32 pages.
   */
  async #faultPass(h, start, end, write) {
    const step = BigInt(this.session.maxPages) << PAGE_SHIFT_N;
    for (let s = start; s < end; s += step) {
      const e = minBig(end, s + step);
      const timeoutMs = HMM_RANGE_DEFAULT_TIMEOUT_MS * Math.ceil(Number((e - s) >> PAGE_SHIFT_N) / FAULT_CHUNK_PAGES);
      await h.notifier.fault(s, e, { write, timeoutMs }, (r) => this.#store(h, r));
    }
  }

  /** Program the table from a range fault result (handle lock held, sequence checked). */
  #store(h, r) {
    const first = vpnOf(r.start);
    for (let i = 0; i < r.npages; i++) {
      const f = r.flags[i];
      if ((f & HMM_PFN_VALID) === 0) continue; // leave what was there
      const pfn = r.pfns[i];
      let tags = (f & HMM_PFN_WRITE) !== 0 ? DPT_WRITE : 0;
      if (this.pool?.contains(pfn)) tags |= DPT_DEVICE;
      h.table.set(first + i, { pfn, tags });
    }
  }

  /** The contents of the pages `entries` name: system frames by DMA, our own pages
   * from device memory. Caller holds the handle lock (the entries stay valid). */
  async #copyOut(entries) {
    const sys = [];
    const sysAt = [];
    entries.forEach((e, i) => {
      if ((e.tags & DPT_DEVICE) === 0) {
        sys.push(e.pfn);
        sysAt.push(i);
      }
    });
    if (sys.length === entries.length) return this.session.dmaRead(sys);
    const out = Buffer.allocUnsafe(entries.length * PAGE_SIZE);
    const devAt = [];
    entries.forEach((e, i) => {
      if ((e.tags & DPT_DEVICE) !== 0) devAt.push(i);
    });
    const own = await this.pool.read(devAt.map((i) => entries[i].pfn));
    devAt.forEach((i, k) => own.copy(out, i * PAGE_SIZE, k * PAGE_SIZE, (k + 1) * PAGE_SIZE));
    if (sys.length > 0) {
      const got = await this.session.dmaRead(sys);
      sysAt.forEach((i, k) => got.copy(out, i * PAGE_SIZE, k * PAGE_SIZE, (k + 1) * PAGE_SIZE));
    }
    return out;
  }

  /** Write `data` (entries.length pages) through `entries` (handle lock held). */
  async #copyIn(entries, data) {
    const sys = [];
    const sysData = [];
    const dev = [];
    const devData = [];
    entries.forEach((e, i) => {
      const page = data.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE);
      if ((e.tags & DPT_DEVICE) !== 0) {
        dev.push(e.pfn);
        devData.push(page);
      } else {
        sys.push(e.pfn);
        sysData.push(page);
      }
    });
    if (dev.length > 0) await this.pool.write(dev, Buffer.concat(devData));
    if (sys.length > 0) {
      await this.session.dmaWrite(sys, sys.length === entries.length ? data : Buffer.concat(sysData));
    }
  }

  /**
   * SNAPSHOT: a range fault that faults nothing, through a temporary notifier per
   * chunk that shares the handle lock; one HMM_DMIRROR_PROT_* byte per page. The
   * handle's table is not touched.
   */
  async #snapshot(h, start, end) {
    this.#checkBound(h);
    const parts = [];
    const step = BigInt(this.session.maxPages) << PAGE_SHIFT_N;
    for (let s = start; s < end; s += step) {
      const e = minBig(end, s + step);
      const temp = await this.session.insertNotifier(h.pid, s, e - s, h.lock);
      try {
        parts.push(await temp.fault(s, e, { snapshot: true }, (r) => this.#snapshotBytes(r)));
      } finally {
        await this.session.removeNotifier(temp);
      }
    }
    const out = Buffer.concat(parts);
    return result(out.length, 0, out);
  }

  #snapshotBytes(r) {
    const out = Buffer.alloc(r.npages, PROT_NONE);
    for (let i = 0; i < r.npages; i++) {
      const f = r.flags[i];
      if ((f & HMM_PFN_ERROR) !== 0) {
        out[i] = PROT_ERROR;
        continue;
      }
      if ((f & HMM_PFN_VALID) === 0) continue;
      const pfn = r.pfns[i];
      let b = (f & HMM_PFN_WRITE) !== 0 ? PROT_WRITE : PROT_READ;
      if (pfn === this.session.zeroPfn) b |= PROT_ZERO;
      if (this.pool?.contains(pfn)) b |= this.kind.protLocal;
      // Another device's page can only be reported valid if the CPU can map it.
      else if (pfn >= this.session.systemFrames) b |= PROT_DEV_COHERENT_REMOTE;
      if (r.orders[i] === PMD_ORDER) b |= PROT_PMD;
      else if (r.orders[i] === PUD_ORDER) b |= PROT_PUD;
      out[i] = b;
    }
    return out;
  }

  // ---- migration ------------------------------------------------------------------------

  /**
   * Pieces of at most 512 pages that never cross a mapping's end. Each piece's
   * mapping is looked up when the piece is reached (earlier pieces have migrated by
   * then): EINVAL where nothing readable is mapped.
   */
  async *#pieces(h, start, end) {
    this.#checkBound(h);
    for (let pos = start; pos < end;) {
      let vma;
      try {
        vma = await this.session.findVma(h.pid, pos);
      } catch (e) {
        if (e instanceof KernelError) throw new KernelError(errno.EINVAL, `no mapping at 0x${pos.toString(16)}`);
        throw e;
      }
      if ((vma.vmFlags & VM_READ) === 0) {
        throw new KernelError(errno.EINVAL, `mapping at 0x${pos.toString(16)} is not readable`);
      }
      const pieceEnd = minBig(minBig(end, vma.end), pos + BigInt(MIGRATE_PIECE_PAGES) * PAGE_SIZE_N);
      yield [pos, pieceEnd];
      pos = pieceEnd;
    }
  }

  /** MIGRATE_TO_DEV: system pages to device memory, then read back without faulting. */
  async #migrateToDev(h, start, end) {
    const pool = this.#requirePool();
    for await (const [s, e] of this.#pieces(h, start, end)) {
      // The collected pages' contents come in the setup's reply (one DmaRead less).
      const mig = await this.session.migrateSetup(h.pid, s, e, MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND,
        0n, { withData: true });
      try {
        await this.#fillFromSystem(h, pool, mig);
      } finally {
        await this.session.migrateFinalize(mig);
      }
    }
    return h.lock.run(async () => {
      const entries = [];
      for (let v = vpnOf(start); v < vpnOf(end); v++) {
        const entry = h.table.get(v);
        if (entry === undefined) throw new KernelError(errno.ENOENT, `page 0x${addrOf(v).toString(16)} is not on this device`);
        entries.push(entry);
      }
      return result(entries.length, 0, await this.#copyOut(entries));
    });
  }

  /**
   * Steps 2 and 3a of a migration to the device (the caller finalizes): a device
   * page for every collected entry — an aligned block of 512 for a compound one,
   * which then moves whole — filled from its source or zeroed. FAIL_ALLOC fails
   * the first allocation: a single entry stays behind, a compound one falls back to
   * 512 single pages (the daemon splits it).
   */
  async #fillFromSystem(h, pool, mig) {
    const n = mig.npages;
    const dst = new BigUint64Array(n);
    const dstFlags = new Uint8Array(n);
    const pages = new Array(n).fill(null); // per page: its device page
    const writable = new Uint8Array(n);
    const taken = [];
    let first = true;
    try {
      mig.srcFlags.forEach((f, i) => {
        if ((f & MIGRATE_PFN_MIGRATE) === 0) return;
        const fail = first && h.takeFailAlloc();
        first = false;
        const write = f & MIGRATE_PFN_WRITE;
        if (isCompound(f)) {
          const block = fail ? null : pool.allocBlock(h.fileId);
          const got = block ?? pool.alloc(BLOCK_PAGES, h.fileId);
          taken.push(got);
          got.forEach((pfn, k) => {
            pages[i + k] = pfn;
            writable[i + k] = write;
            if (block === null) {
              dst[i + k] = pfn;
              dstFlags[i + k] = MIGRATE_PFN_VALID | write;
            }
          });
          if (block !== null) {
            dst[i] = block[0];
            dstFlags[i] = MIGRATE_PFN_VALID | MIGRATE_PFN_COMPOUND | write;
          }
        } else if (!fail) {
          const [pfn] = pool.alloc(1, h.fileId);
          taken.push([pfn]);
          pages[i] = pfn;
          writable[i] = write;
          dst[i] = pfn;
          dstFlags[i] = MIGRATE_PFN_VALID | write;
        }
      });
      const used = [];
      pages.forEach((pfn, j) => pfn !== null && used.push(j));
      if (used.length > 0) {
        const src = sourcePfns(mig);
        const contents = Buffer.alloc(used.length * PAGE_SIZE); // holes and zero pages stay zero
        const withSource = used.flatMap((j, k) => (src[j] !== null ? [k] : []));
        if (withSource.length > 0 && mig.data !== null) { // the setup's reply carried them
          const at = dataOffsets(mig, pool);
          withSource.forEach((k) => mig.data.copy(contents, k * PAGE_SIZE, at[used[k]], at[used[k]] + PAGE_SIZE));
        } else if (withSource.length > 0) {
          const got = await this.session.dmaRead(withSource.map((k) => src[used[k]]));
          withSource.forEach((k, m) => got.copy(contents, k * PAGE_SIZE, m * PAGE_SIZE, (m + 1) * PAGE_SIZE));
        }
        await pool.write(used.map((j) => pages[j]), contents);
      }
      const moved = movingPages(await this.session.migratePages(mig, dst, dstFlags));
      taken.length = 0; // the daemon has them now; unused ones come back through PageFree
      await h.lock.run(() => {
        const firstVpn = vpnOf(mig.start);
        pages.forEach((pfn, j) => {
          if (pfn === null || !moved[j]) return;
          h.table.set(firstVpn + j, { pfn, tags: DPT_DEVICE | (writable[j] !== 0 ? DPT_WRITE : 0) });
        });
      });
    } finally {
      for (const t of taken) pool.free(t); // refused (or never sent) before the daemon took any
    }
  }

  /** MIGRATE_TO_SYS: our pages in the range go home; cpages counts those that moved. */
  async #migrateToSys(h, start, end) {
    this.#requirePool();
    let cpages = 0;
    for await (const [s, e] of this.#pieces(h, start, end)) {
      const mig = await this.session.migrateSetup(h.pid, s, e, this.kind.select | MIGRATE_VMA_SELECT_COMPOUND);
      const moved = await this.#copyHome(mig, h);
      if (moved === null) throw new KernelError(errno.ENOMEM, 'could not allocate system memory');
      cpages += moved;
    }
    return result(cpages, 0, EMPTY);
  }

  /**
   * Move the collected device pages of `mig` to new system pages (a new THP for a
   * compound entry), their contents in the request, and finalize. Our own MIGRATE
   * event left the table alone, so the moving pages' entries go here, in every
   * handle on that process. FAIL_ALLOC of `h` fails the first allocation: a single
   * page then stays (nothing moves: null), a compound entry falls back to 512
   * single pages. Returns how many pages moved, or null.
   */
  async #copyHome(mig, h) {
    const pool = this.#requirePool();
    const sel = [];
    mig.srcFlags.forEach((f, i) => {
      if ((f & MIGRATE_PFN_MIGRATE) !== 0 && (f & MIGRATE_PFN_VALID) !== 0 && pool.contains(mig.srcPfns[i])) sel.push(i);
    });
    if (sel.length === 0) {
      await this.session.migrateFinalize(mig);
      return 0;
    }
    const fail = h?.takeFailAlloc() ?? false;
    if (fail && !isCompound(mig.srcFlags[sel[0]])) {
      await this.session.migrateFinalize(mig); // nothing moves
      return null;
    }
    const dstFlags = new Uint8Array(mig.npages);
    const moving = []; // page indices, in order: their contents follow in `data`
    sel.forEach((i, k) => {
      const f = mig.srcFlags[i];
      const flags = MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA | (f & MIGRATE_PFN_WRITE);
      if (!isCompound(f)) {
        dstFlags[i] = flags;
        moving.push(i);
        return;
      }
      for (let j = i; j < i + BLOCK_PAGES; j++) moving.push(j);
      if (fail && k === 0) dstFlags.fill(flags, i, i + BLOCK_PAGES); // no THP: 512 single pages
      else dstFlags[i] = flags | MIGRATE_PFN_COMPOUND;
    });
    const src = sourcePfns(mig);
    const contents = await pool.read(moving.map((j) => src[j]));
    const firstVpn = vpnOf(mig.start);
    for (const handle of this.handles.values()) {
      if (handle.pid !== mig.pid) continue;
      await handle.lock.run(() => {
        for (const j of moving) handle.table.erase(firstVpn + j, firstVpn + j + 1);
      });
    }
    let moved;
    try {
      moved = await this.session.migratePages(mig, new BigUint64Array(mig.npages), dstFlags, contents, { finalize: true });
    } catch (e) {
      // Not finalized: put everything back now rather than hold the mmap lock.
      await this.session.migrateFinalize(mig).catch(() => {});
      throw e;
    }
    const done = movingPages(moved);
    return moving.filter((j) => done[j]).length;
  }

  /**
   * Evict: every page of our memory that a process maps goes back to system memory
   * (RELEASE, and every close), in ranges whose EvictSetup reply fits a message. The
   * eviction's CLEAR events erase the handles' entries. Returns how many pages moved.
   */
  async evict() {
    this.#requirePool();
    const span = BigInt(this.session.evictPages);
    const end = this.session.devicePfnBase + this.session.devicePfnCount;
    let moved = 0;
    for (let lo = this.session.devicePfnBase; lo < end; lo += span) {
      moved += await this.#evictRange(lo, Number(end - lo < span ? end - lo : span));
    }
    return moved;
  }

  async #evictRange(startPfn, npages) {
    const pool = this.#requirePool();
    const ev = await this.session.evictSetup(startPfn, npages);
    let moved = null;
    try {
      // Each MigratePages carries every entry's dst flag besides its share of the contents.
      const batch = Math.min(EVICT_BATCH_PAGES, this.session.dataPages(ev.npages));
      for (let s = 0; s < ev.npages; s += batch) {
        const e = Math.min(ev.npages, s + batch);
        const dstFlags = new Uint8Array(ev.npages);
        const pfns = [];
        for (let i = s; i < e; i++) {
          if (!pool.contains(ev.srcPfns[i])) continue;
          dstFlags[i] = MIGRATE_PFN_VALID | MIGRATE_PFN_SYSTEM_DATA | (ev.srcFlags[i] & MIGRATE_PFN_WRITE);
          pfns.push(ev.srcPfns[i]);
        }
        if (pfns.length > 0) await this.session.migratePages(ev, null, dstFlags, await pool.read(pfns));
      }
    } finally {
      moved = await this.session.migrateFinalize(ev);
    }
    return moved.filter((f) => (f & MIGRATE_PFN_MIGRATE) !== 0).length;
  }

  // ---- device-exclusive access ---------------------------------------------------------

  /**
   * EXCLUSIVE: take the pages for atomics (the request carries no owner, so the
   * EXCLUSIVE events erase the old entries here too), store ATOMIC entries while the
   * frames are locked, unlock, then read back without faulting.
   */
  async #exclusive(h, start, end) {
    this.#checkBound(h);
    const n = Number((end - start) >> PAGE_SHIFT_N);
    const pfns = await this.session.makeExclusive(h.pid, start, n, { withOwner: false });
    try {
      await h.lock.run(() => {
        const first = vpnOf(start);
        pfns.forEach((pfn, i) => h.table.set(first + i, { pfn, tags: DPT_WRITE | DPT_ATOMIC }));
      });
    } finally {
      await this.session.unlockPages(pfns);
    }
    return h.lock.run(async () => {
      const entries = [];
      for (let v = vpnOf(start); v < vpnOf(end); v++) {
        const entry = h.table.get(v);
        if (entry === undefined) throw new KernelError(errno.ENOENT, 'an exclusive entry vanished');
        entries.push(entry);
      }
      return result(n, 0, await this.#copyOut(entries));
    });
  }

  /** CHECK_EXCLUSIVE: EPERM while any page of the range is still held for atomics. */
  async #checkExclusive(h, start, end) {
    const held = await h.lock.run(() =>
      h.table.entriesIn(vpnOf(start), vpnOf(end)).some(([, e]) => (e.tags & DPT_ATOMIC) !== 0));
    if (held) throw new KernelError(errno.EPERM, 'a page is still held exclusively');
    return result();
  }

  #requirePool() {
    if (this.pool === null) throw new KernelError(errno.EINVAL, `${this.name} has no device memory`);
    return this.pool;
  }
}

/** @returns {CommandResult} */
function result(cpages = 0, faults = 0, data = EMPTY) {
  return { cpages: BigInt(cpages), faults: BigInt(faults), data };
}
