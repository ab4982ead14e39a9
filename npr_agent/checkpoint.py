"""Models in, checkpoints out: build or load the policy, save it in HF format, save and restore training state.

A stage's result is a plain HF directory (``save_pretrained`` + tokenizer) that transformers and SGLang load.
Training state (``train_state.pt`` beside it while a stage runs) holds what an exact resume needs: model,
optimizer, scheduler, every RNG, the step and the data position.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .files import fsync_file

QWEN3_OFFLINE = "npr:qwen3"  # ModelConfig.tokenizer: Qwen3's real vocabulary, built offline (npr_env.qwen_vocab)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
    return torch.device(name)


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of a model: the shipped char tokenizer for built-from-config models, else the path's own,
    with the NPR tags added as special tokens."""
    import npr_env

    src = cfg.tokenizer or cfg.path
    if src is None:
        return npr_env.load_tokenizer()
    if src == QWEN3_OFFLINE:
        from npr_env.qwen_vocab import qwen3_tokenizer

        tok = qwen3_tokenizer()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src)
    npr_env.add_npr_tokens(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def enable_checkpointing(model):
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant (transformers 5.x:
    ``activation_checkpointing_enable``; the deprecated ``gradient_checkpointing_enable`` before it).

    HF checkpoints a layer only while the model is in train mode with grad on; the trainer's updates run in
    train mode. Gradients are the same as without it (tests/test_memory_paths.py).
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_model(cfg: ModelConfig, tokenizer, device: torch.device, seed: int = 0,
                gradient_checkpointing: bool | None = None):
    """A Qwen3 built from the config fields (tiny preset), or a local HF checkpoint with the tags added.

    ``gradient_checkpointing`` (default ``cfg.gradient_checkpointing``) turns on activation checkpointing.
    """
    import npr_env

    dtype = DTYPES[cfg.dtype]
    if gradient_checkpointing is None:
        gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.path is None:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        torch.manual_seed(seed)
        rows = cfg.vocab_size or len(tokenizer)
        if rows < len(tokenizer):
            raise ValueError(f"model.vocab_size={rows} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        qcfg = Qwen3Config(
            vocab_size=rows, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
            bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        qcfg._attn_implementation = "sdpa"
        model = Qwen3ForCausalLM(qcfg).to(dtype)
        if tokenizer.get_vocab() != npr_env.load_tokenizer().get_vocab():
            # a real vocabulary: tags start as the mean of their name's pieces, as on a pretrained model
            npr_env.init_tag_rows(tokenizer, model)
    else:
        from transformers import AutoTokenizer

        model = load_pretrained(cfg.path, dtype)  # checkpointing is turned on below
        # The run's tokenizer already has the tags; add them again to the checkpoint's own tokenizer so that
        # tags new to this model get their mean-of-sub-token embedding rows (a no-op for NPR checkpoints).
        raw = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.path)
        ids = npr_env.add_npr_tokens(raw, model)
        want = [tokenizer.convert_tokens_to_ids(t) for t in npr_env.TAGS]
        if ids != want:
            raise ValueError(f"{cfg.path}: tag ids {ids} differ from the run tokenizer's {want}")
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model.to(device)


def load_pretrained(path: str | Path, dtype=torch.float32, gradient_checkpointing: bool = False):
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json); no hub downloads are made")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model


def save_policy(model, tokenizer, out_dir: str | Path) -> Path:
    """HF format: weights, config, generation config and the tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(path: str | Path, model, optimizer, scheduler, step: int, data_pos: int, extra=None) -> None:
    """Atomic: written to a temporary file, then renamed, so a kill mid-write never leaves a broken state."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(), "step": step, "data_pos": data_pos, "extra": extra or {},
    }, tmp)
    fsync_file(tmp)
    os.replace(tmp, path)


def load_train_state(path: str | Path, model, optimizer, scheduler) -> dict:
    state = torch.load(str(path), map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(schedule: str, total: int, warmup: int, min_ratio: float = 0.0):
    """Linear warmup, then constant or cosine decay to ``min_ratio``."""
    import math

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


class DecayOnPass:
    """LR multiplier for a stage that trains until a check passes: linear warmup, the peak rate until
    :meth:`start_decay` is called, then a cosine decay over ``decay`` steps to ``min_ratio``; :attr:`end` is the
    step the stage stops at. The decay starts by ``total - decay`` whatever the check says, so ``total`` is a
    budget. ``fall_from`` (with ``decay = 0``): from that step the rate falls along a cosine to ``min_ratio`` at
    ``total`` instead of holding its peak, and a pass ends the stage wherever the rate is. A callable object, so
    ``LambdaLR.state_dict`` saves ``decay_from`` and a resumed run keeps it."""

    def __init__(self, total: int, warmup: int, decay: int, min_ratio: float = 0.0, fall_from: int | None = None):
        if fall_from is not None and decay:
            raise ValueError("DecayOnPass: fall_from needs decay = 0 (the rate is already falling at the pass)")
        self.total, self.warmup, self.decay, self.min_ratio = total, warmup, decay, min_ratio
        self.fall_from = fall_from
        self.decay_from: int | None = None

    @property
    def end(self) -> int:
        start = max(self.total - self.decay, 0) if self.decay_from is None else self.decay_from
        return min(start + self.decay, self.total)

    def start_decay(self, step: int) -> None:
        if self.decay_from is None:
            self.decay_from = step

    def __call__(self, step: int) -> float:
        import math

        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        if self.fall_from is not None and step >= self.fall_from:
            t = min(1.0, (step - self.fall_from) / max(1, self.total - self.fall_from))
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        start = max(self.total - self.decay, 0) if self.decay_from is None else self.decay_from
        if step < start:
            return 1.0
        t = min(1.0, (step - start) / max(1, self.decay))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def save_tiny_model(path: str | Path | None = None, hidden_size: int = 64, num_layers: int = 2,
                    seed: int = 0) -> str:
    """A random Qwen3 with the shipped tokenizer, saved as an HF directory (examples, benchmarks, tests)."""
    import tempfile

    import npr_env

    cfg = ModelConfig(hidden_size=hidden_size, num_layers=num_layers, num_heads=4, num_kv_heads=2,
                      head_dim=hidden_size // 4, intermediate_size=3 * hidden_size)
    tok = npr_env.load_tokenizer()
    model = build_model(cfg, tok, torch.device("cpu"), seed=seed)
    out = str(path or tempfile.mkdtemp(prefix="npr-tiny-"))
    save_policy(model, tok, out)
    return out

