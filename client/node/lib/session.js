// A device's session with hmmd: the Connect stream (hello, welcome, callbacks and
// acks) and the driver-facing calls of hmm.v1.Device (docs/protocol.md, 3-13).
//
// The stream reader never waits for anything: each callback runs as its own async
// task and is acked when it finishes, so a callback that arrives while one of our
// own calls waits for its ack (rule O3) is always answered. Callbacks take only the
// notifier's update lock. No protobuf message reaches the driver: it sees BigInts,
// typed arrays, Buffers and the small objects below.

import grpc from '@grpc/grpc-js';

import {
  CAP_ACK_PAGES,
  CAP_DETACH,
  CAP_DMA,
  CAP_MIGRATE_SETUP_DATA,
  CAP_MIGRATE_TO_RAM_SETUP,
  CAP_OWN_MIGRATE_SILENT,
  Event,
  MIGRATE_PFN_MIGRATE,
  MIGRATE_PFN_VALID,
  MIGRATE_SETUP_BYTES_PER_PAGE,
  MEMORY_NONE,
  PAGE_OFFSET_MASK_N,
  PAGE_SIZE,
  PROTOCOL_VERSION,
  SESSION_METADATA_KEY,
} from './constants.js';
import { KernelError, errno, fromServiceError } from './errno.js';
import { logger } from './log.js';
import { Notifier, RangeResult } from './notifier.js';
import { channelCredentials, tokenMetadata } from './security.js';
import { channelOptions, DEFAULT_KEEPALIVE_MS, DEFAULT_MAX_MESSAGE_BYTES, hmmServices, packU64, unpackU64 } from './wire.js';

const log = logger('session');

/** Room left in a message for everything but page data. */
const MESSAGE_OVERHEAD = 64 * 1024;

/**
 * @typedef {object} InvalidateRange  what an invalidation callback is told
 * @property {bigint} notifierId
 * @property {number} pid
 * @property {bigint} start
 * @property {bigint} end  exclusive; 2^64-1 for RELEASE, SOFT_DIRTY and the exit UNMAP
 * @property {number} event  an Event value
 * @property {bigint} owner
 * @property {boolean} blockable
 * @property {bigint} curSeq
 *
 * @typedef {object} DeviceFile  a process's open of this device
 * @property {bigint} fileId
 * @property {number} pid
 *
 * @typedef {object} FaultRequest  migrate_to_ram: the CPU touched device page `pfn`
 * @property {number} pid
 * @property {bigint} addr
 * @property {bigint} pfn
 * @property {bigint} faultToken
 * @property {Migration|null} migration  already set up (capability migrate-to-ram-setup)
 *
 * @typedef {object} Driver  the callbacks a device implements; all optional
 * @property {(n: Notifier, r: InvalidateRange) => boolean|void|Promise<boolean|void>} [invalidate]
 *   stop using [r.start, r.end) of `n`; runs with n.lock held after n.seq = r.curSeq
 * @property {(f: DeviceFile) => void|Promise<void>} [fileOpen]  throw a KernelError to refuse
 * @property {(f: DeviceFile) => void|Promise<void>} [fileRelease]
 * @property {(f: FaultRequest) => boolean|Promise<boolean>} [migrateToRam]  true: the page is home
 * @property {(pfns: BigUint64Array) => void} [pageFree]
 * @property {(reason: string) => void|Promise<void>} [detach]  the daemon is going away:
 *   evict every page of device memory first (asks for capability detach)
 * @property {(e: KernelError) => void} [connectionLost]
 * @property {boolean} [wantsFaultMigration]  ask for capability migrate-to-ram-setup
 * @property {boolean} [ignoresOwnMigrate]  ask for capability own-migrate-silent: the
 *   driver keeps its tables itself during its own migrations, so the daemon need not
 *   send it the MIGRATE invalidations they raise
 */

