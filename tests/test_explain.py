"""Looking inside: attention maps, head finder, logit lens, embeddings, and the scaling sweep."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kotonoha.checkpoint import save_model
from kotonoha.config import load_config
from kotonoha.errors import UserError
from kotonoha.explain.attention import (
    attention_maps,
    attention_report,
    find_heads,
    maps_to_json,
    pronoun_stories,
    pronoun_study,
)
from kotonoha.explain.cli import main as explain_cli
from kotonoha.explain.common import encode, residual_stream, token_labels
from kotonoha.explain.embeddings import (
    SenseExample,
    contextual_similarity,
    nearest_neighbours,
    pca_2d,
    sense_examples,
    similarity_by_layer,
    word_token_ids,
)
from kotonoha.explain.lens import continuation_ids, logit_lens
from kotonoha.explain.scaling import (
    ScalingConfig,
    _check_sizes,
    describe_curve,
    fit_power_law,
    run_scaling,
    train_size,
)
from kotonoha.model import Transformer, preset
from kotonoha.tokenizer import Tokenizer, sample_text_paths, train_bpe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEXT = "Ana sat on the bank of the river and watched the water."


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Tiny models run fastest on one thread, and 2 threads on a busy 2-core machine thrash.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [p.read_text(encoding="utf-8") for p in sample_text_paths()]
    return train_bpe(texts, vocab_size=400)


@pytest.fixture(scope="module")
def model(tok: Tokenizer) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=tok.vocab_size)).eval()


# --- attention --------------------------------------------------------------------------------


def test_attention_maps_are_causal_distributions(model: Transformer, tok: Tokenizer) -> None:
    maps = attention_maps(model, tok, TEXT)
    T = len(maps.ids)
    assert maps.ids[0] == tok.bos_id and len(maps.tokens) == T
    assert maps.weights.shape == (model.cfg.n_layer, model.cfg.n_head, T, T)
    torch.testing.assert_close(maps.weights.sum(-1), torch.ones(2, 4, T), atol=1e-5, rtol=0)
    above = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    assert (maps.weights[..., above] == 0).all()
    assert (maps.weights[..., ~above] > 0).all()  # softmax: nothing visible gets exactly 0
    data = maps_to_json(maps)
    assert (data["n_layer"], data["n_head"]) == (2, 4)
    assert len(data["attention"][1][3]) == T and len(data["attention"][1][3][-1]) == T


def test_head_finder_ranks_a_planted_head_first(tok: Tokenizer) -> None:
    """Layer 1, head 3 is rewired to attend to position 3 from everywhere after it."""
    torch.manual_seed(1)
    m = Transformer(preset("tiny", vocab_size=tok.vocab_size, positions="learned")).eval()
    source, hd = 3, m.cfg.head_dim
    with torch.no_grad():
        m.embed.weight[:, :2] = 0.0
        m.pos_embed.weight[:, :2] = 0.0
        m.pos_embed.weight[:, 0] = 1.0  # a constant feature: the query
        m.pos_embed.weight[source, 1] = 1.0  # a feature only the source position has: the key
        attn = m.blocks[1].attn
        kv = 3 // (m.cfg.n_head // m.cfg.n_kv_head)  # the key/value head that head 3 reads
        attn.q_proj.weight[3 * hd:4 * hd] = 0.0
        attn.q_proj.weight[3 * hd, 0] = 10.0
        attn.q_proj.weight[2 * hd] = 0.0  # head 2 shares head 3's keys: keep it out of it
        attn.k_proj.weight[kv * hd:(kv + 1) * hd] = 0.0
        attn.k_proj.weight[kv * hd, 1] = 10.0
    found = find_heads(m, tok, TEXT, target="-1", source=str(source))
    top, second = found["heads"][:2]
    assert (top["layer"], top["head"]) == (1, 3)
    assert top["mass"] > 0.95 and second["mass"] < 0.5
    assert found["sources"] == [source] and found["target"] == len(encode(tok, TEXT)) - 1
    assert found["baselines"]["uniform"] == pytest.approx(1 / len(encode(tok, TEXT)))
    with pytest.raises(UserError, match="does not occur"):
        find_heads(m, tok, TEXT, source="elephant")


def test_pronoun_study_and_report_files(model: Transformer, tok: Tokenizer,
                                        tmp_path: Path) -> None:
    stories = pronoun_stories("en", 6, seed=0)
    assert stories == pronoun_stories("en", 6, seed=0)  # seeded
    for s in stories:
        assert s.referent in s.text and s.other in s.text and s.referent != s.other
    ja = pronoun_stories("ja", 3)
    assert all(s.pronoun in ("彼", "彼女") and s.pronoun in s.text for s in ja)
    study = pronoun_study(model, tok, stories, top=5)
    assert len(study["heads"]) == 5 and len(study["selective_heads"]) == 5
    rights = [h["right"] for h in study["heads"]]
    assert rights == sorted(rights, reverse=True) and all(0 <= r <= 1 for r in rights)
    assert 0 < study["baselines"]["uniform"] < 1

    data = attention_report(model, tok, tmp_path, prompt=TEXT, layers=[1], target="watched",
                            source="Ana", pronoun_langs=["en"], stories=4)
    assert data["heads"]["sources"] == list(range(1, 1 + len(tok.encode("Ana"))))  # BOS first
    for name in ("attention_layer01.png", "attention_maps.json", "pronouns_en.png",
                 "attention.md", "attention.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not (tmp_path / "attention_layer00.png").exists()
    saved = json.loads((tmp_path / "attention_maps.json").read_text(encoding="utf-8"))
    assert saved["n_layer"] == 2 and saved["tokens"][0] == "<|endoftext|>"


# --- logit lens -------------------------------------------------------------------------------


def test_lens_last_layer_is_the_models_output(model: Transformer, tok: Tokenizer) -> None:
    ids = encode(tok, TEXT)
    stream, out = residual_stream(model, ids)
    assert stream.shape == (model.cfg.n_layer + 1, len(ids), model.cfg.d_model)
    torch.testing.assert_close(model.logits_from_hidden(stream[-1]), out.logits[0])
    torch.testing.assert_close(stream[0], model.embed.weight[ids])  # RoPE: layer 0 = table

    result = logit_lens(model, tok, TEXT, "river", k=3)
    assert [r["layer"] for r in result["layers"]] == [0, 1, 2]
    with torch.no_grad():
        probs = model(torch.tensor([ids]))[0, -1].softmax(-1)
    last = result["layers"][-1]
    top = torch.topk(probs, 3)
    assert [t["id"] for t in last["top"]] == top.indices.tolist()
    assert [t["prob"] for t in last["top"]] == pytest.approx(top.values.tolist(), abs=1e-6)
    answer = continuation_ids(tok, TEXT, "river")[0]
    assert last["answer_prob"] == pytest.approx(float(probs[answer]), abs=1e-6)
    assert last["answer_rank"] == int((probs > probs[answer]).sum()) + 1
    assert result["output_top"] == top.indices[0]


def test_continuation_ids_add_the_word_space(tok: Tokenizer) -> None:
    assert continuation_ids(tok, "The capital of", "river") == tok.encode(" river")
    assert continuation_ids(tok, "The capital of ", "river") == tok.encode("river")


# --- embeddings -------------------------------------------------------------------------------


def test_neighbours_are_deterministic_and_start_with_the_word(model: Transformer,
                                                              tok: Tokenizer) -> None:
    ids = word_token_ids(tok, "the")
    assert len(ids) == 1 and tok.decode(ids) == " the"
    first = nearest_neighbours(model, tok, "the", k=5, exclude_self=False)
    assert first["neighbours"][0]["id"] == ids[0]
    assert first["neighbours"][0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert nearest_neighbours(model, tok, "the", k=5, exclude_self=False) == first
    excluded = nearest_neighbours(model, tok, "the", k=5)
    assert ids[0] not in [n["id"] for n in excluded["neighbours"]]
    assert [n["id"] for n in excluded["neighbours"]][:4] == [n["id"] for n in first["neighbours"][1:]]
    assert nearest_neighbours(model, tok, "riverbank", k=2)["averaged"]

    # Exact ties come out in id order.
    twin = copy.deepcopy(model)
    copies = [7, 50, 120]
    with torch.no_grad():
        twin.embed.weight[copies] = twin.embed.weight[ids[0]].clone()
    tied = nearest_neighbours(twin, tok, "the", k=3)
    assert [n["id"] for n in tied["neighbours"]] == copies


def test_token_labels_escape_invisible_characters(tok: Tokenizer) -> None:
    # Byte-level BPE has a token for every byte: NUL, tab and a zero-width space must not be
    # written raw into a Markdown table or a plot label.
    ids = [tok.encode(text)[0] for text in ("\x00", "\t", "\x7f")]
    assert token_labels(tok, ids) == ["\\x00", "\\t", "\\x7f"]
    zero_width = tok.encode("\u200b")
    assert "".join(token_labels(tok, zero_width)) in ("\\u200b", "\\xe2\\x80\\x8b")


def test_pca_finds_the_main_direction_deterministically() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(-1, 1, 6)
    points = t[:, None] * torch.randn(1, 16, generator=g) + 1e-3 * torch.randn(6, 16, generator=g)
    coords, explained = pca_2d(points)
    assert coords.shape == (6, 2) and explained[0] > 0.99
    assert abs(torch.corrcoef(torch.stack([coords[:, 0], t]))[0, 1]) > 0.999
    assert torch.equal(pca_2d(points.clone())[0], coords)
    with pytest.raises(UserError):
        pca_2d(points[:1])


def test_sense_similarity_on_a_toy_example() -> None:
    # Layer 0: one vector for every sentence. Layer 1: the two senses point different ways.
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 1.0, 1.0
    g = torch.Generator().manual_seed(0)
    same = torch.ones(8)
    layer1 = [a, a, a, b, b, b]
    states = torch.stack([torch.stack([same, v + 0.01 * torch.randn(8, generator=g)])
                          for v in layer1])
    senses = ["x", "x", "x", "y", "y", "y"]
    rows = similarity_by_layer(states, senses, ["x/0", "x/0", "x/1", "y/0", "y/1", "y/1"])
    assert rows[0]["within"] == pytest.approx(1) and rows[0]["across"] == pytest.approx(1)
    assert rows[0]["gap"] == pytest.approx(0, abs=1e-9)
    assert rows[1]["within"] > 0.99 and rows[1]["across"] < 0.05
    assert rows[1]["gap"] > 0.9
    one_template = similarity_by_layer(states, senses, ["t"] * 3 + ["u"] * 3)
    assert one_template[1]["within_other_template"] is None and one_template[1]["gap"] is None


def test_contextual_similarity_follows_the_word(model: Transformer, tok: Tokenizer) -> None:
    examples = sense_examples("はし", per_template=2)
    assert examples == sense_examples("はし", per_template=2)
    assert {e.sense for e in examples} == {"bridge", "chopsticks", "edge"}
    assert all("はし" in e.text for e in examples)
    mine = [SenseExample("We sat on the bank of the river.", "bank", "river", "0"),
            SenseExample("The river bank was muddy.", "bank", "river", "1"),
            SenseExample("She went to the bank to get money.", "bank", "money", "2"),
            SenseExample("The bank gave him a loan.", "bank", "money", "3")]
    res = contextual_similarity(model, tok, mine)
    assert res["senses"] == ["money", "river"] and len(res["layers"]) == model.cfg.n_layer + 1
    assert all(e["token"].endswith("k") for e in res["examples"])  # the word's last token
    # Layer 0 is the token embedding: the same vector in every sentence.
    first = res["layers"][0]
    assert first["within"] == pytest.approx(1.0) and first["across"] == pytest.approx(1.0)
    assert res["layers"][-1]["across"] < 0.999  # context has moved the vectors apart
    with pytest.raises(UserError, match="two senses"):
        contextual_similarity(model, tok, mine[:2])


def test_explain_cli_writes_its_outputs(model: Transformer, tok: Tokenizer,
                                        tmp_path: Path) -> None:
    save_model(tmp_path / "m", model, tok)
    base = ["--model", str(tmp_path / "m")]
    assert explain_cli(["explain", "lens", *base, "--out", str(tmp_path / "lens"),
                        "--prompt", "The river", "--answer", "bank"]) == 0
    lens = json.loads((tmp_path / "lens" / "lens.json").read_text(encoding="utf-8"))
    assert lens["answer_token"] == tok.decode(continuation_ids(tok, "The river", "bank")[:1])
    assert (tmp_path / "lens" / "lens.png").stat().st_size > 0
    assert explain_cli(["explain", "embeddings", *base, "--out", str(tmp_path / "emb"),
                        "--word", "river", "--word", "water", "--ambiguous", "bank",
                        "--per-template", "1"]) == 0
    for name in ("embeddings.md", "embeddings.json", "pca.png", "contextual.png"):
        assert (tmp_path / "emb" / name).stat().st_size > 0, name
    assert explain_cli(["explain", "attention", *base, "--out", str(tmp_path / "att"),
                        "--stories", "2", "--layers", "0"]) == 0
    assert "Pronoun stories" in (tmp_path / "att" / "attention.md").read_text(encoding="utf-8")
    assert explain_cli(["explain", "embeddings", *base, "--out", str(tmp_path / "bad"),
                        "--sentence", "no equals sign", "--sense-word", "bank"]) == 2


# --- scaling ----------------------------------------------------------------------------------


def test_power_law_fit_recovers_the_exponent() -> None:
    x = [1e3, 3e3, 1e4, 3e4, 1e5, 1e6]
    g = torch.Generator().manual_seed(0)
    noise = (1 + 0.01 * torch.randn(len(x), generator=g)).tolist()
    fit = fit_power_law(x, [5.0 * v ** -0.3 * n for v, n in zip(x, noise)])
    assert fit["b"] == pytest.approx(-0.3, abs=0.01)
    assert fit["a"] == pytest.approx(5.0, rel=0.1) and fit["r2"] > 0.99


def test_describe_curve_tells_jumps_from_slopes() -> None:
    names = ["a", "b", "c", "d", "e"]
    assert "sharp jump" in describe_curve(names, [0, 0, 0.02, 0.8, 0.85], [100] * 5)
    assert "no sharp jump" in describe_curve(names, [0.1, 0.25, 0.4, 0.55, 0.7], [100] * 5)
    assert "does not appear" in describe_curve(names, [0, 0, 0.01, 0, 0.02], [100] * 5)
    assert "flat within noise" in describe_curve(names, [0.5, 0.52, 0.49, 0.51, 0.5], [50] * 5)


def test_micro_sweep_runs_end_to_end(tmp_path: Path) -> None:
    cfg = load_config(ScalingConfig, CONFIGS / "scaling-micro.yaml",
                      [f"out={tmp_path}", "train.progress=false"])
    summary = run_scaling(cfg, progress=False)
    assert summary is not None
    for name in ("summary.md", "scaling.json", "loss_vs_params.png", "loss_vs_flops.png",
                 "accuracy_vs_size.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = summary["results"]
    assert [r["name"] for r in results] == ["xs", "s", "m", "l", "xl"]
    params = [r["params"] for r in results]
    assert params == sorted(params) and len(set(r["tokens"] for r in results)) == 1
    assert all(math.isfinite(r["val_loss"]) and r["val_loss"] > 0 for r in results)
    for r in results:
        assert set(r["tasks"]) == {"cloze", "two_hop", "addition"}
        assert all(t["total"] > 0 and t["logprob"] < 0 for t in r["tasks"].values())
    assert set(summary["fits"]) == {"params_non_embedding", "flops"}
    text = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "same token budget" in text and "| xl |" in text

    # A finished size is not trained again; changed settings are refused, not mixed in.
    size = _check_sizes(cfg)[0]
    metrics = tmp_path / "runs" / "xs" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    train_size(cfg, size, tmp_path / "data")
    assert metrics.stat().st_mtime_ns == before
    cfg.tokens *= 2
    with pytest.raises(UserError, match="other settings"):
        train_size(cfg, size, tmp_path / "data")


# --- bad options: refused before anything is written --------------------------------------------


def test_explain_refuses_bad_counts_and_writes_nothing(
        model: Transformer, tok: Tokenizer, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from kotonoha.explain.embeddings import embeddings_report
    from kotonoha.explain.lens import lens_report

    out = tmp_path / "out"
    lens_bad = [({"k": 0}, "-k must be at least 1"), ({"k": -1}, "-k must be at least 1"),
                ({"answer": ""}, "--answer is empty")]
    for kwargs, message in lens_bad:
        with pytest.raises(UserError, match=message):
            lens_report(model, tok, out, prompt="The river", **kwargs)
    attention_bad = [({"stories": 0}, "--stories must be at least 1"),
                     ({"stories": -1}, "--stories must be at least 1"),
                     ({"top": -1}, "--top must be at least 1"),
                     ({"pronoun_langs": ["en", "fr"]}, "No pronoun stories in 'fr'"),
                     ({"source": "Ana", "target": "Zzz"}, "'Zzz' does not occur")]
    for kwargs, message in attention_bad:
        with pytest.raises(UserError, match=message):
            attention_report(model, tok, out, **{"prompt": TEXT, "stories": 2, **kwargs})
    embeddings_bad = [({"k": -1}, "-k must be at least 1"),
                      ({"per_template": 0}, "--per-template must be at least 1"),
                      ({"ambiguous": ["bank", "foo"]}, "'foo' is not one of")]
    for kwargs, message in embeddings_bad:
        with pytest.raises(UserError, match=message):
            embeddings_report(model, tok, out, words=["river", "water"], **kwargs)
    assert not out.exists()  # no half-written folder

    # A -k above the vocabulary lists the whole vocabulary; --top above the heads all heads.
    assert len(logit_lens(model, tok, "The river", k=10**6)["layers"][0]["top"]) == tok.vocab_size
    data = attention_report(model, tok, out, prompt=TEXT, target="watched", source="Ana",
                            pronoun_langs=[], top=10**6)
    assert len(data["heads"]["heads"]) == model.cfg.n_layer * model.cfg.n_head

    # --out naming a file, and the checks above, fail before the model is even loaded.
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        lens_report(model, tok, afile, prompt="The river")
    missing = ["--model", str(tmp_path / "no-such-model")]
    for argv, message in ((["lens", "--out", str(afile)], "is a file"),
                          (["attention", "--out", str(afile)], "is a file"),
                          (["embeddings", "--out", str(afile)], "is a file"),
                          (["lens", "-k", "0"], "-k must be at least 1"),
                          (["attention", "--top", "0"], "--top must be at least 1"),
                          (["embeddings", "--per-template", "0"], "--per-template must")):
        assert explain_cli(["explain", *argv, *missing]) == 2
        assert message in capsys.readouterr().err


def test_scaling_refuses_eval_items_below_one_before_training(tmp_path: Path) -> None:
    for n in (0, -1):  # 0 divided by zero after training; -1 sliced off one item instead
        cfg = load_config(ScalingConfig, CONFIGS / "scaling-micro.yaml",
                          [f"out={tmp_path}", f"eval_items={n}", "train.progress=false"])
        with pytest.raises(UserError, match="eval_items must be at least 1"):
            run_scaling(cfg, progress=False)
    assert not any(tmp_path.iterdir())  # no corpus, no run


def test_scaling_refuses_one_size_and_a_bad_split_before_training(tmp_path: Path) -> None:
    one = load_config(ScalingConfig, CONFIGS / "scaling-micro.yaml",
                      [f"out={tmp_path}", "train.progress=false"])
    one.sizes = one.sizes[:1]  # a power law needs two points: it used to fail after training
    with pytest.raises(UserError, match="at least two sizes"):
        run_scaling(one, progress=False)
    bad = load_config(ScalingConfig, CONFIGS / "scaling-micro.yaml",
                      [f"out={tmp_path}", "eval_split=bogus", "train.progress=false"])
    with pytest.raises(UserError, match="eval_split must be seen, heldout"):
        run_scaling(bad, progress=False)  # it used to evaluate nothing and report success
    assert not any(tmp_path.iterdir())
