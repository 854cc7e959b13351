"""The `kotonoha` command end to end: outputs, and one-sentence errors with exit code 2."""

import io
import subprocess
import sys

import pytest
import torch

from kotonoha.chat import ChatSession
from kotonoha.checkpoint import save_model
from kotonoha.cli import main
from kotonoha.engine import Engine
from kotonoha.errors import UserError
from kotonoha.model import Transformer, preset
from kotonoha.sampling import SamplingParams
from kotonoha.tokenizer import sample_text_paths, train_bpe_from_files


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_bpe_from_files(sample_text_paths(), 600)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, context_length=96))
    d = tmp_path_factory.mktemp("model")
    save_model(d, model, tok)
    return d


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_model_info(capsys):
    code, out, _ = run(["model-info", "gpt3"], capsys)
    assert code == 0 and "174,604,259,328" in out and "KV cache" in out


def test_model_info_of_saved_model(model_dir, capsys):
    code, out, _ = run(["model-info", str(model_dir), "--context", "64"], capsys)
    assert code == 0 and "2 layers" in out


def test_generate_is_seeded(model_dir, capsys):
    argv = ["generate", "--model", str(model_dir), "--prompt", "The river", "--seed", "3",
            "--max-tokens", "12"]
    code, first, _ = run(argv, capsys)
    assert code == 0 and first.startswith("The river") and len(first) > len("The river\n")
    assert run(argv, capsys)[1] == first


def test_generate_greedy_matches_engine(model_dir, capsys):
    from kotonoha.checkpoint import load_model

    model, tok = load_model(model_dir)
    ref = Engine(model, tok).generate([tok.encode("Hello")],
                                      SamplingParams(temperature=0, max_tokens=10))[0].text
    code, out, _ = run(["generate", "--model", str(model_dir), "--prompt", "Hello",
                        "--temperature", "0", "--max-tokens", "10"], capsys)
    assert code == 0 and out == "Hello" + ref + "\n"


def test_tokenizer_train(tmp_path, capsys):
    code, out, _ = run(["tokenizer", "train", "--data", *map(str, sample_text_paths()),
                        "--vocab-size", "500", "--out", str(tmp_path / "tok")], capsys)
    assert code == 0 and (tmp_path / "tok" / "tokenizer.json").is_file()
    # `--source`, as `data prepare` spells it, is the same option.
    code, _, _ = run(["tokenizer", "train", "--source", *map(str, sample_text_paths()),
                      "--vocab-size", "500", "--out", str(tmp_path / "tok2")], capsys)
    assert code == 0
    assert ((tmp_path / "tok2" / "tokenizer.json").read_text()
            == (tmp_path / "tok" / "tokenizer.json").read_text())


def test_convert_round_trip(model_dir, tmp_path, capsys):
    assert run(["convert", "--from", str(model_dir), "--to", "hf",
                "--out", str(tmp_path / "hf")], capsys)[0] == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert run(["convert", "--from", str(tmp_path / "hf"), "--to", "kotonoha",
                "--out", str(tmp_path / "back")], capsys)[0] == 0
    assert (tmp_path / "back" / "model.json").is_file()
    assert run(["convert", "--from", str(model_dir), "--to", "gguf", "--gguf-type", "f32",
                "--out", str(tmp_path / "m.gguf")], capsys)[0] == 0
    from kotonoha.checkpoint import load_model

    a, _ = load_model(model_dir)
    b, _ = load_model(tmp_path / "m.gguf")
    ids = torch.arange(10)[None]
    assert (a(ids) - b(ids)).abs().max() < 1e-4


@pytest.mark.parametrize("argv,match", [
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "/no/such/dir"),
    (["generate", "--model", "gpt9", "--prompt", "x"], "gpt9"),
    (["generate", "--model", "tiny", "--prompt", "x"], "--tokenizer"),
    (["model-info", "gpt9"], "neither a model directory nor a preset"),
    (["model-info", "tiny", "--context", "0"], "--context"),
    (["tokenizer", "train", "--data", "/no/file.txt", "--out", "x"], "/no/file.txt"),
])
def test_bad_input_is_one_sentence(argv, match, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name,text,match", [
    ("model.json", '{"format": "kotonoha", "version": 1}', "not a kotonoha model description"),
    ("model.json", '{"format": "kotonoha", "version": 1, "config": {"n_layer": "two"}}',
     "invalid model config"),
    ("model.json", "[1, 2", "not valid JSON"),
    ("config.json", "[1, 2]", "not a model config"),
    ("config.json", '{"model_type": "llama"}', "lacks the field"),
])
def test_model_info_of_a_broken_description_is_one_sentence(tmp_path, name, text, match, capsys):
    (tmp_path / name).write_text(text, encoding="utf-8")
    code, _, err = run(["model-info", str(tmp_path)], capsys)
    assert code == 2 and match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag,value,match", [
    ("--temperature", "-1", "temperature"),
    ("--top-p", "0", "top_p"),
    ("--min-p", "2", "min_p"),
    ("--top-k", "-3", "top_k"),
    ("--logit-bias", "abc", "TOKEN_ID=BIAS"),
])
def test_sampling_out_of_range(model_dir, flag, value, match, capsys):
    code, _, err = run(["generate", "--model", str(model_dir), "--prompt", "x", flag, value],
                       capsys)
    assert code == 2 and match in err and "Traceback" not in err


