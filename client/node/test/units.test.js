// Unit tests of the pieces that need no daemon: errno mapping, packed arrays, the
// page table, the device pool, the update lock, the fault loop and the token guard.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import grpc from '@grpc/grpc-js';

import { KernelError, errno, errnoName, errnoValue, fromServiceError, toServiceError } from '../lib/errno.js';
import { setLevel } from '../lib/log.js';
import { Mutex } from '../lib/mutex.js';
import { Notifier, RangeResult } from '../lib/notifier.js';
import { DPT_WRITE, PageTable } from '../lib/pagetable.js';
import { BLOCK_PAGES, DevicePool, DmaContents, MEMORY_KINDS } from '../lib/pool.js';
import {
  channelCredentials, checkToken, clientCredentials, requireToken, serverCredentials, tokenMetadata,
} from '../lib/security.js';
import { packU64, unpackU64 } from '../lib/wire.js';

test('errno names are the kernel headers\' and aliases are understood', () => {
  assert.equal(errnoName(95), 'EOPNOTSUPP');
  assert.equal(errnoName(35), 'EDEADLK');
  assert.equal(errnoValue('ENOTSUP'), 95);
  assert.equal(errnoValue('EFAULT'), 14);
  assert.equal(errnoValue('ENOPE'), undefined);
});

test('a KernelError becomes a status with hmm-errno metadata, and back', () => {
  const st = toServiceError(new KernelError(errno.EBUSY, 'invalidated'));
  assert.equal(st.code, grpc.status.ABORTED);
  assert.equal(st.details, 'EBUSY: invalidated');
  assert.deepEqual(st.metadata.get('hmm-errno'), ['EBUSY']);
  assert.deepEqual(st.metadata.get('hmm-errno-value'), ['16']);
  const back = fromServiceError({ code: st.code, details: st.details, metadata: st.metadata, message: '' });
  assert.equal(back.errno, errno.EBUSY);
  assert.equal(back.message, 'EBUSY: invalidated'); // the name once, as the daemon's details carry it
  // Only the name (another implementation), or nothing (the transport).
  const md = new grpc.Metadata();
  md.set('hmm-errno', 'ENOTSUP');
  assert.equal(fromServiceError({ code: 9, details: '', metadata: md, message: '' }).errno, 95);
  assert.equal(fromServiceError({ code: grpc.status.UNAVAILABLE, details: 'x', metadata: new grpc.Metadata() }).errno,
    errno.ECONNREFUSED);
  // A failure to connect: one line, grpc-js's empty resolution note gone, a hint added.
  const refused = fromServiceError({
    code: grpc.status.UNAVAILABLE, metadata: new grpc.Metadata(),
    details: 'No connection established. Last error: Error: connect ECONNREFUSED 127.0.0.1:1. Resolution note: ',
  });
  assert.equal(refused.message, 'ECONNREFUSED: UNAVAILABLE: No connection established. Last error: Error: connect '
    + 'ECONNREFUSED 127.0.0.1:1 (is the server running at that address?)');
  const ssl = fromServiceError({
    code: grpc.status.UNAVAILABLE, metadata: new grpc.Metadata(),
    details: 'No connection established. Last error: Error: x:SSL routines:ssl3_get_record:wrong version number:y:350:\n. ',
  });
  assert.ok(!ssl.message.includes('\n') && ssl.message.endsWith('(the server does not serve TLS: no --tls-ca / HMM_TLS_CA)'));
  // UNAVAILABLE after the connection was made (the daemon went away) gets no hint.
  assert.ok(!fromServiceError({ code: grpc.status.UNAVAILABLE, details: 'Connection dropped', metadata: null })
    .message.includes('('));
  // Anything else is a bug: EIO.
  assert.equal(toServiceError(new TypeError('oops')).code, grpc.status.INTERNAL);
});

test('packed uint64s round-trip, beyond 2^53 too', () => {
  const values = [0n, 1n, 2n ** 40n + 5n, 2n ** 64n - 1n];
  const buf = packU64(values);
  assert.equal(buf.length, 32);
  assert.deepEqual([...unpackU64(buf)], values);
  assert.deepEqual([...unpackU64(buf.subarray(8, 16))], [1n]); // unaligned views work
});

test('the page table erases ranges, whole-space ones included', () => {
  const t = new PageTable();
  for (const v of [3, 5, 9, 1000]) t.set(v, { pfn: BigInt(v), tags: DPT_WRITE });
  assert.deepEqual(t.erase(4, 10).map(([v]) => v), [5, 9]);
  assert.equal(t.get(3).pfn, 3n);
  assert.deepEqual(t.entriesIn(0, 2 ** 35).map(([v]) => v), [3, 1000]);
  assert.deepEqual(t.erase(0, 2 ** 35).map(([v]) => v), [3, 1000]);
  assert.equal(t.size, 0);
});

