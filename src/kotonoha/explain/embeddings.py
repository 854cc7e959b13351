"""Embeddings: what a token's vector is near, and how context changes a word's vector.

- `nearest_neighbours`: cosine neighbours of a word in the input embedding table. A word that
  the tokenizer splits into several tokens is represented by the mean of their rows (the
  result says so), which is a rough stand-in: no single row means the whole word.
- `pca_2d` / `plot_pca`: a 2-D projection of chosen words' vectors.
- Contextual meaning: the hidden state of an ambiguous word's (last) token at every layer, in
  sentences tagged with its sense (`sense_examples` fills the world's own templates: bank of a
  river / a bank for money, はし as bridge / chopsticks / edge, ...). `contextual_similarity`
  compares mean cosine similarity within a sense against across senses, per layer. Sentences
  made from one template share most of their words, so "within sense" is also reported over
  pairs from *different* templates, which is the fairer number.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

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


# ---------------------------------------------------------------------------------------------
# The embedding table


def word_token_ids(tokenizer: Tokenizer, word: str) -> list[int]:
    """The tokens of `word` as it appears inside a sentence.

    Byte-level BPE vocabularies hold mid-sentence words with their leading space (" bank"),
    so a Latin-script word is tried both ways and the form with fewer tokens wins (the spaced
    one on a tie). Japanese has no spaces and is encoded as it is.
    """
    word = word.strip()
    if not word:
        raise UserError("The word is empty; give a word to look up.")
    plain = tokenizer.encode(word)
    if not word[0].isascii():
        return plain
    spaced = tokenizer.encode(" " + word)
    return spaced if len(spaced) <= len(plain) else plain


def _special_ids(tokenizer: Tokenizer) -> set[int]:
    return {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}


@torch.no_grad()
def nearest_neighbours(model: Transformer, tokenizer: Tokenizer, word: str, k: int = 10, *,
                       exclude_self: bool = True) -> dict[str, Any]:
    """The `k` vocabulary entries whose input embeddings are closest (cosine) to `word`'s.

    Ties break by token id, so the list is deterministic. Special tokens are left out, and so
    are the word's own tokens unless `exclude_self=False` (then a one-token word is its own
    first neighbour, at cosine 1).
    """
    ids = word_token_ids(tokenizer, word)
    table = model.embed.weight.float()
    query = table[ids].mean(0)
    sims = F.cosine_similarity(table, query[None], dim=-1).cpu()
    drop = _special_ids(tokenizer) | (set(ids) if exclude_self else set())
    # A stable sort on -similarity keeps equal scores in id order (topk does not promise that).
    order = torch.sort(-sims, stable=True).indices.tolist()
    # Rows past the tokenizer's vocabulary (padding some models carry) have no text.
    picked = [i for i in order if i not in drop and i < tokenizer.vocab_size][:k]
    labels = token_labels(tokenizer, picked)
    return {
        "word": word,
        "tokens": token_labels(tokenizer, ids),
        "token_ids": ids,
        "averaged": len(ids) > 1,
        "neighbours": [{"token": t, "id": i, "cosine": float(sims[i])}
                       for t, i in zip(labels, picked)],
    }


def word_vectors(model: Transformer, tokenizer: Tokenizer, words: list[str]) -> torch.Tensor:
    """(len(words), d_model): each word's input embedding (the mean of its tokens' rows)."""
    table = model.embed.weight.detach().float()
    return torch.stack([table[word_token_ids(tokenizer, w)].mean(0) for w in words])


def pca_2d(vectors: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Project rows onto their first two principal components: (n, 2) coordinates and the
    fraction of variance each component explains. Signs are fixed (largest loading positive)
    so the same vectors always give the same picture."""
    if vectors.shape[0] < 2:
        raise UserError("A PCA plot needs at least two words.")
    x = vectors.double() - vectors.double().mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[:2]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * signs
    coords = x @ comps.T
    if coords.shape[1] < 2:  # two words span one direction: the second axis is all zeros
        coords = torch.cat([coords, torch.zeros_like(coords)], dim=1)
    var = (s**2) / (s**2).sum().clamp_min(1e-30)
    explained = [float(v) for v in var[:2]] + [0.0] * (2 - min(2, len(var)))
    return coords.float(), explained


