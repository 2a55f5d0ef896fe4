"""Daemon configuration: embedded defaults, overridden by a TOML file (--config), then
HMMD_* variables, then flags."""

from __future__ import annotations

import argparse
import os
import re
import stat
import tomllib
from dataclasses import Field, dataclass, field, fields
from typing import Any

from hmm.abi import MIN_MESSAGE_BYTES
from hmm.security import check_server_tls, check_token, read_token
from hmmd.core.faults import parse_fault_spec

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4G', '512M', '1048576' -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]


MIN_RAM_BYTES = 256 << 10  # 64 pages: less could hardly hold a process and a migration
HUGE_PAGE_BYTES = 2 << 20
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A setting: its embedded default and the line ``hmmd --help`` gives it."""
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class Config:
    listen: str = _opt("127.0.0.1:50051", "address of the gRPC services: HOST:PORT (port 0: any) or unix:PATH")
    ram: str = _opt("4G", "system RAM; frames are backed lazily, so only used memory costs")
    coherent_memory: str = _opt("1G", "the physical window for the device-coherent memory devices declare")
    swap: str = _opt("1G", "swap space for reclaim and MADV_PAGEOUT, kept in the daemon's memory")
    oom_killer: str = _opt("on", "on: an allocation reclaim cannot make room for kills the process with the "
                                 "most memory, then goes on (the kernel's OOM killer); off: it fails with ENOMEM")
    hugetlb_pages: int = _opt(64, "the hugetlb pool (nr_hugepages), in 2 MiB pages carved from RAM on use; "
                                  "shrinks to fit RAM unless given")
    callback_deadline_ms: int = _opt(3000, "a device that leaves a callback unacked this long is fenced")
    page_lock_timeout_ms: int = _opt(5000, "a device's exclusive-page locks expire after this")
    migration_timeout_ms: int = _opt(30000, "an open migration (holding mmap locks) is rolled back after this")
    hello_timeout_ms: int = _opt(5000, "a Connect stream must send its Hello within this")
    # A device whose stream drops keeps its session this long, to resume it (Hello
    # resume_session) with its identity and memory.
    reconnect_grace_ms: int = _opt(0, "a device whose connection drops may resume its session within this; "
                                      "0: it is fenced at once")
    keepalive_ms: int = _opt(2000, "ping interval; a silent peer is dropped after as long again")
    max_message_bytes: int = _opt(64 << 20, "the largest gRPC message, either way (a device may ask for less)")
    max_pages_per_request: int = _opt(1 << 20, "the most pages one call may name")
    max_notifiers_per_device: int = _opt(4096, "interval notifiers one device may hold")
    max_requests_per_device: int = _opt(256, "unary Device calls one session may have in flight (EAGAIN beyond)")
    max_device_memory_pages: int = _opt(1 << 24, "device memory one device may declare at Hello, in pages "
                                                 "(ENOMEM beyond)")
    # Security (hmm.security): a token every call must carry, TLS, mutual TLS.
    auth_token_file: str = _opt("", "require the token in this file on every call (off when empty, and "
                                    "--auth-token too)")
    auth_token: str = _opt("", "the token itself, without a file (flags show in ps: prefer the file or the "
                               "environment)", repr=False)
    tls_cert: str = _opt("", "PEM certificate chain: serve TLS only")
    tls_key: str = _opt("", "its PEM private key")
    tls_client_ca: str = _opt("", "PEM CA: require client certificates signed by it (mutual TLS)")
    shm_max_bytes: int = _opt(256 << 20, "the largest shared-memory staging area granted to one device "
                                         "(capability shm; 0: not offered)")
    # For devices that cannot open /proc/<hmmd pid>/fd/N (another pid namespace:
    # containers sharing the socket's directory).
    shm_socket: str = _opt("", "a Unix socket handing staging areas (memfd, SCM_RIGHTS) to devices in other "
                               "pid namespaces; empty: none")
    # glibc malloc (hmm.malloc): message buffers are reused, not page-faulted anew.
    malloc_keep_mib: int = _opt(256, "blocks up to this many MiB come from malloc's heap and as much freed "
                                     "memory is kept; 0: glibc's defaults")
    trace_buffer: int = _opt(65536, "trace events kept for `hmmctl trace --out` and TraceBuffer; 0: none")
    inject_faults: str = _opt("", "faults injected into devices as they connect, for tests: "
                                  "DEVICE:NAME=COUNT[,NAME=COUNT...][;DEVICE:...]")
    metrics_listen: str = _opt("", "HOST:PORT serving Prometheus metrics at /metrics; empty: off")
    log_level: str = _opt("INFO", ", ".join(LOG_LEVELS))
    log_format: str = _opt("text", "text or json (one object per line)")

    @property
    def token(self) -> str:
        """The token every call must carry ("" when authentication is off): the one in
        auth_token_file, else auth_token."""
        if self.auth_token_file:
            return read_token(self.auth_token_file)
        return check_token(self.auth_token) if self.auth_token else ""

    @property
    def ram_bytes(self) -> int:
        return parse_size(self.ram)

    @property
    def coherent_bytes(self) -> int:
        return parse_size(self.coherent_memory)

    @property
    def swap_bytes(self) -> int:
        return parse_size(self.swap)

    @classmethod
    def from_env_and_args(cls, argv: list[str] | None = None, env: dict[str, str] | None = None) -> Config:
        env = dict(os.environ if env is None else env)
        cfg = cls()
        parser = argparse.ArgumentParser(prog="hmmd", description="the hmmd host kernel daemon")
        parser.add_argument("--config", metavar="FILE", default=None,
                            help="settings from this TOML file, named as the flags are (ram = \"8G\", "
                                 "callback-deadline-ms = 2000); variables and flags override it (env HMMD_CONFIG)")
        for f in fields(cls):
            # The embedded default is shown, not what the environment sets (a token...).
            parser.add_argument(
                "--" + f.name.replace("_", "-"), dest=f.name, default=None, type=_kind(f),
                help=f"{f.metadata['help']} (env HMMD_{f.name.upper()}; default {f.default!r})",
            )
        args = parser.parse_args(argv)
        path = args.config or env.get("HMMD_CONFIG")
        if path:
            for name, value in read_config_file(path).items():
                setattr(cfg, name, value)
        for f in fields(cls):
            var = "HMMD_" + f.name.upper()
            if var in env:
                try:
                    setattr(cfg, f.name, _kind(f)(env[var]))
                except ValueError:
                    raise ValueError(f"{var} must be an integer, not {env[var]!r}") from None
            value = getattr(args, f.name)
            if value is not None:
                setattr(cfg, f.name, value)
        parse_size(cfg.ram)  # validate early
        parse_size(cfg.coherent_memory)
        parse_size(cfg.swap)
        if cfg.oom_killer not in ("on", "off"):
            parser.error(f"--oom-killer is on or off, not {cfg.oom_killer!r}")
        try:
            parse_fault_spec(cfg.inject_faults)
        except ValueError as e:
            parser.error(str(e))
        check_server_tls(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        for name in ("auth_token_file", "tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(cfg, name)
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"--{name.replace('_', '-')}: cannot read {path}")
        _ = cfg.token  # validate: not empty, printable ASCII
        # A value that would only fail later, in every device's session, is refused now.
        for name in ("max_requests_per_device", "max_device_memory_pages", "callback_deadline_ms",
                     "page_lock_timeout_ms", "migration_timeout_ms", "hello_timeout_ms", "keepalive_ms",
                     "max_pages_per_request", "max_notifiers_per_device"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("reconnect_grace_ms", "hugetlb_pages", "shm_max_bytes", "malloc_keep_mib", "trace_buffer"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        if parse_size(cfg.ram) < MIN_RAM_BYTES:
            raise ValueError(f"--ram must be at least {MIN_RAM_BYTES >> 10} KiB")
        # The hugetlb pool is carved from RAM: the default shrinks to fit a small RAM (as
        # the kernel gives nr_hugepages what it can); asked for explicitly, it must fit.
        fits = parse_size(cfg.ram) // HUGE_PAGE_BYTES
        if cfg.hugetlb_pages > fits:
            if args.hugetlb_pages is not None:
                raise ValueError(f"--hugetlb-pages: {cfg.ram} of RAM holds {fits} huge pages at most")
            cfg.hugetlb_pages = fits
        if cfg.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if cfg.log_format not in ("text", "json"):
            raise ValueError("--log-format must be text or json")
        if cfg.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ValueError(f"--max-message-bytes must be at least {MIN_MESSAGE_BYTES}")
        if cfg.shm_socket:
            where = os.path.dirname(cfg.shm_socket) or "."
            if not os.path.isdir(where) or not os.access(where, os.W_OK):
                raise ValueError(f"--shm-socket: {where} is not a directory this process can write")
            if os.path.lexists(cfg.shm_socket) and not stat.S_ISSOCK(os.lstat(cfg.shm_socket).st_mode):
                raise ValueError(f"--shm-socket: {cfg.shm_socket} exists and is not a socket")
        return cfg


def _kind(f: Field[Any]) -> type[int] | type[str]:
    """A setting's type: its default's (every setting has one)."""
    return type(f.default)  # type: ignore[return-value]


def read_config_file(path: str) -> dict[str, str | int]:
    """The settings of a TOML file: top-level keys named as the flags are (dashes or
    underscores), each of its setting's type (a size may be an integer of bytes).
    ValueError, naming the file, for anything else."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"--config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: {e}") from None
    known = {f.name: _kind(f) for f in fields(Config)}
    out: dict[str, str | int] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        want = known.get(name)
        if want is None:
            raise ValueError(f"--config {path}: unknown setting {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, str) if want is str else int):
            raise ValueError(f"--config {path}: {key} must be {'a string' if want is str else 'an integer'}")
        out[name] = want(value)
    return out
