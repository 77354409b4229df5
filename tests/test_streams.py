"""Rollouts in segments (--segment_tokens), against fake engines: what a batch holds, which
weights made each token, what is carried and what is dropped, all the same whatever the
engines' and the trainers' speeds, and the same after a restore at any tick. Every reply is
a function of the request and the engines' weights version, as a real engine's is (with its
prefix cache emptied at each install)."""
import hashlib
import pickle
import random
import threading
import sys
import time

import numpy as np
import pytest
import torch

import train_dapo
from train_dapo import Completion, Config, PromptSampler, Request, Rollouts, resolve

EOS = 2
STEPS = 6


class FakeEngines:
    """`engines` engines behind RemoteEngines' generate_shares. A prompt whose first token is
    odd answers at length (a heavy tail: the cap), others stop after a few tokens. Replies
    come back after random delays, in any order, on threads."""

    def __init__(self, engines: int, delay_seed: int | None = None):
        self.ranks, self.version, self.calls = list(range(engines)), 0, []
        self.delays = random.Random(delay_seed) if delay_seed is not None else None

    def answer(self, prompt: list[int], params) -> Request:
        key = f"{prompt},{params.seed},{self.version}".encode()
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8]))
        tokens = []
        while len(tokens) < params.max_tokens:
            tokens.append(EOS if prompt[0] % 2 == 0 and rng.random() < 0.3 else int(rng.integers(3, 40)))
            if tokens[-1] == EOS:
                break
        logprobs = -rng.random(len(tokens)).astype(np.float32) - 0.01 * self.version
        finish = "stop" if tokens[-1] == EOS else "length"
        return Request([Completion(np.array(tokens, dtype=np.int32), logprobs, "", finish)])

    def generate_shares(self, shares: list) -> list:
        self.calls.append([len(prompts) for prompts, _ in shares])
        replies = [None] * len(shares)

        def serve(i, prompts, params):
            if self.delays:
                time.sleep(self.delays.random() * 0.003)
            replies[i] = [self.answer(p["prompt_token_ids"], q) for p, q in zip(prompts, params)]
        threads = [threading.Thread(target=serve, args=(i, *share)) for i, share in enumerate(shares)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return replies


class Words:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == EOS))


def fake_score(text: str, answer: str) -> dict:
    acc = int(hashlib.sha256((text + answer).encode()).digest()[0] % 3 == 0)
    return {"acc": acc, "score": 2.0 * acc - 1, "timeout": False}


ROWS = [{"prompt_ids": [3 + i, 5, 6 + i % 3, 9][: 2 + i % 3], "answer": str(i)} for i in range(40)]  # all differ


def config(K: int = 1, **overrides) -> Config:
    base = dict(prompts_per_step=3, group_size=4, gen_prompts_per_round=6, mini_batch_size=12, max_prompt_len=8,
                max_response_len=24, overlong_cache_len=4, segment_tokens=4, max_staleness=K, total_steps=STEPS,
                rollout_nodes=1, nproc_per_node=2, run_dir="unused")
    return resolve(Config(**base | overrides), check_model=False)


def drive(cfg: Config, engines: FakeEngines, learn_seed: int | None = None, restore_at: set = frozenset()) -> list:
    """train_step's use of the Rollouts, the weights version bumped at each sync; after the
    steps in `restore_at`, the Rollouts are rebuilt from a checkpoint of their state."""
    sampler = PromptSampler(ROWS, seed=0)
    rollouts, pace, out = Rollouts(cfg, engines, sampler, tokenizer=Words()), random.Random(learn_seed), []
    for step in range(1, cfg.total_steps + 1):
        rollout, metrics = rollouts.take(step)
        out.append((rollout, {k: v for k, v in metrics.items() if not k.startswith(("time/", "throughput/"))}))
        if learn_seed is not None:
            time.sleep(pace.random() * 0.01)
        rollouts.idle()
        engines.version = step
        rollouts.weights_loaded(step)
        if step in restore_at:
            saved = pickle.dumps((rollouts.state(), sampler.epoch, sampler.pos))
            rollouts.close()
            state, epoch, pos = pickle.loads(saved)
            sampler = PromptSampler(ROWS, seed=0)
            sampler.epoch, sampler.pos = epoch, pos
            sampler.order = sampler.permutation()
            rollouts = Rollouts(cfg, engines, sampler, tokenizer=Words())
            rollouts.restore(state, version=step)
    rollouts.close()
    return out


