"""RL algorithms: advantages on hand-computed batches, gradients, one real step each, exact accumulation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import npr_env
from npr_agent.algorithms import (
    ALGORITHMS,
    DAPO,
    PAPO,
    Algorithm,
    AlgorithmConfig,
    RolloutInfo,
    make_algorithm,
    merge_metrics,
)
from npr_agent.policy import Sample, build_batch, token_logprobs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def infos(rewards, groups, dropped=None, truncated=None, lengths=None):
    n = len(rewards)
    dropped = dropped or [False] * n
    truncated = truncated or [False] * n
    lengths = lengths or [0] * n
    return [RolloutInfo(float(r), g, length=ln, truncated=t, dropped=d)
            for r, g, d, t, ln in zip(rewards, groups, dropped, truncated, lengths)]


# -- PAPO advantages ----------------------------------------------------------------------------------------

def test_papo_advantages_hand_computed():
    # group 0: 1, 0, 0 kept + one dropped (-1.5); group 1: a group of one; group 2: all equal
    batch = infos([1, 0, 0, -1.5, 1, 1, 1], [0, 0, 0, 0, 1, 2, 2], dropped=[False, False, False, True] + [False] * 3)
    prep = make_algorithm("papo", eps=0.0).prepare(batch)
    # kept rewards 1,0,0,1,1,1: batch std = sqrt(2/9) = sqrt(2)/3; group-0 mean (kept) = 1/3
    want = [math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2), 0, 0, 0, 0]
    np.testing.assert_allclose(prep.advantages, want, atol=1e-12)
    assert prep.keep.tolist() == [True, True, True, False, True, True, True]
    assert prep.metrics["filter/kept_frac"] == pytest.approx(6 / 7)


def test_papo_zero_variance_and_groups_of_one():
    algo = make_algorithm("papo")
    same = algo.prepare(infos([1, 1, 1, 1], [0, 0, 1, 1]))
    assert (same.advantages == 0).all()
    singles = algo.prepare(infos([1, 0, -1], [0, 1, 2]))  # batch variance, but every group is alone
    assert (singles.advantages == 0).all()
    assert (algo.prepare([]).advantages == np.zeros(0)).all()


def test_papo_drops_invalid_and_truncated_rollouts():
    batch = infos([1, 0, 1, 0, 1, 0], [0, 0, 0, 1, 1, 1], dropped=[False, True, False, False, False, False],
                  truncated=[False, False, False, False, True, False])
    prep = make_algorithm("papo", eps=0.0).prepare(batch)
    assert prep.keep.tolist() == [True, False, True, True, False, True]
    # kept: group 0 = {1, 1} (no signal), group 1 = {0, 0}: zero variance inside groups → all 0
    assert (prep.advantages == 0).all()
    kept_all = make_algorithm("papo", drop_invalid=False, drop_truncated=False).prepare(batch)
    assert kept_all.keep.all() and (kept_all.advantages != 0).any()


def test_papo_std_is_computed_once():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    groups = np.array([0, 0, 0, 1, 1, 1])
    keep = np.ones(6, dtype=bool)
    eps = 1e-6
    adv = PAPO(PAPO.config_class(eps=eps)).advantages(rewards, groups, keep)
    std = rewards.std()  # 0.5
    means = np.array([1 / 3] * 3 + [2 / 3] * 3)
    np.testing.assert_allclose(adv, (rewards - means) / (std + eps), rtol=1e-12)
    # the public code's loop recomputes the std over values it has already overwritten: a different answer
    buggy = rewards.copy()
    for i in range(len(buggy)):
        buggy[i] = (buggy[i] - means[i]) / (buggy.std() + eps)
    assert np.abs(buggy - adv).max() > 0.1


# -- other algorithms' advantages and filters --------------------------------------------------------------

def test_grpo_group_std():
    adv = make_algorithm("grpo", eps=0.0).prepare(infos([1, 0, 0, 0, 2, 4, 5], [0, 0, 0, 0, 1, 1, 2])).advantages
    s0 = math.sqrt(3) / 4  # std of {1, 0, 0, 0}
    np.testing.assert_allclose(adv, [0.75 / s0, -0.25 / s0, -0.25 / s0, -0.25 / s0, -1, 1, 0], atol=1e-12)


def test_reinforce_mean_and_rloo_baselines():
    batch = infos([1, 0, 0, 3], [0, 0, 0, 1])
    mean = make_algorithm("reinforce").prepare(batch).advantages
    np.testing.assert_allclose(mean, [2 / 3, -1 / 3, -1 / 3, 0], atol=1e-12)
    rloo = make_algorithm("reinforce", baseline="rloo").prepare(batch).advantages
    np.testing.assert_allclose(rloo, [1 - 0, 0 - 0.5, 0 - 0.5, 0], atol=1e-12)
    with pytest.raises(ValueError, match="baseline"):
        make_algorithm("reinforce", baseline="median")


def test_dapo_dynamic_sampling_and_overlong_shaping():
    algo = make_algorithm("dapo", max_len=100, overlong_buffer=20, eps=0.0)
    assert (algo.config.clip_low, algo.config.clip_high) == (0.2, 0.28)
    batch = infos([1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 2, 3, 3, 3], lengths=[10, 90, 10, 10, 10, 10, 10, 120])
    prep = algo.prepare(batch)
    # lengths 90 and 120 lose 0.5 and 1.0 (the ramp starts at 80 and is full at 100)
    np.testing.assert_allclose(prep.rewards, [1, 0.5, 1, 1, 1, 0, 0, -1])
    # group 1 is all equal and group 2 is alone: dropped; groups 0 and 3 now differ inside
    assert prep.keep.tolist() == [True, True, False, False, False, True, True, True]
    np.testing.assert_allclose(prep.advantages[:2], [1, -1], atol=1e-12)
    no_ds = make_algorithm("dapo", dynamic_sampling=False).prepare(batch)
    assert no_ds.keep.all()


def test_registry_and_configs():
    assert set(ALGORITHMS) >= {"papo", "grpo", "dapo", "reinforce"}
    for name, cls in ALGORITHMS.items():
        algo = make_algorithm(name)
        assert isinstance(algo, cls) and isinstance(algo.config, AlgorithmConfig) and algo.name == name
        assert algo.config.updates_per_batch == 1 and algo.config.train_forced is False
        assert algo.config.kl_coef == 0 and algo.config.entropy_coef == 0
    assert make_algorithm("papo", {"updates_per_batch": 2}, temperature=0.5).config.updates_per_batch == 2
    assert make_algorithm("papo", PAPO.config_class(eps=0.5)).config.eps == 0.5
    with pytest.raises(ValueError, match="unknown PAPOConfig field.*clip_high"):
        make_algorithm("papo", clip_high=0.3)
    with pytest.raises(ValueError, match="registered"):
        make_algorithm("ppo2")
    with pytest.raises(TypeError):
        make_algorithm("papo", DAPO.config_class())
    with pytest.raises(ValueError, match="updates_per_batch"):
        make_algorithm("papo", updates_per_batch=0)


def test_adding_an_algorithm_is_one_class_and_one_entry(monkeypatch):
    @dataclasses.dataclass
    class SignConfig(AlgorithmConfig):
        scale: float = 2.0

    class Sign(Algorithm):
        name = "sign"
        config_class = SignConfig

        def advantages(self, rewards, group_ids, keep):
            return self.config.scale * np.sign(rewards)

        def policy_terms(self, logprobs, old_logprobs, adv, mask):
            return logprobs * adv, {}

    monkeypatch.setitem(ALGORITHMS, "sign", Sign)
    algo = make_algorithm("sign", scale=3.0)
    assert algo.prepare(infos([2, -1], [0, 0])).advantages.tolist() == [3.0, -3.0]


# -- the PAPO gradient on a toy ----------------------------------------------------------------------------

def linear_policy(seed=0, B=3, T=5, H=4, V=6):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    return W, x, y, mask


def test_papo_gradient_is_minus_advantage_grad_logpi_over_tokens():
    W, x, y, mask = linear_policy()
    A = torch.tensor([1.5, -0.5, 0.25], dtype=torch.float64)
    lp = torch.log_softmax(x @ W.T, -1).gather(-1, y[..., None]).squeeze(-1)
    noise = 0.3 * torch.randn_like(lp)  # the engine's logprobs: irrelevant when strictly on-policy
    loss, metrics = make_algorithm("papo").loss(lp, lp.detach() + noise, A, mask)
    loss.backward()
    n = mask.sum()
    with torch.no_grad():  # ∇_W log π(y|x) = (onehot(y) - softmax(Wx)) x^T
        p = torch.softmax(x @ W.T, -1)
        dlogits = torch.nn.functional.one_hot(y, W.shape[0]).double() - p
        want = -torch.einsum("bt,btv,bth->vh", mask * A[:, None], dlogits, x) / n
    torch.testing.assert_close(W.grad, want, atol=1e-12, rtol=1e-10)
    assert loss.item() == pytest.approx(-(A[:, None] * mask).sum().item() / n.item())
    assert metrics["loss/policy"] == pytest.approx(loss.item())
    assert metrics["policy/logprob_diff_max"] == pytest.approx(noise[mask].abs().max().item())


def test_papo_several_updates_use_the_unclipped_engine_ratio():
    W, x, y, mask = linear_policy(1)
    A = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    lp = torch.log_softmax(x @ W.T, -1).gather(-1, y[..., None]).squeeze(-1)
    old = lp.detach() - 0.7  # ratio e^0.7 ≈ 2.0: PPO would clip it, PAPO must not
    loss, m = make_algorithm("papo", updates_per_batch=2).loss(lp, old, A, mask)
    (g,) = torch.autograd.grad(loss, W, retain_graph=True)
    (g_ref,) = torch.autograd.grad(-(math.exp(0.7) * A[:, None] * lp * mask).sum() / mask.sum(), W,
                                   retain_graph=True)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-10)
    assert m["policy/ratio_mean"] == pytest.approx(math.exp(0.7))
    # GRPO clips the same ratio: positive-advantage tokens lose their gradient
    loss_c, mc = make_algorithm("grpo").loss(lp, old, A.clamp(min=0), mask)
    (gc,) = torch.autograd.grad(loss_c, W)
    assert torch.count_nonzero(gc) == 0 and mc["policy/clip_frac"] > 0.5


def test_kl_and_entropy_terms():
    W, x, y, mask = linear_policy(2)
    lp = torch.log_softmax(x @ W.T, -1).gather(-1, y[..., None]).squeeze(-1)
    A = torch.zeros(3, dtype=torch.float64)
    ent = torch.ones_like(lp)
    base, m0 = make_algorithm("grpo").loss(lp, lp.detach(), A, mask, ref_logprobs=lp.detach() - 0.1, entropy=ent)
    assert "loss/kl" not in m0 and m0["policy/entropy"] == pytest.approx(1.0)
    loss, m = make_algorithm("grpo", kl_coef=0.5, entropy_coef=0.1).loss(
        lp, lp.detach(), A, mask, ref_logprobs=lp.detach() - 0.1, entropy=ent)
    k3 = math.exp(-0.1) + 0.1 - 1
    assert m["loss/kl"] == pytest.approx(0.5 * k3) and m["loss/entropy"] == pytest.approx(-0.1)
    assert loss.item() == pytest.approx(base.item() + 0.5 * k3 - 0.1)


# -- real steps on a tiny Qwen3 ----------------------------------------------------------------------------

TEXTS = [
    "<guideline><plan>1: 2*3</plan><plan>2: 4*5</plan></guideline><step>1: 2*3=6</step><step>2: 4*5=20</step>"
    "<takeaway>6+20=26</takeaway>\\boxed{26}",
    "<guideline><plan>1: 2*3</plan><plan>2: 4*5</plan></guideline><step>1: 2*3=5</step><step>2: 4*5=20</step>"
    "<takeaway>5+20=25</takeaway>\\boxed{25}",
    "<guideline><plan>1: 7*8</plan></guideline><step>1: 7*8=56</step><takeaway>so 56</takeaway>\\boxed{56}",
    "<guideline><plan>1: 7*8</plan><plan>2: check</plan></guideline><step>1: 7*8=54</step>\n"
    "<step>2: 8*7=56</step><takeaway>use 56</takeaway>\\boxed{56}",
]
PROMPTS = ["2*3+4*5=?", "2*3+4*5=?", "7*8=?", "7*8=?"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(npr_env.load_tokenizer()), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      max_position_embeddings=512)
    return Qwen3ForCausalLM(cfg)


def rollout_batch(model):
    """Real sequences from graphs, with 'engine' logprobs a little off the current policy and a forced mask."""
    samples = []
    for text, prompt in zip(TEXTS, PROMPTS):
        s = Sample.from_graph(npr_env.ExecutionGraph.from_text(text, prompt=prompt))
        tok = npr_env.load_tokenizer()
        tags = {tok.convert_tokens_to_ids(t) for t in ("<step>", "<takeaway>")}
        samples.append(dataclasses.replace(s, forced_mask=[t in tags for t in s.token_ids]))
    batch = build_batch(samples)
    with torch.no_grad():
        lp = token_logprobs(model, batch)
    g = torch.Generator().manual_seed(0)
    old = torch.where(batch.response_mask, lp + 0.3 * torch.randn(lp.shape, generator=g), 0.0)
    return dataclasses.replace(batch, old_logprobs=old), samples


REWARDS = [1.0, -1.0, 1.0, -1.0]
GROUPS = [0, 0, 1, 1]


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_an_optimizer_step(name):
    model = tiny_model()
    algo = make_algorithm(name)
    prep = algo.prepare(infos(REWARDS, GROUPS, lengths=[30] * 4))
    assert prep.keep.all() and (prep.advantages != 0).all()
    batch, samples = rollout_batch(model)
    assert batch.num_loss_tokens < int(batch.response_mask.sum())  # forced tokens are left out
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)  # only the gradient moves them
    model.train()
    lp, ent = token_logprobs(model, batch, temperature=algo.config.temperature, return_entropy=True)
    adv = torch.as_tensor(prep.advantages, dtype=torch.float32)[batch.index]
    loss, metrics = algo.loss(lp, batch.old_logprobs, adv, batch.loss_mask, entropy=ent)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in metrics.values())
    assert metrics["tokens"] == batch.num_loss_tokens and metrics["policy/entropy"] > 0
    changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert changed == len(before)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_micro_batch_accumulation_equals_the_full_batch_gradient(name):
    model = tiny_model(1)
    algo = make_algorithm(name, updates_per_batch=2)  # off-policy ratios, so clipping is exercised too
    batch, _ = rollout_batch(model)
    adv = torch.tensor([1.0, -0.5, 0.75, -1.25])
    lp = token_logprobs(model, batch)
    loss, m_full = algo.loss(lp, batch.old_logprobs, adv[batch.index], batch.loss_mask)
    loss.backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    n = batch.num_loss_tokens
    total, parts = 0.0, []
    for mb in batch.split(1):
        mb_loss, m = algo.loss(token_logprobs(model, mb), mb.old_logprobs, adv[mb.index], mb.loss_mask,
                               num_tokens=n)
        mb_loss.backward()
        total += mb_loss.item()
        parts.append(m)
    assert total == pytest.approx(loss.item(), abs=1e-6)
    for g_full, p in zip(full, model.parameters()):
        torch.testing.assert_close(p.grad, g_full, atol=1e-6, rtol=1e-4)
    merged = merge_metrics(parts)
    for k in ("loss/policy", "policy/ratio_mean", "policy/approx_kl", "policy/logprob_diff_max", "tokens"):
        assert merged[k] == pytest.approx(m_full[k], rel=1e-4, abs=1e-6), k
    if "policy/clip_frac" in m_full:
        assert 0 < m_full["policy/clip_frac"] < 1
        assert merged["policy/clip_frac"] == pytest.approx(m_full["policy/clip_frac"], rel=1e-6)
