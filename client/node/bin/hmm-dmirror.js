#!/usr/bin/env node
// hmm-dmirror (Node.js): run dmirror devices against a running hmmd and serve their
// commands (hmm.v1.Dmirror). The first line on stdout is
// "hmm-dmirror listening on HOST:PORT"; logs go to stderr.

import process from 'node:process';
import { parseArgs } from 'node:util';

import grpc from '@grpc/grpc-js';
import { HealthImplementation } from 'grpc-health-check';

import { DEFAULT_MEMORY_PAGES, Dmirror } from '../lib/dmirror.js';
import { logger, setLevel } from '../lib/log.js';
import { MEMORY_KINDS } from '../lib/pool.js';
import { CLIENT_ENV, clientCredentials, LISTEN_ENV, requireToken, serverCredentials } from '../lib/security.js';
import { dmirrorHandlers } from '../lib/service.js';
import { channelOptions, DEFAULT_MAX_MESSAGE_BYTES, hmmServices } from '../lib/wire.js';

const USAGE = `usage: hmm-dmirror.js [--kernel ADDR] [--listen ADDR] [--device NAME[:private|coherent]]...
                      [--memory-pages N] [--callback-deadline-ms MS] [--max-message-bytes N]
                      [--snoop] [--log-level LEVEL] [--auth-token-file PATH]
                      [--tls-ca PEM] [--tls-cert PEM --tls-key PEM] [--tls-server-name NAME]
                      [--listen-tls-cert PEM --listen-tls-key PEM [--listen-tls-client-ca PEM]]

  --kernel ADDR               hmmd's address (default 127.0.0.1:50051)
  --listen ADDR               address of the command service (default 127.0.0.1:50061; port 0: any)
  --device NAME[:KIND]        a device; repeat for several (default hmm_dmirror0 and hmm_dmirror1)
  --memory-pages N            device memory per device, in 4 KiB pages (default ${DEFAULT_MEMORY_PAGES})
  --callback-deadline-ms MS   ask the daemon for this ack deadline (0: the daemon's)
  --max-message-bytes N       the message limit to ask the daemon for, and to keep here (default 64 MiB)
  --snoop                     on each invalidation, DMA-read the pages still mapped and record their CRC32
  --log-level LEVEL           debug, info, warning, error (default info)
  --auth-token-file PATH      send the token in this file with every call to hmmd, and require it on every
                              command (env HMM_AUTH_TOKEN_FILE; or the token itself in HMM_AUTH_TOKEN)
  --tls-ca PEM                reach hmmd over TLS; its certificate must chain to this CA (env HMM_TLS_CA)
  --tls-cert PEM, --tls-key PEM
                              a client certificate for mutual TLS (env HMM_TLS_CERT, HMM_TLS_KEY)
  --tls-server-name NAME      check hmmd's certificate for this name (env HMM_TLS_SERVER_NAME)
  --listen-tls-cert PEM, --listen-tls-key PEM
                              serve the command service over TLS (env HMM_LISTEN_TLS_CERT, HMM_LISTEN_TLS_KEY)
  --listen-tls-client-ca PEM  and require client certificates signed by this CA (env HMM_LISTEN_TLS_CLIENT_CA)`;

const log = logger('hmm-dmirror');

function fail(message, code = 2) {
  process.stderr.write(`hmm-dmirror: ${message}\n`);
  process.exit(code);
}

function parse(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        kernel: { type: 'string', default: '127.0.0.1:50051' },
        listen: { type: 'string', default: '127.0.0.1:50061' },
        device: { type: 'string', multiple: true, default: [] },
        'memory-pages': { type: 'string', default: String(DEFAULT_MEMORY_PAGES) },
        'callback-deadline-ms': { type: 'string', default: '0' },
        'max-message-bytes': { type: 'string', default: String(DEFAULT_MAX_MESSAGE_BYTES) },
        snoop: { type: 'boolean', default: false },
        'log-level': { type: 'string', default: 'info' },
        ...Object.fromEntries([...Object.keys(CLIENT_ENV), ...Object.keys(LISTEN_ENV)]
          .map((flag) => [flag, { type: 'string' }])), // missing: its HMM_* variable; given empty: none
        help: { type: 'boolean', short: 'h', default: false },
      },
    }));
  } catch (e) {
    fail(`${e.message}\n${USAGE}`);
  }
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
  }
  const memoryPages = Number(values['memory-pages']);
  const deadline = Number(values['callback-deadline-ms']);
  if (!Number.isSafeInteger(memoryPages) || memoryPages < 1) fail(`bad --memory-pages ${values['memory-pages']}`);
  if (!Number.isSafeInteger(deadline) || deadline < 0) fail(`bad --callback-deadline-ms ${values['callback-deadline-ms']}`);
  const maxMessageBytes = Number(values['max-message-bytes']);
  if (!Number.isSafeInteger(maxMessageBytes) || maxMessageBytes < 1) {
    fail(`bad --max-message-bytes ${values['max-message-bytes']}`);
  }
  const devices = (values.device.length ? values.device : ['hmm_dmirror0', 'hmm_dmirror1']).map((spec) => {
    const [name, memory = 'private'] = spec.split(':');
    if (!(memory in MEMORY_KINDS)) fail(`unknown memory kind ${memory} in --device ${spec}`);
    return { name, memory };
  });
  let credentials;
  let listenTls;
  try {
    credentials = clientCredentials(values);
    listenTls = serverCredentials(values);
  } catch (e) {
    fail(e.message);
  }
  return { ...values, devices, memoryPages, deadline, maxMessageBytes, credentials, listenTls };
}

