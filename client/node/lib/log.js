// A small leveled logger on stderr (stdout carries only the "listening on" line).

const LEVELS = { debug: 10, info: 20, warning: 30, error: 40 };
let threshold = LEVELS.info;

/** Set the level by name: debug, info, warning (or warn), error. */
export function setLevel(name) {
  const key = String(name).toLowerCase() === 'warn' ? 'warning' : String(name).toLowerCase();
  threshold = LEVELS[key] ?? LEVELS.info;
}

function emit(level, name, args) {
  if (LEVELS[level] < threshold) return;
  const text = args.map((a) => (a instanceof Error ? a.stack ?? a.message : String(a))).join(' ');
  process.stderr.write(`${new Date().toISOString()} ${level.toUpperCase()} ${name}: ${text}\n`);
}

/** A logger for one component. */
export function logger(name) {
  return {
    debug: (...a) => emit('debug', name, a),
    info: (...a) => emit('info', name, a),
    warn: (...a) => emit('warning', name, a),
    error: (...a) => emit('error', name, a),
  };
}
