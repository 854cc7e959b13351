"""`kotonoha baselines`: what the transformer buys over an n-gram and an LSTM.

Two measurements on the same shards:

1. **Bits per byte** on the validation split (tokenizer-independent, `eval/bpb.py`) for
   Kneser–Ney n-grams of each order, an LSTM, and optionally a trained transformer, with
   parameters, training tokens, FLOPs and time.
2. **A long-range recall probe.** A fact is stated ("The secret word is Sarn."), then `d`
   tokens of real validation text follow as a distraction, then the question repeats the
   key ("The secret word is") and every model scores K candidate answers as the next
   token. A model that predicts from the last n-1 tokens (an n-gram) cannot see the fact once
   it is further back than that, so it is at chance; an LSTM must carry the name in its state
   and forgets with distance; a transformer can attend back anywhere within its context.

   Every model is scored the same way, from its next-token log-probabilities of the K
   candidates. Each distraction is used K times, once with each candidate as the answer, and
   tied best scores share the credit; so a model that ignores the fact scores exactly 1/K.
"""

from __future__ import annotations

import io
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from kotonoha.baselines.lstm import LSTMConfig, match_params, seconds_per_step, train_lstm
from kotonoha.baselines.ngram import load_split, run_ngram
from kotonoha.data.shards import TOKENIZER_SUBDIR, read_meta
from kotonoha.errors import UserError

# contexts -> (B, V) next-token log-probabilities
NextLogprobs = Callable[[list[list[int]]], np.ndarray]


# ---------------------------------------------------------------------------------------------
# The recall probe


@dataclass
class ProbeConfig:
    # Tokens from after the fact's answer to the end of the question (at least the question).
    distances: tuple[int, ...] = (8, 32, 64, 128, 200)
    groups: int = 16  # distraction texts per distance (each used `candidates` times)
    candidates: int = 4  # answer choices: chance is 1 / candidates
    key: str = " The secret word is"
    lead: int = 16  # tokens of text before the fact
    seed: int = 0


@dataclass
class Trial:
    distance: int  # tokens after the fact's answer up to and including the question's last
    context: list[int]  # ends with the question; the answer is the next token
    candidates: list[int]
    answer: int  # index into candidates


def candidate_tokens(tokenizer: Any, text: np.ndarray, exclude: Sequence[int] = (),
                     min_count: int = 3) -> list[int]:
    """Single tokens that are whole proper nouns in `text` (" Sarn", " Velmora"), if it has
    at least 8 of them, else any single-token words.

    Answers of one kind make the candidates equally plausible in the answer slot, so what
    decides between them is the fact in the context, not a prior for one kind of word. A
    token counts as a proper noun when it is capitalised, usually stands mid-sentence (not
    after a full stop, as " The" does) and is usually a whole word (not " Febr" + "uary").
    """
    skip = set(exclude) | set(getattr(tokenizer, "stop_ids", []))
    strings = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    cap = np.array([i not in skip and re.fullmatch(r" [A-Z][a-z]{2,}", t) is not None
                    for i, t in enumerate(strings)])
    word = np.array([i not in skip and re.fullmatch(r" [A-Za-z]{2,}", t) is not None
                     for i, t in enumerate(strings)])
    glued = np.array([t[:1].isalpha() for t in strings])  # continues the previous token's word
    ends = np.array([t.rstrip()[-1:] in (".", "!", "?", "。") or "\n" in t or i in skip
                     for i, t in enumerate(strings)])
    t = np.asarray(text, dtype=np.int64)
    if len(t) >= 3:
        mid, V = t[1:-1], tokenizer.vocab_size
        seen = np.bincount(mid, minlength=V)
        whole = np.bincount(mid[~glued[t[2:]]], minlength=V)
        inside = np.bincount(mid[~ends[t[:-2]]], minlength=V)
        with np.errstate(invalid="ignore", divide="ignore"):
            names = cap & (seen >= min_count) & (whole >= 0.9 * seen) & (inside >= 0.5 * seen)
        if names.sum() >= 8:
            return np.flatnonzero(names).tolist()
    return np.flatnonzero(word).tolist()


