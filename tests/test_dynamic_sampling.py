"""Dynamic sampling's bookkeeping, with the engine replaced by a scripted one: row i's
group has correct[i] right answers out of G. (The real engine runs in test_e2e.py.)"""
import pytest

import train_dapo
from train_dapo import Config, PromptSampler, collect_batch, flatten_batch, resolve

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
    cfg = config(prompts_per_step=5, gen_prompts_per_round=4)
    rows, responses, all_groups, stats = collect_batch(cfg, None, sampler, step=1)
    assert [r["id"] for r in rows] == ["2", "4", "7", "10", "11"]
    assert scripted_engine == [["0", "1", "2", "3"], ["4", "5", "6", "7"], ["8", "9", "10", "11"]]
    assert stats == {"sampling/rounds": 3, "sampling/groups_generated": 12, "sampling/groups_kept": 5,
                     "sampling/filtered_share": 1 - 5 / 12}
    assert len(all_groups) == 12
    assert all(0 < sum(r["acc"] for r in g) < G for g in responses)


def test_cap_stops_with_a_message_naming_the_flags(scripted_engine):
    sampler = PromptSampler(scripted_rows([0, G, 0, 1] * 4), seed=0)
    sampler.order = list(range(16))                              # one mixed group a round
    cfg = config(prompts_per_step=8, gen_prompts_per_round=4, max_gen_rounds=3)
    with pytest.raises(RuntimeError, match="max_gen_rounds") as e:
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
    batch = flatten_batch(cfg, rows, responses)
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
