// The device page table of one dmirror handle: virtual page -> (frame, tags).

/** Tag bits of an entry. A present entry is valid. */
export const DPT_WRITE = 1; // the device may write through it
export const DPT_ATOMIC = 2; // device-exclusive: held for atomics, not for plain writes
export const DPT_DEVICE = 4; // the frame is one of this device's own pages

/**
 * @typedef {object} Entry
 * @property {bigint} pfn a system frame, or one of this device's pages (DPT_DEVICE)
 * @property {number} tags DPT_* bits
 */

/**
 * A sparse table keyed by virtual page number (a Number: address >> 12). Callers
 * hold the handle's lock around every use that must not interleave with an
 * invalidation.
 */
export class PageTable {
  /** @type {Map<number, Entry>} */
  #entries = new Map();

  get size() {
    return this.#entries.size;
  }

  /** @returns {Entry | undefined} */
  get(vpn) {
    return this.#entries.get(vpn);
  }

  /** @param {Entry} entry */
  set(vpn, entry) {
    this.#entries.set(vpn, entry);
  }

  /**
   * The entries of [startVpn, endVpn) in address order, as [vpn, entry] pairs. Walks
   * the range or the table, whichever is shorter (ranges may span the whole
   * address space).
   * @returns {Array<[number, Entry]>}
   */
  entriesIn(startVpn, endVpn) {
    const found = [];
    if (endVpn <= startVpn) return found;
    if (endVpn - startVpn <= this.#entries.size) {
      for (let v = startVpn; v < endVpn; v++) {
        const e = this.#entries.get(v);
        if (e !== undefined) found.push([v, e]);
      }
      return found;
    }
    for (const [v, e] of this.#entries) {
      if (v >= startVpn && v < endVpn) found.push([v, e]);
    }
    return found.sort((a, b) => a[0] - b[0]);
  }

  /** Remove [startVpn, endVpn); returns what was removed, as entriesIn does. */
  erase(startVpn, endVpn) {
    const removed = this.entriesIn(startVpn, endVpn);
    for (const [v] of removed) this.#entries.delete(v);
    return removed;
  }

  clear() {
    this.#entries.clear();
  }
}
