"""The chat suite: `kotonoha eval --model M --suite chat --world DIR`.

Runs the world's chat tasks on eval items through the engine with the model's chat template
(greedy), and scores each reply with the rule-based checker (`data/checker.py`), never with a
reward model. Per task and language it reports accuracy; on top of that:

- **over-refusal**: the share of *benign* requests the model declined (`is_refusal`), which is
  not the same as failing them (a benign reply must also contain the answer);
- **length**: mean reply length in tokens (RL's length-hacking guard shows up here);
- **reward**: the mean reward-model score of the replies, when a reward model is given;
- **win rate** of one model over another on the same items (`win_rate`): per item, B right and
  A wrong is a win, the reverse a loss, anything else a tie; win rate = (wins + ties / 2) / n,
  with the sign test's p-value (how likely so lopsided a wins/losses split is by chance).

By default each task uses the split that tests what the issue asks: held-out entities (facts
SFT never mentioned) for QA, follow-ups, false premises, two-hop questions, refusals and
benign requests; for arithmetic the "seen" split (operand lengths that training covered, on
problems it never showed) since the held-out split's 5-digit operands test extrapolation.
A base model is evaluated "prompted as a chat": with the default ChatML template when its
tokenizer has none.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kotonoha.data import checker
from kotonoha.errors import UserError
from kotonoha.eval.world import (
    EVAL_FILE,
    SUITES,
    GenerateFn,
    Item,
    TaskSpec,
    check_eval_options,
    evaluate_tasks,
    format_markdown,
    load_items,
    summarize,
)

CHAT_TASKS: tuple[str, ...] = SUITES["chat"]
DEFAULT_SPLITS: dict[str, str] = {task: "heldout" for task in CHAT_TASKS} | {"arithmetic": "seen"}
# Anything that scores replies: (conversations before the reply, replies) -> scores.
ScoreFn = Callable[[list[list[dict[str, Any]]], list[str]], Sequence[float]]


def load_chat_items(world_dir: str | Path, *, tasks: Sequence[str] = CHAT_TASKS,
                    split: str = "default", max_items: int | None = None) -> list[Item]:
    """Chat eval items; `split` is seen, heldout, or default (DEFAULT_SPLITS per task).

    `max_items` caps each (task, language) group and takes the file's first items, so every
    model sees the same ones.
    """
    unknown = [t for t in tasks if t not in CHAT_TASKS]
    if unknown:
        raise UserError(f"Unknown chat task(s) {', '.join(unknown)}; known: "
                        f"{', '.join(CHAT_TASKS)}.")
    if split not in ("default", "seen", "heldout"):
        raise UserError(f"split must be default, seen or heldout, not '{split}'.")
    items: list[Item] = []
    for task in tasks:
        task_split = DEFAULT_SPLITS[task] if split == "default" else split
        items += load_items(world_dir, tasks=(task,), split=task_split, max_items=max_items)
    if not items:
        raise UserError(f"{Path(world_dir) / EVAL_FILE} has no items for the chat tasks "
                        f"{', '.join(tasks)} (split {split}).")
    return items


def chat_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer itself, or a copy with the default ChatML template when it has none (a
    base model "prompted as a chat")."""
    if tokenizer.chat_template:
        return tokenizer
    from kotonoha.tokenizer import CHATML_TEMPLATE

    tok = copy.copy(tokenizer)
    tok.chat_template = CHATML_TEMPLATE
    tok._compiled = None
    return tok


