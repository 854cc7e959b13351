"""Greedy answers to the checkable conversations of a file, scored by the world's checker.

The world's `practice.jsonl` asks about entities that neither SFT nor the eval ever names, so
it is the recipe's development set: DPO learns from the wrong answers (`mistakes: world`) and
the pipeline keeps, of several SFT runs, the one that answers most of it (`sft_candidates`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kotonoha.data import checker
from kotonoha.data.chat import cut_before_last_reply, read_jsonl
from kotonoha.errors import UserError


@dataclass
class Answer:
    prompt: list[dict[str, Any]]  # the conversation up to its last reply
    reply: str  # the conversation's own (right) reply
    row: dict[str, Any]  # the whole JSONL row (kind, lang, check, ...)
    text: str  # what the model answered
    correct: bool  # the checker's verdict on `text`


@torch.no_grad()
def answer_checkable(model: nn.Module, tok: Any, path: str | Path, max_new_tokens: int,
                     context: int, batch_size: int = 32, samples: int = 0,
                     temperature: float = 1.0, seed: int = 0) -> list[Answer]:
    """The model's greedy reply to every conversation of `path` that carries a `check` and
    fits the context, through the shared engine, with the checker's verdict; then, with
    `samples`, that many replies per conversation sampled at `temperature` (seeded from
    `seed`, so the same call gives the same replies), after the greedy ones."""
    from kotonoha.engine import Engine
    from kotonoha.sampling import SamplingParams

    rows = []
    for _, obj in read_jsonl(path):
        messages = obj.get("messages")
        if not isinstance(messages, list) or not isinstance(obj.get("check"), dict):
            continue
        prompt, reply = cut_before_last_reply(messages)
        if reply is None or not prompt:
            continue
        ids = tok.encode_chat(prompt, add_generation_prompt=True)[0]
        if len(ids) + max_new_tokens <= context:
            rows.append((prompt, reply, obj, ids))
    if not rows:
        raise UserError(f"{path} has no conversation with a \"check\" and an assistant reply "
                        "that fits the context; it must be the world's practice.jsonl or "
                        "conversations in its format.")
    was_training = model.training
    engine = Engine(model, tok, max_batch_size=batch_size)  # puts the model in eval mode
    try:
        params = [SamplingParams(temperature=0.0, max_tokens=max_new_tokens, lstrip=True)
                  ] * len(rows)
        asked = list(rows)
        for k in range(samples):
            params += [SamplingParams(temperature=temperature, max_tokens=max_new_tokens,
                                      lstrip=True, seed=seed + k * len(rows) + i)
                       for i in range(len(rows))]
            asked += rows
        comps = engine.generate([ids for *_, ids in asked], params)
    finally:
        model.train(was_training)
    return [Answer(prompt, reply, obj, c.text, checker.check(obj["check"], c.text))
            for (prompt, reply, obj, _), c in zip(asked, comps)]


def practice_score(answers: list[Answer]) -> dict[str, Any]:
    """Accuracy over all answers and by kind: {"accuracy", "asked", "by_kind"}."""
    asked = Counter(a.row.get("kind") or "other" for a in answers)
    right = Counter(a.row.get("kind") or "other" for a in answers if a.correct)
    return {"accuracy": sum(right.values()) / len(answers), "asked": len(answers),
            "by_kind": {k: right[k] / n for k, n in sorted(asked.items())}}