def same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (ra, ma), (rb, mb) in zip(a, b):
        assert ma == mb
        assert ra.keys() == rb.keys()
        for key in ra:
            assert all(np.array_equal(x, y) for x, y in zip(ra[key], rb[key])) if isinstance(ra[key], list) \
                else np.array_equal(ra[key], rb[key]), key


@pytest.fixture(autouse=True)
def fake_reward(monkeypatch):
    monkeypatch.setattr(train_dapo, "compute_score", fake_score)


@pytest.mark.parametrize("K", [0, 1, 2])
def test_batches_versions_and_metrics_do_not_depend_on_timing(K):
    """Two engines whose replies arrive in random order and trainers that learn for random
    times: every batch, every token's version and every counted metric are the same."""
    reference = drive(config(K), FakeEngines(2))
    for seed in (1, 2):
        same(drive(config(K), FakeEngines(2, delay_seed=seed), learn_seed=seed), reference)


@pytest.mark.parametrize("K", [0, 1, 2])
def test_a_restore_at_every_install_gives_the_uninterrupted_run(K):
    reference = drive(config(K), FakeEngines(2))
    same(drive(config(K), FakeEngines(2), restore_at=set(range(1, STEPS))), reference)


def test_a_restore_at_every_tick_gives_the_uninterrupted_run(monkeypatch):
    """Within a step too: the state between two ticks is all there is (plain data, pickled),
    with the sampler's position; with an engine that keeps nothing between ticks, a fresh
    Streams from it continues the run exactly."""
    reference = drive(config(1), FakeEngines(2))
    real_tick, ticks = train_dapo.Streams.tick, []

    def tick_and_reload(self):
        done = real_tick(self)
        self.state, done = pickle.loads(pickle.dumps((self.state, done)))
        self.sampler.epoch, self.sampler.pos = pickle.loads(pickle.dumps((self.sampler.epoch, self.sampler.pos)))
        self.sampler.order = self.sampler.permutation()
        ticks.append(1)
        return done
    monkeypatch.setattr(train_dapo.Streams, "tick", tick_and_reload)
    same(drive(config(1), FakeEngines(2)), reference)
    assert len(ticks) > 2 * STEPS


@pytest.mark.parametrize("K", [0, 1, 2])
def test_every_token_is_within_the_staleness_bound_and_drops_are_counted(K):
    cfg = config(K)
    assert cfg.max_token_staleness == (K + 2 if K else 0)
    runs = drive(cfg, FakeEngines(2))
    dropped = 0
    for step, (rollout, metrics) in enumerate(runs, 1):
        versions = np.concatenate(rollout["versions"])
        staleness = step - 1 - versions
        assert staleness.min() >= K if step > K + 1 else staleness.min() >= 0
        assert staleness.max() <= cfg.max_token_staleness, (step, staleness.max())
        for r, v in zip(rollout["response_ids"], rollout["versions"]):
            assert len(r) == len(v) and np.all(np.diff(v) >= 0)  # a response's tokens: versions never go back
        dropped += metrics["sampling/groups_dropped_stale"]
        assert metrics["sampling/groups_kept"] == cfg.prompts_per_step
    if K == 0:  # nothing carries: every group running at an install is dropped
        assert dropped > 0
    # the tightest bound keeps every token within it
    for step, (rollout, _) in enumerate(drive(config(K, max_token_staleness=K), FakeEngines(2)), 1):
        assert (step - 1 - np.concatenate(rollout["versions"])).max() <= K


def test_with_overlap_long_responses_span_weight_versions():
    """K = 1: groups at the cap run on across installs, their later tokens from newer weights."""
    runs = drive(config(1), FakeEngines(2))
    mixed = [v for rollout, _ in runs for v in rollout["versions"] if len(set(v.tolist())) > 1]
    assert mixed, "no response continued under new weights"