def evaluate_chat(model: Any, tokenizer: Any, world_dir: str | Path | None = None, *,
                  items: Sequence[Item] | None = None, tasks: Sequence[str] = CHAT_TASKS,
                  split: str = "default", max_items: int | None = None, batch_size: int = 16,
                  reward: ScoreFn | None = None,
                  generate: Callable[[TaskSpec], GenerateFn] | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """Run the chat tasks; returns {"suite", "split", "tasks", "rates", "accuracy",
    "length", "reward", "items"}.

    `items` replaces loading from `world_dir`; `generate(spec)` replaces the engine (tests);
    `reward` scores replies (a reward model's `score`). `rates` holds the report card's
    headline numbers; `accuracy` is their macro average over the tasks run.
    """
    if items is None:
        if world_dir is None:
            raise UserError("The chat suite needs the world's folder (--world DIR) or items.")
        items = load_chat_items(world_dir, tasks=tasks, split=split, max_items=max_items)
    # Ids join replies to their prompts (reward) and to another model's (win rate); an item
    # without one gets a unique one here, not its index within its task.
    items = [item if "id" in item else {**item, "id": f"{item['task']}-{i}"}
             for i, item in enumerate(items)]
    tok = chat_tokenizer(tokenizer)
    results = evaluate_tasks(model, tok, items, generate=generate, batch_size=batch_size,
                             progress=progress)
    by_id = {str(item["id"]): item for item in items}
    rows = [asdict(r) for r in results]
    for row in rows:
        row["length"] = len(tok.encode(row["response"]))
    if reward is not None and rows:
        scores = reward([by_id[row["id"]]["messages"] for row in rows],
                        [row["response"] for row in rows])
        for row, s in zip(rows, scores):
            row["reward"] = float(s)
    result: dict[str, Any] = {"suite": "chat", "split": split, "tasks": summarize(results)}
    result["rates"] = headline_rates(rows)
    task_rates = [v for k, v in result["rates"].items() if k in CHAT_TASKS]
    result["accuracy"] = sum(task_rates) / len(task_rates) if task_rates else 0.0
    result["length"] = sum(r["length"] for r in rows) / len(rows) if rows else 0.0
    result["reward"] = (sum(r["reward"] for r in rows) / len(rows)
                        if rows and reward is not None else None)
    result["items"] = rows
    return result


def headline_rates(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy per task (both languages) plus `over_refusal`: benign requests declined."""
    rates: dict[str, float] = {}
    for task in CHAT_TASKS:
        group = [r for r in rows if r["task"] == task]
        if group:
            rates[task] = sum(r["correct"] for r in group) / len(group)
    benign = [r for r in rows if r["task"] == "benign"]
    if benign:
        rates["over_refusal"] = sum(checker.is_refusal(r["response"]) for r in benign) / len(benign)
    return rates


def win_rate(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Model B against model A on the items both answered, judged by the checker's verdicts
    (`correct`): wins, losses, ties, n and win_rate = (wins + ties / 2) / n."""
    a_by_id = {r["id"]: bool(r["correct"]) for r in a}
    wins = losses = ties = 0
    for r in b:
        if r["id"] not in a_by_id:
            continue
        a_ok, b_ok = a_by_id[r["id"]], bool(r["correct"])
        if b_ok and not a_ok:
            wins += 1
        elif a_ok and not b_ok:
            losses += 1
        else:
            ties += 1
    n = wins + losses + ties
    return {"wins": wins, "losses": losses, "ties": ties, "n": n,
            "win_rate": (wins + ties / 2) / n if n else 0.5,
            "p_value": sign_test(wins, losses)}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) on the items where the verdicts differ:
    the chance of a split at least this lopsided if either model were equally likely to be the
    one that is right. Ties carry no information and are left out. (Ten lines of exact binomial
    arithmetic: scipy is not a dependency.)"""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def format_chat_markdown(result: dict[str, Any]) -> str:
    """The per-task table of `format_markdown`, then over-refusal, length and reward."""
    lines = [format_markdown(result).rstrip("\n")]
    rates = result.get("rates", {})
    extra = []
    if "over_refusal" in rates:
        extra.append(f"over-refusal (benign requests declined): {rates['over_refusal']:.1%}")
    extra.append(f"mean reply length: {result.get('length', 0):.1f} tokens")
    if result.get("reward") is not None:
        extra.append(f"mean reward-model score: {result['reward']:.3f}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {e}" for e in extra) + "\n"


def reward_scorer(reward_model: str | Path, device: Any = None) -> ScoreFn:
    """A reward model's `score` (a `kotonoha reward` run directory)."""
    from kotonoha.train.reward import load_reward_model

    rm = load_reward_model(reward_model, device=device)
    return lambda prompts, replies: rm.score(prompts, replies)


def chat_eval_main(model_spec: str | Path, world_dir: str | Path | None,
                   out: str | Path | None = None, *, split: str = "default",
                   max_items: int | None = None, device: str | None = None,
                   reward_model: str | Path | None = None) -> dict[str, Any]:
    """`kotonoha eval --suite chat`: print the table, write out/eval.json and eval.md."""
    from kotonoha.checkpoint import atomic_write_json, atomic_write_text, load_model

    check_eval_options(model_spec, out=out, max_items=max_items)
    if world_dir is None:
        raise UserError("The chat suite needs the world's folder; pass --world DIR (the "
                        "output of `kotonoha data world`).")
    model, tokenizer = load_model(model_spec, device=device)
    if tokenizer is None:
        raise UserError(f"{model_spec} has no tokenizer; evaluation needs one.")
    scorer = reward_scorer(reward_model, device) if reward_model else None
    result = evaluate_chat(model, tokenizer, world_dir, split=split, max_items=max_items,
                           reward=scorer, progress=True)
    result["model"] = str(model_spec)
    table = format_chat_markdown(result)
    print(table, end="")
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "eval.json", result)
        atomic_write_text(out_dir / "eval.md", f"# Chat evaluation of {model_spec}\n\n{table}")
        print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'eval.md'}", file=sys.stderr)
    return {k: v for k, v in result.items() if k != "items"}