def test_prompt_longer_than_context(model_dir, capsys):
    code, _, err = run(["generate", "--model", str(model_dir), "--prompt", "word " * 200],
                       capsys)
    assert code == 2 and "context" in err and "Traceback" not in err


def test_max_seq_len_bounds_the_context(model_dir, capsys):
    argv = ["generate", "--model", str(model_dir), "--prompt", "word " * 20]
    assert run(argv + ["--max-seq-len", "64"], capsys)[0] == 0
    code, _, err = run(argv + ["--max-seq-len", "16"], capsys)  # the prompt no longer fits
    assert code == 2 and "16" in err and "Traceback" not in err
    code, _, err = run(argv + ["--max-seq-len", "200"], capsys)  # beyond the model's 96
    assert code == 2 and "max_seq_len must be in 1..96" in err


@pytest.mark.parametrize(("verb", "key"), [("sft", "init_from"), ("reward", "init_from"),
                                         ("dpo", "init_from"), ("rl", "model")])
def test_stage_model_and_lora_flags(verb, key, monkeypatch):
    """--model and --lora are the init_from= (rl: model=) and lora= overrides, placed before
    the explicit key=value ones so that those still win."""
    import kotonoha.cli as cli

    seen = {}

    def fake_stage(config, overrides, resume):
        seen.update(config=config, overrides=overrides, resume=resume)

    module = type(sys)("fake_stage_module")
    module.main = fake_stage
    monkeypatch.setitem(sys.modules, "fake_stage_module", module)
    monkeypatch.setitem(cli.STAGES, verb, ("fake_stage_module", "main"))
    assert main([verb, "--model", "smollm2", "--lora", "r=8,alpha=16", "out=x"]) == 0
    assert seen["overrides"] == [f"{key}=smollm2", "lora=r=8,alpha=16", "out=x"]


