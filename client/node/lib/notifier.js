// The device side of one interval notifier, and the mirror fault loop
// (docs/protocol.md, sections 6.2 and 6.5).

import { HMM_PFN_REQ_FAULT, HMM_PFN_REQ_WRITE, HMM_RANGE_DEFAULT_TIMEOUT_MS, PAGE_SHIFT_N } from './constants.js';
import { KernelError, errno } from './errno.js';
import { Mutex } from './mutex.js';

/**
 * A range fault's output: per page a PFN, HMM_PFN_* flags and a map order.
 * Only usable inside `Notifier.fault`'s `program` callback (lock held, sequence
 * checked).
 */
export class RangeResult {
  /**
   * @param {bigint} start first address
   * @param {BigUint64Array} pfns
   * @param {Uint8Array} flags
   * @param {Uint8Array} orders
   */
  constructor(start, pfns, flags, orders) {
    this.start = start;
    this.pfns = pfns;
    this.flags = flags;
    this.orders = orders;
  }

  get npages() {
    return this.pfns.length;
  }

  /** The address of page `i`. */
  addr(i) {
    return this.start + (BigInt(i) << PAGE_SHIFT_N);
  }
}

/**
 * One interval notifier of this device on one process, [start, end).
 *
 * `seq` is the device's copy of the notifier sequence. The session stores each
 * invalidation's cur_seq into it with `lock` held, before acking; the fault loop
 * compares it (read_retry) with `lock` held, after the range fault reply. Several
 * notifiers may share one lock (dmirror's snapshot notifiers share the handle's).
 */
export class Notifier {
  /**
   * @param {import('./session.js').DeviceSession} session
   * @param {bigint} id
   * @param {number} pid
   * @param {bigint} start
   * @param {bigint} end exclusive
   * @param {bigint} seq
   * @param {Mutex} [lock]
   */
  constructor(session, id, pid, start, end, seq, lock) {
    this.session = session;
    this.id = id;
    this.pid = pid;
    this.start = start;
    this.end = end;
    this.seq = seq;
    this.lock = lock ?? new Mutex();
    /** Set once EVENT_RELEASE arrived: the address space is gone. */
    this.released = false;
  }

  /** True if `seq` is stale. Only meaningful with `lock` held. */
  readRetry(seq) {
    return this.seq !== seq;
  }

  /**
   * The fault loop: read_begin, range fault, lock, read_retry, then `program(result)`
   * with the lock still held; its value is returned. EBUSY collisions start over
   * until `timeoutMs` has passed (then EBUSY); other errors are thrown as they come.
   * Never call it with `lock` held.
   *
   * @template T
   * @param {bigint} start
   * @param {bigint} end
   * @param {{write?: boolean, snapshot?: boolean, timeoutMs?: number, devPrivateOwner?: bigint}} opts
   * @param {(result: RangeResult) => T | Promise<T>} program
   * @returns {Promise<T>}
   */
  async fault(start, end, opts, program) {
    const { write = false, snapshot = false, timeoutMs = HMM_RANGE_DEFAULT_TIMEOUT_MS } = opts;
    const defaultFlags = snapshot ? 0 : HMM_PFN_REQ_FAULT | (write ? HMM_PFN_REQ_WRITE : 0);
    const devPrivateOwner = opts.devPrivateOwner ?? this.session.owner;
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      if (performance.now() > deadline) {
        throw new KernelError(errno.EBUSY, `no stable range fault within ${timeoutMs} ms`);
      }
      const seq = await this.session.readBegin(this);
      let result;
      try {
        result = await this.session.rangeFault(this, seq, start, end, { defaultFlags, devPrivateOwner, snapshot });
      } catch (e) {
        if (e instanceof KernelError && e.errno === errno.EBUSY) continue;
        throw e;
      }
      const release = await this.lock.acquire();
      try {
        if (this.readRetry(seq)) continue; // invalidated since read_begin: start over
        return await program(result);
      } finally {
        release();
      }
    }
  }
}
