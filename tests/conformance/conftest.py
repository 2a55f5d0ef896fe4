"""The harness of the kernel's hmm-tests.c (HMM-SELFTESTS.md 2.1), over gRPC.

* ``hmm``: one handle, opened on the variant's first device ("private": device 0).
* ``hmm2``: two handles, ``fd0`` and ``fd1``, on the variant's two devices
  ("private": devices 0 and 1).

Each test gets a fresh emulated process (the kernel test's own process) that opens
the handles; teardown closes every handle and asserts that close succeeded (close
evicts the whole device, HMM-SELFTESTS.md 1.3), then ends the process.

Where the daemon and the device come from:

* ``HMM_KERNEL``: address of a running hmmd. Unset: one hmmd per test module.
* ``HMM_DEVICE``: address of a running dmirror command service attached to that
  hmmd (needs ``HMM_KERNEL``). Unset: one ``hmm-dmirror`` per test module.
* ``HMM_DEVICE_NAMES``: its device names, comma-separated, device 0 first
  (default ``hmm_dmirror0,hmm_dmirror1,hmm_dmirror2,hmm_dmirror3``: devices 0 and 1
  device-private, 2 and 3 device-coherent). A device with only two names runs the
  coherent variant as the kernel does without coherent devices: skipped.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest

from hmm.abi import PAGE_SIZE
from hmm.dmirror.client import DmirrorClient
from hmm.dmirror.device import CMD_FLAGS, CMD_WRITE
from hmm.errors import KernelError
from hmm.process import Proc, ProcessClient
from tests.procs import Program, start_dmirror, start_hmmd

KERNEL_ENV = "HMM_KERNEL"
DEVICE_ENV = "HMM_DEVICE"
DEVICE_NAMES_ENV = "HMM_DEVICE_NAMES"
DEFAULT_DEVICE_NAMES = ("hmm_dmirror0", "hmm_dmirror1", "hmm_dmirror2", "hmm_dmirror3")
COHERENT_DEVICES = (2, 3)  # started with device-coherent memory

# Variant -> the device numbers of the kernel's FIXTURE_VARIANT_ADD: ``hmm`` opens the
# first, ``hmm2`` both.
VARIANTS: dict[str, tuple[int, int]] = {
    "private": (0, 1),
    "coherent": COHERENT_DEVICES,
}

# The daemon's settings when the suite starts its own.
HMMD_ARGS = ("--ram", "2G")


@dataclass(frozen=True)
class Service:
    kernel: str  # hmmd's address
    device: str  # the dmirror command service's address
    names: tuple[str, ...]  # device number -> device name


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    kernel = os.environ.get(KERNEL_ENV, "")
    device = os.environ.get(DEVICE_ENV, "")
    names = tuple(n.strip() for n in os.environ.get(DEVICE_NAMES_ENV, "").split(",") if n.strip())
    names = names or DEFAULT_DEVICE_NAMES
    if device and not kernel:
        pytest.fail(f"{DEVICE_ENV} is set but {KERNEL_ENV} is not: the device's hmmd must be named too")
    started: list[Program] = []
    try:
        if not kernel:
            started.append(start_hmmd(tmp_path_factory.mktemp("hmmd"), *HMMD_ARGS))
            kernel = started[-1].address
        if not device:
            specs = [f"{n}:coherent" if i in COHERENT_DEVICES else n for i, n in enumerate(names)]
            started.append(start_dmirror(tmp_path_factory.mktemp("dmirror"), kernel, *specs))
            device = started[-1].address
        yield Service(kernel, device, names)
    finally:
        codes = [(prog, prog.stop()) for prog in reversed(started)]  # the device first
    for prog, code in codes:
        assert code == 0, f"{prog.name} exited with {code}:\n{prog.log_text()}"


# ---- the selftest's hmm_buffer and hmm_dmirror_cmd ----------------------------------------------


@dataclass
class HmmBuffer:
    """struct hmm_buffer: ``ptr`` in the emulated process, ``mirror`` here."""

    ptr: int
    size: int
    mirror: np.ndarray  # uint8
    fd: int = -1
    cpages: int = 0
    faults: int = 0

    @classmethod
    def new(cls, size: int, mirror_size: int | None = None) -> HmmBuffer:
        return cls(0, size, np.zeros(size if mirror_size is None else mirror_size, dtype=np.uint8))

    @property
    def mirror_ints(self) -> np.ndarray:
        """The mirror seen as int32, writable in place (``ptr = buffer->mirror``)."""
        return self.mirror.view(np.int32)


@dataclass(frozen=True)
class Handle:
    """One open of a device: the fd in the opening process, and the file id that the
    command service knows it by."""

    proc: Proc
    fd: int
    file_id: int


@dataclass
class Fixture:
    """FIXTURE(hmm) / FIXTURE(hmm2): the test process and its handles."""

    variant: str
    cpu: ProcessClient
    dm: DmirrorClient
    service: Service
    proc: Proc
    handles: list[Handle] = field(default_factory=list)
    page_size: int = PAGE_SIZE

    @property
    def fd(self) -> Handle:
        return self.handles[0]

    @property
    def fd0(self) -> Handle:
        return self.handles[0]

    @property
    def fd1(self) -> Handle:
        return self.handles[1]

    def device_name(self, number: int) -> str:
        if number >= len(self.service.names):
            # The kernel's setup: a coherent variant without coherent devices skips.
            pytest.skip(f"DEVICE_COHERENT not available: the device serves no device {number}")
        return self.service.names[number]

    async def hmm_open(self, proc: Proc, number: int) -> Handle:
        """hmm_open(unit): open /dev/<device number> in ``proc``."""
        fd, file_id = await proc.open(f"/dev/{self.device_name(number)}")
        return Handle(proc, fd, file_id)

    async def hmm_dmirror_cmd(self, handle: Handle, cmd: int, buffer: HmmBuffer, npages: int) -> int | str:
        """Run a command with addr = buffer.ptr, ptr = buffer.mirror. Success: the
        counters and any data are written back, returns 0. Failure: returns the errno
        name and leaves the buffer as it was."""
        data = b""
        if cmd == CMD_WRITE:
            data = buffer.mirror[: npages * PAGE_SIZE].tobytes()
        try:
            r = await self.dm.command(handle.file_id, cmd, buffer.ptr, npages, data)
        except KernelError as e:
            return e.name
        buffer.cpages, buffer.faults = r.cpages, r.faults
        if r.data and cmd != CMD_FLAGS:
            buffer.mirror[: len(r.data)] = np.frombuffer(r.data, dtype=np.uint8)
        return 0


@asynccontextmanager
async def _fixture(variant: str, service: Service, nhandles: int, name: str) -> AsyncIterator[Fixture]:
    cpu = ProcessClient.connect(service.kernel)
    dm = DmirrorClient(service.device)
    try:
        proc = await cpu.spawn(name)
        fx = Fixture(variant, cpu, dm, service, proc)
        for number in VARIANTS[variant][:nhandles]:
            fx.handles.append(await fx.hmm_open(proc, number))
        yield fx
        # FIXTURE_TEARDOWN: close must succeed.
        for h in fx.handles:
            await h.proc.close(h.fd)
        await proc.exit()
    finally:
        await dm.close()
        await cpu.close()


@pytest.fixture(params=list(VARIANTS))
async def hmm(request: pytest.FixtureRequest, service: Service) -> AsyncIterator[Fixture]:
    async with _fixture(request.param, service, 1, request.node.originalname) as fx:
        yield fx


@pytest.fixture(params=list(VARIANTS))
async def hmm2(request: pytest.FixtureRequest, service: Service) -> AsyncIterator[Fixture]:
    async with _fixture(request.param, service, 2, request.node.originalname) as fx:
        yield fx