/** An open migrate_vma (or eviction): per page the source PFN and MIGRATE_PFN_* flags. */
export class Migration {
  /**
   * @param {bigint} id
   * @param {number} pid
   * @param {bigint} start
   * @param {BigUint64Array} srcPfns
   * @param {Uint8Array} srcFlags
   * @param {bigint} cpages
   */
  constructor(id, pid, start, srcPfns, srcFlags, cpages) {
    this.id = id;
    this.pid = pid;
    this.start = start;
    this.srcPfns = srcPfns;
    this.srcFlags = srcFlags;
    this.cpages = cpages;
    /** A MigrateToRam's set-up migration: its final MigratePages rides in the ack. */
    this.inAck = false;
    /** That MigratePagesRequest, once the driver made it. */
    this.pagesForAck = null;
    /** migrateSetup(..., {withData}): the contents of every page whose (unfolded)
     * flags have VALID and MIGRATE and whose source is not this device's private
     * page, 4096 bytes each in page order (docs/protocol.md 9.2); else null. */
    this.data = null;
  }

  get npages() {
    return this.srcFlags.length;
  }

  static fromReply(reply, pid, start) {
    return new Migration(reply.migration_id, pid, start, unpackU64(reply.src_pfns),
      Uint8Array.from(reply.src_flags), reply.cpages);
  }
}

export class DeviceSession {
  /** @type {Map<bigint, Notifier>} */
  notifiers = new Map();
  /** cur_seq of invalidations that arrived before their InsertNotifier reply (6.4). */
  #earlySeq = new Map();
  #client;
  #call = null;
  #metadata = null;
  #credentials = null;
  #ended = false;
  #closing = false;
  #closedResolve;
  #name = '';
  /** Callback ids being handled, and the acks of the latest handled ones: a resumed
   * stream re-sends what was not acked, and each is handled once (15.1). */
  #handling = new Set();
  #acks = new Map();

