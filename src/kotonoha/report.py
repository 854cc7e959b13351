"""The report card of a pipeline run: `report.md` and `report.html` (self-contained).

A row per model (base, SFT, RL, DPO), every one evaluated the same way (`evaluate_model`):
validation bits per byte on the pretraining shards; with the rule-based checker, held-out
factual QA, follow-ups, false-premise correction, appropriate refusal, over-refusal (benign
requests declined), arithmetic and two-hop questions; the mean reward-model score and reply
length; and the win rate against the previous stage (DPO, a branch, against SFT). Then the
issue's targets with pass/miss and the margin, what each post-training stage reports about
itself (reward-model pairwise accuracy, RL reward/KL/length, DPO margins), plots, sample
conversations and stage timings.

The base model is evaluated "prompted as a chat": the conversation in the default ChatML
template, although it has never seen one, which is exactly the gap SFT closes.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kotonoha.checkpoint import atomic_write_bytes, atomic_write_text

ROWS: tuple[tuple[str, str, str | None], ...] = (  # (name, run folder, compared with)
    ("base", "pretrain", None), ("sft", "sft", "base"), ("rl", "rl", "sft"), ("dpo", "dpo", "sft"))
LABELS = {"base": "base (pretrained)", "sft": "SFT", "rl": "RL", "dpo": "DPO"}
# (key in "rates", column title)
RATE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("qa", "QA (held-out)"), ("followup", "follow-up"), ("false_premise", "false premise"),
    ("refusal", "refusal"), ("over_refusal", "over-refusal"), ("arithmetic", "arithmetic"),
    ("two_hop", "two-hop"))
# Tasks about held-out entities, where a reply that is word for word one of SFT's training
# replies can only be about another entity: SFT learned that reply by heart.
COPY_TASKS = ("qa", "followup", "false_premise", "two_hop")


# ---------------------------------------------------------------------------------------------
# Evaluation of one model


def evaluate_model(model_dir: str | Path, world_dir: str | Path, *,
                   data_dir: str | Path | None = None, reward_model: str | Path | None = None,
                   split: str = "default", max_items: int | None = 40, batch_size: int = 32,
                   bpb_tokens: int | None = 16384, device: str | None = None,
                   tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything the report card needs about one model, as JSON-ready data.

    The chat suite (`eval/chat.py`) on `split`; QA on the *seen* split too (SFT entities: the
    gap to held-out QA shows how much SFT generalised); held-out cloze (what pretraining
    knows, which bounds what SFT can surface); validation bits per byte on `data_dir`.
    """
    from kotonoha.checkpoint import load_model
    from kotonoha.eval.chat import CHAT_TASKS, evaluate_chat, reward_scorer
    from kotonoha.eval.world import evaluate_tasks, load_items, summarize

    model, tok = load_model(model_dir, device=device)
    if tok is None:
        raise ValueError(f"{model_dir} has no tokenizer")
    scorer = reward_scorer(reward_model, device) if reward_model else None
    result = evaluate_chat(model, tok, world_dir, tasks=tasks or CHAT_TASKS, split=split,
                           max_items=max_items, batch_size=batch_size, reward=scorer)
    seen = evaluate_chat(model, tok, world_dir, tasks=("qa",), split="seen",
                         max_items=max_items, batch_size=batch_size)
    result["rates"]["qa_seen"] = seen["rates"].get("qa", 0.0)
    cloze = load_items(world_dir, tasks=("cloze",), split="heldout", max_items=max_items)
    if cloze:
        cells = summarize(evaluate_tasks(model, tok, cloze, batch_size=batch_size))
        result["rates"]["cloze_heldout"] = cells["cloze"]["all"]["accuracy"]
    if data_dir is not None:
        from kotonoha.eval.bpb import bits_per_byte

        result["bpb"] = bits_per_byte(model, data_dir, "val", max_tokens=bpb_tokens)["bpb"]
    result["model"] = str(model_dir)
    return result


