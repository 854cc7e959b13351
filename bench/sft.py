"""The SFT step with the output head on every position vs on the loss's tokens only.

`sft_loss` asks the model for the logits of the masked (assistant-reply and replayed-document)
tokens only (`Transformer.forward(select=...)`); before, the output head and the softmax ran
on every position and the mask zeroed most of them afterwards. This bench times both on the
same batches of the `make demo` SFT data (the built-in world: its conversations plus 1.5 x as
many replayed pretraining documents, padding-free rows), alternating step by step, on the
demo model with random weights (the FLOPs do not depend on the weights).

    .venv/bin/python bench/sft.py [--steps 60] [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kotonoha.data.chat import SFTData, ensure_chat_template, load_conversations
from kotonoha.data.sources import iter_documents
from kotonoha.data.world import write_world
from kotonoha.model import Transformer, preset
from kotonoha.tokenizer import train_bpe_from_files
from kotonoha.train.loop import keep_freed_memory
from kotonoha.train.sft import sft_loss


def every_position_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What `sft_loss` computed before `select`: logits everywhere, then the mask."""
    logits = model(batch["x"], positions=batch["positions"], segments=batch["segments"])
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten(), reduction="none")
    return (ce * batch["mask"].flatten()).sum() * batch["scale"]


def demo_sft_data(root: Path) -> tuple[SFTData, int]:
    """All the world's SFT conversations (no validation split or kind weights: this is about
    speed) and the replay documents; and the tokenizer's vocabulary size."""
    write_world(root, seed=0, scale=1.0, show_progress=False)
    tok = train_bpe_from_files([root / "pretrain.jsonl"], 4096, min_frequency=2,
                               show_progress=False)
    ensure_chat_template(tok, None, "the world's tokenizer")
    convs = load_conversations(str(root / "sft.jsonl"))
    docs = list(iter_documents(str(root / "pretrain.jsonl")))
    replay = random.Random(0).sample(docs, min(len(docs), round(1.5 * len(convs))))
    return SFTData(tok, convs, 256, seed=0, replay=replay), tok.vocab_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="timed steps of each kind")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        data, vocab_size = demo_sft_data(Path(tmp))
    tok_count = sum(len(ids) for ids, _ in data.examples)
    reply_count = sum(sum(mask) for _, mask in data.examples)
    torch.manual_seed(0)
    model = Transformer(preset("demo", vocab_size=vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    losses = {"every position": every_position_loss,
              "loss tokens only": lambda m, b: sft_loss(m, b)[0]}
    times: dict[str, list[float]] = {name: [] for name in losses}
    for step in range(args.steps + 3):  # 3 warm-up steps of each, untimed
        batch = data.batch(step, args.batch_size, range(args.batch_size))
        for name, loss_fn in losses.items():
            start = time.perf_counter()
            loss_fn(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 3:
                times[name].append(time.perf_counter() - start)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {len(data)} examples, {tok_count} tokens, "
          f"{reply_count / tok_count:.0%} of them in the loss; batch {args.batch_size}, "
          f"{args.steps} steps each, alternating")
    base = statistics.median(times["every position"])
    print("| output head on | ms/step (median) | speed-up |\n|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1000:.0f} | "
              f"{base / statistics.median(ts):.2f}x |")


if __name__ == "__main__":
    main()
