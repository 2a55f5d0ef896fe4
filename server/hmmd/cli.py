"""`hmmd`: run the host kernel daemon until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from hmm.loop import run_loop
from hmm.malloc import tune_malloc
from hmmd.config import Config
from hmmd.logs import setup_logging
from hmmd.rpc.server import Daemon

log = logging.getLogger("hmmd")


async def serve(config: Config) -> None:
    daemon = Daemon(config)
    try:
        address = await daemon.start()
    except BaseException:
        await daemon.server.stop(None)
        raise
    # Handlers first: a supervisor may stop us as soon as we say we are up.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The first line on stdout names the bound address (tests and scripts read it).
    print(f"hmmd listening on {address}", flush=True)
    if daemon.metrics_address:
        print(f"hmmd metrics on http://{daemon.metrics_address}/metrics", flush=True)
        log.info("metrics on http://%s/metrics", daemon.metrics_address)
    log.info("hmmd serving on %s with %d MiB of RAM, callback deadline %d ms",
             address, config.ram_bytes >> 20, config.callback_deadline_ms)
    transport = "mutual TLS" if config.tls_client_ca else "TLS" if config.tls_cert else "plaintext"
    log.info("transport: %s; %s", transport,
             "a token is required on every call" if daemon.auth else "no token required")
    await stop.wait()
    log.info("shutting down")
    await daemon.stop()


def main(argv: list[str] | None = None) -> int:
    try:
        config = Config.from_env_and_args(argv)
    except ValueError as e:
        print(f"hmmd: {e}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    tune_malloc(config.malloc_keep_mib)  # before the first message buffer
    try:
        run_loop(serve(config))
    except OSError as e:  # a port or socket path that cannot be used
        print(f"hmmd: cannot start: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
