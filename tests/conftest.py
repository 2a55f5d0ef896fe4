"""Fixtures shared by the end-to-end tests: a daemon per test module, device
programs per test, all real OS processes on 127.0.0.1."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from hmm.process import ProcessClient
from tests.procs import Program, start_dmirror, start_hmmd, stop_all

_names = itertools.count()

# The daemon's settings for tests: short callback deadline and keepalive so that
# fencing tests finish quickly.
HMMD_ARGS = ("--callback-deadline-ms", "1500", "--keepalive-ms", "1000", "--ram", "2G")


@pytest.fixture(scope="module", autouse=True)
def _no_program_outlives_its_module() -> Iterator[None]:
    """A test that fails before its own cleanup must not leave a daemon or a device
    running (and loading the machine) for the rest of the run."""
    yield
    stop_all()


@pytest.fixture(scope="module")
def hmmd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Program]:
    prog = start_hmmd(tmp_path_factory.mktemp("hmmd"), *HMMD_ARGS)
    yield prog
    code = prog.stop()
    assert code == 0, f"hmmd exited with {code}:\n{prog.log_text()}"


@pytest.fixture
def dmirror_factory(hmmd: Program, tmp_path: Path) -> Iterator[Callable[..., tuple[Program, list[str]]]]:
    """Start a dmirror program with fresh device names; returns (program, names)."""
    started: list[Program] = []

    def make(ndevices: int = 1, *args: str) -> tuple[Program, list[str]]:
        n = next(_names)
        names = [f"dm{n}_{i}" for i in range(ndevices)]
        prog = start_dmirror(tmp_path, hmmd.address, *names, args=("--snoop", *args), name=f"dmirror{n}")
        started.append(prog)
        return prog, names

    yield make
    for prog in started:
        prog.stop()


@pytest.fixture
async def cpu(hmmd: Program) -> AsyncIterator[ProcessClient]:
    client = ProcessClient.connect(hmmd.address)
    yield client
    await client.close()