def plot_pca(words: list[str], coords: torch.Tensor, explained: list[float],
             path: str | Path, title: str = "input embeddings (PCA)") -> Path:
    from matplotlib.figure import Figure

    with plot_style():
        fig = Figure(figsize=(6.5, 5.5))
        ax = fig.subplots()
        ax.scatter(coords[:, 0], coords[:, 1], s=18)
        for w, (x, y) in zip(words, coords.tolist()):
            ax.annotate(w, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=9)
        ax.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({explained[1]:.0%} of variance)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Contextual meaning


@dataclass
class SenseExample:
    text: str
    word: str
    sense: str
    template: str = ""  # sentences from one template share their context words


def ambiguous_word_lang(word: str, lang: str | None = None) -> str:
    """The language whose ambiguous words include `word`; UserError when none does."""
    from kotonoha.data.world import AMBIGUOUS

    langs = [lang] if lang else [lg for lg in AMBIGUOUS if word in AMBIGUOUS[lg]]
    if not langs or word not in AMBIGUOUS.get(langs[0], {}):
        known = ", ".join(w for lg in AMBIGUOUS for w in AMBIGUOUS[lg])
        raise UserError(f"'{word}' is not one of the world's ambiguous words ({known}); give "
                        "your own sentences with --sentence SENSE=TEXT.")
    return langs[0]


def sense_examples(word: str, *, lang: str | None = None, per_template: int = 3, seed: int = 0,
                   world: str | Path | None = None) -> list[SenseExample]:
    """Sentences using `word` in each of its senses, from the world's own ambiguous-word
    templates, filled with the world's names (from `world/world.json` when given, else the
    world of `seed`). Up to `per_template` distinct sentences per template."""
    from kotonoha.data.world import AMBIGUOUS, POOL_F, POOL_M

    lg = ambiguous_word_lang(word, lang)
    li = 0 if lg == "en" else 1
    countries = _world_countries(world, seed)
    rng = random.Random(f"kotonoha-explain/{seed}/{word}")
    out: list[SenseExample] = []
    for sense, templates in AMBIGUOUS[lg][word].items():
        for t_i, template in enumerate(templates):
            seen: set[str] = set()
            for _ in range(per_template * 4):  # templates without slots give one sentence
                c = rng.choice(countries)
                slots = {"A": rng.choice(POOL_F + POOL_M)[li], "R": c["river"][lg],
                         "cap": c["capital"][lg]}
                text = template.format_map(slots)
                if text not in seen:
                    seen.add(text)
                    out.append(SenseExample(text, word, sense, f"{sense}/{t_i}"))
                if len(seen) >= per_template:
                    break
    return out


def _world_countries(world: str | Path | None, seed: int) -> list[dict[str, Any]]:
    if world is not None:
        import json

        path = Path(world) / "world.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist; pass the folder `kotonoha data world` wrote.")
        return json.loads(path.read_text(encoding="utf-8"))["countries"]
    from kotonoha.data.world import generate_world

    return generate_world(seed, scale=0.02).to_json()["countries"]  # entities only: cheap


def word_states(model: Transformer, tokenizer: Tokenizer, example: SenseExample,
                add_bos: bool = True) -> tuple[torch.Tensor, str]:
    """The residual stream of the word's last token at every layer, (L + 1, d), and that
    token's text. The last token is the one that has read the whole word."""
    span = find_word(example.text, example.word)
    if span is None:
        raise UserError(f"'{example.word}' does not occur in the sentence {example.text!r}.")
    _, offsets = token_offsets(tokenizer, example.text)
    ids = encode(tokenizer, example.text, add_bos)
    shift = len(ids) - len(offsets)  # 1 with a BOS token, else 0
    pos = span_positions(offsets, span, shift)[-1]
    stream, _ = residual_stream(model, ids)
    return stream[:, pos], token_labels(tokenizer, [ids[pos]])[0]


