"""The transformer: one config, one model class, read top to bottom.

GPT-2, Llama/SmolLM2 and Gemma 3 are presets of the same class; what differs between them
is a field of `ModelConfig` (norm, positions, MLP, heads, biases, QK-norm, windows), never a
subclass. Inference uses a preallocated `KVCache` indexed by position so that the decode step
has static shapes (and compiles).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from kotonoha.errors import UserError


@dataclass
class ModelConfig:
    vocab_size: int = 512
    context_length: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head (multi-head); fewer = grouped-query attention
    d_model: int = 64
    d_ff: int | None = None  # None = 4 * d_model (GELU) or the Llama 8/3 rule rounded to 64
    head_dim: int | None = None  # None = d_model // n_head (Gemma sets its own)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # Gemma 3: sliding-window layers use their own base
    mlp: Literal["gelu", "swiglu", "geglu"] = "gelu"
    tie_embeddings: bool = True
    bias: bool = True  # biases on attention/MLP projections
    qkv_bias: bool | None = None  # None = same as `bias` (Qwen2: qkv biases only)
    qk_norm: bool = False
    post_norms: bool = False  # Gemma: extra norms on the attention/MLP outputs
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(d_model)
    attn_scale: float | None = None  # None = 1/sqrt(head_dim)
    sliding_window: int | None = None
    # Which layers use the window: every layer, or all but every `global_every`-th (Gemma 3: 6).
    global_every: int | None = None
    dropout: float = 0.0
    name: str = "custom"

    def __post_init__(self) -> None:
        # Checked first: a zero or a string would otherwise surface as a ZeroDivisionError or
        # TypeError below, or (a misspelt choice) silently build a different model.
        required = ("vocab_size", "context_length", "n_layer", "n_head", "d_model")
        optional = ("n_kv_head", "d_ff", "head_dim", "sliding_window", "global_every")
        for name in required + optional:
            value = getattr(self, name)
            if value is None and name in optional:  # None picks the default
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"Model config field {name} must be a positive integer, "
                                f"got {value!r}.")
        choices = {"norm": ("layernorm", "rmsnorm"), "positions": ("learned", "rope"),
                   "mlp": ("gelu", "swiglu", "geglu")}  # the Literal types above
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"Model config field {name} must be one of "
                                f"{', '.join(allowed)}, got {getattr(self, name)!r}.")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise UserError(
                    f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                    "change one of them or set head_dim."
                )
            self.head_dim = self.d_model // self.n_head
        if self.d_ff is None:
            if self.mlp == "gelu":
                self.d_ff = 4 * self.d_model
            else:  # gated MLPs use 2/3 of the 4x width so the parameter count matches
                self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.n_head % self.n_kv_head:
            raise UserError(
                f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}."
            )

    def layer_is_local(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        if self.global_every is None:
            return True
        return (layer + 1) % self.global_every != 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"Unknown model config field(s): {', '.join(unknown)}.")
        return cls(**d)


# Named presets. Shapes of historical models are the published ones; `tiny` is for tests and
# `demo` is sized for a few minutes of CPU pretraining on the built-in world.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, context_length=128, n_layer=2, n_head=4, n_kv_head=2,
                 d_model=64, norm="rmsnorm", positions="rope", mlp="swiglu", bias=False),
    "demo": dict(vocab_size=4096, context_length=256, n_layer=4, n_head=4, n_kv_head=4,
                 d_model=256, norm="rmsnorm", positions="rope", mlp="swiglu", bias=False),
    "gpt1": dict(vocab_size=40478, context_length=512, n_layer=12, n_head=12, d_model=768),
    "gpt2": dict(vocab_size=50257, context_length=1024, n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(vocab_size=50257, context_length=1024, n_layer=24, n_head=16,
                        d_model=1024),
    "gpt2-xl": dict(vocab_size=50257, context_length=1024, n_layer=48, n_head=25, d_model=1600),
    "gpt3": dict(vocab_size=50257, context_length=2048, n_layer=96, n_head=96, d_model=12288),
    "llama-style": dict(vocab_size=32000, context_length=2048, n_layer=8, n_head=8,
                        n_kv_head=4, d_model=512, norm="rmsnorm", positions="rope",
                        mlp="swiglu", bias=False, tie_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, context_length=8192, n_layer=30, n_head=9,
                         n_kv_head=3, d_model=576, d_ff=1536, norm="rmsnorm", positions="rope",
                         rope_theta=100000.0, mlp="swiglu", bias=False, tie_embeddings=True),
    "gemma3-270m": dict(vocab_size=262144, context_length=32768, n_layer=18, n_head=4,
                        n_kv_head=1, d_model=640, d_ff=2048, head_dim=256, norm="rmsnorm",
                        norm_eps=1e-6, positions="rope", rope_theta=1e6,
                        rope_local_theta=10000.0, mlp="geglu", bias=False, qk_norm=True,
                        post_norms=True, embed_scale=True, attn_scale=256**-0.5,
                        sliding_window=512, global_every=6, tie_embeddings=True),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"Unknown model preset '{name}'; choose one of: {', '.join(PRESETS)}.")
    return ModelConfig.from_dict({**PRESETS[name], "name": name, **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose too much precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, T, D/2). Half-split layout, as in HF Llama."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.type_as(x)


# On a CPU, the flash kernel's backward pass is slow at short sequences: most of the time of
# attention in a demo training step. `CausalAttentionCPU` keeps the kernel's forward and writes
# the backward as the textbook matmuls and elementwise ops, from the log-sum-exp the forward
# saved; torch.compile fuses those. Forward + backward per layer at the demo's shapes (batch 8,
# T 256, 4 heads of 64, bf16, an AMX Xeon): 7.8 ms against the kernel's 11.3. It loses at
# T 512 (86 against 61 ms at batch 16, before its scores were fp32), in fp32 and eager, so
# it is used only compiled, in bf16, up to this length (docs/BENCHMARKS.md, "A faster
# attention backward" and "The matmul backward's precision").
FAST_BACKWARD_MAX_LEN = 256


class CausalAttentionCPU(torch.autograd.Function):
    """Causal attention: SDPA's CPU flash kernel forward, a matmul backward. (B, H, T, D)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float) -> torch.Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, True, scale=scale)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:
        q, k, v, out, lse = ctx.saved_tensors
        T = q.shape[-2]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        # Autocast off: compiled, the backward is traced under the forward's autocast, which
        # would turn the fp32 matmuls below back into bf16 ones.
        with torch.autocast(q.device.type, enabled=False):
            # The attention weights again, in fp32, from each query's log-sum-exp. The scores
            # come from an fp32 matmul, as in the kernel: rounded to bf16 (2^-9 of a score)
            # before the exp, at sharp attention (a trained model's) the gradients came out 5-7x
            # further from fp64's than the kernel's, and compiled demo pretraining completed 9
            # points fewer held-out facts. An fp32 matmul for the gradient of the weights too
            # would match the kernel's error exactly (1.3-1.5x now) but cost 2.5 of 7.8 ms.
            scores = (q.float() @ k.float().transpose(-1, -2)) * ctx.scale
            probs = torch.exp(scores - lse.unsqueeze(-1)).masked_fill(~causal, 0.0)
            grad_v = probs.to(q.dtype).transpose(-1, -2) @ grad_out
            grad_probs = (grad_out @ v.transpose(-1, -2)).float()
            row_dot = (grad_out.float() * out.float()).sum(-1, keepdim=True)  # = sum(P * dP)
            grad_scores = (probs * (grad_probs - row_dot) * ctx.scale).to(q.dtype)
            return grad_scores @ k, grad_scores.transpose(-1, -2) @ q, grad_v, None