test('device pool: alloc, contents, free only what was taken', async () => {
  const base = 2n ** 40n;
  const pool = new DevicePool(base, 4, MEMORY_KINDS.private);
  const pages = pool.alloc(2, 7n);
  assert.deepEqual([...pages], [base, base + 1n]);
  assert.equal(pool.ownerOf(base + 1n), 7n);
  assert.ok(pool.contains(base + 3n) && !pool.contains(base + 4n) && !pool.contains(5n));
  const data = Buffer.alloc(2 * 4096);
  data.fill(0xab, 0, 4096);
  data.fill(0xcd, 4096);
  await pool.write(pages, data);
  assert.deepEqual(await pool.read([base + 1n, base]), Buffer.concat([data.subarray(4096), data.subarray(0, 4096)]));
  assert.deepEqual(await pool.read([base + 2n]), Buffer.alloc(4096)); // never written: zeros
  assert.throws(() => pool.alloc(3, 1n), (e) => e.errno === errno.ENOMEM);
  pool.free([base, base, 5n]); // a repeat and a system frame are ignored
  assert.equal(pool.freePages, 3);
  assert.equal(pool.ownerOf(base), undefined);
});

test('device pool: aligned 512-page blocks, split only when single pages run out', () => {
  const base = 1000n; // not block-aligned: 24 single pages before the first block
  const pool = new DevicePool(base, 24 + 3 * BLOCK_PAGES + 8, MEMORY_KINDS.private);
  assert.equal(pool.freeBlocks, 3);
  const block = pool.allocBlock(1n);
  assert.equal(block.length, BLOCK_PAGES);
  assert.equal(block[0] % BigInt(BLOCK_PAGES), 0n);
  assert.equal(block[0], 1024n); // the lowest block first
  const singles = pool.alloc(32, 2n); // the 32 edge pages, no block split
  assert.equal(pool.freeBlocks, 2);
  assert.ok([...singles].every((p) => p < 1024n || p >= 1024n + 3n * BigInt(BLOCK_PAGES)));
  pool.alloc(1, 2n); // now a block must be split: the highest
  assert.equal(pool.freeBlocks, 1);
  assert.equal(pool.allocBlock(3n)[0], 1536n);
  assert.equal(pool.allocBlock(3n), null);
  pool.free(block.subarray(0, 511));
  assert.equal(pool.freeBlocks, 0); // a block taken whole returns whole, with its last page
  pool.free(block.subarray(511));
  assert.equal(pool.freeBlocks, 1);
});

test('coherent contents go through DMA to the device\'s own PFNs', async () => {
  const calls = [];
  const dma = {
    dmaRead: async (pfns) => { calls.push(['read', pfns]); return Buffer.alloc(pfns.length * 4096, 7); },
    dmaWrite: async (pfns, d) => { calls.push(['write', pfns, d.length]); },
  };
  const pool = new DevicePool(100n, 8, MEMORY_KINDS.coherent, new DmaContents(100n, dma));
  await pool.write([101n, 103n], Buffer.alloc(2 * 4096));
  assert.equal((await pool.read([103n]))[0], 7);
  assert.deepEqual(calls, [['write', [101n, 103n], 8192], ['read', [103n]]]);
});

test('the mutex is FIFO and run() releases on throw', async () => {
  const m = new Mutex();
  const order = [];
  const release = await m.acquire();
  const a = m.run(() => order.push('a'));
  const b = m.run(() => order.push('b'));
  assert.ok(m.locked);
  release();
  await Promise.all([a, b]);
  assert.deepEqual(order, ['a', 'b']);
  await assert.rejects(m.run(() => { throw new Error('x'); }));
  assert.ok(!m.locked);
});

/** A session double: ReadBegin returns `seqs` in turn, RangeFault runs `faults` in turn. */
function fakeSession(seqs, faults) {
  return {
    owner: 9n,
    calls: [],
    async readBegin() {
      return seqs.shift();
    },
    async rangeFault(n, seq, start, end, opts) {
      this.calls.push({ seq, opts });
      return faults.shift()(n);
    },
  };
}

const result = () => new RangeResult(0n, new BigUint64Array([5n]), Uint8Array.of(3), Uint8Array.of(0));

test('fault loop: EBUSY and a stale read_retry start over; the result is used under the lock', async () => {
  const session = fakeSession([1n, 3n, 5n], [
    () => { throw new KernelError(errno.EBUSY, 'collided'); },
    (n) => { n.seq = 5n; return result(); }, // an invalidation overtook the reply
    () => result(),
  ]);
  const n = new Notifier(session, 1n, 2, 0n, 2n ** 47n, 1n);
  n.seq = 5n;
  const seen = await n.fault(0n, 4096n, { write: true }, (r) => {
    assert.ok(n.lock.locked);
    return r.pfns[0];
  });
  assert.equal(seen, 5n);
  assert.deepEqual(session.calls.map((c) => c.seq), [1n, 3n, 5n]);
  assert.equal(session.calls[0].opts.defaultFlags, 3); // REQ_FAULT | REQ_WRITE
  assert.equal(session.calls[0].opts.devPrivateOwner, 9n); // own pages are reported, never faulted
  assert.ok(!n.lock.locked);
});

