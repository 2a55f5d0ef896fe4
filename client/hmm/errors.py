"""The one exception type of hmmd: a Linux errno with a readable message.

The daemon's core raises it, the rpc layer turns it into a gRPC status carrying the
errno name, and the client SDK raises it again from that status, so a caller on
either side of the wire catches the same thing.
"""

from __future__ import annotations

import errno as _errno


class KernelError(OSError):
    """An operation failed with a kernel errno (``.errno``) and a message (``.strerror``)."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(err, message or _errno.errorcode.get(err, str(err)))

    @property
    def name(self) -> str:
        """The errno's symbolic name, e.g. ``"EFAULT"``."""
        return errno_name(self.errno or 0)


# Where Python's errorcode picks an alias, the name the kernel headers use.
_CANONICAL = {_errno.EOPNOTSUPP: "EOPNOTSUPP", _errno.EDEADLK: "EDEADLK"}


def errno_name(err: int) -> str:
    return _CANONICAL.get(err) or _errno.errorcode.get(err, f"E{err}")


def errno_value(name: str) -> int:
    """The number of an errno name; KeyError if the name is not a Linux errno."""
    return int(getattr(_errno, name))
