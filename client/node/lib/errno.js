// Linux errnos and the one error type of this device.
//
// The daemon reports failures as gRPC statuses with trailing metadata `hmm-errno`
// (the name) and `hmm-errno-value` (the number); the dmirror command service must
// report its own the same way (docs/protocol.md, section 14). Numbers are Linux
// x86-64's on every platform, so they are spelled out here rather than taken from
// os.constants (which follows the host).

import grpc from '@grpc/grpc-js';

import { ERRNO_METADATA_KEY, ERRNO_VALUE_METADATA_KEY } from './constants.js';

/** Canonical name -> number. */
export const errno = Object.freeze({
  EPERM: 1, ENOENT: 2, ESRCH: 3, EINTR: 4, EIO: 5, ENXIO: 6, E2BIG: 7, ENOEXEC: 8,
  EBADF: 9, ECHILD: 10, EAGAIN: 11, ENOMEM: 12, EACCES: 13, EFAULT: 14, ENOTBLK: 15,
  EBUSY: 16, EEXIST: 17, EXDEV: 18, ENODEV: 19, ENOTDIR: 20, EISDIR: 21, EINVAL: 22,
  ENFILE: 23, EMFILE: 24, ENOTTY: 25, ETXTBSY: 26, EFBIG: 27, ENOSPC: 28, ESPIPE: 29,
  EROFS: 30, EMLINK: 31, EPIPE: 32, EDOM: 33, ERANGE: 34, EDEADLK: 35,
  ENAMETOOLONG: 36, ENOLCK: 37, ENOSYS: 38, ENOTEMPTY: 39, ELOOP: 40, ENOMSG: 42,
  EIDRM: 43, EPROTO: 71, EBADMSG: 74, EOVERFLOW: 75, EMSGSIZE: 90,
  EPROTONOSUPPORT: 93, EOPNOTSUPP: 95, ECONNABORTED: 103, ECONNRESET: 104,
  ENOBUFS: 105, ESHUTDOWN: 108, ETIMEDOUT: 110, ECONNREFUSED: 111, EALREADY: 114,
  ECANCELED: 125,
});

// Other spellings a peer may send (Python's errno module names 95 ENOTSUP and
// 35 EDEADLOCK).
const ALIASES = { ENOTSUP: 95, EDEADLOCK: 35, EWOULDBLOCK: 11 };

const NAMES = new Map(Object.entries(errno).map(([name, value]) => [value, name]));

/** The symbolic name of an errno number, e.g. 14 -> "EFAULT". */
export function errnoName(value) {
  return NAMES.get(value) ?? `E${value}`;
}

/** The number of an errno name, or undefined if it is not one we know. */
export function errnoValue(name) {
  return errno[name] ?? ALIASES[name];
}

/** An operation failed with a Linux errno. */
export class KernelError extends Error {
  /**
   * @param {number} err errno value
   * @param {string} [message]
   */
  constructor(err, message = '') {
    super(`${errnoName(err)}: ${message || errnoName(err)}`);
    this.name = 'KernelError';
    this.errno = err;
    this.detail = message;
  }

  /** The errno's name, e.g. "EFAULT". */
  get code() {
    return errnoName(this.errno);
  }
}

// errno -> gRPC status code, as the daemon maps them (section 14.1).
const STATUS = new Map([
  [errno.EINVAL, grpc.status.INVALID_ARGUMENT], [errno.EBADF, grpc.status.INVALID_ARGUMENT],
  [errno.ENOENT, grpc.status.NOT_FOUND], [errno.ESRCH, grpc.status.NOT_FOUND],
  [errno.EEXIST, grpc.status.ALREADY_EXISTS],
  [errno.EBUSY, grpc.status.ABORTED], [errno.EAGAIN, grpc.status.ABORTED],
  [errno.EPERM, grpc.status.PERMISSION_DENIED], [errno.EACCES, grpc.status.PERMISSION_DENIED],
  [errno.ENOMEM, grpc.status.RESOURCE_EXHAUSTED], [errno.ENOSPC, grpc.status.RESOURCE_EXHAUSTED],
  [errno.EOVERFLOW, grpc.status.OUT_OF_RANGE], [errno.EFBIG, grpc.status.OUT_OF_RANGE],
  [errno.ETIMEDOUT, grpc.status.DEADLINE_EXCEEDED],
  [errno.ENODEV, grpc.status.UNAVAILABLE],
  [errno.EIO, grpc.status.INTERNAL],
]);

