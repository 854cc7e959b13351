"""LoRA (Hu et al. 2021): train a low-rank update B·A next to each frozen weight W.

    y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ        A: (r, in), B: (out, r), B starts at 0

`LoRALinear` *is* an `nn.Linear` (same `weight`/`bias` names) with two extra parameters
(`lora_A`, `lora_B`), so a LoRA-wrapped model keeps the plain model's state-dict keys and the
trainer core needs no special case: it optimises whatever still has `requires_grad`.

    apply_lora(model, LoRAConfig(r=16, alpha=32))    # freezes everything else
    save_adapter(dir, model, cfg, base="runs/sft")   # adapter.safetensors + adapter.json
    merge_lora(model)                                # W += (alpha/r) B A, back to nn.Linear
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kotonoha.checkpoint import (
    atomic_write_json,
    read_json,
    read_safetensors,
    save_safetensors_atomic,
)
from kotonoha.errors import UserError

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"

# Every projection inside the blocks: adapting the MLP as well as attention is what makes
# LoRA match full fine-tuning (QLoRA, Dettmers et al. 2023); embeddings and head stay frozen.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise UserError(f"LoRA rank r must be positive, got {self.r}.")
        if not 0 <= self.dropout < 1:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        if isinstance(self.targets, str):
            self.targets = [t for t in self.targets.replace("+", ",").split(",") if t]
        # Only the blocks' projections: a typo would be skipped silently, and the output head
        # may share its weight with the embedding, where a merged adapter would be lost.
        unknown = [t for t in self.targets if t not in ALL_PROJECTIONS]
        if unknown:
            raise UserError(f"LoRA target(s) {', '.join(unknown)} are not projections; targets "
                            f"must be among {', '.join(ALL_PROJECTIONS)}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def parse_lora(spec: str | dict[str, Any] | LoRAConfig | None) -> LoRAConfig | None:
    """`"r=16,alpha=32"` (targets joined by `+`: `targets=q_proj+v_proj`), a mapping, or None."""
    if spec is None or isinstance(spec, LoRAConfig):
        return spec
    if isinstance(spec, dict):
        return LoRAConfig(**spec)
    if not spec.strip() or spec.strip().lower() in ("none", "false", "off"):
        return None
    kw: dict[str, Any] = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("r", "alpha", "dropout", "targets"):
            raise UserError(f"LoRA setting '{item.strip()}' is not understood; write it like "
                            "lora=\"r=16,alpha=32,dropout=0.05,targets=q_proj+v_proj\".")
        try:
            kw[key] = {"r": int, "alpha": float, "dropout": float}.get(key, str)(value.strip())
        except ValueError:
            raise UserError(f"LoRA setting {key} needs a number, got '{value.strip()}'.") from None
    return LoRAConfig(**kw)


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight we replace
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: no copy
        self.r, self.scale = r, alpha / r
        w = base.weight
        a = torch.empty(r, self.in_features)  # drawn on the CPU, where `generator` lives
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # as nn.Linear, PEFT
        self.lora_A = nn.Parameter(a.to(w.device, w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device,
                                               dtype=w.dtype))
        self.lora_dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

    def delta(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> nn.Module:
    """Wrap every nn.Linear whose attribute name is in `cfg.targets`; freeze all the rest.

    The adapters' A matrices are drawn from their own generator seeded with `seed` (a stage
    passes its train.seed): the same run twice, or on more ranks, starts from the same A.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    wrapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in cfg.targets and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, cfg.r, cfg.alpha, cfg.dropout,
                                                 generator))
                wrapped += 1
    if not wrapped:  # a target may be absent (a gelu MLP has no gate_proj), not all of them
        raise UserError(f"No linear layer of the model is named any of {cfg.targets}; LoRA "
                        f"targets must be among {', '.join(ALL_PROJECTIONS)}.")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W += scale·B·A) and turn it back into nn.Linear."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features,
                                  bias=child.bias is not None, device="meta")
                with torch.no_grad():
                    merged = child.weight.float() + child.delta()
                plain.weight = nn.Parameter(merged.to(child.weight.dtype))
                plain.bias = child.bias
                setattr(parent, name, plain)
    return model