class KVCache(nn.Module):
    """Preallocated keys/values, per layer: (batch, kv_heads, max_len, head_dim) each.

    Row b's token at position p lives at [b, :, p]; a new occupant of a row simply
    overwrites it, and the attention mask only looks at positions <= the query's own.
    One buffer per layer (not one 5-D tensor) so that torch.compile writes new entries in
    place instead of copying a layer's whole cache on every step.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        for layer in range(cfg.n_layer):
            for kind in "kv":
                self.register_buffer(f"{kind}{layer}", torch.zeros(
                    shape, device=device, dtype=dtype), persistent=False)
        self.batch_size, self.max_len = batch_size, max_len

    def update(self, layer: int, rows: torch.Tensor | None, pos: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, H, T, D) at positions `pos` (B, T) of cache rows `rows` (B,), or of
        rows 0..B-1 when `rows` is None (a cheap slice instead of a gather on read)."""
        k_cache, v_cache = getattr(self, f"k{layer}"), getattr(self, f"v{layer}")
        B = k.shape[0]
        r = (torch.arange(B, device=k.device) if rows is None else rows)[:, None]
        # Advanced indexing with a slice in the middle puts the (B, T) index dims first.
        k_cache[r, :, pos] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache[r, :, pos] = v.transpose(1, 2).to(v_cache.dtype)
        if rows is None:
            return k_cache[:B, :, :kv_len], v_cache[:B, :, :kv_len]
        return k_cache[rows, :, :kv_len], v_cache[rows, :, :kv_len]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.window = cfg.sliding_window if cfg.layer_is_local(layer) else None
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim**-0.5

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rope: tuple | None,
                cache: KVCache | None, rows: torch.Tensor | None, kv_len: int,
                return_weights: bool = False, segments: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:
            k, v = cache.update(self.layer, rows, pos, k, v, kv_len)
            key_pos = torch.arange(kv_len, device=x.device)
            mask = key_pos[None, None, :] <= pos[:, :, None]  # (B, T, kv_len)
            if self.window is not None:
                mask &= key_pos[None, None, :] > pos[:, :, None] - self.window
            mask = mask[:, None]
        elif self.window is not None or return_weights or segments is not None:
            i = torch.arange(T, device=x.device)
            mask = i[None, :] <= i[:, None]
            if self.window is not None:
                mask &= i[None, :] > i[:, None] - self.window
            if segments is not None:  # a packed row: each sequence sees only itself
                mask = (mask & (segments[:, :, None] == segments[:, None, :]))[:, None]
        else:
            mask = None  # plain causal: lets SDPA pick its fused kernel

        # Grouped-query attention: the CPU kernel reads shared key/value heads in place; on
        # other devices a masked enable_gqa call can fall back to the slow math kernel, so
        # the heads are repeated there (and for the explicit softmax below).
        gqa = self.n_kv_head != self.n_head
        if gqa and (return_weights or x.device.type != "cpu"):
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        weights = None
        if return_weights:  # explicit softmax so the attention map can be inspected
            scores = (q.float() @ k.float().transpose(-1, -2)) * self.scale
            scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(-1)
            y = (weights @ v.float()).type_as(q)
        elif (mask is None and not gqa and x.device.type == "cpu" and q.dtype == torch.bfloat16
              and T <= FAST_BACKWARD_MAX_LEN and torch.is_grad_enabled()
              and torch.compiler.is_compiling()
              and not (self.training and self.cfg.dropout > 0)):
            y = CausalAttentionCPU.apply(q, k, v, self.scale)
        else:
            # A cache may keep keys and values in a wider type than the model (see Engine).
            y = F.scaled_dot_product_attention(
                q.to(k.dtype), k, v, attn_mask=mask, is_causal=mask is None,
                dropout_p=self.cfg.dropout if self.training else 0.0, scale=self.scale,
                enable_gqa=gqa,
            ).to(q.dtype)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y), weights


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp != "gelu":
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        elif self.kind == "geglu":
            h = F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)
        else:  # GPT-2's tanh approximation of GELU
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)
        self.post_norms = cfg.post_norms
        if cfg.post_norms:
            self.attn_post_norm = make_norm(cfg, cfg.d_model)
            self.mlp_post_norm = make_norm(cfg, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, pos, rope, cache, rows, kv_len, return_weights=False, segments=None):
        a, weights = self.attn(self.attn_norm(x), pos, rope, cache, rows, kv_len, return_weights,
                               segments)
        if self.post_norms:
            a = self.attn_post_norm(a)
        x = x + self.drop(a)
        m = self.mlp(self.mlp_norm(x))
        if self.post_norms:
            m = self.mlp_post_norm(m)
        return x + self.drop(m), weights


