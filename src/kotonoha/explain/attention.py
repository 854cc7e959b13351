"""Attention: every head's map for a prompt, and which heads look where.

- `attention_maps`: the softmax weights of every layer and head, (L, H, T, T); row t is how
  token t spreads its attention over tokens 0..t (rows sum to 1, zeros above the diagonal).
  `plot_attention` writes a PNG grid of heads per layer; `maps_to_json` is the data for the
  web UI's "Inside" tab.
- `rank_heads`: given a target (query) position and source positions, every head ranked by
  the attention mass the target puts on the sources.
- `pronoun_study`: on stories where a pronoun can mean only one of two people (the world's
  pronoun templates, English or Japanese), which heads put mass on the right name when the
  model reads the pronoun, against the wrong name, the mean head, and uniform attention.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kotonoha.errors import UserError
from kotonoha.explain.common import (
    check_at_least_one,
    check_out_dir,
    encode,
    find_word,
    md_table,
    plot_style,
    quote,
    residual_stream,
    save_figure,
    span_positions,
    token_labels,
    token_offsets,
    write_summary,
)

if TYPE_CHECKING:
    from kotonoha.model import Transformer
    from kotonoha.tokenizer import Tokenizer


@dataclass
class AttentionMaps:
    text: str
    ids: list[int]
    tokens: list[str]
    weights: torch.Tensor  # (layers, heads, T, T), float32 on the CPU


def attention_maps(model: Transformer, tokenizer: Tokenizer, text: str,
                   add_bos: bool = True) -> AttentionMaps:
    ids = encode(tokenizer, text, add_bos)
    _, out = residual_stream(model, ids, attentions=True)
    weights = torch.stack([a[0].float().cpu() for a in out.attentions])
    return AttentionMaps(text, ids, token_labels(tokenizer, ids), weights)


def maps_to_json(maps: AttentionMaps, decimals: int = 4) -> dict[str, Any]:
    """{"text", "tokens", "ids", "n_layer", "n_head", "attention": [layer][head][query][key]}."""
    w = torch.round(maps.weights, decimals=decimals)
    return {"text": maps.text, "tokens": maps.tokens, "ids": maps.ids,
            "n_layer": w.shape[0], "n_head": w.shape[1], "attention": w.tolist()}


def plot_attention(maps: AttentionMaps, layer: int, path: str | Path) -> Path:
    """One layer's heads side by side: query tokens down, key tokens across."""
    from matplotlib.figure import Figure

    w = maps.weights[layer]
    n_head, T = w.shape[0], w.shape[-1]
    cols = min(n_head, 4)
    rows = math.ceil(n_head / cols)
    size = 2.2 + 0.12 * T
    labels = T <= 40  # beyond that the tick labels are unreadable
    with plot_style():
        fig = Figure(figsize=(cols * size, rows * size + 0.4))
        axes = fig.subplots(rows, cols, squeeze=False)
        for h, ax in enumerate(axes.flat):
            if h >= n_head:
                ax.axis("off")
                continue
            ax.imshow(w[h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer} head {h}", fontsize=9)
            if labels:
                ax.set_xticks(range(T), maps.tokens, rotation=90, fontsize=6)
                ax.set_yticks(range(T), maps.tokens, fontsize=6)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
        fig.suptitle("attention (rows: query token, columns: key token)", fontsize=10)
        fig.tight_layout()
        return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Head finder


def word_positions(tokenizer: Tokenizer, text: str, word: str, add_bos: bool = True,
                   ) -> list[list[int]]:
    """Token positions of every occurrence of `word` in `text` (one list per occurrence)."""
    _, offsets = token_offsets(tokenizer, text)
    shift = len(encode(tokenizer, text, add_bos)) - len(offsets)
    found, start = [], 0
    while (span := find_word(text, word, start)) is not None:
        found.append(span_positions(offsets, span, shift))
        start = span[1]
    return found


def resolve_positions(maps: AttentionMaps, tokenizer: Tokenizer, spec: str, add_bos: bool,
                      what: str) -> list[list[int]]:
    """A position ("5", "-1") or a word of the prompt -> positions, one list per occurrence."""
    T = len(maps.ids)
    try:
        pos = int(spec)
    except ValueError:
        found = word_positions(tokenizer, maps.text, spec, add_bos)
        if not found:
            raise UserError(f"The {what} '{spec}' does not occur in the prompt; give a word of "
                            "it or a token position.") from None
        return found
    if not -T <= pos < T:
        raise UserError(f"The {what} position {pos} is outside the prompt's {T} tokens.")
    return [[pos % T]]


def rank_heads(weights: torch.Tensor, target: int, sources: list[int]) -> list[dict[str, Any]]:
    """Every (layer, head), by the attention mass query `target` puts on `sources`."""
    mass = weights[:, :, target, sources].sum(-1)  # (layers, heads)
    order = torch.sort(-mass.flatten(), stable=True).indices.tolist()
    n_head = weights.shape[1]
    return [{"layer": i // n_head, "head": i % n_head, "mass": float(mass.flatten()[i])}
            for i in order]


def baselines(weights: torch.Tensor, target: int, sources: list[int]) -> dict[str, float]:
    """What a head with no preference would give: the mean over all heads (the expected mass
    of a randomly picked head) and uniform attention over the visible positions."""
    mass = weights[:, :, target, sources].sum(-1)
    return {"mean_head": float(mass.mean()), "uniform": len(sources) / (target + 1)}


def find_heads(model: Transformer, tokenizer: Tokenizer, text: str, *, target: str = "-1",
               source: str, add_bos: bool = True, top: int = 10) -> dict[str, Any]:
    """Heads ranked by the mass the target token puts on the source token(s).

    A word as target means the last token of its last occurrence; a word as source means all
    tokens of all its occurrences at or before the target (attention is causal).
    """
    maps = attention_maps(model, tokenizer, text, add_bos)
    t = resolve_positions(maps, tokenizer, target, add_bos, "target")[-1][-1]
    sources = sorted({p for occ in resolve_positions(maps, tokenizer, source, add_bos, "source")
                      for p in occ if p <= t})
    if not sources:
        raise UserError(f"The source '{source}' comes after the target; a token can only attend "
                        "to itself and the tokens before it.")
    return {"text": text, "tokens": maps.tokens, "target": t, "sources": sources,
            "heads": rank_heads(maps.weights, t, sources)[:top],
            "baselines": baselines(maps.weights, t, sources)}


# ---------------------------------------------------------------------------------------------
# Pronoun stories


@dataclass
class PronounStory:
    text: str
    referent: str  # the name the pronoun means
    other: str  # the other person, never meant
    pronoun: str


def pronoun_stories(lang: str = "en", n: int = 40, seed: int = 0) -> list[PronounStory]:
    """The world's pronoun templates with everyday names; the two people always differ in
    gender, so exactly one of them can be meant."""
    from kotonoha.data.world import POOL_F, POOL_M, PRONOUNS

    if lang not in PRONOUNS:
        raise UserError(f"No pronoun stories in '{lang}'; choose one of: {', '.join(PRONOUNS)}.")
    li = 0 if lang == "en" else 1
    rng = random.Random(f"kotonoha-explain/pronouns/{seed}/{lang}")
    stories = []
    while len(stories) < n:
        template, who = rng.choice(PRONOUNS[lang])
        ga = rng.choice("fm")
        a = rng.choice(POOL_F if ga == "f" else POOL_M)[li]
        b = rng.choice(POOL_M if ga == "f" else POOL_F)[li]
        if a in b or b in a:  # a name inside the other would blur which tokens are whose
            continue
        g = ga if who == "A" else ("m" if ga == "f" else "f")
        if lang == "en":
            subj, obj = ("she", "her") if g == "f" else ("he", "him")
            pron = {"s": subj, "S": subj.capitalize(), "o": obj}
        else:
            word = "彼女" if g == "f" else "彼"
            pron = {"s": word, "S": word, "o": word, "p": word}
        slots, used = {"A": a, "B": b}, ""
        for key, value in pron.items():
            if "{" + f"{key}{who}" + "}" in template:
                slots[f"{key}{who}"] = used = value
        ref, other = (a, b) if who == "A" else (b, a)
        stories.append(PronounStory(template.format_map(slots), ref, other, used))
    return stories


def pronoun_study(model: Transformer, tokenizer: Tokenizer, stories: list[PronounStory], *,
                  query: str = "pronoun", add_bos: bool = True, top: int = 10,
                  ) -> dict[str, Any]:
    """For each head, the mean attention mass from the pronoun (or, with query="before", from
    the token just before it, where the model predicts it) to the right name and to the wrong
    one, over all stories, and how often the right name gets more."""
    if query not in ("pronoun", "before"):
        raise UserError(f"query must be 'pronoun' or 'before', not '{query}'.")
    right, wrong, uniform, wins = [], [], [], []
    for s in stories:
        maps = attention_maps(model, tokenizer, s.text, add_bos)
        pron = word_positions(tokenizer, s.text, s.pronoun, add_bos)
        if not pron:
            raise UserError(f"Pronoun '{s.pronoun}' not found in {s.text!r}.")
        t = pron[-1][-1] if query == "pronoun" else pron[-1][0] - 1
        ref = [p for occ in word_positions(tokenizer, s.text, s.referent, add_bos)
               for p in occ if p <= t]
        oth = [p for occ in word_positions(tokenizer, s.text, s.other, add_bos)
               for p in occ if p <= t]
        w = maps.weights[:, :, t]
        r, o = w[:, :, ref].sum(-1), w[:, :, oth].sum(-1)
        right.append(r)
        wrong.append(o)
        wins.append((r > o).float())
        uniform.append(len(ref) / (t + 1))
    mass_r, mass_w = torch.stack(right).mean(0), torch.stack(wrong).mean(0)
    win = torch.stack(wins).mean(0)
    n_head = mass_r.shape[1]

    def ranked(score: torch.Tensor) -> list[dict[str, Any]]:
        order = torch.sort(-score.flatten(), stable=True).indices.tolist()[:top]
        return [{"layer": i // n_head, "head": i % n_head, "right": float(mass_r.flatten()[i]),
                 "wrong": float(mass_w.flatten()[i]), "right_wins": float(win.flatten()[i])}
                for i in order]

    return {
        "stories": len(stories), "query": query, "examples": [s.text for s in stories[:3]],
        # Heads that look at the right name most, and heads that tell the two names apart
        # (a head that attends to every name scores high on the first list only).
        "heads": ranked(mass_r), "selective_heads": ranked(mass_r - mass_w),
        "baselines": {"mean_head": float(mass_r.mean()), "mean_head_wrong": float(mass_w.mean()),
                      "uniform": sum(uniform) / len(uniform)},
        "right": mass_r.tolist(), "wrong": mass_w.tolist(),
    }


def plot_pronoun_study(study: dict[str, Any], path: str | Path, title: str) -> Path:
    from matplotlib.figure import Figure

    right, wrong = torch.tensor(study["right"]), torch.tensor(study["wrong"])
    n_layer, n_head = right.shape
    with plot_style():
        fig = Figure(figsize=(2 * (2.5 + 0.35 * n_head), 1.5 + 0.3 * n_layer))
        axes = fig.subplots(1, 2)
        panels = ((right, "mass on the right name", "viridis", 0.0, 1.0),
                  (right - wrong, "right minus wrong name", "coolwarm", -1.0, 1.0))
        for ax, (m, name, cmap, lo, hi) in zip(axes, panels):
            im = ax.imshow(m.numpy(), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_title(name, fontsize=10)
            fig.colorbar(im, ax=ax)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        return save_figure(fig, path)


def pronoun_markdown(study: dict[str, Any], lang: str) -> str:
    b = study["baselines"]
    headers = ["layer.head", "mass on right name", "mass on wrong name", "right > wrong"]

    def table(heads: list[dict[str, Any]]) -> str:
        return md_table(headers, [(f"{h['layer']}.{h['head']}", h["right"], h["wrong"],
                                   f"{h['right_wins']:.0%}") for h in heads])

    where = "the pronoun itself" if study["query"] == "pronoun" else "the token before the pronoun"
    return (f"### Pronoun stories ({lang}, {study['stories']} stories, query = {where})\n\n"
            "Example: " + " / ".join(study["examples"][:2]) + "\n\n"
            "Heads by mass on the right name:\n\n" + table(study["heads"])
            + "\nHeads by mass on the right name minus the wrong one:\n\n"
            + table(study["selective_heads"])
            + "\n\"right > wrong\" is the share of stories where the head gives the right name "
              "more attention than the wrong one.\n"
            + f"\nBaselines: the mean head puts {b['mean_head']:.3f} on the right name and "
              f"{b['mean_head_wrong']:.3f} on the wrong one; uniform attention over the "
              f"visible tokens would put {b['uniform']:.3f} on it.\n")


# ---------------------------------------------------------------------------------------------
# The command


def check_attention_options(*, stories: int, top: int,
                            pronoun_langs: list[str] | None) -> None:
    """--stories, --top and --pronouns, checked before the model runs."""
    from kotonoha.data.world import PRONOUNS

    check_at_least_one(stories, "--stories")
    check_at_least_one(top, "--top")
    for lang in pronoun_langs or []:
        if lang not in PRONOUNS:
            raise UserError(f"No pronoun stories in '{lang}'; choose one of: "
                            f"{', '.join(PRONOUNS)}.")


def attention_report(model: Transformer, tokenizer: Tokenizer, out: str | Path, *,
                     prompt: str | None = None, layers: list[int] | None = None,
                     target: str = "-1", source: str | None = None,
                     pronoun_langs: list[str] | None = None, stories: int = 40,
                     query: str = "pronoun", seed: int = 0, add_bos: bool = True, top: int = 10,
                     model_name: str = "model") -> dict[str, Any]:
    """Everything `kotonoha explain attention` writes into `out`: attention_layerNN.png,
    attention_maps.json (the weights, for the UI), pronouns_LANG.png, attention.md/json.

    Everything is computed (and so every input checked) before the first file is written: a
    bad --target or pronoun language leaves no half-written folder."""
    out = check_out_dir(out)
    check_attention_options(stories=stories, top=top, pronoun_langs=pronoun_langs)
    md = [f"# Attention in {model_name}\n"]
    data: dict[str, Any] = {"model": model_name}
    maps: AttentionMaps | None = None
    chosen: list[int] = []
    if prompt is not None:
        maps = attention_maps(model, tokenizer, prompt, add_bos)
        n_layer = maps.weights.shape[0]
        chosen = list(range(n_layer)) if layers is None else layers
        bad = [x for x in chosen if not 0 <= x < n_layer]
        if bad:
            raise UserError(f"Layer {bad[0]} does not exist; the model has layers 0..{n_layer - 1}.")
        md.append(f"Prompt: {prompt!r} ({len(maps.ids)} tokens). Maps: "
                  + ", ".join(f"[layer {x}](attention_layer{x:02d}.png)" for x in chosen)
                  + "; all weights in attention_maps.json.\n")
        if source is not None:
            found = find_heads(model, tokenizer, prompt, target=target, source=source,
                               add_bos=add_bos, top=top)
            data["heads"] = found
            b = found["baselines"]
            md.append(f"\n## Heads from token {found['target']} "
                      f"({quote(found['tokens'][found['target']])}) to {source!r} "
                      f"(positions {found['sources']})\n\n"
                      + md_table(["layer.head", "attention mass"],
                                 [(f"{h['layer']}.{h['head']}", h["mass"])
                                  for h in found["heads"]])
                      + f"\nBaselines: mean head {b['mean_head']:.3f}, uniform attention "
                        f"{b['uniform']:.3f}.\n")
    studies: dict[str, dict[str, Any]] = {}
    for lang in pronoun_langs or []:
        study = pronoun_study(model, tokenizer, pronoun_stories(lang, stories, seed),
                              query=query, add_bos=add_bos, top=top)
        studies[lang] = data[f"pronouns_{lang}"] = study
        md.append("\n" + pronoun_markdown(study, lang) + f"\n![heads](pronouns_{lang}.png)\n")

    if maps is not None:
        from kotonoha.checkpoint import atomic_write_json

        atomic_write_json(out / "attention_maps.json", maps_to_json(maps))
        for x in chosen:
            plot_attention(maps, x, out / f"attention_layer{x:02d}.png")
    for lang, study in studies.items():
        plot_pronoun_study(study, out / f"pronouns_{lang}.png",
                           f"{model_name}: attention from the pronoun ({lang})")
    write_summary(out, "attention", "\n".join(md), data)
    return data
