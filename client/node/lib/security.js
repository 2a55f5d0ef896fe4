// Who may talk to whom: the bearer token and TLS, at both ends (docs/protocol.md,
// section 2.3), as the Python SDK's hmm.security does it.
//
// A client sends `authorization: Bearer <token>` on every call and on the Connect
// stream (as metadata: grpc-js takes call credentials on TLS channels only), and uses
// TLS when it is given a CA or a client certificate. A server with a token refuses
// every call without it (UNAUTHENTICATED, hmm-errno EACCES); with a certificate it
// serves TLS only, and with a client CA it requires client certificates (mutual TLS).

import crypto from 'node:crypto';
import fs from 'node:fs';
import tls from 'node:tls';

import grpc from '@grpc/grpc-js';

import { errno, KernelError, toServiceError } from './errno.js';
import { logger } from './log.js';

export const AUTHORIZATION_METADATA_KEY = 'authorization';
const BEARER = 'Bearer ';

/** The HMM_* variables a client takes its settings from, by flag. */
export const CLIENT_ENV = Object.freeze({
  'auth-token-file': 'HMM_AUTH_TOKEN_FILE',
  'tls-ca': 'HMM_TLS_CA',
  'tls-cert': 'HMM_TLS_CERT',
  'tls-key': 'HMM_TLS_KEY',
  'tls-server-name': 'HMM_TLS_SERVER_NAME',
});
/** And what serving TLS takes, by flag (the command service's own certificate). */
export const LISTEN_ENV = Object.freeze({
  'listen-tls-cert': 'HMM_LISTEN_TLS_CERT',
  'listen-tls-key': 'HMM_LISTEN_TLS_KEY',
  'listen-tls-client-ca': 'HMM_LISTEN_TLS_CLIENT_CA',
});
const TOKEN_ENV = 'HMM_AUTH_TOKEN';

const log = logger('security');

/** `token` if it can travel in a metadata value (printable ASCII, no spaces); an Error
 * otherwise, whose message never contains the token. */
export function checkToken(token) {
  if (!token) throw new Error('the auth token is empty');
  if (![...token].every((c) => c.charCodeAt(0) >= 0x21 && c.charCodeAt(0) <= 0x7e)) {
    throw new Error('the auth token must be printable ASCII without spaces');
  }
  return token;
}

function read(path, what) {
  try {
    return fs.readFileSync(path);
  } catch (e) {
    throw new Error(`${what}: cannot read ${path} (${e.code ?? e.message})`);
  }
}

/** The token in file `path`, surrounding whitespace removed. A byte beyond ASCII
 * reads as U+FFFD, and is refused, as in the Python SDK: Buffer's 'ascii' would drop
 * its high bit and make another, valid, token. */
function readToken(path) {
  const text = read(path, '--auth-token-file').toString('latin1').replace(/[\u0080-\u00ff]/g, '\ufffd');
  return checkToken(text.trim());
}

/** An Error naming `what` unless `cert` and `key` are a PEM certificate chain and its
 * private key, or `ca` PEM CA certificates (one or the other): grpc-js would only
 * fail the handshake, or the listen. */
function checkPem({ cert, key, ca }, what) {
  try {
    if (cert) tls.createSecureContext({ cert, key });
    else new crypto.X509Certificate(ca);
  } catch (e) {
    const reason = String(e.reason ?? e.message ?? e).toLowerCase();
    throw new Error(`${what}: ${cert ? 'not a PEM certificate chain and its key' : 'no PEM certificate'} (${reason})`);
  }
}

/**
 * What a client presents and trusts, from `values` (parsed flags, named as
 * CLIENT_ENV's keys; a missing one falls back to its HMM_* variable, while one given
 * empty overrides it, as in the Python SDK) and
 * `env`. A token file wins over HMM_AUTH_TOKEN. Throws an Error with a one-line
 * message for an unreadable file, a bad token, half a client certificate or files
 * that are not PEM.
 * @returns {{token: string, ca: Buffer|null, cert: Buffer|null, key: Buffer|null, serverName: string, tls: boolean}}
 */