def similarity_by_layer(states: torch.Tensor, senses: list[str],
                        templates: list[str] | None = None) -> list[dict[str, Any]]:
    """Per layer: mean cosine over pairs of the same sense, of the same sense but different
    templates, and of different senses. `states` is (n_examples, layers, d)."""
    n = states.shape[0]
    templates = templates or [str(i) for i in range(n)]
    x = F.normalize(states.double(), dim=-1)
    cos = torch.einsum("ild,jld->lij", x, x)  # (layers, n, n)
    i, j = torch.triu_indices(n, n, offset=1)
    same = torch.tensor([senses[a] == senses[b] for a, b in zip(i.tolist(), j.tolist())])
    same_t = torch.tensor([templates[a] == templates[b] for a, b in zip(i.tolist(), j.tolist())])
    groups = {"within": same, "within_other_template": same & ~same_t, "across": ~same}
    rows = []
    for layer in range(cos.shape[0]):
        pairs = cos[layer][i, j]
        row: dict[str, Any] = {"layer": layer}
        for name, mask in groups.items():  # None (not NaN, which JSON lacks) when no pairs
            row[name] = float(pairs[mask].mean()) if mask.any() else None
        both = row["within_other_template"] is not None and row["across"] is not None
        row["gap"] = row["within_other_template"] - row["across"] if both else None
        rows.append(row)
    return rows


def contextual_similarity(model: Transformer, tokenizer: Tokenizer,
                          examples: list[SenseExample], add_bos: bool = True) -> dict[str, Any]:
    """Hidden states of each example's word at every layer, compared within and across senses.

    Returns {"word", "senses", "examples": [{text, sense, token}], "layers": [per-layer row]}.
    """
    if len({e.sense for e in examples}) < 2:
        raise UserError("Contextual similarity needs sentences of at least two senses.")
    states, tokens = [], []
    for e in examples:
        s, t = word_states(model, tokenizer, e, add_bos)
        states.append(s)
        tokens.append(t)
    rows = similarity_by_layer(torch.stack(states), [e.sense for e in examples],
                               [e.template for e in examples])
    return {
        "word": examples[0].word,
        "senses": sorted({e.sense for e in examples}),
        "examples": [{**asdict(e), "token": t} for e, t in zip(examples, tokens)],
        "layers": rows,
    }


def plot_contextual(results: list[dict[str, Any]], path: str | Path) -> Path:
    from matplotlib.figure import Figure

    with plot_style():
        fig = Figure(figsize=(5.0 * len(results), 4.0))
        axes = fig.subplots(1, len(results), squeeze=False)[0]
        for ax, res in zip(axes, results):
            layers = [r["layer"] for r in res["layers"]]
            for key, style, label in (("within", "-", "same sense"),
                                      ("within_other_template", "--",
                                       "same sense, other template"),
                                      ("across", ":", "different sense")):
                ys = [float("nan") if r[key] is None else r[key] for r in res["layers"]]
                ax.plot(layers, ys, style, marker="o",
                        markersize=3, label=label)
            ax.set_title(f"'{res['word']}': {' / '.join(res['senses'])}")
            ax.set_xlabel("layer (0 = embeddings)")
            ax.set_xticks(layers)
            ax.set_ylabel("mean cosine similarity")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path)


