"""Start hmmd and device programs as real OS processes for end-to-end tests.

Each program prints "<name> listening on HOST:PORT" as its first stdout line;
stderr goes to a log file that is shown when a test fails.
"""

from __future__ import annotations

import atexit
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_S = 30
NODE_DIR = Path(__file__).resolve().parents[1] / "client" / "node"
NODE_MAIN = NODE_DIR / "bin" / "hmm-dmirror.js"


@dataclass
class Program:
    name: str
    proc: subprocess.Popen[str]
    address: str
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.terminate()
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def wait_line(self, text: str, timeout: float = 10.0) -> str:
        """Read stdout until a line containing ``text`` (RuntimeError on timeout or exit)."""
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if sel.select(timeout=0.05):
                    line = self.proc.stdout.readline()
                    if text in line:
                        return line
                    if not line:
                        break
        finally:
            sel.close()
        raise RuntimeError(f"{self.name} never printed {text!r}:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log.read_text()[-20000:]
        except OSError:
            return ""


def start(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Program:
    log = log_dir / f"{name}.log"
    proc_env = dict(os.environ)
    proc_env.update(env or {})
    with open(log, "w") as errf:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errf, text=True, env=proc_env)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT_S
    line = ""
    while time.monotonic() < deadline:
        if sel.select(timeout=0.1):
            line = proc.stdout.readline()
            break
        if proc.poll() is not None:
            break
    sel.close()
    if " listening on " not in line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{name} did not start (exit {proc.returncode}): {line!r}\n{log.read_text()[-4000:]}")
    prog = Program(name, proc, line.rsplit(" ", 1)[-1].strip(), log)
    _started.append(prog)
    return prog


_started: list[Program] = []


def stop_all() -> None:
    """Stop every program a test started and left running (a test that failed before
    its own cleanup): the session's end, and the interpreter's, call this."""
    while _started:
        prog = _started.pop()
        if prog.proc.poll() is None:
            prog.stop()


atexit.register(stop_all)


def start_hmmd(log_dir: Path, *args: str, name: str = "hmmd") -> Program:
    return start(name, [sys.executable, "-m", "hmmd", "--listen", "127.0.0.1:0", *args], log_dir)


def start_dmirror(log_dir: Path, kernel: str, *devices: str, args: tuple[str, ...] = (),
                  name: str = "dmirror") -> Program:
    argv = [sys.executable, "-m", "hmm.dmirror", "--kernel", kernel, "--listen", "127.0.0.1:0"]
    for d in devices:
        argv += ["--device", d]
    return start(name, [*argv, *args], log_dir)


class NodeMissingError(RuntimeError):
    """Node.js or client/node's dependencies are not installed."""


def node_executable() -> str:
    """`node`, with client/node's dependencies installed; a clear failure otherwise."""
    node = shutil.which("node")
    if node is None:
        raise NodeMissingError("node is not on PATH: the Node.js device needs Node.js 20.15 or newer")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        raise NodeMissingError("client/node's dependencies are missing: run `npm ci --prefix client/node` "
                          "(the README's test command does)")
    return node


def start_node_dmirror(log_dir: Path, kernel: str, *devices: str, args: tuple[str, ...] = (),
                       name: str = "node-dmirror", env: dict[str, str] | None = None) -> Program:
    """The Node.js dmirror (client/node) serving ``devices``, as start_dmirror; ``env``
    adds to the environment."""
    argv = [node_executable(), str(NODE_MAIN), "--kernel", kernel, "--listen", "127.0.0.1:0"]
    for d in devices:
        argv += ["--device", d]
    return start(name, [*argv, *args], log_dir, env)