  /**
   * @param {Driver} driver
   * @param {string} address
   * @param {{maxMessageBytes?: number, keepaliveMs?: number, credentials?: object}} opts
   *   credentials: what security.clientCredentials returns (default: plaintext, no token)
   */
  constructor(driver, address, {
    maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES, keepaliveMs = DEFAULT_KEEPALIVE_MS, credentials = null,
  } = {}) {
    this.driver = driver;
    this.address = address;
    this.#credentials = credentials;
    const { Device } = hmmServices();
    const channel = credentials ? channelCredentials(credentials) : { credentials: grpc.credentials.createInsecure(), options: {} };
    this.#client = new Device(address, channel.credentials,
      { ...channelOptions({ maxMessageBytes, keepaliveMs }), ...channel.options });
    this.deviceId = 0;
    this.owner = 0n;
    this.zeroPfn = 0n;
    this.systemFrames = 0n;
    this.maxPages = 0;
    this.maxMessageBytes = maxMessageBytes;
    this.callbackDeadlineMs = 0;
    this.devicePfnBase = 0n;
    this.devicePfnCount = 0n;
    /** @type {string[]} */
    this.capabilities = [];
    this.reconnectGraceMs = 0; // the daemon keeps a dropped session this long (Limits)
    this.resumes = 0; // how often a dropped stream was resumed
    /** Resolves with the KernelError that ended the session. */
    this.closed = new Promise((resolve) => {
      this.#closedResolve = resolve;
    });
  }

  /**
   * Open a session: Hello, then wait for the Welcome (section 3). Rejects with a
   * KernelError: EEXIST (name taken), EINVAL, EPROTONOSUPPORT, EOPNOTSUPP (memory
   * kind), ECONNREFUSED (no daemon), ...
   *
   * @param {string} address hmmd's address
   * @param {string} name the device name; processes open "/dev/<name>"
   * @param {Driver} driver
   * @param {{capabilities?: string[], callbackDeadlineMs?: number, maxMessageBytes?: number,
   *          keepaliveMs?: number, memory?: number, memoryPages?: bigint, connectTimeoutMs?: number}} [opts]
   */
  static async connect(address, name, driver, opts = {}) {
    const session = new DeviceSession(driver, address, opts);
    try {
      await session.#handshake(name, opts);
    } catch (e) {
      session.#client.close();
      throw e;
    }
    return session;
  }

  async #handshake(name, {
    capabilities = [CAP_DMA], callbackDeadlineMs = 0, maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES,
    memory = MEMORY_NONE, memoryPages = 0n, connectTimeoutMs = 30000,
  }) {
    const caps = [...capabilities];
    if (this.driver.wantsFaultMigration && !caps.includes(CAP_MIGRATE_TO_RAM_SETUP)) caps.push(CAP_MIGRATE_TO_RAM_SETUP);
    if (this.driver.ignoresOwnMigrate && !caps.includes(CAP_OWN_MIGRATE_SILENT)) caps.push(CAP_OWN_MIGRATE_SILENT);
    if (!caps.includes(CAP_ACK_PAGES)) caps.push(CAP_ACK_PAGES);
    if (typeof this.driver.detach === 'function' && !caps.includes(CAP_DETACH)) caps.push(CAP_DETACH);
    if (!caps.includes(CAP_MIGRATE_SETUP_DATA)) caps.push(CAP_MIGRATE_SETUP_DATA);
    // No wait-for-ready: with no daemon listening the stream fails at once
    // (UNAVAILABLE, ECONNREFUSED); a daemon that accepts but never answers is given
    // connectTimeoutMs.
    const { call, welcome } = await this.#openStream({
      version_major: PROTOCOL_VERSION.major, version_minor: PROTOCOL_VERSION.minor, name,
      capabilities: caps, callback_deadline_ms: callbackDeadlineMs, max_message_bytes: BigInt(maxMessageBytes),
      memory, memory_pages: BigInt(memoryPages),
    }, connectTimeoutMs);
    this.#name = name;
    this.deviceId = welcome.device_id;
    this.owner = welcome.owner;
    this.zeroPfn = welcome.zero_pfn;
    this.systemFrames = welcome.system_frames;
    this.maxPages = Number(welcome.limits?.max_pages_per_request ?? 0n);
    this.maxMessageBytes = Number(welcome.limits?.max_message_bytes ?? BigInt(this.maxMessageBytes));
    this.callbackDeadlineMs = welcome.limits?.callback_deadline_ms ?? 0;
    this.maxRequestsInFlight = welcome.limits?.max_requests_in_flight ?? 0; // EAGAIN beyond (0: an older daemon)
    this.devicePfnBase = welcome.device_pfn_base;
    this.devicePfnCount = welcome.device_pfn_count;
    this.capabilities = [...welcome.capabilities];
    this.reconnectGraceMs = welcome.limits?.reconnect_grace_ms ?? 0;
    this.#metadata = tokenMetadata(this.#credentials);
    this.#metadata.set(SESSION_METADATA_KEY, welcome.session);
    this.#attach(call);
  }

  /** A new Connect stream: send the Hello, resolve with the call and its Welcome. */
  #openStream(hello, timeoutMs) {
    const call = this.#client.Connect(tokenMetadata(this.#credentials));
    call.on('error', () => {}); // an EventEmitter 'error' with no listener would throw; handled below
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        cleanup();
        call.cancel();
        reject(new KernelError(errno.ETIMEDOUT, `no Welcome from ${this.address} within ${timeoutMs} ms`));
      }, timeoutMs);
      const onData = (m) => {
        cleanup();
        if (m.msg !== 'welcome') reject(new KernelError(errno.EPROTO, `the daemon's first message was ${m.msg}, not a Welcome`));
        else resolve({ call, welcome: m.welcome });
      };
      const onError = (e) => {
        cleanup();
        reject(fromServiceError(e));
      };
      const onEnd = () => {
        cleanup();
        reject(new KernelError(errno.ECONNRESET, 'the daemon closed the stream before the Welcome'));
      };
      const cleanup = () => {
        clearTimeout(timer);
        call.off('data', onData);
        call.off('error', onError);
        call.off('end', onEnd);
      };
      call.on('data', onData);
      call.on('error', onError);
      call.on('end', onEnd);
      call.write({ hello });
    });
  }

  /** From here on the stream only carries callbacks (and our acks). */
  #attach(call) {
    this.#call = call;
    call.on('data', (m) => {
      if (call === this.#call) this.#dispatch(m);
    });
    // The final status says how the stream ended ('end' alone does not: a cut
    // connection ends it too): OK is the daemon ending it, anything else a failure.
    call.on('status', (st) => {
      if (call !== this.#call) return;
      if (st.code === grpc.status.OK) this.#lost(new KernelError(errno.ECONNRESET, 'the daemon ended the stream'));
      else this.#dropped(st);
    });
  }

  /** The stream failed. Fenced or refused by the daemon (a status with an errno):
   * over. Dropped (the connection broke): resume it within the daemon's grace. */
  async #dropped(e) {
    const error = fromServiceError(e);
    const dropped = e.code === grpc.status.UNAVAILABLE || e.code === grpc.status.CANCELLED
      || error.errno === errno.ECONNRESET;
    if (this.#ended || this.#closing || !dropped || !this.reconnectGraceMs) {
      this.#lost(error);
      return;
    }
    const gone = await this.#resume();
    if (gone !== null) this.#lost(gone);
  }

  /** Open a stream resuming the session (15.1), retrying until the grace period is
   * over: null once resumed; else why the session is gone (the daemon no longer
   * knows it, or the time ran out). */
  async #resume() {
    const deadline = Date.now() + this.reconnectGraceMs;
    const hello = {
      version_major: PROTOCOL_VERSION.major, version_minor: PROTOCOL_VERSION.minor, name: this.#name,
      resume_session: this.#metadata.get(SESSION_METADATA_KEY)[0],
    };
    let last = '';
    while (Date.now() < deadline && !this.#ended && !this.#closing) {
      try {
        const { call } = await this.#openStream(hello, Math.max(100, deadline - Date.now()));
        this.#attach(call);
        this.resumes += 1;
        log.warn(`device ${this.#name}: stream resumed`);
        return null;
      } catch (e) {
        if (e instanceof KernelError && e.errno === errno.ENOENT) { // a daemon that never had it, or fenced it
          return new KernelError(errno.ENOENT,
            `the daemon no longer knows this session (restarted, or fenced it): connect again (${e.message})`);
        }
        last = `: ${e.message}`;
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    return new KernelError(errno.ECONNRESET, `not resumed within the daemon's ${this.reconnectGraceMs} ms reconnect grace${last}`);
  }

  /** Most pages one DMA call may carry, in either direction. */
  get maxDmaPages() {
    return this.dataPages();
  }

  /** Most pages of contents one call may carry besides `besides` bytes of other fields. */
  dataPages(besides = 0) {
    const byMessage = Math.floor((this.maxMessageBytes - MESSAGE_OVERHEAD - besides) / PAGE_SIZE);
    return Math.max(1, Math.min(this.maxPages || byMessage, byMessage));
  }

  // ---- the callback stream ---------------------------------------------------------------

  #dispatch(m) {
    if (m.msg !== 'page_free' && m.id) {
      // After a resume the daemon sends again what it has no ack for: handle each once.
      if (this.#handling.has(m.id)) return;
      const acked = this.#acks.get(m.id);
      if (acked !== undefined) {
        this.#write(acked);
        return;
      }
      this.#handling.add(m.id);
    }
    switch (m.msg) {
      case 'invalidate':
        this.#spawn(this.#onInvalidate(m.id, m.invalidate));
        break;
      case 'file_open':
        this.#spawn(this.#onFileOpen(m.id, m.file_open));
        break;
      case 'file_release':
        this.#spawn(this.#onFileRelease(m.id, m.file_release));
        break;
      case 'migrate_to_ram':
        this.#spawn(this.#onMigrateToRam(m.id, m.migrate_to_ram));
        break;
      case 'detach':
        this.#spawn(this.#onDetach(m.id, m.detach));
        break;
      case 'page_free':
        try {
          this.driver.pageFree?.(unpackU64(m.page_free.pfns));
        } catch (e) {
          log.error('driver pageFree failed:', e);
        }
        break;
      default:
        log.warn(`unexpected stream message ${m.msg} (id ${m.id})`);
    }
  }

  #spawn(promise) {
    promise.catch((e) => log.error('callback failed:', e));
  }

  #ack(id, { ok = true, err = 0, pages = null } = {}) {
    const ack = { ack: pages ? { id, ok, errno: err, pages } : { id, ok, errno: err } };
    this.#handling.delete(id);
    this.#acks.set(id, ack);
    if (this.#acks.size > 1024) this.#acks.delete(this.#acks.keys().next().value);
    this.#write(ack);
  }

  #write(message) {
    if (this.#ended || this.#call === null) return;
    try {
      this.#call.write(message);
    } catch (e) {
      log.debug(`stream write failed: ${e.message}`);
    }
  }

  async #onInvalidate(id, m) {
    /** @type {InvalidateRange} */
    const range = {
      notifierId: m.notifier_id, pid: m.pid, start: m.start, end: m.end, event: m.event, owner: m.owner,
      blockable: m.blockable, curSeq: m.cur_seq,
    };
    const n = this.notifiers.get(m.notifier_id);
    let ok = true;
    if (n === undefined) {
      // Its InsertNotifier reply is still on the way: keep the sequence (6.4).
      const early = this.#earlySeq.get(m.notifier_id) ?? 0n;
      this.#earlySeq.set(m.notifier_id, m.cur_seq > early ? m.cur_seq : early);
    } else if (!m.blockable && n.lock.locked) {
      // A non-blockable range may be refused rather than wait for the lock. The daemon
      // has already made cur_seq the notifier's sequence, so take it too: otherwise
      // read_retry would fail until the next invalidation.
      n.seq = m.cur_seq;
      ok = false;
    } else {
      const release = await n.lock.acquire();
      try {
        n.seq = m.cur_seq; // always, before the ack
        if (this.driver.invalidate) ok = (await this.driver.invalidate(n, range)) !== false || m.blockable;
      } catch (e) {
        log.error('driver invalidate failed; acking anyway:', e);
      } finally {
        release();
      }
      if (m.event === Event.RELEASE) n.released = true;
    }
    this.#ack(id, { ok });
  }

  async #onDetach(id, m) {
    try {
      await this.driver.detach?.(m.reason);
    } catch (e) {
      log.error('driver detach failed:', e);
    }
    this.#ack(id);
  }

  async #onFileOpen(id, m) {
    let err = 0;
    try {
      await this.driver.fileOpen?.({ fileId: m.file_id, pid: m.pid });
    } catch (e) {
      err = e instanceof KernelError ? e.errno : errno.EIO;
      if (!(e instanceof KernelError)) log.error('driver fileOpen failed:', e);
    }
    this.#ack(id, { err });
  }

  async #onFileRelease(id, m) {
    try {
      await this.driver.fileRelease?.({ fileId: m.file_id, pid: m.pid });
    } catch (e) {
      log.error('driver fileRelease failed:', e);
    }
    this.#ack(id);
  }

  async #onMigrateToRam(id, m) {
    let ok = false;
    const start = m.addr & ~PAGE_OFFSET_MASK_N;
    let migration = null;
    try {
      if (m.migration) {
        migration = Migration.fromReply(m.migration, m.pid, start);
        // The pages step rides on the ack only where the daemon says it honours it.
        migration.inAck = this.capabilities.includes(CAP_ACK_PAGES);
      }
      ok = Boolean(await this.driver.migrateToRam?.({
        pid: m.pid, addr: m.addr, pfn: m.device_pfn, faultToken: m.fault_token, migration,
      }));
    } catch (e) {
      log.warn(`migrate_to_ram of ${m.addr.toString(16)} failed: ${e.message}`);
    }
    // The copy travels in the ack (Ack.pages): the daemon runs pages + finalize.
    this.#ack(id, { ok, pages: ok ? migration?.pagesForAck : null });
  }

  #lost(error) {
    if (this.#ended) return;
    this.#ended = true;
    this.#closedResolve(error);
    try {
      this.driver.connectionLost?.(error);
    } catch (e) {
      log.error('connectionLost failed:', e);
    }
  }

  // ---- kernel calls ------------------------------------------------------------------------

  #unary(method, request) {
    return new Promise((resolve, reject) => {
      this.#client[method](request, this.#metadata.clone(), (err, reply) => {
        if (err) reject(fromServiceError(err));
        else resolve(reply);
      });
    });
  }

  /**
   * mmu_interval_notifier_insert over [start, start + length) of `pid`, which must
   * have opened this device (EPERM). `lock`: share another notifier's update lock.
   * @returns {Promise<Notifier>}
   */
  async insertNotifier(pid, start, length, lock = undefined) {
    const r = await this.#unary('InsertNotifier', { pid, start, length });
    const early = this.#earlySeq.get(r.notifier_id) ?? 0n;
    this.#earlySeq.delete(r.notifier_id);
    const n = new Notifier(this, r.notifier_id, pid, start, start + length, r.seq > early ? r.seq : early, lock);
    this.notifiers.set(n.id, n);
    return n;
  }

  /** mmu_interval_notifier_remove: returns once no callback for it runs or will run. */
  async removeNotifier(n) {
    try {
      await this.#unary('RemoveNotifier', { notifier_id: n.id });
    } finally {
      this.notifiers.delete(n.id);
    }
  }

  /** mmu_interval_read_begin. Never call it with the notifier's lock held. */
  async readBegin(n) {
    return (await this.#unary('ReadBegin', { notifier_id: n.id })).seq;
  }

  /**
   * One hmm_range_fault (or snapshot) call; the loop around it is Notifier.fault.
   * @returns {Promise<RangeResult>}
   */
  async rangeFault(n, seq, start, end, { defaultFlags = 0, pfnFlagsMask = 0, requests = Buffer.alloc(0),
    devPrivateOwner = 0n, snapshot = false } = {}) {
    const r = await this.#unary(snapshot ? 'Snapshot' : 'RangeFault', {
      notifier_id: n.id, notifier_seq: seq, start, end, default_flags: defaultFlags, pfn_flags_mask: pfnFlagsMask,
      requests, dev_private_owner: devPrivateOwner,
    });
    return new RangeResult(start, unpackU64(r.pfns), Uint8Array.from(r.flags), Uint8Array.from(r.orders));
  }

  /**
   * Read whole system frames this device holds (section 8), in pieces below the
   * message limit. Returns pfns.length x 4096 bytes.
   * @param {BigUint64Array | bigint[]} pfns
   */
  async dmaRead(pfns) {
    if (pfns.length === 0) return Buffer.alloc(0);
    const step = this.maxDmaPages;
    const parts = [];
    for (let i = 0; i < pfns.length; i += step) {
      const r = await this.#unary('DmaRead', { pfns: packU64(pfns.slice(i, i + step)) });
      parts.push(r.data);
    }
    return parts.length === 1 ? parts[0] : Buffer.concat(parts);
  }

  /** Write whole system frames this device holds writable. */
  async dmaWrite(pfns, data) {
    if (data.length !== pfns.length * PAGE_SIZE) throw new KernelError(errno.EINVAL, 'data must be pfns x 4096 bytes');
    const step = this.maxDmaPages;
    for (let i = 0; i < pfns.length; i += step) {
      await this.#unary('DmaWrite', {
        pfns: packU64(pfns.slice(i, i + step)), data: data.subarray(i * PAGE_SIZE, (i + step) * PAGE_SIZE),
      });
    }
  }

  /** vma_lookup: {start, end, vmFlags} of the mapping at `addr`; ENOENT if none. */
  async findVma(pid, addr) {
    const r = await this.#unary('FindVma', { pid, addr });
    return { start: r.start, end: r.end, vmFlags: r.vm_flags };
  }

  /**
   * migrate_vma_setup over [start, end). It holds the process's mmap lock until
   * finalize: finalize promptly, whatever happens.
   * @returns {Promise<Migration>}
   */
  async migrateSetup(pid, start, end, select, faultToken = 0n, { withData = false } = {}) {
    // The contents come in the reply only where the daemon offers it and they fit.
    const npages = Number((end - start) / BigInt(PAGE_SIZE));
    const inline = withData && this.capabilities.includes(CAP_MIGRATE_SETUP_DATA)
      && npages * (PAGE_SIZE + MIGRATE_SETUP_BYTES_PER_PAGE) <= this.maxMessageBytes - MESSAGE_OVERHEAD;
    const r = await this.#unary('MigrateSetup', { pid, start, end, select, fault_token: faultToken, with_data: inline });
    const mig = Migration.fromReply(r, pid, start);
    if (inline) mig.data = r.data;
    return mig;
  }

  /** Device pages one EvictSetup may cover whatever is in use: its reply lists at
   * most one entry (9 bytes) per page of the range, below the message limit. */
  get evictPages() {
    return Math.max(1, Math.floor((this.maxMessageBytes - MESSAGE_OVERHEAD) / MIGRATE_SETUP_BYTES_PER_PAGE));
  }

  /**
   * migrate_device_range over this device's mapped pages among `npages` device PFNs
   * from `startPfn` (0n, 0: its whole memory; section 11). EINVAL when more of the
   * range's pages are in use than one reply can list: `evictPages` pages always fit.
   */
  async evictSetup(startPfn = 0n, npages = 0) {
    const r = await this.#unary('EvictSetup', { start_pfn: startPfn, npages: BigInt(npages) });
    return Migration.fromReply(r, 0, 0n);
  }

  /**
   * migrate_vma_pages (+ finalize in the same call). Updates and returns
   * mig.srcFlags: MIGRATE set = the page moves.
   * @param {Migration} mig
   * @param {BigUint64Array | null} dstPfns null: none (evictions, SYSTEM_DATA only)
   * @param {Uint8Array} dstFlags
   * @param {Buffer} [data] 4096 bytes per SYSTEM_DATA entry
   */
  async migratePages(mig, dstPfns, dstFlags, data = Buffer.alloc(0), { finalize = false } = {}) {
    const request = {
      migration_id: mig.id, dst_pfns: dstPfns ? packU64(dstPfns) : Buffer.alloc(0), dst_flags: Buffer.from(dstFlags),
      data, finalize,
    };
    if (mig.inAck && finalize) {
      // Sent with the MigrateToRam ack instead. A page moves unless the daemon then
      // refuses the request (and the access fails as for ok = false).
      mig.pagesForAck = request;
      mig.srcFlags = mig.srcFlags.map((f, i) => ((dstFlags[i] & MIGRATE_PFN_VALID) !== 0 ? f : f & ~MIGRATE_PFN_MIGRATE));
      return mig.srcFlags;
    }
    const r = await this.#unary('MigratePages', request);
    mig.srcFlags = Uint8Array.from(r.src_flags);
    return mig.srcFlags;
  }

  /** migrate_vma_finalize; returns the final src flags. */
  async migrateFinalize(mig) {
    const r = await this.#unary('MigrateFinalize', { migration_id: mig.id });
    mig.srcFlags = Uint8Array.from(r.src_flags);
    return mig.srcFlags;
  }

  /** make_device_exclusive over npages pages; the frames come back locked for us. */
  async makeExclusive(pid, start, npages, { withOwner = true } = {}) {
    const r = await this.#unary('MakeExclusive', { pid, start, npages: BigInt(npages), with_owner: withOwner });
    return unpackU64(r.pfns);
  }

  async unlockPages(pfns) {
    await this.#unary('UnlockPages', { pfns: packU64(pfns) });
  }

  /**
   * End the session: half-close the stream and wait (at most 2 s) for the daemon to
   * end it. The daemon fences a device that leaves: evict first if pages matter.
   */
  async close() {
    this.#closing = true;
    if (!this.#ended && this.#call !== null) {
      this.#call.end();
      await Promise.race([this.closed, new Promise((resolve) => setTimeout(resolve, 2000).unref())]);
    }
    this.#lost(new KernelError(errno.ECONNABORTED, 'closed by this device'));
    this.#client.close();
  }
}

