"""Hugging Face safetensors directories: import into `Transformer` and export from it.

Families (HF `model_type`): gpt2, llama, mistral, qwen2 and gemma3_text. Each one is a
`ModelConfig` with particular fields set, plus a mapping between our parameter names and
theirs. The mapping is written once (`_hf_name`) and used in both directions, so import and
export cannot drift apart. Differences that are more than a rename:

- GPT-2 uses `Conv1D`, which stores weights as (in, out): transpose; and its query, key and
  value live in one `c_attn` matrix: split/concatenate.
- Gemma's RMSNorm multiplies by (1 + w) where ours multiplies by w: add/subtract 1.

Export writes what `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` read offline; anything the target family cannot represent
is a `UserError` naming the field, never a silently different model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kotonoha.checkpoint import (
    atomic_write_json,
    build_model,
    check_output,
    load_tokenizer,
    read_json,
    read_safetensors,
    save_safetensors_atomic,
)
from kotonoha.errors import UserError
from kotonoha.model import ModelConfig, Transformer

if TYPE_CHECKING:
    from kotonoha.tokenizer import Tokenizer

LLAMA_LIKE = ("llama", "mistral", "qwen2")
FAMILIES = ("gpt2", *LLAMA_LIKE, "gemma3_text")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                 "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}
# Buffers some checkpoints carry that are recomputed, never learned.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")

# ---------------------------------------------------------------------------------------------
# Config: HF config.json <-> ModelConfig


def _get(hf: dict[str, Any], key: str, default: Any) -> Any:
    value = hf.get(key)
    return default if value is None else value


def _rope(hf: dict[str, Any], params: dict[str, Any] | None, default_theta: float,
          what: str) -> float:
    """rope_theta from either the transformers 5 `rope_parameters` or the older top-level keys;
    scaled RoPE variants (llama3, yarn, linear, ...) are not implemented by model.py."""
    params = params or {}
    legacy = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if kind != "default":
        raise UserError(f"{what} uses rope scaling '{kind}', which kotonoha does not implement "
                        "(only plain RoPE is supported).")
    if _get(params, "partial_rotary_factor", _get(hf, "partial_rotary_factor", 1.0)) != 1.0:
        raise UserError(f"{what} rotates only part of each head (partial_rotary_factor), which "
                        "kotonoha does not implement.")
    return float(_get(params, "rope_theta", _get(hf, "rope_theta", default_theta)))


def config_from_hf(hf: dict[str, Any], where: str = "config.json",
                   name: str | None = None) -> ModelConfig:
    """ModelConfig for a Hugging Face config.json dict (UserError for what we cannot run)."""
    if not isinstance(hf, dict):
        raise UserError(f"{where} is not a model config (expected a JSON object of fields).")
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        hint = (" (multimodal Gemma 3; use a text-only gemma3_text checkpoint)"
                if kind == "gemma3" else "")
        raise UserError(f"{where}: model_type '{kind}' is not supported{hint}; kotonoha imports "
                        f"{', '.join(FAMILIES)}.")
    try:
        common: dict[str, Any] = dict(vocab_size=hf["vocab_size"], name=name or str(kind))
        if kind == "gpt2":
            return _gpt2_config(hf, common, where)
        if kind == "gemma3_text":
            return _gemma3_config(hf, common, where)
        return _llama_config(hf, common, where, kind)
    except KeyError as e:
        raise UserError(f"{where} lacks the field {e}, which a {kind} model needs.") from None
    except (TypeError, ValueError, AttributeError) as e:  # e.g. "hidden_size": "64", or null
        raise UserError(f"{where} has a field of the wrong type ({e}); fix or re-download "
                        "it.") from None


def _gpt2_config(hf: dict[str, Any], common: dict[str, Any], where: str) -> ModelConfig:
    act = _get(hf, "activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{where}: activation_function '{act}' is not supported; kotonoha's GPT-2 "
                        "uses the tanh GELU (gelu_new).")
    if not _get(hf, "scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
        raise UserError(f"{where}: non-standard GPT-2 attention scaling (scale_attn_weights / "
                        "scale_attn_by_inverse_layer_idx) is not supported.")
    return ModelConfig(
        **common, context_length=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
        d_model=hf["n_embd"], d_ff=hf.get("n_inner"),
        norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)), norm="layernorm",
        positions="learned", mlp="gelu", bias=True,
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)),
    )


def _llama_config(hf: dict[str, Any], common: dict[str, Any], where: str,
                  kind: str) -> ModelConfig:
    if _get(hf, "hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act '{hf['hidden_act']}' is not supported; the "
                        f"{kind} family in kotonoha uses SwiGLU (silu).")
    sliding = None
    if kind == "llama":
        bias = bool(_get(hf, "attention_bias", False))
        if bool(_get(hf, "mlp_bias", False)) != bias:
            raise UserError(f"{where}: attention_bias={bias} with mlp_bias={not bias} is not "
                            "supported; kotonoha's `bias` covers both.")
        qkv_bias = bias
    elif kind == "qwen2":
        bias, qkv_bias = False, True
        if hf.get("use_sliding_window"):
            raise UserError(f"{where}: use_sliding_window=true (Qwen2 per-layer windows) is not "
                            "supported.")
    else:  # mistral: a window on every layer unless config.json says null
        bias = qkv_bias = False
        sliding = hf.get("sliding_window", 4096)
    return ModelConfig(
        **common, context_length=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads"), d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"], head_dim=hf.get("head_dim"), norm="rmsnorm",
        norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)), positions="rope",
        rope_theta=_rope(hf, hf.get("rope_parameters"), 10000.0, where), mlp="swiglu",
        bias=bias, qkv_bias=qkv_bias, sliding_window=sliding,
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
    )


def _gemma3_config(hf: dict[str, Any], common: dict[str, Any], where: str) -> ModelConfig:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise UserError(f"{where}: {key}={hf[key]} is not supported by kotonoha.")
    if hf.get("use_bidirectional_attention"):
        raise UserError(f"{where}: use_bidirectional_attention=true is not supported.")
    if hf.get("attention_bias"):
        raise UserError(f"{where}: attention_bias=true is not supported for Gemma 3.")
    act = _get(hf, "hidden_activation", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise UserError(f"{where}: hidden_activation '{act}' is not supported (GeGLU with the "
                        "tanh GELU is).")
    n_layer = hf["num_hidden_layers"]
    pattern = int(_get(hf, "sliding_window_pattern", 6))
    types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(n_layer)]
    local = [t == "sliding_attention" for t in types]
    window = hf.get("sliding_window", 4096)
    global_every = None
    if window is None or not any(local):
        window = None
    elif not all(local):
        # model.py expresses the layout as "every k-th layer is global"; find that k.
        global_every = next((k for k in range(1, n_layer + 1)
                             if all(loc == ((i + 1) % k != 0) for i, loc in enumerate(local))),
                            None)
        if global_every is None:
            raise UserError(f"{where}: layer_types {types} is not 'every k-th layer global', the "
                            "only sliding-window layout kotonoha supports.")
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        theta = _rope(hf, params.get("full_attention"), 1e6, where)
        local_theta = _rope({}, params.get("sliding_attention"), 1e4, where)
    else:  # older config.json: top-level keys, scaling applies to the global layers
        theta = _rope(hf, None, 1e6, where)
        local_theta = float(_get(hf, "rope_local_base_freq", 1e4))
    return ModelConfig(
        **common, context_length=_get(hf, "max_position_embeddings", 131072), n_layer=n_layer,
        n_head=hf["num_attention_heads"], n_kv_head=_get(hf, "num_key_value_heads", 4),
        d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
        head_dim=_get(hf, "head_dim", 256), norm="rmsnorm",
        norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)), positions="rope", rope_theta=theta,
        rope_local_theta=local_theta, mlp="geglu", bias=False, qkv_bias=False, qk_norm=True,
        post_norms=True, embed_scale=True,
        attn_scale=float(_get(hf, "query_pre_attn_scalar", 256)) ** -0.5,
        sliding_window=window, global_every=global_every,
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)),
    )


def hf_family(cfg: ModelConfig) -> str:
    """Which HF model_type represents `cfg` exactly (UserError naming the field otherwise)."""
    arch = (cfg.norm, cfg.positions, cfg.mlp)
    if arch == ("layernorm", "learned", "gelu"):
        family = "gpt2"
    elif arch == ("rmsnorm", "rope", "swiglu"):
        if cfg.sliding_window is not None:
            family = "mistral"
        elif cfg.qkv_bias and not cfg.bias:
            family = "qwen2"
        else:
            family = "llama"
    elif arch == ("rmsnorm", "rope", "geglu"):
        family = "gemma3_text"
    else:
        raise UserError(
            f"Cannot export to Hugging Face: norm={cfg.norm}, positions={cfg.positions}, "
            f"mlp={cfg.mlp} is none of GPT-2 (layernorm, learned, gelu), Llama (rmsnorm, rope, "
            "swiglu) or Gemma 3 (rmsnorm, rope, geglu).")

    def need(ok: bool, field: str, why: str) -> None:
        if not ok:
            raise UserError(f"Cannot export to Hugging Face {family}: {field}={getattr(cfg, field)!r}"
                            f" {why}.")

    default_scale = cfg.attn_scale is None or math.isclose(cfg.attn_scale, cfg.head_dim**-0.5)
    if family != "gemma3_text":
        need(not cfg.qk_norm, "qk_norm", "needs the Gemma 3 layout")
        need(not cfg.post_norms, "post_norms", "needs the Gemma 3 layout")
        need(not cfg.embed_scale, "embed_scale", "needs the Gemma 3 layout")
        need(default_scale, "attn_scale", f"differs from 1/sqrt(head_dim) and {family} has no "
             "setting for it")
    if family == "gpt2":
        need(cfg.bias and bool(cfg.qkv_bias), "bias", "but GPT-2 has biases everywhere")
        need(cfg.n_kv_head == cfg.n_head, "n_kv_head", "is grouped-query; GPT-2 is not")
        need(cfg.head_dim * cfg.n_head == cfg.d_model, "head_dim",
             "must be d_model / n_head for GPT-2")
        need(cfg.sliding_window is None, "sliding_window", "has no GPT-2 equivalent")
    elif family in LLAMA_LIKE:
        need(cfg.global_every is None, "global_every", "(windows on some layers only) has no "
             "Llama/Mistral equivalent")
        need(cfg.bias == cfg.qkv_bias or family == "qwen2", "qkv_bias",
             f"differs from bias={cfg.bias}; Llama biases all projections or none")
        need(not (family == "mistral" and (cfg.bias or cfg.qkv_bias)), "bias",
             "but Mistral (sliding window) has no biases")
        need(family != "mistral" or cfg.rope_local_theta in (None, cfg.rope_theta),
             "rope_local_theta", "differs from rope_theta; Mistral has one RoPE base")
    else:
        need(not cfg.bias and not cfg.qkv_bias, "bias", "but Gemma 3 has no biases")
        need(cfg.qk_norm and cfg.post_norms and cfg.embed_scale, "qk_norm",
             "(with post_norms and embed_scale) is required by Gemma 3")
        scalar = (cfg.attn_scale or cfg.head_dim**-0.5) ** -2
        need(math.isclose(scalar, round(scalar), rel_tol=1e-6), "attn_scale",
             "is not 1/sqrt of an integer, as Gemma 3's query_pre_attn_scalar must be")
    return family


def config_to_hf(cfg: ModelConfig, family: str, dtype: torch.dtype,
                 special: dict[str, Any]) -> dict[str, Any]:
    dtype_name = str(dtype).removeprefix("torch.")
    base: dict[str, Any] = {"architectures": [ARCHITECTURES[family]], "model_type": family,
                            "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
                            "dtype": dtype_name, "torch_dtype": dtype_name, **special}
    if family == "gpt2":
        return {**base, "n_positions": cfg.context_length, "n_embd": cfg.d_model,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff,
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                "scale_attn_weights": True}
    out = {**base, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
           "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
           "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps,
           "attention_dropout": cfg.dropout, "rope_theta": cfg.rope_theta}
    if family == "gemma3_text":
        scalar = (cfg.attn_scale or cfg.head_dim**-0.5) ** -2  # checked integral by hf_family
        local_theta = cfg.rope_local_theta or cfg.rope_theta
        types = ["sliding_attention" if cfg.layer_is_local(i) else "full_attention"
                 for i in range(cfg.n_layer)]
        return {**out, "hidden_activation": "gelu_pytorch_tanh",
                "query_pre_attn_scalar": round(scalar), "sliding_window": cfg.sliding_window,
                "layer_types": types, "rope_local_base_freq": local_theta,
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                    "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
                "final_logit_softcapping": None, "attn_logit_softcapping": None}
    out = {**out, "hidden_act": "silu",
           "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    if family == "llama":
        return {**out, "attention_bias": cfg.bias, "mlp_bias": cfg.bias}
    if family == "mistral":
        return {**out, "sliding_window": cfg.sliding_window}
    return {**out, "use_sliding_window": False, "sliding_window": None}


# ---------------------------------------------------------------------------------------------
# Weights: parameter names and the transforms between them

_LLAMA_MODULES = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_GEMMA_MODULES = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                  "mlp_norm": "pre_feedforward_layernorm",
                  "mlp_post_norm": "post_feedforward_layernorm"}
_GPT2_MODULES = {"attn_norm": "ln_1", "mlp_norm": "ln_2", "attn.q_proj": "attn.c_attn",
                 "attn.k_proj": "attn.c_attn", "attn.v_proj": "attn.c_attn",
                 "attn.o_proj": "attn.c_proj",
                 "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
_GPT2_GLOBAL = {"embed.weight": "transformer.wte.weight", "pos_embed.weight": "transformer.wpe.weight",
                "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias",
                "lm_head.weight": "lm_head.weight"}


def _hf_name(name: str, family: str) -> str:
    """Our parameter name -> the HF one (q/k/v of GPT-2 map to its fused c_attn)."""
    if family == "gpt2":
        if name in _GPT2_GLOBAL:
            return _GPT2_GLOBAL[name]
        _, i, rest = name.split(".", 2)
        module, _, param = rest.rpartition(".")
        return f"transformer.h.{i}.{_GPT2_MODULES[module]}.{param}"
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name.startswith("norm."):
        return "model." + name
    if name == "lm_head.weight":
        return name
    _, i, rest = name.split(".", 2)
    module, _, param = rest.rpartition(".")
    table = _GEMMA_MODULES if family == "gemma3_text" else _LLAMA_MODULES
    if module.startswith("attn."):
        module = "self_attn." + module.removeprefix("attn.")
    return f"model.layers.{i}.{table.get(module, module)}.{param}"


def _is_gemma_norm(name: str, family: str) -> bool:
    return family == "gemma3_text" and name.endswith("norm.weight")


def _gpt2_transposed(name: str) -> bool:
    # GPT-2's Conv1D stores (in, out): every attention/MLP weight; norms and embeddings are not.
    return name.startswith("blocks.") and name.endswith(".weight") and \
        name.split(".")[2] in ("attn", "mlp")


def _qkv(name: str) -> str | None:
    """'q', 'k' or 'v' for a GPT-2 attention q/k/v parameter (fused into c_attn), else None."""
    parts = name.split(".")
    if len(parts) == 5 and parts[2] == "attn" and parts[3] in ("q_proj", "k_proj", "v_proj"):
        return parts[3][0]
    return None


def hf_to_kotonoha(tensors: dict[str, torch.Tensor], cfg: ModelConfig, family: str,
                   source: str | Path) -> dict[str, torch.Tensor]:
    """HF-named tensors -> our names, for exactly the parameters `cfg` implies."""
    if family == "gpt2":  # old checkpoints (openai-community/gpt2) lack the prefix
        tensors = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
                   for k, v in tensors.items()}
    with torch.device("meta"):
        names = list(Transformer(cfg).state_dict())
    if cfg.tie_embeddings:
        names.remove("lm_head.weight")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name in names:
        hf = _hf_name(name, family)
        if hf not in tensors:
            raise UserError(f"{source} is missing tensor '{hf}' (for {name}); the weights do "
                            "not match config.json.")
        t = tensors[hf]
        used.add(hf)
        if family == "gpt2":
            if _gpt2_transposed(name):
                t = t.t()
            qkv = _qkv(name)
            if qkv is not None:
                if t.shape[0] % 3:
                    raise UserError(f"{source}: '{hf}' has shape {tuple(tensors[hf].shape)}, "
                                    "which does not split into query, key and value.")
                t = t.chunk(3, dim=0)["qkv".index(qkv)]
        elif _is_gemma_norm(name, family):
            t = t.float() + 1.0  # HF computes (1 + w) in fp32; so do we
        out[name] = t.contiguous()
    extra = [k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES)
             and not (cfg.tie_embeddings and k == "lm_head.weight")]
    if extra:
        raise UserError(f"{source} has tensor '{extra[0]}' that a {family} model with this "
                        "config.json does not use; the weights do not match the config.")
    return out


def kotonoha_to_hf(model: Transformer, family: str,
                   dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names and layouts (tied heads are left out, as HF does)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight")
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if family == "gpt2":
            qkv = _qkv(name)
            if qkv in ("k", "v"):
                continue  # fused into c_attn together with q
            if qkv == "q":
                t = torch.cat([state[name.replace("q_proj", f"{p}_proj")] for p in "qkv"])
            if _gpt2_transposed(name):
                t = t.t()
        elif _is_gemma_norm(name, family):
            t = t.float() - 1.0
        out[_hf_name(name, family)] = t.to(dtype or model.embed.weight.dtype)
    return out


def _read_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index, "loading this sharded model")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no 'weight_map'; it is not a safetensors index.")
        files = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in
                                                              directory.glob("*.pt*")]
        why = (f" (it has {pickled[0]}, a pickle file, which kotonoha never loads because "
               "unpickling can run code; convert it to safetensors first)" if pickled else "")
        raise UserError(f"{directory} has config.json but no *.safetensors weights{why}.")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(read_safetensors(directory / f))
    return tensors


def load_hf(directory: str | Path, *, device: torch.device | str | None = None,
            dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer | None]:
    """Import a Hugging Face model directory (config.json + safetensors, sharded or not)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} is not a Hugging Face model directory (no config.json).")
    hf = read_json(directory / "config.json", "loading this Hugging Face model")
    if not isinstance(hf, dict):
        raise UserError(f"{directory / 'config.json'} must be a JSON object.")
    cfg = config_from_hf(hf, str(directory / "config.json"), directory.resolve().name)
    family = hf["model_type"]
    tensors = hf_to_kotonoha(_read_hf_tensors(directory), cfg, family, directory)
    model = build_model(cfg, tensors, source=directory, device=device, dtype=dtype)
    return model, load_tokenizer(directory)


