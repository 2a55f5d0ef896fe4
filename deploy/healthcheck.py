#!/usr/bin/env python3
"""`hmm-healthcheck`: ask a gRPC server's grpc.health.v1 whether it is SERVING.

The image's HEALTHCHECK and the Compose file run it against hmmd (port 50051 by
default) and hmm-dmirror (its command service); Kubernetes uses its own gRPC probes
instead. Exit status 0 when SERVING, 1 otherwise (unreachable, NOT_SERVING,
unknown service), 2 on bad usage.

    hmm-healthcheck                         127.0.0.1:50051, service ""
    hmm-healthcheck dmirror-0.dmirror:50061 --service hmm.v1.Dmirror
    hmm-healthcheck hmmd:50051 --wait 60    retry until SERVING, at most 60 s
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
ADDRESS_ENV = "HMM_HEALTH_ADDRESS"


def check(address: str, service: str, timeout: float) -> str:
    """The health status name of ``service`` at ``address`` ("UNREACHABLE" when the call fails)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            return "UNKNOWN_SERVICE" if code == grpc.StatusCode.NOT_FOUND else "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hmm-healthcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("address", nargs="?", default=os.environ.get(ADDRESS_ENV, DEFAULT_ADDRESS),
                   help=f"HOST:PORT (env {ADDRESS_ENV}; default {DEFAULT_ADDRESS})")
    p.add_argument("--service", default="", help='the service to ask about (default "": the whole server)')
    p.add_argument("--timeout", type=float, default=2.0, help="seconds for one check")
    p.add_argument("--wait", type=float, default=0.0, help="retry until SERVING for at most this many seconds")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.wait
    while True:
        status = check(args.address, args.service, args.timeout)
        if status == "SERVING" or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    ok = status == "SERVING"
    print(f"{args.address} {args.service or '(server)'}: {status}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
