"""Arguments and entry points of `kotonoha explain {embeddings,attention,lens}` and
`kotonoha experiment scaling`.

`add_explain_commands(sub)` / `add_experiment_commands(sub)` add the verbs to the main parser
(each subcommand sets `func`); the `add_*_arguments` and `*_main` functions are the same
pieces one by one. Importing this module imports neither torch nor matplotlib.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kotonoha.errors import UserError

# Words for the PCA plot when none are given: everyday words the world's text uses (jobs,
# prices, months, rivers and banks), in English and Japanese, so any model has them.
DEFAULT_WORDS = ["river", "water", "bank", "money", "bread", "tea", "doctor", "teacher",
                 "farmer", "January", "March", "Monday", "川", "お金"]
DEFAULT_AMBIGUOUS = ["bank", "はし"]


def _common_arguments(p: argparse.ArgumentParser, tool: str, world: bool = True) -> None:
    p.add_argument("--model", required=True,
                   help="run directory, Hugging Face directory, .gguf file or packaged name "
                        "(e.g. smollm2)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (if not the model's)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: where it loads)")
    p.add_argument("--out", default=f"runs/explain/{tool}",
                   help=f"output directory for figures and the summary (default runs/explain/"
                        f"{tool})")
    p.add_argument("--no-bos", action="store_true",
                   help="do not start the text with the begin-of-text token")
    if world:
        p.add_argument("--world", default=None,
                       help="world folder (`kotonoha data world`): use its names in the examples")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated examples")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from kotonoha.explain.common import load_for_explain

    return load_for_explain(args.model, tokenizer=args.tokenizer, device=args.device)


def _name(args: argparse.Namespace) -> str:
    return Path(str(args.model)).name or str(args.model)


def _done(out: str | Path, summary: str) -> None:
    print(f"wrote {Path(out) / summary} and its figures in {out}")


# ---------------------------------------------------------------------------------------------
# embeddings


def add_embeddings_arguments(p: argparse.ArgumentParser) -> None:
    _common_arguments(p, "embeddings")
    p.add_argument("--word", action="append", default=[],
                   help="word for nearest neighbours and the PCA plot (repeatable; default: "
                        "a bilingual everyday list)")
    p.add_argument("-k", type=int, default=10, help="neighbours per word")
    p.add_argument("--ambiguous", action="append", default=[],
                   help="one of the world's ambiguous words (bank, bat, spring, bark, match, "
                        "はし, かみ, あめ, くも) to follow through the layers (repeatable; "
                        "default: bank and はし)")
    p.add_argument("--sentence", action="append", default=[], metavar="SENSE=TEXT",
                   help="your own sentence using --sense-word in a given sense (repeatable)")
    p.add_argument("--sense-word", default=None, help="the ambiguous word of --sentence")
    p.add_argument("--per-template", type=int, default=3,
                   help="sentences per world template for --ambiguous")


def _user_sentences(args: argparse.Namespace) -> list[Any]:
    from kotonoha.explain.embeddings import SenseExample

    if not args.sentence:
        return []
    if not args.sense_word:
        raise UserError("--sentence needs --sense-word WORD: the ambiguous word to follow.")
    out = []
    for i, item in enumerate(args.sentence):
        sense, sep, text = item.partition("=")
        if not sep or not sense.strip() or not text.strip():
            raise UserError(f"--sentence '{item}' must look like SENSE=TEXT, e.g. "
                            "'river=We sat on the bank of the river.'")
        out.append(SenseExample(text.strip(), args.sense_word, sense.strip(), f"user/{i}"))
    return out


def embeddings_main(args: argparse.Namespace) -> None:
    from kotonoha.explain.common import check_out_dir
    from kotonoha.explain.embeddings import check_embeddings_options, embeddings_report

    sentences = _user_sentences(args)
    words = args.word or DEFAULT_WORDS
    ambiguous = args.ambiguous or ([] if sentences else DEFAULT_AMBIGUOUS)
    check_out_dir(args.out)  # before the model loads, not after all the work
    check_embeddings_options(k=args.k, per_template=args.per_template, ambiguous=ambiguous)
    model, tok = _load(args)
    embeddings_report(model, tok, args.out, words=words, k=args.k, ambiguous=ambiguous,
                      sentences=sentences, world=args.world, seed=args.seed,
                      per_template=args.per_template, add_bos=not args.no_bos,
                      model_name=_name(args))
    _done(args.out, "embeddings.md")


# ---------------------------------------------------------------------------------------------
# attention


def add_attention_arguments(p: argparse.ArgumentParser) -> None:
    _common_arguments(p, "attention", world=False)  # the stories use everyday names
    p.add_argument("--prompt", default=None,
                   help="text whose attention maps to draw (default: a pronoun story)")
    p.add_argument("--layers", default=None, help="layers to draw, e.g. 0,3 (default: all)")
    p.add_argument("--target", default="-1",
                   help="query token for the head finder: a position or a word of the prompt")
    p.add_argument("--source", default=None,
                   help="what the target should attend to: a position or a word of the prompt")
    p.add_argument("--pronouns", nargs="*", default=["en"], metavar="LANG",
                   help="pronoun-story study in these languages (en, ja; none to skip)")
    p.add_argument("--stories", type=int, default=40, help="pronoun stories per language")
    p.add_argument("--query", default="pronoun", choices=["pronoun", "before"],
                   help="attention from the pronoun itself or from the token before it")
    p.add_argument("--top", type=int, default=10, help="heads to list")


def attention_main(args: argparse.Namespace) -> None:
    from kotonoha.explain.attention import (
        attention_report,
        check_attention_options,
        pronoun_stories,
    )
    from kotonoha.explain.common import check_out_dir

    check_out_dir(args.out)  # before the model loads, not after all the work
    check_attention_options(stories=args.stories, top=args.top, pronoun_langs=args.pronouns)

    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--layers '{args.layers}' must be layer numbers like 0,3.") from None
    prompt, target, source = args.prompt, args.target, args.source
    if prompt is None:  # show the head finder on a story: from the pronoun to its referent
        story = pronoun_stories((args.pronouns or ["en"])[0], 1, args.seed)[0]
        prompt, target, source = story.text, story.pronoun, story.referent
    model, tok = _load(args)
    attention_report(model, tok, args.out, prompt=prompt, layers=layers, target=target,
                     source=source, pronoun_langs=args.pronouns, stories=args.stories,
                     query=args.query, seed=args.seed, add_bos=not args.no_bos, top=args.top,
                     model_name=_name(args))
    _done(args.out, "attention.md")


# ---------------------------------------------------------------------------------------------
# lens


def add_lens_arguments(p: argparse.ArgumentParser) -> None:
    _common_arguments(p, "lens")
    p.add_argument("--prompt", default=None,
                   help="text whose next token to follow (default: an analogy prompt)")
    p.add_argument("--answer", default=None, help="the answer whose probability to follow")
    p.add_argument("--lang", default="en", choices=["en", "ja"],
                   help="language of the default analogy prompt")
    p.add_argument("-k", type=int, default=5, help="top tokens per layer")


def lens_main(args: argparse.Namespace) -> None:
    from kotonoha.explain.common import check_out_dir
    from kotonoha.explain.lens import check_lens_options, lens_report

    check_out_dir(args.out)  # before the model loads, not after all the work
    check_lens_options(args.k, args.answer)
    model, tok = _load(args)
    lens_report(model, tok, args.out, prompt=args.prompt, answer=args.answer, world=args.world,
                lang=args.lang, seed=args.seed, k=args.k, add_bos=not args.no_bos,
                model_name=_name(args))
    _done(args.out, "lens.md")


# ---------------------------------------------------------------------------------------------
# experiment scaling


def add_scaling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file, e.g. configs/scaling.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="settings, e.g. out=runs/sweep tokens=4000000 train.device=cuda")


def scaling_main(args: argparse.Namespace) -> None:
    from kotonoha.explain import scaling

    scaling.scaling_main(args.config, args.overrides)


# ---------------------------------------------------------------------------------------------
# wiring


def add_explain_commands(sub: Any) -> argparse.ArgumentParser:
    """`explain {embeddings,attention,lens}` under the main parser's subparsers `sub`."""
    p = sub.add_parser("explain", help="look inside a model: embeddings, attention, logit lens")
    tools = p.add_subparsers(dest="tool", metavar="TOOL", required=True)
    for name, helptext, add, main in (
        ("embeddings", "nearest neighbours, PCA, and an ambiguous word through the layers",
         add_embeddings_arguments, embeddings_main),
        ("attention", "attention maps per head, and the heads that resolve pronouns",
         add_attention_arguments, attention_main),
        ("lens", "the logit lens: the next token after every layer",
         add_lens_arguments, lens_main),
    ):
        t = tools.add_parser(name, help=helptext)
        add(t)
        t.set_defaults(func=main)
    return p


def add_experiment_commands(sub: Any) -> argparse.ArgumentParser:
    """`experiment scaling` under the main parser's subparsers `sub`."""
    p = sub.add_parser("experiment", help="experiments that train many models (scaling sweep)")
    exps = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    s = exps.add_parser("scaling", help="train a sweep of sizes; loss and task accuracy vs size")
    add_scaling_arguments(s)
    s.set_defaults(func=scaling_main)
    return p


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m kotonoha.explain.cli explain lens --model ...`)."""
    parser = argparse.ArgumentParser(prog="kotonoha")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    add_explain_commands(sub)
    add_experiment_commands(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"kotonoha: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
