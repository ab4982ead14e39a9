"""npr_agent: learning. Pluggable RL algorithms and the training forward under the parallel layout."""

from .algorithms import ALGORITHMS, Algorithm, AlgorithmConfig, RolloutInfo, make_algorithm, make_config
from .policy import Sample, TokenBatch, build_batch, sft_loss, token_logprobs

__all__ = [
    "ALGORITHMS", "Algorithm", "AlgorithmConfig", "RolloutInfo", "Sample", "TokenBatch", "build_batch",
    "make_algorithm", "make_config", "sft_loss", "token_logprobs",
]