/** grpc-js names the server by the address's host for TLS even when it is an IP
 * (grpc-node#1919), and Node warns of that on every connection; the certificate is
 * still checked against that IP, so the warning only says what cannot be changed here. */
function quietIpServerName() {
  const emit = process.emitWarning.bind(process);
  process.emitWarning = (warning, ...rest) => {
    const code = typeof rest[0] === 'object' ? rest[0]?.code : rest[1];
    if (code !== 'DEP0123') emit(warning, ...rest);
  };
}

function listen(server, address, credentials) {
  return new Promise((resolve, reject) => {
    server.bindAsync(address, credentials ?? grpc.ServerCredentials.createInsecure(),
      (err, port) => (err ? reject(err) : resolve(port)));
  });
}

// grpc.health.v1 names: the whole server, and the command service.
const HEALTH_SERVICES = ['', 'hmm.v1.Dmirror'];

async function main() {
  const args = parse(process.argv.slice(2));
  setLevel(args['log-level']);
  quietIpServerName();
  const devices = args.devices.map(({ name, memory }) =>
    new Dmirror(name, { memory, memoryPages: args.memoryPages, snoop: args.snoop }));
  const server = new grpc.Server(channelOptions());
  // The token that reaches hmmd guards the command service too (as the Python device);
  // health stays open, for container and Kubernetes probes.
  const handlers = dmirrorHandlers(devices);
  server.addService(hmmServices().Dmirror.service,
    args.credentials.token ? requireToken(args.credentials.token, handlers) : handlers);
  const health = new HealthImplementation(Object.fromEntries(HEALTH_SERVICES.map((s) => [s, 'NOT_SERVING'])));
  health.addToServer(server);
  // Bound before the devices connect: a busy address leaves no device behind.
  let port;
  try {
    port = await listen(server, args.listen, args.listenTls);
  } catch (e) {
    fail(`cannot listen on ${args.listen}: ${e.message}`, 1);
  }
  try {
    for (const dev of devices) {
      await dev.connect(args.kernel, {
        callbackDeadlineMs: args.deadline, maxMessageBytes: args.maxMessageBytes, credentials: args.credentials,
      });
    }
  } catch (e) {
    server.forceShutdown();
    await Promise.all(devices.map((d) => d.close().catch(() => {})));
    fail(`cannot connect to ${args.kernel}: ${e.message}`, 1);
  }
  for (const s of HEALTH_SERVICES) health.setStatus(s, 'SERVING');
  // A unix socket is named as given (its "port" is meaningless); a port 0 resolved.
  const bound = args.listen.startsWith('unix') ? args.listen
    : `${args.listen.slice(0, args.listen.lastIndexOf(':'))}:${port}`;
  process.stdout.write(`hmm-dmirror listening on ${bound}\n`);
  log.info(`serving ${devices.map((d) => `${d.name} (${d.kind.name}, ${d.memoryPages} pages)`).join(', ')}`);

  let stopping = false;
  const stop = async (code) => {
    if (stopping) return;
    stopping = true;
    for (const s of HEALTH_SERVICES) health.setStatus(s, 'NOT_SERVING');
    await new Promise((resolve) => {
      const force = setTimeout(() => {
        server.forceShutdown();
        resolve();
      }, 500);
      server.tryShutdown(() => {
        clearTimeout(force);
        resolve();
      });
    });
    // Stopped (a supervisor's SIGTERM), not cut off: each device's pages go home first.
    if (code === 0) {
      await Promise.all(devices.map(async (d) => {
        if (!d.pool) return;
        try {
          log.info(`${d.name}: stopping, ${await d.evict()} pages evicted`);
        } catch (e) {
          log.warn(`${d.name}: stopping, eviction failed: ${e.message}`);
        }
      }));
    }
    await Promise.all(devices.map((d) => d.close().catch(() => {})));
    process.exit(code);
  };
  process.on('SIGTERM', () => stop(0));
  process.on('SIGINT', () => stop(0));
  for (const dev of devices) {
    dev.session.closed.then((error) => {
      if (stopping) return;
      log.error(`lost the daemon (${dev.name}): ${error.message}`);
      stop(1);
    });
  }
}

main().catch((e) => {
  process.stderr.write(`hmm-dmirror: ${e.stack ?? e}\n`);
  process.exit(1);
});
