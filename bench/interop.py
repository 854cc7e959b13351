"""Does llama.cpp run what kotonoha exports? GGUF export checked with llama-cpp-python.

    python bench/interop.py                                   # SmolLM2 round trip
    python bench/interop.py --model runs/demo --model smollm2 --types f32 f16 q8_0

For each model and GGUF storage type: `kotonoha.convert.gguf.save_gguf` writes the file, then
llama.cpp (through llama-cpp-python) loads it and is compared with kotonoha's own fp32 model:

- tokens: the same ids for English and Japanese text (control tokens included);
- logits: the largest difference over every position of a prompt, relative to the largest
  logit, and how often the two agree on the top token;
- greedy: how many of 32 greedily generated tokens are identical from the start;
- llama.cpp's decode speed on the file (2 threads), and the file's size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TEXTS = ["The river bank was green, and the bank in town was closed on Sunday.",
         "東京は日本の首都です。川の土手で猫が寝ています。",
         "<|im_start|>user\nHello<|im_end|>\n"]
PROMPT = "Once upon a time, in a small village by the sea,"


def compare(model_spec: str, gguf_type: str, out_dir: Path, threads: int) -> dict:
    import llama_cpp

    from kotonoha.checkpoint import load_model
    from kotonoha.convert.gguf import save_gguf
    from kotonoha.engine import Engine
    from kotonoha.sampling import SamplingParams

    model, tok = load_model(model_spec, dtype=torch.float32)
    assert tok is not None
    path = save_gguf(out_dir / f"{Path(model_spec).name}-{gguf_type}.gguf", model, tok,
                     dtype=gguf_type)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    same_tokens = sum(llm.tokenize(t.encode(), add_bos=False, special=True)
                      == tok.encode_special(t) for t in TEXTS)

    ids = tok.encode_prompt(PROMPT)
    llm.reset()
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[:len(ids)]))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].float()
    rel = ((theirs - ours).abs().max() / ours.abs().max()).item()
    top1 = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()

    n = 32
    engine = Engine(model, tok, max_batch_size=1, max_seq_len=len(ids) + n)
    mine = engine.generate([ids], SamplingParams(temperature=0, max_tokens=n,
                                                 ignore_eos=True))[0].token_ids
    llm.reset()
    llm.eval(ids)
    got: list[int] = []
    t = time.perf_counter()
    for _ in range(n):
        nxt = llm.sample(top_k=1, temp=0.0)
        got.append(nxt)
        llm.eval([nxt])
    decode = n / (time.perf_counter() - t)
    agree = next((i for i, (a, b) in enumerate(zip(mine, got)) if a != b), n)
    return {"model": model_spec, "type": gguf_type, "mib": path.stat().st_size / 2**20,
            "tokens": f"{same_tokens}/{len(TEXTS)}", "rel": rel, "top1": top1,
            "greedy": f"{agree}/{n}", "decode": decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=None,
                    help="a kotonoha run, HF dir, .gguf or packaged name (repeatable; "
                         "default smollm2)")
    ap.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"],
                    choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("bench/interop.py needs llama-cpp-python: pip install "
                         "llama-cpp-python") from None
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.model or ["smollm2"]:
            for gguf_type in args.types:
                rows.append(compare(spec, gguf_type, Path(tmp), args.threads))
                print(f"{spec} {gguf_type}: done", flush=True)
    print(f"\nllama-cpp-python {llama_cpp.__version__}; prompt {PROMPT!r}\n")
    print("| model | GGUF type | MiB | same tokens | max logit diff (relative) | same top-1 "
          "| same greedy tokens | llama.cpp decode tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['type']} | {r['mib']:.0f} | {r['tokens']} | {r['rel']:.1e} "
              f"| {r['top1']:.0%} | {r['greedy']} | {r['decode']:.1f} |")


if __name__ == "__main__":
    main()
