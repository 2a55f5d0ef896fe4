"""glibc malloc settings for a process that moves multi-MiB messages.

With glibc's defaults a block above the mmap threshold (128 KiB, adapting up to 32
MiB) is a fresh ``mmap`` and freed memory beyond the trim threshold at the top of a
heap goes back to the kernel, so the buffers of every multi-MiB gRPC message (the
bytes object, protobuf's copy, gRPC's own) are new pages, page-faulted as they are
filled: on the VMs we measure on that costs more than the copy itself (bench/README.md,
"Where the time goes"). Raising both thresholds lets freed buffers be reused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt() parameters (<malloc.h>).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

# What hmmd and the SDK's device programs keep by default, in MiB: above the largest
# message (64 MiB) with its copies in flight.
DEFAULT_KEEP_MIB = 256
# Threads' arenas each keep their own free memory: few arenas bound what is kept.
ARENA_MAX = 2
# A device program's setting (tune_malloc() without an argument); 0: glibc's defaults.
KEEP_ENV = "HMM_MALLOC_KEEP_MIB"


def tune_malloc(keep_mib: int | None = None) -> bool:
    """Serve blocks up to ``keep_mib`` MiB from the heap, and keep up to as much freed
    memory per arena (at most ARENA_MAX arenas) instead of returning it to the
    kernel. None: $HMM_MALLOC_KEEP_MIB, else DEFAULT_KEEP_MIB. Call it early, before
    the big allocations. False (nothing changed) for 0, or without glibc."""
    if keep_mib is None:
        keep_mib = int(os.environ.get(KEEP_ENV, DEFAULT_KEEP_MIB))
    if keep_mib <= 0:
        return False
    keep_bytes = keep_mib << 20
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("no glibc mallopt(): malloc left as it is")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    value = min(keep_bytes, (1 << 31) - 1)
    ok = all(mallopt(param, v) == 1 for param, v in ((M_MMAP_THRESHOLD, value), (M_TRIM_THRESHOLD, value),
                                                     (M_ARENA_MAX, ARENA_MAX)))
    if not ok:
        log.warning("mallopt() refused a setting (keep %d MiB): malloc partly tuned", keep_mib)
    return ok
