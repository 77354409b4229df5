"""The loss, advantages and overlong punishment against independent float64 references
written as plain Python loops, on fresh random inputs."""
import math

import numpy as np
import pytest
import torch

from train_dapo import compute_advantages, compute_policy_loss, importance_weights, overlong_penalty


def reference_loss(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, mode, dual_clip_c=0.0,
                   vllm_logprobs=None, tis_cap=0.0):
    """Float64, one token at a time, min-of-objectives form (the paper's formula); with
    vllm_logprobs each token's term is weighted by min(pi_old / pi_vllm, tis_cap)."""
    per_seq, token_terms = [], []
    for i in range(len(advantages)):
        a = float(advantages[i])
        terms = []
        for t in range(len(mask[i])):
            if mask[i][t] == 0:
                continue
            r = math.exp(min(max(float(logprobs[i][t]) - float(old_logprobs[i][t]), -20.0), 20.0))
            objective = min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
            if dual_clip_c and a < 0:
                objective = max(objective, dual_clip_c * a)
            if vllm_logprobs is not None:
                objective *= min(math.exp(float(old_logprobs[i][t]) - float(vllm_logprobs[i][t])), tis_cap)
            terms.append(-objective)
        token_terms += terms
        if terms:
            per_seq.append(sum(terms) / len(terms))
    if mode == "token-mean":
        return sum(token_terms) / len(token_terms)
    return sum(per_seq) / len(per_seq)


def random_batch(B=6, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    # log-ratios in [-1, 1]: ratios from 0.37 to 2.7, well past both clip bounds
    new = old + (torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1)
    new[0, 0] = old[0, 0] + math.log(0.8)   # exactly at 1 - eps_low
    new[0, 1] = old[0, 1] + math.log(1.28)  # exactly at 1 + eps_high
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[1] = 0.0
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    mask[2] = 0.0  # a fully masked response (overlong-filtered)
    return new, old, adv, mask


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("eps", [(0.2, 0.28), (0.2, 0.2)])
@pytest.mark.parametrize("dual_clip_c", [0.0, 1.5, 3.0])  # ratios reach 2.7: c = 1.5 caps some tokens
def test_policy_loss_matches_reference(mode, seed, eps, dual_clip_c):
    new, old, adv, mask = random_batch(seed=seed)
    new.requires_grad_(True)
    loss, _ = compute_policy_loss(new, old, adv, mask, *eps, loss_agg_mode=mode, dual_clip_c=dual_clip_c)
    expected = reference_loss(new.tolist(), old.tolist(), adv.tolist(), mask.tolist(), *eps, mode, dual_clip_c)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)

    # gradient against central finite differences of the reference
    loss.backward()
    h = 1e-6
    for i, t in [(0, 2), (3, 0), (4, 1), (5, 0)]:
        if mask[i, t] == 0:
            continue
        plus, minus = new.detach().clone(), new.detach().clone()
        plus[i, t] += h
        minus[i, t] -= h
        fd = (reference_loss(plus.tolist(), old.tolist(), adv.tolist(), mask.tolist(), *eps, mode, dual_clip_c)
              - reference_loss(minus.tolist(), old.tolist(), adv.tolist(), mask.tolist(), *eps, mode, dual_clip_c)) / (2 * h)
        assert new.grad[i, t].item() == pytest.approx(fd, abs=1e-6)
    assert torch.all(new.grad[mask == 0] == 0)


