"""RL: the maths against hand computations, rollouts against the policy's own log-probs, a
tiny run that must raise a toy reward, and resume in the middle of an iteration."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kotonoha.checkpoint import load_model, save_model
from kotonoha.config import load_config
from kotonoha.errors import UserError
from kotonoha.model import Transformer, preset
from kotonoha.tokenizer import sample_text_paths, train_bpe
from kotonoha.train.loop import Dist
from kotonoha.train.lora import load_adapter
from kotonoha.train.rl import (
    RL_TRAIN_DEFAULTS,
    RLConfig,
    RLRun,
    arithmetic_reward,
    checker_reward,
    group_advantages,
    kl_k3,
    load_prompts,
    make_reward_fn,
    masked_mean,
    pack_rollout_rows,
    ppo_clip_loss,
    run_rl,
    sequence_logprobs,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, two thrash on 2 cores
    yield
    torch.set_num_threads(before)


# --- the maths ----------------------------------------------------------------------------------


def test_group_advantages() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 0.0, 1.0])
    adv = group_advantages(r, 4)
    # group 1: mean 0.5, std 0.5 -> +-1; group 2: all equal -> 0, not NaN
    assert torch.allclose(adv[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(adv[4:8], torch.zeros(4))
    g3 = torch.tensor([0.0, 3.0, 0.0, 1.0])
    assert torch.allclose(adv[8:], (g3 - 1.0) / (g3.std(unbiased=False) + 1e-6))
    for k in range(3):  # each group is centred
        assert abs(float(adv[4 * k:4 * k + 4].sum())) < 1e-5
    assert torch.allclose(group_advantages(r, 4, normalize_std=False)[:4],
                          torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # positive_only: the same advantages with the negative ones at 0 (nothing pushed down)
    pos = group_advantages(r, 4, positive_only=True)
    assert torch.equal(pos, adv.clamp_min(0.0))
    assert torch.allclose(pos[:4], torch.tensor([1.0, 0.0, 0.0, 1.0]), atol=1e-5)
    with pytest.raises(ValueError):
        group_advantages(r, 5)


def test_ppo_clip_against_hand_computation() -> None:
    eps = 0.2
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1, 0.9])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, -2.0])
    old = torch.zeros(6)
    logp = torch.log(ratio).requires_grad_(True)
    loss, clipped = ppo_clip_loss(logp, old, adv, eps)
    # -min(r A, clip(r) A): (1.5, +1) -> -1.2 clipped; (0.5, +1) -> -0.5 not; (0.5, -1) -> 0.8
    # clipped; (1.5, -1) -> 1.5 not; inside the range: -r A
    expected = torch.tensor([-1.2, -0.5, 0.8, 1.5, -2.2, 1.8])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert clipped.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    loss.sum().backward()
    # d/dlogp (-r A) = -r A where unclipped; exactly 0 where the clip is active
    grad = torch.where(clipped.bool(), torch.zeros(6), -ratio * adv)
    assert torch.allclose(logp.grad, grad, atol=1e-6)


def test_kl_k3_sign_zero_and_unbiased() -> None:
    x = torch.randn(100)
    assert torch.allclose(kl_k3(x, x), torch.zeros(100))
    assert (kl_k3(x, x + torch.randn(100)) >= 0).all()
    # On tokens sampled from p, the mean of k3 estimates KL(p || q).
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(10, generator=g), 0)
    q = torch.softmax(torch.randn(10, generator=g), 0)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=g)
    estimate = kl_k3(p.log()[tokens], q.log()[tokens]).mean()
    exact = (p * (p.log() - q.log())).sum()
    assert float(estimate) == pytest.approx(float(exact), rel=0.03)


def test_masked_mean_ignores_padding_and_empty() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(masked_mean(x, mask)) == pytest.approx(2.0)
    assert float(masked_mean(x, torch.zeros_like(mask))) == 0.0


def test_arithmetic_reward() -> None:
    prompts = [{"answer": 85}, {"answer": "12"}]
    replies = ["7 + 8 = 15, write 5 carry 1. So the answer is 85.", "The answer is 13."]
    assert arithmetic_reward(prompts, replies) == [1.0, 0.0]
    with pytest.raises(UserError):
        arithmetic_reward([{"messages": []}], ["3"])


def test_checker_reward_and_world_prompts(tmp_path: Path) -> None:
    from kotonoha.data.world import write_world

    write_world(tmp_path / "world", seed=0, scale=0.05, show_progress=False)
    world = str(tmp_path / "world")
    every = load_prompts(RLConfig(world=world, prompts="world-sft"))
    checked = load_prompts(RLConfig(world=world, prompts="world-sft", reward="checker"))
    assert 0 < len(checked) < len(every)  # corrections have nothing single to check
    assert all("check" in p for p in checked)
    # The default pool is the practice conversations: every one checkable, cut before its reply.
    practice = load_prompts(RLConfig(world=world, reward="checker"))
    assert len(practice) == len(load_prompts(RLConfig(world=world))) > 0
    assert all(p["messages"][-1]["role"] == "user" for p in practice)
    assert {p["check"]["task"] for p in practice} >= {"qa", "false_premise", "refusal"}
    qa = next(p for p in checked if p["check"]["task"] == "qa")
    refusal = next(p for p in checked if p["check"]["task"] == "refusal")
    answer = qa["check"]["answer"]
    assert checker_reward([qa, qa], [f"It is {answer}.", "I do not know."]) == [1.0, 0.0]
    assert checker_reward([refusal], ["I'm sorry, but I can't help with that."]) == [1.0]
    # An eval item carries the checker's fields itself.
    item = {"task": "qa", "answer": "Honlo", "messages": []}
    assert checker_reward([item], ["The capital is Honlo."]) == [1.0]
    with pytest.raises(UserError, match="model\\+checker"):
        make_reward_fn(RLConfig(reward="nonsense"), torch.device("cpu"))


# --- a tiny policy ------------------------------------------------------------------------------


def reward_space(prompts: list[dict], replies: list[str]) -> list[float]:
    """The toy verifiable reward: 1 when the reply contains a space (~20% at the start)."""
    return [float(" " in r) for r in replies]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rl")
    tok = train_bpe([p.read_text(encoding="utf-8") for p in sample_text_paths()], vocab_size=300)
    torch.manual_seed(0)
    save_model(root / "policy", Transformer(preset("tiny", vocab_size=tok.vocab_size,
                                                   context_length=64)), tok)
    prompts = [{"messages": [{"role": "user", "content": f"Say something, number {i}."}]}
               for i in range(16)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return root


def config(root: Path, out: str, *extra: str) -> RLConfig:
    return load_config(RLConfig, None, [
        f"model={root / 'policy'}", f"out={root / out}", f"prompts={root / 'prompts.jsonl'}",
        "group_size=4", "prompts_per_rollout=4", "max_new_tokens=6", "eval_items=0",
        "train.batch_size=16", "train.device=cpu", "train.progress=false", "train.plot=false",
        *extra], base={"train": RL_TRAIN_DEFAULTS})


def test_rollout_logprobs_are_the_policys(setup: Path) -> None:
    cfg = config(setup, "unused")
    policy, tok = load_model(setup / "policy", dtype=torch.float32)
    ref, _ = load_model(setup / "policy", dtype=torch.float32)
    run = RLRun(cfg, policy, ref, tok, load_prompts(cfg), reward_space, Dist(), setup)
    r = run.make_rollout(0)
    assert r.ids.shape[0] == 16 and r.mask.sum(1).tolist() == r.length.tolist()
    # The engine's (KV-cached, one token at a time) log-probs are the full forward's.
    full = sequence_logprobs(policy, r.ids)
    assert torch.allclose(r.old_logp * r.mask, full * r.mask, atol=1e-4)
    assert torch.allclose(r.ref_logp, full * r.mask, atol=1e-4)  # reference = policy here
    assert r.adv.view(4, 4).sum(1).abs().max() < 1e-4  # group-relative
    # rl.positive_only reaches the rollouts: the same samples, the negative advantages at 0.
    pos_cfg = config(setup, "unused", "positive_only=true")
    pos = RLRun(pos_cfg, policy, ref, tok, load_prompts(pos_cfg), reward_space, Dist(), setup
                ).make_rollout(0)
    assert torch.equal(pos.ids, r.ids) and (r.adv < 0).any()
    assert torch.equal(pos.adv, r.adv.clamp_min(0.0))


def test_packed_rollout_rows_carry_the_padded_rows_numbers(setup: Path) -> None:
    """Training batches lay the rollout's right-padded rows end to end: fewer rows, and
    per sequence the same targets, old and reference log-probs, advantages and policy
    log-probs as the padded rows."""
    cfg = config(setup, "unused")
    policy, tok = load_model(setup / "policy", dtype=torch.float32)
    ref, _ = load_model(setup / "policy", dtype=torch.float32)
    r = RLRun(cfg, policy, ref, tok, load_prompts(cfg), reward_space, Dist(), setup
              ).make_rollout(0)
    # Rows twice as wide as the rollout's (the tiny model's context fits one sequence).
    b = pack_rollout_rows(r.tensors(), 2 * r.ids.shape[1])
    assert b["ids"].numel() <= r.ids.numel() and b["ids"].shape[0] < r.ids.shape[0]
    own = b["seq"] >= 0

    def per_row(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(r.ids)).index_add(0, b["seq"][own], values[own])

    with torch.no_grad():
        logits = policy(b["ids"][:, :-1], positions=b["positions"][:, :-1],
                        segments=b["segments"][:, :-1])
        logp = torch.log_softmax(logits, -1).gather(-1, b["ids"][:, 1:, None])[..., 0]
    assert torch.equal(per_row(b["mask"]), r.mask.sum(1))
    for packed, padded in ((b["old_logp"], r.old_logp), (b["ref_logp"], r.ref_logp),
                           (logp, sequence_logprobs(policy, r.ids))):
        assert torch.allclose(per_row(packed * b["mask"]), (padded * r.mask).sum(1), atol=1e-4)
    assert torch.equal(b["adv"][own], r.adv[b["seq"][own]])
    assert torch.equal(b["length"], r.length) and torch.equal(b["reward"], r.reward)


def test_tiny_rl_run_raises_the_reward(setup: Path) -> None:
    run_dir = run_rl(config(setup, "rl", "train.steps=16", "train.lr=1e-2", "probe_prompts=16",
                            "ppo_epochs=2"), reward_fn=reward_space)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["probe_reward_before"] < 0.4
    assert summary["probe_reward_after"] > summary["probe_reward_before"] + 0.3
    assert summary["reward_last"] > summary["reward_first"]
    assert summary["iterations"] == 8  # 16 steps / (2 epochs x 1 minibatch)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is the reference
    assert train[0]["clip_frac"] == 0.0  # ratio 1 on the iteration's first step
    assert all(math.isfinite(r["entropy"]) and r["length"] > 0 for r in train)
    assert any(r["clip_frac"] > 0 for r in train[1::2])  # second epochs are off-policy
    assert max(r["kl"] for r in train) > 0
    assert (run_dir / "model.safetensors").is_file()
    rollouts = (run_dir / "rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 8 and json.loads(rollouts[0])["samples"]


def test_arithmetic_reward_run_scores_only_arithmetic_eval_items(setup: Path,
                                                                  tmp_path: Path) -> None:
    """reward=arithmetic with QA among the held-out eval tasks: the eval reward is the mean over
    arithmetic items (a QA item's answer is a name, which the arithmetic rule cannot read)."""
    from kotonoha.data.world import write_world

    write_world(tmp_path / "world", seed=0, scale=0.05, show_progress=False)
    sums = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": i + 1}
            for i in range(4)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(p) + "\n" for p in sums))
    run_dir = run_rl(config(setup, "rl-arith", "reward=arithmetic", "train.steps=1",
                            f"prompts={tmp_path / 'sums.jsonl'}", f"world={tmp_path / 'world'}",
                            "eval_tasks=[qa,arithmetic]", "eval_items=1", "probe_prompts=0"))
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "eval_reward" in r]
    assert evals and all(0.0 <= r["eval_reward"] <= 1.0 for r in evals)
    assert all("eval_qa" in r and "eval_arithmetic" in r for r in evals)