export function clientCredentials(values = {}, env = process.env) {
  const get = (flag) => values[flag] ?? env[CLIENT_ENV[flag]] ?? '';
  const tokenFile = get('auth-token-file');
  const token = tokenFile ? readToken(tokenFile) : env[TOKEN_ENV] ? checkToken(env[TOKEN_ENV]) : '';
  const [caPath, certPath, keyPath] = [get('tls-ca'), get('tls-cert'), get('tls-key')];
  if (Boolean(certPath) !== Boolean(keyPath)) throw new Error('--tls-cert and --tls-key go together');
  const ca = caPath ? read(caPath, '--tls-ca') : null;
  const cert = certPath ? read(certPath, '--tls-cert') : null;
  const key = keyPath ? read(keyPath, '--tls-key') : null;
  if (cert) checkPem({ cert, key }, `the TLS certificate ${certPath} and key ${keyPath}`);
  if (ca) checkPem({ ca }, `the TLS CA ${caPath}`);
  return { token, ca, cert, key, serverName: get('tls-server-name'), tls: Boolean(ca || cert) };
}

/** The channel credentials and options for `creds` (clientCredentials). */
export function channelCredentials(creds) {
  if (!creds.tls) return { credentials: grpc.credentials.createInsecure(), options: {} };
  const options = creds.serverName ? { 'grpc.ssl_target_name_override': creds.serverName } : {};
  return { credentials: grpc.credentials.createSsl(creds.ca, creds.key, creds.cert), options };
}

/** A fresh Metadata carrying the token of `creds`, if any. */
export function tokenMetadata(creds) {
  const md = new grpc.Metadata();
  if (creds?.token) md.set(AUTHORIZATION_METADATA_KEY, BEARER + creds.token);
  return md;
}

/**
 * Server TLS from `values` (LISTEN_ENV's flags, falling back to their variables when
 * missing):
 * null without a certificate. Throws an Error for half a setting or files that are
 * not PEM, naming the flags.
 */
export function serverCredentials(values = {}, env = process.env) {
  const get = (flag) => values[flag] ?? env[LISTEN_ENV[flag]] ?? '';
  const [certPath, keyPath, caPath] = [get('listen-tls-cert'), get('listen-tls-key'), get('listen-tls-client-ca')];
  if (Boolean(certPath) !== Boolean(keyPath)) throw new Error('--listen-tls-cert and --listen-tls-key go together');
  if (caPath && !certPath) {
    throw new Error('--listen-tls-client-ca (mutual TLS) needs --listen-tls-cert and --listen-tls-key');
  }
  if (!certPath) return null;
  const cert = read(certPath, '--listen-tls-cert');
  const key = read(keyPath, '--listen-tls-key');
  checkPem({ cert, key }, `--listen-tls-cert ${certPath} and --listen-tls-key ${keyPath}`);
  const ca = caPath ? read(caPath, '--listen-tls-client-ca') : null;
  if (ca) checkPem({ ca }, `--listen-tls-client-ca ${caPath}`);
  return grpc.ServerCredentials.createSsl(ca, [{ private_key: key, cert_chain: cert }], Boolean(ca));
}

const digest = (value) => crypto.createHash('sha256').update(value, 'utf8').digest();

/**
 * `handlers` (unary ones, as grpc-js takes them) that first require
 * `authorization: Bearer <token>`; a call without it, or with another token, ends
 * with UNAUTHENTICATED and hmm-errno EACCES. The comparison takes the same time
 * whatever the offered value (digests); each refusal is logged (at info, as the
 * Python device), the token never.
 */
export function requireToken(token, handlers) {
  const expected = digest(BEARER + checkToken(token));
  const refusal = () => ({
    ...toServiceError(new KernelError(errno.EACCES,
      `missing or wrong token (metadata '${AUTHORIZATION_METADATA_KEY}: ${BEARER}<token>')`)),
    code: grpc.status.UNAUTHENTICATED,
  });
  return Object.fromEntries(Object.entries(handlers).map(([name, handler]) => [name, (call, callback) => {
    const offered = call.metadata.get(AUTHORIZATION_METADATA_KEY)[0];
    if (typeof offered !== 'string' || !crypto.timingSafeEqual(digest(offered), expected)) {
      log.info(`refused a call to ${call.getPath()} without a valid token`);
      callback(refusal());
      return;
    }
    handler(call, callback);
  }]));
}