test('fault loop: other errors pass through, and a budget spent is EBUSY', async () => {
  const failing = new Notifier(fakeSession([1n], [() => { throw new KernelError(errno.EFAULT, 'hole'); }]), 1n, 2, 0n, 1n, 1n);
  await assert.rejects(failing.fault(0n, 4096n, {}, () => 0), (e) => e.errno === errno.EFAULT);
  const always = { owner: 1n, readBegin: async () => 1n, rangeFault: async () => { throw new KernelError(errno.EBUSY, ''); } };
  const spinning = new Notifier(always, 1n, 2, 0n, 1n, 1n);
  await assert.rejects(spinning.fault(0n, 4096n, { timeoutMs: 30 }, () => 0), (e) => e.errno === errno.EBUSY);
});

test('the token guard lets the right token through and refuses any other with EACCES', async (t) => {
  setLevel('warning'); // (each refusal is logged at info)
  t.after(() => setLevel('info'));
  const handlers = requireToken('s3cret', { Command: (call, callback) => callback(null, { ok: true }) });
  const run = (value) => new Promise((resolve) => {
    const metadata = new grpc.Metadata();
    if (value !== undefined) metadata.set('authorization', value);
    handlers.Command({ metadata, getPath: () => '/hmm.v1.Dmirror/Command' }, (err, reply) => resolve({ err, reply }));
  });
  assert.deepEqual((await run('Bearer s3cret')).reply, { ok: true });
  for (const value of [undefined, '', 's3cret', 'Bearer s3cre', 'Bearer s3cretx', 'Basic s3cret']) {
    const { err } = await run(value);
    assert.equal(err.code, grpc.status.UNAUTHENTICATED);
    assert.deepEqual(err.metadata.get('hmm-errno'), ['EACCES']);
    assert.ok(!err.details.includes('s3cret'));
  }
});

test('client credentials: a token file wins over HMM_AUTH_TOKEN; bad tokens and half a certificate are refused', () => {
  assert.equal(clientCredentials({}, { HMM_AUTH_TOKEN: 'tok' }).token, 'tok');
  assert.deepEqual(tokenMetadata(clientCredentials({}, { HMM_AUTH_TOKEN: 'tok' })).get('authorization'), ['Bearer tok']);
  assert.equal(clientCredentials({}, {}).tls, false);
  // A flag given empty overrides its variable (as in the Python SDK); a missing one does not.
  assert.throws(() => clientCredentials({}, { HMM_TLS_CA: '/nonexistent/ca.pem' }), /--tls-ca: cannot read/);
  assert.equal(clientCredentials({ 'tls-ca': '' }, { HMM_TLS_CA: '/nonexistent/ca.pem' }).tls, false);
  assert.equal(serverCredentials({ 'listen-tls-cert': '', 'listen-tls-key': '' },
    { HMM_LISTEN_TLS_CERT: '/x.pem', HMM_LISTEN_TLS_KEY: '/y.pem' }), null);
  assert.throws(() => clientCredentials({ 'auth-token-file': '/nonexistent/token' }, {}), /--auth-token-file: cannot read/);
  assert.throws(() => clientCredentials({ 'tls-cert': '/x.pem' }, {}), /--tls-cert and --tls-key go together/);
  assert.throws(() => checkToken('two words'), /printable ASCII/);
  assert.throws(() => checkToken(''), /empty/);
});

test('a token file is read as the Python SDK reads it: trimmed, and refused beyond ASCII', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hmm-token-'));
  t.after(() => fs.rmSync(dir, { recursive: true }));
  const file = (name, bytes) => {
    fs.writeFileSync(path.join(dir, name), bytes);
    return { 'auth-token-file': path.join(dir, name) };
  };
  assert.equal(clientCredentials(file('plain', ' s3cret\r\n'), { HMM_AUTH_TOKEN: 'other' }).token, 's3cret');
  assert.equal(clientCredentials({}, { HMM_AUTH_TOKEN_FILE: file('env', 's3cret\n')['auth-token-file'] }).token,
    's3cret');
  for (const bytes of [Buffer.from('tok\u00e9n\n'), Buffer.from([0xef, 0xbb, 0xbf, 0x73, 0x33]),
    Buffer.from([0x73, 0x33, 0xa0])]) {
    assert.throws(() => clientCredentials(file('bad', bytes), {}), /printable ASCII/, bytes.toString('hex'));
  }
});

test('the server name goes to the TLS check, and server TLS settings come whole or not at all', () => {
  const tls = channelCredentials({ tls: true, ca: null, cert: null, key: null, serverName: 'hmmd.example' });
  assert.deepEqual(tls.options, { 'grpc.ssl_target_name_override': 'hmmd.example' });
  assert.deepEqual(channelCredentials({ tls: false }).options, {});
  assert.equal(serverCredentials({}, {}), null);
  assert.throws(() => serverCredentials({}, { HMM_LISTEN_TLS_CERT: '/x.pem' }),
    /--listen-tls-cert and --listen-tls-key go together/);
  assert.throws(() => serverCredentials({ 'listen-tls-client-ca': '/ca.pem' }, {}), /needs --listen-tls-cert/);
});