// A status without hmm-errno comes from the transport (section 14.1).
const TRANSPORT = new Map([
  [grpc.status.UNAVAILABLE, errno.ECONNREFUSED],
  [grpc.status.DEADLINE_EXCEEDED, errno.ETIMEDOUT],
  [grpc.status.CANCELLED, errno.ECANCELED],
  [grpc.status.RESOURCE_EXHAUSTED, errno.EMSGSIZE],
]);

/** The gRPC status code that stands for an errno. */
export function statusCode(err) {
  return STATUS.get(err) ?? grpc.status.FAILED_PRECONDITION;
}

/**
 * The KernelError a failed gRPC call stands for: the daemon's errno if it sent one
 * (the number first, then the name), else one naming the transport failure.
 * @param {import('@grpc/grpc-js').ServiceError | Error} e
 */
export function fromServiceError(e) {
  if (e instanceof KernelError) return e;
  const code = typeof e.code === 'number' ? e.code : grpc.status.UNKNOWN;
  // One line (OpenSSL's messages end in a newline), without the empty "Resolution
  // note:" grpc-js ends a failure to connect with.
  const details = String(e.details ?? e.message).replace(/\s*\n\s*/g, ' ').replace(/\.? Resolution note: ?$/, '');
  const hint = hintFor(code, details);
  const md = e.metadata;
  if (md) {
    let err = Number(md.get(ERRNO_VALUE_METADATA_KEY)[0]);
    if (!(Number.isInteger(err) && err > 0)) {
      const name = md.get(ERRNO_METADATA_KEY)[0];
      err = name !== undefined ? errnoValue(String(name)) : undefined;
    }
    // The details start with the errno's name, which the KernelError's message adds.
    if (err !== undefined) {
      const prefix = `${errnoName(err)}: `;
      return new KernelError(err, (details.startsWith(prefix) ? details.slice(prefix.length) : details) + hint);
    }
  }
  return new KernelError(TRANSPORT.get(code) ?? errno.EIO, `${grpc.status[code] ?? code}: ${details}${hint}`);
}

// What to do about a failure to connect or to be let in, by what grpc-js and Node's
// TLS say (the Python SDK's hints, for the same failures; docs/protocol.md 2.3).
const CLOSED_HINT = 'the server closed the connection: if it serves TLS, name its CA (--tls-ca or HMM_TLS_CA); '
  + 'if it requires a client certificate, give one (--tls-cert, --tls-key)';
const HINTS = [
  [grpc.status.UNAUTHENTICATED, /token/, "give the server's token: --auth-token-file or HMM_AUTH_TOKEN_FILE"],
  [grpc.status.UNAVAILABLE, /ECONNREFUSED/, 'is the server running at that address?'],
  [grpc.status.UNAVAILABLE, /wrong version number/, 'the server does not serve TLS: no --tls-ca / HMM_TLS_CA'],
  [grpc.status.UNAVAILABLE, /unable to verify|unable to get local issuer|self[- ]signed certificate/,
    "the server's certificate does not chain to the CA given (--tls-ca / HMM_TLS_CA)"],
  [grpc.status.UNAVAILABLE, /altnames/,
    "the server's certificate is not for that host name: connect by its name, or --tls-server-name"],
  [grpc.status.UNAVAILABLE, /Failed to connect/, CLOSED_HINT],
];

function hintFor(code, details) {
  if (code === grpc.status.UNAVAILABLE && !details.includes('No connection established')) return '';
  const hit = HINTS.find(([c, re]) => c === code && re.test(details));
  return hit ? ` (${hit[2]})` : '';
}

/** A gRPC error for a servicer callback: status, "<NAME>: text", errno metadata. */
export function toServiceError(e) {
  const ke = e instanceof KernelError ? e : new KernelError(errno.EIO, `internal error: ${e?.stack ?? e}`);
  const metadata = new grpc.Metadata();
  metadata.set(ERRNO_METADATA_KEY, ke.code);
  metadata.set(ERRNO_VALUE_METADATA_KEY, String(ke.errno));
  return { code: statusCode(ke.errno), details: `${ke.code}: ${ke.detail || ke.code}`, metadata };
}