# ---------------------------------------------------------------------------------------------
# Gathering a run's results


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def collect(root: Path) -> dict[str, Any]:
    """Everything a pipeline run left on disk that the report shows."""
    from kotonoha.eval.chat import win_rate

    evals = {name: _read_json(root / "eval" / f"{name}.json") for name, _, _ in ROWS}
    evals = {k: v for k, v in evals.items() if v}
    wins = {}
    for name, _, against in ROWS:
        if name in evals and against in evals:
            wins[name] = {"against": against,
                          **win_rate(evals[against]["items"], evals[name]["items"])}
    stages = {}
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        done = _read_json(d / "DONE.json") if d.is_dir() else None
        if done:
            stages[d.name] = done
    sft_replies = _assistant_replies(root / "world" / "sft.jsonl")
    copied = {name: copied_share(ev["items"], sft_replies)
              for name, ev in evals.items() if sft_replies}
    world_items = _world_items(root / "world" / "eval.jsonl")
    names = _entity_names(root / "world" / "world.json")
    other_entity = {name: other_entity_count(ev["items"], world_items, names)
                    for name, ev in evals.items() if names and world_items}
    premise_misses = {name: false_premise_misses(ev["items"], world_items)
                      for name, ev in evals.items() if world_items}
    return {
        "root": str(root), "evals": evals, "wins": wins, "stages": stages, "copied": copied,
        "other_entity": other_entity, "false_premise_misses": premise_misses,
        "sft_selection": _read_json(root / "sft" / "selection.json"),
        "reward": _read_json(root / "reward" / "reward_eval.json"),
        "rl": _read_json(root / "rl" / "summary.json"),
        "dpo": _read_json(root / "dpo" / "dpo_eval.json"),
        "world_items": world_items,
    }


def _assistant_replies(path: Path) -> set[str]:
    """Every assistant reply of a conversation file (the world's SFT set), stripped."""
    if not path.is_file():
        return set()
    replies = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            replies.update(m["content"].strip() for m in json.loads(line)["messages"]
                           if m["role"] == "assistant")
    return replies


def copied_share(items: Sequence[dict[str, Any]], training_replies: set[str]) -> float | None:
    """The share of replies to held-out-entity items (`COPY_TASKS`) that are a training reply
    word for word: an answer about another entity, recalled instead of worked out."""
    about_heldout = [r for r in items if r["task"] in COPY_TASKS]
    if not about_heldout:
        return None
    return sum(r["response"].strip() in training_replies
               for r in about_heldout) / len(about_heldout)


def _entity_names(path: Path) -> list[str]:
    """The names of the world's countries and people, in both scripts (`world.json`)."""
    world = _read_json(path) if path.is_file() else None
    if not isinstance(world, dict):
        return []
    return [entity["name"][lang] for kind in ("countries", "people")
            for entity in world.get(kind, []) for lang in ("en", "ja")]


def other_entity_count(items: Sequence[dict[str, Any]], world_items: dict[str, dict[str, Any]],
                       names: Sequence[str]) -> dict[str, int] | None:
    """Of the wrong replies to held-out QA questions, how many never name the country or
    person asked about: an answer about another entity, not a wrong fact about the right one.
    Questions that name no entity are left out. Names match as the checker matches answers
    (whole words, after normalisation: "タモヴェリン" names タモ・ヴェリン)."""
    from kotonoha.data.checker import contains_answer

    wrong = other = 0
    for r in items:
        item = world_items.get(r["id"])
        if r["task"] != "qa" or r["correct"] or not item or item.get("split") != "heldout":
            continue
        question = " ".join(m["content"] for m in item.get("messages", [])
                            if m["role"] == "user")
        asked = [n for n in names if contains_answer(question, n)]
        if asked:
            wrong += 1
            other += not any(contains_answer(r["response"], n) for n in asked)
    return {"wrong": wrong, "other_entity": other} if wrong else None


