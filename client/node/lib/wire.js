// The hmm.v1 .proto files, loaded at run time from the repository's proto/ tree, the
// channel options of section 2.1, and the packed arrays of section 1.

import path from 'node:path';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

/** proto/ at the top of the repository (client/node/lib -> ../../../proto). */
export const PROTO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'proto');

export const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
export const DEFAULT_KEEPALIVE_MS = 2000;

let services = null;

/**
 * The service constructors of hmm.v1, loaded once. Messages are plain objects with
 * the .proto field names; uint64 fields are BigInt, enums numbers, bytes Buffers,
 * absent fields their zero value, and a oneof's member name is in `msg`.
 * @returns {{Device: typeof grpc.Client, Dmirror: typeof grpc.Client}}
 */
export function hmmServices() {
  if (services === null) {
    const definition = protoLoader.loadSync(['hmm/v1/device.proto', 'hmm/v1/dmirror.proto'], {
      includeDirs: [PROTO_ROOT],
      keepCase: true,
      longs: BigInt,
      enums: Number,
      defaults: true,
      oneofs: true,
    });
    const hmm = grpc.loadPackageDefinition(definition).hmm.v1;
    services = { Device: hmm.Device, Dmirror: hmm.Dmirror };
  }
  return services;
}

/**
 * Channel and server options of section 2.1. grpc-js understands the message size
 * and keepalive ones; the grpc-core-only names are passed along for documentation
 * and are ignored by it.
 */
export function channelOptions({ maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES, keepaliveMs = DEFAULT_KEEPALIVE_MS } = {}) {
  return {
    'grpc.max_send_message_length': maxMessageBytes,
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.keepalive_time_ms': keepaliveMs,
    'grpc.keepalive_timeout_ms': keepaliveMs,
    'grpc.keepalive_permit_without_calls': 1,
    'grpc.http2.min_ping_interval_without_data_ms': Math.min(1000, keepaliveMs),
    // Per-call bookkeeping this device does not use; each costs time on every call.
    'grpc.enable_channelz': 0,
    'grpc.enable_retries': 0,
  };
}

/**
 * Packed little-endian uint64s -> BigUint64Array.
 * @param {Uint8Array} buf
 */
export function unpackU64(buf) {
  const b = Buffer.isBuffer(buf) ? buf : Buffer.from(buf);
  const n = Math.floor(b.length / 8);
  const out = new BigUint64Array(n);
  for (let i = 0; i < n; i++) out[i] = b.readBigUInt64LE(i * 8);
  return out;
}

/**
 * BigInts (any iterable) -> packed little-endian uint64s.
 * @param {Iterable<bigint>} values
 */
export function packU64(values) {
  const list = Array.isArray(values) || ArrayBuffer.isView(values) ? values : [...values];
  const out = Buffer.allocUnsafe(list.length * 8);
  for (let i = 0; i < list.length; i++) out.writeBigUInt64LE(BigInt(list[i]), i * 8);
  return out;
}
