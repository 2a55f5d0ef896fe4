"""Who may talk to a server: bearer tokens and TLS, for both ends of every channel.

Shared by the daemon, hmm-dmirror's command service and every client, like
``hmm.status``. A server that has a token requires the metadata entry

    authorization: Bearer <token>

on every call of its own services (``RequireToken``); a call without it, or with
another token, ends with UNAUTHENTICATED and ``hmm-errno: EACCES``. gRPC health and
reflection stay open so that probes work. TLS is the transport's: a server with a
certificate serves TLS only, and with a client CA it also requires a client
certificate signed by that CA (mutual TLS).

A client takes what it presents and trusts from ``Credentials``: explicit values,
or the environment (``HMM_AUTH_TOKEN`` or ``HMM_AUTH_TOKEN_FILE``, ``HMM_TLS_CA``,
``HMM_TLS_CERT``, ``HMM_TLS_KEY``, ``HMM_TLS_SERVER_NAME``), or the command-line
flags of the same names (``add_client_arguments``).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import hmac
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from hmm.abi import ERRNO_METADATA_KEY, ERRNO_VALUE_METADATA_KEY
from hmm.errors import errno_name

log = logging.getLogger(__name__)

AUTHORIZATION_METADATA_KEY = "authorization"
BEARER = "Bearer "
# Services any caller may use: probes (grpc.health.v1) and service discovery.
OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# A refused stream waits this long for the caller's first message before it ends.
FIRST_MESSAGE_WAIT_S = 1.0

TOKEN_ENV = "HMM_AUTH_TOKEN"
TOKEN_FILE_ENV = "HMM_AUTH_TOKEN_FILE"
TLS_CA_ENV = "HMM_TLS_CA"
TLS_CERT_ENV = "HMM_TLS_CERT"
TLS_KEY_ENV = "HMM_TLS_KEY"
TLS_SERVER_NAME_ENV = "HMM_TLS_SERVER_NAME"


def check_token(token: str) -> str:
    """``token`` if it can travel in a metadata value (printable ASCII, no spaces);
    ValueError otherwise. The message never contains the token."""
    if not token:
        raise ValueError("the auth token is empty")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError("the auth token must be printable ASCII without spaces")
    return token


def read_token(path: str) -> str:
    """The token in file ``path`` (surrounding whitespace removed). OSError if it cannot
    be read, ValueError if it is empty or not printable ASCII."""
    with open(path, encoding="ascii", errors="replace") as f:
        return check_token(f.read().strip())


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---- the client's side ------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """What a client presents and trusts. ``ca`` (PEM) turns TLS on and is the CA the
    server's certificate must chain to; ``cert`` and ``key`` (PEM) are the client's own
    certificate for mutual TLS; ``server_name`` overrides the name checked against the
    server's certificate (default: the host of the address); ``token`` goes in the
    ``authorization`` metadata of every call. All empty: plaintext, no token."""

    token: str = field(default="", repr=False)
    ca: bytes = field(default=b"", repr=False)
    cert: bytes = field(default=b"", repr=False)
    key: bytes = field(default=b"", repr=False)
    server_name: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)

    @classmethod
    def from_files(cls, *, token: str = "", token_file: str = "", ca: str = "", cert: str = "", key: str = "",
                   server_name: str = "") -> Credentials:
        """Read the named files (empty names: nothing). OSError or ValueError when a file
        is unreadable or a certificate comes without its key."""
        if bool(cert) != bool(key):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        if token:
            check_token(token)
        elif token_file:
            token = read_token(token_file)
        # (gRPC would only fail the handshake, and not say why)
        if cert:
            _check_pem(cert, key, "", f"the TLS certificate {cert} and key {key}")
        if ca:
            _check_pem("", "", ca, f"the TLS CA {ca}")
        return cls(token=token, ca=_read(ca) if ca else b"", cert=_read(cert) if cert else b"",
                   key=_read(key) if key else b"", server_name=server_name)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Credentials:
        """From HMM_AUTH_TOKEN_FILE (or, without it, the token itself in HMM_AUTH_TOKEN),
        HMM_TLS_CA, HMM_TLS_CERT, HMM_TLS_KEY (paths) and HMM_TLS_SERVER_NAME."""
        env = os.environ if env is None else env
        token_file = env.get(TOKEN_FILE_ENV, "")
        return cls.from_files(token="" if token_file else env.get(TOKEN_ENV, ""), token_file=token_file,
                              ca=env.get(TLS_CA_ENV, ""), cert=env.get(TLS_CERT_ENV, ""),
                              key=env.get(TLS_KEY_ENV, ""), server_name=env.get(TLS_SERVER_NAME_ENV, ""))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Credentials:
        """From the flags of ``add_client_arguments`` (HMM_AUTH_TOKEN still applies when
        no token file is named)."""
        return cls.from_files(token="" if args.auth_token_file else os.environ.get(TOKEN_ENV, ""),
                              token_file=args.auth_token_file, ca=args.tls_ca, cert=args.tls_cert,
                              key=args.tls_key, server_name=args.tls_server_name)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca or None, private_key=self.key or None,
                                            certificate_chain=self.cert or None)

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return bearer_token(self.token) if self.token else []


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """--auth-token-file, --tls-ca, --tls-cert, --tls-key, --tls-server-name, each
    defaulting to its HMM_* environment variable."""
    env = os.environ
    parser.add_argument("--auth-token-file", default=env.get(TOKEN_FILE_ENV, ""), metavar="PATH",
                        help=f"send the token in this file with every call (env {TOKEN_FILE_ENV}; "
                             f"or the token itself in {TOKEN_ENV})")
    parser.add_argument("--tls-ca", default=env.get(TLS_CA_ENV, ""), metavar="PEM",
                        help=f"use TLS; the server's certificate must chain to this CA (env {TLS_CA_ENV})")
    parser.add_argument("--tls-cert", default=env.get(TLS_CERT_ENV, ""), metavar="PEM",
                        help=f"client certificate for mutual TLS (env {TLS_CERT_ENV})")
    parser.add_argument("--tls-key", default=env.get(TLS_KEY_ENV, ""), metavar="PEM",
                        help=f"its private key (env {TLS_KEY_ENV})")
    parser.add_argument("--tls-server-name", default=env.get(TLS_SERVER_NAME_ENV, ""), metavar="NAME",
                        help=f"check the server's certificate for this name (env {TLS_SERVER_NAME_ENV}; "
                             "default: the host of the address)")


def export_client_arguments(args: argparse.Namespace, env: dict[str, str] | os._Environ[str]) -> None:
    """Put the flags of ``add_client_arguments`` into ``env`` (for the clients a
    program makes and the programs it starts). A token file wins over a token in
    HMM_AUTH_TOKEN, as everywhere."""
    for name, var in (("auth_token_file", TOKEN_FILE_ENV), ("tls_ca", TLS_CA_ENV), ("tls_cert", TLS_CERT_ENV),
                      ("tls_key", TLS_KEY_ENV), ("tls_server_name", TLS_SERVER_NAME_ENV)):
        value = getattr(args, name, "")
        if value:
            env[var] = value


class _BearerToken:
    """Adds ``authorization: Bearer <token>`` to the calls it intercepts."""

    def __init__(self, token: str) -> None:
        self._entry = (AUTHORIZATION_METADATA_KEY, BEARER + check_token(token))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(***)"

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._entry)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


# A channel files each interceptor under one kind of call only: one class per kind.
class _UnaryUnaryToken(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _UnaryStreamToken(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamUnaryToken(_BearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                     request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStreamToken(_BearerToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails,
                                      request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def bearer_token(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add ``authorization: Bearer <token>`` to every call of a channel."""
    return [cls(token) for cls in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)]