# ---------------------------------------------------------------------------------------------
# Export


def save_hf(directory: str | Path, model: Transformer, tokenizer: Tokenizer | None = None, *,
            dtype: torch.dtype | None = None) -> Path:
    """Export to a Hugging Face directory that `transformers` loads with AutoModelForCausalLM
    (config.json, model.safetensors, generation_config.json, tokenizer files)."""
    directory = check_output(directory, "hf")  # not a file, nor another format's folder
    cfg = model.cfg
    family = hf_family(cfg)  # refuse before writing anything
    directory.mkdir(parents=True, exist_ok=True)
    tensors = kotonoha_to_hf(model, family, dtype)
    special: dict[str, Any] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    gen: dict[str, Any] = {}
    if tokenizer is not None:
        tokenizer.save(directory)
        special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                   "pad_token_id": tokenizer.pad_id}
        gen = {k: v for k, v in special.items() if v is not None}
        # A chat model ends its turn with e.g. <|im_end|>, not eos: generation must stop there.
        if len(tokenizer.stop_ids) > 1:
            gen["eos_token_id"] = list(tokenizer.stop_ids)
    # A stale index from an earlier sharded export would win over the new single file.
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    save_safetensors_atomic(tensors, directory / "model.safetensors")
    stored = dtype or model.embed.weight.dtype
    atomic_write_json(directory / "config.json", config_to_hf(cfg, family, stored, special))
    atomic_write_json(directory / "generation_config.json", gen)
    return directory
