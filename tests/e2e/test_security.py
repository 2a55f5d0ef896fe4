"""Security: who may call (a bearer token on every call), over what (TLS, mutual
TLS), what a device may reach (only processes that opened it, only frames it
holds), and how much one device may take (notifiers, requests in flight, device
memory, message size).

Every refusal is pinned to its gRPC status and ``hmm-errno``; after each one the
test checks that nothing changed and that the daemon still serves. Certificates
are made at test time (a throwaway CA with the ``cryptography`` package); no key
is committed. Each daemon here is a real ``hmmd`` process with the settings under
test; devices are ``hmm-dmirror`` processes or in-process SDK connections.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import ipaddress
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hmm.abi import (
    ERRNO_METADATA_KEY,
    ERRNO_VALUE_METADATA_KEY,
    MEMORY_DEVICE_PRIVATE,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    SESSION_METADATA_KEY,
    TASK_SIZE,
)
from hmm.admin import AdminClient
from hmm.channel import DEFAULT_MAX_MESSAGE_BYTES, insecure_channel, to_kernel_error
from hmm.device import DeviceConnection, Driver
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import CMD_MIGRATE_TO_DEV, CMD_READ, CMD_SNAPSHOT, CMD_WRITE
from hmm.errors import KernelError
from hmm.process import Proc, ProcessClient
from hmm.security import AUTHORIZATION_METADATA_KEY, Credentials
from hmm.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    device_pb2_grpc,
    dmirror_pb2,
    dmirror_pb2_grpc,
    process_pb2_grpc,
)
from hmm.v1 import device_pb2 as dpb
from hmm.v1 import process_pb2 as ppb
from tests.e2e.recorder import Recorder
from tests.procs import NODE_MAIN, Program, node_executable, start_dmirror, start_hmmd, start_node_dmirror

P = PAGE_SIZE
N = 16  # pages of the test buffers
TIMEOUT_S = 10.0
TOKEN = secrets.token_urlsafe(32)
SC = grpc.StatusCode
# What a client is told when a TLS server, or one that wants a client certificate, hangs up.
CLOSED_HINT = ("(the server closed the connection: if it serves TLS, name its CA (--tls-ca or HMM_TLS_CA); "
               "if it requires a client certificate, give one (--tls-cert, --tls-key))")


def pattern(npages: int = N, c: int = 0) -> bytes:
    return (np.arange(npages * P // 4, dtype=np.int32) + c).tobytes()


def stop(prog: Program) -> None:
    code = prog.stop()
    assert code == 0, f"{prog.name} exited with {code}:\n{prog.log_text()}"


def errno_of(e: grpc.aio.AioRpcError) -> tuple[str | None, str | None]:
    md = dict(e.trailing_metadata() or ())
    return md.get(ERRNO_METADATA_KEY), md.get(ERRNO_VALUE_METADATA_KEY)


def assert_unauthenticated(e: grpc.aio.AioRpcError) -> None:
    assert e.code() == SC.UNAUTHENTICATED, e
    assert errno_of(e) == ("EACCES", str(errno.EACCES)), e
    assert (e.details() or "").startswith("EACCES: ")
    assert TOKEN not in (e.details() or "")
    assert to_kernel_error(e).errno == errno.EACCES


# ---- a throwaway PKI ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: str  # the CA that signs the daemon's and the clients' certificates
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # an unrelated CA, and a client certificate it signed
    other_client_cert: str
    other_client_key: str

    def credentials(self, *, client: str = "", token: str = "", ca: str = "") -> Credentials:
        """TLS trusting ``ca`` (default: the CA); ``client`` = "ours" or "other" adds
        that client certificate."""
        cert, key = {"": ("", ""), "ours": (self.client_cert, self.client_key),
                     "other": (self.other_client_cert, self.other_client_key)}[client]
        return Credentials.from_files(token=token, ca=ca or self.ca, cert=cert, key=key)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").chmod(0o600)
    return str(path.with_suffix(".pem")), str(path.with_suffix(".key"))


def _ca(path: Path, cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    _write(path, key, cert)
    return key, cert


def _leaf(path: Path, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], cn: str,
          server: bool) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca[1].subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return _write(path, key, builder.sign(ca[0], hashes.SHA256()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = _ca(d / "ca", "hmm test CA"), _ca(d / "other-ca", "another CA")
    server = _leaf(d / "server", ca, "hmmd", server=True)
    client = _leaf(d / "client", ca, "hmm client", server=False)
    stranger = _leaf(d / "stranger", other, "hmm client", server=False)
    return Pki(str(d / "ca.pem"), *server, *client, str(d / "other-ca.pem"), *stranger)


def token_file(d: Path, token: str = TOKEN) -> str:
    path = d / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return str(path)


# ---- token authentication ------------------------------------------------------------------


@pytest.fixture(scope="module")
def authd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Program]:
    d = tmp_path_factory.mktemp("authd")
    prog = start_hmmd(d, "--auth-token-file", token_file(d), "--callback-deadline-ms", "5000", name="authd")
    yield prog
    stop(prog)
    assert "transport: plaintext; a token is required on every call" in prog.log_text()
    assert TOKEN not in prog.log_text()


@pytest.fixture
async def authed(authd: Program) -> AsyncIterator[tuple[ProcessClient, AdminClient]]:
    cpu = ProcessClient.connect(authd.address, Credentials(token=TOKEN))
    yield cpu, AdminClient(cpu.channel)
    await cpu.close()


async def read_through(cpu: ProcessClient, dm: Program, device: str) -> tuple[Proc, int, int]:
    """A process with N written pages that opened /dev/``device``; a READ of them
    through ``dm``'s command service with the token returns them. (proc, buf, file_id)."""
    proc = await cpu.spawn(device)
    buf = await proc.mmap(N * P)
    await proc.write(buf, pattern())
    _, file_id = await proc.open(f"/dev/{device}")
    client = DmirrorClient(dm.address, Credentials(token=TOKEN))
    r = await client.command(file_id, CMD_READ, buf, N)
    assert (r.cpages, r.data) == (N, pattern())
    await client.close()
    return proc, buf, file_id