def build_probe(tokenizer: Any, filler: np.ndarray, cfg: ProbeConfig | None = None,
                ) -> list[Trial]:
    """Trials for every distance: lead text, the fact, distraction, the question."""
    cfg = cfg or ProbeConfig()
    rng = np.random.default_rng(cfg.seed)
    key = tokenizer.encode(cfg.key)
    stop = tokenizer.encode(".")
    pool = candidate_tokens(tokenizer, filler, exclude=[*key, *stop])
    if len(pool) < cfg.candidates:
        raise UserError(f"The tokenizer has only {len(pool)} single-token words to use as "
                        f"recall answers; the probe needs {cfg.candidates}.")
    trials = []
    for requested in cfg.distances:
        # The question itself spans len(stop + key) tokens: a shorter distance is impossible.
        n_distract = max(0, requested - len(stop) - len(key))
        distance = len(stop) + n_distract + len(key)
        need = cfg.lead + n_distract
        if len(filler) <= need:
            raise UserError(f"The validation split ({len(filler)} tokens) is too short for a "
                            f"recall distance of {distance}.")
        for _ in range(cfg.groups):
            start = int(rng.integers(len(filler) - need))
            lead = filler[start:start + cfg.lead].tolist()
            distract = filler[start + cfg.lead:start + need].tolist()
            cands = rng.choice(pool, cfg.candidates, replace=False).tolist()
            for j, answer in enumerate(cands):
                context = [*lead, *key, answer, *stop, *distract, *key]
                trials.append(Trial(distance, context, cands, j))
    return trials


def run_probe(trials: Sequence[Trial], next_logprobs: NextLogprobs, batch_size: int = 32,
              ) -> dict[int, float]:
    """Accuracy per distance; ties at the top share the credit (random tie-breaking)."""
    credit: dict[int, list[float]] = {}
    for start in range(0, len(trials), batch_size):
        batch = trials[start:start + batch_size]
        logprobs = next_logprobs([t.context for t in batch])
        for t, row in zip(batch, logprobs):
            scores = np.asarray(row)[t.candidates]
            best = scores == scores.max()
            credit.setdefault(t.distance, []).append(best[t.answer] / best.sum())
    return {d: float(np.mean(c)) for d, c in sorted(credit.items())}


def torch_next_logprobs(model: nn.Module, max_context: int | None = None) -> NextLogprobs:
    """Next-token log-probabilities from `model(idx) -> logits`; contexts longer than
    `max_context` keep their last tokens (what a model with that window can see)."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def score(contexts: list[list[int]]) -> np.ndarray:
        model.eval()
        cut = [c[-max_context:] if max_context else c for c in contexts]
        out = np.zeros((len(cut), 0), dtype=np.float32)
        # Same-length contexts go through together (no padding, so no masks needed).
        for n in sorted({len(c) for c in cut}):
            rows = [i for i, c in enumerate(cut) if len(c) == n]
            logits = model(torch.tensor([cut[i] for i in rows], device=device))[:, -1].float()
            logprobs = torch.log_softmax(logits, -1).cpu().numpy()
            if out.shape[1] == 0:
                out = np.zeros((len(cut), logprobs.shape[1]), dtype=np.float32)
            out[rows] = logprobs
        return out

    return score


# ---------------------------------------------------------------------------------------------
# The transformer under comparison


def _training_record(model_path: Path) -> dict[str, float]:
    """Tokens and seconds the transformer trained for, from its run's metrics.jsonl."""
    for d in (model_path, model_path.parent):
        path = d / "metrics.jsonl"
        if path.is_file():
            last: dict[str, float] = {}
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "tokens" in rec:
                    last = rec
            if last:
                return {"tokens": float(last["tokens"]),
                        "time_s": last.get("elapsed_s")}
    return {}


