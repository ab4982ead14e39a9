"""Every hyper-parameter of a training run, in one place.

A run is a :class:`TrainConfig`. Presets are defined here (``tiny``: CPU, minutes; ``qwen3-4b``: the paper's
settings on GPUs); a config file (TOML or YAML) overrides a preset, and ``--set key.sub=value`` overrides both::

    npr train --preset tiny --set stage3.steps=40 --set seed=1
    npr train --config configs/qwen3-4b.toml

Unknown keys and ill-typed values are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

Dtype = Literal["float32", "bfloat16", "float16"]
EngineBackend = Literal["native", "sglang"]
EngineMode = Literal["parallel", "sequential"]
LRSchedule = Literal["constant", "cosine"]


@dataclass
class ModelConfig:
    path: str | None = None  # a local HF checkpoint directory; None builds a Qwen3 from the fields below
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    max_position_embeddings: int = 1024
    dtype: Dtype = "float32"
    # None: the model path's tokenizer, or the shipped char tokenizer; "npr:qwen3": Qwen3's real vocabulary built
    # offline (npr_env.qwen_vocab, the `qwen` extra); otherwise a tokenizer directory
    tokenizer: str | None = None
    vocab_size: int | None = None  # embedding rows of a model built from these fields (None: the tokenizer's size)
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward (long rollouts; docs/scaling.md)


@dataclass
class TaskConfig:
    num_subproblems: tuple[int, int] = (2, 4)
    terms: tuple[int, int] = (5, 6)  # numbers per group (the length of each parallel step); npr_env.tasks.GroupSumTasks
    digits: int = 1  # digits per number (1: 1-9; 2: 10-99, sums that carry; at most 4)
    instruction: bool = False  # append the NPR instruction to the prompt (for instruct models)
    chat_kwargs: dict = field(default_factory=dict)  # chat-template kwargs, e.g. {"enable_thinking": false} (Qwen3)
    eval_size: int = 512  # held-out problems for accuracy/eval (512: a standard error of ~1.3 points at 0.9)
    benchmark: str | None = None  # a benchmark file (json/jsonl) to train on instead of procedural tasks


@dataclass
class EngineConfig:
    backend: EngineBackend = "native"  # native (fork/join engine, CPU or GPU) | sglang (orchestrated, GPU; docs/scaling.md)
    sglang_mem_fraction: float = 0.45  # share of GPU memory SGLang may hold (weights + KV) beside the learner
    block_size: int = 16
    # native KV pool: a block count, or None to size it from memory (kv_mem_fraction of the device memory free
    # when the engine is built; on a CPU without kv_mem_fraction: 256 MiB). The tiny preset keeps 4096.
    num_blocks: int | None = 4096
    kv_mem_fraction: float | None = None  # None: 0.3 on CUDA (engine.npr_engine.DEFAULT_CUDA_KV_FRACTION)
    # free the rollout engine's KV memory during each policy update (native: drop the pool's tensors; sglang:
    # start with enable_memory_saver and release/resume its "kv_cache"), docs/scaling.md
    memory_saver: bool = False
    sync_bucket_mb: int = 1024  # weight sync to SGLang: gather and send the parameters in buckets of this size
    max_plans: int = 5
    max_depth: int = 2
    min_fork_budget: int = 32
    step_repetition_penalty: float = 1.0


@dataclass
class SFTConfig:
    steps: int = 0
    batch_size: int = 32
    lr: float = 3e-3
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 8  # rows per forward, length-sorted (0: the whole batch); the gradient is the batch's
    checkpoint_every: int = 100  # steps between training-state saves (for --resume)


@dataclass
class Stage0Config(SFTConfig):
    """The tiny preset's seed model: SFT from scratch on worked solutions, trained until a check passes."""

    # a budget: with check_every > 0 the stage ends when the check passes (step 500-1150 on seeds 0-4)
    steps: int = 1300
    # the share of NPR-format solutions (as causal text; the rest are plain sequential ones) in each batch
    parallel_fraction: float = 0.8
    # A curriculum over the mix: the share at step 0, rising linearly to parallel_fraction at ramp_steps, then
    # held (None: parallel_fraction throughout). The seed's late loss drop (learning to find a group's digits)
    # comes at a seed-dependent step; the ramp brings it earlier (docs/results.md, "A seed curriculum").
    parallel_fraction_start: float | None = 0.2
    # Layouts the parallel-style solutions train under. "sequential": causal text only, so the seed never sees
    # the parallel layout before stage 2. "both": each is also trained under the parallel layout (a step
    # starts where its siblings start and sees none of them). Measured (docs/results.md): "both" lets the
    # seed restate a later step's group under the parallel layout (teacher-forced 0.00 -> 0.61), but it
    # writes the format worse as causal text (0.68 -> 0.46) and stage 1 then collapses; not the default.
    parallel_layout: Literal["both", "sequential"] = "sequential"
    # Write the seed's solutions with the tags as ordinary text pieces, as an instruct model that has never
    # seen the tag tokens writes them (a BPE vocabulary; the char tokenizer has no pieces to spell them in).
    spelled_tags: bool = False
    # Train until the seed can do the task, not for a fixed count: with check_every > 0, every check_every steps
    # from the ramp's end an average of the recent weights (check_average: EMA decay per step) decodes
    # check_problems training problems never trained on (greedy, sequential mode); the learning rate stays at its
    # peak until their accuracy reaches pass_accuracy, then decays over decay_steps and the stage ends
    # (decay_steps = 0: it ends there, on the average's weights). `steps` is then a budget (the decay starts by
    # steps - decay_steps). check_every = 0: one cosine schedule over `steps` (the preset before the check:
    # configs/tiny-fixed-budget.toml).
    check_every: int = 50
    check_problems: int = 128  # 64 let a 0.90 seed pass 0.95 one check in ten (docs/results.md)
    pass_accuracy: float = 0.95
    check_average: float = 0.99  # 0: check the live weights, which jump from step to step at the peak rate
    decay_steps: int = 0
    # the rate until the check passes: "constant" (the peak), or "cosine": from the first check step it falls
    # along a cosine to min_lr_ratio at the budget's end, so a slow seed trains on at a falling rate (needs
    # decay_steps = 0)
    rate_until_pass: Literal["constant", "cosine"] = "constant"
    ramp_steps: int = 400  # the steps the share ramp (parallel_fraction_start) takes; 0: `steps`

    @property
    def check_from(self) -> int:
        """The first step the check may run at: the ramp's end, so the seed passes on the mix it ends with."""
        return self.ramp_steps if self.parallel_fraction_start is not None else 0


