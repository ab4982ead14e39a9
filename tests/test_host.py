"""engine.host: in a decoding process freed host memory stays in the heap (glibc); a user's own malloc settings win."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Allocate and free a 40 MB tensor (over glibc's largest dynamic mmap threshold, 32 MiB) 20 times, touching every
# page; print the minor page faults the loop took.
FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from engine.host import retain_freed_memory
    torch.set_num_threads(1)
    if sys.argv[1] == "retain":
        retain_freed_memory()
    x = torch.empty(10 << 20).fill_(1); del x
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        x = torch.empty(10 << 20).fill_(1); del x
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0, *retain_freed_memory())
""")


def _run(arg: str, env: dict | None = None) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    out = subprocess.run([sys.executable, "-c", FAULTS, arg], capture_output=True, text=True, env=env, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_tensors_are_reused_without_faulting_their_pages_in_again():
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages always on: a fresh mapping faults once per 2 MiB, not per page")
    default = int(_run("default")[0])
    retained, applied = _run("retain")[:2]
    if applied != "True":
        pytest.skip("this C library has no mallopt thresholds (not glibc)")
    pages = (40 << 20) // 4096
    assert default >= 10 * pages  # each allocation mapped afresh: every page faults again
    assert int(retained) <= 2 * pages  # reused from the heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_users_own_malloc_setting_is_left_alone():
    out = _run("retain", {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert out[1] == "False" and "MALLOC_TRIM_THRESHOLD_" in " ".join(out[2:])
