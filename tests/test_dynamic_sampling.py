"""Dynamic sampling's bookkeeping, with the engine replaced by a scripted one: row i's
group has correct[i] right answers out of G. (The real engine runs in test_e2e.py.)"""
import numpy as np
import pytest

import train_dapo
from train_dapo import Config, PromptSampler, collect_batch, flatten_batch, resolve, rollout_arrays

G = 4


def scripted_rows(correct):
    return [{"id": str(i), "answer": "7", "prompt_ids": [1, 2, 3], "correct": c} for i, c in enumerate(correct)]


@pytest.fixture
def scripted_engine(monkeypatch):
    calls = []

    def generate(llm, cfg, rows, seed):
        calls.append([r["id"] for r in rows])
        return [[{"response_ids": [5] * (3 + k), "text": "Answer: 7" if k < r["correct"] else "Answer: 8",
                  "truncated": k == G - 1 and r["correct"] == 1, "vllm_logprobs": [-0.5] * (3 + k)}
                 for k in range(G)] for r in rows]
    monkeypatch.setattr(train_dapo, "generate", generate)
    return calls


def config(**kw):
    return resolve(Config(group_size=G, mini_batch_size=G, run_dir="unused", **kw))


def test_keeps_only_mixed_groups_and_refills_in_rounds(scripted_engine):
    correct = [0, G, 2, 0, 1, G, 0, 3, G, 0, 2, 1, 0, 0, 3, 2]   # mixed at 2, 4, 7, 10, 11, 14, 15
    sampler = PromptSampler(scripted_rows(correct), seed=0)
    sampler.order = list(range(len(correct)))                    # in order, to know what each round sees
    cfg = config(prompts_per_step=4, gen_prompts_per_round=4)
    rows, responses, all_groups, stats = collect_batch(cfg, None, sampler, step=1)
    assert [r["id"] for r in rows] == ["2", "4", "7", "10"]  # 11, the last round's surplus, is dropped
    assert scripted_engine == [["0", "1", "2", "3"], ["4", "5", "6", "7"], ["8", "9", "10", "11"]]
    assert stats == {"sampling/rounds": 3, "sampling/groups_generated": 12, "sampling/groups_kept": 4,
                     "sampling/groups_surplus": 1, "sampling/filtered_share": 1 - 5 / 12}
    assert len(all_groups) == 12
    assert all(0 < sum(r["acc"] for r in g) < G for g in responses)


def test_cap_stops_with_a_message_naming_the_flags(scripted_engine):
    sampler = PromptSampler(scripted_rows([0, G, 0, 1] * 4), seed=0)
    sampler.order = list(range(16))                              # one mixed group a round
    cfg = config(prompts_per_step=8, gen_prompts_per_round=4, max_gen_rounds=3)
    with pytest.raises(train_dapo.RunError, match="max_gen_rounds") as e:
        collect_batch(cfg, None, sampler, step=7)
    assert "only 3 of 8" in str(e.value) and "after 3 rounds" in str(e.value) and "--dynamic_sampling false" in str(e.value)
    assert len(scripted_engine) == 3


def test_without_dynamic_sampling_every_group_is_kept_in_one_round(scripted_engine):
    sampler = PromptSampler(scripted_rows([0, G, 2, 0, 1, G]), seed=0)
    cfg = config(prompts_per_step=6, gen_prompts_per_round=2, dynamic_sampling=False)
    rows, _, _, stats = collect_batch(cfg, None, sampler, step=1)
    assert len(rows) == 6 and stats["sampling/rounds"] == 1 and stats["sampling/filtered_share"] == 0


@pytest.mark.parametrize("filtering", [True, False])
def test_overlong_filtering_masks_truncated_responses(scripted_engine, filtering):
    sampler = PromptSampler(scripted_rows([1, 2]), seed=0)
    cfg = config(prompts_per_step=2, gen_prompts_per_round=2, overlong_filtering=filtering, dynamic_sampling=False)
    rows, responses, _, _ = collect_batch(cfg, None, sampler, step=1)
    batch = flatten_batch(cfg, rollout_arrays(rows, responses))
    truncated = [r["truncated"] for g in responses for r in g]
    assert sum(truncated) == 1
    for i, t in enumerate(truncated):
        length = len(batch["response_ids"][i])
        assert batch["mask"][i, :length].sum() == (0 if t and filtering else length)


def test_soft_overlong_punishment_is_added_to_the_reward(scripted_engine):
    sampler = PromptSampler(scripted_rows([2]), seed=0)
    cfg = config(prompts_per_step=1, gen_prompts_per_round=1, max_response_len=8, overlong_cache_len=4)
    _, responses, _, _ = collect_batch(cfg, None, sampler, step=1)
    # lengths 3, 4, 5, 6 against L_max 8, L_cache 4: penalties 0, 0, -1/4, -2/4
    assert [r["reward"] for r in responses[0]] == [1.0, 1.0, -1.25, -1.5]


def test_sampler_visits_every_prompt_once_per_epoch():
    sampler = PromptSampler(scripted_rows([0] * 10), seed=3)
    seen = [r["id"] for r in sampler.next(7) + sampler.next(3)]
    assert sorted(seen) == [str(i) for i in range(10)]
    assert sorted(r["id"] for r in sampler.next(10)) == sorted(seen)