@dataclass
class RLConfig:
    algorithm: str = "papo"
    algorithm_args: dict = field(default_factory=dict)
    steps: int = 0
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 1e-4
    lr_schedule: LRSchedule = "constant"
    warmup_steps: int = 0
    grad_clip: float = 1.0
    micro_batch_size: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 448
    mode: EngineMode = "parallel"  # engine mode for rollouts
    # npr_env.rewards preset; it also fixes the constraint preset rollouts are judged under (stage1: relaxed,
    # papo: strict, accuracy: relaxed); the engine builds its graphs under strict rules in every stage
    reward: str = "papo"
    eval_every: int = 10
    # stop once the rollouts have sampled this many tokens in all (every branch counts; 0: no budget, `steps`
    # only): arms that decode differently compare at equal sampling compute (npr ablate)
    sampled_tokens: int = 0
    # Mixed-group replay (npr_agent.replay): up to this share of a step's prompts (rounded down) are problems whose
    # rollout group carried an advantage in an earlier step of the stage (newest first); the rest are fresh.
    # 0: all fresh.
    replay_fraction: float = 0.0
    replay_capacity: int = 32  # problems the replay buffer holds (the oldest leave first)
    # Keep the best weights: at the start, every `select_every` steps and at the end, the policy decodes
    # `select_problems` check problems (greedy, the stage's mode; no stage trains on them and none is held out),
    # and the stage ends on the weights that solved the most (the latest among ties). A late collapse of the
    # policy then cannot become the stage's result. 0: the last weights.
    select_every: int = 0
    select_problems: int = 256


