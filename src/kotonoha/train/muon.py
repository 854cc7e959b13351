"""Muon for the transformer's hidden matrices, AdamW for everything else, as one optimizer.

Muon (Keller Jordan, 2024; the optimizer of the modded-nanoGPT speedruns) keeps SGD momentum
per weight matrix and replaces each update by the nearest semi-orthogonal matrix, computed
with a few Newton-Schulz iterations: every direction of the update moves at the same rate,
so the rare directions that AdamW barely moves learn as fast as the common ones. The
embedding (tied to the output head), norms and biases are not hidden matrices and keep AdamW.

Why not `torch.optim.Muon`: it orthogonalises in bf16, which a CPU without native bf16
(AVX2 only) emulates about 60x slower than fp32 (7.7 s instead of ~0.18 s per optimizer step
of the demo model), and it takes only 2-D parameters, so the rest would need a second optimizer
with its own checkpoint. Here the iterations run in bf16 only where bf16 matmuls are fast.

The update is scaled by 0.2 * sqrt(max(rows, cols)) so that its RMS matches a typical AdamW
update (Liu et al. 2025, "Muon is scalable"): the same `lr` and `weight_decay` fit both
kinds of parameter. What it did for the demo model (faster pretraining, worse transfer after
SFT) is measured in docs/TRAINING.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

# The quintic's coefficients from the reference implementation: the steepest slope at zero
# that still keeps every singular value within about [0.7, 1.2] after five steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32,
                  ) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T (singular values pushed towards 1); g is a matrix
    or a stack of matrices of one shape (one batched matmul each is faster than many)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller square
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)  # spectral <= Frobenius <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if tall:
        x = x.mT
    return x.reshape(g.shape).to(g.dtype)


def hidden_matrices(model: nn.Module) -> set[int]:
    """ids of the weights that Muon trains: the 2-D weights inside the transformer blocks
    (attention and MLP projections, LoRA factors), never the embedding or the output head."""
    return {id(p) for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and ".blocks." in f".{name}"}


class MuonAdamW(torch.optim.Optimizer):
    """Param groups with `muon=True` take Muon steps, the others AdamW steps. Both kinds use
    the group's `lr` and decoupled `weight_decay`, so one schedule drives them all."""

    def __init__(self, groups: Iterable[dict[str, Any]], *, lr: float, betas: tuple[float, float],
                 eps: float, momentum: float = 0.95, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.float32) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, muon=False,
                        momentum=momentum, ns_steps=ns_steps)
        super().__init__(list(groups), defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        assert closure is None, "MuonAdamW does not take a closure"
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, wd = group["lr"], group["weight_decay"]
            torch._foreach_mul_(params, 1 - lr * wd)  # decoupled weight decay
            if group["muon"]:
                self._muon(params, group, lr)
            else:
                for p in params:
                    self._adamw(p, group, lr)

    def _muon(self, params: list[torch.Tensor], group: dict[str, Any], lr: float) -> None:
        mu = group["momentum"]
        by_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in params:
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buf.lerp_(p.grad, 1 - mu)
            update = p.grad.lerp(buf, mu)  # Nesterov: look one momentum step ahead
            by_shape.setdefault(p.shape, []).append((p, update))
        for shape, pairs in by_shape.items():
            updates = orthogonalize(torch.stack([u for _, u in pairs]), group["ns_steps"],
                                    self.ns_dtype)
            for (p, _), update in zip(pairs, updates):
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(shape)))

    def _adamw(self, p: torch.Tensor, group: dict[str, Any], lr: float) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        (beta1, beta2), eps = group["betas"], group["eps"]
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(eps)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))