@dataclass
class ForwardOutput:
    logits: torch.Tensor
    hidden_states: list[torch.Tensor] = field(default_factory=list)  # residual after each block
    attentions: list[torch.Tensor] = field(default_factory=list)  # (B, H, T, T) per layer


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_embed = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if cfg.positions == "rope":
            self._init_rope(self.embed.weight.device)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so depth keeps variance.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_rope(self, device: torch.device) -> None:
        cfg = self.cfg
        cos, sin = rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_theta)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        if cfg.rope_local_theta is not None:  # Gemma 3: windowed layers use another base
            cos, sin = rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_local_theta)
            self.register_buffer("rope_local_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_local_sin", sin.to(device), persistent=False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if self.cfg.positions == "learned":
                n -= self.pos_embed.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, *, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, rows: torch.Tensor | None = None,
                kv_len: int | None = None, segments: torch.Tensor | None = None,
                output_hidden_states: bool = False,
                output_attentions: bool = False,
                select: torch.Tensor | None = None,
                targets: torch.Tensor | None = None,
                reduction: Literal["none", "mean", "sum"] = "none",
                ) -> torch.Tensor | ForwardOutput:
        """Logits (B, T, vocab) for token ids `idx` (B, T).

        Without a cache this is the training/scoring path (positions 0..T-1). With a cache,
        `positions` (B, T) says where each token sits in its row of the cache, `rows` (B,)
        which cache rows these are, and `kv_len` how much of the cache to attend over
        (defaults to the whole cache, which keeps shapes static for torch.compile).
        `segments` (B, T), without a cache, packs several sequences into one row: a token
        attends only to earlier tokens with the same segment id, and `positions` should then
        restart at 0 for each sequence (padding-free batches, see data/chat.py).
        Asking for hidden states or attentions returns a `ForwardOutput`.
        `select`, a boolean (B, T) mask, returns the logits of only those positions, as
        (N, vocab): a loss on a few tokens (SFT's replies) then skips the output head, a
        fifth of a small model's FLOPs, everywhere else.
        `targets`, token ids shaped like the logits without their last dimension, returns
        the cross-entropy in fp32 instead of the logits (nanoGPT's interface), per position or
        reduced as `F.cross_entropy`'s `reduction` says: under torch.compile the loss then
        fuses with the output head, where a loss computed outside the compiled model reads
        and writes the logits several more times. A target of -100 gets a loss of 0.
        """
        B, T = idx.shape
        cfg = self.cfg
        if positions is None:
            if idx.shape[1] > cfg.context_length:
                raise UserError(
                    f"Sequence of {T} tokens is longer than the model's context of "
                    f"{cfg.context_length}."
                )
            positions = torch.arange(T, device=idx.device).expand(B, T)
        if cache is not None:
            kv_len = cache.max_len if kv_len is None else kv_len
            if segments is not None:
                raise ValueError("segments pack sequences for training; a cache holds one per row")

        x = self.embed(idx)
        if cfg.embed_scale:
            x = x * torch.tensor(cfg.d_model**0.5, dtype=x.dtype)
        if cfg.positions == "learned":
            x = x + self.pos_embed(positions)
        x = self.drop(x)
        rope_global = rope_local = None
        if cfg.positions == "rope":
            rope_global = rope_local = (self.rope_cos[positions], self.rope_sin[positions])
            if cfg.rope_local_theta is not None:
                rope_local = (self.rope_local_cos[positions], self.rope_local_sin[positions])

        hidden, attentions = [], []
        for block in self.blocks:
            rope = rope_local if block.attn.window is not None else rope_global
            x, w = block(x, positions, rope, cache, rows, kv_len, output_attentions, segments)
            if output_hidden_states:
                hidden.append(x)
            if w is not None:
                attentions.append(w)
        if select is not None:
            x = x[select]
        logits = self.lm_head(self.norm(x))
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(),
                                   reduction=reduction)
            return loss.view(targets.shape) if reduction == "none" else loss
        if output_hidden_states or output_attentions:
            return ForwardOutput(logits, hidden, attentions)
        return logits

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + output head applied to any residual stream (the logit lens)."""
        return self.lm_head(self.norm(h))


def flops_per_token(cfg: ModelConfig, context: int | None = None,
                    logits_share: float = 1.0) -> dict[str, float]:
    """Forward/training FLOPs per token (Kaplan et al. 2020: 2N + 2·L·T·d_attn forward).

    N counts every matmul weight, the output head included (it is a matmul even when tied)
    for the `logits_share` of tokens that get logits (`Transformer.forward(select=...)`).
    """
    T = context or cfg.context_length
    d_attn = cfg.n_head * cfg.head_dim
    d_kv = cfg.n_kv_head * cfg.head_dim
    per_layer = cfg.d_model * (d_attn + 2 * d_kv) + d_attn * cfg.d_model
    per_layer += cfg.d_model * cfg.d_ff * (2 if cfg.mlp == "gelu" else 3)
    matmul_params = cfg.n_layer * per_layer + cfg.d_model * cfg.vocab_size
    head_skipped = (1.0 - logits_share) * cfg.d_model * cfg.vocab_size
    forward = 2 * (matmul_params - head_skipped) + 2 * cfg.n_layer * T * d_attn
    return {"forward": float(forward), "training": float(3 * forward),
            "matmul_params": float(matmul_params)}
