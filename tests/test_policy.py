"""The packed, padding-free log-prob path and the update's micro-batching, on a random tiny Qwen2."""
import copy

import pytest
import torch

from demo.base_model import build_model, build_tokenizer
import train_dapo
from train_dapo import (Config, Policy, compute_old_logprobs, compute_policy_loss, dapo_token_loss, importance_weights,
                        my_micro_batches, pack_micro_batches, policy_logprobs, resolve, update_policy)


@pytest.fixture(scope="module")
def model():
    m = build_model(build_tokenizer(), hidden=64, layers=2, seed=1)
    m.config._attn_implementation = "sdpa"
    return Policy(m.double())


def random_sequences(n, seed):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 40, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(3, 40, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    return prompts, responses


@pytest.mark.parametrize("packed", [True, False])
def test_batched_logprobs_equal_one_sequence_at_a_time(model, packed):
    prompts, responses = random_sequences(7, seed=0)
    with torch.no_grad():
        packed, entropy, _ = policy_logprobs(model, prompts, responses, temperature=0.7, with_entropy=True, packed=packed)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            logits = model.lm(torch.tensor([p + r])).logits[0, len(p) - 1:-1] / 0.7
            logp = torch.log_softmax(logits, -1)
            expected = logp.gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            torch.testing.assert_close(packed[i, :len(r)], expected, rtol=0, atol=1e-10)
            torch.testing.assert_close(entropy[i, :len(r)], -(logp.exp() * logp).sum(-1), rtol=0, atol=1e-10)
            assert torch.all(packed[i, len(r):] == 0)


def test_pack_micro_batches_respects_the_budget():
    lengths = [5, 9, 3, 12, 1, 1, 7]
    groups = pack_micro_batches(lengths, budget=12)
    assert [i for g in groups for i in g] == list(range(7))
    assert all(sum(lengths[i] for i in g) <= 12 for g in groups)
    assert groups == [[0], [1, 2], [3], [4, 5, 6]]


def test_micro_batches_group_similar_lengths_within_the_budget():
    """Longest first, so a padded micro-batch wastes little; every index exactly once."""
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 40, (30,), generator=g).tolist()
    batch = {"prompt_ids": [[0] * 3] * 30, "response_ids": [[0] * n for n in lengths]}
    plan = my_micro_batches(Config(micro_batch_tokens=100), batch, list(range(30)))
    total = [[3 + lengths[i] for i in group] for group in plan]
    assert sorted(i for group in plan for i in group) == list(range(30))
    assert all(sum(t) <= 100 for t in total)
    flat = [t for group in total for t in group]
    assert flat == sorted(flat, reverse=True)


