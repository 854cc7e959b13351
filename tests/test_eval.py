"""Evaluation: bits per byte against a hand computation, and the cloze suite's scoring."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from kotonoha.checkpoint import save_model
from kotonoha.data.shards import prepare, read_meta
from kotonoha.errors import UserError
from kotonoha.eval.bpb import bits_per_byte
from kotonoha.eval.world import (
    GenerateFn,
    TaskSpec,
    as_running_text,
    check_tokenizer_matches,
    eval_main,
    evaluate_world,
    find_world,
    format_markdown,
    load_items,
)
from kotonoha.model import Transformer, preset
from kotonoha.tokenizer import Tokenizer, sample_text_paths, train_bpe

CONTEXT = 32

FACTS = [  # (lang, country, capital)
    ("en", "Velmora", "Sarn"), ("en", "Ostrany", "Kelbin"), ("en", "Durnia", "Palo"),
    ("ja", "ヴェルモラ", "サルン"), ("ja", "オストラニ", "ケルビン"), ("ja", "ドゥルニア", "パロ"),
]


def cloze_prompt(lang: str, country: str) -> str:
    return f"The capital of {country} is" if lang == "en" else f"{country}の首都は"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [p.read_text(encoding="utf-8") for p in sample_text_paths()]
    return train_bpe(texts, vocab_size=400)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    root = tmp_path_factory.mktemp("shards")
    tokenizer.save(root / "tok")
    docs = [p for path in sample_text_paths()
            for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    prepare([str(src)], root / "tok", root / "data", val_fraction=0.2, show_progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def model(tokenizer: Tokenizer) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=tokenizer.vocab_size,
                              context_length=CONTEXT)).eval()


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("world")
    items = []
    for i, (lang, country, capital) in enumerate(FACTS):
        for split in ("heldout", "seen"):
            items.append({"id": f"cloze-{split}-{i}", "task": "cloze", "split": split,
                          "lang": lang, "prompt": cloze_prompt(lang, country),
                          "answer": capital})
    items.append({"id": "qa-0", "task": "qa", "split": "heldout", "lang": "en",
                  "messages": [{"role": "user", "content": "Capital of Velmora?"}],
                  "answer": "Sarn"})
    (d / "eval.jsonl").write_text("".join(json.dumps(it, ensure_ascii=False) + "\n"
                                          for it in items), encoding="utf-8")
    return d


# --- bits per byte ---------------------------------------------------------------------------


def test_bits_per_byte_matches_a_hand_computation(model: Transformer, data_dir: Path) -> None:
    res = bits_per_byte(model, data_dir, max_tokens=4 * CONTEXT, batch_size=3)
    meta = read_meta(data_dir)
    val = np.fromfile(data_dir / "val.bin", dtype=meta["dtype"]).astype(np.int64)
    nats, n = 0.0, 0
    with torch.no_grad():
        for w in range(4):  # the first four non-overlapping windows, one at a time
            chunk = torch.from_numpy(val[w * CONTEXT:(w + 1) * CONTEXT + 1])
            logp = torch.log_softmax(model(chunk[None, :-1])[0], -1)
            nats -= float(logp.gather(1, chunk[1:, None]).sum())
            n += CONTEXT
    bytes_per_token = meta["splits"]["val"]["bytes"] / meta["splits"]["val"]["tokens"]
    assert res["tokens"] == n
    assert res["bpb"] == pytest.approx(nats / math.log(2) / (n * bytes_per_token), rel=1e-5)
    assert res["loss"] == pytest.approx(nats / n, rel=1e-5)


class Uniform(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.vocab_size) + self.dummy


def test_uniform_model_costs_log2_vocab_bits_per_token(data_dir: Path) -> None:
    meta = read_meta(data_dir)
    V = meta["vocab_size"]
    res = bits_per_byte(Uniform(V), data_dir, context_length=CONTEXT)
    assert res["bpb"] == pytest.approx(math.log2(V) / res["bytes_per_token"], rel=1e-6)


# --- the world suite -------------------------------------------------------------------------


def oracle(tokenizer: Tokenizer, wrong: bool = False) -> Callable[[TaskSpec], GenerateFn]:
    """A fake `generate` factory: completes each prompt with the right (or a wrong) capital.

    It knows the prompts only as running text (English with a leading space), so it also
    checks that the cloze renderer wrote them so."""
    answers = {as_running_text(cloze_prompt(lang, c)): cap for lang, c, cap in FACTS}
    others = {cap: FACTS[(i + 1) % len(FACTS)][2] for i, (_, _, cap) in enumerate(FACTS)}

    def factory(spec: TaskSpec) -> GenerateFn:
        assert not spec.chat and spec.max_tokens > 0

        def generate(prompts: list[list[int]]) -> list[str]:
            out = []
            for ids in prompts:
                assert ids[0] == tokenizer.bos_id  # a prompt starts a fresh document
                cap = answers[tokenizer.decode(ids[1:])]
                cap = others[cap] if wrong else cap
                # The checker reads only the first sentence: the rest must not count.
                out.append(f" {cap}. The capital of Durnia is Palo.")
            return out

        return generate

    return factory


def test_cloze_prompts_are_rendered_as_running_text(tokenizer: Tokenizer) -> None:
    # Why: the space before a word merges into the word's token, so a word opening a text
    # is not the token(s) the same word gets mid-text.
    assert tokenizer.encode(" The") != tokenizer.encode(" ") + tokenizer.encode("The")
    assert as_running_text("The capital of Velmora is") == " The capital of Velmora is"
    assert as_running_text("Ebos Pezar was born in") == " Ebos Pezar was born in"
    assert as_running_text("ヴェルモラの首都は") == "ヴェルモラの首都は"  # no spaces in Japanese
    assert as_running_text(" already spaced") == " already spaced"
    assert as_running_text("") == ""


def test_cloze_scores_oracle_100_and_wrong_answers_0(tokenizer: Tokenizer,
                                                      world_dir: Path) -> None:
    good = evaluate_world(None, tokenizer, world_dir, generate=oracle(tokenizer))
    bad = evaluate_world(None, tokenizer, world_dir, generate=oracle(tokenizer, wrong=True))
    for lang in ("en", "ja", "all"):
        assert good["tasks"]["cloze"][lang]["accuracy"] == 1.0
        assert bad["tasks"]["cloze"][lang]["accuracy"] == 0.0
    assert good["tasks"]["cloze"]["en"]["total"] == 3  # held-out only; the qa item is not here
    assert {r["id"] for r in good["items"]} == {f"cloze-heldout-{i}" for i in range(6)}


def test_cloze_with_a_real_model_through_the_engine(model: Transformer, tokenizer: Tokenizer,
                                                    world_dir: Path, data_dir: Path) -> None:
    res = evaluate_world(model, tokenizer, world_dir, data_dir=data_dir, max_items=2,
                         batch_size=4)
    cloze = res["tasks"]["cloze"]
    assert set(cloze) == {"en", "ja", "all"}
    assert cloze["en"]["total"] == 2 and cloze["ja"]["total"] == 2  # capped per language
    assert all(0.0 <= cell["accuracy"] <= 1.0 for cell in cloze.values())
    assert res["bpb"]["bpb"] > 0
    table = format_markdown(res)
    assert "| cloze accuracy |" in table and "val bits/byte" in table
    assert table.splitlines()[0].count("|") == table.splitlines()[2].count("|")


def test_eval_main_writes_json_and_markdown(model: Transformer, tokenizer: Tokenizer,
                                            world_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    save_model(tmp_path / "m", model, tokenizer)
    summary = eval_main(tmp_path / "m", world_dir=world_dir, out=tmp_path / "out",
                        max_items=1)
    assert "cloze accuracy" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "eval.json").read_text(encoding="utf-8"))
    assert saved["tasks"] == summary["tasks"] and len(saved["items"]) == 2
    assert "| cloze accuracy |" in (tmp_path / "out" / "eval.md").read_text(encoding="utf-8")


def test_the_world_is_found_beside_the_model_or_the_shards(
        model: Transformer, tokenizer: Tokenizer, world_dir: Path, tmp_path: Path) -> None:
    # A pipeline run: runs/demo/{world,pretrain}; what the demo tells its user to run.
    run = tmp_path / "run"
    save_model(run / "pretrain", model, tokenizer)
    (run / "world").symlink_to(world_dir.resolve(), target_is_directory=True)
    assert find_world(run / "pretrain") == run / "world"
    assert eval_main(run / "pretrain", max_items=1)["tasks"]
    # `kotonoha data world --out data/world` beside `data/shards/world`.
    shards = tmp_path / "data" / "shards" / "world"
    shards.mkdir(parents=True)
    (tmp_path / "data" / "world").symlink_to(world_dir.resolve(), target_is_directory=True)
    assert find_world(tmp_path / "m", shards) == tmp_path / "data" / "world"
    save_model(tmp_path / "alone", model, tokenizer)
    assert find_world(tmp_path / "alone") is None
    with pytest.raises(UserError, match="pass --world DIR"):
        eval_main(tmp_path / "alone")


def test_clear_errors(tokenizer: Tokenizer, world_dir: Path, data_dir: Path,
                      tmp_path: Path) -> None:
    with pytest.raises(UserError, match="eval.jsonl does not exist"):
        load_items(tmp_path)
    with pytest.raises(UserError, match="different tokenizer"):
        check_tokenizer_matches(train_bpe(["just a few words here"] * 20, 300), data_dir)
    check_tokenizer_matches(tokenizer, data_dir)  # the shards' own tokenizer passes
    with pytest.raises(UserError, match="Unknown eval suite"):
        eval_main("unused", suite="nope", world_dir=world_dir)


@pytest.mark.parametrize("flags,split", [([], "default"), (["--split", "heldout"], "heldout"),
                                         (["--split", "seen"], "seen")])
def test_eval_cli_passes_the_chat_split_it_was_given(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flags: list[str], split: str) -> None:
    """An explicit --split heldout used to look like the default and become the chat suite's
    mix (arithmetic on the seen split)."""
    import kotonoha.eval.chat as chat
    from kotonoha.cli import main

    got = {}
    monkeypatch.setattr(chat, "chat_eval_main", lambda *a, **kw: got.update(kw) or {})
    assert main(["eval", "--model", str(tmp_path), "--suite", "chat", "--world",
                 str(tmp_path), *flags]) in (0, None)
    assert got["split"] == split


def test_eval_main_refuses_bad_settings_before_loading(
        model: Transformer, tokenizer: Tokenizer, world_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import kotonoha.checkpoint as checkpoint

    # A missing model is named as such (the loader's message), not as a missing world.
    with pytest.raises(UserError, match="Model path .*no-such-model does not exist"):
        eval_main(tmp_path / "no-such-model")
    with pytest.raises(UserError, match="Model path .*no-such-model does not exist"):
        eval_main(tmp_path / "no-such-model", suite="chat")
    save_model(tmp_path / "m", model, tokenizer)
    afile = tmp_path / "afile"
    afile.write_text("x")

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(checkpoint, "load_model", no_load)
    for suite in ("world", "chat"):
        for n in (0, -1):
            with pytest.raises(UserError, match=f"--max-items must be at least 1, not {n}"):
                eval_main(tmp_path / "m", suite=suite, world_dir=world_dir, max_items=n)
        with pytest.raises(UserError, match="--out .*afile is a file"):
            eval_main(tmp_path / "m", suite=suite, world_dir=world_dir, out=afile)
    assert afile.read_text() == "x"


def test_eval_progress_bar_changes_no_result(model: Transformer, tokenizer: Tokenizer,
                                             world_dir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    quiet = evaluate_world(model, tokenizer, world_dir, max_items=2)
    assert capsys.readouterr().err == ""  # the pipeline's eval stays quiet
    shown = evaluate_world(model, tokenizer, world_dir, max_items=2, progress=True)
    assert "item" in capsys.readouterr().err
    assert shown == quiet
