"""`hmm-dmirror`: run dmirror devices against a running hmmd and serve their commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hmm.channel import DEFAULT_MAX_MESSAGE_BYTES, bind, grpc_options
from hmm.dmirror.device import Dmirror
from hmm.dmirror.service import DmirrorServicer
from hmm.errors import KernelError
from hmm.loop import run_loop
from hmm.malloc import tune_malloc
from hmm.security import (
    Credentials,
    RequireToken,
    add_client_arguments,
    check_server_tls,
    server_credentials,
)
from hmm.status import add_service
from hmm.v1 import dmirror_pb2, dmirror_pb2_grpc

log = logging.getLogger("hmm-dmirror")
DEFAULT_DEVICES = ["hmm_dmirror0", "hmm_dmirror1", "hmm_dmirror2:coherent", "hmm_dmirror3:coherent"]
DMIRROR_SERVICE = dmirror_pb2.DESCRIPTOR.services_by_name["Dmirror"].full_name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hmm-dmirror", description=__doc__)
    p.add_argument("--kernel", default="127.0.0.1:50051", help="hmmd address")
    p.add_argument("--listen", default="127.0.0.1:50061", help="address of the command service")
    p.add_argument("--device", action="append", default=[],
                   help="NAME[:private|coherent]; repeat for several (default, as the kernel module: "
                        "hmm_dmirror0 and hmm_dmirror1 device-private, hmm_dmirror2 and hmm_dmirror3 coherent)")
    p.add_argument("--callback-deadline-ms", type=int, default=0, help="ask the daemon for this ack deadline")
    p.add_argument("--memory-pages", type=int, default=1 << 16, help="device memory per device, in 4 KiB pages")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="the message limit to ask the daemon for (and to keep on this side)")
    p.add_argument("--snoop", action="store_true",
                   help="on each invalidation, DMA-read the pages still mapped and record their CRC32 (tests)")
    p.add_argument("--log-level", default="INFO")
    add_client_arguments(p)  # to reach hmmd; the token also guards the command service
    env = os.environ
    p.add_argument("--listen-tls-cert", default=env.get("HMM_LISTEN_TLS_CERT", ""), metavar="PEM",
                   help="serve the command service over TLS with this certificate (env HMM_LISTEN_TLS_CERT)")
    p.add_argument("--listen-tls-key", default=env.get("HMM_LISTEN_TLS_KEY", ""), metavar="PEM",
                   help="its private key (env HMM_LISTEN_TLS_KEY)")
    p.add_argument("--listen-tls-client-ca", default=env.get("HMM_LISTEN_TLS_CLIENT_CA", ""), metavar="PEM",
                   help="require client certificates signed by this CA (env HMM_LISTEN_TLS_CLIENT_CA)")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    specs = args.device or DEFAULT_DEVICES
    try:
        credentials = Credentials.from_args(args)
        check_server_tls(args.listen_tls_cert, args.listen_tls_key, args.listen_tls_client_ca, "--listen-tls")
        listen_tls = (server_credentials(args.listen_tls_cert, args.listen_tls_key, args.listen_tls_client_ca)
                      if args.listen_tls_cert else None)
    except (OSError, ValueError) as e:
        print(f"hmm-dmirror: {e}", file=sys.stderr)
        return 2
    devices = []
    for spec in specs:
        name, _, memory = spec.partition(":")
        if memory not in ("", "private", "coherent"):
            print(f"hmm-dmirror: memory is private or coherent, not {memory!r}", file=sys.stderr)
            return 2
        devices.append(Dmirror(name, memory or "private", snoop=args.snoop, memory_pages=args.memory_pages))
    # The token that reaches hmmd is also the one the command service requires.
    server = grpc.aio.server(options=grpc_options(),
                             interceptors=[RequireToken(credentials.token)] if credentials.token else None)
    add_service(dmirror_pb2_grpc.add_DmirrorServicer_to_server, DmirrorServicer(devices), server)
    # grpc.health.v1 for container and Kubernetes probes: SERVING while every session lives.
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    # Bound before the devices connect: a busy address leaves no device behind.
    try:
        bound = bind(server, args.listen, listen_tls)
    except OSError as e:
        print(f"hmm-dmirror: {e}", file=sys.stderr)
        return 1
    try:
        for dev in devices:
            await dev.connect(args.kernel, callback_deadline_ms=args.callback_deadline_ms, credentials=credentials,
                              max_message_bytes=args.max_message_bytes)
    except KernelError as e:
        print(f"hmm-dmirror: cannot connect to {args.kernel}: {e}", file=sys.stderr)
        for dev in devices:
            await dev.close()
        return 1
    await server.start()
    for service in ("", DMIRROR_SERVICE):
        await checks.set(service, health_pb2.HealthCheckResponse.SERVING)
    # Handlers first: a supervisor may stop us as soon as we say we are up.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"hmm-dmirror listening on {bound}", flush=True)
    log.info("serving %s", ", ".join(d.name for d in devices))
    lost: list[asyncio.Future[Any]] = [asyncio.ensure_future(d.conn.closed) for d in devices if d.conn is not None]
    waiter: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([waiter, *lost], return_when=asyncio.FIRST_COMPLETED)
    await checks.enter_graceful_shutdown()
    code = 0
    for fut in lost:
        if fut in done:
            log.error("lost the daemon: %s", fut.result())
            code = 1
    await server.stop(0.5)
    for dev, fut in zip(devices, lost, strict=True):
        if fut not in done and dev.pool is not None:  # stopped (SIGTERM): its pages go home first
            try:
                moved = await dev.evict()
                log.info("%s: stopping, %d pages evicted", dev.name, moved)
            except KernelError as e:
                log.warning("%s: stopping, eviction failed: %s", dev.name, e)
        await dev.close()
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_malloc()  # migrations move multi-MiB messages: reuse their buffers ($HMM_MALLOC_KEEP_MIB)
    return run_loop(serve(args))


if __name__ == "__main__":
    sys.exit(main())