def contextual_markdown(res: dict[str, Any]) -> str:
    rows = [(r["layer"], r["within"], r["within_other_template"], r["across"], r["gap"])
            for r in res["layers"]]
    gaps = [r for r in res["layers"] if r["gap"] is not None]
    n = len(res["examples"])
    table = md_table(["layer", "same sense", "same sense, other template", "different sense",
                      "gap"], rows)
    if not gaps:
        verdict = "Too few sentences per sense to compare templates."
    else:
        best = max(gaps, key=lambda r: r["gap"])
        verdict = (f"The gap (same sense from other templates minus different senses) is "
                   f"largest at layer {best['layer']}: {best['gap']:+.3f}."
                   if best["gap"] > 0 else
                   "At no layer are same-sense sentences from other templates closer than "
                   f"different-sense ones (largest gap {best['gap']:+.3f}).")
    return (f"### '{res['word']}' ({', '.join(res['senses'])}; {n} sentences)\n\n"
            f"{table}\n{verdict}\n")


# ---------------------------------------------------------------------------------------------
# The command


def check_embeddings_options(*, k: int, per_template: int,
                             ambiguous: list[str] | None) -> None:
    """-k, --per-template and --ambiguous, checked before the model runs."""
    check_at_least_one(k, "-k")
    check_at_least_one(per_template, "--per-template")
    for w in ambiguous or []:
        ambiguous_word_lang(w)


def embeddings_report(model: Transformer, tokenizer: Tokenizer, out: str | Path, *,
                      words: list[str], k: int = 10, ambiguous: list[str] | None = None,
                      sentences: list[SenseExample] | None = None, world: str | Path | None = None,
                      seed: int = 0, per_template: int = 3, add_bos: bool = True,
                      model_name: str = "model") -> dict[str, Any]:
    """Everything `kotonoha explain embeddings` writes into `out`: neighbours.md/json,
    pca.png, contextual.png and embeddings.md/json.

    Everything is computed (and so every input checked) before the first file is written: an
    unknown --ambiguous word leaves no half-written folder."""
    out = check_out_dir(out)
    check_embeddings_options(k=k, per_template=per_template, ambiguous=ambiguous)
    md = [f"# Embeddings of {model_name}\n"]
    data: dict[str, Any] = {"model": model_name}

    pca: tuple[torch.Tensor, list[float]] | None = None
    if words:
        neighbours = [nearest_neighbours(model, tokenizer, w, k) for w in words]
        data["neighbours"] = neighbours
        md.append("## Nearest neighbours in the input embedding table (cosine)\n")
        for nb in neighbours:
            toks = " ".join(quote(t) for t in nb["tokens"])
            how = (f"the mean of its {len(nb['tokens'])} tokens {toks}" if nb["averaged"]
                   else f"token {toks}")
            md.append(f"**{nb['word']}** ({how}): "
                      + ", ".join(f"{quote(n['token'])} {n['cosine']:.3f}" for n in nb["neighbours"])
                      + "\n")
        if len(words) >= 2:
            pca = coords, explained = pca_2d(word_vectors(model, tokenizer, words))
            data["pca"] = {"words": words, "coords": coords.tolist(), "explained": explained}
            md.append(f"\n![PCA of the words](pca.png)\n\nPC1 and PC2 explain "
                      f"{explained[0]:.0%} and {explained[1]:.0%} of these words' variance.\n")

    results = []
    for w in ambiguous or []:
        results.append(contextual_similarity(
            model, tokenizer, sense_examples(w, world=world, seed=seed,
                                             per_template=per_template), add_bos))
    if sentences:
        results.append(contextual_similarity(model, tokenizer, sentences, add_bos))
    if results:
        data["contextual"] = results
        md.append("\n## Contextual meaning: the word's hidden state at every layer\n")
        md.append("Cosine similarity of the ambiguous word's last token between sentences, "
                  "per layer (layer 0 is the embedding, identical for every occurrence).\n\n"
                  "![contextual similarity](contextual.png)\n")
        md += [contextual_markdown(r) for r in results]

    if pca is not None:
        plot_pca(words, *pca, out / "pca.png", f"{model_name}: input embeddings")
    if results:
        plot_contextual(results, out / "contextual.png")
    write_summary(out, "embeddings", "\n".join(md), data)
    return data
