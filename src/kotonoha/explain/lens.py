"""The logit lens: what the model would say if it stopped after each layer.

The final norm and output head (`model.logits_from_hidden`) are applied to the residual stream
of the prompt's last token at every layer, so each layer gets a next-token distribution; at
the last layer it is exactly the model's own. For a chosen answer we follow its probability
and rank through the layers. An answer of several tokens is followed by its first token (the
one that has to be predicted here); the result says which token that is.

The default prompt is an analogy: the capital of one country is given, the capital of
another is asked ("The capital of Tasibia is Ifek. The capital of Egumia is" -> " Serun" on
the world of seed 0, "... France is Paris. The capital of Japan is" -> " Tokyo" otherwise).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kotonoha.errors import UserError
from kotonoha.explain.common import (
    check_at_least_one,
    check_out_dir,
    encode,
    md_table,
    plot_style,
    quote,
    residual_stream,
    save_figure,
    token_labels,
    write_summary,
)

if TYPE_CHECKING:
    from kotonoha.model import Transformer
    from kotonoha.tokenizer import Tokenizer

GENERIC_ANALOGY = ("The capital of France is Paris. The capital of Japan is", "Tokyo")


def continuation_ids(tokenizer: Tokenizer, prompt: str, answer: str) -> list[int]:
    """The tokens `answer` becomes when it follows `prompt`. A Latin-script answer after a
    prompt that does not end in whitespace gets the space that separates words."""
    if answer and answer[0].isascii() and answer[0].isalnum() and prompt[-1:] not in (" ", "\n"):
        answer = " " + answer
    head = tokenizer.encode(prompt)
    both = tokenizer.encode(prompt + answer)
    if both[:len(head)] == head and len(both) > len(head):
        return both[len(head):]
    return tokenizer.encode(answer)  # the answer merged with the prompt's last token


def check_lens_options(k: int, answer: str | None) -> None:
    """-k and --answer, checked before the model runs."""
    check_at_least_one(k, "-k")
    if answer == "":  # "" would follow no token, yet the report would look for its column
        raise UserError("--answer is empty; give the answer whose probability to follow, or "
                        "leave --answer out.")


@torch.no_grad()
def logit_lens(model: Transformer, tokenizer: Tokenizer, prompt: str, answer: str | None = None,
               *, k: int = 5, add_bos: bool = True) -> dict[str, Any]:
    """Per layer (0 = embeddings): the top-k next tokens with probabilities and, with an
    answer, its first token's probability and rank (1 = the most likely). A `k` above the
    vocabulary lists the whole vocabulary."""
    check_lens_options(k, answer)
    ids = encode(tokenizer, prompt, add_bos)
    stream, out = residual_stream(model, ids)
    logits = model.logits_from_hidden(stream[:, -1]).float()  # (layers, vocab)
    probs = logits.softmax(-1)
    k = min(k, probs.shape[-1])
    target = continuation_ids(tokenizer, prompt, answer)[0] if answer else None
    layers = []
    for layer, p in enumerate(probs):
        top = torch.topk(p, k)
        row: dict[str, Any] = {
            "layer": layer,
            "top": [{"token": t, "id": int(i), "prob": float(v)}
                    for t, i, v in zip(token_labels(tokenizer, top.indices.tolist()),
                                       top.indices, top.values)],
        }
        if target is not None:
            row["answer_prob"] = float(p[target])
            row["answer_rank"] = int((p > p[target]).sum()) + 1
        layers.append(row)
    return {
        "prompt": prompt,
        "answer": answer,
        "answer_token": token_labels(tokenizer, [target])[0] if target is not None else None,
        "tokens": token_labels(tokenizer, ids),
        "layers": layers,
        # The model's own output, for comparison with the last layer of the lens.
        "output_top": int(out.logits[0, -1].argmax()),
    }


def analogy_prompt(world: str | Path | None = None, lang: str = "en",
                   seed: int = 0) -> tuple[str, str]:
    """(prompt, answer): one country's capital given, another's asked, from the world's
    facts (its `world.json` when given, else the world of `seed`)."""
    if world is not None:
        path = Path(world) / "world.json"
        if not path.is_file():
            raise UserError(f"{path} does not exist; pass the folder `kotonoha data world` wrote.")
        countries = json.loads(path.read_text(encoding="utf-8"))["countries"]
    else:
        from kotonoha.data.world import generate_world

        countries = generate_world(seed, scale=0.02).to_json()["countries"]
    seen = [c for c in countries if c.get("split") == "seen"] or countries
    a, b = random.Random(f"kotonoha-explain/analogy/{seed}").sample(seen, 2)
    if lang == "ja":
        return (f"{a['name']['ja']}の首都は{a['capital']['ja']}です。{b['name']['ja']}の首都は",
                b["capital"]["ja"])
    return (f"The capital of {a['name']['en']} is {a['capital']['en']}. "
            f"The capital of {b['name']['en']} is", b["capital"]["en"])


def plot_lens(result: dict[str, Any], path: str | Path, title: str) -> Path:
    from matplotlib.figure import Figure

    layers = [r["layer"] for r in result["layers"]]
    top1 = [r["top"][0] for r in result["layers"]]
    with plot_style():
        fig = Figure(figsize=(7.5, 4.2))
        ax = fig.subplots()
        ax.plot(layers, [t["prob"] for t in top1], "o-", color="gray", label="top-1 token")
        for x, t in zip(layers, top1):
            ax.annotate(quote(t["token"]), (x, t["prob"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
        if result["answer"] is not None:
            ax.plot(layers, [r["answer_prob"] for r in result["layers"]], "s-",
                    label=f"answer {quote(result['answer_token'])}")
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel("probability of the next token")
        ax.set_xticks(layers)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path)


def lens_markdown(result: dict[str, Any]) -> str:
    has_answer = result["answer"] is not None
    headers = ["layer", "top tokens (probability)"]
    if has_answer:
        headers += [f"p({quote(result['answer_token'])})", "rank"]
    rows = []
    for r in result["layers"]:
        row: list[Any] = [r["layer"], ", ".join(f"{quote(t['token'])} {t['prob']:.3f}"
                                                 for t in r["top"])]
        if has_answer:
            row += [f"{r['answer_prob']:.4f}", r["answer_rank"]]
        rows.append(row)
    text = f"Prompt: {result['prompt']!r}"
    if has_answer:
        text += f"; answer {result['answer']!r} (first token {quote(result['answer_token'])})"
        first = next((r["layer"] for r in result["layers"] if r["answer_rank"] == 1), None)
        text += (f". The answer is the top token from layer {first} on." if first is not None
                 else ". The answer is never the top token.")
    return text + "\n\n" + md_table(headers, rows)


def lens_report(model: Transformer, tokenizer: Tokenizer, out: str | Path, *,
                prompt: str | None = None, answer: str | None = None,
                world: str | Path | None = None, lang: str = "en", seed: int = 0, k: int = 5,
                add_bos: bool = True, model_name: str = "model") -> dict[str, Any]:
    """`kotonoha explain lens`: lens.png and lens.md/json in `out`. Without a prompt, the
    analogy prompt (the world's when `world` is given or `lang` is Japanese)."""
    out = check_out_dir(out)
    check_lens_options(k, answer)
    if prompt is None:
        prompt, default_answer = (GENERIC_ANALOGY if world is None and lang == "en"
                                  else analogy_prompt(world, lang, seed))
        answer = answer if answer is not None else default_answer
    if not prompt:
        raise UserError("The prompt is empty; give the text whose next token to look at.")
    result = logit_lens(model, tokenizer, prompt, answer, k=k, add_bos=add_bos)
    result["model"] = model_name
    plot_lens(result, out / "lens.png", f"{model_name}: logit lens")
    md = f"# Logit lens on {model_name}\n\n![lens](lens.png)\n\n{lens_markdown(result)}"
    write_summary(out, "lens", md, result)
    return result
