"""Shared cases for the decode tests: forests of block tables (forks, growth, joins) over one pool, and a tiny
Qwen3 runner with arbitrary cached K/V in every slot the tables list."""

import random

import numpy as np
import torch

from engine.kv_cache import BlockPool, BlockTable
from engine.runner import ModelRunner


def forest(seed: int, pool: BlockPool) -> list[BlockTable]:
    """Prompt tables forked into samples, samples forked into siblings (nested too), some joined back."""
    rng = random.Random(seed)
    live: list[BlockTable] = []
    dead: list[BlockTable] = []
    for _ in range(rng.randint(1, 4)):
        prompt = BlockTable(pool)
        for _ in range(rng.randint(1, 13)):
            prompt.append_slot()
        for _ in range(rng.randint(1, 4)):
            s = prompt.fork()
            for _ in range(rng.randint(0, 9)):
                s.append_slot()
            live.append(s)
        dead.append(prompt)
    for _ in range(rng.randint(0, 6)):  # forks, growth and joins among the live tables
        t = rng.choice(live)
        op = rng.random()
        if op < 0.5:
            kids = [t.fork() for _ in range(rng.randint(2, 4))]
            for k in kids:
                for _ in range(rng.randint(1, 7)):
                    k.append_slot()
            if rng.random() < 0.4:
                t.join(kids)
                dead.extend(kids)
            else:
                live.remove(t)
                dead.append(t)
                live.extend(kids)
        else:
            for _ in range(rng.randint(1, 5)):
                t.append_slot()
    for t in live:
        t.append_slot()  # each decode row's new token
    return live, dead


def release(tables: list[BlockTable]) -> None:
    """Release every table not yet released (joined children release themselves)."""
    for t in tables:
        if not t.released:
            t.release()


def tiny_runner():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    return ModelRunner(Qwen3ForCausalLM(cfg).eval())


def decode_case(seed: int):
    """A tiny runner, a pool with arbitrary cached K/V in every slot the tables list, a forest of tables, and
    each live row's new token and position."""
    runner = tiny_runner()
    pool = BlockPool(512, block_size=4, num_layers=runner.num_layers, kv_heads=runner.kv_heads,
                     head_dim=runner.head_dim)
    for k, v in zip(pool.k, pool.v):
        k[:, :-1].normal_()  # every block but the scratch one
        v[:, :-1].normal_()
    live, dead = forest(seed, pool)
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 97, len(live)).tolist()
    pos = [int(p) for p in rng.integers(0, 200, len(live))]
    return runner, pool, live, dead, toks, pos, rng
