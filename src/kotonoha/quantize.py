"""Weight-only quantization for CPU inference: int8 per channel, or int4 in groups of 32.

Decoding one token at a time on a CPU reads every weight once per token, so its speed is set
by memory bandwidth: bf16 halves the bytes of fp32, int8 halves them again, int4 again. The
matmuls are torch's own weight-only kernels (`_weight_int8pack_mm`, and
`_weight_int4pack_mm_for_cpu`, the ones gpt-fast and torchao use), with bf16 activations.

- int8: one scale per output channel, symmetric (w = q * scale).
- int4: groups of 32 inputs with a scale and a minimum (w = q * scale + min, q in 0..15), the
  layout of llama.cpp's Q4_1. A Q4_1 GGUF (the packaged SmolLM2) therefore comes back on its
  own grid, almost unchanged; other weights lose what any 4-bit format loses.

`quantize_model(model, "int4")` swaps each `nn.Linear` of the blocks and the output head (int8
even under int4, as llama.cpp keeps it at Q8_0) for a quantized module and turns the rest
(embedding, norms) into bf16. Inference only: the packed
weights are buffers, not parameters, so nothing trains them.
"""

from __future__ import annotations

import torch
from torch import nn

from kotonoha.errors import UserError

MODES = ("int8", "int4")
INT4_GROUP = 32


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, q int8 per output row."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("weight_q", (w / scale[:, None]).round().clamp(-127, 127)
                             .to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None
                             else linear.bias.detach().to(torch.bfloat16))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16),
                                      self.weight_q, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """y = x @ w.T + bias with w stored as 4-bit codes, a scale and a minimum per 32 inputs."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP) -> None:
        super().__init__()
        n, k = linear.weight.shape
        w = linear.weight.detach().float().view(n, k // group, group)
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        codes = ((w - lo) / scale).round().clamp(0, 15).to(torch.int32).view(n, k)
        # torch's kernel reads w = (q - 8) * scale + zero, so zero is the minimum plus 8 steps.
        zero = lo + 8 * scale
        self.register_buffer("weight_q", torch._convert_weight_to_int4pack_for_cpu(codes, 1))
        self.register_buffer("scales_zeros", torch.stack(
            [scale.view(n, -1), zero.view(n, -1)], dim=-1).transpose(0, 1).contiguous()
            .to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None
                             else linear.bias.detach().to(torch.bfloat16))
        self.group, self.in_features, self.out_features = group, k, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16),
                                              self.weight_q, self.group, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Quantize `model`'s linear layers in place (see the module docstring); returns it."""
    if mode not in MODES:
        raise UserError(f"Unknown quantization '{mode}'; choose one of {', '.join(MODES)}.")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(f"--quantize {mode} runs on the CPU only (the model is on {device}); "
                        "on a GPU use --dtype bfloat16 and --compile.")
    from kotonoha.train.lora import merge_lora

    merge_lora(model.eval())  # a LoRA layer is an nn.Linear too: fold its adapter in first
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if mode == "int4":
        head = getattr(model, "lm_head", None)  # int8 either way (below)
        # torch's int4 kernel packs rows in 16s and groups of INT4_GROUP inputs.
        odd = [name for name, m in targets if m is not head
               and (m.in_features % INT4_GROUP or m.out_features % 16)]
        if odd:
            m = dict(targets)[odd[0]]
            raise UserError(f"int4 needs input sizes divisible by {INT4_GROUP} and output sizes "
                            f"by 16; {odd[0]} is {m.in_features} -> {m.out_features}. Use "
                            "--quantize int8.")
    with torch.no_grad():
        for name, linear in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            # The output head stays int8 under int4, as llama.cpp's files keep it at Q8_0:
            # its errors land straight on the logits.
            int8 = mode == "int8" or linear is getattr(model, "lm_head", None)
            setattr(parent, attr, Int8Linear(linear) if int8 else Int4Linear(linear))
    # The embedding (tied or not), norms and RoPE tables run in bf16 next to the kernels.
    return model.to(torch.bfloat16)