@dataclass
class Stage1Config(RLConfig):
    """NPR-Zero: DAPO, sequential rollouts, relaxed constraints, format-then-accuracy reward."""

    algorithm: str = "dapo"
    steps: int = 8  # the seed that passed its check writes the format already (stage-1 valid rate 1.00)
    lr: float = 5e-5
    eval_every: int = 0  # held-out evals at the start and the end only (one mid-stage eval costs ~25 s)
    mode: EngineMode = "sequential"
    reward: str = "stage1"


@dataclass
class Stage2Config(SFTConfig):
    """NPR-Beta: rejection sampling from the stage-1 model, then parallel SFT from the seed model."""

    # problems per rejection-sampling batch; with target_kept = 350 a seed that passed its check keeps ~500 of
    # two batches (docs/results.md)
    num_problems: int = 256
    # While fewer than `target_kept` trajectories are kept, rejection-sample another `num_problems` fresh
    # problems, at most `max_problems` in all: a weak stage-1 model (seed 3 kept 126 of 256) still gives
    # stage 2 enough data. 0: one batch only.
    target_kept: int = 350
    max_problems: int = 1024
    tries: int = 8  # samples per problem; the first correct and format-perfect one is kept
    tries_per_round: int = 2  # drawn per open problem per round (problems solved early cost no more samples)
    temperature: float = 1.0
    max_new_tokens: int = 448
    steps: int = 250
    lr: float = 1e-3
    # at most this many passes over the kept trajectories; more data and more passes lifted stage 2 on every
    # seed measured (docs/results.md); from a seed that passed its check 250 steps reach 0.99-1.00
    epochs_cap: int = 48
    # Below `min_kept` kept trajectories, add the tasks' worked parallel solutions (logged as
    # rejection/from_solutions). Only procedural tasks have them; off for real models.
    min_kept: int = 64
    fill_from_solutions: bool = True
    # the layout SFT trains the kept trajectories under, and the mode stage 2 is evaluated in: "parallel" is
    # NPR-Beta; "sequential" trains the same trajectories as causal text (the paper's SR-Beta baseline)
    layout: EngineMode = "parallel"


@dataclass
class Stage3Config(RLConfig):
    """NPR: PAPO with the engine in parallel mode."""

    algorithm: str = "papo"
    # from a stage 2 that left 39 / 9 errors of 512, 60 steps removed 21% / 22% of them and 150 steps 54% / 67%;
    # from a stage 2 at 0.99+, 150 steps without replay removed only 6-18% (counted on 2,048 problems)
    steps: int = 150
    lr: float = 2e-5  # 1e-4 moved faster but was noisier and ended lower
    # Half of a step's prompts may be problems whose group was mixed earlier (npr_agent.replay). From a stage 2
    # at 0.99+ only ~15% of fresh groups carry an advantage; on 2,048 held-out problems replay took stage 3's
    # removal of stage 2's errors from 9% to 27% (seed 0) and 43% to 50% (seed 2) at the same compute
    # (docs/results.md).
    replay_fraction: float = 0.5
    eval_every: int = 0  # held-out evals at the start and the end only
    # Seed 1 on a third machine reached 0.975 at step 125 and fell to 0.934 by step 150, below stage 2's 0.951
    # (docs/results.md, "Stage 3 keeps its best check")
    select_every: int = 25


@dataclass
class EvalConfig:
    temperature: float = 0.0  # greedy for the tiny preset's held-out accuracy
    top_p: float = 1.0
    max_new_tokens: int = 448