def _load_transformer(path: str | Path, data_dir: Path, device: str,
                      ) -> tuple[nn.Module, dict[str, Any]]:
    from kotonoha.checkpoint import load_model
    from kotonoha.eval.bpb import trained_context
    from kotonoha.eval.world import check_tokenizer_matches
    from kotonoha.model import flops_per_token

    model, tokenizer = load_model(path, device=device)
    check_tokenizer_matches(tokenizer, data_dir)
    info: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters()),
                            "context": trained_context(path) or model.cfg.context_length}
    record = _training_record(Path(path))
    if record:
        info["train_tokens"] = record["tokens"]
        info["time_s"] = record["time_s"]
        info["flops"] = flops_per_token(model.cfg)["training"] * record["tokens"]
    return model, info


# ---------------------------------------------------------------------------------------------
# The report


def _fmt_count(x: float | None) -> str:
    if x is None:
        return "–"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_report(rows: list[dict[str, Any]], probe: dict[str, dict[int, float]],
                  chance: float) -> str:
    lines = ["## Validation bits per byte", "",
             "| model | parameters | train tokens | train FLOPs | time | val bits/byte |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r.get("time_s")
        lines.append(
            f"| {r['name']} | {_fmt_count(r.get('params'))}"
            f"{' n-grams' if r['kind'] == 'ngram' else ''} | {_fmt_count(r.get('train_tokens'))}"
            f" | {_fmt_count(r.get('flops'))} | "
            f"{'–' if t is None else f'{t:.1f} s'} | {r['bpb']:.4f} |")
    if probe:
        distances = sorted({d for acc in probe.values() for d in acc})
        lines += ["", "## Long-range recall (accuracy against distance in tokens)", "",
                  "| model | " + " | ".join(f"d={d}" for d in distances) + " |",
                  "|---|" + "---:|" * len(distances)]
        for name, acc in probe.items():
            lines.append(f"| {name} | "
                         + " | ".join(f"{acc[d]:.0%}" if d in acc else "–" for d in distances)
                         + " |")
        lines.append("| chance | " + " | ".join(f"{chance:.0%}" for _ in distances) + " |")
    return "\n".join(lines) + "\n"


def plot_probe(probe: dict[str, dict[int, float]], chance: float, path: str | Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    from kotonoha.checkpoint import atomic_write_bytes

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    for name, acc in probe.items():
        ax.plot(list(acc), list(acc.values()), "o-", label=name)
    ax.axhline(chance, color="gray", linestyle="--", label="chance")
    ax.set_xlabel("distance between the fact and the question (tokens)")
    ax.set_ylabel("recall accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


@dataclass
class LSTMSettings:
    # None: as many tokens as the transformer trained on (comparable compute), else 300 steps;
    # either way no more than fit in `max_time_s` (measured), since a CPU LSTM is slow.
    steps: int | None = None
    max_time_s: float | None = 600.0
    batch_size: int = 16
    n_layer: int = 2
    d_model: int | None = None  # None: match the transformer's parameters, else 256
    context_length: int | None = None  # None: the transformer's, else 128
    lr: float = 3e-3


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def baselines_main(data_dir: str | Path, *, transformer: str | Path | None = None,
                   out: str | Path | None = None, ngram_orders: Sequence[int] = (2, 3, 4, 5),
                   lstm_steps: int | None = None, lstm: LSTMSettings | None = None,
                   probe: ProbeConfig | None = None, max_train_tokens: int | None = None,
                   max_eval_tokens: int | None = None, device: str = "cpu", seed: int = 0,
                   progress: bool = True) -> dict[str, Any]:
    """Fit the n-grams, train the LSTM, load the transformer; compare bpb and recall.

    Writes `report.md`, `baselines.json` and `recall.png` into `out` when given, prints the
    report, and returns {"rows": [...], "probe": {model: {distance: accuracy}}, "chance",
    "report"}. `lstm_steps=0` skips the LSTM; empty `ngram_orders` skips the n-grams.
    """
    data = Path(data_dir)
    meta = read_meta(data)
    lstm = lstm or LSTMSettings()
    if lstm_steps is not None:
        lstm = replace(lstm, steps=lstm_steps)
    # Every setting is checked before the first n-gram is fitted, not after minutes of work.
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the report.")
    least = max(ngram_orders, default=1)  # an n-gram model needs at least n tokens
    if max_train_tokens is not None and max_train_tokens < least:
        raise UserError(f"--max-train-tokens must be at least {least}, not {max_train_tokens}.")
    if lstm.steps is not None and lstm.steps < 0:
        raise UserError(f"--lstm-steps must be 0 (no LSTM) or more, not {lstm.steps}.")
    probe_cfg = probe or ProbeConfig(seed=seed)
    rows: list[dict[str, Any]] = []
    scorers: dict[str, NextLogprobs] = {}
    tf_model, tf_info = None, {}
    if transformer is not None:  # a bad path fails here, with the loader's own error
        tf_model, tf_info = _load_transformer(transformer, data, device)

    for n in ngram_orders:
        _log(f"fitting the {n}-gram Kneser–Ney model...", progress)
        model, res = run_ngram(data, n, max_train_tokens=max_train_tokens,
                               max_eval_tokens=max_eval_tokens)
        res.update(name=f"{n}-gram KN", kind="ngram",
                   train_tokens=min(meta["splits"]["train"]["tokens"],
                                    max_train_tokens or math.inf))
        rows.append(res)
        scorers[res["name"]] = model.next_logprobs

    if lstm.steps != 0:
        ctx = lstm.context_length or tf_info.get("context", 128)
        d = lstm.d_model or (match_params(tf_info["params"], meta["vocab_size"], lstm.n_layer)
                             if tf_model else 256)
        cfg = LSTMConfig(vocab_size=meta["vocab_size"], d_model=d, n_layer=lstm.n_layer,
                         context_length=ctx)
        steps = lstm.steps
        if steps is None:  # same training tokens as the transformer: comparable compute
            tokens = tf_info.get("train_tokens")
            steps = math.ceil(tokens / (lstm.batch_size * ctx)) if tokens else 300
            if lstm.max_time_s:
                per_step = seconds_per_step(cfg, lstm.batch_size, device)
                steps = max(1, min(steps, int(lstm.max_time_s / per_step)))
        _log(f"training the LSTM (d={d}, {lstm.n_layer} layers) for {steps} steps...", progress)
        lstm_model, res = train_lstm(data, cfg, steps=steps, batch_size=lstm.batch_size,
                                     lr=lstm.lr, seed=seed, device=device,
                                     eval_tokens=max_eval_tokens, progress=progress)
        res.update(name="LSTM", kind="lstm")
        rows.append(res)
        scorers["LSTM"] = torch_next_logprobs(lstm_model)

    if tf_model is not None:
        from kotonoha.eval.bpb import bits_per_byte

        _log("evaluating the transformer...", progress)
        res = bits_per_byte(tf_model, data, max_tokens=max_eval_tokens,
                            context_length=tf_info["context"])
        res.update(tf_info, name="transformer", kind="transformer")
        rows.append(res)
        scorers["transformer"] = torch_next_logprobs(tf_model, tf_info["context"])

    probe_acc: dict[str, dict[int, float]] = {}
    if scorers and probe_cfg.distances:
        from kotonoha.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(data / TOKENIZER_SUBDIR)
        trials = build_probe(tokenizer, load_split(data, "val"), probe_cfg)
        for name, scorer in scorers.items():
            _log(f"recall probe: {name}...", progress)
            probe_acc[name] = run_probe(trials, scorer)
    chance = 1.0 / probe_cfg.candidates
    report = format_report(rows, probe_acc, chance)
    print(report, end="")
    summary = {"data": str(data), "rows": rows, "probe": probe_acc, "chance": chance,
               "probe_config": asdict(probe_cfg), "report": report}
    if out is not None:
        from kotonoha.checkpoint import atomic_write_json, atomic_write_text

        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        title = f"# Baselines on {data}\n\n"
        if probe_acc:
            plot_probe(probe_acc, chance, out_dir / "recall.png")
            report += "\n![recall accuracy against distance](recall.png)\n"
        atomic_write_text(out_dir / "report.md", title + report)
        atomic_write_json(out_dir / "baselines.json",
                          {**summary, "probe": {k: {str(d): a for d, a in v.items()}
                                                for k, v in probe_acc.items()}})
        _log(f"wrote {out_dir / 'report.md'}", progress)
    return summary
