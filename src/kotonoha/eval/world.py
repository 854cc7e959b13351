"""Evaluation on the built-in world: `kotonoha eval --model M --suite world`.

The world's `eval.jsonl` holds items `{"id", "task", "split": "seen" | "heldout", "lang",
"prompt" | "messages", "answer", ...}` and `data/checker.py` scores a response to one. Every
task runs the same way (`run_items`): render each item to prompt ids, generate greedily
through the `Engine` in batches, and let the checker judge the text. A task differs only in its
renderer: a base-model task (`cloze`: "The capital of X is" -> " Y") is raw text after a
document boundary, written as running text (`as_running_text`); a chat task (QA, follow-ups,
refusals, added by a later suite) is its `messages` through the chat template with a
generation prompt.

The "world" suite is the base-model report: cloze accuracy on held-out facts, English and
Japanese separately, plus validation bits per byte when a shard folder is given.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kotonoha.data import checker
from kotonoha.errors import UserError
from kotonoha.tokenizer import LATIN_WORD_START

Item = dict[str, Any]
# Prompt token ids -> completion texts, in order. The engine in practice; tests inject fakes.
GenerateFn = Callable[[list[list[int]]], list[str]]
RenderFn = Callable[[Item], list[int]]

EVAL_FILE = "eval.jsonl"
LANGS = ("en", "ja")


@dataclass
class TaskSpec:
    """How to run one task: its renderer and generation budget."""

    chat: bool  # messages through the chat template, else raw completion of `prompt`
    max_tokens: int
    stop: tuple[str, ...] = ()
    running_text: bool = False  # a completion prompt as a sentence inside a document


# The cloze checker reads only the first sentence, so stopping where it ends loses nothing;
# its prompts are the world's fact sentences, which the corpus writes mid-document.
# Chat tasks stop at the end-of-turn token; budgets are about twice the longest reference
# reply (refusals carry a reason, arithmetic its column-by-column working).
TASKS: dict[str, TaskSpec] = {
    "cloze": TaskSpec(chat=False, max_tokens=16, stop=(".", "。", "\n"), running_text=True),
    "qa": TaskSpec(chat=True, max_tokens=32),
    "followup": TaskSpec(chat=True, max_tokens=32),
    "false_premise": TaskSpec(chat=True, max_tokens=48),
    "refusal": TaskSpec(chat=True, max_tokens=64),
    "benign": TaskSpec(chat=True, max_tokens=40),
    "arithmetic": TaskSpec(chat=True, max_tokens=128),
    "two_hop": TaskSpec(chat=True, max_tokens=48),
}
SUITES: dict[str, tuple[str, ...]] = {
    "world": ("cloze",),
    # eval/chat.py runs this one (per-task splits, over-refusal, length, reward, win rate).
    "chat": ("qa", "followup", "false_premise", "refusal", "benign", "arithmetic", "two_hop"),
}


@dataclass
class ItemResult:
    id: str
    task: str
    lang: str
    answer: str
    response: str
    correct: bool


# ---------------------------------------------------------------------------------------------
# Items


def load_items(world_dir: str | Path, *, tasks: Sequence[str] | None = None,
               split: str | None = "heldout", max_items: int | None = None) -> list[Item]:
    """Items of `world_dir/eval.jsonl` for `tasks` and `split` (None = any), in file order.

    `max_items` caps each (task, language) group, so both languages stay represented.
    """
    path = Path(world_dir) / EVAL_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist; generate the world with `kotonoha data world "
                        f"--out {world_dir}` or pass --world DIR.")
    items: list[Item] = []
    taken: dict[tuple[str, str], int] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{n} is not valid JSON.") from None
            if tasks is not None and item.get("task") not in tasks:
                continue
            if split is not None and item.get("split") != split:
                continue
            key = (item["task"], item.get("lang", "?"))
            if max_items is not None and taken.get(key, 0) >= max_items:
                continue
            taken[key] = taken.get(key, 0) + 1
            items.append(item)
    return items


# ---------------------------------------------------------------------------------------------
# Rendering and generation


def as_running_text(prompt: str) -> str:
    """`prompt` as a sentence inside a document: with the space a previous sentence leaves.

    Byte-level BPE without a prefix space gives a word at the very start of a text another
    token than the same word after a space ("Ebos" against " Ebos"), and the world states its
    facts mid-document. Asked "Ebos Pezar was born in" as the first words of a document, the
    demo model completed 80% of English held-out facts; the same model with the space, 97%
    (docs/WORLD.md). Scripts written without spaces (Japanese) get none.
    """
    return " " + prompt if prompt[:1] and prompt[:1] in LATIN_WORD_START else prompt


def completion_text(prompt: str, running_text: bool) -> str:
    """The text a completion prompt is encoded from (after the begin-of-text token)."""
    return as_running_text(prompt) if running_text else prompt


def render_completion(tokenizer: Any, running_text: bool = False) -> RenderFn:
    """The prompt after the begin-of-text token (shards put eos = bos between documents), so
    the model reads it as a fresh document; with `running_text`, as a sentence inside one."""
    return lambda item: tokenizer.encode(completion_text(item["prompt"], running_text),
                                         add_bos=True)


def render_chat(tokenizer: Any) -> RenderFn:
    """The item's conversation through the chat template, ready for the assistant's turn."""
    return lambda item: tokenizer.encode_chat(item["messages"], add_generation_prompt=True)[0]


def engine_generate(model: Any, tokenizer: Any, *, max_tokens: int, stop: Sequence[str] = (),
                    batch_size: int = 16, chat: bool = False, bar: Any = None) -> GenerateFn:
    """Greedy completions through the one `Engine` (batched rows, KV cache); `chat`: the
    prompts are conversations, and a reply's opening whitespace is dropped. `bar` (a tqdm
    bar) advances by one per finished reply."""
    from kotonoha.engine import Engine
    from kotonoha.sampling import SamplingParams

    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    limit = engine.max_seq_len - 1
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=list(stop),
                            lstrip=chat)

    def generate(prompts: list[list[int]]) -> list[str]:
        # Keep the end of an over-long prompt: the question is at the end.
        prompts = [p[-limit:] for p in prompts]
        tick = None if bar is None else lambda: bar.update(1)
        return [c.text for c in engine.generate(prompts, params, on_finish=tick)]

    return generate


def run_items(items: Sequence[Item], render: RenderFn, generate: GenerateFn, *,
              check: Callable[[Item, str], bool] = checker.check) -> list[ItemResult]:
    """Render, generate and check every item: the loop every task shares."""
    responses = generate([render(item) for item in items]) if items else []
    if len(responses) != len(items):
        raise RuntimeError(f"generate returned {len(responses)} texts for {len(items)} prompts")
    return [ItemResult(id=str(item.get("id", i)), task=item["task"],
                       lang=item.get("lang", "?"), answer=str(item.get("answer", "")),
                       response=resp, correct=bool(check(item, resp)))
            for i, (item, resp) in enumerate(zip(items, responses))]


def summarize(results: Sequence[ItemResult]) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {lang | "all": {"correct", "total", "accuracy"}}}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in results:
        for key in (r.lang, "all"):
            cell = out.setdefault(r.task, {}).setdefault(key, {"correct": 0, "total": 0})
            cell["correct"] += int(r.correct)
            cell["total"] += 1
    for task in out.values():
        for cell in task.values():
            cell["accuracy"] = cell["correct"] / cell["total"]
    return out


def evaluate_tasks(model: Any, tokenizer: Any, items: Sequence[Item], *,
                   generate: Callable[[TaskSpec], GenerateFn] | None = None,
                   batch_size: int = 16, progress: bool = False) -> list[ItemResult]:
    """Run `items` task by task, each with its renderer and generation budget.

    `generate(spec)` builds the completion function for a task (default: the engine).
    `progress`: a progress bar over the items on stderr (`kotonoha eval`; the pipeline's
    eval stays quiet).
    """
    from tqdm import tqdm

    results: list[ItemResult] = []
    with tqdm(total=len(items), unit="item", desc="eval", dynamic_ncols=True,
              disable=not progress, file=sys.stderr) as bar:
        for task in dict.fromkeys(item["task"] for item in items):
            if task not in TASKS:
                raise UserError(f"No evaluation is defined for task '{task}' yet; known: "
                                f"{', '.join(TASKS)}.")
            spec = TASKS[task]
            group = [item for item in items if item["task"] == task]
            render = (render_chat(tokenizer) if spec.chat
                      else render_completion(tokenizer, running_text=spec.running_text))
            gen = (generate(spec) if generate is not None else
                   engine_generate(model, tokenizer, max_tokens=spec.max_tokens,
                                   stop=spec.stop, batch_size=batch_size, chat=spec.chat,
                                   bar=bar if progress else None))
            bar.set_postfix_str(task)
            results += run_items(group, render, gen)
            if generate is not None:  # an injected generator ticks nothing itself
                bar.update(len(group))
    return results


# ---------------------------------------------------------------------------------------------
# The world suite


def check_tokenizer_matches(tokenizer: Any, data_dir: str | Path) -> None:
    """Bits per byte on shards made with another tokenizer would be silently meaningless."""
    from kotonoha.data.shards import TOKENIZER_SUBDIR, read_meta

    meta = read_meta(data_dir)
    shard_tok = Path(data_dir) / TOKENIZER_SUBDIR
    same = tokenizer is not None and tokenizer.vocab_size == meta["vocab_size"]
    if same and (shard_tok / "tokenizer.json").is_file():
        from kotonoha.tokenizer import Tokenizer

        other = Tokenizer.load(shard_tok)
        probe = "The capital of Velmora is Sarn. 首都はサルンです。 3 + 4 = 7"
        same = (other.backend.get_vocab() == tokenizer.backend.get_vocab()
                and other.encode(probe) == tokenizer.encode(probe))
    if not same:
        raise UserError(f"The shards in {data_dir} were made with a different tokenizer than "
                        "the model's; prepare them with the model's tokenizer.")


def evaluate_world(model: Any, tokenizer: Any, world_dir: str | Path, *, split: str = "heldout",
                   data_dir: str | Path | None = None, max_items: int | None = None,
                   batch_size: int = 16, bpb_tokens: int | None = None,
                   bpb_context: int | None = None,
                   generate: Callable[[TaskSpec], GenerateFn] | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """Base-model cloze accuracy on `split` facts (per language) and val bits per byte.

    Returns {"suite", "split", "tasks": {task: {lang: {"correct", "total", "accuracy"}}},
    "bpb": {...} (with `data_dir`), "items": [per-item results]}. `bpb_context` is the window
    for bits per byte (default: the model's context).
    """
    items = load_items(world_dir, tasks=SUITES["world"], split=split, max_items=max_items)
    if not items:
        raise UserError(f"{Path(world_dir) / EVAL_FILE} has no '{split}' items for the world "
                        "suite (task cloze).")
    result: dict[str, Any] = {"suite": "world", "split": split}
    if data_dir is not None:
        from kotonoha.eval.bpb import bits_per_byte

        check_tokenizer_matches(tokenizer, data_dir)
        result["bpb"] = bits_per_byte(model, data_dir, "val", max_tokens=bpb_tokens,
                                      context_length=bpb_context)
    item_results = evaluate_tasks(model, tokenizer, items, generate=generate,
                                  batch_size=batch_size, progress=progress)
    result["tasks"] = summarize(item_results)
    result["items"] = [asdict(r) for r in item_results]
    return result


def format_markdown(result: dict[str, Any]) -> str:
    """A markdown table: a row per task (accuracy per language), then bits per byte."""
    langs = [lang for lang in LANGS
             if any(lang in cells for cells in result.get("tasks", {}).values())]
    others = sorted({k for cells in result.get("tasks", {}).values() for k in cells}
                    - set(langs) - {"all"})
    cols = [*langs, *others, "all"]
    lines = [f"| {result.get('suite', 'eval')} ({result.get('split', '')}) | "
             + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for task, cells in result.get("tasks", {}).items():
        row = []
        for c in cols:
            cell = cells.get(c)
            row.append(f"{cell['accuracy']:.1%} ({cell['correct']}/{cell['total']})"
                       if cell else "–")
        lines.append(f"| {task} accuracy | " + " | ".join(row) + " |")
    if "bpb" in result:
        b = result["bpb"]
        lines.append(f"| val bits/byte | {b['bpb']:.4f} ({b['tokens']:,} tokens) |"
                     + " |" * (len(cols) - 1))
    return "\n".join(lines) + "\n"


def find_world(model_spec: str | Path, data_dir: str | Path | None = None) -> Path | None:
    """The world folder beside the shards (`data/shards/world` -> `data/world`, a pipeline's
    `data` -> `world`) or beside the model (a pipeline run's `pretrain`, `sft`, ... -> its
    `world`), so `kotonoha eval --model runs/demo/sft` needs no --world; None if neither."""
    candidates = []
    if data_dir is not None:
        data = Path(data_dir)
        candidates += [data.parent / "world", data.parent.parent / "world"]
    candidates.append(Path(model_spec).parent / "world")
    for world in candidates:
        if (world / "eval.jsonl").is_file():
            print(f"world: {world}", file=sys.stderr)
            return world
    return None


def check_eval_options(model_spec: str | Path, *, out: str | Path | None,
                       max_items: int | None) -> None:
    """What `kotonoha eval` can refuse before loading anything: a missing model (named as
    such, before the world is looked up), an --out that is a file, --max-items below 1."""
    from kotonoha.models import is_packaged

    if not is_packaged(model_spec) and not Path(model_spec).expanduser().exists():
        from kotonoha.checkpoint import load_model

        load_model(model_spec)  # raises the loader's own "does not exist" error
        raise UserError(f"Model path {model_spec} does not exist.")  # in case it did not
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file; give a folder for eval.json and eval.md.")
    if max_items is not None and max_items < 1:
        raise UserError(f"--max-items must be at least 1, not {max_items}.")


def eval_main(model_spec: str | Path, suite: str = "world", world_dir: str | Path | None = None,
              data_dir: str | Path | None = None, out: str | Path | None = None, *,
              split: str | None = None, max_items: int | None = None,
              device: str | None = None) -> dict[str, Any]:
    """`kotonoha eval`: load the model, run the suite, print a table, write eval.json/.md.

    `split` None: the world suite's held-out items; the chat suite's default mix (held-out
    questions, and arithmetic, which has no entities to hold out, on the seen split).

    Returns the result without the per-item list (that goes to `out/eval.json`).
    """
    from kotonoha.checkpoint import load_model
    from kotonoha.eval.bpb import trained_context

    if suite not in SUITES:
        raise UserError(f"Unknown eval suite '{suite}'; choose one of: {', '.join(SUITES)}.")
    check_eval_options(model_spec, out=out, max_items=max_items)
    if world_dir is None:
        world_dir = find_world(model_spec, data_dir)
    if suite == "chat":
        from kotonoha.eval.chat import chat_eval_main

        return chat_eval_main(model_spec, world_dir, out, max_items=max_items, device=device,
                              split=split or "default")
    if world_dir is None:
        raise UserError("The world suite needs the world's folder; pass --world DIR (the "
                        "output of `kotonoha data world`).")
    model, tokenizer = load_model(model_spec, device=device)
    if tokenizer is None:
        raise UserError(f"{model_spec} has no tokenizer; evaluation needs one.")
    result = evaluate_world(model, tokenizer, world_dir, split=split or "heldout",
                            data_dir=data_dir,
                            max_items=max_items, bpb_context=trained_context(model_spec),
                            progress=True)
    result["model"] = str(model_spec)
    table = format_markdown(result)
    print(table, end="")
    if out is not None:
        from kotonoha.checkpoint import atomic_write_json, atomic_write_text

        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "eval.json", result)
        atomic_write_text(out_dir / "eval.md", f"# Evaluation of {model_spec}\n\n{table}")
        print(f"wrote {out_dir / 'eval.json'} and {out_dir / 'eval.md'}", file=sys.stderr)
    summary = {k: v for k, v in result.items() if k != "items"}
    return summary
