"""RL algorithms: one file each, registered here by name.

Adding one: write ``npr_agent/algorithms/myalgo.py`` with a ``MyAlgoConfig(AlgorithmConfig)`` dataclass and a
``MyAlgo(Algorithm)`` class (``config_class = MyAlgoConfig``; override ``advantages`` and ``policy_terms``),
then add ``"myalgo": MyAlgo`` to :data:`ALGORITHMS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from .base import (
    Algorithm,
    AlgorithmConfig,
    Prepared,
    RolloutInfo,
    clipped_terms,
    group_stats,
    merge_metrics,
    on_policy_terms,
)
from .dapo import DAPO, DAPOConfig
from .grpo import GRPO, GRPOConfig
from .papo import PAPO, PAPOConfig
from .reinforce import Reinforce, ReinforceConfig

ALGORITHMS: dict[str, type[Algorithm]] = {
    "papo": PAPO,
    "grpo": GRPO,
    "dapo": DAPO,
    "reinforce": Reinforce,
}


def make_config(name: str, overrides: Mapping | None = None, **kw) -> AlgorithmConfig:
    """The config dataclass of algorithm ``name`` with fields overridden (unknown fields are an error)."""
    cls = _lookup(name).config_class
    values = {**(overrides or {}), **kw}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(known)}")
    return cls(**values)


def make_algorithm(name: str, config: AlgorithmConfig | Mapping | None = None, **overrides) -> Algorithm:
    """An algorithm by registry name, from a config object, a mapping (e.g. a TOML table) and/or overrides."""
    cls = _lookup(name)
    if isinstance(config, AlgorithmConfig):
        if not isinstance(config, cls.config_class):
            raise TypeError(f"{name} needs a {cls.config_class.__name__}, got {type(config).__name__}")
        config = dataclasses.replace(config, **overrides) if overrides else config
    else:
        config = make_config(name, config, **overrides)
    return cls(config)


def _lookup(name: str) -> type[Algorithm]:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; registered: {sorted(ALGORITHMS)}") from None


__all__ = [
    "ALGORITHMS", "DAPO", "GRPO", "PAPO", "Algorithm", "AlgorithmConfig", "DAPOConfig", "GRPOConfig",
    "PAPOConfig", "Prepared", "Reinforce", "ReinforceConfig", "RolloutInfo", "clipped_terms", "group_stats",
    "make_algorithm", "make_config", "merge_metrics", "on_policy_terms",
]
