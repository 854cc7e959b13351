"""Baselines: Kneser–Ney normalisation and behaviour, the LSTM, and the recall probe."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kotonoha.baselines.compare import (
    LSTMSettings,
    ProbeConfig,
    baselines_main,
    build_probe,
    candidate_tokens,
    run_probe,
    torch_next_logprobs,
)
from kotonoha.baselines.lstm import LSTMLM, LSTMConfig, lstm_params, match_params, train_lstm
from kotonoha.baselines.ngram import KneserNey, fit_ngram, ngram_bits_per_byte, run_ngram
from kotonoha.checkpoint import save_model
from kotonoha.data.shards import prepare
from kotonoha.model import Transformer, preset
from kotonoha.tokenizer import Tokenizer, train_bpe

NAMES = ["Sarn", "Kelbin", "Palo", "Velmora", "Ostrany", "Durnia", "Mirel", "Tavon"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Small, repetitive world-like text: n-grams learn it fast."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        a, b = rng.sample(NAMES, 2)
        docs.append(f"The capital of {a} is {b}. {b} lies on a river. People in {a} like tea. "
                    f"{rng.randint(2, 9)} plus {rng.randint(2, 9)} is a number.")
    return docs


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe(make_docs(200), vocab_size=320)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    root = tmp_path_factory.mktemp("baselines")
    tokenizer.save(root / "tok")
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(400)),
                   encoding="utf-8")
    prepare([str(src)], root / "tok", root / "data", val_fraction=0.1, show_progress=False)
    return root / "data"


# --- Kneser–Ney ------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_kn_distributions_sum_to_one(order: int) -> None:
    rng = np.random.default_rng(order)
    V = 40
    train = rng.integers(0, V, 3000)
    train[::5] = 7  # some structure, so counts of 1, 2, 3+ all occur
    model = KneserNey.fit(train, order, V)
    contexts = [rng.integers(0, V, n) for n in range(7)]  # mostly unseen for order >= 3
    contexts += [train[i:i + 4] for i in (0, 100, 2000)]  # seen ones
    for ctx in contexts:
        p = model.distribution(ctx)
        assert p.shape == (V,) and (p > 0).all()
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
    # The fast streaming scorer agrees with the full distribution, token by token.
    seq = np.concatenate([train[50:60], rng.integers(0, V, 10)])
    lp = model.token_logprobs(seq)
    ref = [np.log(model.distribution(seq[:i])[seq[i]]) for i in range(len(seq))]
    np.testing.assert_allclose(lp, ref, rtol=1e-12)


def test_kn_beats_unigram_on_repetitive_text(data_dir: Path) -> None:
    uni = ngram_bits_per_byte(fit_ngram(data_dir, 1), data_dir)
    tri = ngram_bits_per_byte(fit_ngram(data_dir, 3), data_dir)
    assert tri["bpb"] < 0.5 * uni["bpb"]
    _, res = run_ngram(data_dir, 2)
    assert tri["bpb"] < res["bpb"] < uni["bpb"] and res["params"] > 0


def test_higher_order_helps_on_long_deterministic_patterns() -> None:
    # Patterns of 8 tokens over a 4-token alphabet: a short context is ambiguous, three or
    # four tokens pin down the position within the pattern.
    rng = np.random.default_rng(0)
    patterns = [rng.integers(0, 4, 8) for _ in range(6)]

    def stream(n: int) -> np.ndarray:
        return np.concatenate([patterns[i] for i in rng.integers(0, len(patterns), n)])

    train, test = stream(3000), stream(300)
    nll = {n: -KneserNey.fit(train, n, 4).token_logprobs(test).mean() for n in (1, 2, 3, 5)}
    assert nll[5] < nll[3] < nll[2] < nll[1]
    assert nll[5] < 0.6 * nll[2]


def test_kn_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="order"):
        KneserNey.fit([1, 2, 3], 0, 4)
    with pytest.raises(ValueError, match="token ids"):
        KneserNey.fit([1, 2, 9], 2, 4)


# --- LSTM ------------------------------------------------------------------------------------


def test_lstm_param_formula_and_matching() -> None:
    cfg = LSTMConfig(vocab_size=500, d_model=48, n_layer=2)
    assert LSTMLM(cfg).num_params() == lstm_params(500, 48, 2)
    target = Transformer(preset("tiny", vocab_size=500)).num_params()
    d = match_params(target, 500, 2)
    assert abs(lstm_params(500, d, 2) - target) / target < 0.1


def test_lstm_trains_and_its_loss_falls(data_dir: Path) -> None:
    cfg = LSTMConfig(vocab_size=320, d_model=32, n_layer=1, context_length=32)
    model, res = train_lstm(data_dir, cfg, steps=40, batch_size=8, lr=1e-2, eval_tokens=256,
                            progress=False)
    first, last = res["train_loss"]
    assert last < first - 1.0
    assert 0 < res["bpb"] < 8 and res["flops"] > 0 and res["params"] == model.num_params()


# --- the recall probe ------------------------------------------------------------------------

# A key made of the corpus's words keeps it short in tokens; a distance below the question's
# own length (2) is raised to it.
PROBE = ProbeConfig(distances=(2, 12, 24), groups=3, candidates=4, lead=4, key=" The river is")


@pytest.fixture(scope="module")
def trials(tokenizer: Tokenizer, data_dir: Path) -> list:
    filler = np.fromfile(data_dir / "val.bin", dtype=np.uint16).astype(np.int64)
    return build_probe(tokenizer, filler, PROBE)


def test_candidates_are_whole_proper_nouns() -> None:
    tok = train_bpe(make_docs(200), vocab_size=400)
    text = np.array([i for d in make_docs(50, seed=1) for i in [*tok.encode(d), tok.eos_id]])
    # Not " The" / " People" (sentence starters) nor word fragments: only the names.
    assert sorted(tok.decode([i]).strip() for i in candidate_tokens(tok, text)) == sorted(NAMES)


def test_probe_machinery_oracle_and_uniform(trials: list, tokenizer: Tokenizer) -> None:
    key = tokenizer.encode(PROBE.key)
    V = tokenizer.vocab_size

    def oracle(contexts: list[list[int]]) -> np.ndarray:
        """Finds the fact in the context and puts all its probability on the answer."""
        out = np.full((len(contexts), V), -1e9)
        for row, ctx in enumerate(contexts):
            at = next(i for i in range(len(ctx)) if ctx[i:i + len(key)] == key)
            out[row, ctx[at + len(key)]] = 0.0
        return out

    acc = run_probe(trials, oracle)
    assert len(acc) == 3 and all(a == 1.0 for a in acc.values())
    uniform = run_probe(trials, lambda cs: np.zeros((len(cs), V)))
    assert all(a == pytest.approx(0.25) for a in uniform.values())
    assert sorted(acc) == [len(key) + 1, 12, 24]  # "." + the key is the shortest distance


def test_ngram_is_at_chance_beyond_its_context(trials: list, data_dir: Path) -> None:
    model = fit_ngram(data_dir, 3)
    acc = run_probe(trials, model.next_logprobs)
    for distance, a in acc.items():
        assert distance > 3 and a == pytest.approx(0.25)


def test_torch_scorer_truncates_to_the_window(trials: list, tokenizer: Tokenizer) -> None:
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, context_length=16))
    acc = run_probe(trials, torch_next_logprobs(model, 16))
    assert all(0.0 <= a <= 1.0 for a in acc.values())


def test_baselines_main_end_to_end(data_dir: Path, tokenizer: Tokenizer,
                                   tmp_path: Path) -> None:
    torch.manual_seed(0)
    tf = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, context_length=64))
    save_model(tmp_path / "tf", tf, tokenizer)
    (tmp_path / "tf" / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "loss": 5.0, "tokens": 2560, "elapsed_s": 1.5}) + "\n",
        encoding="utf-8")
    out = tmp_path / "report"
    res = baselines_main(data_dir, transformer=tmp_path / "tf", out=out, ngram_orders=(2, 3),
                         lstm=LSTMSettings(steps=5, batch_size=4, d_model=16),
                         probe=PROBE, max_eval_tokens=512, progress=False)
    names = [r["name"] for r in res["rows"]]
    assert names == ["2-gram KN", "3-gram KN", "LSTM", "transformer"]
    tf_row = res["rows"][-1]
    assert tf_row["train_tokens"] == 2560 and tf_row["flops"] > 0
    assert set(res["probe"]) == set(names)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| 3-gram KN |" in report and "| chance |" in report
    assert (out / "recall.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "baselines.json").read_text(encoding="utf-8"))["chance"] == 0.25


def test_baselines_main_checks_settings_before_any_work(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kotonoha.baselines.compare as compare
    from kotonoha.errors import UserError

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("an n-gram was fitted before the settings were checked")

    monkeypatch.setattr(compare, "run_ngram", no_work)
    afile = tmp_path / "afile"
    afile.write_text("x")
    bad = [({"max_train_tokens": 0}, "--max-train-tokens must be at least 3, not 0"),
           ({"max_train_tokens": -5}, "--max-train-tokens must be at least 3, not -5"),
           ({"max_train_tokens": 2}, "--max-train-tokens must be at least 3, not 2"),
           ({"lstm_steps": -1}, "--lstm-steps must be 0"),
           ({"transformer": tmp_path / "no-such-model"}, "does not exist"),
           ({"out": afile}, "is a file")]
    for kwargs, message in bad:
        with pytest.raises(UserError, match=message):
            baselines_main(data_dir, ngram_orders=(2, 3), progress=False, **kwargs)
