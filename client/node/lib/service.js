// hmm.v1.Dmirror: the command service of the devices this program serves
// (docs/protocol.md, section 16). Protocol glue only: the work is in Dmirror.

import { KernelError, errno, toServiceError } from './errno.js';
import { logger } from './log.js';

const log = logger('service');

/**
 * The handlers of hmm.v1.Dmirror over `devices`.
 * @param {import('./dmirror.js').Dmirror[]} devices
 */
export function dmirrorHandlers(devices) {
  const deviceOf = (fileId) => {
    const dev = devices.find((d) => d.handles.has(fileId));
    if (dev === undefined) throw new KernelError(errno.EINVAL, `no open handle ${fileId}`);
    return dev;
  };

  // A failed call carries only the errno (status + hmm-errno metadata), never
  // partial results. Anything but a KernelError is a bug: logged, reported as EIO.
  const unary = (fn) => (call, callback) => {
    Promise.resolve()
      .then(() => fn(call.request))
      .then((reply) => callback(null, reply), (e) => {
        if (!(e instanceof KernelError)) log.error('internal error:', e);
        callback(toServiceError(e));
      });
  };

  return {
    Command: unary(async ({ file_id: fileId, cmd, addr, npages, data }) => {
      const r = await deviceOf(fileId).command(fileId, cmd, addr, npages, data);
      return { cpages: r.cpages, faults: r.faults, data: r.data };
    }),
    Events: unary(({ file_id: fileId, clear }) => {
      const h = deviceOf(fileId).handle(fileId);
      const events = h.events.map((e) => ({
        event: e.event, start: e.start, end: e.end, owner: e.owner, cur_seq: e.curSeq,
        mapped_pages: BigInt(e.mappedPages), snoop_crc32: e.snoopCrc32, snooped: e.snooped,
      }));
      if (clear) h.events = [];
      return { events };
    }),
    Devices: unary(() => ({
      devices: devices.map((d) => ({
        name: d.name, device_id: d.session?.deviceId ?? 0, owner: d.owner, memory: d.kind.name,
      })),
    })),
  };
}
