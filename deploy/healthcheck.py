#!/usr/bin/env python3
"""`hmm-healthcheck`: ask a gRPC server's grpc.health.v1 whether it is SERVING.

The image's HEALTHCHECK and the Compose file run it against hmmd (port 50051 by
default) and hmm-dmirror (its command service); Kubernetes uses its own gRPC probes
instead. Exit status 0 when SERVING, 1 otherwise (unreachable, NOT_SERVING,
unknown service), 2 on bad usage.

    hmm-healthcheck                         127.0.0.1:50051, service ""
    hmm-healthcheck dmirror-0.dmirror:50061 --service hmm.v1.Dmirror
    hmm-healthcheck hmmd:50051 --wait 60    retry until SERVING, at most 60 s

Against a server that serves TLS, give the CA (--tls-ca, or HMM_TLS_CA as for every
hmmd client), and under mutual TLS a client certificate and key (--tls-cert,
--tls-key; HMM_TLS_CERT, HMM_TLS_KEY). Health needs no token.
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


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def open_channel(address: str, ca: str = "", cert: str = "", key: str = "", server_name: str = "") -> grpc.Channel:
    """Plaintext, or TLS when a CA or a client certificate is named."""
    if not (ca or cert):
        return grpc.insecure_channel(address)
    creds = grpc.ssl_channel_credentials(_read(ca), _read(key), _read(cert))
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, creds, options=options)


def check(address: str, service: str, timeout: float, **tls: str) -> str:
    """The health status name of ``service`` at ``address`` ("UNREACHABLE" when the call fails)."""
    with open_channel(address, **tls) as channel:
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
    for flag, var in (("ca", "HMM_TLS_CA"), ("cert", "HMM_TLS_CERT"), ("key", "HMM_TLS_KEY"),
                      ("server-name", "HMM_TLS_SERVER_NAME")):
        p.add_argument(f"--tls-{flag}", default=os.environ.get(var, ""), help=f"TLS (env {var})")
    args = p.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    tls = {"ca": args.tls_ca, "cert": args.tls_cert, "key": args.tls_key, "server_name": args.tls_server_name}
    deadline = time.monotonic() + args.wait
    while True:
        status = check(args.address, args.service, args.timeout, **tls)
        if status == "SERVING" or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    ok = status == "SERVING"
    print(f"{args.address} {args.service or '(server)'}: {status}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