OFFERED = {
    "none": None,
    "wrong": f"Bearer {TOKEN[:-1]}{'A' if TOKEN[-1] != 'A' else 'B'}",
    "longer": f"Bearer {TOKEN}x",
    "no-scheme": TOKEN,
    "other-scheme": f"Basic {TOKEN}",
    "empty": "",
}


@pytest.mark.parametrize("offered", sorted(OFFERED))
async def test_every_service_refuses_a_call_without_the_token(authd: Program, authed: tuple[ProcessClient,
                                                              AdminClient], offered: str) -> None:
    cpu, admin = authed
    before = await admin.stats()
    md = () if OFFERED[offered] is None else ((AUTHORIZATION_METADATA_KEY, OFFERED[offered]),)
    name = f"intruder_{offered}"
    async with insecure_channel(authd.address) as ch:
        calls: list[Any] = [
            process_pb2_grpc.ProcessStub(ch).Spawn(ppb.SpawnRequest(name="intruder"), metadata=md),
            admin_pb2_grpc.AdminStub(ch).Stats(admin_pb2.StatsRequest(), metadata=md),
            admin_pb2_grpc.AdminStub(ch).InjectFaults(admin_pb2.InjectFaultsRequest(device="x", disconnect=True),
                                                      metadata=md),
            device_pb2_grpc.DeviceStub(ch).InsertNotifier(dpb.InsertNotifierRequest(pid=1, start=0, length=P),
                                                          metadata=(*md, (SESSION_METADATA_KEY, "0" * 32))),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call, TIMEOUT_S)
            assert_unauthenticated(info.value)
        # A server stream (TraceStream) and the bidi Connect stream: refused before a message.
        stream = admin_pb2_grpc.AdminStub(ch).TraceStream(admin_pb2.TraceStreamRequest(), metadata=md)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(stream.read(), TIMEOUT_S)
        assert_unauthenticated(info.value)
        connect = device_pb2_grpc.DeviceStub(ch).Connect(metadata=md)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            try:
                await connect.write(dpb.DeviceMessage(hello=dpb.Hello(
                    version_major=PROTOCOL_VERSION[0], version_minor=PROTOCOL_VERSION[1], name=name)))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # refused before the Hello went out: the read gives the status
            await asyncio.wait_for(connect.read(), TIMEOUT_S)
        assert_unauthenticated(info.value)
    after = await admin.stats()
    assert after.processes == before.processes
    assert after.devices == before.devices and name not in [d.name for d in after.devices]
    assert (await cpu.spawn("still-serving")).pid > 0


async def test_sdk_clients_map_the_refusal_to_eacces(authd: Program) -> None:
    for creds in (Credentials(), Credentials(token="not-the-token")):
        async with ProcessClient.connect(authd.address, creds) as cpu:
            with pytest.raises(KernelError) as e:
                await cpu.spawn()
            assert e.value.errno == errno.EACCES
        admin = AdminClient(address=authd.address, credentials=creds)
        with pytest.raises(KernelError) as e:
            await admin.stats()
        assert e.value.errno == errno.EACCES
        assert str(e.value).endswith("(give the server's token: --auth-token-file or HMM_AUTH_TOKEN_FILE)")
        await admin.close()
        with pytest.raises(KernelError) as e:
            await DeviceConnection.connect(authd.address, "refused", Driver(), credentials=creds)
        assert e.value.errno == errno.EACCES


async def test_token_from_the_environment(authd: Program) -> None:
    creds = Credentials.from_env({"HMM_AUTH_TOKEN": TOKEN})
    async with ProcessClient.connect(authd.address, creds) as cpu:
        assert (await cpu.spawn()).pid > 0


async def test_health_and_reflection_stay_open(authd: Program) -> None:
    async with insecure_channel(authd.address) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                           timeout=TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(timeout=TIMEOUT_S)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await call.read()
        await call.done_writing()
        names = {s.name for s in listed.list_services_response.service}
        assert {"hmm.v1.Process", "hmm.v1.Device", "hmm.v1.Admin"} <= names


