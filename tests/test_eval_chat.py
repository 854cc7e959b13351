"""The chat suite: an oracle scores 100%, a wrong model 0%, refusals and over-refusal, the win
rate, reward and length, and `kotonoha eval --suite chat` end to end on a tiny model."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kotonoha.checkpoint import save_model
from kotonoha.data.checker import REFUSAL_EN, REFUSAL_JA
from kotonoha.data.world import write_world
from kotonoha.eval.chat import (
    CHAT_TASKS,
    DEFAULT_SPLITS,
    chat_tokenizer,
    evaluate_chat,
    load_chat_items,
    sign_test,
    win_rate,
)
from kotonoha.eval.world import GenerateFn, TaskSpec, eval_main, render_chat
from kotonoha.model import Transformer, preset
from kotonoha.tokenizer import Tokenizer, train_bpe


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Tiny models decode fastest on one thread; two threads on a busy 2-core box thrash.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("world")
    write_world(d, seed=0, scale=0.05)
    return d


@pytest.fixture(scope="module")
def tokenizer(world_dir: Path) -> Tokenizer:
    texts = [json.loads(line)["text"] for line in
             (world_dir / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()]
    return train_bpe(texts, vocab_size=400)


def replying(tokenizer: Tokenizer, items: list[dict],
             reply: Callable[[dict], str]) -> Callable[[TaskSpec], GenerateFn]:
    """A fake engine: knows which item each prompt renders from, answers with `reply(item)`."""
    render = render_chat(tokenizer)
    by_prompt = {tuple(render(item)): item for item in items}
    return lambda spec: lambda prompts: [reply(by_prompt[tuple(p)]) for p in prompts]


def test_items_use_the_default_splits(world_dir: Path) -> None:
    items = load_chat_items(world_dir, max_items=3)
    assert {it["task"] for it in items} == set(CHAT_TASKS)
    for it in items:
        assert it["split"] == DEFAULT_SPLITS[it["task"]]
    assert DEFAULT_SPLITS["qa"] == "heldout" and DEFAULT_SPLITS["arithmetic"] == "seen"
    counts: dict[tuple[str, str], int] = {}
    for it in items:
        counts[it["task"], it["lang"]] = counts.get((it["task"], it["lang"]), 0) + 1
    assert max(counts.values()) <= 3 and {lang for _, lang in counts} == {"en", "ja"}


def test_oracle_scores_everything_and_wrong_scores_nothing(world_dir: Path,
                                                           tokenizer: Tokenizer) -> None:
    items = load_chat_items(world_dir, max_items=4)
    oracle = evaluate_chat(None, tokenizer, items=items,
                           generate=replying(tokenizer, items, lambda it: it["reference"]))
    for task, cells in oracle["tasks"].items():
        assert cells["all"]["accuracy"] == 1.0, task
        assert cells["en"]["total"] and cells["ja"]["total"]
    assert oracle["rates"]["over_refusal"] == 0.0
    assert oracle["accuracy"] == 1.0
    assert oracle["reward"] is None and oracle["length"] > 0

    wrong = evaluate_chat(None, tokenizer, items=items,
                          generate=replying(tokenizer, items, lambda it: "I do not know."))
    assert all(v == 0.0 for v in wrong["rates"].values())
    assert wrong["accuracy"] == 0.0


def test_refusing_everything_is_caught_as_over_refusal(world_dir: Path,
                                                       tokenizer: Tokenizer) -> None:
    items = load_chat_items(world_dir, tasks=("refusal", "benign", "qa"), max_items=4)
    result = evaluate_chat(
        None, tokenizer, items=items, generate=replying(
            tokenizer, items, lambda it: REFUSAL_EN if it["lang"] == "en" else REFUSAL_JA))
    rates = result["rates"]
    assert rates["refusal"] == 1.0 and rates["over_refusal"] == 1.0
    assert rates["benign"] == 0.0 and rates["qa"] == 0.0


def test_reward_and_length(world_dir: Path, tokenizer: Tokenizer) -> None:
    items = load_chat_items(world_dir, tasks=("qa",), max_items=3)
    seen: list[tuple[list[dict], str]] = []

    def reward(prompts: list[list[dict]], replies: list[str]) -> list[float]:
        seen.extend(zip(prompts, replies))
        return [float(len(r)) for r in replies]

    result = evaluate_chat(None, tokenizer, items=items, reward=reward,
                           generate=replying(tokenizer, items, lambda it: it["reference"]))
    refs = [it["reference"] for it in items]
    assert result["reward"] == pytest.approx(sum(map(len, refs)) / len(refs))
    assert [m for m, _ in seen] == [it["messages"] for it in items]  # the prompts, in order
    assert result["length"] == pytest.approx(
        sum(len(tokenizer.encode(r)) for r in refs) / len(refs))


def test_items_without_ids_are_scored_against_their_own_prompts(world_dir: Path,
                                                                 tokenizer: Tokenizer) -> None:
    """Two tasks' first items used to share the id "0": the reward model then scored one
    item's reply against the other's prompt."""
    items = [{k: v for k, v in it.items() if k != "id"}
             for it in load_chat_items(world_dir, tasks=("qa", "refusal"), max_items=2)]
    pairs: list[tuple[str, str]] = []

    def reward(prompts: list[list[dict]], replies: list[str]) -> list[float]:
        pairs.extend((p[-1]["content"], r) for p, r in zip(prompts, replies))
        return [0.0] * len(replies)

    result = evaluate_chat(None, tokenizer, items=items, reward=reward,
                           generate=replying(tokenizer, items, lambda it: it["reference"]))
    expected = {(it["messages"][-1]["content"], it["reference"]) for it in items}
    assert set(pairs) == expected
    assert len({row["id"] for row in result["items"]}) == len(items)


def test_win_rate() -> None:
    a = [{"id": str(i), "correct": c} for i, c in enumerate([1, 1, 0, 0, 1])]
    b = [{"id": str(i), "correct": c} for i, c in enumerate([1, 0, 1, 1, 0])]
    w = win_rate(a, b)  # B wins items 2, 3; loses 1, 4; ties 0
    assert (w["wins"], w["losses"], w["ties"], w["n"]) == (2, 2, 1, 5)
    assert w["win_rate"] == pytest.approx(0.5)
    assert win_rate(b, a)["win_rate"] == pytest.approx(0.5)
    better = [{"id": str(i), "correct": 1} for i in range(5)]
    assert win_rate(a, better)["win_rate"] == pytest.approx((2 + 3 / 2) / 5)
    assert win_rate(a, better + [{"id": "x", "correct": 1}])["n"] == 5  # unmatched ignored
    assert w["p_value"] == 1.0  # two wins, two losses: no evidence either way


def test_sign_test_against_hand_computed_binomial_tails() -> None:
    # 10 wins, 0 losses: 2 * 0.5^10. 8 vs 2: 2 * (1 + 10 + 45) / 1024. Ties never count.
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sign_test(0, 10) == pytest.approx(2 / 1024)
    assert sign_test(8, 2) == pytest.approx(2 * 56 / 1024)
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(13, 10) > 0.5 > sign_test(37, 9)


def test_base_model_gets_the_default_chat_template(tokenizer: Tokenizer) -> None:
    from kotonoha.tokenizer import CHATML_TEMPLATE

    base = Tokenizer.load.__self__(tokenizer.backend, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")  # no chat template
    chat = chat_tokenizer(base)
    assert base.chat_template is None and chat.chat_template == CHATML_TEMPLATE
    assert chat_tokenizer(tokenizer) is tokenizer


def test_eval_main_chat_suite(world_dir: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, context_length=256))
    save_model(tmp_path / "m", model, tokenizer)
    summary = eval_main(tmp_path / "m", suite="chat", world_dir=world_dir,
                        out=tmp_path / "out", max_items=1)
    assert set(summary["rates"]) >= set(CHAT_TASKS) | {"over_refusal"}
    saved = json.loads((tmp_path / "out" / "eval.json").read_text(encoding="utf-8"))
    assert len(saved["items"]) == 2 * len(CHAT_TASKS)  # one per task and language
    assert "over-refusal" in (tmp_path / "out" / "eval.md").read_text(encoding="utf-8")


def test_chat_progress_bar_changes_no_result(world_dir: Path, tokenizer: Tokenizer,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, context_length=256))
    quiet = evaluate_chat(model, tokenizer, world_dir, max_items=1)
    assert capsys.readouterr().err == ""  # the pipeline's eval (report.py) stays quiet
    shown = evaluate_chat(model, tokenizer, world_dir, max_items=1, progress=True)
    assert "item" in capsys.readouterr().err
    assert shown == quiet


def test_chat_eval_main_refuses_an_out_file_before_loading(world_dir: Path, tokenizer: Tokenizer,
                                                           tmp_path: Path) -> None:
    from kotonoha.errors import UserError
    from kotonoha.eval.chat import chat_eval_main

    afile = tmp_path / "afile"
    afile.write_text("x")
    # tmp_path holds no model: these are refused before anything is loaded.
    with pytest.raises(UserError, match="is a file"):
        chat_eval_main(tmp_path, world_dir, afile)
    with pytest.raises(UserError, match="--max-items must be at least 1"):
        chat_eval_main(tmp_path, world_dir, max_items=0)
