"""gRPC channel settings and status -> KernelError mapping, shared by the SDK and the daemon."""

from __future__ import annotations

import errno
from typing import NoReturn

import grpc

from hmm.abi import ERRNO_METADATA_KEY
from hmm.errors import KernelError, errno_value
from hmm.security import Credentials

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_KEEPALIVE_MS = 2000


def grpc_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 keepalive_ms: int = DEFAULT_KEEPALIVE_MS) -> list[tuple[str, int]]:
    """Options for both ends: large messages, and keepalive that notices a frozen
    peer within about 2 x keepalive_ms (ping_timeout_ms is what makes it work)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive_ms),
        ("grpc.http2.ping_timeout_ms", keepalive_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", min(1000, keepalive_ms)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", min(500, keepalive_ms)),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def insecure_channel(address: str, **kw: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=grpc_options(**kw))


def open_channel(address: str, credentials: Credentials | None = None, **kw: int) -> grpc.aio.Channel:
    """A channel to ``address`` with ``credentials`` (None: from the HMM_* environment,
    see hmm.security): TLS when they name a CA or a client certificate, a bearer token
    on every call when they hold one; plaintext without either."""
    creds = Credentials.from_env() if credentials is None else credentials
    options: list[tuple[str, int | str]] = list(grpc_options(**kw))
    interceptors = creds.interceptors() or None
    if not creds.tls:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    if creds.server_name:
        options.append(("grpc.ssl_target_name_override", creds.server_name))
    return grpc.aio.secure_channel(address, creds.channel_credentials(), options=options, interceptors=interceptors)


_TRANSPORT_ERRNO = {
    grpc.StatusCode.UNAVAILABLE: errno.ECONNREFUSED,
    grpc.StatusCode.DEADLINE_EXCEEDED: errno.ETIMEDOUT,
    grpc.StatusCode.CANCELLED: errno.ECANCELED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errno.EMSGSIZE,
    grpc.StatusCode.UNAUTHENTICATED: errno.EACCES,
}


def bind(server: grpc.aio.Server, listen: str, tls: grpc.ServerCredentials | None = None) -> str:
    """Add ``listen`` to ``server``; the address bound (a port 0 resolved; a unix
    socket's path as given: grpc's "port" there is 1). OSError if it cannot be bound
    (in use, or not an address of this host)."""
    try:
        port = server.add_secure_port(listen, tls) if tls is not None else server.add_insecure_port(listen)
    except RuntimeError:  # grpc's "Failed to bind to address ..."
        port = 0
    if not port:
        raise OSError(f"cannot listen on {listen} (in use, or not an address of this host)")
    return listen if listen.startswith("unix") else f"{listen.rsplit(':', 1)[0]}:{port}"


# What to do about a failure to connect or to be let in, by its status and a piece of
# gRPC's text: gRPC names the failure, not the setting behind it.
_HINTS = (
    (grpc.StatusCode.UNAUTHENTICATED, "token", "give the server's token: --auth-token-file or HMM_AUTH_TOKEN_FILE"),
    (grpc.StatusCode.UNAVAILABLE, "Connection refused", "is the server running at that address?"),
    (grpc.StatusCode.UNAVAILABLE, "Socket closed",
     "the server closed the connection: if it serves TLS, name its CA (--tls-ca or HMM_TLS_CA); "
     "if it requires a client certificate, give one (--tls-cert, --tls-key)"),
    (grpc.StatusCode.UNAVAILABLE, "WRONG_VERSION_NUMBER", "the server does not serve TLS: no --tls-ca / HMM_TLS_CA"),
    (grpc.StatusCode.UNAVAILABLE, "CERTIFICATE_VERIFY_FAILED",
     "the server's certificate does not chain to the CA given (--tls-ca / HMM_TLS_CA)"),
    (grpc.StatusCode.UNAVAILABLE, "Hostname Verification",
     "the server's certificate is not for that host name: connect by its name, or --tls-server-name"),
)


def to_kernel_error(e: grpc.aio.AioRpcError) -> KernelError:
    """The KernelError a failed call stands for: the daemon's errno if it sent one,
    else one that names the transport failure; either with what to do when it is a
    failure to connect or to be let in (_HINTS)."""
    details = e.details() or ""
    hint = next((f" ({h})" for code, text, h in _HINTS
                 if e.code() == code and text in details and (code != grpc.StatusCode.UNAVAILABLE
                                                              or "failed to connect" in details)), "")
    for key, value in e.trailing_metadata() or ():
        if key == ERRNO_METADATA_KEY:
            try:
                return KernelError(errno_value(str(value)), details + hint)
            except (AttributeError, ValueError):
                break
    return KernelError(_TRANSPORT_ERRNO.get(e.code(), errno.EIO), f"{e.code().name}: {details}{hint}")


def raise_kernel_error(e: grpc.aio.AioRpcError) -> NoReturn:
    raise to_kernel_error(e) from None
