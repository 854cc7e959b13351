"""Weight-only int8/int4 quantization: the layers' arithmetic, a quantized model in the engine,
and `--quantize` on the command line."""

import pytest
import torch
from torch import nn

from kotonoha.checkpoint import save_model
from kotonoha.cli import main
from kotonoha.engine import Engine
from kotonoha.errors import UserError
from kotonoha.model import Transformer, preset
from kotonoha.quantize import Int4Linear, Int8Linear, quantize_model
from kotonoha.sampling import SamplingParams
from kotonoha.tokenizer import sample_text_paths, train_bpe_from_files


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_close_to_float(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    x = torch.randn(3, 5, 96)
    y = Int8Linear(linear)(x)
    assert y.shape == (3, 5, 40)
    # int8 per channel plus bf16 activations: about 1 % of the output's size.
    assert _relative_error(y, linear(x)) < 0.02


def test_int4_linear_reproduces_a_q4_1_grid() -> None:
    """Weights that already sit on a 4-bit grid of 32-wide groups (a Q4_1 file's) come back
    on the same grid: only the bf16 activations and scales differ from the float layer."""
    torch.manual_seed(0)
    n, k = 48, 128
    step = torch.rand(n, k // 32, 1) * 0.01 + 0.001
    low = torch.randn(n, k // 32, 1) * 0.01
    codes = torch.randint(0, 16, (n, k // 32, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15  # each group spans the whole range, as Q4_1 makes it
    linear = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        linear.weight.copy_((codes * step + low).view(n, k))
    x = torch.randn(7, k)
    y = Int4Linear(linear)(x)
    assert _relative_error(y, linear(x)) < 0.01
    # Arbitrary weights lose more (4 bits), but still track the float layer.
    other = nn.Linear(k, n)
    assert _relative_error(Int4Linear(other)(x), other(x)) < 0.15


@pytest.fixture(scope="module")
def tiny():
    tok = train_bpe_from_files(sample_text_paths(), 600)
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=tok.vocab_size, context_length=96)), tok


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_tracks_the_float_model(tiny, mode: str) -> None:
    model, tok = tiny
    fresh = Transformer(model.cfg)
    fresh.load_state_dict(model.state_dict())
    quantized = quantize_model(fresh, mode)
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    assert next(quantized.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([tok.encode("The river bank is green and the fish swim in it.")])
    with torch.no_grad():
        ref, out = model(ids), quantized(ids)
    assert _relative_error(out, ref) < (0.05 if mode == "int8" else 0.25)
    # Greedy next tokens mostly agree (random weights make near-ties common).
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.7


def test_engine_decodes_a_quantized_model_like_its_own_forward(tiny) -> None:
    """Through the engine (static cache, fp32 keys/values on the CPU) greedy decoding matches
    the quantized model's own full recompute, token by token."""
    model, tok = tiny
    fresh = Transformer(model.cfg)
    fresh.load_state_dict(model.state_dict())
    quantized = quantize_model(fresh, "int4")
    engine = Engine(quantized, tok, max_batch_size=2)
    assert engine.cache.k0.dtype == torch.float32  # wider than the bf16 model, on purpose
    prompt = tok.encode("Once upon a time")
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12,
                                                   ignore_eos=True))[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(quantized(torch.tensor([ids]))[0, -1].argmax()))
    assert out.token_ids == ids[len(prompt):]


def test_bad_quantization_requests() -> None:
    torch.manual_seed(0)
    with pytest.raises(UserError, match="Unknown quantization 'int3'"):
        quantize_model(Transformer(preset("tiny")), "int3")
    odd = Transformer(preset("tiny", d_model=48, n_head=4, n_kv_head=2))
    with pytest.raises(UserError, match="divisible by 32.*Use --quantize int8"):
        quantize_model(odd, "int4")
    # A valid GQA model whose key projection has 8 outputs: torch's kernel packs rows in 16s.
    narrow = Transformer(preset("tiny", d_model=64, n_head=8, n_kv_head=1))
    with pytest.raises(UserError, match="output sizes by 16; .*k_proj is 64 -> 8"):
        quantize_model(narrow, "int4")


def test_generate_with_quantize_flag(tiny, tmp_path, capsys) -> None:
    model, tok = tiny
    save_model(tmp_path / "m", model, tok)
    code = main(["generate", "--model", str(tmp_path / "m"), "--prompt", "The river",
                 "--temperature", "0", "--max-tokens", "8", "--quantize", "int4"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("The river") and len(out) > len("The river\n")


def test_quantize_keeps_biases_and_refuses_other_devices() -> None:
    """A model with q/k/v biases (Qwen2-style) quantizes with its biases; a model that is not
    on the CPU is refused in one sentence; a LoRA layer is merged before it is quantized."""
    from kotonoha.train.lora import LoRAConfig, adapters_disabled, apply_lora

    torch.manual_seed(0)
    biased = Transformer(preset("tiny", vocab_size=300, qkv_bias=True))
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        for p in biased.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # nonzero biases
        ref = biased(ids)
    out = quantize_model(biased, "int8")(ids)
    assert _relative_error(out, ref) < 0.05
    assert quantize_model(Transformer(preset("tiny", vocab_size=300)), "int8") is not None
    with pytest.raises(UserError, match="CPU only"):
        quantize_model(Transformer(preset("tiny", vocab_size=300)).to("meta"), "int8")
    lora = apply_lora(Transformer(preset("tiny", vocab_size=300)), LoRAConfig(r=4))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.2)  # an adapter that changes the output (~150% relative)
        want = lora(ids)
        with adapters_disabled(lora):
            without = lora(ids)
    # The adapter is merged before quantizing: 1-4% off over eight draws, where dropping it
    # would be about 150% off. (With B ~ N(0, 1) the merged weights' outliers made int8 4-37%
    # off, by the draw.)
    assert _relative_error(without, want) > 1.0
    assert _relative_error(quantize_model(lora, "int8")(ids), want) < 0.05


def test_serve_loads_a_quantized_model_on_the_cpu(tiny, tmp_path) -> None:
    from kotonoha.serve.app import load_served_model

    model, tok = tiny
    save_model(tmp_path / "m", model, tok)
    name, served, _ = load_served_model(f"q={tmp_path / 'm'}", quantize="int4")
    assert name == "q" and next(served.parameters()).device.type == "cpu"
    assert any(isinstance(m, Int4Linear) for m in served.modules())
