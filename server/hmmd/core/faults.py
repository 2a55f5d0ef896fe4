"""Fault injection: make one device misbehave on purpose, to test what depends on it.

Each device carries a ``DeviceFaults`` plan, set at connect from the daemon's
``--inject-faults`` setting or at any time by ``hmm.v1.Admin/InjectFaults``:

* ``ack_delay_ms``: every ack the device sends is held this long before the daemon
  sees it (a slow device; past the callback deadline it is fenced);
* ``drop_acks``: the next N acks are lost (the device then misses its deadline);
* ``stream_delay_ms``: every callback waits this long before it is sent (a slow
  link; the deadline counts from before the wait);
* ``fail_alloc``: the next N MigratePages calls fail with ENOMEM before changing
  anything (a destination allocation that failed);
* ``fail_dma``: the next N DmaRead/DmaWrite calls fail with EIO (a failed copy).

Disconnecting a device is an action, not a plan: Admin/InjectFaults with
``disconnect`` fences it at once, as a cut link would.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, fields

from hmm.errors import KernelError


@dataclass
class DeviceFaults:
    ack_delay_ms: int = 0
    drop_acks: int = 0
    stream_delay_ms: int = 0
    fail_alloc: int = 0
    fail_dma: int = 0

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def take(self, name: str) -> bool:
        """Consume one of a counted fault (drop_acks, fail_alloc, fail_dma)."""
        left = getattr(self, name)
        if left <= 0:
            return False
        setattr(self, name, left - 1)
        return True

    def update(self, **values: int) -> None:
        """Set some fields; EINVAL for an unknown name or a negative value."""
        names = {f.name for f in fields(self)}
        for name, value in values.items():
            if name not in names:
                raise KernelError(errno.EINVAL, f"unknown fault {name!r} (known: {', '.join(sorted(names))})")
            if value < 0:
                raise KernelError(errno.EINVAL, f"fault {name} must be >= 0")
        for name, value in values.items():
            setattr(self, name, value)


def parse_fault_spec(spec: str) -> dict[str, dict[str, int]]:
    """``"dev0:ack_delay_ms=50,drop_acks=1;dev1:fail_dma=2"`` -> per device name, the
    fields to set. ValueError with a readable message for anything malformed."""
    out: dict[str, dict[str, int]] = {}
    known = {f.name for f in fields(DeviceFaults)}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, sep, body = part.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"fault spec {part!r}: expected DEVICE:NAME=VALUE[,NAME=VALUE...]")
        values: dict[str, int] = {}
        for item in filter(None, (i.strip() for i in body.split(","))):
            key, eq, value = item.partition("=")
            if not eq or key.strip() not in known or not value.strip().isdigit():
                raise ValueError(f"fault spec {item!r}: expected NAME=COUNT with NAME one of {sorted(known)}")
            values[key.strip()] = int(value)
        out[name.strip()] = values
    return out
