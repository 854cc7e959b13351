"""`kotonoha chat` on a model whose context is no longer than the default answer, `/params`
values of the wrong type, and input that is not UTF-8 (the chat reports it and goes on)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from kotonoha.chat import ChatSession
from kotonoha.checkpoint import load_model, save_model
from kotonoha.cli import main
from kotonoha.engine import Engine
from kotonoha.model import Transformer, preset
from kotonoha.sampling import SamplingParams
from kotonoha.tokenizer import sample_text_paths, train_bpe_from_files

CONTEXT = 256  # the demo model's context, and the default --max-tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = train_bpe_from_files(sample_text_paths(), 400)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, context_length=CONTEXT))
    d = tmp_path_factory.mktemp("chat_model")
    save_model(d, model, tok)
    return d


def chat(argv: list[str], stdin: str, monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(["chat", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def session(model_dir: Path) -> ChatSession:
    model, tok = load_model(model_dir)
    return ChatSession(Engine(model, tok, max_batch_size=1), tok,
                       SamplingParams(temperature=0, max_tokens=4))


def test_default_max_tokens_fits_a_context_of_the_same_size(model_dir, monkeypatch, capsys):
    code, out, err = chat(["--model", str(model_dir), "--temperature", "0"],
                          "What is the capital of Velbifia?\nAnd then?\n/params\n",
                          monkeypatch, capsys)
    assert code == 0 and err == ""
    assert "error:" not in out
    assert f"max_tokens = {CONTEXT // 2}" in out  # half the context: room for the conversation


def test_max_tokens_that_leaves_no_room_is_refused(model_dir, monkeypatch, capsys):
    code, _, err = chat(["--model", str(model_dir), "--max-tokens", str(CONTEXT)], "hi\n",
                        monkeypatch, capsys)
    assert code == 2 and f"max_tokens={CONTEXT}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    # The same at /params: reported, and the session keeps its setting and goes on.
    code, out, _ = chat(["--model", str(model_dir), "--max-tokens", "4", "--temperature", "0"],
                        f"/params max_tokens={CONTEXT}\nhello\n/params\n", monkeypatch, capsys)
    assert code == 0 and f"error: max_tokens={CONTEXT} leaves no room" in out
    assert "max_tokens = 4" in out and "> hello" in out


@pytest.mark.parametrize("item,match", [
    ("temperature=abc", "temperature must be a number"),
    ("top_k=abc", "top_k must be a whole number"),
    ("max_tokens=1.5", "max_tokens must be a whole number"),
    ("seed=abc", "seed must be a whole number"),
    ("seed=99999999999999999999", "seed must be a whole number from"),
    ("logit_bias=5", "TOKEN_ID=BIAS"),
    ("logit_bias=99999=1", "outside the vocabulary"),
    ("lstrip=false", "set by the chat itself"),
    ("ignore_eos=true", "set by the chat itself"),
    ("stop_token_ids=[1]", "set by the chat itself"),
    ("bogus=1", "Unknown sampling setting 'bogus'"),
    ("temperature", "key=value"),
])
def test_bad_params_are_reported_and_the_session_goes_on(session, item, match):
    before = session.params
    out = io.StringIO()
    session.repl(io.StringIO(f"/params {item}\nhello\n"), out)
    text = out.getvalue()
    assert "error: " in text and match in text
    assert "> hello" in text  # the next message is still answered
    assert session.params == before


@pytest.mark.parametrize("item,field,value", [
    ("temperature=0.5", "temperature", 0.5),
    ("top_k=3", "top_k", 3),
    ("seed=7", "seed", 7),
    ("seed=none", "seed", None),
    ("stop=ab", "stop", ["ab"]),  # one stop string, not the characters 'a' and 'b'
    ("stop=[a,b]", "stop", ["a", "b"]),
    ('stop="\\n"', "stop", ["\n"]),  # YAML quotes read escapes
    ("stop=", "stop", []),
    ("logit_bias=5=-1,6=2", "logit_bias", {5: -1.0, 6: 2.0}),
    ("max_tokens=2", "max_tokens", 2),
])
def test_params_take_values_of_each_field_type(session, item, field, value):
    session.command(f"/params {item}", io.StringIO())
    assert getattr(session.params, field) == value
    assert type(getattr(session.params, field)) is type(value)


def test_line_that_is_not_utf8_is_reported(session):
    out = io.StringIO()
    # Python reads the byte 0xE9 of a Latin-1 "café" as the lone surrogate U+DCE9.
    session.repl(io.StringIO("caf\udce9\n/system caf\udce9\nhello\n"), out)
    text = out.getvalue()
    assert text.count("error: This line is not valid UTF-8 text") == 2
    assert "> hello" in text and len(session.history) == 2 and session.system is None


@pytest.mark.parametrize("verb,flag", [("generate", "--prompt"), ("chat", "--system")])
def test_argument_that_is_not_utf8_is_one_sentence(model_dir, verb, flag, monkeypatch, capsys):
    argv = ["--model", str(model_dir), flag, "caf\udce9"]
    if verb == "generate":
        code, err = main([verb, *argv]), capsys.readouterr().err
    else:
        code, _, err = chat(argv, "hi\n", monkeypatch, capsys)
    assert code == 2 and f"{flag} is not valid UTF-8 text" in err and "Traceback" not in err
