"""Model directories on disk: safetensors + JSON, written atomically, loaded without pickle.

A kotonoha model directory (which is also what a run directory holds) contains
`model.safetensors` (the weights, by the parameter names of `model.Transformer`), `model.json`
(`{"format": "kotonoha", "version": 1, "config": {...}, ...}`) and, when there is one,
the tokenizer (`tokenizer.json` + `tokenizer_config.json`). Every file is written to a
temporary name in the same directory and renamed over the old one, so a crash leaves either the
old file or the new one, never half of one.

`load_model` opens any model the project knows about: a kotonoha directory, a Hugging Face
directory, or a GGUF file.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kotonoha.errors import UserError
from kotonoha.model import ModelConfig, Transformer

if TYPE_CHECKING:
    from kotonoha.tokenizer import Tokenizer

FORMAT = "kotonoha"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"

# ---------------------------------------------------------------------------------------------
# Atomic writes


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every OS/filesystem (e.g. Windows).
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed to `path`.

    The temporary name is unique (pid + random) and hidden, and it is removed on any failure,
    so a crash or an exception never leaves a partial file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with _atomic_target(path) as tmp, open(tmp, "xb") as f:
        f.write(data)
        f.flush()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors, atomically.

    Tensors are made contiguous and moved to the CPU. safetensors refuses tensors that share
    storage, so a tensor that aliases an earlier one is cloned (callers that know about tying,
    like `save_model`, drop the duplicate instead). `{"format": "pt"}` is always in the metadata
    because transformers refuses files without it.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    meta = {"format": "pt", **(metadata or {})}
    with _atomic_target(path) as tmp:
        save_file(out, str(tmp), metadata=meta)


# ---------------------------------------------------------------------------------------------
# Saving


def save_model(directory: str | Path, model: Transformer, tokenizer: Tokenizer | None = None, *,
               extra: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `model.safetensors` + `model.json` (+ the tokenizer) into `directory`.

    `extra` adds keys to model.json (e.g. the training step); `dtype` casts floating weights
    (e.g. torch.bfloat16 to halve the file). Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    reserved = {"format", "version", "config"} & set(extra or {})
    if reserved:
        raise ValueError(f"extra must not override model.json keys: {sorted(reserved)}")
    state = model.state_dict()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as embed.weight; re-tied on load
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    # Weights first, JSON last: a directory whose model.json exists has its weights.
    save_safetensors_atomic(state, directory / WEIGHTS_FILE)
    atomic_write_json(directory / CONFIG_FILE,
                      {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(),
                       **(extra or {})})
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


FORMAT_NAMES = {"kotonoha": "kotonoha", "hf": "Hugging Face"}
# For each directory format, the models (name, marker file) an export must not land beside:
# `load_model` would open the other one, or a mix. (A kotonoha model beside a LoRA adapter is
# what a merged LoRA run holds.)
OTHER_MODELS = {"kotonoha": [("Hugging Face", "config.json")],
                "hf": [("kotonoha", CONFIG_FILE), ("LoRA adapter", "adapter.json")]}


def check_output(path: str | Path, fmt: str) -> Path:
    """Refuse an output path that cannot take a model of `fmt` ("kotonoha", "hf", "gguf"),
    before anything is loaded or written: a GGUF file must end in .gguf (loaders go by the
    suffix), and a directory must not already hold another format's model, whose files would
    be left beside the new ones and could win when the folder is loaded."""
    path = Path(path).expanduser()
    if fmt == "gguf":
        if path.is_dir():
            raise UserError(f"{path} is a directory, but a GGUF export is one file; give a path "
                            "ending in .gguf.")
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} does not end in .gguf, which loaders need to recognise a "
                            "GGUF file; add the suffix.")
        return path
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, but a {FORMAT_NAMES[fmt]} model is written to a "
                        "directory; choose a new or empty folder.")
    for name, marker in OTHER_MODELS[fmt]:
        if (path / marker).is_file():
            raise UserError(f"{path} already holds a {name} model ({marker}); choose an empty "
                            "folder or delete that model first.")
    return path


# ---------------------------------------------------------------------------------------------
# Loading


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; {what} needs it.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {what} needs a readable copy.") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, on the CPU (never unpickles anything)."""
    if not path.is_file():
        raise UserError(f"Weights file {path} is missing.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}).") from None


def _common_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most of the weights (mixed files get one dtype)."""
    counts: Counter[torch.dtype] = Counter()
    for t in tensors.values():
        if t.is_floating_point():
            counts[t.dtype] += t.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def parse_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device; a name torch does not know, or a GPU this machine lacks,
    is one sentence instead of torch's RuntimeError."""
    if isinstance(device, torch.device):
        return device
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"Device '{device}' is not one kotonoha knows; use cpu, cuda, cuda:N "
                        "or mps.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"Device '{device}' was requested but no CUDA GPU is available.")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"Device '{device}' was requested but Apple's MPS is not available.")
    return parsed


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], *, source: str | Path,
                device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> Transformer:
    """A `Transformer` whose weights are exactly `tensors` (kotonoha parameter names).

    The model is built on the meta device so no random initialisation is done (or memory
    spent) before the real weights are assigned. Every tensor must be present with the shape
    the config implies; `lm_head.weight` is ignored and re-tied when the embeddings are tied.
    `dtype=None` keeps the dtype most of the stored weights have.
    """
    device = parse_device(device) if device is not None else torch.device("cpu")
    dtype = dtype or _common_dtype(tensors)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tensors = dict(tensors)
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise UserError(f"{source} is missing tensor '{missing[0]}'"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + "; the weights do not match the model config.")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise UserError(f"{source} has tensor '{unexpected[0]}', which a model with this config "
                        "does not have; the weights do not match the model config.")
    for k, shape in expected.items():
        if tensors[k].shape != shape:
            raise UserError(f"{source}: tensor '{k}' has shape {tuple(tensors[k].shape)} but the "
                            f"model config needs {tuple(shape)}.")
    state = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
             for k, v in tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if cfg.positions == "rope":  # non-persistent buffers are still on the meta device
        model._init_rope(device)
    return model.eval()


