"""Shared test setup: one torch thread (tiny models run faster that way on 2 cores), the shared data dir."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
BENCHMARKS = SHARED / "benchmarks"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def benchmarks_dir() -> Path:
    if not BENCHMARKS.exists():
        pytest.skip(f"{BENCHMARKS} is absent (the public benchmark files live beside the checkout)")
    return BENCHMARKS