def test_lora_rl_run_uses_the_adapter_free_model_as_reference(setup: Path) -> None:
    """With lora= the policy trains adapters only; the KL reference is the same model with
    its adapters off, so KL starts at 0 and grows; the run saves the adapter and the merge."""
    run_dir = run_rl(config(setup, "rl-lora", "lora=r=4,alpha=8", "train.steps=6",
                            "train.lr=3e-2", "probe_prompts=0", "ppo_epochs=2"),
                     reward_fn=reward_space)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5) and max(r["kl"] for r in train) > 0
    assert (run_dir / "adapter.safetensors").is_file()
    base, tok = load_model(setup / "policy", dtype=torch.float32)
    merged, _ = load_model(run_dir)
    adapted = load_adapter(load_model(setup / "policy", dtype=torch.float32)[0], run_dir)
    ids = torch.tensor([tok.encode("Say a word")])
    with torch.no_grad():
        assert torch.allclose(merged(ids), adapted(ids), atol=1e-4)
        assert not torch.allclose(merged(ids), base(ids), atol=1e-4)


def test_resume_mid_iteration_matches_uninterrupted(setup: Path) -> None:
    common = ("train.lr=1e-2", "ppo_epochs=2", "probe_prompts=0", "train.checkpoint_interval=1")
    straight = run_rl(config(setup, "straight", "train.steps=3", *common), reward_fn=reward_space)
    config_1 = config(setup, "resumed", "train.steps=1", *common)
    run_rl(config_1, reward_fn=reward_space)  # "crashes" after step 1, inside iteration 0
    resumed = run_rl(config(setup, "resumed", "train.steps=3", *common), resume=True,
                     reward_fn=reward_space)
    a, _ = load_model(straight)
    b, _ = load_model(resumed)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert len((resumed / "rollouts.jsonl").read_text().splitlines()) == 2
    with pytest.raises(UserError, match="resume"):
        run_rl(config_1, reward_fn=reward_space)  # a fresh run over an existing one


