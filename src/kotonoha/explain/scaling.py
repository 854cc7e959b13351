"""The scaling sweep: `kotonoha experiment scaling --config configs/scaling.yaml`.

Several model sizes of one architecture are pretrained on the same world corpus with the same
token budget (not compute-optimal: every size reads exactly the same tokens, so only the size
changes). Then, for each model:

- validation loss (nats/token and bits per byte) on the same fixed validation tokens;
- accuracy on tasks of one step and of several: recalling a fact (`cloze`), two-hop questions
  ("The capital of the country to the east of X is"), and multi-digit addition with carries,
  all as completion prompts built from the world's eval items and scored by the world's
  checker (greedy decoding through the engine);
- the log-probability the model gives the correct continuation (teacher-forced), a smooth
  measure beside the all-or-nothing accuracy: an ability can look sudden in accuracy while
  its likelihood improves steadily.

Loss is fitted with a power law, L = a * x^b, by least squares on log L against log x, for x =
non-embedding parameters and x = training FLOPs. Figures, `summary.md` and `scaling.json` go to
`out`. Each size trains in its own run directory with checkpoints, so an interrupted sweep
continues where it stopped; finished sizes (marked by DONE.json) are not retrained.

Under torchrun every rank trains each model together (DDP/FSDP, as `kotonoha pretrain` does)
and rank 0 evaluates; with a GPU, set `train.device=cuda`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kotonoha.checkpoint import atomic_write_json, atomic_write_text
from kotonoha.errors import UserError
from kotonoha.explain.common import md_table, plot_style, save_figure
from kotonoha.train.loop import TrainConfig

if TYPE_CHECKING:
    from kotonoha.model import Transformer
    from kotonoha.tokenizer import Tokenizer

DONE = "DONE.json"
# Model settings a size may set; `name` labels it and `lr` overrides train.lr for it.
SIZE_KEYS = {"name", "n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "lr"}


def _default_sizes() -> list[dict[str, Any]]:
    return [
        {"name": "s1", "n_layer": 1, "d_model": 32, "n_head": 2},
        {"name": "s2", "n_layer": 2, "d_model": 64, "n_head": 4},
        {"name": "s3", "n_layer": 3, "d_model": 96, "n_head": 4},
        {"name": "s4", "n_layer": 4, "d_model": 128, "n_head": 4},
        {"name": "s5", "n_layer": 6, "d_model": 192, "n_head": 6},
    ]


@dataclass
class ScalingConfig:
    out: str = "runs/scaling"
    # The corpus: the built-in world, generated, tokenized and sharded under `out` unless
    # `data` (a `kotonoha data prepare` folder) and `world` (its world folder) are given.
    world_seed: int = 0
    world_scale: float = 1.0
    vocab_size: int = 2048
    data: str | None = None
    world: str | None = None
    # The models: one architecture family (`preset` gives norm, positions, MLP), these sizes.
    preset: str = "tiny"
    context_length: int = 128
    sizes: list[dict[str, Any]] = field(default_factory=_default_sizes)
    tokens: int = 2_000_000  # the same token budget for every size
    train: TrainConfig = field(default_factory=TrainConfig)
    # Evaluation.
    eval_items: int = 40  # items per task and language
    eval_split: str | None = None  # seen | heldout | None (both)
    eval_batch_size: int = 32
    val_tokens: int = 65536  # validation tokens for the loss
    threads: int | None = None  # torch CPU threads; None = torch's default (all cores)


@dataclass
class Task:
    name: str
    description: str
    world_task: str  # the eval.jsonl task the items come from
    max_tokens: int
    stop: tuple[str, ...]
    running_text: bool  # the prompt as a sentence inside a document (eval/world.py)


# Facts and two-hop questions are sentences the corpus writes mid-document; a worked sum
# starts a line ("Q: ..."), as the corpus writes it.
TASKS = (
    Task("cloze", "one fact (one step)", "cloze", 12, (".", "。", "\n"), True),
    Task("two_hop", "two facts chained (two steps)", "two_hop", 12, (".", "。", "\n"), True),
    # The working of a 4-digit addition is ~70 tokens; a new line starts the next problem.
    Task("addition", "2-4 digit addition with carries, worked column by column", "arithmetic",
         128, ("\n", " Q:", "問:"), False),
)


# ---------------------------------------------------------------------------------------------
# Power laws


def fit_power_law(x: list[float], y: list[float]) -> dict[str, float]:
    """Least squares in log space: y = a * x^b. Returns a, b (the exponent) and R^2 of the
    fit of log y."""
    if len(x) < 2:
        raise UserError("A power-law fit needs at least two points.")
    lx = torch.tensor([math.log(v) for v in x], dtype=torch.float64)
    ly = torch.tensor([math.log(v) for v in y], dtype=torch.float64)
    A = torch.stack([torch.ones_like(lx), lx], dim=1)
    coef = torch.linalg.lstsq(A, ly[:, None]).solution[:, 0]
    pred = A @ coef
    ss_res = float(((ly - pred) ** 2).sum())
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    return {"a": math.exp(float(coef[0])), "b": float(coef[1]),
            "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0}


# ---------------------------------------------------------------------------------------------
# Data


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _wait_for(path: Path, what: str, timeout: float = 3600.0) -> None:
    """Ranks other than 0 wait for rank 0 to finish writing `path`."""
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout:
            raise UserError(f"Gave up waiting for rank 0 to write {what} ({path}).")
        time.sleep(1.0)


def prepare_corpus(cfg: ScalingConfig, progress: bool = True) -> tuple[Path, Path]:
    """(shard folder, world folder), built under `cfg.out` when not given. Repeated calls reuse
    what is there (the world and tokenizer by their files, the shards by `prepare`'s own
    fingerprint)."""
    from kotonoha.data.shards import prepare
    from kotonoha.data.sources import iter_documents
    from kotonoha.data.world import write_world
    from kotonoha.tokenizer import train_bpe

    out = Path(cfg.out)
    world = Path(cfg.world) if cfg.world else out / "world"
    data = Path(cfg.data) if cfg.data else out / "data"
    if _rank() != 0:
        _wait_for(world / "world.json", "the world")
        _wait_for(data / "meta.json", "the token shards")
        return data, world
    if not (world / "world.json").is_file():  # world.json is written last
        if cfg.world:
            raise UserError(f"{world} holds no world; write one with `kotonoha data world`.")
        write_world(world, seed=cfg.world_seed, scale=cfg.world_scale)
    if not cfg.data:
        tok_dir = out / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file():
            tok = train_bpe(iter_documents([str(world / "pretrain.jsonl")]), cfg.vocab_size)
            tok.save(tok_dir)
        prepare([str(world / "pretrain.jsonl")], tok_dir, data, show_progress=progress)
    return data, world


# ---------------------------------------------------------------------------------------------
# Training


def _check_sizes(cfg: ScalingConfig) -> list[dict[str, Any]]:
    if not cfg.sizes or len(cfg.sizes) < 2:  # checked before any training, not at the fit
        raise UserError("The sweep needs at least two sizes (a power law is fit through them); "
                        "list them under `sizes:` in the config.")
    names = []
    for i, s in enumerate(cfg.sizes):
        if not isinstance(s, dict) or not {"n_layer", "d_model"} <= set(s):
            raise UserError(f"sizes[{i}] must be a mapping with at least n_layer and d_model.")
        unknown = sorted(set(s) - SIZE_KEYS)
        if unknown:
            raise UserError(f"sizes[{i}] has unknown key(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(SIZE_KEYS))}.")
        names.append(str(s.get("name", f"L{s['n_layer']}-d{s['d_model']}")))
    if len(set(names)) != len(names):
        raise UserError("Two sizes have the same name; give each a distinct `name`.")
    return [{**s, "name": n} for s, n in zip(cfg.sizes, names)]


def pretrain_config(cfg: ScalingConfig, size: dict[str, Any], data: Path, run_dir: Path) -> Any:
    from kotonoha.train.pretrain import PretrainConfig

    model = {k: v for k, v in size.items() if k not in ("name", "lr")}
    model.setdefault("n_kv_head", model.get("n_head", 4))  # plain multi-head at every size
    model["context_length"] = cfg.context_length
    train = replace(cfg.train, lr=float(size.get("lr", cfg.train.lr)))
    return PretrainConfig(data=str(data), out=str(run_dir), preset=cfg.preset, model=model,
                          tokens=cfg.tokens, train=train)


# Settings that change how a run is watched or where it runs, not the model it produces.
_NOT_FINGERPRINTED = {"progress", "plot", "log_interval", "eval_interval", "eval_tokens",
                      "checkpoint_interval", "device"}


def _fingerprint(pc: Any) -> str:
    settings = {k: v for k, v in asdict(pc).items() if k != "out"}
    settings["train"] = {k: v for k, v in settings["train"].items()
                         if k not in _NOT_FINGERPRINTED}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def train_size(cfg: ScalingConfig, size: dict[str, Any], data: Path) -> Path:
    """Pretrain one size, continue it after an interruption, or find it finished; returns its
    run directory. A run started with other settings is refused rather than mixed in."""
    from kotonoha.train.pretrain import run_pretrain

    run_dir = Path(cfg.out) / "runs" / size["name"]
    pc = pretrain_config(cfg, size, data, run_dir)
    fp = _fingerprint(pc)
    started, done = run_dir / "sweep.json", run_dir / DONE
    if started.is_file() and json.loads(started.read_text(encoding="utf-8")).get(
            "fingerprint") != fp:
        raise UserError(f"{run_dir} was trained with other settings; delete it to retrain "
                        "this size, or choose another `out`.")
    if done.is_file():
        return run_dir
    if _rank() == 0:
        atomic_write_json(started, {"fingerprint": fp, "size": size})
    t0 = time.perf_counter()
    run_pretrain(pc, resume=True)  # resume=True also starts fresh when there is no checkpoint
    if _rank() == 0:
        atomic_write_json(done, {"fingerprint": fp, "seconds": time.perf_counter() - t0})
    return run_dir


# ---------------------------------------------------------------------------------------------
# Evaluation


def _carries(a: int, b: int) -> bool:
    while a or b:
        if a % 10 + b % 10 >= 10:
            return True
        a, b = a // 10, b // 10
    return False


def _addends(item: dict[str, Any]) -> tuple[int, int] | None:
    m = re.search(r"(\d+) \+ (\d+)", item.get("prompt", ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


def task_items(world: Path, task: Task, *, per_lang: int, split: str | None,
               ) -> list[dict[str, Any]]:
    """The world's eval items of one task, as completion prompts, `per_lang` per language."""
    from kotonoha.eval.world import load_items

    items = load_items(world, tasks=[task.world_task], split=split)
    if task.name == "addition":
        def keep(it: dict[str, Any]) -> bool:
            ab = _addends(it)
            return (it.get("op") == "+" and 2 <= int(it.get("digits", 0)) <= 4
                    and ab is not None and _carries(*ab))
        items = [it for it in items if keep(it)]
    picked: list[dict[str, Any]] = []
    for lang in ("en", "ja"):
        group = [it for it in items if it.get("lang") == lang]
        # Evenly spaced through the file, so every entity and relation kind is represented.
        picked += group[::max(1, len(group) // per_lang)][:per_lang]
    return picked


def reference_continuation(item: dict[str, Any], task: Task) -> str:
    """The text a base model should write after the prompt (for the log-probability)."""
    if task.name == "addition":
        from kotonoha.data.world import arithmetic_text

        a, b = _addends(item) or (0, 0)
        full, _ = arithmetic_text(a, "+", b, item["lang"])
        return full[len(item["prompt"]):]
    return (" " if item["lang"] == "en" else "") + item["answer"]


@torch.no_grad()
def continuation_logprob(model: Transformer, tokenizer: Tokenizer, prompt: str,
                         continuation: str) -> float:
    """log p(continuation | prompt) in nats, teacher-forced, after a begin-of-text token."""
    head = tokenizer.encode(prompt, add_bos=True)
    ids = tokenizer.encode(prompt + continuation, add_bos=True)
    n = 0  # tokens shared with the prompt alone (a boundary token may merge)
    while n < min(len(head), len(ids)) and head[n] == ids[n]:
        n += 1
    drop = max(0, len(ids) - 1 - model.cfg.context_length)  # keep the end if too long
    ids, n = ids[drop:], max(1, n - drop)
    x = torch.tensor([ids], device=next(model.parameters()).device)
    logp = model(x[:, :-1])[0].float().log_softmax(-1)  # row j predicts token j + 1
    return float(logp[n - 1:].gather(1, x[0, n:, None]).sum())


def evaluate_model(model: Transformer, tokenizer: Tokenizer, world: Path,
                   cfg: ScalingConfig) -> dict[str, Any]:
    """Accuracy and mean log p(correct continuation) per task (greedy decoding + checker)."""
    from kotonoha.eval.world import (
        completion_text,
        engine_generate,
        render_completion,
        run_items,
    )

    out: dict[str, Any] = {}
    for task in TASKS:
        items = task_items(world, task, per_lang=cfg.eval_items, split=cfg.eval_split)
        if not items:
            continue
        gen = engine_generate(model, tokenizer, max_tokens=task.max_tokens, stop=task.stop,
                              batch_size=cfg.eval_batch_size)
        results = run_items(items, render_completion(tokenizer, task.running_text), gen)
        logps = [continuation_logprob(model, tokenizer,
                                      completion_text(it["prompt"], task.running_text),
                                      reference_continuation(it, task)) for it in items]
        correct = sum(r.correct for r in results)
        out[task.name] = {"accuracy": correct / len(results), "correct": correct,
                          "total": len(results), "logprob": sum(logps) / len(logps),
                          "examples": [{"prompt": it["prompt"], "answer": it["answer"],
                                        "response": r.response, "correct": r.correct}
                                       for it, r in list(zip(items, results))[:3]]}
    return out


def measure_run(run_dir: Path, data: Path, world: Path, cfg: ScalingConfig,
                size: dict[str, Any]) -> dict[str, Any]:
    from kotonoha.checkpoint import load_model
    from kotonoha.eval.bpb import bits_per_byte
    from kotonoha.model import flops_per_token

    model, tok = load_model(run_dir, device=_eval_device(cfg), dtype=torch.float32)
    assert tok is not None
    model_json = json.loads((run_dir / "model.json").read_text(encoding="utf-8"))
    tokens = model_json["step"] * cfg.train.batch_size * cfg.context_length
    flops = flops_per_token(model.cfg, cfg.context_length)["training"] * tokens
    bpb = bits_per_byte(model, data, "val", max_tokens=cfg.val_tokens,
                        context_length=cfg.context_length)
    done = json.loads((run_dir / DONE).read_text(encoding="utf-8"))
    return {
        "name": size["name"], "n_layer": model.cfg.n_layer, "d_model": model.cfg.d_model,
        "n_head": model.cfg.n_head, "params": model.num_params(),
        "params_non_embedding": model.num_params(exclude_embeddings=True),
        "tokens": tokens, "flops": flops, "train_seconds": done.get("seconds"),
        "val_loss": bpb["loss"], "val_bpb": bpb["bpb"],
        "tasks": evaluate_model(model, tok, world, cfg),
    }


def _eval_device(cfg: ScalingConfig) -> str:
    from kotonoha.train.loop import resolve_device

    return str(resolve_device(cfg.train.device))


# ---------------------------------------------------------------------------------------------
# Report


def describe_curve(sizes: list[str], acc: list[float], totals: list[int]) -> str:
    """Plain words for one accuracy curve: flat, smooth, or a sharp jump (and whether that
    jump is bigger than the sampling noise of the item count)."""
    best = max(acc)
    if best < 0.05:
        return f"no size gets more than {best:.0%} right: the ability does not appear here."
    steps = [b - a for a, b in zip(acc, acc[1:])]
    if not steps:
        return f"one size only ({acc[0]:.0%})."
    i = max(range(len(steps)), key=lambda j: steps[j])
    rise = best - min(acc)
    n = min(totals)
    noise = 2 * math.sqrt(max(best * (1 - best), 0.05 * 0.95) / max(n, 1))
    if steps[i] >= 0.25 and steps[i] >= 0.6 * rise and steps[i] > noise:
        return (f"a sharp jump: {acc[i]:.0%} at {sizes[i]} to {acc[i + 1]:.0%} at "
                f"{sizes[i + 1]}, most of the total rise of {rise:.0%} in one step.")
    if rise <= noise:
        return (f"flat within noise ({min(acc):.0%}-{best:.0%}; about ±{noise / 2:.0%} "
                f"from {n} items).")
    top = sizes[acc.index(best)]
    return (f"goes from {acc[0]:.0%} to {acc[-1]:.0%} (best {best:.0%} at {top}) in steps of "
            f"at most {steps[i]:+.0%} ({sizes[i]} -> {sizes[i + 1]}): no sharp jump.")


def plot_scaling(results: list[dict[str, Any]], fits: dict[str, dict[str, float]],
                 out: Path) -> list[Path]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    def tidy(ax: Any, loss_axis: bool) -> None:
        # Labelled minor ticks overlap on log axes that span a few decades or less.
        ax.xaxis.set_minor_formatter(NullFormatter())
        if loss_axis:  # a narrow range: plain numbers read better than 5.6 x 10^0
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))

    paths = []
    loss = [r["val_loss"] for r in results]
    with plot_style():
        for key, xlabel, fname in (("params_non_embedding", "non-embedding parameters",
                                    "loss_vs_params.png"),
                                   ("flops", "training FLOPs", "loss_vs_flops.png")):
            x = [r[key] for r in results]
            fit = fits[key]
            fig = Figure(figsize=(6, 4.2))
            ax = fig.subplots()
            ax.loglog(x, loss, "o", label="validation loss")
            for xi, yi, r in zip(x, loss, results):
                ax.annotate(r["name"], (xi, yi), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
            grid = torch.logspace(math.log10(min(x)), math.log10(max(x)), 50).tolist()
            ax.loglog(grid, [fit["a"] * g ** fit["b"] for g in grid], "--",
                      label=f"fit: L = {fit['a']:.3g} x^{fit['b']:.3f} (R² {fit['r2']:.2f})")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation loss (nats/token)")
            tidy(ax, loss_axis=True)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
            fig.tight_layout()
            paths.append(save_figure(fig, out / fname))

        fig = Figure(figsize=(11, 4.2))
        ax_acc, ax_lp = fig.subplots(1, 2)
        x = [r["params_non_embedding"] for r in results]
        for task in TASKS:
            if task.name not in results[0]["tasks"]:
                continue
            ax_acc.semilogx(x, [r["tasks"][task.name]["accuracy"] for r in results], "o-",
                            label=f"{task.name}: {task.description}")
            ax_lp.semilogx(x, [r["tasks"][task.name]["logprob"] for r in results], "o-",
                           label=task.name)
        ax_acc.set_ylim(-0.03, 1.03)
        ax_acc.set_ylabel("accuracy (greedy, world checker)")
        ax_lp.set_ylabel("mean log p(correct continuation), nats")
        for ax in (ax_acc, ax_lp):
            ax.set_xlabel("non-embedding parameters")
            tidy(ax, loss_axis=False)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(save_figure(fig, out / "accuracy_vs_size.png"))
    return paths


def summary_markdown(cfg: ScalingConfig, results: list[dict[str, Any]],
                     fits: dict[str, dict[str, float]]) -> str:
    names = [r["name"] for r in results]
    span = max(r["params"] for r in results) / min(r["params"] for r in results)
    span_ne = (max(r["params_non_embedding"] for r in results)
               / min(r["params_non_embedding"] for r in results))
    task_names = [t.name for t in TASKS if t.name in results[0]["tasks"]]
    rows = []
    for r in results:
        secs = r["train_seconds"]
        rows.append([r["name"], r["n_layer"], r["d_model"], f"{r['params']:,}",
                     f"{r['params_non_embedding']:,}", f"{r['flops']:.3g}",
                     f"{secs:.0f}" if secs is not None else "–", f"{r['val_loss']:.4f}",
                     f"{r['val_bpb']:.4f}"]
                    + [f"{r['tasks'][t]['accuracy']:.1%} ({r['tasks'][t]['logprob']:.2f})"
                       for t in task_names])
    lines = [
        "# Scaling sweep\n",
        f"{len(results)} sizes of the `{cfg.preset}` architecture (context {cfg.context_length}),"
        f" spanning {span:.0f}x in parameters ({span_ne:.0f}x without embeddings). **Every size "
        f"was trained on the same data with the same token budget** ({results[0]['tokens']:,} "
        "tokens, same order, same schedule): this is a fixed-data sweep, not a compute-optimal "
        "one, so larger models are relatively undertrained.\n",
        md_table(["size", "layers", "d_model", "params", "non-emb. params", "train FLOPs",
                  "train s", "val loss", "val bpb"]
                 + [f"{t} acc. (log p)" for t in task_names], rows),
        "\nTasks are completion prompts from the world's eval items, decoded greedily and "
        "scored by the world's checker; log p is the mean log-probability (nats) of the "
        "correct continuation, teacher-forced.\n",
        "\n## Loss\n",
        "![loss vs parameters](loss_vs_params.png) ![loss vs FLOPs](loss_vs_flops.png)\n",
    ]
    for key, what in (("params_non_embedding", "non-embedding parameters N"),
                      ("flops", "training FLOPs C")):
        f = fits[key]
        lines.append(f"- against {what}: L = {f['a']:.4g} · x^{f['b']:.4f} (R² = {f['r2']:.3f})")
    lines += ["\n## Accuracy against size\n", "![accuracy vs size](accuracy_vs_size.png)\n"]
    for t in TASKS:
        if t.name not in task_names:
            continue
        acc = [r["tasks"][t.name]["accuracy"] for r in results]
        lps = [r["tasks"][t.name]["logprob"] for r in results]
        totals = [r["tasks"][t.name]["total"] for r in results]
        lines.append(f"- **{t.name}** ({t.description}, {totals[0]} items): "
                     f"{describe_curve(names, acc, totals)} Log p of the correct continuation "
                     f"goes from {lps[0]:.2f} to {lps[-1]:.2f} nats.")
    if span < 30:
        lines.append(f"\nNote: these sizes span only {span:.0f}x in parameters (< 30x).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The command


def run_scaling(cfg: ScalingConfig, progress: bool = True) -> dict[str, Any] | None:
    """Train every size, evaluate, fit and plot; returns the summary (None on ranks > 0)."""
    sizes = _check_sizes(cfg)
    if cfg.tokens <= 0:
        raise UserError("tokens must be a positive token budget.")
    if cfg.eval_items < 1:  # checked now, not after every size has trained
        raise UserError(f"eval_items must be at least 1 (items per task and language), not "
                        f"{cfg.eval_items}.")
    if cfg.eval_split not in (None, "seen", "heldout"):
        raise UserError(f"eval_split must be seen, heldout or left out (both), not "
                        f"{cfg.eval_split!r}.")
    cfg.train.progress = cfg.train.progress and progress
    if cfg.threads is not None:
        # On a busy machine one thread per process beats several that fight for the cores.
        torch.set_num_threads(max(1, cfg.threads))
    out = Path(cfg.out)
    data, world = prepare_corpus(cfg, progress)
    runs = []
    for i, size in enumerate(sizes):
        if progress and _rank() == 0:
            print(f"scaling: size {i + 1}/{len(sizes)} ({size['name']})", file=sys.stderr)
        runs.append(train_size(cfg, size, data))
    if _rank() != 0:
        return None
    results = [measure_run(run, data, world, cfg, size) for run, size in zip(runs, sizes)]
    fits = {key: fit_power_law([r[key] for r in results], [r["val_loss"] for r in results])
            for key in ("params_non_embedding", "flops")}
    plot_scaling(results, fits, out)
    summary = {"config": asdict(cfg), "results": results, "fits": fits}
    atomic_write_json(out / "scaling.json", summary)
    atomic_write_text(out / "summary.md", summary_markdown(cfg, results, fits))
    return summary


def scaling_main(config_path: str | None, overrides: list[str]) -> dict[str, Any] | None:
    """`kotonoha experiment scaling --config configs/scaling.yaml [key=value ...]`."""
    from kotonoha.config import load_config

    cfg = load_config(ScalingConfig, config_path, overrides)
    try:
        result = run_scaling(cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if result is not None:
        print(f"scaling sweep written to {cfg.out} (summary.md, scaling.json, *.png)")
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m kotonoha.explain.scaling` (what torchrun launches; finished sizes are always
    skipped, so `--resume` changes nothing)."""
    from kotonoha.train.loop import module_main

    return module_main(lambda config, overrides, _resume: scaling_main(config, overrides),
                       "python -m kotonoha.explain.scaling", argv)


if __name__ == "__main__":
    sys.exit(main())
