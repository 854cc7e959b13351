"""Bytes per token of kotonoha's BPE vs a GPT-2-regex BPE, on English and Japanese.

Both tokenizers are trained the same way on the first 80% of each bundled sample text and
measured on the held-out last 20%, so the numbers show how well merges generalise rather
than how well they memorise. More bytes per token = shorter sequences for the model.

    .venv/bin/python bench/tokenizer.py [--vocab-size 8192] [--min-frequency 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import tokenizers

from kotonoha.tokenizer import SPLIT_PATTERN, Tokenizer, sample_text_paths, train_bpe

EXAMPLE = "友人からの手紙は、いつも小さな出来事を書いてきます。"


def split_held_out(text: str, frac: float = 0.8) -> tuple[str, str]:
    """Cut at the first line break after `frac` of the text, so no word is split in two."""
    cut = text.find("\n", int(len(text) * frac))
    cut = len(text) if cut < 0 else cut + 1
    return text[:cut], text[cut:]


def bytes_per_token(tok: Tokenizer, text: str) -> float:
    return len(text.encode("utf-8")) / len(tok.encode(text))


def chars_per_token(tok: Tokenizer, text: str) -> float:
    return len(text) / len(tok.encode(text))


def segment(tok: Tokenizer, text: str) -> str:
    """Token boundaries in `text`; tokens holding part of one character's bytes are merged
    (decoding them one by one would print U+FFFD)."""
    spans = dict.fromkeys(tok.backend.encode(text, add_special_tokens=False).offsets)
    return "|".join(text[a:b] for a, b in spans)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--min-frequency", type=int, default=2)
    args = ap.parse_args()

    en, ja = (p.read_text(encoding="utf-8") for p in sample_text_paths())
    (en_train, en_test), (ja_train, ja_test) = split_held_out(en), split_held_out(ja)
    print(
        f"machine: {platform.machine()} {platform.system()}, python {platform.python_version()}, "
        f"tokenizers {tokenizers.__version__}"
    )
    print(
        f"train: en {len(en_train.encode())} B + ja {len(ja_train.encode())} B; "
        f"held out: en {len(en_test.encode())} B, ja {len(ja_test.encode())} B; "
        f"vocab_size={args.vocab_size}, min_frequency={args.min_frequency}\n"
    )
    rows = []
    segmentations = []
    for name, pattern in (("kotonoha (script-split regex)", SPLIT_PATTERN),
                          ("GPT-2 regex", None)):
        t0 = time.perf_counter()
        tok = train_bpe([en_train, ja_train], args.vocab_size,
                        min_frequency=args.min_frequency, split_pattern=pattern)
        secs = time.perf_counter() - t0
        rows.append(
            f"| {name} | {tok.vocab_size} | {bytes_per_token(tok, en_test):.2f} "
            f"| {bytes_per_token(tok, ja_test):.2f} | {chars_per_token(tok, ja_test):.2f} "
            f"| {bytes_per_token(tok, en_train):.2f} | {bytes_per_token(tok, ja_train):.2f} "
            f"| {secs:.2f} |"
        )
        segmentations.append(f"- {name}: `{segment(tok, EXAMPLE)}`")

    print("| tokenizer | vocab (learned) | en B/tok held-out | ja B/tok held-out "
          "| ja chars/tok held-out | en B/tok train | ja B/tok train | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"\nsegmentation of an example sentence ({EXAMPLE}):")
    print("\n".join(segmentations))


if __name__ == "__main__":
    main()