@dataclass
class TrainConfig:
    name: str = "tiny"
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 2
    stages: tuple[str, ...] = ("stage0", "stage1", "stage2", "stage3")
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    stage0: Stage0Config = field(default_factory=Stage0Config)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    stage3: Stage3Config = field(default_factory=Stage3Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint_every: int = 10  # RL steps between training-state saves (for --resume)
    log_every: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def preset(name: str) -> TrainConfig:
    if name == "tiny":
        return TrainConfig()
    if name == "qwen3-4b":
        # The paper's settings (../shared/reference/npr-facts.md); rollouts on SGLang or the native engine.
        return TrainConfig(
            name="qwen3-4b", device="cuda", stages=("stage1", "stage2", "stage3"),
            # fp32 master weights (bf16 compute via FSDP2's param dtype): lr 1e-7 steps vanish in pure bf16.
            model=ModelConfig(path="models/Qwen3-4B-Instruct-2507", dtype="float32", gradient_checkpointing=True),
            tasks=TaskConfig(instruction=True, chat_kwargs={"enable_thinking": False}, benchmark=None),
            engine=EngineConfig(backend="sglang", block_size=16, num_blocks=None, kv_mem_fraction=0.3, memory_saver=True,
                                max_plans=5, max_depth=5, min_fork_budget=1024, step_repetition_penalty=1.02),
            stage1=Stage1Config(steps=200, prompts_per_step=32, group_size=16, lr=1e-6, lr_schedule="cosine",
                                max_new_tokens=30000, algorithm_args={"clip_low": 0.2, "clip_high": 0.28}),
            stage2=Stage2Config(num_problems=8000, tries=8, max_new_tokens=30000, steps=1000, batch_size=8,
                                lr=1e-6, warmup_ratio=0.05, epochs_cap=1, target_kept=0, fill_from_solutions=False),
            stage3=Stage3Config(steps=200, prompts_per_step=16, group_size=16, lr=1e-7, max_new_tokens=30000,
                                eval_every=25, replay_fraction=0.0,  # the paper: every prompt fresh
                                select_every=0),  # and the stage ends on its last weights
            eval=EvalConfig(temperature=1.0, top_p=0.7, max_new_tokens=30000),
        )
    raise ConfigError(f"unknown preset {name!r}; choose 'tiny' or 'qwen3-4b'")


class ConfigError(ValueError):
    pass


_NONE = (None, "none", "None", "")  # how a file or --set unsets an optional field


def _fail(where: str, want: str, value: Any) -> typing.NoReturn:
    raise ConfigError(f"{where}: expected {want}, got {value!r}")


def _typed(hint: Any, value: Any, current: Any, source: str, key: str) -> Any:
    """``value`` (from a TOML/YAML file, or ``--set`` as JSON else text) as the type ``hint`` says, or a
    :class:`ConfigError` that reads ``<source>: <key>: expected ..., got ...``. A nested dataclass merges
    ``value`` (a table) into ``current``."""
    where = f"{source}: {key}"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) < len(args) and (value is None or (isinstance(value, str) and value in _NONE)):
            return None
        for i, opt in enumerate(options):
            try:
                return _typed(opt, value, current, source, key)
            except ConfigError:
                if i == len(options) - 1:
                    raise
    if origin is typing.Literal:
        if value not in args:
            _fail(where, "one of " + ", ".join(repr(a) for a in args), value)
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            _fail(where, "a table", value)
        return _merge(current if current is not None else hint(), value, source, key)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            _fail(where, "true/false", value)
        return value
    if hint in (int, float):
        want = "an integer" if hint is int else "a float"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            _fail(where, want, value)
        try:
            if hint is float:
                return float(value)
            if isinstance(value, float):
                if not value.is_integer():
                    _fail(where, want, value)
                return int(value)
            return int(value)
        except ValueError:
            _fail(where, want, value)
    if hint is str:
        if isinstance(value, (dict, list, tuple)) or value is None:
            _fail(where, "a string", value)
        return str(value)
    if hint in (tuple, list) or origin in (tuple, list):
        if isinstance(value, str):  # --set tasks.terms=5,6
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            _fail(where, "a list", value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                _fail(where, f"a list of {len(args)} items", value)
            kinds = args
        else:
            kinds = (args[0] if args else Any,) * len(value)
        items = [v if k is Any else _typed(k, v, None, source, f"{key}[{i}]") for i, (k, v) in enumerate(zip(kinds, value))]
        return tuple(items) if (origin or hint) is tuple else items
    if hint is dict or origin is dict:
        if isinstance(value, str):  # --set stage3.algorithm_args='{"clip_low": 0.2}'
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: {value!r} is not a JSON table ({e.msg})") from None
        if not isinstance(value, dict):
            _fail(where, "a table", value)
        if len(args) == 2:
            return {_typed(args[0], k, None, source, key): _typed(args[1], v, None, source, f"{key}.{k}")
                    for k, v in value.items()}
        return dict(value)
    if hint is Any:
        return value
    raise TypeError(f"{where}: the config loader has no rule for the type {hint!r}")


def _merge(obj, data: dict, source: str, prefix: str = ""):
    """Set the fields of the dataclass ``obj`` named in ``data``, each checked against its type hint
    (:func:`_typed`). ``source``: the file, or ``--set``; ``prefix``: the section's key path (``stage3``)."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in fields(obj)]
    for key, value in data.items():
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            where = f"{source}: {prefix}" if prefix else source
            raise ConfigError(f"{where}: unknown key {key!r} ({hint}known: {', '.join(sorted(names))})")
        setattr(obj, key, _typed(hints[key], value, getattr(obj, key), source, f"{prefix}.{key}" if prefix else key))
    return obj


def load_file(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":  # a run's own config.json
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: config files are .toml, .yaml or a run's config.json")
    except ConfigError:
        raise
    except Exception as e:  # a parse error names the file and the parser's own line/column
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table")
    if base is None:
        try:
            base = preset(data.pop("preset", "tiny"))
        except ConfigError as e:
            raise ConfigError(f"{path}: preset: {e}") from None
    else:
        data.pop("preset", None)
    return _merge(base, data, str(path))


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        obj = cfg
        for p in parts[:-1]:
            if not hasattr(obj, p) or not dataclasses.is_dataclass(getattr(obj, p)):
                raise ConfigError(f"--set {key}: unknown section {p!r}")
            obj = getattr(obj, p)
        _merge(obj, {parts[-1]: _parse_scalar(value)}, "--set", ".".join(parts[:-1]))
    return cfg


def _parse_scalar(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


# -- validation ----------------------------------------------------------------------------------------------
STAGE_NAMES = ("stage0", "stage1", "stage2", "stage3")
DTYPE_NAMES = typing.get_args(Dtype)
LR_SCHEDULES = typing.get_args(LRSchedule)
ENGINE_MODES = typing.get_args(EngineMode)
ENGINE_BACKENDS = typing.get_args(EngineBackend)


def _check(ok: bool, key: str, value: Any, want: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {want}")


def _number(key: str, value: Any, kind: type, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> None:
    import math

    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    _check(is_num and (kind is float or float(value).is_integer()), key, value, f"a{'n integer' if kind is int else ' number'}")
    _check(math.isfinite(float(value)), key, value, "a finite number")
    if lo is not None:
        _check(value > lo if lo_open else value >= lo, key, value, f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        _check(value <= hi, key, value, f"<= {hi}")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, key, value, "one of " + ", ".join(repr(a) for a in allowed))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every value (enums, ranges, types, registered names) before any work starts.

    Raises :class:`ConfigError` naming the key and the allowed values. Runs in milliseconds, so ``npr train``
    refuses a mistake in stage 3's settings before stage 0 has run.
    """
    from npr_env.rewards import REWARD_PRESETS

    from .algorithms import ALGORITHMS, make_config

    _number("seed", cfg.seed, int, 0)
    _number("threads", cfg.threads, int, 1)
    _number("checkpoint_every", cfg.checkpoint_every, int, 0)
    _number("log_every", cfg.log_every, int, 1)
    _check(cfg.device in ("auto", "cpu", "cuda") or (isinstance(cfg.device, str) and cfg.device.startswith("cuda:")
                                                      and cfg.device[5:].isdigit()),
           "device", cfg.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
    for s in cfg.stages:
        _one_of("stages", s, STAGE_NAMES)
    m = cfg.model
    _one_of("model.dtype", m.dtype, DTYPE_NAMES)
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                 "max_position_embeddings"):
        _number(f"model.{name}", getattr(m, name), int, 1)
    _check(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", m.num_kv_heads,
           f"a divisor of model.num_heads ({m.num_heads})")
    if m.vocab_size is not None:
        _number("model.vocab_size", m.vocab_size, int, 1)
    t = cfg.tasks
    _number("tasks.eval_size", t.eval_size, int, 1)
    for name in ("num_subproblems", "terms"):
        v = getattr(t, name)
        _check(len(v) == 2 and 1 <= v[0] <= v[1], f"tasks.{name}", v, "a range (lo, hi) with 1 <= lo <= hi")
    _number("tasks.digits", t.digits, int, 1, 4)
    e = cfg.engine
    _one_of("engine.backend", e.backend, ENGINE_BACKENDS)
    _number("engine.block_size", e.block_size, int, 1)
    if e.num_blocks is not None:
        _number("engine.num_blocks", e.num_blocks, int, 1)
    if e.kv_mem_fraction is not None:
        _number("engine.kv_mem_fraction", e.kv_mem_fraction, float, 0, 1, lo_open=True)
    _number("engine.sglang_mem_fraction", e.sglang_mem_fraction, float, 0, 1, lo_open=True)
    _number("engine.max_plans", e.max_plans, int, 1)
    _number("engine.max_depth", e.max_depth, int, 0)
    _number("engine.min_fork_budget", e.min_fork_budget, int, 0)
    _number("engine.step_repetition_penalty", e.step_repetition_penalty, float, 0, lo_open=True)
    for name in ("stage0", "stage2"):
        s = getattr(cfg, name)
        for f in ("steps", "batch_size"):
            _number(f"{name}.{f}", getattr(s, f), int, 1)
        _number(f"{name}.micro_batch_size", s.micro_batch_size, int, 0)
        _number(f"{name}.lr", s.lr, float, 0, lo_open=True)
        _number(f"{name}.warmup_ratio", s.warmup_ratio, float, 0, 1)
        _number(f"{name}.min_lr_ratio", s.min_lr_ratio, float, 0, 1)
        _number(f"{name}.weight_decay", s.weight_decay, float, 0)
        _number(f"{name}.grad_clip", s.grad_clip, float, 0, lo_open=True)
        _number(f"{name}.checkpoint_every", s.checkpoint_every, int, 0)
    _number("stage0.parallel_fraction", cfg.stage0.parallel_fraction, float, 0, 1)
    for f in ("check_every", "check_problems", "decay_steps", "ramp_steps"):
        _number(f"stage0.{f}", getattr(cfg.stage0, f), int, 0, None)
    _number("stage0.pass_accuracy", cfg.stage0.pass_accuracy, float, 0, 1)
    _number("stage0.check_average", cfg.stage0.check_average, float, 0, 1)
    _check(cfg.stage0.check_average < 1, "stage0.check_average", cfg.stage0.check_average, "< 1 (1 never moves)")
    if cfg.stage0.check_every and cfg.stage0.parallel_fraction_start is not None and not cfg.stage0.ramp_steps:
        raise ConfigError("stage0.ramp_steps: with stage0.check_every the share ramp must end before the budget "
                          "(the check runs from the ramp's end); give ramp_steps < stage0.steps")
    if cfg.stage0.check_every and cfg.stage0.ramp_steps >= cfg.stage0.steps:
        raise ConfigError(f"stage0.ramp_steps: {cfg.stage0.ramp_steps} leaves no step of the {cfg.stage0.steps}-step "
                          "budget to check the seed in; give ramp_steps < stage0.steps, or stage0.check_every = 0 "
                          "to train for a fixed stage0.steps")
    _one_of("stage0.rate_until_pass", cfg.stage0.rate_until_pass, ("constant", "cosine"))
    if cfg.stage0.rate_until_pass == "cosine" and cfg.stage0.decay_steps:
        raise ConfigError("stage0.rate_until_pass: 'cosine' already lowers the rate before the pass; set "
                          "stage0.decay_steps = 0 (the stage then ends at the pass)")
    if cfg.stage0.check_every and not cfg.stage0.decay_steps and not cfg.stage0.check_average:
        raise ConfigError("stage0.decay_steps: 0 ends stage 0 on the weight average the check passed on, which "
                          "needs stage0.check_average > 0 (or give decay_steps > 0)")
    if cfg.stage0.check_every and not cfg.stage0.check_problems:
        raise ConfigError("stage0.check_problems: stage0.check_every > 0 checks the seed on these problems; "
                          "give at least 1 (128 gives a standard error of ~2 points at 0.95)")
    if cfg.stage0.parallel_fraction_start is not None:
        _number("stage0.parallel_fraction_start", cfg.stage0.parallel_fraction_start, float, 0, 1)
    _one_of("stage0.parallel_layout", cfg.stage0.parallel_layout, ("both", "sequential"))
    if cfg.stage0.spelled_tags and cfg.stage0.parallel_layout == "both":
        raise ConfigError("stage0.parallel_layout: 'both' needs every tag as its tag token, and "
                          "stage0.spelled_tags = true writes them in text pieces; set stage0.parallel_layout = "
                          "'sequential'")
    s2 = cfg.stage2
    for f in ("num_problems", "tries", "tries_per_round", "max_new_tokens", "epochs_cap"):
        _number(f"stage2.{f}", getattr(s2, f), int, 1)
    for f in ("target_kept", "max_problems", "min_kept"):
        _number(f"stage2.{f}", getattr(s2, f), int, 0)
    _number("stage2.temperature", s2.temperature, float, 0)
    _one_of("stage2.layout", s2.layout, ENGINE_MODES)
    for name in ("stage1", "stage3"):
        r = getattr(cfg, name)
        _one_of(f"{name}.algorithm", r.algorithm, tuple(ALGORITHMS))
        _check(isinstance(r.algorithm_args, dict), f"{name}.algorithm_args", r.algorithm_args, "a table")
        try:
            make_config(r.algorithm, r.algorithm_args, temperature=r.temperature)
        except (TypeError, ValueError, KeyError) as err:
            raise ConfigError(f"{name}.algorithm_args: {err}") from None
        _one_of(f"{name}.lr_schedule", r.lr_schedule, LR_SCHEDULES)
        _one_of(f"{name}.mode", r.mode, ENGINE_MODES)
        _one_of(f"{name}.reward", r.reward, tuple(REWARD_PRESETS))
        for f in ("steps", "prompts_per_step", "group_size", "micro_batch_size", "max_new_tokens"):
            _number(f"{name}.{f}", getattr(r, f), int, 1)
        for f in ("warmup_steps", "top_k", "eval_every", "sampled_tokens", "replay_capacity", "select_every"):
            _number(f"{name}.{f}", getattr(r, f), int, 0)
        _number(f"{name}.replay_fraction", r.replay_fraction, float, 0, 1)
        _number(f"{name}.select_problems", r.select_problems, int, 1)
        _number(f"{name}.lr", r.lr, float, 0, lo_open=True)
        _number(f"{name}.grad_clip", r.grad_clip, float, 0, lo_open=True)
        _number(f"{name}.temperature", r.temperature, float, 0, lo_open=True)
        _number(f"{name}.top_p", r.top_p, float, 0, 1, lo_open=True)
    _number("eval.temperature", cfg.eval.temperature, float, 0)
    _number("eval.top_p", cfg.eval.top_p, float, 0, 1, lo_open=True)
    _number("eval.max_new_tokens", cfg.eval.max_new_tokens, int, 1)
    return cfg