# ---- the server's side ------------------------------------------------------------------------


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS with the certificate and key in these PEM files; with ``client_ca``, every
    client must present a certificate signed by it (mutual TLS). OSError if a file
    cannot be read."""
    return grpc.ssl_server_credentials([(_read(key), _read(cert))],
                                       root_certificates=_read(client_ca) if client_ca else None,
                                       require_client_auth=bool(client_ca))


def check_server_tls(cert: str, key: str, client_ca: str, flags: str = "--tls") -> None:
    """ValueError for an incomplete TLS setting, or files that are not a PEM
    certificate chain and its key (a CA certificate), naming the flags
    (``flags``-cert, ...): gRPC would only say that it cannot listen."""
    if bool(cert) != bool(key):
        raise ValueError(f"{flags}-cert and {flags}-key go together")
    if client_ca and not cert:
        raise ValueError(f"{flags}-client-ca (mutual TLS) needs {flags}-cert and {flags}-key")
    if cert:
        _check_pem(cert, key, "", f"{flags}-cert {cert} and {flags}-key {key}")
    if client_ca:
        _check_pem("", "", client_ca, f"{flags}-client-ca {client_ca}")


def _check_pem(cert: str, key: str, ca: str, what: str) -> None:
    """ValueError naming ``what`` unless ``cert`` and ``key`` are a PEM certificate
    chain and its private key, or ``ca`` PEM CA certificates: one or the other."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if cert:
            ctx.load_cert_chain(cert, key)
        else:
            ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as e:  # not PEM, or a key that is not the certificate's
        detail = f" ({e.reason.lower().replace('_', ' ')})" if e.reason and e.reason != "PEM_LIB" else ""
        raise ValueError(f"{what}: {'not a PEM certificate chain and its key' if cert else 'no PEM certificate'}"
                         f"{detail}") from None
    except OSError as e:
        raise ValueError(f"{what}: {e.strerror}") from None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class RequireToken(grpc.aio.ServerInterceptor):
    """Every call except health and reflection must carry ``authorization: Bearer
    <token>``; others end with UNAUTHENTICATED, ``hmm-errno: EACCES``. The comparison
    takes the same time whatever the offered value (digests compared in constant time);
    the token is never logged."""

    def __init__(self, token: str, open_prefixes: Iterable[str] = OPEN_SERVICE_PREFIXES) -> None:
        self._expected = _digest(BEARER + check_token(token))
        self._open = tuple(open_prefixes)
        self.refused = 0

    def __repr__(self) -> str:
        return "RequireToken(***)"

    def allows(self, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        offered = ""
        for key, value in metadata or ():
            if key == AUTHORIZATION_METADATA_KEY and isinstance(value, str):
                offered = value
                break
        return hmac.compare_digest(_digest(offered), self._expected)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(self._open) or self.allows(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC say UNIMPLEMENTED
            return handler
        self.refused += 1
        log.info("refused a call to %s without a valid token", method)
        return _refusing(handler)


async def refuse_unauthenticated(context: grpc.aio.ServicerContext) -> None:
    """End the call with UNAUTHENTICATED and the errno metadata of EACCES."""
    context.set_trailing_metadata(((ERRNO_METADATA_KEY, errno_name(errno.EACCES)),
                                   (ERRNO_VALUE_METADATA_KEY, str(errno.EACCES))))
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        f"{errno_name(errno.EACCES)}: missing or wrong token (metadata "
                        f"'{AUTHORIZATION_METADATA_KEY}: {BEARER}<token>')")


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that refuses the call."""
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await refuse_unauthenticated(context)

    async def refuse_stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        # Take the caller's first message (a Hello) before ending the call: a grpc
        # client whose write loses the race with the end sees INTERNAL ("Internal
        # error from Core") in place of this status, and cannot read it any more.
        try:
            await asyncio.wait_for(context.read(), FIRST_MESSAGE_WAIT_S)
        except Exception:  # none came, or the stream ended: refuse all the same
            pass
        await refuse_unauthenticated(context)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse, **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse_stream, **kw)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **kw)
