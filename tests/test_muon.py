"""`optimizer=muon`: Muon on the blocks' matrices, AdamW on the rest (train/muon.py). Whole
pretraining runs with it (learning, resume) are in test_train.py."""

from __future__ import annotations

import pytest
import torch

from kotonoha.errors import UserError
from kotonoha.model import Transformer, preset
from kotonoha.train.loop import TrainConfig, make_optimizer
from kotonoha.train.muon import MuonAdamW, hidden_matrices, orthogonalize


@pytest.mark.parametrize("shape", [(48, 48), (96, 32), (32, 96)])
def test_orthogonalize_pushes_every_singular_value_towards_one(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    # An ill-conditioned gradient: singular values from 0.1 to 10.
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape)))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape)))
    g = u @ torch.diag(torch.logspace(-1, 1, min(shape))) @ v.T
    s = torch.linalg.svdvals(orthogonalize(g))
    assert orthogonalize(g).shape == g.shape
    stacked = orthogonalize(torch.stack([g, 3 * g]))  # a stack: each matrix on its own
    assert torch.allclose(stacked[0], orthogonalize(g), atol=1e-5)
    assert torch.allclose(stacked[1], orthogonalize(g), atol=1e-5)
    assert s.min() > 0.5 and s.max() < 1.5  # the quintic's band, not exactly 1
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 99


def test_hidden_matrices_are_the_blocks_weights_not_the_embedding() -> None:
    model = Transformer(preset("tiny"))
    ids = hidden_matrices(model)
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    assert names and all(n.startswith("blocks.") and n.endswith("proj.weight") for n in names)
    assert id(model.embed.weight) not in ids  # tied to the output head
    assert len(names) == 7 * model.cfg.n_layer  # q, k, v, o, gate, up, down


def test_muon_and_adamw_halves_match_the_torch_optimizers() -> None:
    """The Muon half takes torch.optim.Muon's steps (which orthogonalise in bf16, hence the
    tolerance), the AdamW half torch.optim.AdamW's (exactly)."""
    torch.manual_seed(0)
    w, e = torch.randn(64, 32), torch.randn(100, 32)
    ours_w, ours_e = w.clone().requires_grad_(), e.clone().requires_grad_()
    ref_w, ref_e = w.clone().requires_grad_(), e.clone().requires_grad_()
    kw = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    ours = MuonAdamW([{"params": [ours_w], "muon": True, "weight_decay": 0.1},
                      {"params": [ours_e], "weight_decay": 0.1}], **kw)
    ref_muon = torch.optim.Muon([ref_w], lr=0.01, weight_decay=0.1,
                                adjust_lr_fn="match_rms_adamw")
    ref_adam = torch.optim.AdamW([ref_e], weight_decay=0.1, **kw)
    for _ in range(5):
        gw, ge = torch.randn(64, 32), torch.randn(100, 32)
        ours_w.grad, ref_w.grad, ours_e.grad, ref_e.grad = gw, gw.clone(), ge, ge.clone()
        ours.step()
        ref_muon.step()
        ref_adam.step()
    assert (ours_w - w).norm() > 0.01  # it moved
    assert torch.allclose(ours_w, ref_w, atol=2e-3), (ours_w - ref_w).abs().max()
    assert torch.allclose(ours_e, ref_e, atol=1e-6), (ours_e - ref_e).abs().max()
    ours_w.grad = ours_e.grad = None  # parameters without a gradient are left alone
    before = [ours_w.detach().clone(), ours_e.detach().clone()]
    ours.step()
    assert torch.equal(ours_w, before[0]) and torch.equal(ours_e, before[1])


def test_make_optimizer_splits_the_decay_groups() -> None:
    model = Transformer(preset("tiny"))
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    kinds = {(g["muon"], g["weight_decay"]): len(g["params"]) for g in opt.param_groups}
    n_layer = model.cfg.n_layer
    # Muon: the blocks' 7 matrices per layer; AdamW: the embedding (decayed), the norms (not).
    assert kinds == {(True, 0.1): 7 * n_layer, (False, 0.1): 1, (False, 0.0): 2 * n_layer + 1}
    with pytest.raises(UserError, match="adamw or muon"):
        TrainConfig(optimizer="sgd")