def false_premise_misses(items: Sequence[dict[str, Any]],
                         world_items: dict[str, dict[str, Any]]) -> dict[str, int] | None:
    """The wrong replies to held-out false premises counted by what went wrong (the checker's
    FALSE_PREMISE_FAILURES), e.g. {"wrong": 28, "deny the true fact": 11, ...}."""
    from kotonoha.data.checker import false_premise_failure

    counts: dict[str, int] = {}
    for r in items:
        item = world_items.get(r["id"])
        if (r["task"] != "false_premise" or r["correct"] or not item
                or item.get("split") != "heldout"):
            continue
        reason = false_premise_failure(item, r["response"]) or "right by an older check"
        counts[reason] = counts.get(reason, 0) + 1
    return {"wrong": sum(counts.values()), **counts} if counts else None


def _world_items(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    items = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            items[item["id"]] = item
    return items


# ---------------------------------------------------------------------------------------------
# Targets


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets on the demo, each with its value, pass/miss and the margin."""
    sft = (data["evals"].get("sft") or {}).get("rates", {})
    out = []

    def add(name: str, value: float | None, goal: float, higher: bool, why: str = "",
            note: str = "") -> None:
        if value is None:
            out.append({"target": name, "value": None, "pass": False, "margin": None,
                        "why": "not measured (stage missing)"})
            return
        ok = value >= goal if higher else value <= goal
        margin = value - goal if higher else goal - value
        out.append({"target": name, "value": value, "pass": ok, "margin": margin,
                    "why": "; ".join(t for t in (note, "" if ok else why) if t)})

    base = (data["evals"].get("base") or {}).get("rates", {})
    qa_why = (f"pretraining knows {base.get('cloze_heldout', 0):.0%} of held-out facts as "
              f"cloze completions and SFT answers {sft.get('qa_seen', 0):.0%} of seen-entity "
              "questions: held-out QA is bounded by the first and transfers from the second")
    copied = data.get("copied", {}).get("sft")
    if copied:
        qa_why += (f"; {copied:.0%} of its replies about held-out entities repeat an SFT "
                   "training reply word for word (about another entity)")
    other = (data.get("other_entity") or {}).get("sft")
    if other and other["other_entity"]:
        qa_why += (f"; {other['other_entity']} of its {other['wrong']} wrong held-out QA replies "
                   "are about another entity than the one asked")
    split = split_label(data)
    if split == "seen":
        qa_why = "evaluated on seen entities: this run is too small for the demo's targets"
    add(f"SFT {split} QA >= 80%", sft.get("qa"), 0.80, True, qa_why)
    add("SFT false-premise correction >= 80%", sft.get("false_premise"), 0.80, True,
        _false_premise_why(sft, (data.get("false_premise_misses") or {}).get("sft")))
    add("SFT appropriate refusal >= 90%", sft.get("refusal"), 0.90, True,
        "too few refusal conversations or steps for the phrasing to be learned reliably")
    add("SFT over-refusal <= 5%", sft.get("over_refusal"), 0.05, False,
        "benign look-alikes of the inappropriate requests are declined too")
    for name in ("rl", "dpo"):
        w = data["wins"].get(name)
        add(f"{LABELS[name]} beats SFT on the checker's win rate (> 50%)",
            w["win_rate"] if w else None, 0.5 + 1e-9, True,
            _win_why(w) if w else "",
            # A pass or a miss by a few items is chance: say so rather than let it read as one.
            f"within chance (sign test p={w['p_value']:.2g})"
            if w and w["p_value"] >= 0.05 else "")
    return out


def _false_premise_why(sft: dict[str, Any], misses: dict[str, int] | None) -> str:
    """The reply must state the true fact of an entity SFT never saw, as held-out QA must, and
    keep it apart from the premise it denies: the wrong replies, counted by what went wrong,
    tell which of the two failed."""
    why = (f"the correction must state a held-out entity's true fact (held-out QA: "
           f"{sft.get('qa', 0):.0%})")
    if misses:
        parts = [f"{n} {reason}" for reason, n in misses.items() if reason != "wrong"]
        why += f"; of its {misses['wrong']} wrong replies: {', '.join(parts)}"
        if misses.get("deny the true fact"):
            why += " (the true fact written into the denial instead of the premise)"
    return why


def _win_why(w: dict[str, Any]) -> str:
    """Why a stage did not beat the one before: it changed almost nothing, or it changed
    verdicts and at least as many went the wrong way."""
    counts = f"{w['wins']} wins, {w['losses']} losses, {w['ties']} ties"
    if w["wins"] + w["losses"] < 0.05 * w["n"]:
        return (f"{counts}: the optimised preference (reward model / pairs) barely changes "
                "what the checker measures")
    return f"{counts}: of the verdicts it changed, at least as many went the wrong way"


# ---------------------------------------------------------------------------------------------
# Tables


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def split_label(data: dict[str, Any]) -> str:
    """"held-out" unless the run evaluated on seen entities (tiny models: say so)."""
    splits = {ev.get("split") for ev in data["evals"].values()}
    return "seen" if splits == {"seen"} else "held-out"


def main_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    columns = [t.replace("held-out", split_label(data)) for _, t in RATE_COLUMNS]
    headers = ["model", "val bpb", *columns, "RM score", "length", "win rate vs prev."]
    rows = []
    for name, _, _ in ROWS:
        ev = data["evals"].get(name)
        if not ev:
            continue
        rates = ev["rates"]
        w = data["wins"].get(name)
        win = (f"{_pct(w['win_rate'])} vs {LABELS[w['against']]} "
               f"({w['wins']}W/{w['losses']}L/{w['ties']}T, p={w['p_value']:.2g})" if w else "–")
        rows.append([LABELS[name], _num(ev.get("bpb"), ".4f"),
                     *[_pct(rates.get(k)) for k, _ in RATE_COLUMNS],
                     _num(ev.get("reward")), _num(ev.get("length"), ".1f"), win])
    return headers, rows


def language_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Accuracy per task and language, plus the diagnostic columns (seen QA, cloze)."""
    tasks = [k for k, _ in RATE_COLUMNS if k != "over_refusal"]
    headers = ["model", *[f"{t} {lang}" for t in tasks for lang in ("en", "ja")],
               "QA (seen)", "cloze (held-out)", "copied SFT replies"]
    rows = []
    for name, _, _ in ROWS:
        ev = data["evals"].get(name)
        if not ev:
            continue
        cells = []
        for t in tasks:
            for lang in ("en", "ja"):
                c = ev["tasks"].get(t, {}).get(lang)
                cells.append(_pct(c["accuracy"]) if c else "–")
        rows.append([LABELS[name], *cells, _pct(ev["rates"].get("qa_seen")),
                     _pct(ev["rates"].get("cloze_heldout")),
                     _pct(data.get("copied", {}).get(name))])
    return headers, rows


def target_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for t in targets(data):
        if t["value"] is None:
            rows.append([t["target"], "–", "missing", "–", t["why"]])
            continue
        rows.append([t["target"], _pct(t["value"]), "PASS" if t["pass"] else "MISS",
                     f"{100 * t['margin']:+.1f} points", t["why"]])
    return ["target", "value", "result", "margin", "why missed, or within chance"], rows


def stage_notes(data: dict[str, Any]) -> list[str]:
    notes = []
    sel = data.get("sft_selection")
    if sel and sel.get("practice"):
        runs = "; ".join(f"seed {seed}: {_pct(v['accuracy'])}"
                         for seed, v in sel["practice"].items())
        asked = next(iter(sel["practice"].values())).get("asked", "?")
        notes.append(f"SFT: {len(sel['practice'])} runs with different seeds, scored on the "
                     f"{asked} practice questions (greedy; entities neither SFT nor the eval "
                     f"names): {runs}. Seed {sel['chosen_seed']} is the SFT row.")
    rm = data.get("reward")
    if rm and "val_accuracy" in rm:
        kinds = ", ".join(f"{k} {_pct(v)}" for k, v in rm.get("by_kind", {}).items())
        notes.append(f"Reward model: held-out pairwise accuracy {_pct(rm['val_accuracy'])} on "
                     f"{rm.get('test_pairs', '?')} pairs of entities SFT never saw "
                     f"(chance 50%){'; by kind: ' + kinds if kinds else ''}.")
    rl = data.get("rl")
    if rl and rl.get("reward_first") is not None:
        b, a = rl.get("eval_before") or {}, rl.get("eval_after") or {}
        held = ""
        if "eval_reward" in b and "eval_reward" in a:
            held = (f" On held-out prompts (greedy): reward {b['eval_reward']:.3f} → "
                    f"{a['eval_reward']:.3f}, checker accuracy {_pct(b.get('eval_accuracy'))} → "
                    f"{_pct(a.get('eval_accuracy'))}, length {b.get('eval_length', 0):.1f} → "
                    f"{a.get('eval_length', 0):.1f} tokens.")
        probe = ""
        if rl.get("probe_reward_before") is not None and rl.get("probe_reward_after") is not None:
            probe = (f"mean reward on training prompts (sampled, same seeds) "
                     f"{rl['probe_reward_before']:.3f} → {rl['probe_reward_after']:.3f}; ")
        notes.append(
            f"RL ({rl['reward']} reward, {rl['iterations']} iterations): {probe}mean reward of "
            f"the rollouts {rl['reward_first']:.3f} → {rl['reward_last']:.3f} (first → last "
            f"quarter of iterations), length {rl['length_first']:.1f} → "
            f"{rl['length_last']:.1f} tokens, final KL to the SFT reference "
            f"{rl['kl_final']:.4f} per token (budget {rl['kl_budget']}: "
            f"{'within' if rl['kl_within_budget'] else 'EXCEEDED'}).{held}")
    dpo = data.get("dpo")
    if dpo and "before" in dpo and "after" in dpo:
        b, a = dpo["before"], dpo["after"]
        m = dpo.get("mistakes")
        how = (f"replies (greedy, and {m['samples']} sampled per question)"
               if m and m.get("samples") else "greedy replies")
        trained_on = (f"trained on the SFT model's {m['wrong']} wrong {how} to "
                      f"{m['asked']} practice questions; " if m else "")
        notes.append(f"DPO (beta {dpo.get('beta')}): {trained_on}on held-out pairs the policy "
                     f"prefers the chosen reply {_pct(b.get('val_logp_accuracy'))} → "
                     f"{_pct(a.get('val_logp_accuracy'))}; log-prob margin "
                     f"{b.get('val_logp_margin', 0):.2f} → {a.get('val_logp_margin', 0):.2f}.")
    return notes


def timing_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    from kotonoha.pipeline import STAGES

    rows, total = [], 0.0
    for stage in STAGES:
        if stage == "report":  # its DONE.json is written after the report: last run's time
            continue
        done = data["stages"].get(stage)
        if done:
            total += done.get("seconds", 0.0)
            rows.append([stage, f"{done.get('seconds', 0.0):.0f} s",
                         done.get("finished_at", "")])
    rows.append(["total", f"{total:.0f} s ({total / 60:.1f} min)", ""])
    return ["stage", "time", "finished"], rows


def sample_conversations(data: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """`n` items (one task after another, alternating languages) with every model's reply."""
    evals = data["evals"]
    if not evals or n <= 0:
        return []
    first = next(iter(evals.values()))["items"]
    order = ["qa", "false_premise", "refusal", "followup", "benign", "arithmetic", "two_hop"]
    picked: list[str] = []
    for k in range(n * 2):
        task, lang = order[k % len(order)], ("en", "ja")[(k // len(order)) % 2]
        ids = [r["id"] for r in first if r["task"] == task and r["lang"] == lang
               and r["id"] not in picked]
        if ids:
            picked.append(ids[0])
        if len(picked) >= n:
            break
    out = []
    for item_id in picked:
        item = data["world_items"].get(item_id, {})
        replies = []
        for name, _, _ in ROWS:
            row = next((r for r in evals.get(name, {}).get("items", []) if r["id"] == item_id),
                       None)
            if row:
                replies.append({"model": LABELS[name], "reply": row["response"],
                                "correct": row["correct"]})
        out.append({"id": item_id, "messages": item.get("messages", []),
                    "answer": item.get("answer"), "replies": replies})
    return out


# ---------------------------------------------------------------------------------------------
# Plots


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_rates(data: dict[str, Any]) -> bytes | None:
    """Grouped bars: each headline rate, one bar per model."""
    from matplotlib.figure import Figure

    names = [n for n, _, _ in ROWS if n in data["evals"]]
    if not names:
        return None
    fig = Figure(figsize=(10, 3.6), dpi=100)
    ax = fig.subplots()
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        rates = data["evals"][name]["rates"]
        xs = [j + i * width for j in range(len(RATE_COLUMNS))]
        ax.bar(xs, [100 * rates.get(k, 0.0) for k, _ in RATE_COLUMNS], width,
               label=LABELS[name])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(RATE_COLUMNS))])
    ax.set_xticklabels([t for _, t in RATE_COLUMNS], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_losses(root: Path) -> bytes | None:
    """Training loss of each training stage against its own steps."""
    from matplotlib.figure import Figure

    from kotonoha.train.loop import read_metrics

    stages = [s for s in ("pretrain", "sft", "reward", "dpo", "rl")
              if (root / s / "metrics.jsonl").is_file()]
    if not stages:
        return None
    fig = Figure(figsize=(3.2 * len(stages), 3), dpi=100)
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for ax, stage in zip(axes, stages):
        recs = list(read_metrics(root / stage / "metrics.jsonl"))
        train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        if train:
            ax.plot(*zip(*train), linewidth=1, label="train")
        val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        if val:
            ax.plot(*zip(*val), "o-", markersize=3, label="val")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# Writing


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines) + "\n"


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _conversation_md(s: dict[str, Any]) -> str:
    lines = [f"**{s['id']}** (expected: {s['answer']})" if s.get("answer") else f"**{s['id']}**",
             ""]
    for m in s["messages"]:
        lines.append(f"> **{m['role']}**: {m['content']}")
    lines.append("")
    for r in s["replies"]:
        mark = "✓" if r["correct"] else "✗"
        lines.append(f"- {mark} **{r['model']}**: {r['reply'].strip() or '(empty)'}")
    return "\n".join(lines) + "\n"


def _conversation_html(s: dict[str, Any]) -> str:
    msgs = "".join(f"<div class='msg'><b>{html.escape(m['role'])}</b>: "
                   f"{html.escape(m['content'])}</div>" for m in s["messages"])
    replies = "".join(
        f"<li class='{'ok' if r['correct'] else 'bad'}'>{'✓' if r['correct'] else '✗'} "
        f"<b>{html.escape(r['model'])}</b>: {html.escape(r['reply'].strip() or '(empty)')}</li>"
        for r in s["replies"])
    expected = f" (expected: {html.escape(str(s['answer']))})" if s.get("answer") else ""
    return (f"<div class='conv'><div class='id'>{html.escape(s['id'])}{expected}</div>{msgs}"
            f"<ul>{replies}</ul></div>")


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid
#ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
img{max-width:100%}.conv{border:1px solid #ddd;border-radius:6px;padding:8px;margin:8px 0}
.msg{color:#444}.id{font-size:12px;color:#888}.ok{color:#176f2c}.bad{color:#a11}
li{margin:3px 0;list-style:none}"""


def write_report(root: str | Path, *, samples: int = 6) -> dict[str, Path]:
    """Write `root/report.md`, `root/report.html` and the plots under `root/plots/`."""
    root = Path(root)
    data = collect(root)
    plots = {"rates": plot_rates(data), "losses": plot_losses(root)}
    rl_png = root / "rl" / "rl.png"
    if rl_png.is_file():
        plots["rl"] = rl_png.read_bytes()
    for name, png in plots.items():
        if png:
            atomic_write_bytes(root / "plots" / f"{name}.png", png)
    convs = sample_conversations(data, samples)
    sections = [
        ("Stages", *main_table(data)),
        ("Per language", *language_table(data)),
        ("Targets", *target_table(data)),
    ]
    captions = {"rates": "Headline rates per model", "losses": "Training losses",
                "rl": "RL: mean reward, reply length and KL per iteration"}
    intro = ("Every model is scored by the rule-based checker on eval items of the built-in "
             "world (never by the reward model): QA, follow-ups, false premises and two-hop "
             "questions about held-out entities that SFT never mentioned; refusals and benign "
             "look-alikes (over-refusal = benign requests declined); arithmetic on unseen "
             "problems of trained operand lengths. The base model is prompted as a chat with the "
             "default ChatML template. Win rate: per item, right where the other was wrong is a "
             "win; (wins + ties/2) / items. Copied SFT replies: the share of replies about "
             "held-out entities that are one of SFT's training replies word for word, so about "
             "another entity (learned by heart rather than answered).")
    if split_label(data) == "seen":
        intro += (" NOTE: this run was evaluated on SEEN entities (eval.split: seen), the ones "
                  "SFT talked about, because it is too small to have learned held-out facts.")
    md = [f"# kotonoha report card: {root}\n", intro + "\n"]
    body = [f"<h1>kotonoha report card: {html.escape(str(root))}</h1>",
            f"<p>{html.escape(intro)}</p>"]
    for title, headers, rows in sections:
        md += [f"## {title}\n", _md_table(headers, rows)]
        body += [f"<h2>{title}</h2>", _html_table(headers, rows)]
    notes = stage_notes(data)
    if notes:
        md += ["## What each stage reports\n", "\n".join(f"- {x}" for x in notes) + "\n"]
        body += ["<h2>What each stage reports</h2><ul>"
                 + "".join(f"<li>{html.escape(x)}</li>" for x in notes) + "</ul>"]
    md.append("## Plots\n")
    body.append("<h2>Plots</h2>")
    for name, png in plots.items():
        if png:
            md.append(f"![{captions[name]}](plots/{name}.png)\n")
            b64 = base64.b64encode(png).decode()
            body.append(f"<h3>{captions[name]}</h3><img alt='{captions[name]}' "
                        f"src='data:image/png;base64,{b64}'>")
    if convs:
        md.append("## Sample conversations\n")
        body.append("<h2>Sample conversations</h2>")
        for s in convs:
            md.append(_conversation_md(s))
            body.append(_conversation_html(s))
    headers, rows = timing_table(data)
    md += ["## Stage timings\n", _md_table(headers, rows)]
    body += ["<h2>Stage timings</h2>", _html_table(headers, rows)]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>kotonoha report card"
            f"</title><style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")
    atomic_write_text(root / "report.md", "\n".join(md))
    atomic_write_text(root / "report.html", page)
    atomic_write_text(root / "report.json", json.dumps(
        {"evals": {k: {kk: vv for kk, vv in v.items() if kk != "items"}
                   for k, v in data["evals"].items()},
         "wins": data["wins"], "targets": targets(data), "reward": data["reward"],
         "rl": data["rl"], "dpo": data["dpo"]}, indent=1, ensure_ascii=False) + "\n")
    return {"md": root / "report.md", "html": root / "report.html",
            "json": root / "report.json"}