def test_clip_fractions_count_active_clips():
    new, old, adv, mask = random_batch(B=8, T=12, seed=7)
    _, m = compute_policy_loss(new, old, adv, mask, 0.2, 0.28)
    low = high = n = 0
    for i in range(8):
        for t in range(12):
            if mask[i, t]:
                r = math.exp(new[i, t] - old[i, t])
                n += 1
                low += r < 0.8 and adv[i] < 0
                high += r > 1.28 and adv[i] > 0
    assert m["actor/clipfrac_low"].item() == pytest.approx(low / n)
    assert m["actor/clipfrac_high"].item() == pytest.approx(high / n)
    assert low > 0 and high > 0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_global_normalizer_makes_micro_batches_sum_to_the_batch(mode):
    new, old, adv, mask = random_batch(B=10, T=7, seed=3)
    full, _ = compute_policy_loss(new, old, adv, mask, 0.2, 0.28, mode)
    norm = mask.sum() if mode == "token-mean" else (mask.sum(-1) > 0).sum()
    parts = sum(compute_policy_loss(new[s], old[s], adv[s], mask[s], 0.2, 0.28, mode, normalizer=norm)[0]
                for s in (slice(0, 3), slice(3, 4), slice(4, 10)))
    assert parts.item() == pytest.approx(full.item(), rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_advantages_match_numpy(seed):
    rng = np.random.default_rng(seed)
    rewards = rng.choice([-1.0, 1.0], size=(7, 8)) + rng.uniform(-0.5, 0, size=(7, 8)) * (rng.random((7, 8)) < 0.3)
    rewards[0] = 1.0    # all correct
    rewards[1] = -1.0   # all wrong
    got = compute_advantages(torch.tensor(rewards)).numpy()
    for g in range(7):
        r = rewards[g]
        expected = [(x - np.mean(r)) / (np.std(r, ddof=1) + 1e-6) for x in r]
        np.testing.assert_allclose(got[g], expected, rtol=1e-10, atol=1e-12)
    assert np.all(got[:2] == 0)


def test_overlong_penalty_at_the_boundaries():
    max_len, cache = 20480, 4096
    expected_len = max_len - cache
    lengths = [0, expected_len - 1, expected_len, expected_len + 1, expected_len + 2048, max_len - 1, max_len, max_len + 1]
    got = overlong_penalty(lengths, max_len, cache).tolist()

    def reference(n):
        if n <= expected_len:
            return 0.0
        if n <= max_len:
            return ((max_len - cache) - n) / cache
        return -1.0
    assert got == pytest.approx([reference(n) for n in lengths], abs=1e-15)
    assert got[3] == pytest.approx(-1 / 4096) and got[4] == pytest.approx(-0.5) and got[6] == -1.0


RATIOS = [0.5, 0.79, 0.81, 1.0, 1.27, 1.29, 2.0, 2.9, 3.1, 6.0]  # around 1 - 0.2, 1 + 0.28 and c = 3


@pytest.mark.parametrize("dual_clip_c", [0.0, 3.0])
def test_every_clip_bound_in_value_gradient_and_count(dual_clip_c):
    """One token a row, its ratio just inside and just past each bound, both signs of
    advantage: the per-token gradient is -A r where the objective is unclipped and 0 where a
    bound holds it (below 1 - eps_low for A < 0, above 1 + eps_high for A > 0, above c for
    A < 0 under dual clip); the loss is the mean of the reference's per-token terms."""
    ratios = torch.tensor(RATIOS * 2, dtype=torch.float64)
    adv = torch.tensor([1.0] * len(RATIOS) + [-1.0] * len(RATIOS), dtype=torch.float64)
    old = torch.zeros(len(ratios), 1, dtype=torch.float64)
    new = ratios.log()[:, None].clone().requires_grad_(True)
    mask = torch.ones_like(old)
    loss, m = compute_policy_loss(new, old, adv, mask, 0.2, 0.28, dual_clip_c=dual_clip_c)
    loss.backward()
    held = [(a > 0 and r > 1.28) or (a < 0 and r < 0.8) or (a < 0 and 0 < dual_clip_c < r)
            for r, a in zip(ratios.tolist(), adv.tolist())]
    expected_grad = [0.0 if h else -a * r / len(ratios) for h, r, a in zip(held, ratios.tolist(), adv.tolist())]
    assert new.grad[:, 0].tolist() == pytest.approx(expected_grad, abs=1e-12)
    terms = [reference_loss([[math.log(r)]], [[0.0]], [a], [[1]], 0.2, 0.28, "token-mean", dual_clip_c)
             for r, a in zip(ratios.tolist(), adv.tolist())]
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    if dual_clip_c:  # the cap is reached: a negative-advantage token at ratio 6 costs c, not 6
        assert terms[-1] == pytest.approx(dual_clip_c)
    assert m["actor/clipfrac_high"].item() == pytest.approx(sum(r > 1.28 for r in RATIOS) / len(ratios))
    assert m["actor/clipfrac_low"].item() == pytest.approx(sum(r < 0.8 for r in RATIOS) / len(ratios))


def test_a_ratio_exactly_at_a_bound_is_not_clipped():
    """Ratio exactly 1 against bounds of exactly 1 (eps 0): strict comparisons count nothing."""
    zeros = torch.zeros(2, 1, dtype=torch.float64)
    _, m = compute_policy_loss(zeros, zeros, torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 1), 0.0, 0.0)
    assert m["actor/clipfrac_low"].item() == 0 and m["actor/clipfrac_high"].item() == 0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dual_clip_c", [0.0, 1.5])
def test_truncated_importance_weights_match_reference_in_value_and_gradient(mode, seed, dual_clip_c):
    """TIS: each token's clipped term times min(pi_old / pi_vllm, C), a constant: the engine's
    log-probs drawn so that weights fall below 1, between 1 and C and past C (truncated)."""
    new, old, adv, mask = random_batch(seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    vllm = old + (torch.rand(old.shape, generator=g, dtype=torch.float64) * 3 - 1.5)  # weights e^-1.5 .. e^1.5
    weights = importance_weights(old, vllm, 2.0)
    assert (weights < 1).any() and ((weights > 1) & (weights < 2)).any() and (weights == 2).any()
    new.requires_grad_(True)
    loss, _ = compute_policy_loss(new, old, adv, mask, 0.2, 0.28, mode, dual_clip_c=dual_clip_c, is_weights=weights)
    args = (old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, mode, dual_clip_c, vllm.tolist(), 2.0)
    assert loss.item() == pytest.approx(reference_loss(new.tolist(), *args), rel=1e-12, abs=1e-12)
    plain, _ = compute_policy_loss(new, old, adv, mask, 0.2, 0.28, mode, dual_clip_c=dual_clip_c)
    assert abs(loss.item() - plain.item()) > 1e-3  # the weights count
    loss.backward()
    h = 1e-6
    for i in range(len(adv)):
        for t in range(mask.shape[1]):
            if mask[i, t] == 0 or (i + t) % 3 or (i == 0 and t < 2):  # (0, 0), (0, 1): at a clip's kink
                continue
            plus, minus = new.detach().clone(), new.detach().clone()
            plus[i, t] += h
            minus[i, t] -= h
            fd = (reference_loss(plus.tolist(), *args) - reference_loss(minus.tolist(), *args)) / (2 * h)
            assert new.grad[i, t].item() == pytest.approx(fd, abs=1e-6)


def test_importance_weights_are_constants_truncated_at_the_cap():
    old = torch.tensor([0.0, -1.0, -3.0, -50.0], dtype=torch.float64, requires_grad=True)
    vllm = torch.tensor([0.0, -1.5, -0.5, -1.0], dtype=torch.float64)
    w = importance_weights(old, vllm, 2.0)
    assert w.tolist() == pytest.approx([1.0, math.exp(0.5), math.exp(-2.5), math.exp(-49.0)])
    assert not w.requires_grad
    assert importance_weights(torch.tensor([0.0]), torch.tensor([-5.0]), 2.0).item() == 2.0