def test_bad_settings(setup: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="group_size"):
        config(setup, "x", "group_size=1")
    with pytest.raises(UserError, match="batch_size"):
        run_rl(config(setup, "x", "train.batch_size=5"), reward_fn=reward_space)
    with pytest.raises(UserError, match="Unknown reward"):
        run_rl(config(setup, "y", "reward=nonsense"))
    (tmp_path / "bad.jsonl").write_text('{"text": "no messages"}\n')
    with pytest.raises(UserError, match="messages"):
        load_prompts(config(setup, "z", f"prompts={tmp_path / 'bad.jsonl'}"))


def crash_at(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the trainer die (like a kill) when it is about to train optimizer step `step`."""
    from kotonoha.train import loop

    real = loop.Trainer.train_step

    def train_step(self: loop.Trainer) -> Any:
        if self.step == step:
            raise RuntimeError("killed")
        return real(self)

    monkeypatch.setattr(loop.Trainer, "train_step", train_step)


def rollout_iterations(run_dir: Path) -> list[int]:
    return [json.loads(line)["iteration"]
            for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]


def test_resume_after_the_next_iteration_began_reuses_the_checkpoints_samples(
        setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 steps per iteration, a checkpoint at step 3 (inside iteration 1), then iteration 2's
    rollout, then a crash: the resume trains step 3 on iteration 1's saved samples, not on
    samples drawn again from newer weights, and logs each iteration once."""
    common = ("train.lr=1e-2", "ppo_epochs=2", "probe_prompts=0", "train.steps=6",
              "train.checkpoint_interval=3")
    straight = run_rl(config(setup, "straight-6", *common), reward_fn=reward_space)
    crash_at(5, monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        run_rl(config(setup, "crashed-6", *common), reward_fn=reward_space)
    monkeypatch.undo()
    resumed = run_rl(config(setup, "crashed-6", *common), resume=True, reward_fn=reward_space)
    a, _ = load_model(straight)
    b, _ = load_model(resumed)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert rollout_iterations(straight) == rollout_iterations(resumed) == [0, 1, 2]


@pytest.mark.parametrize("resume", [False, True])
def test_a_new_run_over_an_interrupted_one_reuses_none_of_its_files(
        setup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resume: bool) -> None:
    """An RL run killed before its first checkpoint, then another policy trained into the same
    folder (fresh, or resumed with nothing to resume): no stale rollout, log or evaluation."""
    tok = load_model(setup / "policy")[1]
    torch.manual_seed(1)
    other = save_model(tmp_path / "other", Transformer(preset("tiny", vocab_size=tok.vocab_size,
                                                              context_length=64)), tok)
    common = ("train.steps=2", "probe_prompts=4", "train.lr=1e-2")
    crash_at(1, monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        run_rl(config(tmp_path, "rl", f"model={setup / 'policy'}",
                      f"prompts={setup / 'prompts.jsonl'}", *common), reward_fn=reward_space)
    assert (tmp_path / "rl" / "eval_before.json").is_file()
    assert list((tmp_path / "rl" / "rollout").iterdir())
    monkeypatch.undo()
    runs = [run_rl(config(tmp_path, out, f"model={other}", f"prompts={setup / 'prompts.jsonl'}",
                          *common), resume=resume, reward_fn=reward_space)
            for out in ("rl", "clean")]
    reused, clean = ((json.loads((r / "eval_before.json").read_text()), load_model(r)[0])
                     for r in runs)
    assert reused[0] == clean[0]
    for (name, x), (_, y) in zip(reused[1].state_dict().items(), clean[1].state_dict().items()):
        assert torch.equal(x, y), name
    assert rollout_iterations(runs[0]) == rollout_iterations(runs[1]) == [0, 1]
