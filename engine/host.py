"""The host process: torch's CPU threads, and what glibc's malloc does with the memory torch frees.

Every CPU tensor is a ``malloc``. By default glibc serves a block above its mmap threshold (128 KiB, raised
as such blocks are freed, at most 32 MiB) with a fresh ``mmap`` and unmaps it on free, and it trims the heap's
free top back to the kernel. The next tensor of that size then takes a page fault for every 4 KiB it
touches. A decode step gathers each share group's K/V out of the pool (about 3 MB per layer for the tiny
preset's 64 rows), so a rollout pays those faults at every step of every layer. With a fixed threshold above
such tensors and a high trim threshold, freed blocks stay in the heap and are reused.

Measured on a 2-core AMD EPYC (one sequential ``generate`` of 8 prompts x 8 samples, 448 tokens, the tiny
preset's stage-1 model, processes alternating; docs/results.md): 4.4-6.2 s by default, 3.7-4.2 s with
:func:`configure_host`. The heap then keeps up to :data:`TRIM_THRESHOLD` of freed memory mapped.

glibc only: elsewhere (macOS, musl) :func:`retain_freed_memory` does nothing and says so. A user who set
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` keeps their own settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20  # blocks above this still get their own mapping (a model's weights, say)
TRIM_THRESHOLD = 1 << 30  # free heap memory kept before the heap is trimmed
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_applied: tuple[bool, str] | None = None


def retain_freed_memory() -> tuple[bool, str]:
    """Raise glibc's mmap and trim thresholds once per process; ``(applied, why)``. Safe to call again."""
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
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:  # musl has no mallopt
        _applied = (False, f"no mallopt in the C library ({e})")
        return _applied
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _applied = (ok, "mmap threshold 256 MiB, trim threshold 1 GiB" if ok else "mallopt refused the thresholds")
    return _applied


def configure_host(threads: int | None = None, retain_memory: bool = True) -> None:
    """Set torch's intra-op CPU threads (``None``: leave them) and, with ``retain_memory``, keep freed host
    memory in the heap (:func:`retain_freed_memory`). Every entry point of the project calls this."""
    if threads:
        torch.set_num_threads(threads)
    if retain_memory:
        retain_freed_memory()