def test_a_batch_is_the_first_informative_groups_in_sampler_order():
    """Recomputed from the groups as they finished: the batch holds, in order, the first
    prompts_per_step informative groups after the last batch's, dropped ones passed over."""
    cfg = config(1)
    engines, sampler = FakeEngines(2), PromptSampler(ROWS, seed=0)
    rollouts = Rollouts(cfg, engines, sampler, tokenizer=Words())
    finished = {}
    real_absorb = rollouts.streams.absorb

    def absorb(done):
        real_absorb(done)
        for g in done:
            finished[g["index"]] = rollouts.streams.state["window"]["groups"][-len(done):][done.index(g)]
    rollouts.streams.absorb = absorb
    order = PromptSampler(ROWS, seed=0).next(200)
    taken = 0  # groups consumed so far, by index
    for step in range(1, STEPS + 1):
        rollout, metrics = rollouts.take(step)
        first = [row["prompt_ids"] for row in order]
        expected = []
        while len(expected) < cfg.prompts_per_step:
            g = finished.get(taken)
            if g is not None and g["informative"] and g["born"] >= step - 1 - cfg.max_token_staleness:
                expected.append(first[taken])
            taken += 1
        assert [p.tolist() for p in rollout["prompt_ids"]] == expected
        rollouts.idle()
        engines.version = step
        rollouts.weights_loaded(step)
    rollouts.close()


def test_new_groups_go_to_the_engine_with_the_fewest_running_tokens():
    cfg = config(0)
    engines = FakeEngines(3)
    streams = train_dapo.Streams(cfg, engines, PromptSampler(ROWS, seed=0), Words())
    streams.refill()
    load = [0, 0, 0]
    for g in streams.state["running"]:  # placed one by one, each on the least loaded so far (ties: the first)
        assert g["engine"] == load.index(min(load))
        load[g["engine"]] += cfg.group_size * len(g["row"]["prompt_ids"])
    streams.tick()
    streams.state["running"].pop(1)  # as if finished: a slot to refill, its engine's load down
    running_tokens = [sum(len(g["row"]["prompt_ids"]) + len(s["response_ids"]) for g in streams.state["running"]
                      if g["engine"] == e for s in g["samples"] if not s["finish"]) for e in range(3)]
    before = len(streams.state["running"])
    streams.refill()
    assert streams.state["running"][before]["engine"] == running_tokens.index(min(running_tokens))
    assert running_tokens.index(min(running_tokens)) != 0  # a choice the ties alone would not make


def test_each_sample_has_its_own_seed_per_segment():
    cfg = config(0)
    seeds = {train_dapo.segment_seed(cfg, i, j, s) for i in range(20) for j in range(4) for s in range(6)}
    assert len(seeds) == 20 * 4 * 6 and all(0 <= x < 2**63 for x in seeds)
    assert train_dapo.segment_seed(cfg, 3, 1, 2) != train_dapo.segment_seed(config(0, seed=1), 3, 1, 2)


def test_segments_as_long_as_the_responses_finish_every_sample_in_one_tick():
    cfg = config(0, segment_tokens=24)
    engines = FakeEngines(1)
    streams = train_dapo.Streams(cfg, engines, PromptSampler(ROWS, seed=0), Words())
    streams.refill()
    assert len(streams.tick()) == cfg.gen_prompts_per_round and not streams.state["running"]


def test_dynamic_sampling_gives_up_with_the_flag_to_raise(monkeypatch):
    monkeypatch.setattr(train_dapo, "compute_score", lambda text, answer: {"acc": 1, "score": 1.0, "timeout": False})
    cfg = config(0, max_gen_rounds=2)
    rollouts = Rollouts(cfg, FakeEngines(1), PromptSampler(ROWS, seed=0), tokenizer=Words())
    error = rollouts.take(1)
    assert isinstance(error, train_dapo.RunError)
    assert "after 12 groups" in str(error) and "--max_gen_rounds" in str(error)


# ---------------------------------------------------------------- with vLLM: two engines, kills, one engine
SEGMENTS = ("--segment_tokens", "8", "--rollout_nodes", "2")  # start_run's 3 processes: 1 trainer, 2 engines


def streamed_run(model_dir, run_dir, *flags) -> dict:
    from conftest import start_run
    from test_checkpoint import step_metrics
    proc = start_run(model_dir, run_dir, 4, *SEGMENTS, *flags)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "1 trainer(s), 2 rollout process(es)" in out, err[-3000:]
    return step_metrics(run_dir)