def test_corrupt_model_json(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.json").write_text("{not json")
    code, _, err = run(["generate", "--model", str(bad), "--prompt", "x"], capsys)
    assert code == 2 and "model.json" in err and "Traceback" not in err


def test_chat_session_commands_and_history(model_dir):
    from kotonoha.checkpoint import load_model

    model, tok = load_model(model_dir)
    engine = Engine(model, tok, max_batch_size=1)
    params = SamplingParams(temperature=0, max_tokens=8)
    session = ChatSession(engine, tok, params, system="Be brief.")
    inp = io.StringIO("hello\n/params max_tokens=4\nand then?\n/system Be kind.\n/reset\n"
                      "/params top_p=7\nbye\n/quit\nnever read\n")
    out = io.StringIO()
    session.repl(inp, out)
    text = out.getvalue()
    assert "max_tokens = 4" in text and "system prompt set" in text
    assert "error:" in text and "top_p" in text  # a bad command is reported, not fatal
    assert session.system == "Be kind." and session.params.max_tokens == 4
    assert session.params.lstrip  # a reply drops the space the chat template put before it
    assert [m["role"] for m in session.history] == ["user", "assistant"]  # after /reset + bye


def test_chat_history_trimmed_to_context(model_dir):
    from kotonoha.checkpoint import load_model

    model, tok = load_model(model_dir)
    engine = Engine(model, tok, max_batch_size=1)
    session = ChatSession(engine, tok, SamplingParams(temperature=0, max_tokens=8))
    for i in range(12):
        session.reply(f"message number {i} about rivers", io.StringIO())
    ids = session.prompt_ids()
    assert len(ids) <= engine.max_seq_len - 8
    assert session.history[-2]["content"] == "message number 11 about rivers"
    assert "message number 0 " not in tok.decode(ids)


def test_chat_refuses_base_model(tmp_path, capsys):
    tok = train_bpe_from_files(sample_text_paths(), 400)
    tok.chat_template = None
    save_model(tmp_path, Transformer(preset("tiny", vocab_size=tok.vocab_size)), tok)
    code, _, err = run(["chat", "--model", str(tmp_path)], capsys)
    assert code == 2 and "no chat template" in err and "sft" in err


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "kotonoha.cli", "model-info", "tiny"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "parameters" in r.stdout


@pytest.mark.parametrize("extra,match", [
    (["--prompt", "word " * 200], "context"),
    (["--prompt", "x", "--logit-bias", "999999=5"], "999999"),
])
def test_generate_checks_before_printing(model_dir, extra, match, capsys):
    code, out, err = run(["generate", "--model", str(model_dir), *extra], capsys)
    assert code == 2 and match in err
    assert out == ""  # the prompt is not echoed before the error


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_seq_len_below_one_is_refused(model_dir, value, capsys):
    code, _, err = run(["generate", "--model", str(model_dir), "--prompt", "x",
                        "--max-seq-len", value], capsys)
    assert code == 2 and f"--max-seq-len must be in 1..96 (the model's context), got {value}" in err


@pytest.mark.parametrize("seed,ok", [(2**64, False), (-(2**63) - 1, False), (2**64 - 1, True),
                                     (-1, True), (0, True)])
def test_seed_range_is_the_one_torch_accepts(seed, ok):
    params = SamplingParams(seed=seed)
    if ok:
        params.validate()
        torch.Generator().manual_seed(seed)
    else:
        with pytest.raises(UserError, match="seed must be a whole number from"):
            params.validate()


def test_seed_overflow_is_one_sentence(model_dir, capsys):
    code, _, err = run(["generate", "--model", str(model_dir), "--prompt", "x",
                        "--seed", "99999999999999999999"], capsys)
    assert code == 2 and "seed" in err and "Traceback" not in err


def test_unknown_device_is_one_sentence(model_dir, capsys):
    code, _, err = run(["generate", "--model", str(model_dir), "--prompt", "x",
                        "--device", "bogus"], capsys)
    assert code == 2 and "Device 'bogus'" in err and "cpu, cuda" in err
    assert len(err.strip().splitlines()) == 1


def test_model_info_of_gguf_packaged_name_and_run(model_dir, tmp_path, monkeypatch, capsys):
    from kotonoha import models

    gguf = tmp_path / "m.gguf"
    assert run(["convert", "--from", str(model_dir), "--to", "gguf", "--gguf-type", "f32",
                "--out", str(gguf)], capsys)[0] == 0
    code, out, _ = run(["model-info", str(gguf)], capsys)
    assert code == 0 and "2 layers" in out
    # A packaged name goes through `models.resolve`, as every other verb's --model does.
    real_resolve = models.resolve
    monkeypatch.setattr(models, "resolve",
                        lambda spec: gguf if spec == "smollm2" else real_resolve(spec))
    code, out, _ = run(["model-info", "smollm2"], capsys)
    assert code == 0 and "2 layers" in out
    run_dir = tmp_path / "run"  # a run directory with its model in model/
    (run_dir / "model").mkdir(parents=True)
    for f in model_dir.iterdir():
        (run_dir / "model" / f.name).write_bytes(f.read_bytes())
    code, out, _ = run(["model-info", str(run_dir)], capsys)
    assert code == 0 and "2 layers" in out


@pytest.mark.parametrize("to,out,make,match", [
    ("gguf", "d", "dir", "is a directory"),
    ("gguf", "noext", None, "does not end in .gguf"),
    ("hf", "f", "file", "is a file"),
    ("kotonoha", "f", "file", "is a file"),
    ("hf", "d", "model.json", "already holds a kotonoha model"),
    ("kotonoha", "d", "config.json", "already holds a Hugging Face model"),
])
def test_convert_refuses_a_wrong_out_before_loading(to, out, make, match, tmp_path, capsys):
    target = tmp_path / out
    if make == "file":
        target.write_text("x")
    elif make is not None:
        target.mkdir()
        if make != "dir":
            (target / make).write_text("{}")
    # --from does not exist: the --out error shows that nothing was loaded first.
    code, _, err = run(["convert", "--from", str(tmp_path / "missing"), "--to", to,
                        "--out", str(target)], capsys)
    assert code == 2 and match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_convert_into_a_folder_of_the_same_format_still_works(model_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    argv = ["convert", "--from", str(model_dir), "--to", "hf", "--out", str(out)]
    assert run(argv, capsys)[0] == 0
    assert run(argv, capsys)[0] == 0  # overwriting an earlier export of the same format
    assert not (out / "model.json").exists()
