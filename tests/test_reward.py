"""The reward model: Bradley-Terry training beats chance on held-out pairs; save/load/score."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from chat_testing import CONFIGS, FAST, preference_rows, sft_model, user, write_jsonl
from kotonoha.checkpoint import load_model
from kotonoha.data.chat import load_preferences, split_pairs
from kotonoha.errors import UserError
from kotonoha.train.reward import RewardModel, bt_loss, load_reward_model, reward_main


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_reward_model_beats_chance_on_held_out_pairs(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows())
    run = reward_main(str(CONFIGS / "reward-tiny.yaml"),
                      [f"data={data}", f"init_from={sft_model()}", f"out={tmp_path / 'rm'}",
                       *FAST], False)
    report = json.loads((run / "reward_eval.json").read_text())
    assert report["test_pairs"] == 12 and report["train_pairs"] == 36
    assert report["val_accuracy"] >= 0.9, report
    assert set(report["by_kind"]) == {"wrong_fact", "rude"}

    # The saved model scores like the trained one, from text and from token ids alike.
    rm = load_reward_model(run)
    test = [r for r in preference_rows() if r["split"] == "test"]
    chosen = rm.score([r["prompt"] for r in test], [r["chosen"] for r in test])
    rejected = rm.score([r["prompt"] for r in test], [r["rejected"] for r in test])
    assert ((chosen > rejected).float().mean().item() == pytest.approx(report["val_accuracy"]))
    tok = rm.tokenizer
    assert tok is not None
    ids = [tok.encode_chat([*r["prompt"], {"role": "assistant", "content": r["chosen"]}])[0]
           for r in test]
    end = tok.token_to_id("<|im_end|>")
    ids = [s[:len(s) - s[::-1].index(end)] for s in ids]  # ending at the reply's end of turn
    assert torch.allclose(rm.score_ids(ids), chosen, atol=1e-4)
    # The backbone is an ordinary language model directory too.
    backbone, _ = load_model(run)
    assert backbone.cfg == rm.backbone.cfg


def test_lora_reward_model_learns_and_saves_merged(tmp_path: Path) -> None:
    """lora= trains adapters on the backbone and the head; the saved reward model (merged)
    scores exactly as the final held-out evaluation did."""
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows())
    run = reward_main(str(CONFIGS / "reward-tiny.yaml"),
                      [f"data={data}", f"init_from={sft_model()}", f"out={tmp_path / 'rm'}",
                       "lora=r=8,alpha=16", "train.lr=1e-2", *FAST], False)
    report = json.loads((run / "reward_eval.json").read_text())
    assert report["val_accuracy"] >= 0.75, report
    rm = load_reward_model(run)
    test = [r for r in preference_rows() if r["split"] == "test"]
    chosen = rm.score([r["prompt"] for r in test], [r["chosen"] for r in test])
    rejected = rm.score([r["prompt"] for r in test], [r["rejected"] for r in test])
    assert (chosen > rejected).float().mean().item() == pytest.approx(report["val_accuracy"])


def test_bradley_terry_loss_and_margin() -> None:
    class Fixed(torch.nn.Module):  # rewards straight from the batch
        def forward(self, ids: torch.Tensor, last: torch.Tensor, *_: object) -> torch.Tensor:
            return ids.flatten()[last].float()

    batch = {"ids": torch.tensor([[3], [1]]), "last": torch.tensor([0, 1]),
             "positions": None, "segments": None, "margin": torch.tensor([0.0])}
    loss, metrics = bt_loss()(Fixed(), batch)
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(2.0)).item())
    assert metrics["accuracy"] == 1.0
    assert bt_loss(margin=1.0)(Fixed(), batch)[0] > loss  # a margin asks for more separation
    assert bt_loss()(Fixed(), dict(batch, margin=torch.tensor([1.0])))[0] > loss


def test_reward_head_reads_the_last_token() -> None:
    rm = RewardModel(load_model(sft_model())[0])
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9]])
    r = rm(ids, torch.tensor([2, 6]))  # indices into ids.flatten()
    assert r[0].item() == pytest.approx(r[1].item(), abs=1e-5)  # positions after `last` (and padding there) cannot matter


def test_bad_preference_files_name_the_file_and_line(tmp_path: Path) -> None:
    rows = preference_rows()[:2]
    bad = tmp_path / "prefs.jsonl"
    write_jsonl(bad, [rows[0], dict(rows[1], rejected=rows[1]["chosen"])])
    with pytest.raises(UserError, match=r"prefs.jsonl line 2 has the same text as chosen"):
        load_preferences(str(bad))
    bad.write_text(json.dumps(rows[0]) + "\n" + "{\"prompt\": \n")
    with pytest.raises(UserError, match=r"prefs.jsonl line 2 is not valid JSON"):
        load_preferences(str(bad))
    write_jsonl(bad, [{"prompt": "Hi", "chosen": 3, "rejected": "No."}])
    with pytest.raises(UserError, match=r"line 1: \"chosen\" must be"):
        load_preferences(str(bad))


def test_feedback_export_format_and_splits(tmp_path: Path) -> None:
    # The serving feedback export: prompt messages, no split field; "messages" also works.
    rows = [{"prompt": [user(f"Q{i}")], "chosen": "Yes.", "rejected": "No.", "kind": "arena"}
            for i in range(10)] + [{"messages": [user("Q")], "chosen": "A", "rejected": "B"}]
    pairs = load_preferences(str(write_jsonl(tmp_path / "fb.jsonl", rows)))
    train, test = split_pairs(pairs, 0.2, seed=0)
    assert len(train) == 9 and len(test) == 2 and pairs[-1].prompt == [user("Q")]
