"""The `kotonoha` command: one verb per stage.

Every verb turns bad input into one sentence on stderr and exit code 2 (`UserError`); only a
bug in kotonoha itself shows a traceback.
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
from pathlib import Path
from typing import Any

from kotonoha.errors import UserError


def _sampling_args(p: argparse.ArgumentParser, chat: bool = False) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * max prob")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--logit-bias", action="append", default=[], metavar="TOKEN_ID=BIAS")
    g.add_argument("--seed", type=int, default=None)
    if chat:  # None: ChatSession's 256, at most half the context (room for the conversation)
        g.add_argument("--max-tokens", type=int, default=None,
                       help="most tokens per answer (default: 256, at most half the context)")
    else:
        g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="run directory, Hugging Face directory, .gguf file or preset name")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (needed when --model is a preset name)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantization for CPU decoding (int4: groups of 32, as Q4_1)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context to allocate (default: the model's, at most 4096)")


def _sampling_params(args: argparse.Namespace) -> Any:
    from kotonoha.sampling import SamplingParams

    bias: dict[int, float] = {}
    for item in args.logit_bias:
        tok, sep, val = item.partition("=")
        try:
            if not sep:
                raise ValueError(item)
            bias[int(tok)] = float(val)
        except ValueError:
            raise UserError(
                f"--logit-bias '{item}' must look like TOKEN_ID=BIAS, e.g. 42=-100."
            ) from None
    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, logit_bias=bias, seed=args.seed,
        max_tokens=args.max_tokens, stop=list(args.stop),
    )
    params.validate()
    return params


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """A model and its tokenizer from --model (path or preset) and optional --tokenizer."""
    from kotonoha.checkpoint import load_for_inference

    return load_for_inference(args.model, tokenizer=args.tokenizer, device=args.device,
                              dtype=args.dtype, quantize=args.quantize)


def _engine(model: Any, tokenizer: Any, args: argparse.Namespace) -> Any:
    from kotonoha.engine import DEFAULT_MAX_SEQ_LEN, Engine

    seq = args.max_seq_len
    if seq is None:
        seq = min(model.cfg.context_length, DEFAULT_MAX_SEQ_LEN)
    elif seq < 1:  # the Engine would take 0 for "the model's context"
        raise UserError(f"--max-seq-len must be in 1..{model.cfg.context_length} (the model's "
                        f"context), got {seq}.")
    return Engine(model, tokenizer, max_batch_size=1, max_seq_len=seq, compile=args.compile)


# ---------------------------------------------------------------------------------- verbs


def cmd_model_info(args: argparse.Namespace) -> None:
    from kotonoha.checkpoint import CONFIG_FILE, load_model
    from kotonoha.info import describe, model_config_from_spec
    from kotonoha.model import PRESETS
    from kotonoha.models import resolve

    # A preset name stays a preset (no install needed); anything else resolves as the other
    # verbs' --model does: packaged names, .gguf files, run and LoRA directories.
    path = None if args.model in PRESETS else Path(resolve(args.model)).expanduser()
    if (path is None or not path.exists()
            or any((path / f).is_file() for f in (CONFIG_FILE, "config.json"))):
        cfg = model_config_from_spec(str(path or args.model))  # reads only the JSON
    elif path.is_file() and path.suffix.lower() == ".gguf":
        from kotonoha.convert.gguf import GGUFFile, config_from_gguf

        cfg = config_from_gguf(GGUFFile(path))  # the header is enough: no weights are read
    else:  # e.g. a run with its model in model/, a LoRA run; or load_model's one sentence
        cfg = load_model(path)[0].cfg
    print(describe(cfg, context=args.context))


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from kotonoha.data.sources import iter_documents, resolve
    from kotonoha.tokenizer import train_bpe

    if args.vocab_size < 300:
        raise UserError("--vocab-size must be at least 300 (256 byte tokens plus merges).")
    resolve(args.data)  # a missing or unreadable source fails here, before training starts
    tok = train_bpe(iter_documents(args.data, args.text_field), args.vocab_size,
                    show_progress=True)
    tok.save(args.out)
    print(f"tokenizer with {tok.vocab_size} tokens written to {args.out}")


def cmd_generate(args: argparse.Namespace) -> None:
    from kotonoha.chat import require_utf8

    require_utf8(args.prompt, "--prompt")
    params = _sampling_params(args)
    model, tokenizer = _load(args)
    engine = _engine(model, tokenizer, args)
    ids = tokenizer.encode_prompt(args.prompt)
    events = engine.stream(ids, params)
    # The first event submits the request: a prompt too long for the context or a bad setting
    # fails there, before the prompt is echoed.
    first = list(itertools.islice(events, 1))
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    reason = None
    for event in itertools.chain(first, events):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        reason = event.finish_reason or reason
    sys.stdout.write("\n")
    if args.verbose:
        print(f"[finish_reason={reason}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from kotonoha.chat import ChatSession, require_utf8

    if args.system is not None:
        require_utf8(args.system, "--system")
    params = _sampling_params(args)
    model, tokenizer = _load(args)
    if tokenizer.chat_template is None:
        raise UserError(
            f"{args.model} has no chat template (it is a base model); fine-tune it into a chat "
            "model with `kotonoha sft`, or use `kotonoha generate` for plain completion."
        )
    session = ChatSession(_engine(model, tokenizer, args), tokenizer, params, system=args.system)
    if isinstance(sys.stdin, io.TextIOWrapper):
        # Bytes that are not UTF-8 reach the session as surrogates, which it reports per line;
        # strict decoding would end the whole chat with a UnicodeDecodeError.
        sys.stdin.reconfigure(errors="surrogateescape")
    session.repl(sys.stdin, sys.stdout)


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from kotonoha.checkpoint import check_output, load_model, save_model

    check_output(args.out, args.to)  # before the (maybe slow) load
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.base and not args.merge_lora:
        raise UserError("--base only applies with --merge-lora (the base of a LoRA run).")
    if args.merge_lora:
        from kotonoha.train.lora import ADAPTER_CONFIG, load_adapter_model

        if not (Path(args.src) / ADAPTER_CONFIG).is_file():
            raise UserError(f"--merge-lora needs a LoRA run directory; {args.src} has no "
                            f"{ADAPTER_CONFIG}.")
        model, tokenizer = load_adapter_model(args.src, args.base, device="cpu", dtype=dtype)
    else:
        model, tokenizer = load_model(args.src, device="cpu", dtype=dtype)
    if args.to == "kotonoha":
        save_model(args.out, model, tokenizer)
    elif args.to == "hf":
        from kotonoha.convert.hf import save_hf

        save_hf(args.out, model, tokenizer)
    elif args.to == "gguf":
        from kotonoha.convert.gguf import save_gguf

        save_gguf(args.out, model, tokenizer, dtype=args.gguf_type)
    else:  # pragma: no cover - argparse restricts the choices
        raise UserError(f"Unknown target format '{args.to}'.")
    print(f"wrote {args.to} model to {args.out}")


def cmd_data_world(args: argparse.Namespace) -> None:
    from kotonoha.data.world import write_world

    if args.scale <= 0:
        raise UserError("--scale must be a positive number (1.0 is about 4 MB of text).")
    from kotonoha.data.world import PRACTICE_SHARE

    share = PRACTICE_SHARE if args.practice_share is None else args.practice_share
    stats = write_world(args.out, seed=args.seed, scale=args.scale, practice_share=share,
                        sft_false_premises=args.sft_false_premises, show_progress=True)
    for name, st in stats.items():
        print(f"{name:<20} {st['lines']:>9,} lines {st['bytes'] / 1e6:>9.2f} MB")
    print(f"world (seed {args.seed}, scale {args.scale}) written to {args.out}")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from kotonoha.data.shards import prepare

    meta = prepare(args.source, args.tokenizer, args.out, text_field=args.text_field,
                   val_fraction=args.val_fraction, workers=args.workers)
    splits = ", ".join(f"{k}: {v['tokens']:,} tokens" for k, v in meta["splits"].items())
    print(f"shards in {args.out} ({splits})")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from kotonoha.train.pretrain import pretrain_main

    run_dir = pretrain_main(args.config, args.overrides, args.resume)
    print(f"pretraining run written to {run_dir}")


def cmd_stage(args: argparse.Namespace) -> None:
    """sft / reward / dpo / rl / pipeline: a YAML config, overrides, optional --resume."""
    import importlib

    module, func = STAGES[args.verb]
    # --model and --lora are spellings of the init_from= (rl: model=) and lora= overrides.
    start = "model" if args.verb == "rl" else "init_from"
    flags = [f"{key}={value}" for key, value in ((start, getattr(args, "model", None)),
                                                 ("lora", getattr(args, "lora", None))) if value]
    result = getattr(importlib.import_module(module), func)(args.config,
                                                            [*flags, *args.overrides],
                                                            args.resume)
    if isinstance(result, str | Path):  # the pipeline prints its own summary
        print(f"{args.verb} run written to {result}")


STAGES = {
    "sft": ("kotonoha.train.sft", "sft_main"),
    "reward": ("kotonoha.train.reward", "reward_main"),
    "dpo": ("kotonoha.train.dpo", "dpo_main"),
    "rl": ("kotonoha.train.rl", "rl_main"),
    "pipeline": ("kotonoha.pipeline", "pipeline_main"),
}


def cmd_eval(args: argparse.Namespace) -> None:
    from kotonoha.eval.world import eval_main

    eval_main(args.model, suite=args.suite, world_dir=args.world, data_dir=args.data,
              out=args.out, split=args.split, max_items=args.max_items, device=args.device)


def cmd_baselines(args: argparse.Namespace) -> None:
    from kotonoha.baselines.compare import baselines_main

    baselines_main(args.data, transformer=args.transformer, out=args.out,
                   lstm_steps=args.lstm_steps, max_train_tokens=args.max_train_tokens)


def cmd_feedback_export(args: argparse.Namespace) -> None:
    from kotonoha.feedback import feedback_export_main

    feedback_export_main(args.db, args.out)


# ---------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kotonoha", description="Raw text in, an aligned chat assistant out."
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser("model-info", help="parameters, FLOPs and memory of a preset or model")
    p.add_argument("model", help="preset name, run directory or Hugging Face directory")
    p.add_argument("--context", type=int, default=None, help="context length for KV-cache size")
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train on text files, folders or JSONL")
    t.add_argument("--data", "--source", dest="data", nargs="+", required=True,
                   help=".txt files/folders, .jsonl, .parquet, a saved HF dataset, or shakespeare"
                        " (--source, as `data prepare` spells it, works too)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--text-field", default="text", help="JSONL/Parquet column with the text")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("generate", help="complete a prompt, streaming to the terminal")
    _model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--verbose", action="store_true", help="print the finish reason")
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat in the terminal")
    _model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    _sampling_args(p, chat=True)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="convert between kotonoha, Hugging Face and GGUF")
    p.add_argument("--from", dest="src", required=True, help="model to read")
    p.add_argument("--to", required=True, choices=["kotonoha", "hf", "gguf"])
    p.add_argument("--out", required=True, help="a directory, or a .gguf file with --to gguf")
    p.add_argument("--gguf-type", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="matrix type of a GGUF export (norms stay f32)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--merge-lora", action="store_true",
                   help="--from is a LoRA run: merge its adapter onto its base (or --base)")
    p.add_argument("--base", default=None,
                   help="with --merge-lora: the base model, if not the one adapter.json names")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("data", help="the built-in world, and token shards from any text")
    dsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    d = dsub.add_parser("world", help="generate the built-in bilingual world")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--scale", type=float, default=1.0, help="1.0 ~ 4 MB, 60 ~ 200 MB")
    d.add_argument("--practice-share", type=float, default=None,
                   help="share of countries and families kept for practice.jsonl only "
                        "(default: the world's PRACTICE_SHARE)")
    d.add_argument("--sft-false-premises", type=int, default=1,
                   help="false-premise conversations in sft.jsonl per scheduled one, each a "
                        "new fact and premise (make demo uses 5)")
    d.set_defaults(func=cmd_data_world)
    d = dsub.add_parser("prepare", help="tokenize text into memory-mapped shards")
    d.add_argument("--source", nargs="+", required=True,
                   help=".txt files/folders, .jsonl, .parquet, a saved HF dataset, or shakespeare")
    d.add_argument("--tokenizer", required=True, help="tokenizer directory")
    d.add_argument("--out", required=True)
    d.add_argument("--text-field", default="text", help="JSONL/Parquet column with the text")
    d.add_argument("--val-fraction", type=float, default=0.05)
    d.add_argument("--workers", type=int, default=None)
    d.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("pretrain", help="next-token pretraining (also under torchrun)")
    p.add_argument("--config", default=None, help="YAML file, e.g. configs/demo.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_pretrain)

    for verb, text in (("sft", "supervised fine-tuning on conversations (optionally LoRA)"),
                       ("reward", "a reward model on preference pairs (Bradley-Terry)"),
                       ("dpo", "direct preference optimisation against a frozen reference"),
                       ("rl", "PPO-clip with group-relative advantages and a KL leash"),
                       ("pipeline", "world -> tokenizer -> pretrain -> SFT -> reward -> RL/DPO")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("--config", default=None, help="YAML file")
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        if verb != "pipeline":
            p.add_argument("--model", default=None, help="model to start from (init_from=, "
                           "rl: model=): a run directory, HF directory, .gguf file or packaged "
                           "name (smollm2)")
            p.add_argument("--lora", default=None, metavar="r=16,alpha=32",
                           help="train LoRA adapters instead of all weights (lora=)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
        p.set_defaults(func=cmd_stage)

    p = sub.add_parser("eval", help="bits per byte and held-out facts on the world")
    p.add_argument("--model", required=True)
    p.add_argument("--suite", default="world")
    p.add_argument("--world", default=None,
                   help="world directory (default: the one beside --data or the model)")
    p.add_argument("--data", default=None, help="shard directory for bits per byte")
    p.add_argument("--split", default=None, choices=["heldout", "seen"],
                   help="default: held-out items (the chat suite: its default mix)")
    p.add_argument("--max-items", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write eval.json and eval.md here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("baselines", help="n-gram and LSTM baselines beside a transformer")
    p.add_argument("--data", required=True, help="shard directory")
    p.add_argument("--transformer", default=None, help="a trained model to compare")
    p.add_argument("--out", default=None)
    p.add_argument("--lstm-steps", type=int, default=None)
    p.add_argument("--max-train-tokens", type=int, default=None)
    p.set_defaults(func=cmd_baselines)

    from kotonoha.explain.cli import add_experiment_commands, add_explain_commands

    add_explain_commands(sub)  # explain {embeddings,attention,lens}
    add_experiment_commands(sub)  # experiment scaling

    from kotonoha.serve.cli import DEFAULT_DB, add_serve_arguments, run_serve

    p = sub.add_parser("serve", help="OpenAI-compatible API and web UI on 127.0.0.1")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)

    p = sub.add_parser("feedback", help="preference pairs from chat feedback and arena votes")
    fsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    f = fsub.add_parser("export", help="write preference pairs as JSONL for `kotonoha reward`")
    f.add_argument("--db", default=DEFAULT_DB)
    f.add_argument("--out", required=True)
    f.set_defaults(func=cmd_feedback_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"kotonoha: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