def merge_state_dict(state: dict[str, torch.Tensor], cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """The plain model's state dict from a LoRA model's (e.g. the trainer's full checkpoint)."""
    out = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    for key, a in state.items():
        if key.endswith(".lora_A"):
            prefix = key[: -len(".lora_A")]
            b, w = state[prefix + ".lora_B"], out[prefix + ".weight"]
            out[prefix + ".weight"] = (w.float() + cfg.scale * (b.float() @ a.float())
                                       ).to(w.dtype)
    return out


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the frozen base model (e.g. the DPO reference) without a second copy of it."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


class AdaptersOff(nn.Module):
    """A LoRA model seen with its adapters switched off: its frozen starting point, the DPO
    and RL reference, without a second copy of the weights."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._model = [model]  # a list, so it is not a submodule that .eval() would touch

    def forward(self, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        # Eval mode, as a separate reference model is: the shared model may be training, and
        # dropout would make the reference's log-probs random.
        model = self._model[0]
        was_training = model.training
        model.eval()
        try:
            with adapters_disabled(model):
                return model(ids, **kwargs)
        finally:
            model.train(was_training)


# --- adapter-only files --------------------------------------------------------------------


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}


def save_adapter(directory: str | Path, state: dict[str, torch.Tensor], cfg: LoRAConfig,
                 base: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write adapter.safetensors + adapter.json (a few MB instead of the whole model). A base
    that is a path is stored absolute, so the run loads from any working directory."""
    d = Path(directory)
    if base is not None and Path(base).exists():
        base = str(Path(base).resolve())
    tensors = adapter_state(state)
    save_safetensors_atomic(tensors, d / ADAPTER_WEIGHTS)
    atomic_write_json(d / ADAPTER_CONFIG, {"format": "kotonoha-lora", "lora": asdict(cfg),
                                           "base": base, **(extra or {})})
    return d


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the adapter saved in `directory` to `model` (the base it was trained on)."""
    d = Path(directory)
    meta = read_json(d / ADAPTER_CONFIG, "loading a LoRA adapter")
    if not isinstance(meta, dict) or meta.get("format") != "kotonoha-lora":
        raise UserError(f"{d / ADAPTER_CONFIG} is not a kotonoha LoRA adapter description.")
    try:
        cfg = LoRAConfig(**meta["lora"])
    except (KeyError, TypeError):  # no "lora", not a mapping, or an unknown setting
        raise UserError(f"{d / ADAPTER_CONFIG} has no valid \"lora\" settings (r, alpha, "
                        "dropout, targets); write the adapter again.") from None
    apply_lora(model, cfg)
    tensors = read_safetensors(d / ADAPTER_WEIGHTS)
    own = adapter_state(model.state_dict())
    if set(tensors) != set(own):
        raise UserError(f"The adapter in {d} does not fit this model (its layers differ); load "
                        f"it onto its base model {meta.get('base')!r}.")
    for k, t in tensors.items():
        if t.shape != own[k].shape:
            raise UserError(f"The adapter in {d} does not fit this model: {k} has shape "
                            f"{tuple(t.shape)}, the model needs {tuple(own[k].shape)}.")
    model.load_state_dict(tensors, strict=False)
    return model


def load_adapter_model(directory: str | Path, base: str | None = None, *,
                       device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """The merged model of an adapter-only run: its base (`base`, else the one adapter.json
    names) with the adapter applied and merged in, and the run's tokenizer (which carries any
    chat template SFT gave it), else the base's."""
    from kotonoha.checkpoint import load_model
    from kotonoha.tokenizer import Tokenizer

    d = Path(directory)
    meta = read_json(d / ADAPTER_CONFIG, "loading a LoRA adapter")
    base = base or (meta.get("base") if isinstance(meta, dict) else None)
    if not base:
        raise UserError(f"{d / ADAPTER_CONFIG} does not name its base model; pass it with "
                        "`kotonoha convert --from RUN --merge-lora --base MODEL`.")
    if Path(base).exists() and Path(base).resolve() == d.resolve():
        raise UserError(f"{d / ADAPTER_CONFIG} names the run itself as its base.")
    try:
        model, tok = load_model(base, device=device, dtype=dtype)
    except UserError as e:
        raise UserError(f"The LoRA run {d} is an adapter on {base}, which did not load: {e} "
                        "Merge it onto the base's new location with `kotonoha convert --from "
                        "RUN --merge-lora --base MODEL --to kotonoha --out DIR`.") from e
    merge_lora(load_adapter(model, d))
    if (d / "tokenizer.json").is_file():
        tok = Tokenizer.load(d)
    return model.eval(), tok