async def test_a_device_with_the_token_mirrors_and_its_command_service_requires_it(
        authd: Program, authed: tuple[ProcessClient, AdminClient], tmp_path: Path) -> None:
    """hmm-dmirror reaches hmmd with the token and requires the same one on hmm.v1.Dmirror."""
    cpu, admin = authed
    dm = start_dmirror(tmp_path, authd.address, "tok0", args=("--auth-token-file", token_file(tmp_path)),
                       name="dmirror-token")
    try:
        proc, buf, file_id = await read_through(cpu, dm, "tok0")
        for creds in (Credentials(), Credentials(token="wrong")):
            stranger = DmirrorClient(dm.address, creds)
            with pytest.raises(KernelError) as e:
                await stranger.command(file_id, CMD_WRITE, buf, 1, bytes(P))
            assert e.value.errno == errno.EACCES
            await stranger.close()
        assert await proc.read(buf, N * P) == pattern()  # the refused WRITE did nothing
        async with insecure_channel(dm.address) as ch:  # its health stays open
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert (await admin.stats()).device("tok0").alive
    finally:
        stop(dm)
    assert TOKEN not in dm.log_text()


def test_hmmctl_takes_the_token_file(authd: Program, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "hmmd.ctl", "stats", "--kernel", authd.address, "--json"]
    r = subprocess.run([*argv, "--auth-token-file", token_file(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert '"ram_frames"' in r.stdout
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=_env_without_hmm())
    assert r.returncode == 1 and "EACCES" in r.stderr, r.stderr


def _env_without_hmm() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("HMM_")}


def test_hmmd_refuses_to_start_with_a_bad_token_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path, message in ((str(empty), "empty"), (str(tmp_path / "missing"), "cannot read")):
        r = subprocess.run([sys.executable, "-m", "hmmd", "--listen", "127.0.0.1:0", "--auth-token-file", path],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr, r.stderr


# ---- TLS and mutual TLS ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tlsd(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Program]:
    d = tmp_path_factory.mktemp("tlsd")
    prog = start_hmmd(d, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
                      "--auth-token-file", token_file(d), name="tlsd")
    yield prog
    stop(prog)
    assert "transport: TLS; a token is required on every call" in prog.log_text()


@pytest.fixture(scope="module")
def mtlsd(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Program]:
    d = tmp_path_factory.mktemp("mtlsd")
    prog = start_hmmd(d, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
                      "--tls-client-ca", pki.ca, name="mtlsd")
    yield prog
    stop(prog)
    assert "transport: mutual TLS; no token required" in prog.log_text()


async def test_tls_end_to_end_a_device_mirrors_and_migrates(tlsd: Program, pki: Pki, tmp_path: Path) -> None:
    dm = start_dmirror(tmp_path, tlsd.address, "tls0", "tls1", name="dmirror-tls",
                       args=("--tls-ca", pki.ca, "--auth-token-file", token_file(tmp_path)))
    cpu = ProcessClient.connect(tlsd.address, pki.credentials(token=TOKEN))
    client = DmirrorClient(dm.address, Credentials(token=TOKEN))  # its command service: plaintext
    try:
        proc = await cpu.spawn("over-tls")
        buf = await proc.mmap(N * P)
        await proc.write(buf, pattern())
        files = [(await proc.open(f"/dev/tls{i}"))[1] for i in range(2)]
        r = await client.command(files[0], CMD_READ, buf, N)  # mirror: range fault + DMA over TLS
        assert (r.cpages, r.data) == (N, pattern())
        r = await client.command(files[1], CMD_MIGRATE_TO_DEV, buf, N)
        assert (r.cpages, r.data) == (N, pattern())
        assert list((await client.command(files[1], CMD_SNAPSHOT, buf, 2)).data) == [0x22, 0x22]
        assert await proc.read(buf, N * P) == pattern()  # every page comes home through tls1
        assert list((await client.command(files[1], CMD_SNAPSHOT, buf, 2)).data) == [0x02, 0x02]
        stats = await AdminClient(cpu.channel).stats()
        assert all(stats.device(n).alive and stats.device(n).violations == 0 for n in ("tls0", "tls1"))
    finally:
        await client.close()
        await cpu.close()
        stop(dm)


async def test_plaintext_client_against_a_tls_daemon_fails_cleanly(tlsd: Program, authd: Program,
                                                                   pki: Pki) -> None:
    """Each way of not getting through says what to do about it."""
    async with ProcessClient.connect(tlsd.address, Credentials(token=TOKEN)) as plain:
        with pytest.raises(KernelError) as e:
            await asyncio.wait_for(plain.spawn(), TIMEOUT_S)
        assert e.value.errno == errno.ECONNREFUSED  # UNAVAILABLE: the handshake failed
        assert str(e.value).endswith(CLOSED_HINT)
    async with ProcessClient.connect(authd.address, pki.credentials(token=TOKEN)) as tls_to_plain:
        with pytest.raises(KernelError) as e:
            await asyncio.wait_for(tls_to_plain.spawn(), TIMEOUT_S)
        assert str(e.value).endswith("(the server does not serve TLS: no --tls-ca / HMM_TLS_CA)")
    with pytest.raises(KernelError) as e:
        await asyncio.wait_for(DeviceConnection.connect(tlsd.address, "plain", Driver(),
                                                        credentials=Credentials(token=TOKEN)), TIMEOUT_S)
    assert e.value.errno == errno.ECONNREFUSED
    # A client that trusts another CA is refused too (the daemon's certificate fails).
    async with ProcessClient.connect(tlsd.address, pki.credentials(token=TOKEN, ca=pki.other_ca)) as wrong:
        with pytest.raises(KernelError) as e:
            await asyncio.wait_for(wrong.spawn(), TIMEOUT_S)
        assert e.value.errno == errno.ECONNREFUSED
        assert str(e.value).endswith("(the server's certificate does not chain to the CA given (--tls-ca / "
                                     "HMM_TLS_CA))")
    async with ProcessClient.connect(tlsd.address, pki.credentials(token=TOKEN)) as good:
        assert (await good.spawn()).pid > 0
        assert "plain" not in [d.name for d in (await AdminClient(good.channel).stats()).devices]


@pytest.mark.parametrize("client", ["", "other"])
async def test_mutual_tls_refuses_a_client_without_a_certificate_of_its_ca(mtlsd: Program, pki: Pki,
                                                                           client: str) -> None:
    async with ProcessClient.connect(mtlsd.address, pki.credentials(client="ours")) as ok:
        before = (await AdminClient(ok.channel).stats()).processes
    async with ProcessClient.connect(mtlsd.address, pki.credentials(client=client)) as refused:
        with pytest.raises(KernelError) as e:
            await asyncio.wait_for(refused.spawn(), TIMEOUT_S)
        assert e.value.errno == errno.ECONNREFUSED
        assert str(e.value).endswith(CLOSED_HINT)
    admin = AdminClient(address=mtlsd.address, credentials=pki.credentials(client="ours"))
    try:
        assert (await admin.stats()).processes == before
    finally:
        await admin.close()


async def test_mutual_tls_with_a_certificate_of_its_ca_works(mtlsd: Program, pki: Pki, tmp_path: Path) -> None:
    dm = start_dmirror(tmp_path, mtlsd.address, "mtls0", name="dmirror-mtls",
                       args=("--tls-ca", pki.ca, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key))
    cpu = ProcessClient.connect(mtlsd.address, pki.credentials(client="ours"))
    client = DmirrorClient(dm.address, Credentials())
    try:
        proc = await cpu.spawn()
        buf = await proc.mmap(N * P)
        await proc.write(buf, pattern())
        _, file_id = await proc.open("/dev/mtls0")
        r = await client.command(file_id, CMD_MIGRATE_TO_DEV, buf, N)
        assert (r.cpages, r.data) == (N, pattern())
        assert await proc.read(buf, N * P) == pattern()
    finally:
        await client.close()
        await cpu.close()
        stop(dm)


HEALTHCHECK = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"


def test_healthcheck_speaks_tls_and_needs_no_token(tlsd: Program, mtlsd: Program, pki: Pki) -> None:
    def check(address: str, *args: str) -> int:
        return subprocess.run([sys.executable, str(HEALTHCHECK), address, "--timeout", "5", *args],
                              capture_output=True, text=True, timeout=60, env=_env_without_hmm()).returncode

    assert check(tlsd.address, "--tls-ca", pki.ca) == 0  # TLS, no token: health is open
    assert check(tlsd.address, "--tls-ca", pki.ca, "--tls-server-name", "localhost") == 0
    assert check(tlsd.address) == 1  # plaintext against TLS: UNREACHABLE
    assert check(mtlsd.address, "--tls-ca", pki.ca) == 1  # mutual TLS needs a certificate
    assert check(mtlsd.address, "--tls-ca", pki.ca, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key) == 0


def test_hmmd_refuses_to_start_with_half_a_tls_setting_or_files_that_are_not_one(pki: Pki) -> None:
    """Also a certificate and key swapped, a key of another certificate, a CA file that
    holds no certificate: gRPC would only have said that it cannot listen."""
    cert, key = pki.server_cert, pki.server_key
    for args, message in ((("--tls-cert", cert), "--tls-key"),
                          (("--tls-client-ca", pki.ca), "--tls-cert"),
                          (("--tls-cert", key, "--tls-key", cert),
                           f"hmmd: --tls-cert {key} and --tls-key {cert}: not a PEM certificate chain and its key"),
                          (("--tls-cert", cert, "--tls-key", pki.client_key), "its key (key values mismatch)"),
                          (("--tls-cert", cert, "--tls-key", key, "--tls-client-ca", key),
                           f"hmmd: --tls-client-ca {key}: no PEM certificate")):
        r = subprocess.run([sys.executable, "-m", "hmmd", "--listen", "127.0.0.1:0", *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    with pytest.raises(ValueError, match=f"the TLS CA {key}: no PEM certificate"):
        Credentials.from_files(ca=key)


# ---- what a device may reach ------------------------------------------------------------------


@pytest.fixture(scope="module")
def capd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Program]:
    """A daemon with small per-device caps."""
    prog = start_hmmd(tmp_path_factory.mktemp("capd"), "--max-notifiers-per-device", "2",
                      "--max-requests-per-device", "2", "--max-device-memory-pages", "1024",
                      "--max-message-bytes", str(1 << 20), "--callback-deadline-ms", "10000", name="capd")
    yield prog
    stop(prog)


@dataclass
class Device:
    conn: DeviceConnection
    driver: Recorder
    name: str


_ids = iter(range(1 << 30))


@pytest.fixture
async def devices(capd: Program) -> AsyncIterator[tuple[Device, Device]]:
    made = []
    for _ in range(2):
        name, driver = f"cap{next(_ids)}", Recorder()
        made.append(Device(await DeviceConnection.connect(capd.address, name, driver), driver, name))
    yield made[0], made[1]
    for d in made:
        if d.driver.hold is not None:
            d.driver.hold.set()
        await d.conn.close()


@pytest.fixture
async def capcpu(capd: Program) -> AsyncIterator[tuple[ProcessClient, AdminClient]]:
    cpu = ProcessClient.connect(capd.address, Credentials())
    yield cpu, AdminClient(cpu.channel)
    admin = AdminClient(cpu.channel)
    assert await admin.check_invariants() == []
    await cpu.close()


async def buffer(cpu: ProcessClient, *opened: Device) -> tuple[Proc, int]:
    proc = await cpu.spawn()
    buf = await proc.mmap(N * P)
    await proc.write(buf, pattern())
    for d in opened:
        await proc.open(f"/dev/{d.name}")
    return proc, buf


async def test_a_device_mirrors_only_processes_that_opened_it(capcpu: tuple[ProcessClient, AdminClient],
                                                              devices: tuple[Device, Device]) -> None:
    (cpu, admin), (a, b) = capcpu, devices
    proc, _ = await buffer(cpu, a)  # opened a, not b
    with pytest.raises(KernelError) as e:
        await b.conn.insert_notifier(proc.pid, 0, TASK_SIZE)
    assert e.value.errno == errno.EPERM
    with pytest.raises(KernelError) as e:  # nor may it look at the layout
        await b.conn.find_vma(proc.pid, 0)
    assert e.value.errno == errno.EPERM
    assert [n.device_name for n in await admin.notifiers(proc.pid)] == []
    await a.conn.insert_notifier(proc.pid, 0, TASK_SIZE)
    assert [n.device_name for n in await admin.notifiers(proc.pid)] == [a.name]


async def test_a_device_dmas_only_to_frames_it_holds(capcpu: tuple[ProcessClient, AdminClient],
                                                     devices: tuple[Device, Device]) -> None:
    (cpu, admin), (a, b) = capcpu, devices
    proc, buf = await buffer(cpu, a, b)
    mirror_a = await a.conn.insert_notifier(proc.pid, 0, TASK_SIZE)
    await b.conn.insert_notifier(proc.pid, 0, TASK_SIZE)
    async with mirror_a.fault(buf, buf + N * P, write=True) as result:
        pfns = result.pfns.copy()
    assert await a.conn.dma_read(pfns) == pattern()
    # b never faulted them: it may neither read nor write a's frames.
    with pytest.raises(KernelError) as e:
        await b.conn.dma_read(pfns[:1])
    assert e.value.errno == errno.EFAULT
    with pytest.raises(KernelError) as e:
        await b.conn.dma_write(pfns[1:2], b"\xff" * P)
    assert e.value.errno == errno.EFAULT
    # munmap revokes a's rights to the first half: the frames are no longer a's.
    await proc.munmap(buf, N // 2 * P)
    with pytest.raises(KernelError) as e:
        await a.conn.dma_write(pfns[:1], b"\xff" * P)
    assert e.value.errno == errno.EFAULT
    assert await a.conn.dma_read(pfns[N // 2:]) == pattern()[N // 2 * P:]
    assert await proc.read(buf + N // 2 * P, N // 2 * P) == pattern()[N // 2 * P:]
    stats = await admin.stats()
    assert (stats.device(a.name).violations, stats.device(b.name).violations) == (1, 2)
    assert stats.device(a.name).alive and stats.device(b.name).alive


# ---- per-device caps ---------------------------------------------------------------------------


def expect_errno(e: pytest.ExceptionInfo[KernelError], err: int, text: str) -> None:
    assert e.value.errno == err, e.value
    assert text in (e.value.strerror or ""), e.value


async def test_notifiers_beyond_the_cap_are_enospc(capcpu: tuple[ProcessClient, AdminClient],
                                                   devices: tuple[Device, Device]) -> None:
    (cpu, admin), (a, _) = capcpu, devices
    proc, buf = await buffer(cpu, a)
    first = await a.conn.insert_notifier(proc.pid, buf, P)
    await a.conn.insert_notifier(proc.pid, buf + P, P)
    with pytest.raises(KernelError) as e:
        await a.conn.insert_notifier(proc.pid, buf + 2 * P, P)
    expect_errno(e, errno.ENOSPC, "")
    assert len(await admin.notifiers(proc.pid)) == 2
    assert (await a.conn.find_vma(proc.pid, buf))[0] == buf  # the session still serves
    await a.conn.remove_notifier(first)
    await a.conn.insert_notifier(proc.pid, buf + 2 * P, P)  # room again
    assert len(await admin.notifiers(proc.pid)) == 2


async def test_requests_in_flight_beyond_the_cap_are_eagain(capcpu: tuple[ProcessClient, AdminClient],
                                                            devices: tuple[Device, Device]) -> None:
    """Two ReadBegins wait on an open invalidation window (the device holds its ack);
    a third call of that session is refused at once, another device's is not."""
    (cpu, admin), (a, b) = capcpu, devices
    assert a.conn.max_requests_in_flight == 2  # the Welcome says so
    proc, buf = await buffer(cpu, a)
    mirror = await a.conn.insert_notifier(proc.pid, 0, TASK_SIZE)
    a.driver.hold = asyncio.Event()
    munmap = asyncio.create_task(proc.munmap(buf, P))
    while not a.driver.events:
        await asyncio.sleep(0.01)
    waiting = [asyncio.create_task(mirror.read_begin()) for _ in range(2)]
    await asyncio.sleep(0.3)
    assert not any(t.done() for t in waiting)
    with pytest.raises(KernelError) as e:
        await asyncio.wait_for(a.conn.find_vma(proc.pid, buf + P), TIMEOUT_S)
    expect_errno(e, errno.EAGAIN, "requests in flight")
    assert (await admin.stats()).device(a.name).alive
    other, _ = await buffer(cpu, b)
    await b.conn.insert_notifier(other.pid, 0, P)  # b has its own count
    a.driver.hold.set()
    await asyncio.wait_for(munmap, TIMEOUT_S)
    await asyncio.wait_for(asyncio.gather(*waiting), TIMEOUT_S)
    assert (await a.conn.find_vma(proc.pid, buf + P))[0] == buf + P  # served again


async def test_device_memory_beyond_the_cap_is_enomem_at_hello(capd: Program,
                                                               capcpu: tuple[ProcessClient, AdminClient]) -> None:
    _, admin = capcpu
    name = f"bigmem{next(_ids)}"
    with pytest.raises(KernelError) as e:
        await DeviceConnection.connect(capd.address, name, Driver(), memory=MEMORY_DEVICE_PRIVATE,
                                       memory_pages=1025)
    expect_errno(e, errno.ENOMEM, "--max-device-memory-pages")
    assert name not in [d.name for d in (await admin.stats()).devices]
    conn = await DeviceConnection.connect(capd.address, name, Driver(), memory=MEMORY_DEVICE_PRIVATE,
                                          memory_pages=1024)
    try:
        assert conn.device_pfn_count == 1024
        assert (await admin.stats()).device(name).memory_pages == 1024
    finally:
        await conn.close()


async def test_a_message_beyond_the_limit_is_refused_by_grpc(capd: Program,
                                                             capcpu: tuple[ProcessClient, AdminClient],
                                                             devices: tuple[Device, Device]) -> None:
    """The daemon's receive limit (--max-message-bytes, 1 MiB here) refuses the call
    before the daemon sees it: RESOURCE_EXHAUSTED without hmm-errno, which the SDK
    reads as EMSGSIZE. The session and the pages are untouched."""
    (cpu, admin), (a, _) = capcpu, devices
    proc, buf = await buffer(cpu, a)
    mirror = await a.conn.insert_notifier(proc.pid, 0, TASK_SIZE)
    async with mirror.fault(buf, buf + N * P, write=True) as result:
        pfns = result.pfns.copy()
    npages = (1 << 20) // P + 1
    big = dpb.DmaWriteRequest(pfns=np.resize(pfns, npages).astype("<u8").tobytes(), data=b"\xff" * (npages * P))
    session = ((SESSION_METADATA_KEY, a.conn._metadata[0][1]),)
    async with insecure_channel(capd.address, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await device_pb2_grpc.DeviceStub(ch).DmaWrite(big, metadata=session, timeout=TIMEOUT_S)
    e = info.value
    assert e.code() == SC.RESOURCE_EXHAUSTED, e
    assert errno_of(e) == (None, None)
    assert to_kernel_error(e).errno == errno.EMSGSIZE
    assert await proc.read(buf, N * P) == pattern()
    assert await a.conn.dma_read(pfns) == pattern()  # the session lives on
    d = (await admin.stats()).device(a.name)
    assert d.alive and d.violations == 0


# ---- the Node.js device (client/node) ----------------------------------------------------------


async def test_node_device_reaches_a_tls_daemon_with_the_token_and_guards_its_commands_the_same_way(
        tlsd: Program, pki: Pki, tmp_path: Path) -> None:
    """The Node device takes the Python device's flags: the token and the CA to reach
    hmmd, and TLS (mutual, here) plus the same token on its command service."""
    dm = start_node_dmirror(tmp_path, tlsd.address, "ntls0", name="node-tls", args=(
        "--tls-ca", pki.ca, "--auth-token-file", token_file(tmp_path), "--listen-tls-cert", pki.server_cert,
        "--listen-tls-key", pki.server_key, "--listen-tls-client-ca", pki.ca))
    cpu = ProcessClient.connect(tlsd.address, pki.credentials(token=TOKEN))
    client = DmirrorClient(dm.address, pki.credentials(client="ours", token=TOKEN))
    try:
        proc = await cpu.spawn("node-over-tls")
        buf = await proc.mmap(N * P)
        await proc.write(buf, pattern())
        _, file_id = await proc.open("/dev/ntls0")
        r = await client.command(file_id, CMD_MIGRATE_TO_DEV, buf, N)
        assert (r.cpages, r.data) == (N, pattern())
        assert await proc.read(buf, N * P) == pattern()  # home again through the TLS stream
        for creds in (pki.credentials(client="ours"), pki.credentials(client="ours", token="wrong")):
            stranger = DmirrorClient(dm.address, creds)
            with pytest.raises(KernelError) as e:
                await stranger.command(file_id, CMD_WRITE, buf, 1, bytes(P))
            assert e.value.errno == errno.EACCES and "missing or wrong token" in str(e.value)
            await stranger.close()
        no_cert = DmirrorClient(dm.address, pki.credentials(token=TOKEN))  # mutual TLS: refused
        with pytest.raises(KernelError) as e:
            await asyncio.wait_for(no_cert.command(file_id, CMD_READ, buf, 1), TIMEOUT_S)
        assert e.value.errno == errno.ECONNREFUSED
        await no_cert.close()
        assert await proc.read(buf, N * P) == pattern()  # the refused WRITE did nothing
        assert (await AdminClient(cpu.channel).stats()).device("ntls0").alive
    finally:
        await client.close()
        await cpu.close()
        stop(dm)
    assert TOKEN not in dm.log_text()


async def test_node_device_takes_the_token_from_the_environment_and_refuses_every_other_offer_as_hmmd(
        authd: Program, authed: tuple[ProcessClient, AdminClient], tmp_path: Path) -> None:
    """Plaintext, a token only: the file in HMM_AUTH_TOKEN_FILE wins over HMM_AUTH_TOKEN,
    reaches hmmd and guards every hmm.v1.Dmirror method; each other offer ends as at
    hmmd (UNAUTHENTICATED, hmm-errno EACCES) and changes nothing."""
    cpu, admin = authed
    dm = start_node_dmirror(tmp_path, authd.address, "ntok0", name="node-token",
                            env={"HMM_AUTH_TOKEN_FILE": token_file(tmp_path), "HMM_AUTH_TOKEN": "not-the-token"})
    try:
        proc, buf, file_id = await read_through(cpu, dm, "ntok0")
        write = dmirror_pb2.DmirrorCommand(file_id=file_id, cmd=dmirror_pb2.DMIRROR_WRITE, addr=buf, npages=1,
                                           data=bytes(P))
        async with insecure_channel(dm.address) as ch:
            stub = dmirror_pb2_grpc.DmirrorStub(ch)
            for offered in OFFERED.values():
                md = () if offered is None else ((AUTHORIZATION_METADATA_KEY, offered),)
                for call in (stub.Command(write, metadata=md), stub.Events(dmirror_pb2.EventsRequest(
                        file_id=file_id), metadata=md), stub.Devices(common_pb2.Empty(), metadata=md)):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await asyncio.wait_for(call, TIMEOUT_S)
                    assert_unauthenticated(info.value)
        assert await proc.read(buf, N * P) == pattern()  # no refused WRITE got through
        assert (await admin.stats()).device("ntok0").alive
    finally:
        stop(dm)
    assert "refused a call to /hmm.v1.Dmirror/Devices without a valid token" in dm.log_text()
    assert TOKEN not in dm.log_text()


async def test_node_device_takes_tls_from_the_environment_and_checks_the_server_name(
        tlsd: Program, pki: Pki, tmp_path: Path) -> None:
    """HMM_TLS_* to reach hmmd (the name checked: HMM_TLS_SERVER_NAME, not the address's
    host) and HMM_LISTEN_TLS_* to serve its commands, as the flags do."""
    env = {"HMM_TLS_CA": pki.ca, "HMM_TLS_SERVER_NAME": "localhost", "HMM_AUTH_TOKEN_FILE": token_file(tmp_path),
           "HMM_LISTEN_TLS_CERT": pki.server_cert, "HMM_LISTEN_TLS_KEY": pki.server_key}
    dm = start_node_dmirror(tmp_path, tlsd.address, "nenv0", name="node-tls-env", env=env)
    cpu = ProcessClient.connect(tlsd.address, pki.credentials(token=TOKEN))
    client = DmirrorClient(dm.address, pki.credentials(token=TOKEN))
    try:
        proc = await cpu.spawn("node-tls-env")
        buf = await proc.mmap(N * P)
        await proc.write(buf, pattern())
        _, file_id = await proc.open("/dev/nenv0")
        assert (await client.command(file_id, CMD_READ, buf, N)).data == pattern()
    finally:
        await client.close()
        await cpu.close()
        stop(dm)
    # A name the daemon's certificate does not hold: the handshake fails, though the
    # address (127.0.0.1) is one it holds.
    r = subprocess.run([node_executable(), str(NODE_MAIN), "--kernel", tlsd.address, "--listen", "127.0.0.1:0",
                        "--device", "nenv1"], capture_output=True, text=True, timeout=TIMEOUT_S,
                       env={**os.environ, **env, "HMM_TLS_SERVER_NAME": "not-hmmd.example"})
    assert r.returncode == 1 and f"cannot connect to {tlsd.address}" in r.stderr, r.stderr
    assert "not-hmmd.example" in r.stderr


async def test_node_device_presents_a_client_certificate_and_refuses_bad_settings_in_one_line(
        mtlsd: Program, pki: Pki, tmp_path: Path) -> None:
    dm = start_node_dmirror(tmp_path, mtlsd.address, "nmtls0", name="node-mtls", args=(
        "--tls-ca", pki.ca, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key))
    try:
        async with ProcessClient.connect(mtlsd.address, pki.credentials(client="ours")) as cpu:
            proc = await cpu.spawn()
            buf = await proc.mmap(N * P)
            await proc.write(buf, pattern())
            _, file_id = await proc.open("/dev/nmtls0")
            client = DmirrorClient(dm.address, Credentials())
            assert (await client.command(file_id, CMD_READ, buf, N)).data == pattern()
            await client.close()
    finally:
        stop(dm)
    node = [node_executable(), str(NODE_MAIN), "--kernel", mtlsd.address, "--listen", "127.0.0.1:0"]
    empty, accented = tmp_path / "empty", tmp_path / "accented"
    empty.write_text("\n")
    accented.write_bytes("tok\u00e9n\n".encode())  # the Python device and hmmd refuse it too
    for args, message in ((("--tls-cert", pki.client_cert), "--tls-cert and --tls-key go together"),
                          (("--tls-ca", pki.client_key), f"the TLS CA {pki.client_key}: no PEM certificate"),
                          (("--listen-tls-cert", pki.server_key, "--listen-tls-key", pki.server_cert),
                           "not a PEM certificate chain and its key"),
                          (("--auth-token-file", str(tmp_path / "missing")), "--auth-token-file: cannot read"),
                          (("--auth-token-file", str(empty)), "the auth token is empty"),
                          (("--auth-token-file", str(accented)), "the auth token must be printable ASCII")):
        r = subprocess.run([*node, *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1, (args, r.stderr)


async def test_node_device_says_what_to_do_when_it_cannot_get_through(authd: Program, tlsd: Program,
                                                                     mtlsd: Program, pki: Pki,
                                                                     tmp_path: Path) -> None:
    """Each way of not reaching hmmd is one line ending with the Python SDK's hint for
    it; no Node warning about naming a TLS server by its IP (grpc-js does, and the
    certificate is still checked against that IP)."""
    tok = token_file(tmp_path)
    cases = [
        ([authd.address], "(give the server's token: --auth-token-file or HMM_AUTH_TOKEN_FILE)"),
        ([tlsd.address, "--auth-token-file", tok], CLOSED_HINT),
        ([authd.address, "--auth-token-file", tok, "--tls-ca", pki.ca],
         "(the server does not serve TLS: no --tls-ca / HMM_TLS_CA)"),
        ([tlsd.address, "--auth-token-file", tok, "--tls-ca", pki.other_ca],
         "(the server's certificate does not chain to the CA given (--tls-ca / HMM_TLS_CA))"),
        ([tlsd.address, "--auth-token-file", tok, "--tls-ca", pki.ca, "--tls-server-name", "not-hmmd.example"],
         "(the server's certificate is not for that host name: connect by its name, or --tls-server-name)"),
        ([mtlsd.address, "--tls-ca", pki.ca], CLOSED_HINT),
    ]
    for (kernel, *args), hint in cases:
        r = subprocess.run([node_executable(), str(NODE_MAIN), "--kernel", kernel, "--listen", "127.0.0.1:0",
                            "--device", "nhint0", *args], capture_output=True, text=True, timeout=TIMEOUT_S)
        assert r.returncode == 1 and r.stderr.startswith(f"hmm-dmirror: cannot connect to {kernel}: "), r.stderr
        assert r.stderr.endswith(hint + "\n") and len(r.stderr.splitlines()) == 1, (args, r.stderr)
    async with ProcessClient.connect(authd.address, Credentials(token=TOKEN)) as cpu:  # refused: nothing left
        assert "nhint0" not in [d.name for d in (await AdminClient(cpu.channel).stats()).devices]
