"""Host memory: what glibc's malloc does with the memory torch frees, in a process that only decodes.

Every CPU tensor is a ``malloc``. glibc serves a block above its mmap threshold with a fresh ``mmap`` and unmaps
it on free. The threshold starts at 128 KiB and rises to the size of each such block freed (at most 32 MiB), and
the heap's free top is trimmed back to the kernel above twice that. A decode step gathered each share group's K/V
out of the pool into a fresh tensor, ~3 MB per layer for the tiny preset's 64 rows and more as contexts grow, so
in a process that does nothing else the threshold trailed the gathers: they were mapped or trimmed and faulted
every page in again. The runner now gathers into two reused buffers (``ModelRunner._gather``), which removes the
largest such tensors at the source; the other per-step temporaries (scores, activations) are smaller.
:func:`retain_freed_memory` fixes the thresholds above such tensors, so freed blocks stay in the heap for reuse.

Measured on a 2-core AMD EPYC, 2 threads, processes alternating (docs/results.md, "Host memory"):
``benchmarks.error_kinds`` on 512 problems took 36.3 / 32.0 s with 2.5M minor page faults by default and
27.5 / 28.5 s with 0.21M (before the reused gather buffers; with them, one sequential ``generate`` of seed 0's
stage 1, 64 rows, took 1.71-1.91 s by default and 1.69 s with the thresholds). The processes that only decode
call it: ``npr rollout``, ``npr eval``, ``benchmarks.error_kinds`` and ``benchmarks.engine_speed`` (both of its
arms, the engine and HF ``generate``).

The trainer does not. Its updates free larger tensors, which lift glibc's own threshold early: a stage-3 step
took ~40k faults by default (about 1% of its time), and four paired 20-step stage-3 runs gave rollouts of
44-62 s either way, three of four pairs slower with the fixed thresholds.

glibc only: elsewhere (macOS, musl) it does nothing and says why. A user who set ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` keeps their own settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20  # blocks above this still get their own mapping (a model's weights, say)
TRIM_THRESHOLD = 1 << 30  # free heap memory kept before the heap is trimmed
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_applied: tuple[bool, str] | None = None


def retain_freed_memory() -> tuple[bool, str]:
    """Fix glibc's mmap and trim thresholds, once per process; returns ``(applied, why)``."""
    global _applied
    if _applied is not None:
        return _applied
    if not sys.platform.startswith("linux"):
        _applied = (False, f"not glibc ({sys.platform})")
        return _applied
    user = [name for name in _USER_SETTINGS if name in os.environ]
    if user:
        _applied = (False, f"left to the environment ({', '.join(user)})")
        return _applied
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError) as e:  # no C library found, or one without mallopt
        _applied = (False, f"no mallopt in the C library ({e})")
        return _applied
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _applied = (ok, "mmap threshold 256 MiB, trim threshold 1 GiB" if ok else "mallopt refused the thresholds")
    return _applied
