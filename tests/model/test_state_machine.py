"""Model-based tests: hypothesis drives random system calls, CPU accesses and
dmirror commands on two devices, and every result — bytes read by the CPU and by
the devices, the errno of every failing call, page counts, snapshots — is judged
by the reference model in ``tests/model/model.py``.

Two flavours of the same machine (``tests/model/machine.py``):

* ``test_core``: the core (``hmmd.core.kernel.Kernel``) in this process, with
  hmm-dmirror's driver attached directly (``tests/model/local.py``); many
  examples, and ``check_invariants`` plus the DMA sanitizer after every step.
* ``test_daemon``: a real hmmd and a real hmm-dmirror program over gRPC; few
  examples, the sanitizer and the daemon's CheckInvariants after every step.

Both are derandomized (the same examples on every run) and bounded in time.
``HMM_MODEL_NO_SHRINK=1`` reports the first failure as found, without shrinking
(minutes faster while debugging). ``HMM_MODEL_HUNT=N`` hunts instead: N random
examples per test (test_core's 100 steps long), failures printed with the
``@reproduce_failure`` blob that replays them (apply it to the machine class).
Known differences from Linux that the machine steers around are the strict xfails of
``test_regressions.py``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.procs import Program

from .machine import machine_class, report
from .sut import CoreSut, DaemonSut, Sut

NDEVICES = 2
BASE = settings(derandomize=True, deadline=None, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
if os.environ.get("HMM_MODEL_NO_SHRINK"):  # report the first failure as found, fast
    BASE = settings(BASE, phases=[Phase.explicit, Phase.generate])
HUNT = int(os.environ.get("HMM_MODEL_HUNT", "0"))
if HUNT:
    BASE = settings(BASE, derandomize=False, print_blob=True)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_core(loop: asyncio.AbstractEventLoop) -> None:
    async def make() -> Sut:
        return CoreSut(NDEVICES)

    machine = machine_class(make, loop, step_timeout_s=30.0)
    run_state_machine_as_test(machine, settings=settings(BASE, max_examples=HUNT or 100,
                                                         stateful_step_count=100 if HUNT else 40))
    print(report(machine))


def test_daemon(loop: asyncio.AbstractEventLoop, hmmd: Program, dmirror_factory) -> None:  # type: ignore[no-untyped-def]
    prog, names = dmirror_factory(NDEVICES)

    async def make() -> Sut:
        return DaemonSut(hmmd.address, prog.address, names)

    machine = machine_class(make, loop, step_timeout_s=30.0)
    run_state_machine_as_test(machine, settings=settings(BASE, max_examples=HUNT or 10, stateful_step_count=30))
    print(report(machine))
