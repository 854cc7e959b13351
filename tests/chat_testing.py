"""Shared pieces of the post-training tests: a tiny world of capitals, a throw-away tokenizer,
a random tiny base model, and (built once per process) a tiny SFT model that knows the world."""

from __future__ import annotations

import atexit
import functools
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kotonoha.checkpoint import save_model
from kotonoha.model import Transformer, preset
from kotonoha.tokenizer import Tokenizer, train_bpe

PLACES = {"Aru": "Beno", "Cala": "Doma", "Eshu": "Fira", "Gol": "Hanu", "Ivo": "Jera",
          "Kem": "Lupa", "Mora": "Nesk", "Opi": "Quon"}
QUESTIONS = ["What is the capital of {c}?", "Which city is the capital of {c}?",
             "Tell me the capital of {c}."]

# Settings every tiny post-training run shares (on top of each stage's tiny YAML config).
FAST = ["train.progress=false", "train.plot=false", "train.device=cpu"]


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str, **kw: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text, **kw}


def answer(c: str) -> str:
    return f"The capital of {c} is {PLACES[c]}."


def conversations(seed: int = 0) -> list[dict[str, Any]]:
    """Every country x question phrasing, some with a system prompt."""
    rng = random.Random(seed)
    convs = []
    for c in PLACES:
        for q in QUESTIONS:
            msgs = [user(q.format(c=c)), assistant(answer(c))]
            if rng.random() < 0.3:
                msgs.insert(0, {"role": "system", "content": "Be brief."})
            convs.append({"messages": msgs})
    return convs


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def tokenizer() -> Tokenizer:
    docs = [f"{answer(c)} {q.format(c=c)} Hello, thanks! Go away." for c in PLACES
            for q in QUESTIONS] * 4
    return train_bpe(docs, vocab_size=300)


def make_base(directory: Path, seed: int = 0, context: int = 64) -> Path:
    """A random tiny model (with a ChatML tokenizer) saved as a model directory."""
    tok = tokenizer()
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, context_length=context))
    return save_model(directory, model, tok)


def greedy_replies(model_dir: Path, questions: list[str], max_tokens: int = 24) -> list[str]:
    """What the saved model answers, through the shared engine, as `kotonoha chat` would."""
    from kotonoha.checkpoint import load_model
    from kotonoha.engine import Engine
    from kotonoha.sampling import SamplingParams

    model, tok = load_model(model_dir)
    assert tok is not None and tok.chat_template is not None
    engine = Engine(model, tok, max_batch_size=len(questions))
    prompts = [tok.encode_chat([user(q)], add_generation_prompt=True)[0] for q in questions]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                   lstrip=True))
    return [o.text for o in outs]


HELD_OUT = ("Mora", "Opi")  # countries whose preference pairs are only ever tested on


def preference_rows(seed: int = 1) -> list[dict[str, Any]]:
    """Easy preferences: the right capital beats an invented one, and any answer beats a rude
    brush-off. Pairs about HELD_OUT countries are the "test" split."""
    rng = random.Random(seed)
    rows = []
    for c in PLACES:
        for q in QUESTIONS:
            for kind in ("wrong_fact", "rude"):
                fake = rng.choice(["Zorp", "Wexa", "Tulm", "Yelt", "Rask"])
                rejected = f"The capital of {c} is {fake}." if kind == "wrong_fact" else "Go away."
                rows.append({"prompt": [user(q.format(c=c))], "chosen": answer(c),
                             "rejected": rejected, "kind": kind,
                             "split": "test" if c in HELD_OUT else "train"})
    return rows


@functools.cache
def sft_model() -> Path:
    """A tiny chat model that has memorised `PLACES` (full SFT from a random base), built once
    per test process and shared by the SFT, reward, DPO and LoRA tests."""
    from kotonoha.train.sft import sft_main

    root = Path(tempfile.mkdtemp(prefix="kotonoha-sft-"))
    atexit.register(shutil.rmtree, root, True)
    data = write_jsonl(root / "sft.jsonl", conversations())
    return sft_main(CONFIGS / "sft-tiny.yaml", [
        f"data={data}", f"init_from={make_base(root / 'base')}", f"out={root / 'sft'}",
        "val_fraction=0", *FAST], False)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