def make_batch(mode_seed=0, n=12):
    prompts, responses = random_sequences(n, seed=10 + mode_seed)
    g = torch.Generator().manual_seed(mode_seed)
    T = max(len(r) for r in responses)
    mask = torch.zeros(n, T)
    for i, r in enumerate(responses):
        mask[i, :len(r)] = 1.0
    mask[3] = 0.0  # an overlong-filtered response
    vllm_logprobs = -torch.rand(n, T, generator=g, dtype=torch.float64) * 4  # TIS weights far on both sides of 1
    return {"prompt_ids": prompts, "response_ids": responses, "vllm_logprobs": vllm_logprobs * mask.bool(),
            "advantages": torch.randn(n, generator=g, dtype=torch.float64), "mask": mask.double()}


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_split_and_checkpointing_do_not_change_the_update(model, mode):
    """SGD with lr 1 turns each parameter's change into minus its gradient."""
    deltas = []
    for budget, checkpointing in ((32, False), (80, False), (10_000, False), (80, True)):
        cfg = resolve(Config(mini_batch_size=12, prompts_per_step=3, group_size=4, micro_batch_tokens=budget,
                             max_prompt_len=12, max_response_len=16, overlong_cache_len=4, grad_clip=1e9,
                             loss_agg_mode=mode, run_dir="unused"))
        m = copy.deepcopy(model)
        if checkpointing:
            m.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.train()
        batch = make_batch()
        compute_old_logprobs(cfg, m, batch)
        # ratios on both sides of 1 and past both clip bounds: both signs of advantage carry gradient
        shift = 0.4 * torch.randn(batch["mask"].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        batch["old_logprobs"] = batch["old_logprobs"].double() + shift * batch["mask"]
        before = [p.detach().clone() for p in m.parameters()]
        update_policy(cfg, m, torch.optim.SGD(m.parameters(), lr=1.0), batch, torch.Generator().manual_seed(0))
        deltas.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(m.parameters(), before)]))
    assert deltas[0].abs().max() > 1e-4
    torch.testing.assert_close(deltas[0], deltas[2], rtol=0, atol=1e-12)
    torch.testing.assert_close(deltas[1], deltas[2], rtol=0, atol=1e-12)
    torch.testing.assert_close(deltas[3], deltas[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("tis", ["off", "on"])
def test_one_update_a_step_takes_pi_old_from_its_own_pass(model, mode, tis):
    """With one update a step pi_old is the policy as it stands, so the update's own
    log-probs (detached) stand in for a separate old-log-prob pass: the same update, the
    same old log-probs and actor metrics. More than one update without them is refused."""
    cfg = resolve(Config(mini_batch_size=12, prompts_per_step=3, group_size=4, micro_batch_tokens=80,
                         max_prompt_len=12, max_response_len=16, overlong_cache_len=4, grad_clip=1e9,
                         loss_agg_mode=mode, tis=tis, run_dir="unused"))
    runs = []
    for separate in (True, False):
        m, batch = copy.deepcopy(model), make_batch()
        metrics = compute_old_logprobs(cfg, m, batch) if separate else {}
        before = [p.detach().clone() for p in m.parameters()]
        metrics |= update_policy(cfg, m, torch.optim.SGD(m.parameters(), lr=1.0), batch, torch.Generator().manual_seed(0))
        runs.append((torch.cat([(p.detach() - b).flatten() for p, b in zip(m.parameters(), before)]), metrics,
                     batch["old_logprobs"]))
    (delta, metrics, old), (delta_reused, metrics_reused, old_reused) = runs
    assert delta.abs().max() > 1e-4
    torch.testing.assert_close(delta_reused, delta, rtol=0, atol=1e-10)
    torch.testing.assert_close(old_reused, old, rtol=0, atol=1e-10)
    for key in ("actor/entropy", "actor/gen_prob_mean", "actor/vllm_logprob_diff", "actor/clipfrac_high",
                "tis/weight_mean", "tis/truncated_share"):
        assert metrics_reused[key] == pytest.approx(metrics[key], rel=1e-9, abs=1e-12), key
    cfg.mini_batch_size = 4
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="more than one update a step needs the old log-probs"):
        update_policy(cfg, m, torch.optim.SGD(m.parameters(), lr=1.0), make_batch(), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_logprobs_equal_full_logits_in_value_and_gradient(chunk, temperature):
    from train_dapo import ChunkedLogProbs
    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 97, (50,), generator=g)
    upstream = torch.randn(50, generator=g, dtype=torch.float64)

    logprobs, entropy = ChunkedLogProbs.apply(hidden, weight, labels, temperature, chunk)
    (logprobs * upstream).sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    log_p = torch.log_softmax(hidden @ weight.T / temperature, -1)  # the [N, V] tensor the chunked path avoids
    expected = log_p[torch.arange(50), labels]
    (expected * upstream).sum().backward()
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(got[0], hidden.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], weight.grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h, w: ChunkedLogProbs.apply(h, w, labels, temperature, chunk)[0],
                                    (hidden.detach().requires_grad_(), weight.detach().requires_grad_()))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("chunk", [7, 512])
@pytest.mark.parametrize("tis", ["off", "on"])
def test_fused_loss_equals_the_loss_of_full_logits_in_value_and_gradient(model, mode, chunk, tis, monkeypatch):
    """The update's path (gradients made in the forward, chunk by chunk, per-token loss
    terms) against autograd through the full [tokens x vocab] logits and the padded loss."""
    monkeypatch.setattr(train_dapo, "LOGITS_CHUNK", chunk)
    cfg = resolve(Config(mini_batch_size=12, prompts_per_step=3, group_size=4, max_prompt_len=12, max_response_len=16,
                         overlong_cache_len=4, loss_agg_mode=mode, dual_clip_c=3.0, tis=tis, run_dir="unused"))
    batch, idx = make_batch(mode_seed=2), [0, 3, 5, 6, 9]
    B = len(batch["response_ids"])
    T = batch["mask"].shape[1]
    batch["old_logprobs"] = -torch.rand(B, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4
    normalizer = batch["mask"].sum() if mode == "token-mean" else (batch["mask"].sum(-1) > 0).sum()
    _, _, fused = policy_logprobs(model, [batch["prompt_ids"][i] for i in idx], [batch["response_ids"][i] for i in idx],
                                  0.7, token_loss=dapo_token_loss(cfg, batch, idx, normalizer))
    fused.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    rows = []
    for i in idx:
        p, r = batch["prompt_ids"][i], batch["response_ids"][i]
        logits = model.lm(torch.tensor([p + r])).logits[0, len(p) - 1:-1] / 0.7
        rows.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1))
    logprobs = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    Ti = logprobs.shape[1]
    old = batch["old_logprobs"][idx, :Ti]
    weights = importance_weights(old, batch["vllm_logprobs"][idx, :Ti], 2.0) if tis == "on" else None
    expected, _ = compute_policy_loss(logprobs, old, batch["advantages"][idx], batch["mask"][idx, :Ti], cfg.eps_low,
                                      cfg.eps_high, mode, normalizer, 3.0, weights)
    expected.backward()
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-12)
    assert max(g.abs().max() for g in got) > 1e-3
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-12)
    model.zero_grad()
