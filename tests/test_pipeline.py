"""The whole recipe on configs/pipeline-tiny.yaml: every stage moves its own metric the right
way, the report card is written, and a second run skips what is done."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kotonoha.data.world import PRACTICE_KINDS
from kotonoha.errors import UserError
from kotonoha.pipeline import (
    STAGES,
    load_pipeline_config,
    pipeline_main,
    settings_hash,
    stage_eval,
    stage_sft,
    wire,
)

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "pipeline-tiny.yaml")
DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "pipeline-demo.yaml")
QUIET = ["progress=false"]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, two thrash on 2 cores
    yield
    torch.set_num_threads(before)


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_tiny_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "run"
    t0 = time.perf_counter()
    results = pipeline_main(TINY, [f"out={out}", *QUIET])
    first = time.perf_counter() - t0
    assert list(results) == list(STAGES)
    for stage in STAGES[:-1]:
        assert (out / stage / "DONE.json").is_file(), stage

    ev = {m: read(out / "eval" / f"{m}.json") for m in ("base", "sft", "rl", "dpo")}
    base, sft = ev["base"]["rates"], ev["sft"]["rates"]
    # SFT turns the base model (prompted as a chat) into one that answers, and declines.
    # The tiny run is evaluated on SEEN entities (pipeline-tiny.yaml: eval.split: seen).
    assert ev["sft"]["split"] == "seen"
    assert sft["qa"] > base["qa"]
    assert sft["refusal"] >= base["refusal"] + 0.3
    assert ev["sft"]["length"] < ev["base"]["length"]  # it learned to stop

    reward = read(out / "reward" / "reward_eval.json")
    assert reward["val_accuracy"] > 0.6  # held-out pairs; chance is 0.5

    rl = read(out / "rl" / "summary.json")
    assert rl["probe_reward_after"] > rl["probe_reward_before"]  # same prompts and seeds
    assert rl["kl_within_budget"] and 0 < rl["kl_final"] <= rl["kl_budget"]

    dpo = read(out / "dpo" / "dpo_eval.json")
    assert dpo["after"]["val_logp_margin"] > dpo["before"]["val_logp_margin"]

    md = (out / "report.md").read_text(encoding="utf-8")
    for text in ("| SFT |", "| RL |", "| DPO |", "over-refusal", "Targets", "Sample conversations",
                 "SEEN entities"):
        assert text in md, text
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") >= 3  # rates, losses, RL curves: self-contained

    # A second run skips every finished stage (eval reuses its results, the report is redone).
    trained = [s for s in STAGES if s not in ("eval", "report")]
    marks = {s: (out / s / "DONE.json").read_text() for s in trained}
    models = ("base", "sft", "rl", "dpo")
    evals = {m: (out / "eval" / f"{m}.json").read_text() for m in models}
    t0 = time.perf_counter()
    pipeline_main(TINY, [f"out={out}", *QUIET])
    assert time.perf_counter() - t0 < max(10.0, first / 10)
    assert marks == {s: (out / s / "DONE.json").read_text() for s in trained}
    assert evals == {m: (out / "eval" / f"{m}.json").read_text() for m in models}

    # An interrupted stage (no DONE.json) resumes from its checkpoint instead of starting over.
    rl_seconds = read(out / "rl" / "DONE.json")["seconds"]
    (out / "rl" / "DONE.json").unlink()
    steps_before = (out / "rl" / "metrics.jsonl").read_text().count('"loss"')
    again = pipeline_main(TINY, [f"out={out}", *QUIET])
    assert again["rl"]["seconds"] < rl_seconds / 2  # no iteration was redone
    assert (out / "rl" / "metrics.jsonl").read_text().count('"loss"') == steps_before


def test_config_wiring_and_errors(tmp_path: Path) -> None:
    cfg = wire(load_pipeline_config(DEMO, [f"out={tmp_path}"]))
    assert cfg.pretrain.data == str(tmp_path / "data")
    assert cfg.sft.init_from == str(tmp_path / "pretrain")
    assert cfg.reward.init_from == cfg.dpo.init_from == cfg.rl.model == str(tmp_path / "sft")
    assert cfg.rl.reward_model == str(tmp_path / "reward")
    assert cfg.rl.world == str(tmp_path / "world")
    assert cfg.dpo.mistakes == "world" and cfg.dpo.world == str(tmp_path / "world")
    # RL's own train defaults survive a partial train section
    tiny = load_pipeline_config(TINY, ["rl.train.lr=1e-5"])
    assert tiny.rl.train.schedule == "constant" and tiny.rl.train.lr == 1e-5
    with pytest.raises(UserError, match="stage"):
        load_pipeline_config(TINY, ["stages=[world,nonsense]"])
    with pytest.raises(UserError, match="Unknown setting"):
        load_pipeline_config(TINY, ["sft.nonsense=1"])


def test_world_stage_writes_more_false_premises_when_asked(tmp_path: Path) -> None:
    def false_premises(n: int) -> int:
        out = tmp_path / f"fp{n}"
        pipeline_main(TINY, [f"out={out}", "stages=[world]", f"world.sft_false_premises={n}",
                             *QUIET])
        rows = [json.loads(line) for line in (out / "world" / "sft.jsonl").open()]
        return sum(r["kind"] == "false_premise" for r in rows)

    assert false_premises(3) == 3 * false_premises(1) > 0
    assert load_pipeline_config(DEMO, []).world.sft_false_premises == 5
    with pytest.raises(UserError, match="sft_false_premises"):
        false_premises(0)


@pytest.mark.slow
def test_sft_candidates_keep_the_best_on_the_practice_questions(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [f"out={out}", *QUIET, "stages=[world,tokenizer,data,pretrain,sft,report]",
            "world.scale=0.05", "pretrain.train.steps=30", "sft.train.steps=12",
            "sft.replay_fraction=0", "sft_candidates=2"]
    done = pipeline_main(TINY, args)
    sft = out / "sft"
    scores = {seed: read(sft / "candidates" / f"seed_{seed}" / "practice.json")
              for seed in (0, 1)}
    for s in scores.values():
        assert 0 < s["asked"] <= 40 and 0 <= s["accuracy"] <= 1  # those that fit the context
        assert {"fact", "refusal"} <= set(s["by_kind"]) <= set(PRACTICE_KINDS)
    # The two seeds trained differently, and sft/ holds the better one's model.
    a, b = ((sft / "candidates" / f"seed_{seed}" / "model.safetensors").read_bytes()
            for seed in (0, 1))
    assert a != b
    chosen = read(sft / "selection.json")["chosen_seed"]
    assert scores[chosen]["accuracy"] == max(s["accuracy"] for s in scores.values())
    assert (sft / "model.safetensors").read_bytes() == (a, b)[chosen]
    assert done["sft"]["summary"]["chosen_seed"] == chosen
    assert f"Seed {chosen} is the SFT row" in (out / "report.md").read_text(encoding="utf-8")
    # A rerun after an interrupted selection reuses the finished candidates and their scores:
    # made-up scores that favour the other seed make sft/ that seed's model.
    other = 1 - chosen
    for seed, accuracy in ((chosen, 0.1), (other, 0.9)):
        path = sft / "candidates" / f"seed_{seed}" / "practice.json"
        path.write_text(json.dumps({**scores[seed], "accuracy": accuracy}), encoding="utf-8")
    (sft / "DONE.json").unlink()
    t0 = time.perf_counter()
    pipeline_main(TINY, args)
    assert time.perf_counter() - t0 < 10  # no SFT run again
    assert (sft / "model.safetensors").read_bytes() == (a, b)[other]
    assert read(sft / "selection.json")["chosen_seed"] == other
    # A candidate interrupted after its last checkpoint resumes there: no step is trained again,
    # and its practice score comes out as before (greedy answers).
    seed_1 = sft / "candidates" / "seed_1"
    steps = (seed_1 / "metrics.jsonl").read_text().count('"loss"')
    (seed_1 / "practice.json").unlink()
    (sft / "DONE.json").unlink()
    pipeline_main(TINY, args)
    assert (seed_1 / "metrics.jsonl").read_text().count('"loss"') == steps
    assert read(seed_1 / "practice.json") == scores[1]
    with pytest.raises(UserError, match="sft_candidates"):
        load_pipeline_config(TINY, ["sft_candidates=0"])
    # Without the world's practice questions it stops before training anything.
    bare = wire(load_pipeline_config(TINY, [f"out={tmp_path / 'bare'}", "sft_candidates=2"]))
    with pytest.raises(UserError, match="practice.jsonl does not exist"):
        stage_sft(bare, False)
    assert not (tmp_path / "bare" / "sft").exists()


def test_eval_drops_the_json_of_a_model_that_is_gone(tmp_path: Path) -> None:
    """Deleting rl/ (as a skipped stage's warning says to) must take RL's row out of the
    report: its old eval JSON used to be read again."""
    cfg = wire(load_pipeline_config(TINY, [f"out={tmp_path}", *QUIET]))
    stale = tmp_path / "eval" / "rl.json"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"accuracy": 0.9, "items": []}', encoding="utf-8")
    assert stage_eval(cfg, False) == {"accuracy": {}, "seconds": 0.0}
    assert not stale.exists()


def test_report_only_settings_do_not_redo_the_eval() -> None:
    base = load_pipeline_config(TINY, [])
    assert settings_hash(base, "eval") == settings_hash(
        load_pipeline_config(TINY, ["eval.samples=3"]), "eval")
    assert settings_hash(base, "eval") != settings_hash(
        load_pipeline_config(TINY, ["eval.max_items=5"]), "eval")


def test_saved_config_runs_again_and_changes_are_warned_about(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    pipeline_main(TINY, [f"out={out}", "stages=[world]", *QUIET])
    saved = load_pipeline_config(str(out / "pipeline.yaml"), [])
    original = load_pipeline_config(TINY, [f"out={out}"])
    for stage in STAGES:  # the saved file is the config as given: it fingerprints the same
        assert settings_hash(saved, stage) == settings_hash(original, stage), stage
    capsys.readouterr()
    pipeline_main(str(out / "pipeline.yaml"), ["stages=[world]", *QUIET])
    assert "WARNING" not in capsys.readouterr().err
    pipeline_main(TINY, [f"out={out}", "stages=[world]", "world.seed=5", *QUIET])
    assert "WARNING: the settings of world changed" in capsys.readouterr().err  # quiet or not