def load_tokenizer(directory: Path) -> Tokenizer | None:
    if not (directory / "tokenizer.json").is_file():
        return None
    from kotonoha.tokenizer import Tokenizer

    return Tokenizer.load(directory)


def read_model_config(directory: str | Path) -> ModelConfig:
    """The model config in `directory`'s model.json, checked: one sentence if it is not one."""
    directory = Path(directory)
    meta = read_json(directory / CONFIG_FILE, "loading this kotonoha model")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise UserError(f"{directory / CONFIG_FILE} is not a kotonoha model description "
                        '(expected {"format": "kotonoha", "config": {...}}).')
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise UserError(f"{directory / CONFIG_FILE} has format version {meta.get('version')!r}; "
                        f"this kotonoha reads version {VERSION} or older, so upgrade kotonoha.")
    if not isinstance(meta["config"], dict):
        raise UserError(f"{directory / CONFIG_FILE}: 'config' must be a mapping of fields.")
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (TypeError, UserError) as e:  # UserError: a field the config itself refuses
        reason = str(e).rstrip(".")
        raise UserError(f"{directory / CONFIG_FILE} has an invalid model config ({reason}).") from None
    return cfg


def load_kotonoha(directory: str | Path, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    directory = Path(directory)
    cfg = read_model_config(directory)
    weights = directory / WEIGHTS_FILE
    model = build_model(cfg, read_safetensors(weights), source=weights, device=device,
                        dtype=dtype)
    return model, load_tokenizer(directory)


def _is_hf_dir(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def load_model(spec: str | Path, *, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """Open a model from disk: returns (model in eval mode, tokenizer or None).

    `spec` may be a kotonoha model/run directory (model.json + model.safetensors), a run
    directory with the model in its `model/` folder, a LoRA run with only its adapter (merged
    onto the base it names), a Hugging Face directory (config.json + safetensors, sharded or
    not), a `.gguf` file, or a packaged name such as `smollm2`. Only safetensors, JSON and GGUF
    are read; nothing is unpickled.
    """
    from kotonoha.models import resolve  # packaged names ("smollm2") -> the file they ship

    path = Path(resolve(spec)).expanduser()
    expected = ("expected a kotonoha model directory (model.json + model.safetensors), a Hugging "
                "Face model directory (config.json + *.safetensors), a .gguf file or a packaged name "
                "(smollm2, gemma3-270m)")
    if not path.exists():
        raise UserError(f"Model path {path} does not exist; {expected}.")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            from kotonoha.convert.gguf import load_gguf

            return load_gguf(path, device=device, dtype=dtype)
        if path.name in (CONFIG_FILE, WEIGHTS_FILE, "config.json"):
            return load_model(path.parent, device=device, dtype=dtype)
        raise UserError(f"Model path {path} is a file but not a .gguf file; {expected}.")
    for candidate in (path, path / "model"):
        if (candidate / CONFIG_FILE).is_file():
            return load_kotonoha(candidate, device=device, dtype=dtype)
        if (candidate / "adapter.json").is_file():  # a LoRA run saved with merge_lora=false
            from kotonoha.train.lora import load_adapter_model

            return load_adapter_model(candidate, device=device, dtype=dtype)
        if _is_hf_dir(candidate):
            from kotonoha.convert.hf import load_hf

            return load_hf(candidate, device=device, dtype=dtype)
    raise UserError(f"Directory {path} holds no model; {expected}.")


def load_for_inference(spec: str | Path, *, tokenizer: str | Path | None = None,
                       device: str | None = None, dtype: str | None = None,
                       quantize: str | None = None) -> tuple[Transformer, Tokenizer]:
    """What `generate`, `chat` and `serve` run: a model in eval mode and its tokenizer, from
    anything `load_model` opens or from a preset name (random weights, with `tokenizer`); cast
    to `dtype` ("bfloat16", ...) and, with `quantize` ("int8", "int4"), quantized on the CPU."""
    from kotonoha.model import PRESETS, preset
    from kotonoha.models import is_packaged
    from kotonoha.tokenizer import Tokenizer

    if device is None:  # the quantized kernels are CPU ones
        device = "cuda" if torch.cuda.is_available() and not quantize else "cpu"
    parse_device(device)  # a bad name fails here, before anything is loaded
    torch_dtype = getattr(torch, dtype) if dtype else None
    tok = Tokenizer.load(tokenizer) if tokenizer else None
    name = str(spec)
    # "gemma3-270m" is both a preset (random weights) and a packaged model: the model wins.
    if name in PRESETS and not is_packaged(name) and not Path(name).exists():
        if tok is None:
            raise UserError(f"--model {name} is a preset with random weights; give it a "
                            "tokenizer with --tokenizer DIR (see `kotonoha tokenizer train`).")
        torch.manual_seed(0)
        model = Transformer(preset(name, vocab_size=tok.vocab_size)).to(device)
    else:
        model, model_tok = load_model(spec, device=device, dtype=torch_dtype)
        tok = tok or model_tok
        if tok is None:
            raise UserError(f"{spec} has no tokenizer; pass one with --tokenizer DIR.")
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    if quantize:
        from kotonoha.quantize import quantize_model

        model = quantize_model(model, quantize)
    return model.eval(), tok