@pytest.fixture(scope="module")
def streamed(tiny_model_dir, tmp_path_factory):
    """Two engines in segments of 8 tokens, K = 1 and K = 2, uninterrupted."""
    return {K: streamed_run(tiny_model_dir, tmp_path_factory.mktemp(f"streamed-{K}"), "--max_staleness", str(K))
            for K in (1, 2)}


@pytest.mark.parametrize("K, victim", [(1, "rollout engine 1 (rank 2)"), (2, "trainer 0 (rank 0)")])
def test_a_killed_engine_or_driver_with_segments_resumes_step_for_step(tiny_model_dir, tmp_path, streamed, K, victim):
    """Samples in flight at the checkpoint (tokens, versions, engines) carry over: the rerun
    logs what the uninterrupted run logs, step for step."""
    from test_distributed import kill_and_rerun
    kill_and_rerun(tiny_model_dir, tmp_path, victim, streamed[K], "1 trainer(s), 2 rollout process(es)",
                   *SEGMENTS, "--max_staleness", str(K))


def test_two_engines_stream_the_samples_one_engine_in_the_trainers_process_does(tiny_model_dir, tmp_path):
    """K = 0, segments: the groups split over two engine processes, or all on the engine in the
    trainer's process; every sample is seeded by its group, sample and segment alone, and vLLM
    on CPU computes a request the same in any batch: the same metrics, step for step. (On a
    GPU this needs vLLM's batch-invariant kernels; the choices stay the same either way.)"""
    from test_checkpoint import step_metrics
    from test_preemption import run, run_flags
    two = streamed_run(tiny_model_dir, tmp_path / "two", "--max_staleness", "0")
    run([sys.executable, "train_dapo.py", *run_flags(tiny_model_dir, tmp_path / "one"), "--total_steps", "4",
         "--segment_tokens", "8"])
    one = step_metrics(tmp_path / "one")
    assert one.keys() == two.keys()
    for step in one:
        assert {k: v for k, v in one[step].items() if k.startswith(("reward/", "sampling/", "response/"))} == \
               {k: v for k, v in two[step].items() if k.startswith(("reward/", "sampling/", "response/"))}, step


LONG = [[3 + i % 5, 9, 4 + 2 * (i % 5), 12] * 50 for i in range(6)]  # 200 tokens: KV blocks vLLM caches


def sampled(llm, prompts) -> tuple[list, list]:
    """Greedy tokens and their log-probs (prompt log-probs would skip vLLM's prefix cache)."""
    from vllm import SamplingParams
    outs = train_dapo.compact(llm.generate([{"prompt_token_ids": p} for p in prompts],
                                           SamplingParams(temperature=0, max_tokens=8, logprobs=0), use_tqdm=False))
    return [o.outputs[0].token_ids.tolist() for o in outs], np.concatenate([o.outputs[0].logprobs for o in outs])


@pytest.mark.parametrize("reset", [True, False])
def test_a_sync_empties_the_prefix_cache_of_long_prompts(tiny_model_dir, tmp_path, monkeypatch, reset):
    """A continuation is a prompt longer than a KV block: after a sync the engine must not
    answer it from KV of the old weights. Prompts of 200 tokens, seen before the sync; after
    it the engine answers as a fresh engine from the new weights, and without the reset it
    does not (the check can see stale KV)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg = config(0, max_prompt_len=216, dtype="float32")
    llm, _ = train_dapo.make_rollout_engine(tiny_model_dir, 240, "float32", seed=0)
    assert llm.llm_engine.vllm_config.cache_config.block_size < len(LONG[0])
    sampled(llm, LONG)  # cached under the old weights
    if not reset:
        monkeypatch.setattr(llm, "reset_prefix_cache", lambda *args: None)
    policy = train_dapo.Policy(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    train_dapo.sync_weights(cfg, llm, policy)
    policy.lm.save_pretrained(tmp_path / "moved")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "moved")
    fresh, _ = train_dapo.make_rollout_engine(str(tmp_path / "moved"), 240, "float32", seed=0)
    (live_tokens, live_lp), (fresh_tokens, fresh_lp) = sampled(llm, LONG), sampled(fresh, LONG)
    agree = live_tokens == fresh_tokens and np.abs(live_lp - fresh_lp).max() < 1e-4
    assert agree == reset, np.abs(live_lp - fresh_lp).max() if live_tokens == fresh_tokens else "tokens differ"
