"""Token shards: documents -> token ids on disk -> (x, y) training batches.

`prepare` tokenizes every document of the sources (batched, on all cores), appends the
end-of-sequence token after each one (so the model sees where documents end), and writes two
flat arrays of token ids: `train.bin` and `val.bin` (uint16 when the vocabulary fits, else
uint32), read back with `np.memmap` so a corpus larger than memory costs nothing to open.
`meta.json` records dtype, token/document/byte counts per split (bytes of UTF-8 text, so a
loss in nats/token converts to tokenizer-independent bits per byte) and the hashes of the
inputs and tokenizer; running `prepare` again on unchanged inputs does nothing.

The split is by document: every `round(1 / val_fraction)`-th document goes to validation (an
even, order-stratified sample that needs no second pass). A corpus with too few documents for
that (a single text file, say) falls back to the last `val_fraction` of its tokens.

`ShardDataset.batch(step, batch_size)` is a pure function of (seed, step): each epoch visits
every `context_length` window once in a seeded random order, so resuming at step s reproduces
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from kotonoha.checkpoint import atomic_write_json
from kotonoha.data import sources as src
from kotonoha.errors import UserError

if TYPE_CHECKING:
    from kotonoha.tokenizer import Tokenizer

FORMAT = "kotonoha-shards"
VERSION = 1
META = "meta.json"
TOKENIZER_SUBDIR = "tokenizer"
CHUNK_BYTES = 1 << 20  # text encoded per batch
MIN_PARALLEL_BYTES = 1 << 20  # below this, starting threads costs more than it saves


def _load_tokenizer(directory: str | Path) -> Tokenizer:
    from kotonoha.tokenizer import Tokenizer

    d = Path(directory)
    if not (d / "tokenizer.json").is_file():
        raise UserError(f"No tokenizer.json in {d}; train one with `kotonoha tokenizer` first.")
    return Tokenizer.load(d)


def tokenizer_hash(directory: str | Path) -> str:
    """Hash of the tokenizer's files (not of any model weights sharing the folder)."""
    h = hashlib.sha256()
    for p in sorted(Path(directory).glob("tokenizer*.json")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _encode_chunk(tok: Tokenizer, docs: list[str], parallel: bool,
                  ) -> list[tuple[list[int], int]]:
    """(token ids, UTF-8 byte count) of each document."""
    # encode_batch runs on all cores inside `tokenizers` (Rust threads, no pickling).
    ids = tok.encode_batch(docs) if parallel else [tok.encode(d) for d in docs]
    return [(i, len(d.encode("utf-8"))) for i, d in zip(ids, docs)]


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for d in docs:
        chunk.append(d)
        size += len(d)
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / META
    if not path.is_file():
        raise UserError(f"{data_dir} has no prepared shards ({META} is missing); run "
                        f"`kotonoha data prepare --source ... --out {data_dir}` first.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError: a torn or corrupt file
        raise UserError(f"{path} is not valid JSON; re-run kotonoha data prepare.") from None
    if (not isinstance(meta, dict) or meta.get("format") != FORMAT
            or meta.get("version", 0) > VERSION):
        raise UserError(f"{path} is not a kotonoha shard description this version can read.")
    return meta


def _up_to_date(out: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        meta = read_meta(out)
    except (UserError, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for s in meta["splits"].values():
        f = out / s["file"]
        if not f.is_file() or f.stat().st_size != s["tokens"] * itemsize:
            return None
    return meta


def prepare(sources: list[str] | str, tokenizer_dir: str | Path, out_dir: str | Path, *,
            text_field: str = "text", val_fraction: float = 0.05, workers: int | None = None,
            show_progress: bool = True) -> dict[str, Any]:
    """Tokenize `sources` into `out_dir/{train,val}.bin` + `meta.json`; returns the meta.

    Documents are encoded in batches by `tokenizers`' own thread pool (no pickling, no
    process start-up): `workers=None` uses every core, `workers=1` encodes one document at a
    time. Other values set RAYON_NUM_THREADS, which `tokenizers` reads once per process, so
    they only take effect when nothing in this process has encoded in parallel before.
    A no-op (returning the existing meta) when the sources, tokenizer and settings are
    unchanged since the last run.
    """
    # Every round(1 / f)-th document is held out: above 0.5 that rule holds out more than f
    # (from 2/3 on, every document), and 0.5 or less is the split existing data relies on.
    if not 0.0 <= val_fraction <= 0.5:
        raise UserError(f"val_fraction must be between 0 and 0.5, got {val_fraction}.")
    out = Path(out_dir)
    names = [sources] if isinstance(sources, str) else list(sources)
    settings = {"version": VERSION, "text_field": text_field, "val_fraction": val_fraction}
    sources_hash = src.fingerprint(names, text_field)
    tok_hash = tokenizer_hash(tokenizer_dir)
    fp = hashlib.sha256(json.dumps([settings, sources_hash, tok_hash]).encode()).hexdigest()
    if (meta := _up_to_date(out, fp)) is not None:
        if show_progress:
            print(f"{out} is up to date ({meta['splits']['train']['tokens']:,} train tokens).",
                  file=sys.stderr)
        return meta

    tok = _load_tokenizer(tokenizer_dir)
    if tok.eos_id is None:  # it separates the documents in the shards
        raise UserError(f"The tokenizer in {tokenizer_dir} has no end-of-sequence token; set "
                        "eos_token in its tokenizer_config.json.")
    dtype = dtype_for(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # a half-rewritten folder must not look prepared
    total = src.total_bytes(names)
    if workers is not None and workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}.")
    if workers is not None and workers > 1:
        os.environ.setdefault("RAYON_NUM_THREADS", str(workers))
    parallel = workers != 1 and total >= MIN_PARALLEL_BYTES

    every = round(1 / val_fraction) if val_fraction > 0 else 0
    counts = {s: {"tokens": 0, "bytes": 0, "documents": 0} for s in ("train", "val")}
    tmp = {s: out / f".{s}.bin.tmp" for s in counts}
    try:
        with contextlib.ExitStack() as stack:
            files = {s: stack.enter_context(open(tmp[s], "wb")) for s in counts}
            bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True,
                                           desc="tokenizing", disable=not show_progress))
            doc_index = 0
            for docs in _chunks(src.iter_documents(names, text_field)):
                for ids, n_bytes in _encode_chunk(tok, docs, parallel):
                    split = "val" if every and (doc_index + 1) % every == 0 else "train"
                    files[split].write(np.asarray(ids, dtype=dtype).tobytes())
                    files[split].write(eos.tobytes())
                    c = counts[split]
                    c["tokens"] += len(ids) + 1
                    c["bytes"] += n_bytes
                    c["documents"] += 1
                    doc_index += 1
                    bar.update(n_bytes)
            bar.update(max(0, total - bar.n))  # file sizes include markup: top the bar up
    except BaseException:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise

    split_by = "document"
    if val_fraction > 0 and counts["val"]["documents"] == 0:
        split_by = "position"  # too few documents: hold out the tail of the token stream
        _split_tail(tmp, counts, dtype, val_fraction)
    if counts["train"]["tokens"] == 0:  # a guard: the rules above always leave some
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise UserError(f"The train split of {out} would be empty; lower val_fraction or add "
                        "documents.")
    for s in counts:
        os.replace(tmp[s], out / f"{s}.bin")
    tok.save(out / TOKENIZER_SUBDIR)
    meta = {
        "format": FORMAT, "version": VERSION, "fingerprint": fp, "dtype": dtype.name,
        "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "tokenizer_hash": tok_hash,
        "sources_hash": sources_hash, "sources": names, "text_field": text_field,
        "val_fraction": val_fraction, "split_by": split_by,
        "splits": {s: {"file": f"{s}.bin", **counts[s]} for s in counts},
    }
    atomic_write_json(out / META, meta)  # last: its presence marks a complete folder
    return meta


def _split_tail(tmp: dict[str, Path], counts: dict[str, dict[str, int]], dtype: np.dtype,
                val_fraction: float) -> None:
    n = counts["train"]["tokens"]
    n_val = max(1, math.floor(n * val_fraction))
    tokens = np.fromfile(tmp["train"], dtype=dtype)
    tokens[n - n_val:].tofile(tmp["val"])
    with open(tmp["train"], "r+b") as f:
        f.truncate((n - n_val) * dtype.itemsize)
    # Bytes are apportioned by tokens: the exact split of a document's bytes is unknowable.
    val_bytes = round(counts["train"]["bytes"] * n_val / n)
    counts["val"] = {"tokens": n_val, "bytes": val_bytes, "documents": 0}
    counts["train"]["tokens"] -= n_val
    counts["train"]["bytes"] -= val_bytes


# ---------------------------------------------------------------------------------------------
# Reading batches


class ShardDataset:
    """Windows of `context_length + 1` tokens from one split, as (x, y) int64 batches.

    Sample g of the run (g = step * batch_size + row) lies in epoch g // n_windows; an epoch is
    a seeded permutation of the non-overlapping windows, shifted by a seeded offset so window
    boundaries differ between epochs. Everything is a function of (seed, g): no hidden state.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", context_length: int = 256,
                 seed: int = 0) -> None:
        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir)
        if split not in self.meta["splits"]:
            raise UserError(f"{self.dir} has no '{split}' split.")
        info = self.meta["splits"][split]
        self.split, self.T, self.seed = split, context_length, seed
        self.n_tokens = int(info["tokens"])
        self.n_bytes = int(info["bytes"])
        # Window w spans [offset + w*T, offset + (w+1)*T + 1) with offset < T: keep it in range.
        self.n_windows = self.n_tokens // context_length - 1
        if self.n_windows < 1:
            raise UserError(f"The {split} split of {self.dir} has {self.n_tokens} tokens, too few "
                            f"for context_length={context_length}; use more data or a shorter "
                            "context.")
        self.tokens = np.memmap(self.dir / info["file"], dtype=np.dtype(self.meta["dtype"]),
                                mode="r")
        self._epoch: tuple[int, np.ndarray, int] | None = None

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / self.n_tokens

    def _order(self, epoch: int) -> tuple[np.ndarray, int]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(self.T))
            self._epoch = (epoch, rng.permutation(self.n_windows), offset)
        return self._epoch[1], self._epoch[2]

    def _window(self, start: int) -> np.ndarray:
        return np.asarray(self.tokens[start:start + self.T + 1], dtype=np.int64)

    def batch(self, step: int, batch_size: int, rows: range | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows `rows` (default: all) of the `batch_size`-row batch for `step`."""
        rows = rows if rows is not None else range(batch_size)
        windows = []
        for r in rows:
            g = step * batch_size + r
            order, offset = self._order(g // self.n_windows)
            windows.append(self._window(offset + int(order[g % self.n_windows]) * self.T))
        data = torch.from_numpy(np.stack(windows))
        return data[:, :-1], data[:, 1:]

    def windows(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows at fixed positions i * context_length (evaluation: the same every time)."""
        data = torch.from_numpy(np.stack([self._window(i * self.T) for i in indices]))
        return data[:, :-1], data[:, 1:]
