"""NPR Engine: batched native-parallel rollouts (fork shares the KV, join recomputes nothing, logprobs exact)."""

from .forcing import TrajectoryForcer
from .kv_cache import BlockPool, BlockTable, KVCacheError, PoolExhausted
from .npr_engine import NPREngine
from .rollout import Rollout
from .runner import ModelRunner
from .sampling import SamplingParams

__all__ = [
    "BlockPool", "BlockTable", "KVCacheError", "ModelRunner", "NPREngine", "PoolExhausted", "Rollout",
    "SamplingParams", "TrajectoryForcer",
]
