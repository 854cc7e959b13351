"""`make demo`: the main job on the built-in default, as far as the project goes today.

Tokenizer on the bundled bilingual sample texts, model-info, then generation through the
engine from the `demo` preset (random weights: pretraining comes next).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from kotonoha.checkpoint import save_model
from kotonoha.engine import Engine
from kotonoha.info import describe
from kotonoha.model import Transformer, preset
from kotonoha.sampling import SamplingParams
from kotonoha.tokenizer import Tokenizer, sample_text_paths, train_bpe_from_files


def banner(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 70 - len(text)))


def main(out: str = "runs/demo") -> int:
    out_dir = Path(out)
    tok_dir = out_dir / "tokenizer"
    banner("1. tokenizer: byte-level BPE on the bundled English + Japanese samples")
    if (tok_dir / "tokenizer.json").is_file():
        tok = Tokenizer.load(tok_dir)
        print(f"reusing {tok_dir}")
    else:
        tok = train_bpe_from_files(sample_text_paths(), 2048)
        tok.save(tok_dir)
    for text in ("The river runs past the old bank.", "川のはしを渡って、箸でご飯を食べた。"):
        pieces = [tok.decode([i]) for i in tok.encode(text)]
        n_bytes = len(text.encode("utf-8"))
        print(f"{text!r}: {len(pieces)} tokens, {n_bytes / len(pieces):.2f} bytes/token")
        print("   " + " | ".join(pieces))

    banner("2. model-info")
    cfg = preset("demo", vocab_size=tok.vocab_size)
    print(describe(cfg))
    print()
    print(describe(preset("gpt3")))

    banner("3. generation through the engine (random weights, so the text is noise)")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    save_model(out_dir / "random-init", model, tok)
    engine = Engine(model, tok, max_batch_size=2)
    prompts = ["Once upon a time", "昔々"]
    params = SamplingParams(temperature=0.8, top_k=50, seed=1, max_tokens=24)
    for prompt, c in zip(prompts, engine.generate([tok.encode(p) for p in prompts], params)):
        print(f"{prompt!r} -> {c.text!r} ({c.completion_tokens} tokens, {c.finish_reason})")
    print(f"\nwritten under {out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