def test_the_rollout_travels_as_arrays_and_unfolds_on_each_trainer(scripted_engine):
    """The driver sends arrays (a prompt per group, no mask); each trainer's batch is what a
    plain loop over the groups gives."""
    import pickle
    sampler = PromptSampler(scripted_rows([1, 2, 3]), seed=0)
    cfg = config(prompts_per_step=3, gen_prompts_per_round=3, dynamic_sampling=False)
    rows, responses, _, _ = collect_batch(cfg, None, sampler, step=1)
    rollout = rollout_arrays(rows, responses)
    assert all(isinstance(v, np.ndarray) for k in ("prompt_ids", "response_ids", "vllm_logprobs") for v in rollout[k])
    assert len(rollout["prompt_ids"]) == 3 and "mask" not in rollout
    batch = flatten_batch(cfg, pickle.loads(pickle.dumps(rollout)))
    i = 0
    for row, group in zip(rows, responses):
        for r in group:
            assert batch["prompt_ids"][i] == list(row["prompt_ids"]) and batch["response_ids"][i] == list(r["response_ids"])
            n = len(r["response_ids"])
            assert batch["vllm_logprobs"][i, :n].tolist() == pytest.approx(list(r["vllm_logprobs"]))
            assert not batch["vllm_logprobs"][i, n:].any()
            assert batch["rewards"][i] == pytest.approx(r["reward"])
            i += 1
    assert i == len(batch["response_ids"]) == 12


def test_answers_checked_by_a_pool_of_processes_score_as_in_this_one():
    texts = ["Answer: 7", "Answer: 8", "Answer: \\frac{14}{2}", "no answer", "Answer: 7.0", "Answer: " + "9" * 5000,
             "Answer: \\boxed{7}", "Answer: 2^{2^{2^{2^{2^{2}}}}}"] * 3
    rows = [{"answer": "7"}] * 6
    cfg = config(prompts_per_step=6, max_response_len=8, overlong_cache_len=4)

    def groups():
        return [[{"text": texts[g * G + k], "response_ids": [5] * (2 + g + k)} for k in range(G)] for g in range(6)]
    serial, parallel = groups(), groups()
    train_dapo.score_responses(cfg, rows, serial)
    pool = train_dapo.scoring_pool(2)
    try:
        train_dapo.score_responses(cfg, rows, parallel, pool)
    finally:
        pool.shutdown()
    assert [[(r["acc"], r["reward"]) for r in g] for g in parallel] == [[(r["acc"], r["reward"]) for r in g] for g in serial]
    assert {r["acc"] for g in serial for r in g} == {0, 1} and any(r["reward"] < -1 for g in serial for r in g)


def test_compact_keeps_what_the_trainer_reads_of_vllms_outputs():
    from types import SimpleNamespace as NS
    completion = NS(token_ids=[4, 9, 2], text="Answer: 7", finish_reason="stop",
                    logprobs=[{4: NS(logprob=-0.5), 1: NS(logprob=-2.0)}, {9: NS(logprob=-0.25)}, {2: NS(logprob=-1.0)}])
    (request,) = train_dapo.compact([NS(outputs=[completion])])
    (c,) = request.outputs
    assert c.token_ids.dtype == np.int32 and c.token_ids.tolist() == [4, 9, 2]
    assert c.logprobs.tolist() == [-0.5, -0.25, -1.0] and (c.text, c.finish_reason) == ("Answer: 7", "stop")


@pytest.mark.parametrize("seeded", [True, False])
def test_per_request_seeds_are_a_switch(seeded):
    """On: each prompt's request its own seed (sample j of prompt i draws from seed + i * G + j);
    off: none, vLLM's engine-wide generator samples."""
    from types import SimpleNamespace
    seen = []

    class Engine:
        def generate(self, prompts, params, use_tqdm=False):
            seen.extend(params)
            reply = SimpleNamespace(token_ids=[5, 6], logprobs=[{5: SimpleNamespace(logprob=-1.0)},
                                                                {6: SimpleNamespace(logprob=-2.0)}],
                                    text="Answer: 7", finish_reason="stop")
            return [SimpleNamespace(outputs=[reply] * G) for _ in prompts]
    cfg = config(per_request_seeds=seeded)
    groups = train_dapo.generate(Engine(), cfg, scripted_rows([1, 2, 3]), seed=1000)
    assert [p.seed for p in seen] == ([1000, 1000 + G, 1000 + 2 * G] if seeded else [None] * 3)
    assert [len(g) for g in groups] == [G] * 3 and groups[0][0]["vllm_logprobs"].tolist() == [-1.0, -2.0]


def test_checks_cut_short_are_counted_in_the_steps_metrics(monkeypatch):
    """A check that ran out of time scores -1 without a verdict: counted in reward/timeouts."""
    def compute_score(text, answer):
        return {"score": -1.0, "acc": False, "pred": None, "timeout": "slow" in text}
    monkeypatch.setattr(train_dapo, "compute_score", compute_score)
    cfg = config(prompts_per_step=2, max_response_len=8, overlong_cache_len=4)
    groups = [[{"text": "slow" if (g, k) in {(0, 1), (1, 0), (1, 3)} else "Answer: 8", "response_ids": [5] * 3,
                "truncated": False, "vllm_logprobs": [-0.5] * 3} for k in range(G)] for g in range(2)]
    train_dapo.score_responses(cfg, [{"answer": "7"}] * 2, groups)
    rollout = rollout_arrays([{"prompt_ids": [1]}] * 2, groups)
    assert train_dapo.rollout_metrics(cfg, groups, rollout)["reward/timeouts"] == 3
